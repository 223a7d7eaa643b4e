//! Starting and stopping the gateway: one pinned glommio executor per shard, each with its own
//! `SO_REUSEPORT` listeners, the mesh between them, and signal handling for a graceful stop.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use glommio::{LocalExecutorBuilder, Placement};
use router::{Frame, Router, Store};
use shared::config::Config;
use shared::limits::{
    ADMIN_CHANNEL_REQUESTS_MAX, HANDOFF_CHANNEL_CONNECTIONS_MAX, MESH_CHANNEL_BATCHES_MAX,
};

use crate::c2s::C2sConfig;
use crate::conn::{self, Handoff, Listener};
use crate::knobs::Knobs;
use crate::shard::{AdminRequest, MeshPorts, Shard};
use crate::uring::{Driver, UringSizes};
use crate::{admin, tls};

/// Which CPUs the shards run on: the configured list, else the process's affinity mask.
pub fn shard_cpus(config: &Config) -> Vec<usize> {
    if !config.cpus.is_empty() {
        return config.cpus.clone();
    }
    let mut cpus: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    if cpus.is_empty() {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        cpus = (0..n).collect();
    }
    cpus
}

/// The shard count in force: configured, else one per CPU.
pub fn shard_count(config: &Config) -> usize {
    config
        .shards
        .unwrap_or_else(|| shard_cpus(config).len())
        .max(1)
}

/// SCHED_FIFO priority of the shard threads with `--realtime`: above every normal task (so cron
/// jobs never preempt a shard, as the seed's operators found) but below the kernel's own threads
/// (IRQ threads run at 50).
const REALTIME_PRIORITY: i32 = 10;

enum Control {
    Stop,
}

