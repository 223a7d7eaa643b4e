//! The memory and buffer arithmetic, and the status logic and exit codes on constructed facts.

mod common;

use common::fixture;
use tuning::check::{self, Conntrack, Needs, Role, Status, Target};
use tuning::parse::{Limit, MemInfo, UNLIMITED};
use tuning::{Host, HostFacts, Report, Topology};

const GIB: u64 = 1024 * 1024 * 1024;

/// A host that is ready for a million sessions.
fn tuned_facts() -> HostFacts {
    let mut facts = HostFacts::read(&Host::new(fixture("this-box")));
    facts.nofile = Some(Limit {
        soft: 2_000_000,
        hard: 2_000_000,
    });
    facts.memlock = Some(Limit {
        soft: UNLIMITED,
        hard: UNLIMITED,
    });
    facts.nr_open = Some(2_000_000);
    facts.file_max = Some(4_000_000);
    facts.somaxconn = Some(65_536);
    facts.tcp_max_syn_backlog = Some(65_536);
    facts.netdev_max_backlog = Some(65_536);
    facts.ip_local_port_range = Some((1024, 65535));
    facts.tcp_mem = Some([2_000_000, 3_000_000, 4_000_000]);
    facts.tcp_rmem = Some([4096, 16384, 4_194_304]);
    facts.tcp_wmem = Some([4096, 16384, 4_194_304]);
    facts.tcp_ehash_entries = Some(2_097_152);
    facts.meminfo = Some(MemInfo {
        mem_total_bytes: 64 * GIB,
        mem_available_bytes: 60 * GIB,
        hugepages_total: 0,
        hugepages_free: 0,
        hugepage_bytes: 2 * 1024 * 1024,
    });
    facts.transparent_hugepages = Some("madvise".to_string());
    facts.io_uring_disabled = Some(0);
    facts.max_map_count = Some(1_000_000);
    facts.conntrack = None;
    // No NIC rows: their status depends on live IRQ affinity.
    facts.nics.clear();
    facts
}

fn status_of(report: &Report, name: &str) -> Status {
    report
        .checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no row {name}"))
        .status
}

#[test]
fn memory_budget_arithmetic() {
    let t = Target::new(1_000_000);
    let needs = Needs::for_target(&t);
    assert_eq!(needs.memory_bytes, 1_000_000 * (4_200 + 1_500));
    assert_eq!(needs.tcp_mem_pages, 1_000_000);
    assert_eq!(needs.nofile, 1_000_000 + check::FD_HEADROOM);
    assert_eq!(
        needs.accept_backlog, 16_384,
        "1M / 64 rounded up to a power of two"
    );
    assert_eq!(needs.tcp_mem(None), [1_000_000, 1_500_000, 2_000_000]);
    // Never below what the host has.
    assert_eq!(
        needs.tcp_mem(Some([3_000_000, 1, 1])),
        [3_000_000, 1_500_000, 2_000_000]
    );
    // Both ends on one box: two sockets per session.
    let bench = Target {
        role: Role::Bench,
        ..t
    };
    let needs = Needs::for_target(&bench);
    assert_eq!(needs.memory_bytes, 1_000_000 * (2 * 4_200 + 1_500));
    assert_eq!(needs.tcp_mem_pages, 2_000_000);
    assert_eq!(Needs::source_addresses(1_000_000, 28_232), 36);
    assert_eq!(Needs::source_addresses(1_000_000, 64_512), 16);
    assert_eq!(Needs::source_addresses(10, 28_232), 1);

    // 5.7 GB against 64 GiB: ok; against 7 GiB: above 75%, warn; against 5 GiB: blocks.
    let mut facts = tuned_facts();
    assert_eq!(status_of(&Report::new(&facts, &t), "memory"), Status::Ok);
    facts.meminfo.as_mut().unwrap().mem_total_bytes = 7 * GIB;
    assert_eq!(status_of(&Report::new(&facts, &t), "memory"), Status::Warn);
    facts.meminfo.as_mut().unwrap().mem_total_bytes = 5 * GIB;
    assert_eq!(
        status_of(&Report::new(&facts, &t), "memory"),
        Status::Blocks
    );
    // Reserved huge pages come off the top: 64 GiB with 59 GiB of hugetlb blocks.
    let mem = facts.meminfo.as_mut().unwrap();
    mem.mem_total_bytes = 64 * GIB;
    mem.hugepages_total = 59 * 512;
    assert_eq!(
        status_of(&Report::new(&facts, &t), "memory"),
        Status::Blocks
    );
}

