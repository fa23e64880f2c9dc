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
        let (reply, outcome) = oneshot::channel();
        self.lock_waiting().push((host_id, batch, reply));
        {
            let _writer = self.writer.lock().await;
            // Another caller may have committed this batch already; then the group is empty
            // or holds batches that came later.
            let group = std::mem::take(&mut *self.lock_waiting());
            if !group.is_empty() {
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
            }
        }
        match outcome.await {
            Ok(result) => result.map_err(StoreError::Invalid),
            Err(_) => Err(StoreError::Invalid(
                "the commit of this batch was abandoned".into(),
            )),
        }
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Vec<(String, Prepared, Reply)>> {
        // A panic while holding this lock leaves a plain Vec behind: still usable.
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
