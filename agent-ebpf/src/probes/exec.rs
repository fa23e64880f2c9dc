//! `sched_process_exec`: a process image was replaced. Carries the executed file's resolved
//! path, the file name given to execve, and the argument area (bounded, truncation flagged).

use agent_common::{
    drops::DropReason,
    event::{EventKind, ExecEvent, exec_flags, path_flags, tail_offset},
    limits::{ARGV_MAX, ENV_MAX, EXEC_FILENAME_MAX, PATH_MAX},
    offsets::features,
};
use aya_ebpf::{
    helpers::generated::{bpf_probe_read_kernel_str, bpf_probe_read_user},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{
    emit::{account, count_drop, fill_header, scratch, submit},
    error::Result,
    kernel::{Kind, PathRef, cap, current_task, has, load_ptr, load_u32, load_u64, off},
    maps::slot,
    path::write_path,
};

const TAIL: usize = tail_offset::<ExecEvent>();
const _: () = assert!(TAIL <= crate::path::TAIL_MAX);
const _: () = assert!(
    TAIL + crate::path::PATH_REGION + EXEC_FILENAME_MAX + ARGV_MAX <= crate::maps::CURSOR_OFFSET
);

#[btf_tracepoint(function = "sched_process_exec")]
pub fn tp_exec(ctx: BtfTracePointContext) -> i32 {
    let old_pid: u32 = ctx.arg(1);
    let bprm: u64 = ctx.arg(2);
    account(&ctx, try_exec(old_pid, bprm));
    0
}

#[inline(always)]
fn try_exec(old_pid: u32, bprm: u64) -> Result<()> {
    let task = current_task();
    let buf = scratch(slot::EXEC)?;
    fill_header(buf, EventKind::Exec, task)?;
    // SAFETY: the body follows the header in the scratch slot.
    let body = unsafe { &mut *buf.add(tail_offset::<()>()).cast::<ExecEvent>() };
    let parent = load_ptr(task, Kind::Task, off!(task_real_parent))?;
    body.ppid = load_u32(parent, Kind::Task, off!(task_tgid))?;
    body.old_pid = old_pid;
    body.start_ns = if has(features::START_BOOTTIME) {
        load_u64(task, Kind::Task, off!(task_start_boottime))?
    } else {
        0
    };
    body.flags = 0;
    body._pad = 0;
    body.env_len = 0;
    body.env_total = 0;

    // The executed file (after binfmt handling: the interpreter for scripts).
    let file = load_ptr(bprm, Kind::Binprm, off!(bprm_file))?;
    let root = PathRef::root_of(task)?;
    // SAFETY: the tail region of the scratch slot is larger than `PATH_REGION`.
    let packed = write_path(slot::EXEC, TAIL, PathRef::of_file(file)?, root);
    let exe_len = cap((packed & 0xffff) as usize, PATH_MAX);
    let exe_flags = (packed >> 16) as u16;
    if exe_flags & (path_flags::TRUNCATED | path_flags::DEPTH_EXCEEDED) != 0 {
        count_drop(DropReason::Truncated);
    }
    body.exe_len = exe_len as u16;
    body.exe_flags = exe_flags;

    // The name as given to execve (may be relative, or the script for an interpreter).
    let filename = load_ptr(bprm, Kind::Binprm, off!(bprm_filename))?;
    // SAFETY: at most `EXEC_FILENAME_MAX` bytes after the path, inside the slot.
    let n = unsafe {
        bpf_probe_read_kernel_str(
            buf.add(TAIL + exe_len).cast(),
            EXEC_FILENAME_MAX as u32,
            filename as *const _,
        )
    };
    let filename_len = if n < 0 {
        0
    } else if n as usize >= EXEC_FILENAME_MAX {
        body.flags |= exec_flags::FILENAME_TRUNCATED;
        count_drop(DropReason::Truncated);
        EXEC_FILENAME_MAX
    } else {
        n as usize
    };
    // Bounded in a shape the 6.1 verifier follows (see `cap`).
    let filename_len = cap(filename_len, EXEC_FILENAME_MAX);
    body.filename_len = filename_len as u16;

    // The argument area of the new image.
    let mm = load_ptr(task, Kind::Task, off!(task_mm))?;
    let arg_start = load_u64(mm, Kind::Mm, off!(mm_arg_start))?;
    let arg_end = load_u64(mm, Kind::Mm, off!(mm_arg_end))?;
    let total = arg_end.saturating_sub(arg_start);
    body.argv_total = total as u32;
    let argv_len = cap(total as usize, ARGV_MAX);
    if total > ARGV_MAX as u64 {
        body.flags |= exec_flags::ARGV_TRUNCATED;
        count_drop(DropReason::Truncated);
    }
    // SAFETY: at most `ARGV_MAX` bytes after the file name, inside the slot.
    let r = unsafe {
        bpf_probe_read_user(
            buf.add(TAIL + exe_len + filename_len).cast(),
            argv_len as u32,
            arg_start as *const _,
        )
    };
    if r < 0 {
        // The helper zeroed the bytes; they stay in the record (a length chosen by a
        // branch here is one some verifiers lose the bound of) and user space drops them.
        body.flags |= exec_flags::ARGV_READ_FAILED;
        count_drop(DropReason::ReadFailure);
    }
    body.argv_len = argv_len as u16;

    // The environment of the new image (redacted in user space like argv).
    let env_start = load_u64(mm, Kind::Mm, off!(mm_env_start))?;
    let env_end = load_u64(mm, Kind::Mm, off!(mm_env_end))?;
    let env_total = env_end.saturating_sub(env_start);
    body.env_total = env_total as u32;
    let env_len = cap(env_total as usize, ENV_MAX);
    if env_total > ENV_MAX as u64 {
        body.flags |= exec_flags::ENV_TRUNCATED;
        count_drop(DropReason::Truncated);
    }
    let at = TAIL + exe_len + filename_len + argv_len;
    // SAFETY: at most `ENV_MAX` bytes after argv, inside the slot.
    let r =
        unsafe { bpf_probe_read_user(buf.add(at).cast(), env_len as u32, env_start as *const _) };
    if r < 0 {
        body.flags |= exec_flags::ENV_READ_FAILED;
        count_drop(DropReason::ReadFailure);
    }
    body.env_len = env_len as u16;
    submit(buf, at + env_len)
}