#[test]
fn tcp_mem_pressure_against_sessions() {
    let t = Target::new(1_000_000);
    let mut facts = tuned_facts();
    facts.tcp_mem = Some([287_898, 383_866, 575_796]);
    let report = Report::new(&facts, &t);
    assert_eq!(status_of(&report, "net.ipv4.tcp_mem"), Status::Warn);
    let row = report
        .checks
        .iter()
        .find(|c| c.name == "net.ipv4.tcp_mem")
        .unwrap();
    assert!(
        row.fix.contains("\"1000000 1500000 2000000\""),
        "{}",
        row.fix
    );
    facts.tcp_mem = Some([1_000_000, 1_000_000, 1_000_000]);
    assert_eq!(
        status_of(&Report::new(&facts, &t), "net.ipv4.tcp_mem"),
        Status::Ok
    );
    // Large targets want small buffer defaults; small ones keep theirs.
    facts.tcp_rmem = Some([4096, 131_072, 6_291_456]);
    assert_eq!(
        status_of(&Report::new(&facts, &t), "net.ipv4.tcp_rmem"),
        Status::Warn
    );
    assert_eq!(
        status_of(
            &Report::new(&facts, &Target::new(1_000)),
            "net.ipv4.tcp_rmem"
        ),
        Status::Ok
    );
}

