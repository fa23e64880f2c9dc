//! Retention: records older than the store's retention period (default six years, HIPAA's
//! documentation period) are removed in whole checkpoint intervals, so that what remains
//! still verifies from the checkpoint that anchors it. A host under legal hold keeps
//! everything. Every prune is recorded (the `prunes` table and the access log).

use std::time::Duration;

use phi_proto::v1::{PruneResponse, Pruned};

use crate::store::{Store, StoreError};

/// Six years of 365.25 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(6 * 31_557_600);
/// The store setting that holds the period in seconds.
pub const SETTING: &str = "retention_seconds";

/// The store's retention period.
pub fn period(store: &mut dyn Store) -> Result<Duration, StoreError> {
    Ok(match store.setting(SETTING)? {
        Some(v) => Duration::from_secs(v.parse().map_err(|_| {
            StoreError::Invalid(format!(
                "the stored retention period {v:?} is not a number of seconds"
            ))
        })?),
        None => DEFAULT_RETENTION,
    })
}

/// Parses "6years", "90days", "30d", "12h"…
pub fn parse_period(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| {
        format!("retention {text:?} is not a duration ({e}); examples: 6years, 400days, 12h")
    })?;
    if d.as_secs() == 0 {
        return Err("retention must be at least one second".into());
    }
    Ok(d)
}

/// Applies retention to every host at time `now_ns` (or only reports with `dry_run`).
pub fn run(
    store: &mut dyn Store,
    now_ns: i64,
    dry_run: bool,
    by: &str,
) -> Result<PruneResponse, StoreError> {
    let period = period(store)?;
    let cutoff_ns = now_ns.saturating_sub(i64::try_from(period.as_nanos()).unwrap_or(i64::MAX));
    let mut out = PruneResponse {
        retention_seconds: period.as_secs(),
        cutoff: Some(crate::api::timestamp(cutoff_ns)),
        hosts: Vec::new(),
    };
    for host in store.hosts()? {
        let mut p = Pruned {
            host_id: host.host_id.clone(),
            ..Default::default()
        };
        if host.hold.is_some() {
            p.skipped = "legal hold".into();
        } else {
            match store.checkpoint_before(&host.host_id, cutoff_ns)? {
                Some((seq, _)) if seq > host.anchor_seq => {
                    if dry_run {
                        p.through_seq = seq;
                        p.records = seq - host.anchor_seq;
                    } else {
                        let r = store.prune(&host.host_id, seq, by)?;
                        p.through_seq = r.through_seq;
                        p.records = r.records;
                        p.skipped = r.skipped.unwrap_or_default();
                    }
                }
                _ => p.skipped = "nothing older than the retention period".into(),
            }
        }
        out.hosts.push(p);
    }
    Ok(out)
}
