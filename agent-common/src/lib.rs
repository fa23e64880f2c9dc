//! Types shared by the kernel programs (`agent-ebpf`) and the agent (`phi-agent`).
//!
//! Every type that crosses the kernel/user boundary is `#[repr(C)]`, `Copy`, has no implicit
//! padding (sizes and offsets are asserted at compile time) and carries its kind as a plain
//! integer that user space decodes with `TryFrom`, never by transmuting.
#![cfg_attr(target_arch = "bpf", no_std)]

pub mod drops;
pub mod event;
pub mod limits;
pub mod offsets;
pub mod sensor;
pub mod watch;

#[cfg(feature = "user")]
pub mod decode;
