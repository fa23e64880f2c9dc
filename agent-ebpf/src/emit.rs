//! Assembling events and handing them to user space; drop accounting.

use agent_common::{
    drops::DropReason,
    event::{EventHeader, EventKind},
    limits::SCRATCH_SIZE,
    offsets::features,
};
use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_get_current_cgroup_id, bpf_jiffies64, bpf_ktime_get_boot_ns},
};

use crate::{
    error::{Error, Result},
    kernel::{Kind, has, load_ptr, load_u32, load_u64, off, setting},
    maps::{DROPS, EVENTS, SCRATCH, TICK_TIME, WAKE_BYTES},
};

/// Adds one to the drop counter of `reason`.
#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(counter) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, this program is the only writer on this CPU right now.
        unsafe { *counter += 1 };
    }
}

/// The scratch buffer of `slot` for this CPU.
#[inline(always)]
pub fn scratch(slot: u32) -> Result<*mut u8> {
    SCRATCH
        .get_ptr_mut(slot)
        .map(|s| s.cast::<u8>())
        .ok_or(Error::Scratch)
}

/// Fills the common header for the current task (`task`) at the start of `buf`. Every field
/// is read from the task and its credentials (direct loads where the kernel allows, see
/// `kernel::load_u64`) rather than through the `bpf_get_current_*` helpers, which cost a call
/// each; the ids are the kernel's global ones, as those helpers report them.
#[inline(always)]
pub fn fill_header(buf: *mut u8, kind: EventKind, task: u64) -> Result<()> {
    let hdr = buf.cast::<EventHeader>();
    let tgid = load_u32(task, Kind::Task, off!(task_tgid))?;
    let pid = load_u32(task, Kind::Task, off!(task_pid))?;
    let comm = [
        load_u64(task, Kind::Task, off!(task_comm))?,
        load_u64(task, Kind::Task, off!(task_comm) + 8)?,
    ];
    let cred = load_ptr(task, Kind::Task, off!(task_cred))?;
    let uid = load_u32(cred, Kind::Cred, off!(cred_uid))?;
    let gid = load_u32(cred, Kind::Cred, off!(cred_gid))?;
    let euid = load_u32(cred, Kind::Cred, off!(cred_euid))?;
    let egid = load_u32(cred, Kind::Cred, off!(cred_egid))?;
    let loginuid = if has(features::LOGINUID) {
        load_u32(task, Kind::Task, off!(task_loginuid))?
    } else {
        u32::MAX
    };
    let sessionid = if has(features::SESSIONID) {
        load_u32(task, Kind::Task, off!(task_sessionid))?
    } else {
        u32::MAX
    };
    // SAFETY: `buf` points to a scratch slot larger than the header; all helpers are
    // side-effect free.
    unsafe {
        (*hdr).kind = kind as u32;
        (*hdr).len = 0;
        (*hdr).ktime_ns = event_time();
        (*hdr).tgid = tgid;
        (*hdr).pid = pid;
        (*hdr).uid = uid;
        (*hdr).gid = gid;
        (*hdr).euid = euid;
        (*hdr).egid = egid;
        (*hdr).loginuid = loginuid;
        (*hdr).sessionid = sessionid;
        (*hdr).cgroup_id = cgroup_id(task);
        (*hdr).comm = core::mem::transmute::<[u64; 2], [u8; 16]>(comm);
    }
    Ok(())
}

/// The time of an event (`CLOCK_BOOTTIME`, ns). Reading the clock costs a helper call and
/// the clock source's own indirect call, about 25 ns here, so each CPU reads it once per
/// kernel tick (`jiffies`, which the verifier turns into one load): the first event of a
/// tick on a CPU carries its exact time, and the events after it on that CPU in the same
/// tick carry that time too, at most one tick (1/HZ) early. The kernel's own audit records
/// are stamped with tick-granular time throughout.
#[inline(always)]
fn event_time() -> u64 {
    // SAFETY: helper without preconditions.
    let tick = unsafe { bpf_jiffies64() };
    let Some(cached) = TICK_TIME.get_ptr_mut(0) else {
        // SAFETY: helper without preconditions.
        return unsafe { bpf_ktime_get_boot_ns() };
    };
    // SAFETY: this CPU's slot. A program that preempted another on this CPU may overwrite
    // it; both then still hold a time read in this tick.
    let cached = unsafe { &mut *cached };
    if cached.tick != tick || cached.ns == 0 {
        // SAFETY: helper without preconditions.
        cached.ns = unsafe { bpf_ktime_get_boot_ns() };
        cached.tick = tick;
    }
    cached.ns
}

