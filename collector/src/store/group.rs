//! Group commit: the batches of all streams that arrive while one commit runs are written by
//! the next one, in one transaction ([`Store::append_group`]). SQLite has one writer at a
//! time and syncs its WAL at every commit; written one by one, concurrent streams wait for
//! the write lock in turn and each pays a sync of its own (and rewrites the same index
//! pages). Every caller still gets its own outcome only after the transaction holding its
//! batch is durable.
//!
//! A stream may submit its next batch before the one before it is stored ([`Lane`]): then a
//! batch is waiting whenever a commit ends, and the writer never idles between groups while
//! the streams collect their acknowledgements. A group takes at most one batch per lane, in
//! the order they were submitted, and once a lane's batch is refused (a tamper alert) the
//! lane's later batches are answered without being written: they could only be verified
//! against a head that stopped before the refused records, and would raise a second, false
//! alert.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::oneshot;

use super::{Appended, Pool, StoreError};
use crate::verify::Prepared;

type Reply = oneshot::Sender<Result<Appended, String>>;

/// One stream's batches, in order. Refused once one of them was refused.
#[derive(Default)]
pub struct Lane {
    refused: AtomicBool,
}

struct Waiting {
    lane: Arc<Lane>,
    host_id: String,
    batch: Prepared,
    reply: Reply,
}

/// Batches waiting for a commit, and the right to commit.
#[derive(Default)]
pub struct GroupCommit {
    waiting: Mutex<Vec<Waiting>>,
    writer: tokio::sync::Mutex<()>,
}

/// A submitted batch: [`GroupCommit::wait`] for its outcome.
pub struct Pending {
    outcome: oneshot::Receiver<Result<Appended, String>>,
}

/// Said of the batches a lane submitted after one of its batches was refused.
pub const AFTER_REFUSAL: &str = "not stored: an earlier batch of this stream was refused";

impl GroupCommit {
    /// Queues `batch` behind the batches `lane` submitted before it. Returns at once.
    pub fn submit(&self, lane: &Arc<Lane>, host_id: String, batch: Prepared) -> Pending {
        let (reply, outcome) = oneshot::channel();
        self.lock_waiting().push(Waiting {
            lane: Arc::clone(lane),
            host_id,
            batch,
            reply,
        });
        Pending { outcome }
    }

