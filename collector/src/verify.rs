//! Verification of chains: each batch on arrival ([`verify_batch`]), and everything a store
//! holds for a host ([`verify_chain`], behind `phictl verify`), which names the first bad seq
//! and what is wrong with it.

use std::collections::BTreeMap;

use phi_chain::{
    checkpoint,
    seal::{GENESIS, Head, LinkError, check_hash, check_link, continues, head_of, link_hash},
};
use phi_proto::v1::{Batch, Checkpoint, Problem, Record, SealedRecord, VerifyReport};
use prost::Message as _;

use crate::store::{
    Alert, HostState, Store, StoreError,
    index::{self, Columns},
};

/// Problems listed in a report at most (the first is what matters; the count says more).
const MAX_PROBLEMS: usize = 50;
/// Records read per page.
const PAGE: usize = 10_000;

/// A record the batch check accepted: its sealed bytes, the decoded record and what the
/// store indexes of it.
#[derive(Debug)]
pub struct Accepted {
    pub sealed: SealedRecord,
    pub record: Record,
    pub columns: Columns,
}

/// The outcome of checking one batch against a host's chain.
#[derive(Debug, Default)]
pub struct Verified {
    /// New records, in order, each continuing the one before.
    pub records: Vec<Accepted>,
    pub checkpoints: Vec<Checkpoint>,
    pub head: Head,
    /// The first thing that must not be accepted, if any (everything before it is fine).
    pub problem: Option<Alert>,
}

pub(crate) fn alert(
    host_id: &str,
    kind: &str,
    seq: Option<u64>,
    detail: String,
    evidence: Vec<u8>,
) -> Alert {
    Alert {
        host_id: host_id.to_owned(),
        kind: kind.to_owned(),
        seq,
        detail,
        evidence,
    }
}

/// What can be learnt of a sealed record without the chain it joins: the decoded body, whether
/// the hash is SHA-256 of the `prev_hash` the body states and the body, and the query columns.
#[derive(Debug)]
struct Decoded {
    record: Record,
    /// `hash == SHA-256(record.prev_hash ‖ body)`.
    self_linked: bool,
    columns: Columns,
}

/// One entry of a [`Prepared`] batch.
#[derive(Debug)]
struct PreparedRecord {
    sealed: SealedRecord,
    /// None when the body does not decode.
    decoded: Option<Decoded>,
}

/// A batch with the work that does not depend on the stored chain done: every body decoded
/// and hashed, every record's query columns derived. [`verify_prepared`] then checks it
/// against the chain head, which is cheap, so that a store holds its write lock only for that
/// and the writes. Hashing and decoding run on several threads for large batches.
#[derive(Debug, Default)]
pub struct Prepared {
    records: Vec<PreparedRecord>,
    checkpoints: Vec<Checkpoint>,
}

/// Below this many records a batch is prepared on the calling thread.
const PARALLEL_FROM: usize = 64;

fn decode_one(sealed: SealedRecord) -> PreparedRecord {
    let decoded = Record::decode(sealed.body.as_slice())
        .ok()
        .map(|record| Decoded {
            self_linked: link_hash(&record.prev_hash, &sealed.body).as_slice()
                == sealed.hash.as_slice(),
            columns: index::columns(&record),
            record,
        });
    PreparedRecord { sealed, decoded }
}

