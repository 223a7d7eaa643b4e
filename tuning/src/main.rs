//! `tuning`: checks a host against a session target (`check`), writes the sysctl and limits
//! files it needs (`apply`, dry run unless `--write`), and places NIC IRQs next to the shards
//! (`irq`, dry run unless `--write`).
//!
//! Exit status of `check`: 0 ready, 1 warnings only, 2 something blocks the target; any command
//! that cannot run at all exits 3.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tuning::check::{GATEWAY_BYTES_PER_SESSION_DEFAULT, KERNEL_BYTES_PER_SESSION_DEFAULT};
use tuning::{apply, irq, parse, topology, Host, Role, Target};

/// Exit status when a command could not run (bad root, not root, write failed).
const EXIT_FAILED: u8 = 3;

#[derive(Parser)]
#[command(
    version,
    about = "Checks and tunes a host for millions of idle sessions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reads the host and prints one row per check; exit 0 ready, 1 warnings, 2 blocked.
    Check {
        /// Concurrent sessions the host must carry.
        #[arg(long)]
        connections: u64,
        /// Shards (default: one per CPU of the affinity mask, like the gateway).
        #[arg(long)]
        shards: Option<usize>,
        /// server (the gateway) or bench (load generator against a loopback gateway).
        #[arg(long, default_value = "server")]
        role: Role,
        /// Kernel memory per session (measured ~4.1 KiB per idle TCP socket).
        #[arg(long, default_value_t = KERNEL_BYTES_PER_SESSION_DEFAULT)]
        kernel_bytes_per_session: u64,
        /// Gateway memory per session (measured for direct TLS at 10k sessions).
        #[arg(long, default_value_t = GATEWAY_BYTES_PER_SESSION_DEFAULT)]
        gateway_bytes_per_session: u64,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// Read /proc and /sys under this directory.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Prints (or with --write, writes) the sysctl.d and limits.d files for the target.
    Apply {
        /// Concurrent sessions the host must carry.
        #[arg(long)]
        connections: u64,
        /// server or bench.
        #[arg(long, default_value = "server")]
        role: Role,
        /// The account limits.d applies to.
        #[arg(long, default_value = apply::USER_DEFAULT)]
        user: String,
        /// Read and write under this directory; sysctl -p runs only when it is "/".
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Write the files (default: dry run, print the diff).
        #[arg(long)]
        write: bool,
    },
    /// Proposes (or with --write, sets) IRQ, RPS and XPS affinity: NIC queue k on the CPU of
    /// shard k mod S, keeping NIC and shards on one NUMA node.
    Irq {
        /// Shards (default: one per CPU of the affinity mask).
        #[arg(long)]
        shards: Option<usize>,
        /// Read and write under this directory.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Write the affinities (default: dry run).
        #[arg(long)]
        write: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("tuning: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Check {
            connections,
            shards,
            role,
            kernel_bytes_per_session,
            gateway_bytes_per_session,
            json,
            root,
        } => {
            let target = Target {
                connections,
                shards,
                role,
                kernel_bytes_per_session,
                gateway_bytes_per_session,
            };
            let report = tuning::check::check(&Host::new(root), &target);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            Ok(u8::try_from(report.exit_code()).unwrap_or(EXIT_FAILED))
        }
        Command::Apply {
            connections,
            role,
            user,
            root,
            write,
        } => {
            let host = Host::new(root);
            let mut target = Target::new(connections);
            target.role = role;
            let plan = apply::plan(&host, &target, &user);
            if !write {
                print!("{}", plan.diff(&host));
                print_notes(&plan.notes);
                println!("dry run: nothing written; add --write to apply");
                return Ok(0);
            }
            let applied = apply::write(&host, &plan)?;
            for p in &applied.written {
                println!("wrote {}", p.display());
            }
            for p in &applied.unchanged {
                println!("up to date {}", p.display());
            }
            if applied.loaded {
                println!("loaded {}", host.path(apply::SYSCTL_FILE).display());
            } else {
                println!("not loaded: --root is not /");
            }
            print_notes(&plan.notes);
            Ok(0)
        }
        Command::Irq {
            shards,
            root,
            write,
        } => {
            let host = Host::new(root);
            let topo = tuning::Topology::read(&host);
            let shard_cpus = topo.shard_cpus(shards);
            let nics = irq::read_nics(&host);
            let plans = irq::plan(&topo, &nics, &shard_cpus);
            let pins = topology::shard_plan(&topo, shards);
            println!(
                "shards: {}",
                pins.iter()
                    .map(|p| format!("{}->cpu{}", p.shard, p.cpu))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            if plans.is_empty() {
                println!(
                    "no physical NIC under {}",
                    host.path("/sys/class/net").display()
                );
            }
            for p in &plans {
                print_irq_plan(p);
            }
            if write {
                apply::require_root(&host, "tuning irq --write")?;
                let written = irq::write_plan(&host, &plans)?;
                println!("wrote {} files", written.len());
                println!(
                    "irqbalance rewrites these: systemctl disable --now irqbalance (or ban the \
                     IRQs with IRQBALANCE_BANNED_CPULIST)"
                );
            } else {
                println!("dry run: nothing written; add --write to apply");
            }
            Ok(0)
        }
    }
}

fn print_notes(notes: &[String]) {
    if !notes.is_empty() {
        println!("needs a restart or a boot parameter:");
        for n in notes {
            println!("  - {n}");
        }
    }
}

fn print_irq_plan(p: &irq::NicPlan) {
    println!(
        "{} (numa node {}):",
        p.nic,
        p.numa_node
            .map_or_else(|| "-".to_string(), |n| n.to_string())
    );
    for m in &p.irqs {
        println!(
            "  irq {:>5} {:<24} queue {:>2}: cpus {:<10} -> {}",
            m.irq,
            m.name,
            m.queue,
            m.current
                .as_deref()
                .map_or_else(|| "?".to_string(), parse::format_cpu_list),
            m.cpu
        );
    }
    for r in &p.rps {
        println!(
            "  rx-{} rps_cpus -> {}",
            r.queue,
            parse::format_cpu_mask(&r.cpus)
        );
    }
    for x in &p.xps {
        println!(
            "  tx-{} xps_cpus -> {} ({})",
            x.queue,
            parse::format_cpu_mask(&x.cpus),
            if x.cpus.is_empty() {
                "no cpu".to_string()
            } else {
                format!("cpus {}", parse::format_cpu_list(&x.cpus))
            }
        );
    }
    for n in &p.notes {
        println!("  note: {n}");
    }
}
