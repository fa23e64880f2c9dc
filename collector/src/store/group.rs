//! Group commit: the batches of all streams that arrive while one commit runs are written by
//! the next one, in one transaction ([`Store::append_group`]). SQLite has one writer at a
//! time and syncs its WAL at every commit; written one by one, concurrent streams wait for
//! the write lock in turn and each pays a sync of its own (and rewrites the same index
//! pages). Every caller still gets its own outcome only after the transaction holding its
//! batch is durable.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{Appended, Pool, StoreError};
use crate::verify::Prepared;

type Reply = oneshot::Sender<Result<Appended, String>>;

/// Batches waiting for a commit, and the right to commit.
#[derive(Default)]
pub struct GroupCommit {
    waiting: Mutex<Vec<(String, Prepared, Reply)>>,
    writer: tokio::sync::Mutex<()>,
}

impl GroupCommit {
    /// Verifies and durably appends `batch` for `host_id`, together with whatever else is
    /// waiting when the write lock comes free.
    pub async fn append(
        &self,
        pool: &Arc<Pool>,
        host_id: String,
        batch: Prepared,
    ) -> Result<Appended, StoreError> {
        let (reply, mut outcome) = oneshot::channel();
        self.lock_waiting().push((host_id, batch, reply));
        // Either the commit running now (or the next one) takes this batch along, or this
        // caller gets to write and takes whatever is waiting, this batch included.
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
        let group = std::mem::take(&mut *self.lock_waiting());
        let mut replies = Vec::with_capacity(group.len());
        let batches: Vec<(String, Prepared)> = group
            .into_iter()
            .map(|(host, batch, reply)| {
                replies.push(reply);
                (host, batch)
            })
            .collect();
        match pool.run(move |s| s.append_group(batches)).await {
            Ok(appended) => {
                for (reply, a) in replies.into_iter().zip(appended) {
                    let _ = reply.send(Ok(a));
                }
            }
            Err(e) => {
                let e = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
        drop(writer);
        finish(outcome.await.ok())
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Vec<(String, Prepared, Reply)>> {
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
                    let a = group
                        .append(&pool, h.to_owned(), batch)
                        .await
                        .expect("stored");
                    // Answered only once stored: the store already holds this head.
                    let name = h.to_owned();
                    let stored = pool
                        .run(move |s| s.host(&name))
                        .await
                        .expect("host")
                        .expect("pinned");
                    assert_eq!(stored.head, a.head);
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
}
