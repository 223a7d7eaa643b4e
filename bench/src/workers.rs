//! Worker processes and their coordination with the parent.
//!
//! With `--procs N` the parent re-executes itself N times as `bench __worker SCENARIO ...` (the
//! same flags plus `--worker-index k --worker-count N --start-at-unix-ms T`). Worker `k` owns the
//! sessions `i` with `i % N == k`. Phases are synchronised with barriers over the pipes: a worker
//! writes one JSON line `{"Barrier":{"name":..,"data":..}}` to stdout and blocks until the parent,
//! having heard every worker reach that barrier (and sampled the server there), answers `go` (or
//! `stop`) on its stdin. At the end each worker writes ONE line `{"Result":{..}}` with its partial
//! counts, failure reasons, base64 histograms, own RSS and CPU; the parent merges them.
//! With N = 1 the single worker runs as a thread of the parent over channels: same code path.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

/// One chat step as a worker saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepResult {
    pub rate: f64,
    pub scheduled: u64,
    pub sent: u64,
    pub delivered: u64,
    pub duplicated: u64,
    pub lost: u64,
    pub unsendable: u64,
    pub latency_b64: String,
    pub seconds: f64,
    /// XEP-0198 (`--sm`): messages the server acked to their senders, and the ack latency.
    #[serde(default)]
    pub acked: u64,
    #[serde(default)]
    pub ack_latency_b64: String,
}

/// What a worker reports at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub worker_index: u64,
    pub sessions: u64,
    /// Established in the measured connect phase (the reconnect phase for `reconnect`).
    pub established: u64,
    pub failed: u64,
    /// Established in the first phase (only differs for `reconnect`).
    pub initial_established: u64,
    pub initial_failed: u64,
    pub failed_by_reason: BTreeMap<String, u64>,
    pub hints: Vec<String>,
    /// Established sessions dropped by the server while held.
    pub dropped: u64,
    /// Per-login latency (connect start -> established) of the measured phase, base64.
    pub login_b64: String,
    pub time_to_99pct_seconds: Option<f64>,
    pub time_to_100pct_seconds: Option<f64>,
    /// Seconds from the phase start to the last session established.
    pub ramp_seconds: f64,
    pub steps: Vec<StepResult>,
    pub rss_before_bytes: u64,
    pub rss_peak_bytes: u64,
    pub rss_hold_bytes: u64,
    pub rss_after_bytes: u64,
    pub cpu_user_seconds: f64,
    pub cpu_system_seconds: f64,
    /// XEP-0509 pipelining and TLS resumption counts of the measured phase.
    #[serde(flatten)]
    pub login_counts: crate::report::LoginCounts,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum WorkerMsg {
    Barrier {
        name: String,
        data: serde_json::Value,
    },
    Result(Box<WorkerResult>),
}

/// The worker's end of the link to the parent.
pub enum Link {
    Stdio,
    Chan {
        tx: mpsc::Sender<(usize, Option<String>)>,
        rx: mpsc::Receiver<String>,
    },
}

impl Link {
    fn send_line(&mut self, line: String) -> Result<()> {
        match self {
            Link::Stdio => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")?;
                out.flush()?;
            }
            Link::Chan { tx, .. } => tx
                .send((0, Some(line)))
                .map_err(|_| anyhow!("parent gone"))?,
        }
        Ok(())
    }

    /// Reaches barrier `name` and waits for the parent's answer (`go` or `stop`).
    pub fn barrier(&mut self, name: &str, data: serde_json::Value) -> Result<String> {
        let line = serde_json::to_string(&WorkerMsg::Barrier {
            name: name.into(),
            data,
        })?;
        self.send_line(line)?;
        match self {
            Link::Stdio => {
                let mut reply = String::new();
                if std::io::stdin().lock().read_line(&mut reply)? == 0 {
                    bail!("parent closed the pipe at barrier {name}");
                }
                Ok(reply.trim().to_string())
            }
            Link::Chan { rx, .. } => rx
                .recv()
                .map_err(|_| anyhow!("parent gone at barrier {name}")),
        }
    }

    pub fn result(&mut self, result: WorkerResult) -> Result<()> {
        let line = serde_json::to_string(&WorkerMsg::Result(Box::new(result)))?;
        self.send_line(line)
    }
}

enum Reply {
    Pipe(ChildStdin),
    Chan(mpsc::Sender<String>),
}

/// The parent's end: the workers, their messages and the way to answer them.
pub struct Workers {
    rx: mpsc::Receiver<(usize, Option<String>)>,
    replies: Vec<Reply>,
    children: Vec<Child>,
    threads: Vec<std::thread::JoinHandle<()>>,
    results: Vec<Option<WorkerResult>>,
    pub deadline: Instant,
}

