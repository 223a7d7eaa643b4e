//! Run-time knobs: settings an operator changes without a restart (`POST /knobs`, `gateway knob`).
//! Each shard holds its own copy, replaced by a message from the admin port, so the hot path
//! reads plain fields of its own shard.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shared::config::Config;

/// The knobs in force. Field names are the knob names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Knobs {
    /// `tracing` filter, e.g. `info` or `gateway=debug`.
    pub log_level: String,
    /// Connections each shard accepts per second (0: unlimited).
    pub accepts_per_second_per_shard: u64,
    /// Connections each shard holds at once; past it, accepts pause.
    pub max_sessions_per_shard: u64,
    /// Bound on one user's offline queue, in messages (read by the offline queues).
    pub offline_queue_messages_max: u64,
    /// Bound on one user's offline queue, in bytes (read by the offline queues).
    pub offline_queue_bytes_max: u64,
    /// Alert threshold on one cross-shard channel, in batches (0: off).
    pub alert_mesh_queue_batches: u64,
    /// Alert threshold on a session send queue, in stanzas (0: off).
    pub alert_send_queue_stanzas: u64,
    /// Alert threshold on one shard's offline messages (0: off).
    pub alert_offline_messages: u64,
    /// Drill: shards stop taking batches off the mesh, so backpressure and the mesh alert can be
    /// exercised on a live system. Turn it off again to drain.
    pub mesh_receive_paused: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs::from_config(&Config::default(), 1)
    }
}

/// A knob change that was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KnobError {
    #[error("no knob named {0:?}; knobs: {KNOB_NAMES}")]
    Unknown(String),
    #[error("knob {name}: {value:?} is not {expected}")]
    BadValue {
        name: String,
        value: String,
        expected: &'static str,
    },
}

/// Every knob name, for error messages and help.
pub const KNOB_NAMES: &str = "log_level, accepts_per_second_per_shard, max_sessions_per_shard, \
     offline_queue_messages_max, offline_queue_bytes_max, alert_mesh_queue_batches, \
     alert_send_queue_stanzas, alert_offline_messages, mesh_receive_paused";

impl Knobs {
    pub fn from_config(config: &Config, shards: usize) -> Knobs {
        let per_shard = config.max_connections.div_ceil(shards.max(1)) as u64;
        Knobs {
            log_level: config.log_level.clone(),
            accepts_per_second_per_shard: config.accepts_per_second_per_shard,
            max_sessions_per_shard: match config.max_sessions_per_shard {
                0 => per_shard,
                n => n,
            },
            offline_queue_messages_max: config.offline_messages_max as u64,
            offline_queue_bytes_max: config.offline_bytes_max as u64,
            alert_mesh_queue_batches: config.alert_mesh_queue_batches,
            alert_send_queue_stanzas: config.alert_send_queue_stanzas,
            alert_offline_messages: config.alert_offline_messages,
            mesh_receive_paused: false,
        }
    }

    /// Sets one knob from its text value; returns the old value as text.
    pub fn set(&mut self, name: &str, value: &str) -> Result<String, KnobError> {
        let value = value.trim();
        let bad = |expected| KnobError::BadValue {
            name: name.to_owned(),
            value: value.to_owned(),
            expected,
        };
        let number = |expected| value.parse::<u64>().map_err(|_| bad(expected));
        let old = self.get(name)?;
        match name {
            "log_level" => {
                tracing_subscriber::EnvFilter::try_new(value)
                    .map_err(|_| bad("a tracing filter such as `info` or `gateway=debug`"))?;
                self.log_level = value.to_owned();
            }
            "accepts_per_second_per_shard" => {
                self.accepts_per_second_per_shard = number("a count (0: unlimited)")?
            }
            "max_sessions_per_shard" => {
                let n = number("a count of at least 1")?;
                if n == 0 {
                    return Err(bad("a count of at least 1"));
                }
                self.max_sessions_per_shard = n;
            }
            "offline_queue_messages_max" => {
                self.offline_queue_messages_max = number("a count of messages")?
            }
            "offline_queue_bytes_max" => self.offline_queue_bytes_max = number("a count of bytes")?,
            "alert_mesh_queue_batches" => {
                self.alert_mesh_queue_batches = number("a count of batches (0: off)")?
            }
            "alert_send_queue_stanzas" => {
                self.alert_send_queue_stanzas = number("a count of stanzas (0: off)")?
            }
            "alert_offline_messages" => {
                self.alert_offline_messages = number("a count of messages (0: off)")?
            }
            "mesh_receive_paused" => {
                self.mesh_receive_paused = value.parse().map_err(|_| bad("true or false"))?
            }
            _ => return Err(KnobError::Unknown(name.to_owned())),
        }
        Ok(old)
    }

