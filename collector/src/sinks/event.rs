//! What a sink forwards: a stored record (decoded, with its place in the chain) or a stored
//! alert.

use phi_proto::v1::Record;

use crate::store::{Row, StoredAlert};

/// One stored record of a host's chain.
#[derive(Clone, Debug)]
pub struct RecordEvent {
    pub host_id: String,
    pub seq: u64,
    pub hash: Vec<u8>,
    pub record: Box<Record>,
}

/// One event for the sinks.
#[derive(Clone, Debug)]
pub enum Event {
    Record(RecordEvent),
    Alert(StoredAlert),
}

impl Event {
    /// The host the event is about.
    pub fn host_id(&self) -> &str {
        match self {
            Event::Record(r) => &r.host_id,
            Event::Alert(a) => &a.alert.host_id,
        }
    }

    /// A short kind: the record's kind ("open", "exec", …) or "alert".
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Record(r) => r.record.kind(),
            Event::Alert(_) => "alert",
        }
    }

    /// The event's time in ns since the epoch.
    pub fn time_ns(&self) -> i64 {
        match self {
            Event::Record(r) => crate::store::index::time_ns(&r.record),
            Event::Alert(a) => a.time_ns,
        }
    }
}

impl RecordEvent {
    /// Decodes a stored row. A row that does not decode is forwarded as a record without
    /// content (its place and hash are kept), so that the receiver sees the hole and
    /// `phictl verify` names it.
    pub fn from_row(row: Row) -> RecordEvent {
        use prost::Message as _;
        let record = Record::decode(row.body.as_slice()).unwrap_or_else(|e| {
            tracing::error!(
                host = %row.host_id,
                seq = row.seq,
                "a stored record does not decode ({e}); run phictl verify --host {}",
                row.host_id
            );
            Record {
                seq: row.seq,
                host_id: row.host_id.clone(),
                ..Default::default()
            }
        });
        RecordEvent {
            host_id: row.host_id,
            seq: row.seq,
            hash: row.hash,
            record: Box::new(record),
        }
    }
}