impl Workers {
    /// Starts `count` worker processes running `bench __worker SCENARIO ARGS... (worker flags)`.
    pub fn spawn(
        count: usize,
        scenario_args: &[String],
        start_at_unix_ms: u64,
        deadline: Instant,
    ) -> Result<Workers> {
        let exe = std::env::current_exe().context("locating the bench executable")?;
        let (tx, rx) = mpsc::channel();
        let mut replies = Vec::new();
        let mut children = Vec::new();
        let mut threads = Vec::new();
        for k in 0..count {
            let mut child = Command::new(&exe)
                .arg("__worker")
                .args(scenario_args)
                .args([
                    "--worker-index",
                    &k.to_string(),
                    "--worker-count",
                    &count.to_string(),
                ])
                .args(["--start-at-unix-ms", &start_at_unix_ms.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting worker {k} ({})", exe.display()))?;
            let stdout = child.stdout.take().expect("piped");
            replies.push(Reply::Pipe(child.stdin.take().expect("piped")));
            children.push(child);
            let tx = tx.clone();
            threads.push(std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    match line {
                        Ok(l) => {
                            if tx.send((k, Some(l))).is_err() {
                                return;
                            }
                        }
                        Err(_) => break,
                    }
                }
                let _ = tx.send((k, None));
            }));
        }
        Ok(Workers {
            rx,
            replies,
            children,
            threads,
            results: (0..count).map(|_| None).collect(),
            deadline,
        })
    }

    /// Runs the single worker as a thread of this process.
    pub fn in_process(
        run: impl FnOnce(Link) -> Result<()> + Send + 'static,
        deadline: Instant,
    ) -> Workers {
        let (tx, rx) = mpsc::channel();
        let (reply_tx, reply_rx) = mpsc::channel();
        let done_tx = tx.clone();
        let thread = std::thread::spawn(move || {
            if let Err(e) = run(Link::Chan { tx, rx: reply_rx }) {
                eprintln!("bench: worker: {e:#}");
            }
            let _ = done_tx.send((0, None));
        });
        Workers {
            rx,
            replies: vec![Reply::Chan(reply_tx)],
            children: Vec::new(),
            threads: vec![thread],
            results: vec![None],
            deadline,
        }
    }

    pub fn count(&self) -> usize {
        self.replies.len()
    }

    fn next(&mut self) -> Result<(usize, WorkerMsg)> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            let (k, line) = self
                .rx
                .recv_timeout(left)
                .map_err(|_| anyhow!("the run's deadline passed while waiting for the workers"))?;
            let Some(line) = line else {
                if self.results[k].is_none() {
                    bail!("worker {k} ended without a result (see its errors above)");
                }
                continue;
            };
            match serde_json::from_str::<WorkerMsg>(&line) {
                Ok(WorkerMsg::Result(r)) => {
                    self.results[k] = Some(*r);
                    continue;
                }
                Ok(msg) => return Ok((k, msg)),
                Err(_) => eprintln!("worker {k}: {line}"),
            }
        }
    }

    /// Waits until every worker reached barrier `name`; returns their data by worker index.
    pub fn barrier(&mut self, name: &str) -> Result<Vec<serde_json::Value>> {
        let mut data: Vec<Option<serde_json::Value>> = (0..self.count()).map(|_| None).collect();
        while data.iter().any(|d| d.is_none()) {
            let (k, msg) = self.next()?;
            match msg {
                WorkerMsg::Barrier { name: got, data: d } if got == name => data[k] = Some(d),
                WorkerMsg::Barrier { name: got, .. } => {
                    bail!("worker {k} reached barrier {got}, expected {name}")
                }
                WorkerMsg::Result(_) => unreachable!("handled in next"),
            }
        }
        Ok(data.into_iter().map(|d| d.unwrap_or_default()).collect())
    }

    /// Answers every worker waiting at a barrier.
    pub fn reply(&mut self, text: &str) -> Result<()> {
        for r in &mut self.replies {
            match r {
                Reply::Pipe(p) => {
                    writeln!(p, "{text}")?;
                    p.flush()?;
                }
                Reply::Chan(c) => c
                    .send(text.to_string())
                    .map_err(|_| anyhow!("worker gone"))?,
            }
        }
        Ok(())
    }

    /// Waits for every worker's final result.
    pub fn results(mut self) -> Result<Vec<WorkerResult>> {
        while self.results.iter().any(|r| r.is_none()) {
            let left = self.deadline.saturating_duration_since(Instant::now());
            let (k, line) = self
                .rx
                .recv_timeout(left)
                .map_err(|_| anyhow!("the run's deadline passed while waiting for results"))?;
            match line {
                None if self.results[k].is_none() => bail!("worker {k} ended without a result"),
                None => {}
                Some(line) => {
                    if let Ok(WorkerMsg::Result(r)) = serde_json::from_str::<WorkerMsg>(&line) {
                        self.results[k] = Some(*r);
                    }
                }
            }
        }
        for mut c in std::mem::take(&mut self.children) {
            let _ = c.wait();
        }
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        Ok(std::mem::take(&mut self.results)
            .into_iter()
            .map(|r| r.expect("checked"))
            .collect())
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Only reached with children still running on an error path: end them.
        for c in &mut self.children {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Samples a process's RSS every 250 ms in a thread, keeping the peak.
pub struct Sampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    join: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(pid: u32) -> Sampler {
        let peak = Arc::new(AtomicU64::new(crate::procfs::rss_bytes(pid).unwrap_or(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let join = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(rss) = crate::procfs::rss_bytes(pid) {
                    p.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        Sampler {
            peak,
            stop,
            join: Some(join),
        }
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
        self.peak()
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
