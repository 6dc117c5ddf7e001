//! The host↔guest protocol spoken over a virtio-serial port, shared by the host side
//! (the machine module's agent target, which uses this one) and the guest agent (`agent/`, a separate small static
//! binary that includes `protocol.rs` by path).

pub mod protocol;

/// The guest agent executable (static, x86_64), built by `build.rs` from `agent/`.
pub const AGENT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/builder-agent"));
