//! Sealing records into the per-host hash chain, and checking links.
//!
//! `body` = canonical encoding of the Record with `seq` and `prev_hash` set and `hash` empty;
//! `hash` = SHA-256(prev_hash ‖ body). The genesis `prev_hash` is 32 zero bytes. Receivers
//! hash the bytes they received, never a re-encoding, so a newer agent's records verify on an
//! older collector. See docs/chain.md.

use phi_proto::v1::{Record, SealedRecord};
use prost::Message as _;
use sha2::{Digest as _, Sha256};

/// The `prev_hash` of a chain's first record.
pub const GENESIS: [u8; 32] = [0; 32];

/// SHA-256(prev_hash ‖ body).
pub fn link_hash(prev_hash: &[u8], body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev_hash);
    h.update(body);
    h.finalize().into()
}

/// Where a chain ends: the last seq and its hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl Default for Head {
    fn default() -> Self {
        Head::EMPTY
    }
}

impl Head {
    /// An empty chain: the first record gets seq 1.
    pub const EMPTY: Head = Head {
        seq: 0,
        hash: GENESIS,
    };
}

/// Appends records to a chain.
#[derive(Clone, Debug)]
pub struct Sealer {
    head: Head,
}

impl Sealer {
    pub fn new(head: Head) -> Self {
        Sealer { head }
    }

    pub fn head(&self) -> Head {
        self.head
    }

    /// Numbers `record`, links it to the chain and returns it sealed. `record` is left with
    /// its seq, prev_hash and hash set.
    pub fn seal(&mut self, record: &mut Record) -> SealedRecord {
        self.seal_with_process(record, &[])
    }

    /// [`Sealer::seal`] for a record whose `process` is given already encoded: `process` is
    /// the whole field (key, length, message: see [`process_field`]) and `record.process`
    /// must be `None`. The body is the canonical encoding of the record with that process,
    /// byte for byte what `seal` gives for it; a context shared by many records is encoded
    /// once for all of them.
    pub fn seal_with_process(&mut self, record: &mut Record, process: &[u8]) -> SealedRecord {
        debug_assert!(record.process.is_none() || process.is_empty());
        let seq = self.head.seq + 1;
        record.seq = seq;
        record.prev_hash = self.head.hash.to_vec();
        record.hash.clear();
        let rest = record.encode_to_vec();
        let body = if process.is_empty() {
            rest
        } else {
            insert_field(&rest, PROCESS_FIELD, process)
        };
        let hash = link_hash(&self.head.hash, &body);
        record.hash = hash.to_vec();
        self.head = Head { seq, hash };
        SealedRecord {
            seq,
            body,
            hash: hash.to_vec(),
        }
    }
}

/// Field number of `Record.process`.
const PROCESS_FIELD: u32 = 7;

/// `Record.process` as encoded inside a record: key, length, message.
pub fn process_field(process: &phi_proto::v1::Process) -> Vec<u8> {
    let mut out = Vec::with_capacity(process.encoded_len() + 4);
    prost::encoding::message::encode(PROCESS_FIELD, process, &mut out);
    out
}

/// `encoded` (a canonical message without field `number`) with `field` (that field, encoded
/// whole) put where canonical order has it: before the first field with a higher number.
fn insert_field(encoded: &[u8], number: u32, field: &[u8]) -> Vec<u8> {
    let at = first_field_after(encoded, number).unwrap_or(encoded.len());
    let mut out = Vec::with_capacity(encoded.len() + field.len());
    out.extend_from_slice(&encoded[..at]);
    out.extend_from_slice(field);
    out.extend_from_slice(&encoded[at..]);
    out
}

/// Offset of the first top-level field numbered above `number`; `None` when there is none
/// or the bytes do not parse (the field then goes last).
fn first_field_after(mut buf: &[u8], number: u32) -> Option<usize> {
    use prost::encoding::{WireType, decode_key, decode_varint};
    let total = buf.len();
    while !buf.is_empty() {
        let at = total - buf.len();
        let (tag, wire) = decode_key(&mut buf).ok()?;
        if tag > number {
            return Some(at);
        }
        let skip = match wire {
            WireType::Varint => {
                decode_varint(&mut buf).ok()?;
                0
            }
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => usize::try_from(decode_varint(&mut buf).ok()?).ok()?,
            WireType::StartGroup | WireType::EndGroup => return None,
        };
        buf = buf.get(skip..)?;
    }
    None
}