/// Runs the gateway until SIGINT or SIGTERM, then stops within the shutdown timeout.
pub fn serve(config: Config) -> Result<()> {
    // Handlers first: the admin port answers `ready` as soon as shard 0 runs, so a SIGTERM can
    // come before the last shard has started; it must stop us cleanly, not kill us.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("installing signal handlers")?;
    match crate::sys::apply_huge_pages(&config.huge_pages) {
        crate::sys::HugePages::Unavailable { reason } => tracing::warn!(
            huge_pages = %config.huge_pages,
            "huge pages not applied, using small pages: {reason}"
        ),
        applied => tracing::info!(huge_pages = %config.huge_pages, ?applied, "allocator pages"),
    }
    let shards = shard_count(&config);
    let cpus = shard_cpus(&config);
    if config.allow_plaintext {
        tracing::warn!(
            "allow_plaintext is ON: passwords may cross the network in clear text on {}; \
             use this only for loopback benchmarks",
            config.c2s_addr
        );
    }
    if config.durability == "memory" {
        tracing::warn!(
            "durability = memory: messages are acknowledged without fsync and a host crash may \
             lose them; use this only for benchmarks"
        );
    }
    // The host doctor's checks for this target, each problem logged once with its fix. Only what
    // stops the process from running at all is fatal (STYLE §1): glommio's memlock floor and a
    // disabled io_uring.
    let host =
        tuning::check_host(&tuning::Target::new(config.max_connections as u64).with_shards(shards));
    for (name, current, needed, fix) in host.warnings() {
        tracing::warn!(
            check = name,
            current,
            needed,
            fix,
            "host is not ready for max_connections"
        );
    }
    if let Some(c) = host.refuses_to_start().first() {
        bail!(
            "{} is {} (needs {}): {}",
            c.name,
            c.current,
            c.needed,
            c.fix
        );
    }
    // The push hook's address is resolved once, here, never on a shard's reactor.
    let push_target = match &config.push_url {
        Some(url) => {
            let (authority, path) = shared::config::parse_http_url(url)
                .context("push_url is not an http://host:port/path URL")?;
            let addr = std::net::ToSocketAddrs::to_socket_addrs(&authority)
                .with_context(|| format!("resolving the push_url host {authority}"))?
                .next()
                .with_context(|| format!("the push_url host {authority} has no address"))?;
            Some((addr, authority, path))
        }
        None => None,
    };
    let stores = Store::open_all_with_cache(
        &config.data_dir,
        shards,
        &config.domain,
        config.store_cache_bytes,
    )
    .with_context(|| format!("opening the store under {}", config.data_dir.display()))?;
    let stores = Arc::new(stores);
    let tls = tls::server_config(&config)?;
    let c2s_starttls = Arc::new(C2sConfig {
        domain: config.domain.clone(),
        starttls_offered: true,
        allow_plaintext: config.allow_plaintext,
        scram_iterations: config.scram_iterations,
        stanza_bytes_max: config.stanza_bytes_max,
        unauthenticated_timeout: Duration::from_secs(config.unauthenticated_timeout_seconds),
        sm_resume_timeout: Duration::from_secs(config.sm_resume_timeout_seconds),
        random: crate::c2s::fill_random,
    });
    let c2s_direct_tls = Arc::new(C2sConfig {
        starttls_offered: false,
        ..(*c2s_starttls).clone()
    });

    // The mesh: one bounded channel per ordered pair of shards, and one handoff channel per shard.
    let mut mesh_to: Vec<Vec<Option<flume::Sender<Vec<Frame>>>>> =
        (0..shards).map(|_| vec![None; shards]).collect();
    let mut mesh_from: Vec<Vec<flume::Receiver<Vec<Frame>>>> =
        (0..shards).map(|_| Vec::new()).collect();
    for (from, row) in mesh_to.iter_mut().enumerate() {
        for (to, slot) in row.iter_mut().enumerate() {
            if from != to {
                let (tx, rx) = flume::bounded(MESH_CHANNEL_BATCHES_MAX);
                *slot = Some(tx);
                mesh_from[to].push(rx);
            }
        }
    }
    let (handoff_tx, handoff_rx): (Vec<_>, Vec<_>) = (0..shards)
        .map(|_| flume::bounded::<Handoff>(HANDOFF_CHANNEL_CONNECTIONS_MAX))
        .unzip();

    // The admin port's line to every shard: snapshots and knob changes, one bounded channel each.
    let (admin_tx, admin_rx): (Vec<_>, Vec<_>) = (0..shards)
        .map(|_| flume::bounded::<AdminRequest>(ADMIN_CHANNEL_REQUESTS_MAX))
        .unzip();
    let mut admin_rx = admin_rx.into_iter();

    let topology = tuning::cpu_topology();
    // Set once every shard runs; the admin port says `starting` until then. Read only by the
    // admin port (cold path), so one shared atomic is fine here.
    let all_ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<usize, String>>();
    let mut controls = Vec::new();
    let mut joins = Vec::new();
    let mut mesh_from = mesh_from.into_iter();
    let mut handoff_rx = handoff_rx.into_iter();
    for (id, mesh_to) in mesh_to.into_iter().enumerate() {
        let ports = MeshPorts {
            to: mesh_to,
            from: mesh_from.next().expect("one receiver set per shard"),
            handoff_to: handoff_tx.clone(),
            handoff_from: handoff_rx.next().expect("one handoff receiver per shard"),
        };
        let (control_tx, control_rx) = flume::bounded::<Control>(1);
        controls.push(control_tx);
        let placement = if config.pin_cpus {
            let cpu = cpus[id % cpus.len()];
            // Memory placement is NUMA-local by construction: the shard's thread is pinned, the
            // kernel's default first-touch policy puts the pages it touches on its node, and
            // mimalloc's per-thread heaps keep each shard's allocations on its own pages.
            tracing::info!(shard = id, cpu, numa_node = ?topology.numa_node_of(cpu), "shard placement");
            Placement::Fixed(cpu)
        } else {
            Placement::Unbound
        };
        let ctx = ShardStart {
            id,
            shards,
            config: config.clone(),
            stores: stores.clone(),
            tls: tls.clone(),
            c2s_starttls: c2s_starttls.clone(),
            c2s_direct_tls: c2s_direct_tls.clone(),
            ports,
            control: control_rx,
            ready: ready_tx.clone(),
            admin_rx: admin_rx.next().expect("one admin receiver per shard"),
            admin_tx: if id == 0 {
                admin_tx.clone()
            } else {
                Vec::new()
            },
            all_ready: all_ready.clone(),
            push_target: push_target.clone(),
        };
        let join = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{id}"))
            .io_memory(config.io_memory_bytes)
            .spawn(move || run_shard(ctx))
            .map_err(|e| {
                anyhow::anyhow!("starting shard {id}: {e}; try --no-pin or other --cpus")
            })?;
        joins.push(join);
    }
    drop(handoff_tx);
    drop(admin_tx);
    drop(ready_tx);

    let stop_all = |controls: &[flume::Sender<Control>]| {
        for c in controls {
            let _ = c.try_send(Control::Stop);
        }
    };
    for _ in 0..shards {
        match ready_rx.recv() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                stop_all(&controls);
                for j in joins {
                    let _ = j.join();
                }
                bail!("{e}");
            }
            Err(_) => bail!("a shard stopped while starting"),
        }
    }
    all_ready.store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(
        shards,
        c2s = %config.c2s_addr,
        tls = %config.tls_addr,
        admin = %config.admin_addr,
        domain = %config.domain,
        "gateway ready"
    );

    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "stopping: closing streams");
    }
    stop_all(&controls);
    let deadline = Instant::now()
        + Duration::from_secs(config.shutdown_timeout_seconds)
        + Duration::from_secs(2);
    for j in joins {
        if Instant::now() > deadline {
            tracing::warn!("shutdown deadline passed; exiting");
            break;
        }
        if let Err(e) = j.join() {
            tracing::error!(error = ?e, "a shard failed");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

struct ShardStart {
    id: usize,
    shards: usize,
    config: Config,
    stores: Arc<Vec<Store>>,
    tls: Arc<rustls::ServerConfig>,
    c2s_starttls: Arc<C2sConfig>,
    c2s_direct_tls: Arc<C2sConfig>,
    ports: MeshPorts,
    control: flume::Receiver<Control>,
    ready: std::sync::mpsc::Sender<Result<usize, String>>,
    all_ready: Arc<std::sync::atomic::AtomicBool>,
    admin_rx: flume::Receiver<AdminRequest>,
    /// Senders to every shard's admin loop (shard 0 only, which serves the admin port).
    admin_tx: Vec<flume::Sender<AdminRequest>>,
    push_target: Option<(std::net::SocketAddr, String, String)>,
}

async fn run_shard(start: ShardStart) {
    let id = start.id;
    if start.config.realtime {
        if let Err(e) = crate::sys::set_realtime_fifo(REALTIME_PRIORITY) {
            let _ = start.ready.send(Err(format!(
                "realtime: cannot give shard {id} SCHED_FIFO priority {REALTIME_PRIORITY}: {e}; \
                 run as root, grant CAP_SYS_NICE (AmbientCapabilities=CAP_SYS_NICE in the unit) \
                 or raise LimitRTPRIO, or drop --realtime"
            )));
            return;
        }
    }
    let bind = |addr: std::net::SocketAddr, what: &str| {
        crate::sys::bind_listener_std(addr).map_err(|e| {
            format!("cannot listen on {addr} ({what}): {e}; pick a free address with --{what}")
        })
    };
    let listeners = (|| {
        let c2s = bind(start.config.c2s_addr, "c2s-addr")?;
        let tls = bind(start.config.tls_addr, "tls-addr")?;
        let admin = if id == 0 {
            Some(bind(start.config.admin_addr, "admin-addr")?)
        } else {
            None
        };
        Ok::<_, String>((c2s, tls, admin))
    })();
    let (c2s, tls_listener, admin_listener) = match listeners {
        Ok(l) => l,
        Err(e) => {
            let _ = start.ready.send(Err(e));
            return;
        }
    };
    let knobs = Knobs::from_config(&start.config, start.shards);
    let storage_latency = Rc::new(std::cell::RefCell::new(Default::default()));
    let roster_store =
        crate::storage::ShardStore::new(start.stores.clone(), id, storage_latency.clone());
    let mut router = Router::new(
        id,
        start.shards,
        start.config.domain.clone(),
        Box::new(roster_store),
    );
    let durability = match start.config.durability.as_str() {
        "memory" => router::store::Durability::Memory,
        _ => router::store::Durability::Durable,
    };
    let offline = crate::storage::ShardOffline::new(
        start.stores.clone(),
        id,
        durability,
        storage_latency.clone(),
    );
    let commit_stats = offline.stats.clone();
    let committer = offline.committer();
    router.set_offline(
        Box::new(offline),
        router::OfflineLimits {
            messages_max: start.config.offline_messages_max,
            bytes_max: start.config.offline_bytes_max,
            age_max: Duration::from_secs(start.config.offline_age_days_max * 86_400),
        },
    );
    let shard = Rc::new(Shard::new(
        id,
        start.shards,
        start.config.domain.clone(),
        router,
        start.stores.clone(),
        start.c2s_starttls,
        start.c2s_direct_tls,
        start.tls,
        start.ports.to,
        start.ports.handoff_to,
        knobs,
        start.config.stats_enabled,
    ));
    shard.stats.borrow_mut().storage_latency = storage_latency;
    shard.tid.set(crate::stats::procfs::current_tid());
    shard
        .sm_resume_timeout
        .set(Duration::from_secs(start.config.sm_resume_timeout_seconds));
    shard
        .send_timeout
        .set(Duration::from_secs(start.config.send_timeout_seconds));
    *shard.auth_limit.borrow_mut() = shared::address_limit::AddressLimit::new(
        start.config.auth_failures_per_address_max,
        Duration::from_secs(start.config.auth_failure_window_seconds),
    );
    *shard.committer.borrow_mut() = Some(committer);
    let mut tasks = Vec::new();
    if let Some((addr, authority, path)) = start.push_target.clone() {
        let pusher = Rc::new(crate::push::Pusher::new(
            addr,
            authority,
            path,
            start.config.domain.clone(),
            start.config.push_queue_max,
        ));
        *shard.push.borrow_mut() = Some(pusher.clone());
        tasks.push(glommio::spawn_local(pusher.run()).detach());
    }
    let listeners = vec![
        (c2s, Listener::StartTls),
        (tls_listener, Listener::DirectTls),
    ];
    let handoff_from = start.ports.handoff_from;
    let listeners = match start.config.io_engine.as_str() {
        "uring" => {
            // The listeners stay ours until the driver takes them: on a failure they go to the
            // task engine instead.
            let fds: Vec<_> = listeners
                .iter()
                .map(|(l, kind)| (l.try_clone(), *kind))
                .collect();
            let fds: Result<Vec<_>, _> = fds
                .into_iter()
                .map(|(l, kind)| l.map(|l| (l, kind)))
                .collect();
            let sizes = UringSizes {
                recv_buffers: start.config.uring_recv_buffers,
                recv_buffer_bytes: start.config.uring_recv_buffer_bytes,
                recv_incremental: start.config.uring_recv_buffer_fill == "incremental",
            };
            let reserved = shard.knobs.borrow().max_sessions_per_shard as usize;
            match fds.and_then(|fds| Driver::new(shard.clone(), fds, sizes, reserved)) {
                Ok(driver) => {
                    tasks.push(glommio::spawn_local(driver.run(handoff_from.clone())).detach());
                    None
                }
                Err(e) => {
                    tracing::warn!(
                        shard = id,
                        error = %e,
                        "io_engine = uring is not available on this kernel (multishot recv with \
                         provided buffer rings needs Linux 6.0 or later); using io_engine = tasks"
                    );
                    Some(listeners)
                }
            }
        }
        _ => Some(listeners),
    };
    if let Some(listeners) = listeners {
        for (l, kind) in listeners {
            let l = crate::sys::glommio_listener(l);
            tasks.push(glommio::spawn_local(conn::accept_loop(shard.clone(), l, kind)).detach());
        }
        glommio::spawn_local(conn::adopt_loop(shard.clone(), handoff_from)).detach();
    }
    if let Some(l) = admin_listener {
        let l = crate::sys::glommio_listener(l);
        tasks.push(
            glommio::spawn_local(admin::serve(
                l,
                shard.clone(),
                start.all_ready.clone(),
                start.admin_tx,
                start.config.admin_token.clone(),
                start.config.stats_enabled,
                start.config.durability.clone(),
            ))
            .detach(),
        );
    }
    for rx in start.ports.from {
        glommio::spawn_local(shard.clone().pump_mesh(rx)).detach();
    }
    tasks.push(glommio::spawn_local(shard.clone().stats_loop()).detach());
    glommio::spawn_local(shard.clone().admin_loop(start.admin_rx)).detach();
    tasks.push(glommio::spawn_local(conn::return_memory_loop(shard.clone())).detach());
    let _ = start.ready.send(Ok(id));
    tracing::debug!(shard = id, "shard running");

    let _ = start.control.recv_async().await;
    // Stop: refuse new work, close every stream with `system-shutdown`, drain until the deadline.
    shard.stopping.set();
    let deadline = Instant::now() + Duration::from_secs(start.config.shutdown_timeout_seconds);
    let outboxes: Vec<_> = shard.conns.borrow().values().cloned().collect();
    for outbox in outboxes {
        outbox.close("system-shutdown");
    }
    // Bounded by the deadline.
    while shard.open_connections.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    let left = shard.open_connections.get();
    if left > 0 {
        tracing::warn!(
            shard = id,
            left,
            "shutdown deadline reached with connections open"
        );
    }
    for t in tasks {
        t.cancel();
    }
    let stats = shard.snapshot();
    tracing::debug!(
        shard = id,
        accepted = stats.accepted,
        stanzas_in = stats.stanzas_in.total(),
        stanzas_out = stats.stanzas_out.total(),
        handoffs_in = stats.handoffs_in,
        handoffs_out = stats.handoffs_out,
        "shard stopped"
    );
    // Whatever the last turn stored is committed before the shard ends (after any commit in
    // flight, bounded by the deadline).
    while shard.router.borrow().commit_in_flight() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    if shard.router.borrow().needs_commit() && !shard.router.borrow().commit_in_flight() {
        shard.router.borrow_mut().commit();
    }
    tracing::info!(
        shard = id,
        durability = %start.config.durability,
        offline = ?shard.router.borrow().offline_stats(),
        storage = %commit_stats.borrow().summary(),
        "storage"
    );
    let push = shard.push.borrow().clone();
    if let Some(push) = push {
        tracing::info!(shard = id, stats = ?push.stats.get(), "push hook");
    }
}
