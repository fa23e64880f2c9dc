//! Builds the kernel programs (`agent-ebpf`) for the bpf target with aya-build; the object is
//! embedded in the agent binary. Needs the nightly toolchain with rust-src and bpf-linker
//! (`cargo xtask setup` installs both).
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "agent-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
