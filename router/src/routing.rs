//! The per-shard router: who is online here, where each stanza goes, presence and rosters.

use bytes::Bytes;
use shared::stanza::Stanza;

use crate::mesh::Frame;
use crate::store::Store;
use crate::ConnId;

/// What the shard's driver must do on the router's behalf.
#[derive(Debug)]
pub enum Action {
    /// Write these bytes (one serialised stanza) to a local connection's session.
    Deliver { conn: ConnId, bytes: Bytes },
    /// Close a local connection with this RFC 6120 stream error condition (e.g. `conflict`).
    CloseConn { conn: ConnId, condition: &'static str },
    /// Send a frame to another shard's router.
    Send { shard: usize, frame: Frame },
}

/// A successful bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    pub full_jid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error("too many sessions for this account")]
    TooManySessions,
    #[error("resource is not valid")]
    BadResource,
}

/// One shard's routing state.
pub struct Router {}

impl Router {
    pub fn new(shard: usize, shards: usize, domain: String, store: Store) -> Router {
        let _ = (shard, shards, domain, store);
        todo!()
    }
    pub fn store(&self) -> &Store {
        todo!()
    }
    pub fn bind(&mut self, node: &str, resource: Option<&str>, conn: ConnId) -> Result<Bound, BindError> {
        let _ = (node, resource, conn);
        todo!()
    }
    pub fn handle_stanza(&mut self, conn: ConnId, stanza: Stanza) {
        let _ = (conn, stanza);
        todo!()
    }
    pub fn handle_frame(&mut self, frame: Frame) {
        let _ = frame;
        todo!()
    }
    pub fn handle_disconnect(&mut self, conn: ConnId) {
        let _ = conn;
        todo!()
    }
    pub fn handle_undeliverable(&mut self, conn: ConnId, bytes: Bytes) {
        let _ = (conn, bytes);
        todo!()
    }
    pub fn poll_action(&mut self) -> Option<Action> {
        todo!()
    }
}
