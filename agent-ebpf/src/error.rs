//! A small error type that fits in a register.

use agent_common::drops::DropReason;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Error {
    /// A kernel or user memory read failed.
    Read = 1,
    /// The per-CPU scratch slot was missing (cannot happen with a correct loader).
    Scratch = 2,
    /// The ring buffer had no room.
    RingFull = 3,
}

impl Error {
    /// The error whose discriminant is `code` (for values returned across a subprogram call).
    pub const fn from_code(code: u32) -> Self {
        match code {
            c if c == Error::Read as u32 => Error::Read,
            c if c == Error::RingFull as u32 => Error::RingFull,
            _ => Error::Scratch,
        }
    }

    /// The drop counter this error feeds.
    pub const fn reason(self) -> DropReason {
        match self {
            Error::Read | Error::Scratch => DropReason::ReadFailure,
            Error::RingFull => DropReason::RingBufferFull,
        }
    }
}

pub type Result<T> = core::result::Result<T, Error>;
