//! CPU topology (sockets, cores, SMT siblings, NUMA nodes) read from /sys, and the plan that pins
//! one shard per CPU. Mirrors the gateway's default: shard i runs on the i-th CPU of the process
//! affinity mask (`Cpus_allowed_list`), wrapping when there are more shards than CPUs.

use serde::Serialize;

use crate::host::Host;
use crate::parse::{self, format_cpu_list};

/// One logical CPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cpu {
    pub id: usize,
    /// `topology/physical_package_id`: the socket.
    pub package: u32,
    /// `topology/core_id`: unique within a package only (Westmere numbers them 0,1,2,8,9,10).
    pub core: u32,
    /// `topology/thread_siblings_list`: this CPU and its SMT siblings.
    pub siblings: Vec<usize>,
    /// The NUMA node whose `cpulist` holds this CPU; `None` without /sys/devices/system/node.
    pub node: Option<usize>,
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub id: usize,
    pub cpus: Vec<usize>,
}

/// The host's CPUs and NUMA nodes, and the CPUs this process may run on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Topology {
    pub cpus: Vec<Cpu>,
    pub nodes: Vec<Node>,
    /// `Cpus_allowed_list` of this process (all CPUs when unreadable).
    pub allowed: Vec<usize>,
}

impl Topology {
    /// Reads the topology under `host`'s root. Missing files degrade (package 0, no node), they
    /// never fail: a container may hide parts of /sys.
    pub fn read(host: &Host) -> Self {
        let mut nodes = Vec::new();
        for name in host.list_dir("/sys/devices/system/node") {
            let Some(id) = name.strip_prefix("node").and_then(|n| n.parse().ok()) else {
                continue;
            };
            let cpus = host
                .read(&format!("/sys/devices/system/node/{name}/cpulist"))
                .ok()
                .and_then(|t| parse::parse_cpu_list(&t))
                .unwrap_or_default();
            nodes.push(Node { id, cpus });
        }
        nodes.sort_by_key(|n| n.id);

        let mut cpus = Vec::new();
        for name in host.list_dir("/sys/devices/system/cpu") {
            let Some(id) = name.strip_prefix("cpu").and_then(|n| n.parse().ok()) else {
                continue;
            };
            let topo = |file: &str| {
                host.read(&format!("/sys/devices/system/cpu/{name}/topology/{file}"))
                    .ok()
            };
            // A CPU without a topology directory is offline; the shards cannot use it.
            let Some(package) = topo("physical_package_id").and_then(|t| t.trim().parse().ok())
            else {
                continue;
            };
            let core = topo("core_id")
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(id as u32);
            let siblings = topo("thread_siblings_list")
                .and_then(|t| parse::parse_cpu_list(&t))
                .unwrap_or_else(|| vec![id]);
            let node = nodes.iter().find(|n| n.cpus.contains(&id)).map(|n| n.id);
            cpus.push(Cpu {
                id,
                package,
                core,
                siblings,
                node,
            });
        }
        cpus.sort_by_key(|c| c.id);

        let allowed = host
            .status()
            .ok()
            .and_then(|s| s.cpus_allowed)
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| cpus.iter().map(|c| c.id).collect());
        Self {
            cpus,
            nodes,
            allowed,
        }
    }

    /// The number of sockets (distinct physical packages); at least 1.
    pub fn sockets(&self) -> usize {
        let mut packages: Vec<u32> = self.cpus.iter().map(|c| c.package).collect();
        packages.sort_unstable();
        packages.dedup();
        packages.len().max(1)
    }

    /// The number of NUMA nodes; at least 1.
    pub fn numa_nodes(&self) -> usize {
        self.nodes.len().max(1)
    }

    /// The NUMA node of a CPU; `None` if unknown.
    pub fn numa_node_of(&self, cpu: usize) -> Option<usize> {
        self.cpus.iter().find(|c| c.id == cpu).and_then(|c| c.node)
    }

    /// The CPU with this id.
    pub fn cpu(&self, cpu: usize) -> Option<&Cpu> {
        self.cpus.iter().find(|c| c.id == cpu)
    }

    /// Whether any core runs more than one hardware thread.
    pub fn smt(&self) -> bool {
        self.cpus.iter().any(|c| c.siblings.len() > 1)
    }

    /// The physical cores as (package, core) pairs, sorted.
    pub fn physical_cores(&self) -> Vec<(u32, u32)> {
        let mut cores: Vec<(u32, u32)> = self.cpus.iter().map(|c| (c.package, c.core)).collect();
        cores.sort_unstable();
        cores.dedup();
        cores
    }

    /// Where a CPU ranks among its SMT siblings: 0 for the first thread of a core.
    pub fn sibling_rank(&self, cpu: usize) -> usize {
        self.cpu(cpu)
            .and_then(|c| c.siblings.iter().position(|&s| s == cpu))
            .unwrap_or(0)
    }

    /// The CPU each shard is pinned to, as the gateway pins them: one shard per allowed CPU when
    /// `shards` is `None`, else shard i on allowed CPU i (wrapping when shards outnumber CPUs).
    pub fn shard_cpus(&self, shards: Option<usize>) -> Vec<usize> {
        let allowed: Vec<usize> = if self.allowed.is_empty() {
            vec![0]
        } else {
            self.allowed.clone()
        };
        let count = shards.unwrap_or(allowed.len()).max(1);
        (0..count).map(|i| allowed[i % allowed.len()]).collect()
    }

    /// One line: "2 sockets, 2 NUMA nodes, 24 CPUs (12 cores, SMT x2), 24 allowed".
    pub fn describe(&self) -> String {
        let cores = self.physical_cores().len().max(1);
        let cpus = self.cpus.len().max(1);
        let smt = if self.smt() {
            format!("SMT x{}", cpus.div_ceil(cores))
        } else {
            "no SMT".to_string()
        };
        format!(
            "{} socket{}, {} NUMA node{}, {} CPUs ({} cores, {}), allowed {}",
            self.sockets(),
            plural(self.sockets()),
            self.numa_nodes(),
            plural(self.numa_nodes()),
            cpus,
            cores,
            smt,
            format_cpu_list(&self.allowed)
        )
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The shard-to-CPU plan with each CPU's node, as reported by `check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShardPin {
    pub shard: usize,
    pub cpu: usize,
    pub node: Option<usize>,
    pub package: Option<u32>,
}

/// Pins `shards` shards (None: one per allowed CPU) and annotates each with its node and socket.
pub fn shard_plan(topology: &Topology, shards: Option<usize>) -> Vec<ShardPin> {
    topology
        .shard_cpus(shards)
        .into_iter()
        .enumerate()
        .map(|(shard, cpu)| ShardPin {
            shard,
            cpu,
            node: topology.numa_node_of(cpu),
            package: topology.cpu(cpu).map(|c| c.package),
        })
        .collect()
}
