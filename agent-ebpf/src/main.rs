//! phi-audit kernel programs.
//!
//! All programs attach to BTF-enabled raw tracepoints (`tp_btf`): `sys_exit` for the open
//! family and connect, `sched_process_exec`, `sched_process_fork` and `sched_process_exit` for
//! the process table. They need no tracefs and no kprobes. Field offsets of kernel structures
//! come from the running kernel's BTF through the `OFFSETS` global.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod emit;
mod error;
mod kernel;
mod maps;
mod path;
mod probes;
mod verdict;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any program that could reach here; it exists only to link.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
