//! The readers on captured (this-box) and hand-written (dual-socket) host trees: parsers,
//! topology, shard pinning, NIC queues and the IRQ plan.

mod common;

use common::{copy_fixture, fixture};
use tuning::irq::{self, QueueKind};
use tuning::parse::{self, Limit};
use tuning::topology;
use tuning::{Host, HostFacts, Topology};

#[test]
fn this_box_parsers() {
    let host = Host::new(fixture("this-box"));
    let mem = host.meminfo().unwrap();
    assert_eq!(mem.mem_total_bytes, 24_683_656 * 1024);
    assert_eq!(mem.hugepages_total, 0);
    assert_eq!(mem.hugepage_bytes, 2048 * 1024);
    let limits = host.limits().unwrap();
    assert_eq!(
        limits.nofile,
        Some(Limit {
            soft: 20_000,
            hard: 20_000
        })
    );
    assert_eq!(limits.memlock.unwrap().soft, 8 * 1024 * 1024);
    assert_eq!(host.sysctl_u64("fs.nr_open").unwrap(), 1_048_576);
    assert_eq!(
        host.sysctl_numbers("net.ipv4.tcp_mem").unwrap(),
        vec![287_898, 383_866, 575_796]
    );
    assert_eq!(
        host.sysctl("net.ipv4.ip_local_port_range").unwrap(),
        "32768 60999"
    );
    assert_eq!(host.transparent_hugepages().unwrap(), "madvise");
    let status = host.status().unwrap();
    assert_eq!(status.cpus_allowed, Some(vec![0, 1]));
    assert!(status.euid.is_some());

    let irqs = host.interrupts().unwrap();
    assert_eq!(irqs.len(), 19, "numbered lines only, NMI/LOC/ERR skipped");
    let input = irqs.iter().find(|l| l.irq == 38).unwrap();
    assert_eq!(input.name, "virtio2-input.0");
    assert_eq!(irqs.iter().find(|l| l.irq == 26).unwrap().name, "ttyS0");
    // conntrack is built in here: no /proc/modules, but the sysctl exists.
    let facts = HostFacts::read(&host);
    assert!(facts.conntrack.is_some());
    assert_eq!(facts.io_uring_disabled, Some(0));
}

#[test]
fn this_box_topology_and_nic() {
    let host = Host::new(fixture("this-box"));
    let topo = Topology::read(&host);
    assert_eq!(topo.cpus.len(), 2);
    assert_eq!(topo.sockets(), 1);
    assert_eq!(topo.numa_nodes(), 1);
    assert!(!topo.smt());
    assert_eq!(topo.numa_node_of(1), Some(0));
    assert_eq!(topo.shard_cpus(None), vec![0, 1]);

    let nics = irq::read_nics(&host);
    assert_eq!(nics.len(), 1, "lo and ifb have no device: skipped");
    let eth0 = &nics[0];
    assert_eq!(eth0.name, "eth0");
    assert_eq!((eth0.rx_queues, eth0.tx_queues), (1, 1));
    assert_eq!(eth0.numa_node, None);
    let names: Vec<(u32, QueueKind)> = eth0.irqs.iter().map(|q| (q.irq, q.kind)).collect();
    assert_eq!(names, vec![(38, QueueKind::Rx), (39, QueueKind::Tx)]);
    assert_eq!(eth0.irqs[0].affinity, Some(vec![0, 1]));
}

#[test]
fn dual_socket_parsers() {
    let host = Host::new(fixture("dual-socket"));
    let mem = host.meminfo().unwrap();
    assert_eq!(mem.mem_total_bytes, 98_982_196 * 1024);
    assert_eq!(mem.hugetlb_reserved_bytes(), 512 * 2 * 1024 * 1024);
    let limits = host.limits().unwrap();
    assert_eq!(
        limits.nofile,
        Some(Limit {
            soft: 1024,
            hard: 524_288
        })
    );
    assert_eq!(limits.memlock.unwrap().soft, 65_536);
    assert_eq!(host.status().unwrap().euid, Some(1000));
    assert!(host.module_loaded("nf_conntrack"));
    assert!(!host.module_loaded("nf_conntrack_ftp"));
    assert_eq!(host.transparent_hugepages().unwrap(), "always");

    let irqs = host.interrupts().unwrap();
    let queues: Vec<&str> = irqs
        .iter()
        .filter(|l| l.name.starts_with("eth0-TxRx-"))
        .map(|l| l.name.as_str())
        .collect();
    assert_eq!(queues.len(), 8);
    let q3 = irqs.iter().find(|l| l.name == "eth0-TxRx-3").unwrap();
    assert_eq!((q3.irq, q3.count), (93, 100_000 + 3 * 1111));
    assert_eq!(
        irqs.iter().find(|l| l.irq == 55).unwrap().name,
        "ahci[0000:00:1f.2]"
    );
}