/// Why a sealed record does not continue a chain.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("seq {got} does not follow {expected_prev}")]
    Sequence { expected_prev: u64, got: u64 },
    #[error("seq {seq}: hash does not match SHA-256(prev_hash ‖ body)")]
    Hash { seq: u64 },
    #[error("seq {seq}: the body is not a record ({reason})")]
    Body { seq: u64, reason: String },
    #[error("seq {seq}: the body says seq {body_seq}")]
    BodySeq { seq: u64, body_seq: u64 },
    #[error("seq {seq}: the body's prev_hash is not the chain's previous hash")]
    PrevHash { seq: u64 },
    #[error("seq {seq}: the body carries a hash (it must be empty)")]
    BodyHash { seq: u64 },
}

/// Checks that `sealed` continues the chain ending at `prev`; returns the decoded record.
pub fn check_link(prev: Head, sealed: &SealedRecord) -> Result<Record, LinkError> {
    if sealed.seq != prev.seq + 1 {
        return Err(LinkError::Sequence {
            expected_prev: prev.seq,
            got: sealed.seq,
        });
    }
    check_hash(&prev.hash, sealed)
}

/// Whether `sealed` continues the chain ending at `prev`, given its body already decoded
/// (`record`) and whether its hash is SHA-256 of the `prev_hash` that body states and the body
/// (`self_linked`, computed without the chain, e.g. on another thread). Accepts exactly what
/// [`check_link`] accepts: with the body's `prev_hash` equal to the head's hash, that hash is
/// SHA-256 of the head's hash and the body. Use [`check_link`] to name a failure.
pub fn continues(prev: Head, sealed: &SealedRecord, record: &Record, self_linked: bool) -> bool {
    sealed.seq == prev.seq + 1
        && self_linked
        && record.seq == sealed.seq
        && record.prev_hash == prev.hash
        && record.hash.is_empty()
}

/// Checks `sealed`'s hash and body against `prev_hash` (without checking its seq against a
/// head); returns the decoded record.
pub fn check_hash(prev_hash: &[u8], sealed: &SealedRecord) -> Result<Record, LinkError> {
    let seq = sealed.seq;
    if link_hash(prev_hash, &sealed.body).as_slice() != sealed.hash.as_slice() {
        return Err(LinkError::Hash { seq });
    }
    let record = Record::decode(sealed.body.as_slice()).map_err(|e| LinkError::Body {
        seq,
        reason: e.to_string(),
    })?;
    if record.seq != seq {
        return Err(LinkError::BodySeq {
            seq,
            body_seq: record.seq,
        });
    }
    if record.prev_hash != prev_hash {
        return Err(LinkError::PrevHash { seq });
    }
    if !record.hash.is_empty() {
        return Err(LinkError::BodyHash { seq });
    }
    Ok(record)
}

/// The head after `sealed` (assumed checked).
pub fn head_of(sealed: &SealedRecord) -> Head {
    let mut hash = [0u8; 32];
    if sealed.hash.len() == 32 {
        hash.copy_from_slice(&sealed.hash);
    }
    Head {
        seq: sealed.seq,
        hash,
    }
}

#[cfg(test)]
mod tests {
    use phi_proto::v1::{Heartbeat, record::Event};

    use super::*;

    fn rec(n: u64) -> Record {
        Record {
            host_id: "h".into(),
            event: Some(Event::Heartbeat(Heartbeat {
                records_since_start: n,
                spool_records: 0,
            })),
            ..Default::default()
        }
    }

