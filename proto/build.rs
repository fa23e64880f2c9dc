//! Compiles `phiaudit/v1/*.proto` with protox (pure Rust: no protoc needed) and generates the
//! prost types, the tonic service code and proto3-JSON serde impls (pbjson).
use std::{env, fs, path::PathBuf};

use prost::Message as _;

const PROTOS: &[&str] = &[
    "phiaudit/v1/record.proto",
    "phiaudit/v1/chain.proto",
    "phiaudit/v1/query.proto",
];

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=phiaudit");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let fds = protox::compile(PROTOS, ["."])?;
    let descriptor_bytes = fds.encode_to_vec();
    fs::write(out.join("phiaudit_descriptor.bin"), &descriptor_bytes)?;

    // Messages and the Ingest service (tonic client and server).
    tonic_prost_build::configure()
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        // Ordered maps: the JSON form of a record is deterministic (evidence bundles compare
        // it byte for byte).
        .btree_map(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;

    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        // Every field is written, also zeros and empty values: `"uid": 0` must be visible.
        .emit_fields()
        .btree_map(["."])
        .build(&[".phiaudit"])?;
    Ok(())
}
