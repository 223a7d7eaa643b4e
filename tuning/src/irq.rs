//! NIC queues, their IRQs, and the IRQ/RPS/XPS plan that serves each queue on the CPU of the
//! shard that owns it: queue k -> the k-th shard (mod the shard count) on the NIC's NUMA node ->
//! that shard's CPU. Reads /proc/interrupts, /proc/irq/N/smp_affinity_list and
//! /sys/class/net/DEV/{queues,device}; writes only in `write_plan`, and only under the root.

use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;

use crate::host::Host;
use crate::parse::{self, format_cpu_list, format_cpu_mask};
use crate::topology::Topology;
use crate::TuningError;

/// Which direction(s) a queue IRQ serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    /// A combined queue pair ("eth0-TxRx-3", "mlx: eth0-3").
    Both,
    Rx,
    Tx,
}

/// One queue interrupt of a NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueIrq {
    pub irq: u32,
    pub name: String,
    pub queue: usize,
    pub kind: QueueKind,
    /// The current `smp_affinity_list`; `None` if unreadable.
    pub affinity: Option<Vec<usize>>,
}

/// A physical NIC: its queues, NUMA node and queue IRQs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nic {
    pub name: String,
    /// `device/numa_node`; `None` when absent or -1 (no NUMA locality known).
    pub numa_node: Option<usize>,
    pub rx_queues: usize,
    pub tx_queues: usize,
    pub irqs: Vec<QueueIrq>,
    /// The current `rps_cpus` per rx queue (empty: RPS off).
    pub rps: Vec<Vec<usize>>,
}

/// Reads the physical NICs: every /sys/class/net entry with a `device` (which skips `lo`,
/// bridges, ifb and other virtual devices).
pub fn read_nics(host: &Host) -> Vec<Nic> {
    let irqs = host.interrupts().unwrap_or_default();
    let mut nics = Vec::new();
    for name in host.list_dir("/sys/class/net") {
        let base = format!("/sys/class/net/{name}");
        if name == "lo" || !host.exists(&format!("{base}/device")) {
            continue;
        }
        let queues = host.list_dir(&format!("{base}/queues"));
        let count = |prefix: &str| queues.iter().filter(|q| q.starts_with(prefix)).count();
        let (rx_queues, tx_queues) = (count("rx-"), count("tx-"));
        let numa_node = host
            .read(&format!("{base}/device/numa_node"))
            .ok()
            .and_then(|t| t.trim().parse::<i64>().ok())
            .and_then(|n| usize::try_from(n).ok());
        // virtio NICs name their IRQs after the virtio device ("virtio2-input.0"), found as the
        // last component of the `device` link.
        let alias = std::fs::read_link(host.path(&format!("{base}/device")))
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()));
        let mut queue_irqs = Vec::new();
        for line in &irqs {
            let Some((queue, kind)) = match_queue_irq(&line.name, &name, alias.as_deref()) else {
                continue;
            };
            queue_irqs.push(QueueIrq {
                irq: line.irq,
                name: line.name.clone(),
                queue,
                kind,
                affinity: host.irq_affinity(line.irq),
            });
        }
        let rps = (0..rx_queues)
            .map(|k| {
                host.read(&format!("{base}/queues/rx-{k}/rps_cpus"))
                    .ok()
                    .and_then(|t| parse::parse_cpu_mask(&t))
                    .unwrap_or_default()
            })
            .collect();
        nics.push(Nic {
            name,
            numa_node,
            rx_queues,
            tx_queues,
            irqs: queue_irqs,
            rps,
        });
    }
    nics
}

/// Whether an IRQ action name is a queue of device `dev` (or of its `alias`, the device link's
/// name), and which queue: "eth0-TxRx-3" -> (3, Both), "eth0-rx-1" -> (1, Rx),
/// "virtio2-output.0" -> (0, Tx), "eth0-5" -> (5, Both). "eth0" and "virtio2-config" -> None.
pub fn match_queue_irq(
    irq_name: &str,
    dev: &str,
    alias: Option<&str>,
) -> Option<(usize, QueueKind)> {
    let rest = [Some(dev), alias]
        .into_iter()
        .flatten()
        .find_map(|prefix| irq_name.strip_prefix(prefix)?.strip_prefix('-'))?;
    let digits_at = rest.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (label, number) = rest.split_at(digits_at);
    let queue: usize = number.parse().ok()?;
    let label = label.trim_end_matches(['-', '.', '_']).to_ascii_lowercase();
    let kind = if label.is_empty() || label.contains("txrx") || label.contains("combined") {
        QueueKind::Both
    } else if label.contains("rx") || label.contains("input") {
        QueueKind::Rx
    } else if label.contains("tx") || label.contains("output") {
        QueueKind::Tx
    } else {
        return None;
    };
    Some((queue, kind))
}

