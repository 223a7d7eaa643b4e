//! The gateway's configuration: one TOML file whose every key is also a command-line flag.
//! Parsing rejects unknown keys and bad values with an error that names the key and the fix.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::limits;

/// The whole configuration, as read from TOML. Every field has a default, so an empty file (or
/// no file) is a valid configuration for localhost.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The XMPP domain served (the part after `@`). Default `localhost`.
    pub domain: String,
    /// Where accounts, rosters and the generated certificate live. Default `./gateway-data`.
    pub data_dir: PathBuf,
    /// Shard (executor) count; `None` means one per CPU of the process's affinity mask.
    pub shards: Option<usize>,
    /// CPUs the shards are pinned to, in order; empty means the affinity mask.
    pub cpus: Vec<usize>,
    /// Pin each shard's thread to its CPU. Default true.
    pub pin_cpus: bool,
    /// Run shard threads with SCHED_FIFO real-time priority (needs CAP_SYS_NICE). Default false.
    pub realtime: bool,
    /// Client-to-server listener with STARTTLS (RFC 6120). Default `127.0.0.1:5222`.
    pub c2s_addr: SocketAddr,
    /// Direct-TLS listener (XEP-0368). Default `127.0.0.1:5223`.
    pub tls_addr: SocketAddr,
    /// Admin HTTP listener (`/health`, `/metrics`, `/stats`, `/alerts`, `POST /knobs`). Default
    /// `127.0.0.1:5280`.
    pub admin_addr: SocketAddr,
    /// PEM certificate chain; with `tls_key_path` unset too, a self-signed certificate for the
    /// domain is made in the data dir on first start.
    pub tls_cert_path: Option<PathBuf>,
    /// PEM private key for `tls_cert_path`.
    pub tls_key_path: Option<PathBuf>,
    /// A second PEM certificate chain, for a key of another type than `tls_cert_path`'s (e.g.
    /// Ed25519 beside ECDSA). Each handshake signs with the certificate cheapest to sign with
    /// (Ed25519, then ECDSA, then RSA) among those the client's signature schemes can verify.
    /// The generated self-signed default has both an ECDSA P-256 and an Ed25519 certificate.
    pub tls_alt_cert_path: Option<PathBuf>,
    /// PEM private key for `tls_alt_cert_path`.
    pub tls_alt_key_path: Option<PathBuf>,
    /// Allow SASL PLAIN and sessions without TLS on the c2s port. For loopback benchmarks only.
    pub allow_plaintext: bool,
    /// PBKDF2 iterations for newly stored SCRAM credentials; also the count SCRAM shows, and
    /// PLAIN spends, for a user that does not exist, so that failed logins look alike.
    pub scram_iterations: u32,
    /// Largest stanza accepted, in bytes.
    pub stanza_bytes_max: usize,
    /// Seconds an unauthenticated connection may take to authenticate and bind.
    pub unauthenticated_timeout_seconds: u64,
    /// Seconds a graceful shutdown may take.
    pub shutdown_timeout_seconds: u64,
    /// Connections accepted in total over all shards.
    pub max_connections: usize,
    /// `tracing` filter, e.g. `info` or `gateway=debug`.
    pub log_level: String,
    /// `human` (default) or `json` lines.
    pub log_format: String,
    /// Bytes of pinned io_uring memory per executor (glommio `io_memory`); networking does not
    /// use it, so it is kept small to fit the default 8 MiB memlock limit.
    pub io_memory_bytes: usize,
    /// Page cache of each shard's database, in bytes (redb's cache; a miss is a `pread`).
    pub store_cache_bytes: usize,
    /// Count stanzas, bytes and routing latency on the hot path. Default true; `false` only to
    /// measure what statistics cost (connections, queues and alerts are still reported).
    pub stats_enabled: bool,
    /// Token that `POST /knobs` must carry (`authorization: Bearer TOKEN`). Required when
    /// `admin_addr` is not a loopback address.
    pub admin_token: Option<String>,
    /// Alert when one cross-shard channel holds this many batches (0: off).
    pub alert_mesh_queue_batches: u64,
    /// Alert when a session's send queue holds this many stanzas (0: off).
    pub alert_send_queue_stanzas: u64,
    /// Alert when one shard's offline queues hold this many messages (0: off).
    pub alert_offline_messages: u64,
    /// Connections each shard accepts per second (0: unlimited).
    pub accepts_per_second_per_shard: u64,
    /// Connections each shard holds at once (0: `max_connections` spread over the shards).
    pub max_sessions_per_shard: u64,
    /// `durable` (default): a stanza is acknowledged to its sender only once it is written and
    /// fsynced (group commit) or delivered. `memory`: no fsync, for benchmarks only.
    pub durability: String,
    /// Messages one user's offline queue may hold; past it senders get `resource-constraint`.
    pub offline_messages_max: usize,
    /// Bytes one user's offline queue may hold.
    pub offline_bytes_max: usize,
    /// Days an offline message is kept before it is purged.
    pub offline_age_days_max: u64,
    /// XEP-0198: seconds a session that lost its connection may be resumed.
    pub sm_resume_timeout_seconds: u64,
    /// Seconds a connection's peer may take none of the bytes waiting for it before the
    /// connection is closed (a XEP-0198 session is detached, awaiting resumption).
    pub send_timeout_seconds: u64,
    /// Failed logins one client address (IPv6: its /64) may make per shard within
    /// `auth_failure_window_seconds` before its logins are refused; `0`: no limit.
    pub auth_failures_per_address_max: u32,
    /// The window of `auth_failures_per_address_max`, in seconds.
    pub auth_failure_window_seconds: u64,
    /// Push hook: `http://host:port/path` to POST `{"user":..,"count":..}` to when a message is
    /// stored for a user with no session. Unset: no hook.
    pub push_url: Option<String>,
    /// Push notifications queued per shard; past it new ones are dropped and counted.
    pub push_queue_max: usize,
    /// Huge pages for the allocator's memory, applied at start before the shards allocate:
    /// `off` (default: the process opts out of transparent huge pages), `thp` (mimalloc asks for
    /// transparent huge pages with `madvise`) or `reserved` (mimalloc maps its arenas from the
    /// host's reserved 2 MiB pages, falling back to small pages when there are none).
    pub huge_pages: String,
    /// How connections are driven: `uring` (default: one io_uring per shard, connections as
    /// slots with no task and no buffer while idle) or `tasks` (a glommio task per connection).
    pub io_engine: String,
    /// Provided receive buffers per shard of the `uring` engine (a power of two, 1 to 32768).
    pub uring_recv_buffers: u32,
    /// Bytes of each provided receive buffer of the `uring` engine (256 to 65536).
    pub uring_recv_buffer_bytes: usize,
    /// How reads fill the provided buffers of the `uring` engine: `incremental` (default: each
    /// read takes only the bytes it needs from a buffer, Linux 6.12; older kernels fall back to
    /// `whole` with a note in the log) or `whole` (each read takes a buffer of its own).
    pub uring_recv_buffer_fill: String,
}

