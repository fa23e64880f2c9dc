//! One module per hook. Each entry point is a thin `#[btf_tracepoint]` function that calls a
//! `try_*` function and turns its error into a drop count.

mod accept;
mod chdir;
mod connect;
mod exec;
mod exit;
mod fexit;
mod floor;
mod fork;
mod io_uring;
mod open;
mod syscalls;
