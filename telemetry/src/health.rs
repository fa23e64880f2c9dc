//! Liveness and readiness as the main loop reports them.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Shared between the main loop (which beats and says when it is ready) and the server.
pub struct Health {
    started: Instant,
    /// Milliseconds after `started` of the last beat.
    beat_ms: AtomicU64,
    stale_after: Duration,
    ready: AtomicBool,
    why_not: Mutex<String>,
}

impl Health {
    /// Alive while [`Health::beat`] is called at least every `stale_after`; not ready until
    /// [`Health::ready`].
    pub fn new(stale_after: Duration) -> Health {
        Health {
            started: Instant::now(),
            beat_ms: AtomicU64::new(0),
            stale_after,
            ready: AtomicBool::new(false),
            why_not: Mutex::new("starting".into()),
        }
    }

    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.beat_ms.store(ms, Ordering::Relaxed);
    }

    pub fn ready(&self) {
        self.beat();
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Not ready, and why (shown by `/readyz`).
    pub fn not_ready(&self, why: impl Into<String>) {
        *self.why_not.lock().unwrap_or_else(|e| e.into_inner()) = why.into();
        self.ready.store(false, Ordering::Relaxed);
    }

    /// `Ok` while the main loop turns; else how long it has been silent.
    pub fn live(&self) -> Result<(), String> {
        let last = Duration::from_millis(self.beat_ms.load(Ordering::Relaxed));
        let silent = self.started.elapsed().saturating_sub(last);
        if silent <= self.stale_after {
            Ok(())
        } else {
            Err(format!(
                "the main loop has not run for {:.0} s",
                silent.as_secs_f64()
            ))
        }
    }

    pub fn readiness(&self) -> Result<(), String> {
        self.live()?;
        if self.ready.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(self
                .why_not
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_said_and_alive_only_while_beating() {
        let h = Health::new(Duration::from_millis(50));
        assert!(h.live().is_ok());
        assert_eq!(h.readiness(), Err("starting".into()));
        h.ready();
        assert!(h.readiness().is_ok());
        h.not_ready("the store is unreachable");
        assert_eq!(h.readiness(), Err("the store is unreachable".into()));
        std::thread::sleep(Duration::from_millis(120));
        let err = h.live().expect_err("stale");
        assert!(err.contains("has not run"), "{err}");
        h.beat();
        assert!(h.live().is_ok());
    }
}