/// Decodes and hashes every record of `batch` (see [`Prepared`]).
pub fn prepare(batch: Batch) -> Prepared {
    let Batch {
        records,
        checkpoints,
    } = batch;
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let records = if threads < 2 || records.len() < PARALLEL_FROM {
        records.into_iter().map(decode_one).collect()
    } else {
        let per = records.len().div_ceil(threads);
        let mut chunks: Vec<Vec<SealedRecord>> = Vec::with_capacity(threads);
        let mut rest = records.into_iter();
        loop {
            let chunk: Vec<SealedRecord> = rest.by_ref().take(per).collect();
            if chunk.is_empty() {
                break;
            }
            chunks.push(chunk);
        }
        let mut first = chunks.remove(0);
        std::thread::scope(|s| {
            let others: Vec<_> = chunks
                .into_iter()
                .map(|c| s.spawn(move || c.into_iter().map(decode_one).collect::<Vec<_>>()))
                .collect();
            let mut out: Vec<PreparedRecord> = first.drain(..).map(decode_one).collect();
            for o in others {
                match o.join() {
                    Ok(part) => out.extend(part),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            out
        })
    };
    Prepared {
        records,
        checkpoints,
    }
}

/// Checks a batch against the host's chain. `stored_hash` answers for records already
/// stored (duplicates must match them exactly).
pub fn verify_batch(
    host_id: &str,
    state: &HostState,
    batch: Batch,
    stored_hash: impl FnMut(u64) -> Option<Vec<u8>>,
) -> Verified {
    verify_prepared(host_id, state, prepare(batch), stored_hash)
}

/// [`verify_batch`] for a batch already [`prepare`]d: every record must continue the chain
/// (seq, `prev_hash` and hash against the head, decoded body), every checkpoint must verify.
pub fn verify_prepared(
    host_id: &str,
    state: &HostState,
    batch: Prepared,
    mut stored_hash: impl FnMut(u64) -> Option<Vec<u8>>,
) -> Verified {
    let mut out = Verified {
        head: state.head,
        ..Default::default()
    };
    for PreparedRecord { sealed, decoded } in batch.records {
        let seq = sealed.seq;
        if seq <= out.head.seq {
            let known = out
                .records
                .iter()
                .find(|a| a.sealed.seq == seq)
                .map(|a| a.sealed.hash.clone())
                .or_else(|| stored_hash(seq));
            if known.as_deref() != Some(sealed.hash.as_slice()) {
                out.problem = Some(alert(
                    host_id,
                    "fork",
                    Some(seq),
                    format!("seq {seq} is already stored with a different hash"),
                    sealed.encode_to_vec(),
                ));
                return out;
            }
            continue;
        }
        // The full check (which hashes again) only for what the prepared hash cannot accept;
        // it names the failure.
        let linked = match decoded {
            Some(d) if continues(out.head, &sealed, &d.record, d.self_linked) => {
                Ok((d.record, d.columns))
            }
            _ => check_link(out.head, &sealed).map(|record| {
                let columns = index::columns(&record);
                (record, columns)
            }),
        };
        match linked {
            Ok((record, _)) if record.host_id != host_id => {
                out.problem = Some(alert(
                    host_id,
                    "chain-break",
                    Some(seq),
                    format!("seq {seq} names host {:?}", record.host_id),
                    sealed.encode_to_vec(),
                ));
                return out;
            }
            Ok((record, columns)) => {
                out.head = head_of(&sealed);
                out.records.push(Accepted {
                    sealed,
                    record,
                    columns,
                });
            }
            Err(e) => {
                out.problem = Some(alert(
                    host_id,
                    "chain-break",
                    Some(seq),
                    e.to_string(),
                    sealed.encode_to_vec(),
                ));
                return out;
            }
        }
    }
    let mut prev_seq = state.checkpoint_seq;
    let mut prev_sig = state.checkpoint_sig.clone();
    for cp in batch.checkpoints {
        if cp.seq <= prev_seq {
            continue;
        }
        let problem = if cp.host_id != host_id {
            Some(format!(
                "checkpoint at seq {} names host {:?}",
                cp.seq, cp.host_id
            ))
        } else if cp.seq > out.head.seq {
            Some(format!(
                "checkpoint at seq {} is ahead of the chain (seq {})",
                cp.seq, out.head.seq
            ))
        } else if let Err(e) = checkpoint::verify(&cp, &state.public_key, &prev_sig) {
            Some(e.to_string())
        } else {
            let at = out
                .records
                .iter()
                .find(|a| a.sealed.seq == cp.seq)
                .map(|a| a.sealed.hash.clone())
                .or_else(|| stored_hash(cp.seq));
            (at.as_deref() != Some(cp.head_hash.as_slice())).then(|| {
                format!(
                    "checkpoint at seq {} signs a head hash the chain does not have",
                    cp.seq
                )
            })
        };
        if let Some(detail) = problem {
            out.problem = Some(alert(
                host_id,
                "checkpoint",
                Some(cp.seq),
                detail,
                cp.encode_to_vec(),
            ));
            return out;
        }
        prev_seq = cp.seq;
        prev_sig.clone_from(&cp.signature);
        out.checkpoints.push(cp);
    }
    out
}

fn problem(seq: u64, seq_end: u64, kind: &str, detail: String) -> Problem {
    Problem {
        seq,
        seq_end,
        kind: kind.into(),
        detail,
    }
}

/// Re-verifies everything stored for `host_id`: record links and hashes, the order and
/// completeness of seqs, every checkpoint signature (with the key pinned at first contact)
/// and that each checkpoint signs the stored record at its seq. `progress(done, total)` is
/// called as records are checked.
///
/// What each kind of tampering looks like:
/// - a changed record: its hash no longer matches its bytes (`altered`);
/// - a deleted record: a missing seq (`missing`);
/// - swapped or reordered rows: a body that names another seq (`order`);
/// - dropped newest rows: the chain ends before the acknowledged head or a checkpoint
///   (`truncated`);
/// - a rewritten range with recomputed hashes: links hold, but the next checkpoint's signed
///   head hash differs from the stored record's (`checkpoint`), naming the range between
///   the last good checkpoint and that one.
pub fn verify_chain(
    store: &mut dyn Store,
    host_id: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<VerifyReport, StoreError> {
    let Some(info) = store.host_info(host_id)? else {
        return Err(StoreError::Invalid(format!(
            "no host {host_id:?} in this store (phictl hosts lists them)"
        )));
    };
    let mut report = VerifyReport {
        host_id: host_id.to_owned(),
        key_id: checkpoint::key_id(&info.public_key),
        pruned_through: info.anchor_seq,
        alerts: info.alerts,
        ..Default::default()
    };
    let mut problems: Vec<Problem> = Vec::new();
    let push = |problems: &mut Vec<Problem>, p: Problem| {
        if problems.len() < MAX_PROBLEMS {
            problems.push(p);
        }
    };

    // Checkpoints first (one per thousand records or minute: few), decoded and verified in
    // their own chain.
    let mut checkpoints: BTreeMap<u64, Checkpoint> = BTreeMap::new();
    let mut prev_sig: Option<Vec<u8>> = None;
    for (seq, body) in store.checkpoints(host_id, info.anchor_seq, u64::MAX)? {
        let cp = match Checkpoint::decode(body.as_slice()) {
            Ok(cp) if cp.seq == seq && cp.host_id == host_id => cp,
            Ok(cp) => {
                push(
                    &mut problems,
                    problem(
                        seq,
                        seq,
                        "checkpoint",
                        format!(
                            "the checkpoint stored at seq {seq} is for {:?} seq {}",
                            cp.host_id, cp.seq
                        ),
                    ),
                );
                continue;
            }
            Err(e) => {
                push(
                    &mut problems,
                    problem(
                        seq,
                        seq,
                        "decode",
                        format!("the checkpoint at seq {seq} does not decode: {e}"),
                    ),
                );
                continue;
            }
        };
        // The anchor left by retention starts the checkpoint chain: what it links back to
        // was removed with the records.
        let expected_prev = prev_sig.clone().unwrap_or_else(|| {
            if info.anchor_seq > 0 && seq == info.anchor_seq {
                cp.prev_signature.clone()
            } else {
                Vec::new()
            }
        });
        match checkpoint::verify(&cp, &info.public_key, &expected_prev) {
            Ok(()) => {}
            Err(e) => push(
                &mut problems,
                problem(seq, seq, "checkpoint", format!("{e}")),
            ),
        }
        prev_sig = Some(cp.signature.clone());
        checkpoints.insert(seq, cp);
    }
    report.checkpoints = checkpoints.len() as u64;

    // The anchor: where the stored chain starts.
    let mut prev = if info.anchor_seq == 0 {
        Head::EMPTY
    } else {
        match checkpoints.get(&info.anchor_seq) {
            Some(cp) if cp.head_hash.len() == 32 => {
                let mut hash = GENESIS;
                hash.copy_from_slice(&cp.head_hash);
                Head {
                    seq: info.anchor_seq,
                    hash,
                }
            }
            _ => {
                push(
                    &mut problems,
                    problem(
                        info.anchor_seq,
                        info.anchor_seq,
                        "checkpoint",
                        format!(
                            "records through seq {} were pruned, but the checkpoint that \
                             anchors what remains is missing",
                            info.anchor_seq
                        ),
                    ),
                );
                Head {
                    seq: info.anchor_seq,
                    hash: GENESIS,
                }
            }
        }
    };
    let total = info.head_seq.saturating_sub(info.anchor_seq);
    let mut last_good_checkpoint = info.anchor_seq;
    let mut signed_through = info.anchor_seq;
    let mut done = 0u64;
    let mut first = None;
    let mut after = info.anchor_seq;
    loop {
        let rows = store.chain(host_id, after, PAGE)?;
        let Some(last) = rows.last() else { break };
        after = last.seq;
        for row in rows {
            first.get_or_insert(row.seq);
            let seq = row.seq;
            if seq != prev.seq + 1 {
                push(
                    &mut problems,
                    problem(
                        prev.seq + 1,
                        seq - 1,
                        "missing",
                        if seq == prev.seq + 2 {
                            format!("record {} is missing", prev.seq + 1)
                        } else {
                            format!("records {} to {} are missing", prev.seq + 1, seq - 1)
                        },
                    ),
                );
            }
            let sealed = SealedRecord {
                seq,
                body: row.body,
                hash: row.hash.clone(),
            };
            // After a gap the previous hash is unknown: check the row against the link it
            // states itself, so that the damage is named once, as missing records.
            let link = if seq == prev.seq + 1 {
                prev.hash.to_vec()
            } else {
                Record::decode(sealed.body.as_slice())
                    .map(|r| r.prev_hash)
                    .unwrap_or_default()
            };
            match check_hash(&link, &sealed) {
                Ok(record) if record.host_id != host_id => push(
                    &mut problems,
                    problem(
                        seq,
                        seq,
                        "host",
                        format!("record {seq} names host {:?}", record.host_id),
                    ),
                ),
                Ok(_) => {}
                Err(e) => {
                    let (kind, detail) = describe(&e, seq, &sealed);
                    push(&mut problems, problem(seq, seq, kind, detail));
                }
            }
            if let Some(cp) = checkpoints.get(&seq) {
                if cp.head_hash == row.hash {
                    if problems.is_empty() {
                        signed_through = seq;
                    }
                    last_good_checkpoint = seq;
                } else {
                    push(
                        &mut problems,
                        problem(
                            last_good_checkpoint + 1,
                            seq,
                            "checkpoint",
                            format!(
                                "the checkpoint signed at seq {seq} does not match the stored \
                                 record {seq}: records {} to {seq} were rewritten after they \
                                 were signed",
                                last_good_checkpoint + 1
                            ),
                        ),
                    );
                    last_good_checkpoint = seq;
                }
            }
            // Continue from the stored hash so that later, independent damage is found too.
            prev = head_of(&SealedRecord {
                seq,
                body: Vec::new(),
                hash: row.hash,
            });
            done += 1;
            report.records += 1;
        }
        progress(done, total);
    }
    report.first_seq = first.unwrap_or(0);
    report.last_seq = prev.seq;

    // Truncation: the chain must reach the acknowledged head and every checkpoint.
    let newest_checkpoint = checkpoints.keys().next_back().copied().unwrap_or(0);
    let must_reach = info.head_seq.max(newest_checkpoint);
    if prev.seq < must_reach {
        let why = if newest_checkpoint > prev.seq {
            format!("a checkpoint signed seq {newest_checkpoint}")
        } else {
            format!("the collector acknowledged through seq {}", info.head_seq)
        };
        push(
            &mut problems,
            problem(
                prev.seq + 1,
                must_reach,
                "truncated",
                format!(
                    "the stored chain ends at seq {} but {why}: records {} to {must_reach} are \
                     missing",
                    prev.seq,
                    prev.seq + 1
                ),
            ),
        );
    } else if info.head_seq == prev.seq && info.head_seq > 0 && info.head_hash != prev.hash {
        push(
            &mut problems,
            problem(
                prev.seq,
                prev.seq,
                "altered",
                format!(
                    "record {} differs from the head the collector acknowledged",
                    prev.seq
                ),
            ),
        );
    }
    problems.sort_by_key(|p| (p.seq, p.seq_end));
    report.signed_through = signed_through;
    if signed_through < report.last_seq && problems.is_empty() {
        report.notes.push(format!(
            "records {} to {} are hash-linked but not yet covered by a signed checkpoint",
            signed_through + 1,
            report.last_seq
        ));
    }
    if info.anchor_seq > 0 {
        report.notes.push(format!(
            "records through seq {} were removed by retention; the checkpoint at seq {} \
             anchors what remains",
            info.anchor_seq, info.anchor_seq
        ));
    }
    if info.alerts > 0 {
        report.notes.push(format!(
            "{} tamper alert(s) were raised at ingest (phictl alerts --host {host_id})",
            info.alerts
        ));
    }
    report.ok = problems.is_empty();
    report.problems = problems;
    Ok(report)
}

/// What a failed link says about the stored row.
fn describe(e: &LinkError, seq: u64, sealed: &SealedRecord) -> (&'static str, String) {
    match e {
        LinkError::Hash { .. } => {
            // A row moved from elsewhere still hashes to its own value; an edited one does
            // not. Either way the bytes at this seq are not what was acknowledged.
            let body_seq = Record::decode(sealed.body.as_slice()).map(|r| r.seq).ok();
            match body_seq {
                Some(s) if s != seq => (
                    "order",
                    format!("the record stored at seq {seq} is record {s}: rows were moved"),
                ),
                _ => (
                    "altered",
                    format!("record {seq} was changed: its bytes do not match its hash"),
                ),
            }
        }
        LinkError::BodySeq { body_seq, .. } => (
            "order",
            format!("the record stored at seq {seq} is record {body_seq}: rows were moved"),
        ),
        LinkError::PrevHash { .. } => (
            "link",
            format!(
                "record {seq} does not link to record {}",
                seq.saturating_sub(1)
            ),
        ),
        LinkError::Body { reason, .. } => {
            ("decode", format!("record {seq} does not decode: {reason}"))
        }
        other => ("altered", format!("record {seq}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use phi_chain::{checkpoint::HostKey, seal::Sealer};
    use phi_proto::v1::{Heartbeat, record::Event};

    use super::*;

    fn chain(n: u64, host: &str) -> (Vec<SealedRecord>, Sealer) {
        let mut sealer = Sealer::new(Head::EMPTY);
        let recs = (0..n)
            .map(|_| {
                sealer.seal(&mut Record {
                    host_id: host.into(),
                    event: Some(Event::Heartbeat(Heartbeat::default())),
                    ..Default::default()
                })
            })
            .collect();
        (recs, sealer)
    }

    fn state(key: &HostKey) -> HostState {
        HostState {
            public_key: key.public_key().to_vec(),
            head: Head::EMPTY,
            checkpoint_seq: 0,
            checkpoint_sig: Vec::new(),
        }
    }

    #[test]
    fn accepts_a_chain_with_its_checkpoint() {
        let key = HostKey::from_secret([1; 32]);
        let (recs, sealer) = chain(3, "h");
        let head = sealer.head();
        let cp = key.checkpoint(
            "h",
            "b",
            3,
            &head.hash,
            phi_proto::Timestamp::default(),
            &[],
        );
        let v = verify_batch(
            "h",
            &state(&key),
            Batch {
                records: recs,
                checkpoints: vec![cp],
            },
            |_| None,
        );
        assert!(v.problem.is_none(), "{:?}", v.problem);
        assert_eq!(v.records.len(), 3);
        assert_eq!(v.checkpoints.len(), 1);
        assert_eq!(v.head, head);
    }

    #[test]
    fn a_record_hashed_over_another_prev_hash_than_the_head_is_refused() {
        let key = HostKey::from_secret([1; 32]);
        let (mut recs, _) = chain(3, "h");
        // Record 2 rebuilt by someone who does not know record 1's hash: its body states
        // another prev_hash, and its hash is right for that prev_hash and body.
        let mut forged = Record::decode(recs[1].body.as_slice()).expect("decodes");
        forged.prev_hash = vec![7; 32];
        recs[1].body = forged.encode_to_vec();
        recs[1].hash = link_hash(&forged.prev_hash, &recs[1].body).to_vec();
        // Large enough to be prepared on several threads.
        let mut long = chain(200, "h").0;
        long[150] = recs[1].clone();
        long[150].seq = 151;
        let mut at_151 = Record::decode(long[150].body.as_slice()).expect("decodes");
        at_151.seq = 151;
        long[150].body = at_151.encode_to_vec();
        long[150].hash = link_hash(&at_151.prev_hash, &long[150].body).to_vec();
        for (records, good) in [(recs, 1), (long, 150)] {
            // What the full link check says about the forged record.
            let expected = check_link(head_of(&records[good - 1]), &records[good])
                .expect_err("the link is broken")
                .to_string();
            let v = verify_batch(
                "h",
                &state(&key),
                Batch {
                    records,
                    checkpoints: vec![],
                },
                |_| None,
            );
            assert_eq!(v.records.len(), good, "the valid prefix is kept");
            let p = v.problem.expect("refused");
            assert_eq!(p.kind, "chain-break");
            assert_eq!(p.seq, Some(good as u64 + 1));
            assert_eq!(p.detail, expected);
        }
    }

    #[test]
    fn a_long_batch_is_checked_record_by_record_in_order() {
        let key = HostKey::from_secret([1; 32]);
        let (recs, sealer) = chain(1000, "h");
        let v = verify_batch(
            "h",
            &state(&key),
            Batch {
                records: recs.clone(),
                checkpoints: vec![],
            },
            |_| None,
        );
        assert!(v.problem.is_none(), "{:?}", v.problem);
        assert_eq!(v.head, sealer.head());
        let seqs: Vec<u64> = v.records.iter().map(|a| a.sealed.seq).collect();
        assert_eq!(seqs, (1..=1000).collect::<Vec<_>>());
        assert!(v.records.iter().all(|a| a.record.seq == a.sealed.seq));
        assert_eq!(v.records[0].columns.kind, "heartbeat");

        let mut edited = recs;
        edited[700].body[3] ^= 1;
        let v = verify_batch(
            "h",
            &state(&key),
            Batch {
                records: edited,
                checkpoints: vec![],
            },
            |_| None,
        );
        assert_eq!(v.records.len(), 700);
        assert_eq!(
            v.problem.map(|p| (p.kind, p.seq)),
            Some(("chain-break".into(), Some(701)))
        );
    }

    #[test]
    fn names_breaks_forks_and_bad_checkpoints() {
        let key = HostKey::from_secret([1; 32]);
        let (mut recs, _) = chain(3, "h");
        recs.remove(1);
        let v = verify_batch(
            "h",
            &state(&key),
            Batch {
                records: recs,
                checkpoints: vec![],
            },
            |_| None,
        );
        assert_eq!(v.records.len(), 1, "the valid prefix is kept");
        assert_eq!(
            v.problem.as_ref().map(|p| p.kind.as_str()),
            Some("chain-break")
        );

        let (recs, sealer) = chain(2, "h");
        let mut st = state(&key);
        st.head = sealer.head();
        let v = verify_batch(
            "h",
            &st,
            Batch {
                records: recs.clone(),
                checkpoints: vec![],
            },
            |seq| (seq == 1).then(|| vec![0; 32]),
        );
        assert_eq!(v.problem.as_ref().map(|p| p.kind.as_str()), Some("fork"));

        let other = HostKey::from_secret([2; 32]);
        let (recs, sealer) = chain(2, "h");
        let cp = other.checkpoint("h", "b", 2, &sealer.head().hash, Default::default(), &[]);
        let v = verify_batch(
            "h",
            &state(&key),
            Batch {
                records: recs,
                checkpoints: vec![cp],
            },
            |_| None,
        );
        assert_eq!(
            v.problem.as_ref().map(|p| p.kind.as_str()),
            Some("checkpoint")
        );

        let (recs, _) = chain(1, "other-host");
        let v = verify_batch(
            "h",
            &state(&key),
            Batch {
                records: recs,
                checkpoints: vec![],
            },
            |_| None,
        );
        assert!(
            v.problem.is_some(),
            "a record naming another host is refused"
        );
    }
}
