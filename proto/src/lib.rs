//! The phi-audit wire format, package `phiaudit.v1`: audit records, checkpoints and the
//! services between agent and collector. Generated from `phiaudit/v1/*.proto`; the JSON form
//! follows the proto3 JSON mapping.

#[expect(clippy::all, clippy::allow_attributes, reason = "generated code")]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/phiaudit.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/phiaudit.v1.serde.rs"));
}

/// Encoded `FileDescriptorSet` of the package (for reflection and gRPC descriptors).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/phiaudit_descriptor.bin"));

pub use pbjson_types::Timestamp;

impl v1::Record {
    /// The record's kind, as named in queries and counters: "exec", "open", "connect",
    /// "accept", "gap", "heartbeat", "agent", "config_change", "exit".
    pub fn kind(&self) -> &'static str {
        use v1::record::Event;
        match &self.event {
            Some(Event::Exec(_)) => "exec",
            Some(Event::Open(_)) => "open",
            Some(Event::Connect(_)) => "connect",
            Some(Event::Accept(_)) => "accept",
            Some(Event::Gap(_)) => "gap",
            Some(Event::Heartbeat(_)) => "heartbeat",
            Some(Event::Agent(_)) => "agent",
            Some(Event::ConfigChange(_)) => "config_change",
            Some(Event::Exit(_)) => "exit",
            None => "unknown",
        }
    }
}
