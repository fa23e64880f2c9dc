//! A consumer's durable positions in the store: for each host the last seq it handled, and
//! the last alert id. They live in the store itself (table `consumer_cursors`), next to what
//! they point into: a SQLite store keeps them in the same file with the same durability
//! (WAL, `synchronous=FULL`), a PostgreSQL store shares them between the collectors that use
//! it, and a backup or restore of the store carries them along, so they can never point past
//! what the store holds.

use std::{collections::BTreeMap, sync::Arc};

use crate::store::{HostHead, Pool, StoreError};

pub const ALERTS: &str = "alerts";

pub fn host_stream(host_id: &str) -> String {
    format!("host:{host_id}")
}

/// The positions of one consumer, as last stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursors {
    pub consumer: String,
    /// host id → last seq handled.
    pub hosts: BTreeMap<String, u64>,
    /// Last alert id handled.
    pub alerts: u64,
    /// Nothing was stored for this consumer yet.
    pub new: bool,
}

impl Cursors {
    pub async fn load(pool: &Arc<Pool>, consumer: &str) -> Result<Cursors, StoreError> {
        let name = consumer.to_owned();
        let rows = pool.run(move |s| s.cursors(&name)).await?;
        let mut c = Cursors {
            consumer: consumer.to_owned(),
            new: rows.is_empty(),
            ..Default::default()
        };
        for (stream, pos) in rows {
            if stream == ALERTS {
                c.alerts = pos;
            } else if let Some(h) = stream.strip_prefix("host:") {
                c.hosts.insert(h.to_owned(), pos);
            }
        }
        Ok(c)
    }

    /// Gives a new consumer that starts at the end its position now, before ingest starts,
    /// so that nothing stored after the start can be taken for the archive and skipped.
    pub async fn start_new_at_end(pool: &Arc<Pool>, consumer: &str) -> Result<(), StoreError> {
        let mut c = Cursors::load(pool, consumer).await?;
        if c.new {
            c.start_at_end(pool).await?;
        }
        Ok(())
    }

    pub fn host(&self, host_id: &str) -> u64 {
        self.hosts.get(host_id).copied().unwrap_or(0)
    }

    /// Stores the position of one host (after its records were delivered).
    pub async fn advance_host(
        &mut self,
        pool: &Arc<Pool>,
        host_id: &str,
        seq: u64,
    ) -> Result<(), StoreError> {
        let (consumer, stream) = (self.consumer.clone(), host_stream(host_id));
        pool.run(move |s| s.set_cursor(&consumer, &stream, seq))
            .await?;
        self.hosts.insert(host_id.to_owned(), seq);
        Ok(())
    }

    pub async fn advance_alerts(&mut self, pool: &Arc<Pool>, id: u64) -> Result<(), StoreError> {
        let consumer = self.consumer.clone();
        pool.run(move |s| s.set_cursor(&consumer, ALERTS, id))
            .await?;
        self.alerts = id;
        Ok(())
    }

    /// A new consumer that starts at the end: everything stored now counts as handled.
    pub async fn start_at_end(&mut self, pool: &Arc<Pool>) -> Result<(), StoreError> {
        let consumer = self.consumer.clone();
        let (heads, alerts) = pool
            .run(move |s| {
                let heads = s.heads()?;
                let mut last = 0;
                loop {
                    let page = s.alerts_after(last, 10_000)?;
                    match page.last() {
                        Some(a) => last = a.id,
                        None => break,
                    }
                }
                for h in &heads {
                    s.set_cursor(&consumer, &host_stream(&h.host_id), h.head_seq)?;
                }
                s.set_cursor(&consumer, ALERTS, last)?;
                Ok((heads, last))
            })
            .await?;
        for h in heads {
            self.hosts.insert(h.host_id, h.head_seq);
        }
        self.alerts = alerts;
        self.new = false;
        Ok(())
    }

    /// Records stored but not handled yet, over all hosts.
    pub fn lag(&self, heads: &[HostHead]) -> u64 {
        heads
            .iter()
            .map(|h| {
                h.head_seq
                    .saturating_sub(self.host(&h.host_id).max(h.anchor_seq))
            })
            .sum()
    }
}
