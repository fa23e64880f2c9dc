//! Reasons for which the kernel programs can lose or shorten an event. Each has a slot in the
//! per-CPU `DROPS` array; the agent turns counter increases into records.

/// Index into the `DROPS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The ring buffer had no room: the event is lost.
    RingBufferFull = 0,
    /// A kernel or user memory read failed: the event is lost or incomplete.
    ReadFailure = 1,
    /// A string (path, argv, file name) was longer than its bound: the event is delivered,
    /// shortened, with a flag.
    Truncated = 2,
    /// A path was deeper than `PATH_DEPTH_MAX`: delivered with a flag, undecided by the kernel.
    DepthExceeded = 3,
    /// A program found the per-CPU system call state in use by another program that it had
    /// preempted on this CPU: the event is lost.
    ProgramBusy = 4,
}

impl DropReason {
    /// Number of reasons, the size of the `DROPS` array.
    pub const COUNT: u32 = 5;
    /// All reasons, in index order.
    pub const ALL: [DropReason; Self::COUNT as usize] = [
        DropReason::RingBufferFull,
        DropReason::ReadFailure,
        DropReason::Truncated,
        DropReason::DepthExceeded,
        DropReason::ProgramBusy,
    ];

    /// Stable name used in metrics, logs and records.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::RingBufferFull => "ring_buffer_full",
            DropReason::ReadFailure => "read_failure",
            DropReason::Truncated => "truncated",
            DropReason::DepthExceeded => "depth_exceeded",
            DropReason::ProgramBusy => "program_busy",
        }
    }

    /// True when the reason means an event was lost (not only shortened).
    pub const fn is_loss(self) -> bool {
        matches!(
            self,
            DropReason::RingBufferFull | DropReason::ReadFailure | DropReason::ProgramBusy
        )
    }
}
