//! The admin HTTP port: `GET /health` answers `ready` (200), or `starting` / `draining` (503).
//! Metrics come with the statistics issue. Hand-written because it serves a few fixed answers on a
//! cold path; a full HTTP stack would cost more than it gives here.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use crate::shard::Shard;

/// Largest request head read; the rest is ignored.
const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;

/// Serves the admin port until the shard stops.
pub async fn serve(listener: TcpListener, shard: Rc<Shard>, all_ready: Arc<AtomicBool>) {
    // The accept loop is unbounded by design: it is the admin port's event loop.
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.stopping.wait().await;
            None
        })
        .await;
        let Some(accepted) = accepted else { return };
        match accepted {
            Ok(stream) => {
                let shard = shard.clone();
                let all_ready = all_ready.load(Ordering::Acquire);
                glommio::spawn_local(async move {
                    if let Err(e) = answer(stream, &shard, all_ready).await {
                        tracing::debug!(error = %e, "admin request failed");
                    }
                })
                .detach();
            }
            Err(e) => tracing::warn!(error = %e, "admin accept failed"),
        }
    }
}

async fn answer(mut stream: TcpStream, shard: &Shard, all_ready: bool) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REQUEST_HEAD_BYTES_MAX {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = match (method, path) {
        ("GET", "/health") if shard.stopping.is_open() => ("503 Service Unavailable", "draining\n"),
        ("GET", "/health") if !all_ready => ("503 Service Unavailable", "starting\n"),
        ("GET", "/health") => ("200 OK", "ready\n"),
        _ => ("404 Not Found", "not found\n"),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.close().await
}
