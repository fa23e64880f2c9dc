//! The tamper-evident parts of phi-audit, shared by the agent, the collector and the tools:
//! the per-host hash chain (`seal`), signed checkpoints (`checkpoint`) and the durable spool
//! (`spool`). The byte formats are specified in docs/chain.md.

pub mod checkpoint;
pub mod seal;
pub mod spool;
