//! The `gateway` command: `serve` (the default) and `user` account management.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use router::credentials::Credentials;
use router::Store;
use shared::config::Config;
use shared::shard::home_shard;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A thread-per-core XMPP chat gateway.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Flags every subcommand takes; each is also a key of the TOML config file.
#[derive(Args, Debug, Default)]
struct GlobalArgs {
    /// TOML config file; flags override its keys.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Where accounts, rosters and the generated certificate live [default: ./gateway-data].
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// The XMPP domain served [default: localhost].
    #[arg(long, global = true)]
    domain: Option<String>,
    /// Shard count [default: one per CPU of the affinity mask].
    #[arg(long, global = true)]
    shards: Option<usize>,
    /// PBKDF2 iterations for new SCRAM credentials [default: 4096].
    #[arg(long, global = true)]
    scram_iterations: Option<u32>,
    /// Log filter, e.g. `info` or `gateway=debug` [default: info].
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Log format: `human` or `json` [default: human].
    #[arg(long, global = true, value_parser = ["human", "json"])]
    log_format: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server (the default).
    Serve(Box<ServeArgs>),
    /// Manage accounts (the server must be stopped).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Live view of a running gateway: one row per shard, refreshed every interval.
    Top {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        sampling: Sampling,
    },
    /// Record statistics samples to a file, or print a recording.
    Sar {
        #[command(subcommand)]
        command: SarCommand,
    },
    /// Change a run-time knob of a running gateway, e.g. `gateway knob log_level debug`.
    Knob {
        #[command(flatten)]
        admin: AdminArgs,
        /// One of: log_level, accepts_per_second_per_shard, max_sessions_per_shard,
        /// offline_queue_messages_max, offline_queue_bytes_max, alert_mesh_queue_batches,
        /// alert_send_queue_stanzas, alert_offline_messages, mesh_receive_paused.
        name: String,
        value: String,
        /// Token for the admin port [default: the config's admin_token].
        #[arg(long, env = "GATEWAY_ADMIN_TOKEN")]
        token: Option<String>,
    },
}

/// Where a running gateway's admin port is.
#[derive(Args, Debug, Default)]
struct AdminArgs {
    /// The admin port [default: the config's admin_addr, 127.0.0.1:5280].
    #[arg(long)]
    admin_addr: Option<SocketAddr>,
}

/// How often `top` and `sar record` read `/stats`, and how many times.
#[derive(Args, Debug)]
struct Sampling {
    /// Time between samples (frames of `top`), e.g. `1s`, `500ms` or `1m`.
    #[arg(long, default_value = "1s", value_parser = gateway::admin_client::parse_duration)]
    interval: Duration,
    /// Samples to take, then exit [default: until interrupted].
    #[arg(long)]
    count: Option<u64>,
}

impl AdminArgs {
    fn addr(&self, config: &Config) -> SocketAddr {
        self.admin_addr.unwrap_or(config.admin_addr)
    }
}