    /// The outcome of a submitted batch, once the transaction holding it is durable. Writes
    /// groups (its own or others') whenever the write lock is free and it is not answered.
    pub async fn wait(&self, pool: &Arc<Pool>, pending: Pending) -> Result<Appended, StoreError> {
        let mut outcome = pending.outcome;
        loop {
            // Either a commit takes this batch along, or this caller gets to write and takes
            // whatever is waiting.
            let writer = tokio::select! {
                biased;
                done = &mut outcome => return finish(done.ok()),
                writer = self.writer.lock() => writer,
            };
            // The writer before may have taken this batch: it answers before it lets go.
            match outcome.try_recv() {
                Ok(done) => return finish(Some(done)),
                Err(oneshot::error::TryRecvError::Closed) => return finish(None),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            self.write_group(pool).await;
            drop(writer);
        }
    }

    /// Writes one group: the first waiting batch of every lane. Called with the write lock.
    async fn write_group(&self, pool: &Arc<Pool>) {
        let mut lanes: Vec<Arc<Lane>> = Vec::new();
        let mut replies = Vec::new();
        let mut batches: Vec<(String, Prepared)> = Vec::new();
        {
            let mut waiting = self.lock_waiting();
            let mut later = Vec::new();
            for w in std::mem::take(&mut *waiting) {
                if w.lane.refused.load(Ordering::Acquire) {
                    let _ = w.reply.send(Err(AFTER_REFUSAL.to_owned()));
                } else if lanes.iter().any(|l| Arc::ptr_eq(l, &w.lane)) {
                    later.push(w);
                } else {
                    lanes.push(w.lane);
                    replies.push(w.reply);
                    batches.push((w.host_id, w.batch));
                }
            }
            *waiting = later;
        }
        if batches.is_empty() {
            return;
        }
        match pool.run(move |s| s.append_group(batches)).await {
            Ok(appended) => {
                for ((reply, lane), a) in replies.into_iter().zip(lanes).zip(appended) {
                    if a.problem.is_some() {
                        lane.refused.store(true, Ordering::Release);
                    }
                    let _ = reply.send(Ok(a));
                }
            }
            Err(e) => {
                // Nothing of the group was stored; a lane's later batches would not continue
                // its head.
                let e = e.to_string();
                for (reply, lane) in replies.into_iter().zip(lanes) {
                    lane.refused.store(true, Ordering::Release);
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Vec<Waiting>> {
        // A panic while holding this lock leaves a plain Vec behind: still usable.
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The outcome sent to a caller (None: the commit that took its batch was abandoned).
fn finish(done: Option<Result<Appended, String>>) -> Result<Appended, StoreError> {
    match done {
        Some(result) => result.map_err(StoreError::Invalid),
        None => Err(StoreError::Invalid(
            "the commit of this batch was abandoned".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use phi_chain::{
        checkpoint::HostKey,
        seal::{Head, Sealer},
    };
    use phi_proto::v1::{Batch, Heartbeat, Record, SealedRecord, record::Event};

    use super::*;
    use crate::verify::prepare;

    /// The head `pool`'s store holds for `host`.
    async fn stored_head(pool: &Arc<Pool>, host: &str) -> Head {
        let host = host.to_owned();
        pool.run(move |s| s.host(&host))
            .await
            .expect("host")
            .expect("pinned")
            .head
    }

    fn batches(host: &str, n: usize, per: usize) -> Vec<Vec<SealedRecord>> {
        let mut sealer = Sealer::new(Head::EMPTY);
        (0..n)
            .map(|_| {
                (0..per)
                    .map(|_| {
                        sealer.seal(&mut Record {
                            host_id: host.into(),
                            event: Some(Event::Heartbeat(Heartbeat::default())),
                            ..Default::default()
                        })
                    })
                    .collect()
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_streams_are_each_answered_after_their_batch_is_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite:{}", dir.path().join("g.db").display());
        let pool = Pool::open_async(&url, 8).await.expect("pool");
        let hosts = ["h0", "h1", "h2", "h3", "h4", "h5"];
        for (i, h) in hosts.iter().enumerate() {
            let key = HostKey::from_secret([i as u8 + 1; 32]).public_key();
            let h = (*h).to_owned();
            pool.run(move |s| s.pin_host(&h, &key)).await.expect("pin");
        }
        let group = Arc::new(GroupCommit::default());
        let mut streams = Vec::new();
        for h in hosts {
            let (group, pool) = (Arc::clone(&group), Arc::clone(&pool));
            streams.push(tokio::spawn(async move {
                let lane = Arc::new(Lane::default());
                let mut heads = Vec::new();
                let mut all = batches(h, 20, 50);
                if h == "h5" {
                    // The last batch of this host skips a record.
                    all[19].remove(10);
                }
                for records in all {
                    let batch = prepare(Batch {
                        records,
                        checkpoints: vec![],
                    });
                    let pending = group.submit(&lane, h.to_owned(), batch);
                    let a = group.wait(&pool, pending).await.expect("stored");
                    // Answered only once stored: the store already holds this head.
                    assert_eq!(stored_head(&pool, h).await, a.head);
                    heads.push((a.head.seq, a.problem.map(|p| p.kind)));
                }
                heads
            }));
        }
        for (h, s) in hosts.iter().zip(streams) {
            let heads = s.await.expect("stream");
            let want: Vec<(u64, Option<String>)> = (1..=20)
                .map(|i| {
                    if *h == "h5" && i == 20 {
                        (960, Some("chain-break".to_owned()))
                    } else {
                        (i * 50, None)
                    }
                })
                .collect();
            assert_eq!(heads, want, "{h}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lane_is_written_in_order_and_nothing_after_a_refused_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite:{}", dir.path().join("l.db").display());
        let pool = Pool::open_async(&url, 4).await.expect("pool");
        let key = HostKey::from_secret([9; 32]).public_key();
        pool.run(move |s| s.pin_host("h", &key)).await.expect("pin");
        let group = GroupCommit::default();
        let lane = Arc::new(Lane::default());
        let mut all = batches("h", 6, 10);
        // Batch 3 (records 31..40) has a record whose body was edited after sealing.
        all[3][4].body.push(0);
        // Everything is submitted before anything is written: groups take one batch of the
        // lane at a time, in order.
        let pending: Vec<Pending> = all
            .into_iter()
            .map(|records| {
                let batch = prepare(Batch {
                    records,
                    checkpoints: vec![],
                });
                group.submit(&lane, "h".to_owned(), batch)
            })
            .collect();
        let mut outcomes = Vec::new();
        for p in pending {
            outcomes.push(match group.wait(&pool, p).await {
                Ok(a) => Ok((a.head.seq, a.records, a.problem.map(|p| p.kind))),
                Err(e) => Err(e.to_string()),
            });
        }
        assert_eq!(
            outcomes,
            vec![
                Ok((10, 10, None)),
                Ok((20, 10, None)),
                Ok((30, 10, None)),
                Ok((34, 4, Some("chain-break".to_owned()))),
                Err(AFTER_REFUSAL.to_owned()),
                Err(AFTER_REFUSAL.to_owned()),
            ]
        );
        // One alert, for the edited record; the batches after it were not verified against
        // a head that stops before it (which would have raised a second, false alert).
        let alerts = pool.run(|s| s.alerts(Some("h"))).await.expect("alerts");
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].alert.seq, Some(35));
        assert_eq!(stored_head(&pool, "h").await.seq, 34);
        // Another lane (the agent's next connection) continues from the stored head.
        let lane = Arc::new(Lane::default());
        let rest = batches("h", 6, 10);
        let mut resent: Vec<SealedRecord> = rest.into_iter().flatten().skip(34).collect();
        let tail = resent.split_off(16);
        for records in [resent, tail] {
            let batch = prepare(Batch {
                records,
                checkpoints: vec![],
            });
            let p = group.submit(&lane, "h".to_owned(), batch);
            let a = group.wait(&pool, p).await.expect("stored");
            assert!(a.problem.is_none(), "{:?}", a.problem);
        }
        assert_eq!(stored_head(&pool, "h").await.seq, 60);
    }
}