#[test]
fn dual_socket_topology() {
    let topo = Topology::read(&Host::new(fixture("dual-socket")));
    assert_eq!(topo.cpus.len(), 24);
    assert_eq!(topo.sockets(), 2);
    assert_eq!(topo.numa_nodes(), 2);
    assert!(topo.smt());
    assert_eq!(topo.physical_cores().len(), 12);
    // Westmere numbering: 0-5 socket 0, 6-11 socket 1, 12-23 their HT siblings.
    for cpu in 0..12 {
        let c = topo.cpu(cpu).unwrap();
        assert_eq!(c.siblings, vec![cpu, cpu + 12], "cpu {cpu}");
        let sibling = topo.cpu(cpu + 12).unwrap();
        assert_eq!((c.package, c.core), (sibling.package, sibling.core));
    }
    assert_eq!(topo.cpu(3).unwrap().core, 8, "core ids skip 3-7");
    assert_eq!(topo.numa_node_of(0), Some(0));
    assert_eq!(topo.numa_node_of(6), Some(1));
    assert_eq!(topo.numa_node_of(17), Some(0));
    assert_eq!(topo.numa_node_of(23), Some(1));
    assert_eq!(topo.numa_node_of(24), None);
    assert_eq!(topo.sibling_rank(14), 1);

    // Shard pinning: one per allowed CPU, or the first S, wrapping past the CPU count.
    assert_eq!(topo.shard_cpus(None), (0..24).collect::<Vec<_>>());
    assert_eq!(topo.shard_cpus(Some(4)), vec![0, 1, 2, 3]);
    assert_eq!(topo.shard_cpus(Some(26))[24..], [0, 1]);
    let plan = topology::shard_plan(&topo, Some(12));
    assert_eq!(plan[5].node, Some(0));
    assert_eq!(plan[6].node, Some(1));
    assert_eq!(plan[6].package, Some(1));
}

#[test]
fn dual_socket_irq_plan_stays_on_the_nic_node() {
    let host = Host::new(fixture("dual-socket"));
    let topo = Topology::read(&host);
    let nics = irq::read_nics(&host);
    assert_eq!(nics.len(), 1, "lo skipped");
    let eth0 = &nics[0];
    assert_eq!(eth0.numa_node, Some(1));
    assert_eq!((eth0.rx_queues, eth0.tx_queues), (8, 8));
    assert_eq!(eth0.irqs.len(), 8, "the link IRQ `eth0` is not a queue");
    assert!(eth0.irqs.iter().all(|q| q.kind == QueueKind::Both));

    // 24 shards: node 1 holds shards 6-11 and 18-23; queue k -> the k-th of them.
    let plans = irq::plan(&topo, &nics, &topo.shard_cpus(None));
    let p = &plans[0];
    let cpus: Vec<usize> = p.irqs.iter().map(|m| m.cpu).collect();
    assert_eq!(cpus, vec![6, 7, 8, 9, 10, 11, 18, 19]);
    assert!(cpus.iter().all(|&c| topo.numa_node_of(c) == Some(1)));
    assert_eq!(p.irqs[0].irq, 90);
    // 8 queues for 12 local shards: RPS spreads queue k over local shards k and k + 8.
    assert_eq!(p.rps[0].cpus, vec![6, 20]);
    assert_eq!(p.rps[4].cpus, vec![10]);
    // Every shard CPU transmits on exactly one queue.
    let mut xps: Vec<usize> = p.xps.iter().flat_map(|x| x.cpus.clone()).collect();
    xps.sort_unstable();
    assert_eq!(xps, (0..24).collect::<Vec<_>>());
    assert!(!p.in_place(eth0));

    // 6 shards on node 1 only (cpus 6-11): one queue per shard would need 8; queues wrap.
    let mut node1 = topo.clone();
    node1.allowed = vec![6, 7, 8, 9, 10, 11];
    let plans = irq::plan(&node1, &nics, &node1.shard_cpus(None));
    let cpus: Vec<usize> = plans[0].irqs.iter().map(|m| m.cpu).collect();
    assert_eq!(cpus, vec![6, 7, 8, 9, 10, 11, 6, 7]);
    assert!(plans[0].rps.iter().all(|r| r.cpus.is_empty()), "RPS off");
    assert!(plans[0].notes.is_empty());

    // 4 shards on node 0: no shard near the NIC; the plan says so and falls back to them.
    let plans = irq::plan(&topo, &nics, &topo.shard_cpus(Some(4)));
    assert!(plans[0].notes[0].contains("NUMA node 1"));
    assert!(plans[0].notes[0].contains("6-11,18-23"));
    assert_eq!(plans[0].irqs[5].cpu, 1);
}

#[test]
fn irq_write_under_a_temp_root() {
    let root = copy_fixture("dual-socket");
    let host = Host::new(root.path());
    let topo = Topology::read(&host);
    let nics = irq::read_nics(&host);
    let plans = irq::plan(&topo, &nics, &topo.shard_cpus(None));
    let written = irq::write_plan(&host, &plans).unwrap();
    assert_eq!(written.len(), 8 + 8 + 8);
    assert_eq!(host.read("/proc/irq/96/smp_affinity_list").unwrap(), "18\n");
    assert_eq!(
        host.read("/sys/class/net/eth0/queues/rx-0/rps_cpus")
            .unwrap(),
        format!("{}\n", parse::format_cpu_mask(&[6, 20]))
    );
    // Read back, the plan is in place.
    let nics = irq::read_nics(&host);
    let again = irq::plan(&topo, &nics, &topo.shard_cpus(None));
    assert!(again[0].in_place(&nics[0]));
    // A missing file is an error, never a stray new file.
    std::fs::remove_file(root.path().join("proc/irq/90/smp_affinity_list")).unwrap();
    assert!(irq::write_plan(&host, &again).is_err());
    assert!(!root.path().join("proc/irq/90/smp_affinity_list").exists());
}