#[test]
fn statuses_and_exit_codes() {
    let t = Target::new(1_000_000).with_shards(2);
    let facts = tuned_facts();
    let report = Report::new(&facts, &t);
    assert_eq!(
        report.summary.warn + report.summary.blocks,
        0,
        "{}",
        report.table()
    );
    assert_eq!(report.exit_code(), 0);
    assert!(report.warnings().is_empty());

    // A short accept queue only warns.
    let mut warn = facts.clone();
    warn.somaxconn = Some(4096);
    let report = Report::new(&warn, &t);
    assert_eq!(report.exit_code(), 1);
    assert_eq!(report.summary.warn, 1);
    let w = report.warnings();
    assert_eq!(w[0].0, "net.core.somaxconn");
    assert_eq!(w[0].1, "4096");
    assert!(w[0].3.contains("sysctl -w net.core.somaxconn=16384"));
    assert!(report.refuses_to_start().is_empty());

    // Soft nofile below the target but the hard limit allows it: warn; hard too low: blocks.
    let mut soft = facts.clone();
    soft.nofile = Some(Limit {
        soft: 1024,
        hard: 2_000_000,
    });
    let report = Report::new(&soft, &t);
    assert_eq!(status_of(&report, "RLIMIT_NOFILE soft"), Status::Warn);
    assert_eq!(status_of(&report, "RLIMIT_NOFILE hard"), Status::Ok);
    soft.nofile = Some(Limit {
        soft: 1024,
        hard: 524_288,
    });
    let report = Report::new(&soft, &t);
    assert_eq!(status_of(&report, "RLIMIT_NOFILE soft"), Status::Blocks);
    assert_eq!(report.exit_code(), 2);

    // glommio's memlock floor: below 512 KiB blocks (and refuses to start), below 8 MiB warns.
    let mut memlock = facts.clone();
    memlock.memlock = Some(Limit {
        soft: 65_536,
        hard: 65_536,
    });
    let report = Report::new(&memlock, &t);
    assert_eq!(report.exit_code(), 2);
    assert_eq!(report.refuses_to_start()[0].name, "RLIMIT_MEMLOCK");
    memlock.memlock = Some(Limit {
        soft: 1024 * 1024,
        hard: 1024 * 1024,
    });
    assert_eq!(Report::new(&memlock, &t).exit_code(), 1);

    // io_uring disabled blocks; absent (old kernel) is fine.
    let mut uring = facts.clone();
    uring.io_uring_disabled = Some(2);
    let report = Report::new(&uring, &t);
    assert_eq!(
        report.refuses_to_start()[0].name,
        "kernel.io_uring_disabled"
    );
    uring.io_uring_disabled = None;
    assert_eq!(Report::new(&uring, &t).exit_code(), 0);

    // Conntrack below N blocks, below N + 25% warns.
    let mut ct = facts.clone();
    ct.conntrack = Some(Conntrack {
        max: Some(262_144),
        hashsize: Some(65_536),
    });
    let name = "net.netfilter.nf_conntrack_max";
    assert_eq!(status_of(&Report::new(&ct, &t), name), Status::Blocks);
    ct.conntrack = Some(Conntrack {
        max: Some(1_100_000),
        hashsize: None,
    });
    assert_eq!(status_of(&Report::new(&ct, &t), name), Status::Warn);

    // An unreadable value warns, never passes silently.
    let mut unreadable = facts.clone();
    unreadable.file_max = None;
    assert_eq!(
        status_of(&Report::new(&unreadable, &t), "fs.file-max"),
        Status::Warn
    );

    // THP never warns.
    let mut thp = facts.clone();
    thp.transparent_hugepages = Some("never".to_string());
    assert_eq!(Report::new(&thp, &t).exit_code(), 1);

    // More shards than CPUs: the topology row warns.
    let report = Report::new(&facts, &Target::new(1000).with_shards(3));
    assert_eq!(status_of(&report, "cpu topology"), Status::Warn);
    assert_eq!(status_of(&report, "shard pinning"), Status::Warn);
}

#[test]
fn bench_role_ports_and_source_addresses() {
    let mut facts = tuned_facts();
    facts.ip_local_port_range = Some((32768, 60999));
    let t = Target {
        role: Role::Bench,
        ..Target::new(1_000_000)
    };
    let report = Report::new(&facts, &t);
    assert_eq!(
        status_of(&report, "net.ipv4.ip_local_port_range"),
        Status::Warn
    );
    let src = report
        .checks
        .iter()
        .find(|c| c.name == "loopback source addresses")
        .unwrap();
    assert_eq!(src.needed, "36 address(es)");
    assert_eq!(src.fix, "bench --source-ips 127.0.0.1-127.0.0.36");
    // The server role has no source-address row.
    let report = Report::new(&facts, &Target::new(1_000_000));
    assert!(report
        .checks
        .iter()
        .all(|c| c.name != "loopback source addresses"));
}

#[test]
fn dual_socket_fixture_report() {
    let host = Host::new(fixture("dual-socket"));
    let report = check::check(&host, &Target::new(1_000_000).with_shards(12));
    assert_eq!(report.exit_code(), 2);
    assert_eq!(status_of(&report, "RLIMIT_MEMLOCK"), Status::Blocks);
    assert_eq!(status_of(&report, "net.ipv4.tcp_mem"), Status::Ok);
    assert_eq!(status_of(&report, "nic eth0"), Status::Warn);
    assert_eq!(report.topology.sockets, 2);
    assert_eq!(report.topology.shards.len(), 12);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["topology"]["numa_nodes"], 2);
    assert_eq!(json["target"]["connections"], 1_000_000);
    assert_eq!(json["checks"][0]["status"], "blocks");
    let topo = Topology::read(&host);
    assert_eq!(report.topology.nodes, topo.nodes);
}