/// The values `io_engine` takes.
pub const IO_ENGINES: [&str; 2] = ["uring", "tasks"];

/// The values `uring_recv_buffer_fill` takes.
pub const URING_RECV_BUFFER_FILLS: [&str; 2] = ["incremental", "whole"];

/// The values `huge_pages` takes.
pub const HUGE_PAGES_MODES: [&str; 3] = ["off", "thp", "reserved"];

impl Default for Config {
    fn default() -> Self {
        Config {
            domain: "localhost".to_owned(),
            data_dir: PathBuf::from("./gateway-data"),
            shards: None,
            cpus: Vec::new(),
            pin_cpus: true,
            realtime: false,
            c2s_addr: ([127, 0, 0, 1], 5222).into(),
            tls_addr: ([127, 0, 0, 1], 5223).into(),
            admin_addr: ([127, 0, 0, 1], 5280).into(),
            tls_cert_path: None,
            tls_key_path: None,
            tls_alt_cert_path: None,
            tls_alt_key_path: None,
            allow_plaintext: false,
            scram_iterations: limits::SCRAM_ITERATIONS_DEFAULT,
            stanza_bytes_max: limits::STANZA_BYTES_MAX,
            unauthenticated_timeout_seconds: limits::UNAUTHENTICATED_TIMEOUT_SECONDS_DEFAULT,
            shutdown_timeout_seconds: limits::SHUTDOWN_TIMEOUT_SECONDS_DEFAULT,
            max_connections: limits::MAX_CONNECTIONS_DEFAULT,
            log_level: "info".to_owned(),
            log_format: "human".to_owned(),
            io_memory_bytes: 128 * 1024,
            store_cache_bytes: limits::STORE_CACHE_BYTES_DEFAULT,
            stats_enabled: true,
            admin_token: None,
            alert_mesh_queue_batches: limits::ALERT_MESH_QUEUE_BATCHES_DEFAULT,
            alert_send_queue_stanzas: limits::ALERT_SEND_QUEUE_STANZAS_DEFAULT,
            alert_offline_messages: limits::ALERT_OFFLINE_MESSAGES_DEFAULT,
            accepts_per_second_per_shard: 0,
            max_sessions_per_shard: 0,
            durability: "durable".to_owned(),
            offline_messages_max: limits::OFFLINE_MESSAGES_MAX_DEFAULT,
            offline_bytes_max: limits::OFFLINE_BYTES_MAX_DEFAULT,
            offline_age_days_max: limits::OFFLINE_AGE_DAYS_MAX_DEFAULT,
            sm_resume_timeout_seconds: limits::SM_RESUME_TIMEOUT_SECONDS_DEFAULT,
            send_timeout_seconds: limits::SEND_TIMEOUT_SECONDS_DEFAULT,
            auth_failures_per_address_max: limits::AUTH_FAILURES_PER_ADDRESS_DEFAULT,
            auth_failure_window_seconds: limits::AUTH_FAILURE_WINDOW_SECONDS_DEFAULT,
            push_url: None,
            push_queue_max: limits::PUSH_QUEUE_NOTIFICATIONS_MAX_DEFAULT,
            huge_pages: "off".to_owned(),
            io_engine: "uring".to_owned(),
            uring_recv_buffers: limits::URING_RECV_BUFFERS_DEFAULT,
            uring_recv_buffer_bytes: limits::URING_RECV_BUFFER_BYTES_DEFAULT,
            uring_recv_buffer_fill: "incremental".to_owned(),
        }
    }
}

