//! A small blocking HTTP/1.1 client for the admin port, used by `gateway top`, `sar` and `knob`.
//! The admin port answers with `connection: close`, so a response is read to end of stream.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::stats::StatsSnapshot;

/// How long one admin request may take.
const ADMIN_REQUEST_TIMEOUT_SECONDS: u64 = 5;

/// Largest admin response read, in bytes.
const ADMIN_RESPONSE_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// Sends one request; returns the status code and the body.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Result<(u16, String)> {
    let timeout = Duration::from_secs(ADMIN_REQUEST_TIMEOUT_SECONDS);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).with_context(|| {
        format!(
            "cannot reach the admin port at {addr}; is the gateway running (check --admin-addr)?"
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}content-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    stream
        .take(ADMIN_RESPONSE_BYTES_MAX)
        .read_to_end(&mut response)
        .with_context(|| format!("reading the answer of {addr}{path}"))?;
    let text = String::from_utf8_lossy(&response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("{addr}{path} sent no HTTP answer");
    };
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{addr}{path} sent a malformed status line"))?;
    Ok((code, body.to_owned()))
}

/// `GET /stats`, parsed.
pub fn stats(addr: SocketAddr) -> Result<StatsSnapshot> {
    let (code, body) = request(addr, "GET", "/stats", None, "")?;
    if code != 200 {
        bail!("{addr}/stats answered {code}: {}", body.trim());
    }
    serde_json::from_str(&body)
        .with_context(|| format!("{addr}/stats sent JSON this gateway cannot read"))
}

/// Parses `1s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; use e.g. 1s, 500ms or 2m"))?;
    let seconds = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?}; use ms, s or m")),
    };
    if !(seconds > 0.0 && seconds.is_finite()) {
        return Err(format!("{text:?} must be more than zero"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("1h").is_err());
    }
}
