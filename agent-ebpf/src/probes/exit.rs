//! `sched_process_exit`: sent when the last thread of a process exits, with its exit code.

use agent_common::{
    event::{EventHeader, EventKind, ExitEvent},
    offsets::features,
};
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

use super::fork::EMPTY_HEADER;
use crate::{
    emit::{account, fill_header, submit_record},
    error::Result,
    kernel::{Kind, has, is_kernel_thread, load_ptr, load_u32, load_u64, off},
};

#[repr(C)]
struct ExitRecord {
    header: EventHeader,
    body: ExitEvent,
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn tp_exit(ctx: BtfTracePointContext) -> i32 {
    let task: u64 = ctx.arg(0);
    account(&ctx, try_exit(task));
    0
}

#[inline(always)]
fn try_exit(task: u64) -> Result<()> {
    // `signal->live` is decremented before this tracepoint: zero means the whole thread group
    // is gone.
    if is_kernel_thread(task)? {
        return Ok(());
    }
    let signal = load_ptr(task, Kind::Task, off!(task_signal))?;
    let live = load_u32(signal, Kind::Signal, off!(signal_live))?;
    if live != 0 {
        return Ok(());
    }
    let leader = load_ptr(task, Kind::Task, off!(task_group_leader))?;
    let mut record = ExitRecord {
        header: EMPTY_HEADER,
        body: ExitEvent {
            exit_code: load_u32(task, Kind::Task, off!(task_exit_code))?,
            _pad: 0,
            start_ns: if has(features::START_BOOTTIME) {
                load_u64(leader, Kind::Task, off!(task_start_boottime))?
            } else {
                0
            },
        },
    };
    fill_header((&raw mut record.header).cast(), EventKind::Exit, task)?;
    submit_record(&mut record)
}