/// A configuration that could not be used. The message names the key and what to do.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("config: {0}")]
    Syntax(String),
    #[error("config key `{key}`: {problem}; {fix}")]
    Invalid {
        key: &'static str,
        problem: String,
        fix: &'static str,
    },
}

impl Config {
    /// Parses TOML text and validates it.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            // toml's message names the unknown or mistyped key and its line; keep it on one line.
            ConfigError::Syntax(
                e.to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values against each other and against the hard limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.domain.is_empty() || jid::BareJid::new(&self.domain).is_err() {
            return Err(ConfigError::Invalid {
                key: "domain",
                problem: format!("{:?} is not a valid XMPP domain", self.domain),
                fix: "use a host name such as `localhost` or `chat.example.com`",
            });
        }
        if self.shards == Some(0) {
            return Err(ConfigError::Invalid {
                key: "shards",
                problem: "0 shards".to_owned(),
                fix: "use at least 1, or leave it unset for one shard per CPU",
            });
        }
        if self.tls_cert_path.is_some() != self.tls_key_path.is_some() {
            return Err(ConfigError::Invalid {
                key: "tls_cert_path",
                problem: "only one of tls_cert_path and tls_key_path is set".to_owned(),
                fix: "set both, or neither to use a generated self-signed certificate",
            });
        }
        if self.tls_alt_cert_path.is_some() != self.tls_alt_key_path.is_some() {
            return Err(ConfigError::Invalid {
                key: "tls_alt_cert_path",
                problem: "only one of tls_alt_cert_path and tls_alt_key_path is set".to_owned(),
                fix: "set both, or neither",
            });
        }
        if self.tls_alt_cert_path.is_some() && self.tls_cert_path.is_none() {
            return Err(ConfigError::Invalid {
                key: "tls_alt_cert_path",
                problem: "a second certificate without tls_cert_path".to_owned(),
                fix: "set tls_cert_path and tls_key_path too, or neither alt key to use the \
                      generated self-signed certificates",
            });
        }
        if self.stanza_bytes_max < limits::STREAM_HEADER_BYTES_MAX
            || self.stanza_bytes_max > 16 * limits::STANZA_BYTES_MAX
        {
            return Err(ConfigError::Invalid {
                key: "stanza_bytes_max",
                problem: format!("{} is out of range", self.stanza_bytes_max),
                fix: "use a value from 4096 to 1048576 (default 65536)",
            });
        }
        if !(limits::STORE_CACHE_BYTES_MIN..=limits::STORE_CACHE_BYTES_MAX)
            .contains(&self.store_cache_bytes)
        {
            return Err(ConfigError::Invalid {
                key: "store_cache_bytes",
                problem: format!("{} bytes is out of range", self.store_cache_bytes),
                fix: "use a value from 1048576 (1 MiB) to 1073741824 (1 GiB) per shard \
                      (default 67108864)",
            });
        }
        if self.scram_iterations == 0 {
            return Err(ConfigError::Invalid {
                key: "scram_iterations",
                problem: "0 iterations".to_owned(),
                fix: "use at least 1 (4096 is the RFC 7677 recommendation)",
            });
        }
        if self.c2s_addr == self.tls_addr || self.c2s_addr == self.admin_addr {
            return Err(ConfigError::Invalid {
                key: "c2s_addr",
                problem: "two listeners share one address".to_owned(),
                fix: "give c2s_addr, tls_addr and admin_addr distinct ports",
            });
        }
        if self.log_format != "human" && self.log_format != "json" {
            return Err(ConfigError::Invalid {
                key: "log_format",
                problem: format!("{:?} is not a log format", self.log_format),
                fix: "use `human` or `json`",
            });
        }
        if !self.admin_addr.ip().is_loopback()
            && self.admin_token.as_deref().unwrap_or("").is_empty()
        {
            return Err(ConfigError::Invalid {
                key: "admin_token",
                problem: format!(
                    "admin_addr {} is not a loopback address and no admin_token is set",
                    self.admin_addr
                ),
                fix: "set admin_token in the config file, or bind admin_addr to 127.0.0.1",
            });
        }
        if self.durability != "durable" && self.durability != "memory" {
            return Err(ConfigError::Invalid {
                key: "durability",
                problem: format!("{:?} is not a durability mode", self.durability),
                fix: "use `durable` (the default) or `memory` (benchmarks only: no fsync)",
            });
        }
        if !HUGE_PAGES_MODES.contains(&self.huge_pages.as_str()) {
            return Err(ConfigError::Invalid {
                key: "huge_pages",
                problem: format!("{:?} is not a huge page mode", self.huge_pages),
                fix: "use `off` (the default), `thp` (transparent huge pages) or `reserved` \
                      (the host's reserved huge pages)",
            });
        }
        if !IO_ENGINES.contains(&self.io_engine.as_str()) {
            return Err(ConfigError::Invalid {
                key: "io_engine",
                problem: format!("{:?} is not an I/O engine", self.io_engine),
                fix: "use `uring` (the default) or `tasks` (a task per connection)",
            });
        }
        if !URING_RECV_BUFFER_FILLS.contains(&self.uring_recv_buffer_fill.as_str()) {
            return Err(ConfigError::Invalid {
                key: "uring_recv_buffer_fill",
                problem: format!(
                    "{:?} is not a way to fill receive buffers",
                    self.uring_recv_buffer_fill
                ),
                fix: "use `incremental` (the default) or `whole` (a buffer per read)",
            });
        }
        if !self.uring_recv_buffers.is_power_of_two()
            || self.uring_recv_buffers > limits::URING_RECV_BUFFERS_MAX
        {
            return Err(ConfigError::Invalid {
                key: "uring_recv_buffers",
                problem: format!(
                    "{} is not a power of two up to {}",
                    self.uring_recv_buffers,
                    limits::URING_RECV_BUFFERS_MAX
                ),
                fix: "use a power of two such as 256 (the default) or 1024",
            });
        }
        let buffer_bytes =
            limits::URING_RECV_BUFFER_BYTES_MIN..=limits::URING_RECV_BUFFER_BYTES_MAX;
        if !buffer_bytes.contains(&self.uring_recv_buffer_bytes) {
            return Err(ConfigError::Invalid {
                key: "uring_recv_buffer_bytes",
                problem: format!(
                    "{} is outside {}..={}",
                    self.uring_recv_buffer_bytes,
                    buffer_bytes.start(),
                    buffer_bytes.end()
                ),
                fix: "use a value in that range (default 4096)",
            });
        }
        if self.offline_messages_max == 0 || self.offline_bytes_max < self.stanza_bytes_max {
            return Err(ConfigError::Invalid {
                key: "offline_messages_max",
                problem: format!(
                    "offline_messages_max {} / offline_bytes_max {} cannot hold one stanza",
                    self.offline_messages_max, self.offline_bytes_max
                ),
                fix: "use at least 1 message and at least stanza_bytes_max bytes",
            });
        }
        if self.offline_age_days_max == 0 || self.offline_age_days_max > 3650 {
            return Err(ConfigError::Invalid {
                key: "offline_age_days_max",
                problem: format!("{} days is out of range", self.offline_age_days_max),
                fix: "use 1 to 3650 days (default 30)",
            });
        }
        if self.sm_resume_timeout_seconds > 86_400 {
            return Err(ConfigError::Invalid {
                key: "sm_resume_timeout_seconds",
                problem: format!("{} seconds is over a day", self.sm_resume_timeout_seconds),
                fix: "use 0 (no resumption) to 86400 seconds (default 300)",
            });
        }
        if !(1..=limits::SEND_TIMEOUT_SECONDS_MAX).contains(&self.send_timeout_seconds) {
            return Err(ConfigError::Invalid {
                key: "send_timeout_seconds",
                problem: format!("{} seconds is out of range", self.send_timeout_seconds),
                fix: "use 1 to 3600 seconds (default 60)",
            });
        }
        if !(1..=limits::AUTH_FAILURE_WINDOW_SECONDS_MAX)
            .contains(&self.auth_failure_window_seconds)
        {
            return Err(ConfigError::Invalid {
                key: "auth_failure_window_seconds",
                problem: format!(
                    "{} seconds is out of range",
                    self.auth_failure_window_seconds
                ),
                fix: "use 1 to 86400 seconds (default 60); to turn the limit off set \
                      auth_failures_per_address_max = 0",
            });
        }
        if let Some(url) = &self.push_url {
            if parse_http_url(url).is_none() {
                return Err(ConfigError::Invalid {
                    key: "push_url",
                    problem: format!("{url:?} is not an http://host:port/path URL"),
                    fix: "use e.g. `http://127.0.0.1:8080/push` (plain HTTP to a local relay)",
                });
            }
        }
        if self.push_queue_max == 0 {
            return Err(ConfigError::Invalid {
                key: "push_queue_max",
                problem: "0 notifications".to_owned(),
                fix: "use at least 1 (default 4096)",
            });
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid {
                key: "max_connections",
                problem: "0 connections".to_owned(),
                fix: "use at least 1",
            });
        }
        Ok(())
    }
}

