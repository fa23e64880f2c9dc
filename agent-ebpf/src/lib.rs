//! The kernel programs are the binary target of this crate (built for the bpf target by
//! `agent/build.rs`). This library target exists so that the agent can list the crate as a
//! build dependency, which makes cargo rebuild the agent when the programs change.
#![no_std]
