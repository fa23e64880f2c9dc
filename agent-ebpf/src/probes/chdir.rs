//! `chdir`/`fchdir` at system call exit: the task's new working directory, resolved, so the
//! process table knows every process's cwd.

use agent_common::{
    drops::DropReason,
    event::{ChdirEvent, EventKind, path_flags, tail_offset},
    limits::PATH_MAX,
};

use crate::{
    emit::{count_drop, fill_header, scratch, submit},
    error::Result,
    kernel::PathRef,
    maps::{CURSOR_OFFSET, slot},
    path::{PATH_REGION, TAIL_MAX, write_path},
};

const TAIL: usize = tail_offset::<ChdirEvent>();
const _: () = assert!(TAIL + PATH_REGION <= CURSOR_OFFSET && TAIL <= TAIL_MAX);

#[inline(always)]
pub fn handle(task: u64) -> Result<()> {
    let buf = scratch(slot::SYSCALL)?;
    fill_header(buf, EventKind::Chdir, task)?;
    // SAFETY: the body follows the header in the scratch slot; the tail region is larger
    // than `PATH_REGION`, and the cursor lies past it.
    let packed = write_path(
        slot::SYSCALL,
        TAIL,
        PathRef::cwd_of(task)?,
        PathRef::root_of(task)?,
    );
    let len = (packed & 0xffff) as usize;
    let len = if len > PATH_MAX { PATH_MAX } else { len };
    let flags = (packed >> 16) as u16;
    if flags & (path_flags::TRUNCATED | path_flags::DEPTH_EXCEEDED) != 0 {
        count_drop(DropReason::Truncated);
    }
    // SAFETY: see above.
    unsafe {
        let body = buf.add(tail_offset::<()>()).cast::<ChdirEvent>();
        (*body).path_len = len as u16;
        (*body).path_flags = flags;
        (*body)._pad = 0;
    }
    submit(buf, TAIL + len)
}
