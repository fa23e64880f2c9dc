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