#[derive(Subcommand, Debug)]
enum SarCommand {
    /// Append samples of `/stats` to a file (JSON lines).
    Record {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        sampling: Sampling,
        /// The recording to append to.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Print a recording as a table.
    Show { file: PathBuf },
}

#[derive(Args, Debug, Default)]
struct ServeArgs {
    /// c2s listener with STARTTLS [default: 127.0.0.1:5222].
    #[arg(long)]
    c2s_addr: Option<SocketAddr>,
    /// Direct-TLS listener (XEP-0368) [default: 127.0.0.1:5223].
    #[arg(long)]
    tls_addr: Option<SocketAddr>,
    /// Admin HTTP listener (GET /health) [default: 127.0.0.1:5280].
    #[arg(long)]
    admin_addr: Option<SocketAddr>,
    /// Allow PLAIN and sessions without TLS: for loopback benchmarks only.
    #[arg(long)]
    allow_plaintext: bool,
    /// Do not pin shard threads to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Run shard threads at SCHED_FIFO real-time priority (needs CAP_SYS_NICE).
    #[arg(long)]
    realtime: bool,
    /// CPUs to pin shards to, e.g. `0,2,4`.
    #[arg(long, value_delimiter = ',')]
    cpus: Option<Vec<usize>>,
    /// PEM certificate chain (with --tls-key-path).
    #[arg(long)]
    tls_cert_path: Option<PathBuf>,
    /// PEM private key (with --tls-cert-path).
    #[arg(long)]
    tls_key_path: Option<PathBuf>,
    /// A second PEM certificate chain of another key type, e.g. Ed25519 (with --tls-alt-key-path).
    #[arg(long)]
    tls_alt_cert_path: Option<PathBuf>,
    /// PEM private key for --tls-alt-cert-path.
    #[arg(long)]
    tls_alt_key_path: Option<PathBuf>,
    /// Largest stanza accepted, in bytes [default: 65536].
    #[arg(long)]
    stanza_bytes_max: Option<usize>,
    /// Seconds to authenticate and bind [default: 30].
    #[arg(long)]
    unauthenticated_timeout_seconds: Option<u64>,
    /// Seconds a graceful stop may take [default: 5].
    #[arg(long)]
    shutdown_timeout_seconds: Option<u64>,
    /// Connections accepted in total [default: 1000000].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Pinned io_uring memory per shard, bytes [default: 131072].
    #[arg(long)]
    io_memory_bytes: Option<usize>,
    /// `durable` (fsync before acking, the default) or `memory` (no fsync; benchmarks only).
    #[arg(long)]
    durability: Option<String>,
    /// Allocator huge pages: `off` [default], `thp` (transparent, madvise) or `reserved`.
    #[arg(long)]
    huge_pages: Option<String>,
    /// Connection I/O: `uring` [default] (one io_uring per shard) or `tasks` (a task each).
    #[arg(long)]
    io_engine: Option<String>,
    /// Provided receive buffers per shard of the uring engine, a power of two [default: 256].
    #[arg(long)]
    uring_recv_buffers: Option<u32>,
    /// Bytes of each provided receive buffer of the uring engine [default: 4096].
    #[arg(long)]
    uring_recv_buffer_bytes: Option<usize>,
    /// How reads fill the uring engine's receive buffers: `incremental` [default] or `whole`.
    #[arg(long)]
    uring_recv_buffer_fill: Option<String>,
    /// Messages per user's offline queue [default: 10000].
    #[arg(long)]
    offline_messages_max: Option<usize>,
    /// Bytes per user's offline queue [default: 16777216].
    #[arg(long)]
    offline_bytes_max: Option<usize>,
    /// Days an offline message is kept [default: 30].
    #[arg(long)]
    offline_age_days_max: Option<u64>,
    /// Seconds a XEP-0198 session may be resumed after its connection is lost [default: 300].
    #[arg(long)]
    sm_resume_timeout_seconds: Option<u64>,
    /// Seconds a peer may take none of the bytes waiting for it before its connection is
    /// closed [default: 60].
    #[arg(long)]
    send_timeout_seconds: Option<u64>,
    /// Failed logins per client address (IPv6: per /64) and shard within the window before
    /// that address's logins are refused; 0: no limit [default: 30].
    #[arg(long)]
    auth_failures_per_address_max: Option<u32>,
    /// The window of --auth-failures-per-address-max, in seconds [default: 60].
    #[arg(long)]
    auth_failure_window_seconds: Option<u64>,
    /// Push hook URL (`http://host:port/path`) POSTed `{"user","count"}` for offline users.
    #[arg(long)]
    push_url: Option<String>,
    /// Push notifications queued per shard [default: 4096].
    #[arg(long)]
    push_queue_max: Option<usize>,
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Add an account; the password is read from stdin unless --password is given.
    Add {
        name: String,
        #[arg(long)]
        password: Option<String>,
    },
    /// Delete an account and its roster.
    Del { name: String },
    /// Make a new device key for each account named and print it, one a line in the order
    /// given (once: only its hash is stored). Use it as the password of SASL PLAIN over TLS; it
    /// skips PBKDF2, so logins are cheap.
    AddDeviceKey {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// List accounts, one per line.
    List,
    /// Add PREFIX1..PREFIXN with one password (for load tests).
    BulkAdd {
        #[arg(long, default_value = "user")]
        prefix: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        password: String,
        /// Threads deriving credentials [default: available parallelism].
        #[arg(long)]
        threads: Option<usize>,
    },
}

fn main() {
    let cli = Cli::parse();
    let config = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    gateway::logging::init(&config.log_level, &config.log_format);
    let result = match cli.command {
        None | Some(Command::Serve(_)) => gateway::server::serve(config),
        Some(Command::User { command }) => user_command(&config, command),
        Some(Command::Top { admin, sampling }) => {
            gateway::top::run(admin.addr(&config), sampling.interval, sampling.count)
        }
        Some(Command::Sar { command }) => match command {
            SarCommand::Record {
                admin,
                sampling,
                output,
            } => gateway::sar::record(
                admin.addr(&config),
                sampling.interval,
                sampling.count,
                &output,
            ),
            SarCommand::Show { file } => gateway::sar::show(&file),
        },
        Some(Command::Knob {
            admin,
            name,
            value,
            token,
        }) => knob_command(&config, &admin, &name, &value, token),
    };
    if let Err(e) = result {
        // One line: what happened and, from the context, what to do.
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

fn load_config(cli: &Cli) -> Result<Config> {
    let mut config = match &cli.global.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            Config::from_toml(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => Config::default(),
    };
    let g = &cli.global;
    if let Some(v) = &g.data_dir {
        config.data_dir = v.clone();
    }
    if let Some(v) = &g.domain {
        config.domain = v.to_lowercase();
    }
    if let Some(v) = g.shards {
        config.shards = Some(v);
    }
    if let Some(v) = g.scram_iterations {
        config.scram_iterations = v;
    }
    if let Some(v) = &g.log_level {
        config.log_level = v.clone();
    }
    if let Some(v) = &g.log_format {
        config.log_format = v.clone();
    }
    if let Some(Command::Serve(s)) = &cli.command {
        apply_serve_args(&mut config, s);
    }
    config.validate()?;
    Ok(config)
}

fn apply_serve_args(config: &mut Config, s: &ServeArgs) {
    if let Some(v) = s.c2s_addr {
        config.c2s_addr = v;
    }
    if let Some(v) = s.tls_addr {
        config.tls_addr = v;
    }
    if let Some(v) = s.admin_addr {
        config.admin_addr = v;
    }
    if s.allow_plaintext {
        config.allow_plaintext = true;
    }
    if s.no_pin {
        config.pin_cpus = false;
    }
    if s.realtime {
        config.realtime = true;
    }
    if let Some(v) = &s.cpus {
        config.cpus = v.clone();
    }
    if let Some(v) = &s.tls_cert_path {
        config.tls_cert_path = Some(v.clone());
    }
    if let Some(v) = &s.tls_key_path {
        config.tls_key_path = Some(v.clone());
    }
    if let Some(v) = &s.tls_alt_cert_path {
        config.tls_alt_cert_path = Some(v.clone());
    }
    if let Some(v) = &s.tls_alt_key_path {
        config.tls_alt_key_path = Some(v.clone());
    }
    if let Some(v) = s.stanza_bytes_max {
        config.stanza_bytes_max = v;
    }
    if let Some(v) = s.unauthenticated_timeout_seconds {
        config.unauthenticated_timeout_seconds = v;
    }
    if let Some(v) = s.shutdown_timeout_seconds {
        config.shutdown_timeout_seconds = v;
    }
    if let Some(v) = s.max_connections {
        config.max_connections = v;
    }
    if let Some(v) = s.io_memory_bytes {
        config.io_memory_bytes = v;
    }
    if let Some(v) = &s.durability {
        config.durability = v.clone();
    }
    if let Some(v) = &s.huge_pages {
        config.huge_pages = v.clone();
    }
    if let Some(v) = &s.io_engine {
        config.io_engine = v.clone();
    }
    if let Some(v) = s.uring_recv_buffers {
        config.uring_recv_buffers = v;
    }
    if let Some(v) = s.uring_recv_buffer_bytes {
        config.uring_recv_buffer_bytes = v;
    }
    if let Some(v) = &s.uring_recv_buffer_fill {
        config.uring_recv_buffer_fill = v.clone();
    }
    if let Some(v) = s.offline_messages_max {
        config.offline_messages_max = v;
    }
    if let Some(v) = s.offline_bytes_max {
        config.offline_bytes_max = v;
    }
    if let Some(v) = s.offline_age_days_max {
        config.offline_age_days_max = v;
    }
    if let Some(v) = s.auth_failures_per_address_max {
        config.auth_failures_per_address_max = v;
    }
    if let Some(v) = s.auth_failure_window_seconds {
        config.auth_failure_window_seconds = v;
    }
    if let Some(v) = s.sm_resume_timeout_seconds {
        config.sm_resume_timeout_seconds = v;
    }
    if let Some(v) = s.send_timeout_seconds {
        config.send_timeout_seconds = v;
    }
    if let Some(v) = &s.push_url {
        config.push_url = Some(v.clone());
    }
    if let Some(v) = s.push_queue_max {
        config.push_queue_max = v;
    }
}

/// `gateway knob NAME VALUE`: one `POST /knobs`.
fn knob_command(
    config: &Config,
    admin: &AdminArgs,
    name: &str,
    value: &str,
    token: Option<String>,
) -> Result<()> {
    let addr = admin.addr(config);
    let token = token.or_else(|| config.admin_token.clone());
    let body = serde_json::to_string(&gateway::admin::KnobRequest {
        name: name.to_owned(),
        value: value.to_owned(),
    })?;
    let (code, answer) =
        gateway::admin_client::request(addr, "POST", "/knobs", token.as_deref(), &body)?;
    if code != 200 {
        bail!(
            "the gateway at {addr} refused the change ({code}): {}",
            answer.trim()
        );
    }
    let change: gateway::stats::KnobChange =
        serde_json::from_str(&answer).with_context(|| format!("{addr} answered {answer:?}"))?;
    println!("{}: {} -> {}", change.name, change.old, change.new);
    Ok(())
}

/// Opens the stores for account commands, with the shard count already on disk if any, so an
/// account command never re-partitions.
fn open_stores(config: &Config) -> Result<Vec<Store>> {
    let shards = match Store::shards_on_disk(&config.data_dir)? {
        Some(n) => n,
        None => gateway::server::shard_count(config),
    };
    Ok(Store::open_all(&config.data_dir, shards, &config.domain)?)
}

fn node_of(config: &Config, name: &str) -> Result<String> {
    let bare = jid::BareJid::new(&format!("{name}@{}", config.domain)).map_err(|e| {
        anyhow::anyhow!(
            "{name:?} is not a valid user name ({e}); use letters, digits, `.`, `-` or `_`"
        )
    })?;
    match bare.node() {
        Some(n) => Ok(n.to_string()),
        None => bail!("{name:?} is not a valid user name"),
    }
}

fn user_command(config: &Config, command: UserCommand) -> Result<()> {
    let stores = open_stores(config)?;
    let shards = stores.len();
    let home = |node: &str| home_shard(&format!("{node}@{}", config.domain), shards);
    match command {
        UserCommand::Add { name, password } => {
            let node = node_of(config, &name)?;
            let password = match password {
                Some(p) => p,
                None => {
                    let mut line = String::new();
                    std::io::stdin()
                        .lock()
                        .read_line(&mut line)
                        .context("reading the password from stdin")?;
                    line.trim_end_matches(['\r', '\n']).to_owned()
                }
            };
            if password.is_empty() {
                bail!("empty password; give --password or a line on stdin");
            }
            let creds = Credentials::derive(&password, config.scram_iterations);
            stores[home(&node)].add_user(&node, &creds)?;
            println!("added {node}@{}", config.domain);
        }
        UserCommand::Del { name } => {
            let node = node_of(config, &name)?;
            stores[home(&node)].delete_user(&node)?;
            println!("deleted {node}@{}", config.domain);
        }
        UserCommand::AddDeviceKey { names } => {
            for name in names {
                let node = node_of(config, &name)?;
                let key = router::credentials::new_device_key();
                let count = stores[home(&node)]
                    .add_device_key(&node, router::credentials::device_key_hash(&key))?;
                eprintln!(
                    "added a device key to {node}@{} ({count} now); it is shown only this once:",
                    config.domain
                );
                println!("{key}");
            }
        }
        UserCommand::List => {
            let mut all = Vec::new();
            for s in &stores {
                all.extend(s.users()?);
            }
            all.sort();
            for u in all {
                println!("{u}");
            }
        }
        UserCommand::BulkAdd {
            prefix,
            count,
            password,
            threads,
        } => {
            let threads = threads
                .unwrap_or_else(|| {
                    std::thread::available_parallelism()
                        .map(|n| n.get())
                        .unwrap_or(1)
                })
                .max(1);
            let started = Instant::now();
            // Chunks bound memory and give one write transaction per chunk per shard.
            const BULK_CHUNK_USERS: usize = 10_000;
            let mut done = 0usize;
            while done < count {
                let end = (done + BULK_CHUNK_USERS).min(count);
                let names: Vec<String> = (done + 1..=end)
                    .map(|i| node_of(config, &format!("{prefix}{i}")))
                    .collect::<Result<_>>()?;
                let made = router::credentials::derive_many(
                    &names,
                    &password,
                    config.scram_iterations,
                    threads,
                );
                let mut per_shard: Vec<Vec<(String, Credentials)>> =
                    (0..shards).map(|_| Vec::new()).collect();
                for (node, c) in made {
                    per_shard[home(&node)].push((node, c));
                }
                for (i, users) in per_shard.iter().enumerate() {
                    if !users.is_empty() {
                        stores[i].add_users(users)?;
                    }
                }
                done = end;
            }
            let secs = started.elapsed().as_secs_f64();
            println!(
                "added {count} users ({prefix}1..{prefix}{count}) in {secs:.2} s: {:.0} users/s \
                 ({} SCRAM iterations, {threads} threads)",
                count as f64 / secs.max(1e-9),
                config.scram_iterations
            );
        }
    }
    Ok(())
}