    /// A record sealed with its process given encoded has the body, hash and head that
    /// sealing the whole record gives, whichever fields around the process are present.
    #[test]
    fn a_process_given_encoded_seals_to_the_same_bytes() {
        use phi_proto::v1::{Ancestor, Open, Process, Redaction};
        let processes = [
            Process::default(),
            Process {
                pid: 300,
                tid: 301,
                comm: "psql".into(),
                argv: vec!["psql".into(), "-d".into(), "ehr".into()],
                ancestors: vec![Ancestor {
                    pid: 1,
                    comm: "init".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ];
        let events = [
            None,
            Some(Event::Open(Open {
                path: "/data/phi/a".into(),
                ..Default::default()
            })),
            Some(Event::Heartbeat(Heartbeat::default())),
        ];
        let mut shapes = 0;
        for process in &processes {
            for event in &events {
                for redactions in [vec![], vec![Redaction::default()]] {
                    for (host, boot, time) in [
                        ("", "", None),
                        ("h1", "b1", Some(phi_proto::Timestamp::default())),
                    ] {
                        let base = Record {
                            host_id: host.into(),
                            boot_id: boot.into(),
                            time,
                            redactions: redactions.clone(),
                            event: event.clone(),
                            ..Default::default()
                        };
                        let mut whole = Record {
                            process: Some(process.clone()),
                            ..base.clone()
                        };
                        let mut split = base;
                        let mut a = Sealer::new(Head::EMPTY);
                        let mut b = Sealer::new(Head::EMPTY);
                        for _ in 0..2 {
                            let want = a.seal(&mut whole);
                            let got = b.seal_with_process(&mut split, &process_field(process));
                            assert_eq!(got, want);
                            let mut unsealed = whole.clone();
                            unsealed.hash.clear();
                            assert_eq!(Record::decode(&got.body[..]).expect("decodes"), unsealed);
                        }
                        assert_eq!(a.head(), b.head());
                        shapes += 1;
                    }
                }
            }
        }
        assert_eq!(shapes, 24);
    }

    #[test]
    fn a_sealed_chain_verifies_link_by_link() {
        let mut s = Sealer::new(Head::EMPTY);
        let sealed: Vec<SealedRecord> = (0..5).map(|n| s.seal(&mut rec(n))).collect();
        let mut head = Head::EMPTY;
        for r in &sealed {
            let decoded = check_link(head, r).expect("links");
            assert_eq!(decoded.seq, r.seq);
            head = head_of(r);
        }
        assert_eq!(head, s.head());
        assert_eq!(sealed[0].seq, 1);
    }

    #[test]
    fn continues_accepts_exactly_what_check_link_accepts() {
        let mut s = Sealer::new(Head::EMPTY);
        let a = s.seal(&mut rec(1));
        let b = s.seal(&mut rec(2));
        let head = head_of(&a);
        let agree = |prev: Head, sealed: &SealedRecord| {
            let record = Record::decode(sealed.body.as_slice()).expect("decodes");
            let self_linked =
                link_hash(&record.prev_hash, &sealed.body).as_slice() == sealed.hash.as_slice();
            assert_eq!(
                continues(prev, sealed, &record, self_linked),
                check_link(prev, sealed).is_ok(),
                "seq {} after {}",
                sealed.seq,
                prev.seq
            );
        };
        agree(head, &b);
        agree(Head::EMPTY, &b); // wrong position
        agree(head_of(&b), &a);
        // A body stating another prev_hash, hashed consistently with it (a forged record).
        // `b` with its body edited, re-encoded and hashed after `prev_hash`.
        let edited = |edit: fn(&mut Record), prev_hash: &[u8]| {
            let mut r = Record::decode(b.body.as_slice()).expect("decodes");
            edit(&mut r);
            let body = r.encode_to_vec();
            SealedRecord {
                seq: b.seq,
                hash: link_hash(prev_hash, &body).to_vec(),
                body,
            }
        };
        agree(head, &edited(|r| r.prev_hash = vec![7; 32], &[7; 32]));
        // A body stating another seq, or carrying a hash of its own.
        agree(head, &edited(|r| r.seq += 1, &head.hash));
        agree(head, &edited(|r| r.hash = vec![1], &head.hash));
        // An edited hash.
        let mut h = b.clone();
        h.hash[0] ^= 1;
        agree(head, &h);
    }

    #[test]
    fn tampering_is_named() {
        let mut s = Sealer::new(Head::EMPTY);
        let a = s.seal(&mut rec(1));
        let mut b = s.seal(&mut rec(2));
        // Edited body.
        let mut edited = b.clone();
        edited.body[5] ^= 1;
        assert_eq!(
            check_link(head_of(&a), &edited),
            Err(LinkError::Hash { seq: 2 })
        );
        // Reordered / skipped.
        assert!(matches!(
            check_link(Head::EMPTY, &b),
            Err(LinkError::Sequence { .. })
        ));
        // A body re-hashed by someone without the previous hash fails on prev_hash.
        let mut forged = rec(9);
        forged.seq = 2;
        forged.prev_hash = vec![7; 32];
        b.body = forged.encode_to_vec();
        b.hash = link_hash(&head_of(&a).hash, &b.body).to_vec();
        assert_eq!(
            check_link(head_of(&a), &b),
            Err(LinkError::PrevHash { seq: 2 })
        );
    }
}
