//! `sched_process_fork`: a new process (threads are skipped), so user space knows its parent
//! even when it exits before anyone could look at /proc.

use agent_common::{
    event::{EventHeader, EventKind, ForkEvent},
    offsets::features,
};
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::{
    emit::{account, fill_header, submit_record},
    error::Result,
    kernel::{Kind, current_task, has, is_kernel_thread, load_ptr, load_u32, load_u64, off},
};

#[repr(C)]
struct ForkRecord {
    header: EventHeader,
    body: ForkEvent,
}

#[btf_tracepoint(function = "sched_process_fork")]
pub fn tp_fork(ctx: BtfTracePointContext) -> i32 {
    let child: u64 = ctx.arg(1);
    account(&ctx, try_fork(child));
    0
}

#[inline(always)]
fn try_fork(child: u64) -> Result<()> {
    let tgid = load_u32(child, Kind::Task, off!(task_tgid))?;
    let pid = load_u32(child, Kind::Task, off!(task_pid))?;
    if tgid != pid || is_kernel_thread(child)? {
        return Ok(());
    }
    let parent = load_ptr(child, Kind::Task, off!(task_real_parent))?;
    let mut record = ForkRecord {
        header: EMPTY_HEADER,
        body: ForkEvent {
            child_tgid: tgid,
            parent_tgid: load_u32(parent, Kind::Task, off!(task_tgid))?,
            child_start_ns: if has(features::START_BOOTTIME) {
                load_u64(child, Kind::Task, off!(task_start_boottime))?
            } else {
                0
            },
        },
    };
    fill_header(
        (&raw mut record.header).cast(),
        EventKind::Fork,
        current_task(),
    )?;
    submit_record(&mut record)
}

pub const EMPTY_HEADER: EventHeader = EventHeader {
    kind: 0,
    len: 0,
    ktime_ns: 0,
    tgid: 0,
    pid: 0,
    uid: 0,
    gid: 0,
    euid: 0,
    egid: 0,
    loginuid: 0,
    sessionid: 0,
    cgroup_id: 0,
    comm: [0; 16],
};
