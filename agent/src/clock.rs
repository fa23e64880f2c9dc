//! Kernel timestamps (`CLOCK_BOOTTIME`) to wall-clock time, and the boot identity.

use phi_proto::Timestamp;

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// Converts boot-clock nanoseconds to wall-clock time. The offset is re-measured on
/// `refresh` so that clock adjustments (NTP) are followed.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// realtime - boottime, in ns.
    offset_ns: i128,
}

impl Clock {
    pub fn new() -> Self {
        let mut c = Clock { offset_ns: 0 };
        c.refresh();
        c
    }

    pub fn refresh(&mut self) {
        self.offset_ns = clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_BOOTTIME);
    }

    pub fn wall_ns(&self, boot_ns: u64) -> i128 {
        i128::from(boot_ns) + self.offset_ns
    }

    pub fn timestamp(&self, boot_ns: u64) -> Timestamp {
        to_timestamp(self.wall_ns(boot_ns))
    }

    /// The current wall-clock time.
    pub fn now() -> Timestamp {
        to_timestamp(clock_ns(libc::CLOCK_REALTIME))
    }
}

fn to_timestamp(ns: i128) -> Timestamp {
    Timestamp {
        seconds: ns.div_euclid(1_000_000_000) as i64,
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

/// This boot's identity (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_boot_time_to_now() {
        let clock = Clock::new();
        let now = Clock::now();
        let boot_now = clock_ns(libc::CLOCK_BOOTTIME) as u64;
        let ts = clock.timestamp(boot_now);
        assert!((ts.seconds - now.seconds).abs() <= 1);
        assert!((0..1_000_000_000).contains(&ts.nanos));
        assert_eq!(boot_id().len(), 36);
    }
}
