//! `fexit` programs on the kernel functions that every system call of a group goes through
//! (`do_sys_openat2` for the open family, `__sys_connect`, `__sys_accept4`, `set_fs_pwd`, `do_renameat2`, …):
//! the same work as `sys_exit`, but a program runs only when its function does, so every
//! other system call costs nothing. Each reads the call number and arguments from the task's
//! saved registers, where `sys_exit` reads them too, so both give the same records. The agent
//! attaches them where the kernel allows `fexit` and they fire, and leaves the calls of any
//! group that cannot to `sys_exit` (`agent_common::sensor`).

use aya_ebpf::{macros::fexit, programs::FExitContext};

use super::syscalls::{Select, fexit_call};
use crate::{emit::account, error::Error};

macro_rules! sensors {
    ($($program:ident => $select:expr;)*) => {
        $(
            #[fexit]
            pub fn $program(ctx: FExitContext) -> i32 {
                // The return value through `bpf_get_func_ret` (Linux >= 5.17), whatever the
                // function's arity.
                let result = fexit_call($select, || ctx.ret::<i64>().map_err(|_| Error::Read));
                account(&ctx, result);
                0
            }
        )*
    };
}

sensors! {
    fx_open => Select::Open;
    fx_connect => Select::Connect;
    fx_accept => Select::Accept;
    fx_chdir => Select::Chdir;
    fx_rename => Select::Invalidate;
    fx_rmdir => Select::Invalidate;
    fx_mount => Select::Invalidate;
    fx_umount => Select::Invalidate;
    fx_pivot_root64 => Select::Invalidate;
    fx_pivot_root32 => Select::Invalidate;
    fx_move_mount64 => Select::Invalidate;
    fx_move_mount32 => Select::Invalidate;
    fx_mount_setattr64 => Select::Invalidate;
    fx_mount_setattr32 => Select::Invalidate;
}