/// The task's cgroup id on the default hierarchy (what `bpf_get_current_cgroup_id` returns for
/// the current task): three pointers and the id, with direct loads where the kernel allows.
#[inline(always)]
fn cgroup_id(task: u64) -> u64 {
    if has(features::CGROUP_LOADS)
        && let Ok(id) = cgroup_id_loaded(task)
    {
        return id;
    }
    // SAFETY: helper without preconditions.
    unsafe { bpf_get_current_cgroup_id() }
}

/// [`cgroup_id`] by direct loads (a function, not a closure, so that it is inlined rather
/// than called as a subprogram for every event).
#[inline(always)]
fn cgroup_id_loaded(task: u64) -> Result<u64> {
    let cset = load_ptr(task, Kind::Task, off!(task_cgroups))?;
    let cgrp = load_ptr(cset, Kind::CssSet, off!(css_set_dfl_cgrp))?;
    let kn = load_ptr(cgrp, Kind::Cgroup, off!(cgroup_kn))?;
    load_u64(kn, Kind::KernfsNode, off!(kernfs_node_id))
}

/// `bpf_ringbuf_output` flags: no wakeup, forced wakeup.
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Wakes the agent once per `wakeup_bytes` this CPU sends; it drains on a timer otherwise.
/// Counted per CPU rather than asking the ring buffer how much waits: that would read the
/// consumer position, a cache line the agent writes for every event it takes, so each event
/// would pay a cache miss while the agent is busy.
#[inline(always)]
fn wakeup_flags(len: usize) -> u64 {
    let Some(sent) = WAKE_BYTES.get_ptr_mut(0) else {
        return BPF_RB_FORCE_WAKEUP;
    };
    let threshold = u64::from(setting!(wakeup_bytes));
    // SAFETY: this CPU's slot; a lost update under preemption shifts one wakeup a little.
    unsafe {
        let total = *sent + len as u64;
        if total >= threshold {
            *sent = 0;
            BPF_RB_FORCE_WAKEUP
        } else {
            *sent = total;
            BPF_RB_NO_WAKEUP
        }
    }
}

/// Copies the first `len` bytes of `buf` (an assembled event) to the ring buffer.
#[inline(always)]
pub fn submit(buf: *mut u8, len: usize) -> Result<()> {
    // Every event is shorter than its scratch slot. Clamped, then masked where the compiler
    // cannot drop the mask: some verifiers (Linux 6.1) lose the bound a compare sets when the
    // compiler compares one copy of the length and passes another.
    let mut len = if len >= SCRATCH_SIZE {
        SCRATCH_SIZE - 1
    } else {
        len
    };
    // SAFETY: arithmetic on a register.
    unsafe {
        core::arch::asm!(
            "{len} &= {mask}",
            len = inout(reg) len,
            mask = const SCRATCH_SIZE - 1,
            options(pure, nomem, nostack),
        );
    }
    // SAFETY: the header is at the start of `buf`.
    unsafe { (*buf.cast::<EventHeader>()).len = len as u32 };
    // SAFETY: `buf` is a scratch slot of `SCRATCH_SIZE` bytes and `len` is bounded by it.
    let event = unsafe { core::slice::from_raw_parts(buf.cast_const(), len) };
    EVENTS
        .output::<[u8]>(event, wakeup_flags(len))
        .map_err(|_| Error::RingFull)
}

const _: () = assert!(SCRATCH_SIZE.is_power_of_two());

/// Thin entry helper: counts the drop reason of an error. A missing scratch slot means the
/// loader and the programs disagree; that is also logged (aya-log) for the agent's log.
#[inline(always)]
pub fn account<C: EbpfContext>(ctx: &C, result: Result<()>) {
    if let Err(e) = result {
        count_drop(e.reason());
        if e == Error::Scratch {
            aya_log_ebpf::error!(ctx, "per-CPU scratch slot missing: events are being lost");
        }
    }
}

/// Sends a fixed-size record (header first) built on the stack.
#[inline(always)]
pub fn submit_record<T>(record: &mut T) -> Result<()> {
    let hdr = (record as *mut T).cast::<EventHeader>();
    // SAFETY: every record type starts with its header.
    unsafe { (*hdr).len = size_of::<T>() as u32 };
    EVENTS
        .output::<T>(&*record, wakeup_flags(size_of::<T>()))
        .map_err(|_| Error::RingFull)
}