/// One IRQ move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IrqMove {
    pub irq: u32,
    pub name: String,
    pub queue: usize,
    pub current: Option<Vec<usize>>,
    pub cpu: usize,
}

/// One queue's RPS or XPS mask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueMask {
    pub queue: usize,
    pub cpus: Vec<usize>,
}

/// The plan for one NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NicPlan {
    pub nic: String,
    pub numa_node: Option<usize>,
    /// The shards (index, CPU) that serve this NIC's queues, in queue order.
    pub serving_shards: Vec<(usize, usize)>,
    pub irqs: Vec<IrqMove>,
    /// rx-K/rps_cpus: spreads a queue over several shard CPUs when queues are fewer than shards;
    /// empty (RPS off) when each queue already lands on its own shard's CPU.
    pub rps: Vec<QueueMask>,
    /// tx-K/xps_cpus: the shard CPUs that transmit on queue K.
    pub xps: Vec<QueueMask>,
    /// What the plan could not do well, for people.
    pub notes: Vec<String>,
}

impl NicPlan {
    /// Whether the live IRQ affinities and RPS masks already match the plan.
    pub fn in_place(&self, nic: &Nic) -> bool {
        let irqs_ok = self
            .irqs
            .iter()
            .all(|m| m.current.as_deref() == Some(&[m.cpu][..]));
        let rps_ok = self
            .rps
            .iter()
            .all(|r| nic.rps.get(r.queue).map(Vec::as_slice) == Some(r.cpus.as_slice()));
        irqs_ok && rps_ok
    }
}

/// Plans IRQ, RPS and XPS affinity for each NIC given the shards' CPUs (`shard_cpus[i]` is shard
/// i's CPU). Queue k goes to shard k mod S; on a NUMA host S counts only the shards on the NIC's
/// node, so packets never cross the socket interconnect (unless no shard runs there).
pub fn plan(topology: &Topology, nics: &[Nic], shard_cpus: &[usize]) -> Vec<NicPlan> {
    nics.iter()
        .map(|nic| plan_nic(topology, nic, shard_cpus))
        .collect()
}

fn plan_nic(topology: &Topology, nic: &Nic, shard_cpus: &[usize]) -> NicPlan {
    let mut notes = Vec::new();
    let all: Vec<(usize, usize)> = shard_cpus.iter().copied().enumerate().collect();
    let mut local: Vec<(usize, usize)> = match nic.numa_node {
        Some(node) if topology.numa_nodes() > 1 => all
            .iter()
            .copied()
            .filter(|&(_, cpu)| topology.numa_node_of(cpu) == Some(node))
            .collect(),
        _ => all.clone(),
    };
    if local.is_empty() {
        let node = nic.numa_node.unwrap_or(0);
        let node_cpus = topology
            .nodes
            .iter()
            .find(|n| n.id == node)
            .map(|n| format_cpu_list(&n.cpus))
            .unwrap_or_default();
        notes.push(format!(
            "{} sits on NUMA node {node} but no shard runs there: every packet crosses the \
             socket interconnect; pin shards to node {node} (gateway.toml `cpus`, or \
             CPUAffinity={node_cpus} in the unit)",
            nic.name
        ));
        local = all.clone();
    }
    // Shards off the NIC's node still transmit; they take queues after the local ones.
    let mut order = local.clone();
    order.extend(all.iter().filter(|s| !local.contains(s)).copied());

    let queue_count = nic.rx_queues.max(nic.tx_queues).max(1);
    let owner = |queue: usize| local[queue % local.len()];
    let irqs = nic
        .irqs
        .iter()
        .map(|q| IrqMove {
            irq: q.irq,
            name: q.name.clone(),
            queue: q.queue,
            current: q.affinity.clone(),
            cpu: owner(q.queue).1,
        })
        .collect();
    if nic.irqs.is_empty() {
        notes.push(format!(
            "no queue IRQs named after {} in /proc/interrupts (e.g. mlx5_comp*): set their \
             affinity by hand or with the driver's script (set_irq_affinity.sh)",
            nic.name
        ));
    }
    let rps = if nic.rx_queues > 0 && nic.rx_queues < local.len() {
        (0..nic.rx_queues)
            .map(|k| QueueMask {
                queue: k,
                cpus: sorted(
                    local
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| i % nic.rx_queues == k)
                        .map(|(_, &(_, cpu))| cpu)
                        .collect(),
                ),
            })
            .collect()
    } else {
        (0..nic.rx_queues)
            .map(|k| QueueMask {
                queue: k,
                cpus: Vec::new(),
            })
            .collect()
    };
    if nic.rx_queues > 0 && nic.rx_queues < local.len() {
        notes.push(format!(
            "{} has {} rx queue(s) for {} shards: RPS spreads packet processing over the shard \
             CPUs; `ethtool --set-channels {} combined {}` would give each shard its own queue \
             if the NIC supports it",
            nic.name,
            nic.rx_queues,
            local.len(),
            nic.name,
            local.len()
        ));
    }
    let xps = (0..nic.tx_queues)
        .map(|k| QueueMask {
            queue: k,
            cpus: sorted(
                order
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % nic.tx_queues == k)
                    .map(|(_, &(_, cpu))| cpu)
                    .collect(),
            ),
        })
        .collect();
    let serving_shards = (0..queue_count).map(owner).collect();
    NicPlan {
        nic: nic.name.clone(),
        numa_node: nic.numa_node,
        serving_shards,
        irqs,
        rps,
        xps,
        notes,
    }
}

