//! `bench`: the load generator. Scenarios `idle`, `login`, `chat`, `reconnect`, `offline` drive any XMPP
//! server on this machine as a black box and write a JSON report; `plot` charts reports.

use std::path::PathBuf;

use bench::scenarios::{self, Kind, Opts};
use clap::{Parser, Subcommand};

/// Load generator for XMPP servers (ours, ejabberd, Prosody) on loopback.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Open N sessions at the ramp, hold them, report memory per session.
    Idle(Opts),
    /// N users log in at once: time to 99%/100% and per-login latency.
    Login(Opts),
    /// U users online, messages at a rate (or a --sweep of rates): latency, loss.
    Chat(Opts),
    /// Establish N sessions, drop them all at once, reconnect: time to 99%/100% back.
    Reconnect(Opts),
}

impl Scenario {
    fn split(self) -> (Kind, Opts) {
        match self {
            Scenario::Idle(o) => (Kind::Idle, o),
            Scenario::Login(o) => (Kind::Login, o),
            Scenario::Chat(o) => (Kind::Chat, o),
            Scenario::Reconnect(o) => (Kind::Reconnect, o),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Scenario(Scenario),
    /// Store and forward: one sender fills --users offline users' queues with --messages
    /// messages (XEP-0198 acks), then each logs in and drains: stored/s, ack latency, drain/s.
    Offline(bench::scenarios::Opts),
    /// Chart JSON reports into an SVG.
    Plot {
        /// Reports written with --json.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The SVG to write.
        #[arg(short = 'o', long = "output", default_value = "chart.svg")]
        output: PathBuf,
    },
    /// A worker process (started by the parent with --procs).
    #[command(name = "__worker", hide = true)]
    Worker {
        #[command(subcommand)]
        scenario: Scenario,
    },
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Scenario(s) => {
            let (kind, opts) = s.split();
            let args: Vec<String> = std::env::args().skip(1).collect();
            scenarios::run(kind, opts, args)
        }
        Command::Worker { scenario } => {
            let (kind, opts) = scenario.split();
            scenarios::worker_main(kind, opts, bench::workers::Link::Stdio).map(|()| 0)
        }
        Command::Offline(opts) => scenarios::offline::run(opts),
        Command::Plot { files, output } => plot(&files, &output),
    };
    match code {
        Ok(c) => std::process::exit(c),
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn plot(files: &[PathBuf], output: &std::path::Path) -> anyhow::Result<i32> {
    let reports = files
        .iter()
        .map(|f| bench::report::Report::read_json(f))
        .collect::<anyhow::Result<Vec<_>>>()?;
    bench::plot::plot(&reports, output)?;
    eprintln!("wrote {}", output.display());
    Ok(0)
}