/// Splits `http://host:port/path` into (`host:port`, `/path`); the port defaults to 80.
pub fn parse_http_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') || path.contains(char::is_whitespace) {
        return None;
    }
    let authority = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else if authority.contains(':') && !authority.ends_with(']') {
        return None;
    } else {
        format!("{authority}:80")
    };
    Some((authority, path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("domian = 'x'").unwrap_err().to_string();
        assert!(err.contains("domian"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn bad_address_is_named() {
        let err = Config::from_toml("c2s_addr = 'nowhere'")
            .unwrap_err()
            .to_string();
        assert!(err.contains("c2s_addr"), "{err}");
    }

    #[test]
    fn uring_buffer_limits_are_checked() {
        for bad in [
            "uring_recv_buffers = 300",
            "uring_recv_buffers = 65536",
            "uring_recv_buffer_bytes = 100",
            "uring_recv_buffer_bytes = 1048576",
            "uring_recv_buffer_fill = 'partial'",
        ] {
            let err = Config::from_toml(bad).unwrap_err().to_string();
            let key = bad.split(' ').next().unwrap();
            assert!(err.contains(key), "{bad}: {err}");
        }
        Config::from_toml("uring_recv_buffers = 32768\nuring_recv_buffer_bytes = 65536").unwrap();
        Config::from_toml("uring_recv_buffers = 4\nuring_recv_buffer_bytes = 256").unwrap();
        for fill in URING_RECV_BUFFER_FILLS {
            let c = Config::from_toml(&format!("uring_recv_buffer_fill = '{fill}'")).unwrap();
            assert_eq!(c.uring_recv_buffer_fill, fill);
        }
    }

    #[test]
    fn store_cache_is_bounded() {
        for bad in ["store_cache_bytes = 0", "store_cache_bytes = 2147483648"] {
            let err = Config::from_toml(bad).unwrap_err().to_string();
            assert!(err.contains("store_cache_bytes"), "{bad}: {err}");
        }
        let c = Config::from_toml("store_cache_bytes = 1048576").unwrap();
        assert_eq!(c.store_cache_bytes, 1 << 20);
        assert_eq!(
            Config::default().store_cache_bytes,
            limits::STORE_CACHE_BYTES_DEFAULT
        );
    }

    #[test]
    fn auth_failure_window_is_bounded() {
        for bad in [
            "auth_failure_window_seconds = 0",
            "auth_failure_window_seconds = 86401",
        ] {
            let err = Config::from_toml(bad).unwrap_err().to_string();
            assert!(err.contains("auth_failure_window_seconds"), "{bad}: {err}");
        }
        let c =
            Config::from_toml("auth_failures_per_address_max = 0\nauth_failure_window_seconds = 5")
                .unwrap();
        assert_eq!(
            (
                c.auth_failures_per_address_max,
                c.auth_failure_window_seconds
            ),
            (0, 5)
        );
    }

    #[test]
    fn admin_off_loopback_needs_a_token() {
        let err = Config::from_toml("admin_addr = '0.0.0.0:5280'")
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin_token"), "{err}");
        Config::from_toml("admin_addr = '0.0.0.0:5280'\nadmin_token = 'secret'").unwrap();
    }

    #[test]
    fn durability_and_offline_keys_are_checked() {
        let c = Config::from_toml("durability = 'memory'\noffline_messages_max = 5").unwrap();
        assert_eq!(
            (c.durability.as_str(), c.offline_messages_max),
            ("memory", 5)
        );
        for bad in [
            "durability = 'fast'",
            "huge_pages = 'on'",
            "offline_messages_max = 0",
            "offline_age_days_max = 0",
            "sm_resume_timeout_seconds = 100000",
            "send_timeout_seconds = 0",
            "send_timeout_seconds = 3601",
        ] {
            let err = Config::from_toml(bad).unwrap_err().to_string();
            let key = bad.split(' ').next().unwrap();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn huge_page_modes_are_accepted() {
        for mode in HUGE_PAGES_MODES {
            let c = Config::from_toml(&format!("huge_pages = '{mode}'")).unwrap();
            assert_eq!(c.huge_pages, mode);
        }
        assert_eq!(Config::default().huge_pages, "off");
    }

    #[test]
    fn push_urls() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:8080/push"),
            Some(("127.0.0.1:8080".into(), "/push".into()))
        );
        assert_eq!(
            parse_http_url("http://relay"),
            Some(("relay:80".into(), "/".into()))
        );
        assert_eq!(parse_http_url("https://x/"), None);
        assert_eq!(parse_http_url("http://a:b:c/"), None);
        let err = Config::from_toml("push_url = 'ftp://x'")
            .unwrap_err()
            .to_string();
        assert!(err.contains("push_url"), "{err}");
    }

    #[test]
    fn half_a_certificate_is_refused() {
        let err = Config::from_toml("tls_cert_path = '/x.pem'")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls_cert_path"), "{err}");
    }

    #[test]
    fn a_second_certificate_needs_its_key_and_a_first() {
        let err = Config::from_toml("tls_alt_cert_path = '/x.pem'")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls_alt_cert_path"), "{err}");
        let err = Config::from_toml("tls_alt_cert_path = '/x.pem'\ntls_alt_key_path = '/k.pem'")
            .unwrap_err()
            .to_string();
        assert!(err.contains("without tls_cert_path"), "{err}");
        let both = "tls_cert_path = '/a.pem'\ntls_key_path = '/ak.pem'\n\
                    tls_alt_cert_path = '/b.pem'\ntls_alt_key_path = '/bk.pem'";
        let config = Config::from_toml(both).unwrap();
        assert_eq!(
            config.tls_alt_key_path.as_deref(),
            Some(std::path::Path::new("/bk.pem"))
        );
    }
}