fn sorted(mut cpus: Vec<usize>) -> Vec<usize> {
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

/// Writes a plan under the host's root: /proc/irq/N/smp_affinity_list and
/// /sys/class/net/DEV/queues/{rx-K/rps_cpus,tx-K/xps_cpus}. The files must exist (they always
/// do on a live host), so a typo never creates stray files. Returns the files written; stops at
/// the first failure (a managed IRQ refuses new affinity with EIO).
pub fn write_plan(host: &Host, plans: &[NicPlan]) -> Result<Vec<PathBuf>, TuningError> {
    let mut written = Vec::new();
    for p in plans {
        for m in &p.irqs {
            let abs = format!("/proc/irq/{}/smp_affinity_list", m.irq);
            written.push(write_existing(host, &abs, &format!("{}\n", m.cpu))?);
        }
        for r in &p.rps {
            let abs = format!("/sys/class/net/{}/queues/rx-{}/rps_cpus", p.nic, r.queue);
            written.push(write_existing(
                host,
                &abs,
                &format!("{}\n", format_cpu_mask(&r.cpus)),
            )?);
        }
        for x in &p.xps {
            let abs = format!("/sys/class/net/{}/queues/tx-{}/xps_cpus", p.nic, x.queue);
            written.push(write_existing(
                host,
                &abs,
                &format!("{}\n", format_cpu_mask(&x.cpus)),
            )?);
        }
    }
    Ok(written)
}

fn write_existing(host: &Host, abs: &str, text: &str) -> Result<PathBuf, TuningError> {
    let path = host.path(abs);
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|source| TuningError::Write {
            path: path.clone(),
            source,
        })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_irq_names() {
        assert_eq!(
            match_queue_irq("eth0-TxRx-3", "eth0", None),
            Some((3, QueueKind::Both))
        );
        assert_eq!(
            match_queue_irq("eth0-rx-1", "eth0", None),
            Some((1, QueueKind::Rx))
        );
        assert_eq!(
            match_queue_irq("eth0-tx-12", "eth0", None),
            Some((12, QueueKind::Tx))
        );
        assert_eq!(
            match_queue_irq("eth0-7", "eth0", None),
            Some((7, QueueKind::Both))
        );
        assert_eq!(
            match_queue_irq("virtio2-input.0", "eth0", Some("virtio2")),
            Some((0, QueueKind::Rx))
        );
        assert_eq!(
            match_queue_irq("virtio2-output.0", "eth0", Some("virtio2")),
            Some((0, QueueKind::Tx))
        );
        assert_eq!(match_queue_irq("eth0", "eth0", None), None);
        assert_eq!(
            match_queue_irq("virtio2-config", "eth0", Some("virtio2")),
            None
        );
        assert_eq!(match_queue_irq("eth10-TxRx-0", "eth1", None), None);
    }
}
