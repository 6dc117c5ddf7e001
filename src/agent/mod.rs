//! The host↔guest protocol spoken over a virtio-serial port, shared by the host side
//! ([`crate::machine`]'s agent target) and the guest agent (`agent/`, a separate small static
//! binary that includes `protocol.rs` by path).

pub mod protocol;

/// The guest agent executable (static, x86_64), built by `build.rs` from `agent/`.
pub const AGENT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/builder-agent"));