    /// One knob's value as text.
    pub fn get(&self, name: &str) -> Result<String, KnobError> {
        Ok(match name {
            "log_level" => self.log_level.clone(),
            "accepts_per_second_per_shard" => self.accepts_per_second_per_shard.to_string(),
            "max_sessions_per_shard" => self.max_sessions_per_shard.to_string(),
            "offline_queue_messages_max" => self.offline_queue_messages_max.to_string(),
            "offline_queue_bytes_max" => self.offline_queue_bytes_max.to_string(),
            "alert_mesh_queue_batches" => self.alert_mesh_queue_batches.to_string(),
            "alert_send_queue_stanzas" => self.alert_send_queue_stanzas.to_string(),
            "alert_offline_messages" => self.alert_offline_messages.to_string(),
            "mesh_receive_paused" => self.mesh_receive_paused.to_string(),
            _ => return Err(KnobError::Unknown(name.to_owned())),
        })
    }
}

/// A token bucket of one second's worth at `rate` per second: refills for `elapsed`, then takes
/// one token. Returns the tokens left and, when none was there, how long until one is.
pub fn take_token(tokens: f64, elapsed: Duration, rate: u64) -> (f64, Option<Duration>) {
    let rate = rate.max(1) as f64;
    let tokens = (tokens + elapsed.as_secs_f64() * rate).min(rate);
    if tokens >= 1.0 {
        (tokens - 1.0, None)
    } else {
        (tokens, Some(Duration::from_secs_f64((1.0 - tokens) / rate)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_paces_to_the_rate() {
        // Full after a long pause: one second's worth back to back, then a wait of 1/rate.
        let (mut tokens, mut wait) = (0.0, None);
        let mut taken = 0;
        let mut elapsed = Duration::from_secs(60);
        while wait.is_none() {
            (tokens, wait) = take_token(tokens, elapsed, 10);
            elapsed = Duration::ZERO;
            taken += wait.is_none() as u32;
        }
        assert_eq!(taken, 10);
        let w = wait.unwrap();
        assert!((w.as_secs_f64() - 0.1).abs() < 1e-9, "{w:?}");
        // After that wait, exactly one more.
        let (t, wait) = take_token(tokens, w, 10);
        assert!(wait.is_none() && t < 1.0);
    }

    #[test]
    fn every_named_knob_reads_and_writes() {
        let mut k = Knobs::default();
        for name in KNOB_NAMES.split(", ") {
            let old = k.get(name).unwrap();
            assert_eq!(k.set(name, &old).unwrap(), old, "{name}");
        }
    }

    #[test]
    fn bad_values_are_refused_with_the_knob_named() {
        let mut k = Knobs::default();
        let err = k
            .set("max_sessions_per_shard", "many")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_sessions_per_shard"), "{err}");
        assert!(k.set("max_sessions_per_shard", "0").is_err());
        assert!(matches!(k.set("nope", "1"), Err(KnobError::Unknown(_))));
        assert_eq!(k.set("accepts_per_second_per_shard", "7").unwrap(), "0");
        assert_eq!(k.accepts_per_second_per_shard, 7);
    }
}
