//! `io_uring_complete`: requests an io_uring completes. A file opened through a ring
//! (`IORING_OP_OPENAT`, `IORING_OP_OPENAT2`) is opened by the kernel for the ring, with no
//! open system call of its own, so `sys_exit` never sees it; a rename through a ring changes
//! directory names without a rename system call. Opens become open events like the system
//! calls' (judged and named from the new file); renames and removals make remembered
//! verdicts stale.
//!
//! The tracepoint runs in the task that posts the completion: the submitter or one of its
//! io_uring threads (workers, the submission poller), which share its file table and
//! credentials. The program reads the request through `bpf_probe_read_kernel` (the
//! tracepoint passes it as `void *`); it runs once per completion of any ring, and returns
//! after one read for every request that is not an open, rename or unlink.
//!
//! A failed open has no file, and the kernel drops the name it was given before it completes
//! the request: `io_uring_submit_req` (where the kernel has it) keeps each open request's
//! name from its submission, in `RING_NAMES`, so that a failure is judged and recorded by
//! the name as a failed open system call is. Without it, failed opens through a ring are
//! not recorded (the start record says so).

use agent_common::{drops::DropReason, event::OpenSyscall, limits::PATH_MAX, offsets::features};
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

use super::{open, syscalls::claimed};
use crate::{
    emit::{account, count_drop, scratch},
    error::{Error, Result},
    kernel::{btf_load, current_task_btf, fd_file, has, off, read, setting, untyped},
    maps::{RING_NAMES, RingName, slot},
    path::{NameIn, read_str},
    verdict,
};

/// `enum io_uring_op` values (user ABI, stable).
const IORING_OP_OPENAT: u8 = 18;
const IORING_OP_OPENAT2: u8 = 28;
const IORING_OP_RENAMEAT: u8 = 35;
const IORING_OP_UNLINKAT: u8 = 36;
/// The `file_index` that asks the kernel to pick a free direct descriptor (its number is
/// then the result).
const IORING_FILE_INDEX_ALLOC: u32 = u32::MAX;
/// Flag bits the kernel keeps in the low bits of a direct descriptor's file word.
const FILE_WORD_FLAGS: u64 = 7;

#[btf_tracepoint(function = "io_uring_complete")]
pub fn tp_ring_complete(ctx: BtfTracePointContext) -> i32 {
    // (ring, request, ...) on every kernel: later arguments differ between releases.
    let ring: u64 = untyped(ctx.arg(0));
    let req: u64 = untyped(ctx.arg(1));
    account(&ctx, try_complete(ring, req));
    0
}

#[inline(always)]
fn try_complete(ring: u64, req: u64) -> Result<()> {
    // Attached only when the request's offsets resolved (`features::IO_URING`).
    if req == 0 {
        // A completion without a request (the ring's own notices).
        return Ok(());
    }
    let opcode: u8 = read(req, off!(req_opcode))?;
    let syscall = match opcode {
        IORING_OP_OPENAT => OpenSyscall::IoUringOpenat,
        IORING_OP_OPENAT2 => OpenSyscall::IoUringOpenat2,
        IORING_OP_RENAMEAT | IORING_OP_UNLINKAT => {
            // Any successful unlink, not only of directories: rare enough through a ring
            // that a needless cache refill costs nothing that matters.
            if read::<i32>(req, off!(req_res))? == 0 {
                verdict::bump_kernel_generation();
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    let res: i32 = read(req, off!(req_res))?;
    if res < 0 && !has(features::IO_URING_NAMES) {
        // Nothing names a failed open here (the start record says so).
        return Ok(());
    }
    let task = current_task_btf();
    if btf_load!(u32, task, task_tgid) == setting!(self_tgid) {
        return Ok(());
    }
    let request = open::RingOpen {
        ret: i64::from(res),
        syscall,
        dirfd: read(req, off!(req_open_dfd))?,
        flags: read::<u64>(req, off!(req_open_flags))? as u32,
        mode: read::<u64>(req, off!(req_open_mode))? as u32,
    };
    if res < 0 {
        // SAFETY: a map value pointer; only this request's completion removes its entry.
        let Some(name) = (unsafe { RING_NAMES.get(req) }) else {
            // Submitted before the agent started, or pushed out of the map: the attempt
            // cannot be named, so it is counted as lost.
            count_drop(DropReason::ReadFailure);
            return Ok(());
        };
        let name = name.name.as_ptr() as u64;
        let result = claimed(|| open::handle_ring_failed(task, name, &request));
        let _ = RING_NAMES.remove(req);
        return result;
    }
    if has(features::IO_URING_NAMES) {
        let _ = RING_NAMES.remove(req);
    }
    let slot: u32 = read(req, off!(req_open_file_slot))?;
    let file = if slot == 0 {
        fd_file(task, i64::from(res))?
    } else if slot == IORING_FILE_INDEX_ALLOC {
        direct_descriptor(ring, res as u32)?
    } else {
        direct_descriptor(ring, slot - 1)?
    };
    claimed(|| open::handle_ring(task, file, &request))
}

/// `io_uring_submit_req`: a request a task submits to a ring, after the kernel prepared it
/// (an open request then holds its own copy of the name). Keeps each open request's name
/// until it completes (see the module's notes). Attached only where the kernel passes the
/// request alone and its fields resolved (`features::IO_URING_NAMES`).
#[btf_tracepoint(function = "io_uring_submit_req")]
pub fn tp_ring_submit(ctx: BtfTracePointContext) -> i32 {
    let req: u64 = untyped(ctx.arg(0));
    account(&ctx, try_submit(req));
    0
}

#[inline(always)]
fn try_submit(req: u64) -> Result<()> {
    let opcode: u8 = read(req, off!(req_opcode))?;
    if opcode != IORING_OP_OPENAT && opcode != IORING_OP_OPENAT2 {
        return Ok(());
    }
    let task = current_task_btf();
    if btf_load!(u32, task, task_tgid) == setting!(self_tgid) {
        return Ok(());
    }
    let filename: u64 = read(req, off!(req_open_filename))?;
    let name: u64 = read(filename, off!(filename_name))?;
    claimed(|| keep_name(req, name))
}

/// Copies the name at `name` (kernel memory) into `RING_NAMES` for request `req`, through
/// this CPU's system call scratch slot (held by the caller's claim).
#[inline(always)]
fn keep_name(req: u64, name: u64) -> Result<()> {
    let buf = scratch(slot::SYSCALL)?;
    if read_str(buf, PATH_MAX as u32, name, NameIn::Kernel) <= 0 {
        return Err(Error::Read);
    }
    // SAFETY: the scratch slot is larger than a `RingName`, whose bytes the copy set up to
    // and including the NUL (the rest is never read).
    let kept = unsafe { &*buf.cast::<RingName>() };
    RING_NAMES.insert(req, kept, 0).map_err(|_| Error::Read)
}

/// The file in the ring's direct descriptor `index`.
#[inline(always)]
fn direct_descriptor(ring: u64, index: u32) -> Result<u64> {
    let count: u32 = read(ring, off!(ctx_fixed_count))?;
    if index >= count {
        return Err(Error::Read);
    }
    let table: u64 = read(ring, off!(ctx_fixed_files))?;
    let mut word: u64 = read(table + u64::from(index) * 8, 0)?;
    if has(features::IO_URING_NODES) {
        if word == 0 {
            return Err(Error::Read);
        }
        word = read(word, off!(rsrc_node_file))?;
    }
    match word & !FILE_WORD_FLAGS {
        0 => Err(Error::Read),
        file => Ok(file),
    }
}
