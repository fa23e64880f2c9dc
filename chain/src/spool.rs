//! The spool: an append-only on-disk log of sealed records and checkpoints, kept until the
//! collector acknowledges them.
//!
//! Layout: segment files `seg-<first record seq, 20 digits>.log` in one directory. A segment
//! starts with the 8-byte magic `PHISPL1\n`, then entries:
//!
//! ```text
//! u32 LE length of payload | u32 LE CRC-32C of payload | payload = kind (1 byte) + protobuf
//! ```
//!
//! kind 1 is a `SealedRecord`, kind 2 a `Checkpoint`. Entries are written with one `write`
//! each (so a killed process loses nothing it wrote) and made durable in groups by `sync`
//! (`fdatasync`), never one per record. Only durable entries are sent. At open, the last
//! segment is checked entry by entry: a torn or corrupt tail (a crash while writing) is cut
//! off and reported, never replayed. Whole segments are deleted once everything in them is
//! acknowledged; the newest segment always stays, so the chain's head survives.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use phi_proto::v1::{Checkpoint, Record, SealedRecord};
use prost::Message as _;

use crate::seal::{Head, head_of};

pub const MAGIC: &[u8; 8] = b"PHISPL1\n";
const KIND_RECORD: u8 = 1;
const KIND_CHECKPOINT: u8 = 2;
/// Largest payload accepted when reading (a length beyond it is corruption).
pub const MAX_ENTRY: usize = 16 << 20;
/// Default segment size before a new one is started.
pub const SEGMENT_BYTES: u64 = 8 << 20;

/// One spool entry.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    Record(SealedRecord),
    Checkpoint(Checkpoint),
}

impl Entry {
    /// The record's seq, or the last seq a checkpoint covers.
    pub fn seq(&self) -> u64 {
        match self {
            Entry::Record(r) => r.seq,
            Entry::Checkpoint(c) => c.seq,
        }
    }
}

/// Encodes one entry with its length and checksum.
pub fn encode_entry(entry: &Entry) -> Vec<u8> {
    let (kind, len) = match entry {
        Entry::Record(r) => (KIND_RECORD, r.encoded_len()),
        Entry::Checkpoint(c) => (KIND_CHECKPOINT, c.encoded_len()),
    };
    // Length and checksum first, filled in once the payload is in place.
    let mut out = Vec::with_capacity(8 + 1 + len);
    out.extend_from_slice(&[0; 8]);
    out.push(kind);
    match entry {
        Entry::Record(r) => r.encode_raw(&mut out),
        Entry::Checkpoint(c) => c.encode_raw(&mut out),
    }
    let payload = &out[8..];
    let header = [
        (payload.len() as u32).to_le_bytes(),
        crc32c::crc32c(payload).to_le_bytes(),
    ];
    out[..4].copy_from_slice(&header[0]);
    out[4..8].copy_from_slice(&header[1]);
    out
}

/// Where and why reading stopped early.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corruption {
    /// Byte offset of the first bad entry in its segment.
    pub offset: u64,
    /// Bytes from there to the end that could not be read.
    pub bytes: u64,
    pub reason: &'static str,
}

/// Decodes entries from a segment's bytes (after the magic). Stops at the first entry that is
/// short, too long, fails its checksum or does not decode, and says where.
pub fn decode_entries(bytes: &[u8], base_offset: u64) -> (Vec<(u64, Entry)>, Option<Corruption>) {
    let mut out = Vec::new();
    let mut at = 0usize;
    let corrupt = |at: usize, reason| {
        Some(Corruption {
            offset: base_offset + at as u64,
            bytes: (bytes.len() - at) as u64,
            reason,
        })
    };
    while at < bytes.len() {
        if bytes.len() - at < 8 {
            return (out, corrupt(at, "torn entry header"));
        }
        let len =
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let crc = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        if len == 0 || len > MAX_ENTRY {
            return (out, corrupt(at, "impossible entry length"));
        }
        if bytes.len() - at - 8 < len {
            return (out, corrupt(at, "torn entry"));
        }
        let payload = &bytes[at + 8..at + 8 + len];
        if crc32c::crc32c(payload) != crc {
            return (out, corrupt(at, "checksum mismatch"));
        }
        let entry = match payload[0] {
            KIND_RECORD => SealedRecord::decode(&payload[1..]).map(Entry::Record),
            KIND_CHECKPOINT => Checkpoint::decode(&payload[1..]).map(Entry::Checkpoint),
            _ => return (out, corrupt(at, "unknown entry kind")),
        };
        let Ok(entry) = entry else {
            return (out, corrupt(at, "entry does not decode"));
        };
        out.push((base_offset + at as u64, entry));
        at += 8 + len;
    }
    (out, None)
}

/// How far the spool is durable: entries up to `offset` in segment `segment` (by first seq),
/// records up to `seq`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Durable {
    pub segment: u64,
    pub offset: u64,
    pub seq: u64,
}

/// What opening the spool found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The chain's head (empty for a new spool).
    pub head: Option<Head>,
    /// The last record, decoded (to tell how the previous run ended).
    pub last_record: Option<Record>,
    /// The last checkpoint found in the newest segment.
    pub last_checkpoint: Option<Checkpoint>,
    /// A torn or corrupt tail that was cut off.
    pub corruption: Option<Corruption>,
    /// Records in the spool.
    pub records: u64,
}

struct Segment {
    first_seq: u64,
    path: PathBuf,
    bytes: u64,
}

fn segment_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.log")
}

fn list_segments(dir: &Path) -> io::Result<Vec<Segment>> {
    let mut segs = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(num) = name
            .strip_prefix("seg-")
            .and_then(|n| n.strip_suffix(".log"))
        else {
            continue;
        };
        let Ok(first_seq) = num.parse::<u64>() else {
            continue;
        };
        segs.push(Segment {
            first_seq,
            bytes: e.metadata()?.len(),
            path: e.path(),
        });
    }
    segs.sort_by_key(|s| s.first_seq);
    Ok(segs)
}

fn read_segment(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(bytes)
}

impl Drop for Spool {
    /// Hands buffered entries to the kernel (not made durable: that is `sync`'s job).
    fn drop(&mut self) {
        let _ = self.write_pending();
    }
}

/// Bytes of appended entries buffered before they are written even without a `sync`.
const PENDING_LIMIT: usize = 1 << 20;

/// The writer side of the spool.
pub struct Spool {
    dir: PathBuf,
    segments: Vec<Segment>,
    file: Option<File>,
    segment_limit: u64,
    unsynced: bool,
    /// Entries appended but not yet handed to the kernel: written in one `write` at the next
    /// `sync` (group commit), or when it grows past [`PENDING_LIMIT`].
    pending: Vec<u8>,
    /// Last record seq appended.
    last_seq: u64,
    durable: Arc<Mutex<Durable>>,
    /// Records in the spool (appended and not yet released).
    records: u64,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, checking the newest segment and cutting off a
    /// torn tail.
    pub fn open(dir: &Path) -> io::Result<(Spool, Recovery)> {
        Self::open_with(dir, SEGMENT_BYTES)
    }

    pub fn open_with(dir: &Path, segment_limit: u64) -> io::Result<(Spool, Recovery)> {
        std::fs::create_dir_all(dir)?;
        let mut segments = list_segments(dir)?;
        let mut recovery = Recovery::default();
        let mut records = 0u64;
        // Count records of older segments by their names; check the newest one fully.
        if let Some(last) = segments.last_mut() {
            let bytes = read_segment(&last.path)?;
            let body = bytes.get(MAGIC.len()..).unwrap_or(&[]);
            let magic_ok = bytes.len() >= MAGIC.len() && &bytes[..MAGIC.len()] == MAGIC;
            let (entries, corruption) = if magic_ok {
                decode_entries(body, MAGIC.len() as u64)
            } else {
                (
                    Vec::new(),
                    Some(Corruption {
                        offset: 0,
                        bytes: bytes.len() as u64,
                        reason: "bad segment header",
                    }),
                )
            };
            if let Some(c) = &corruption {
                let keep = if magic_ok { c.offset } else { 0 };
                let f = OpenOptions::new().write(true).open(&last.path)?;
                f.set_len(keep)?;
                if keep == 0 {
                    let mut f = OpenOptions::new().write(true).open(&last.path)?;
                    f.write_all(MAGIC)?;
                }
                f.sync_all()?;
                last.bytes = keep.max(MAGIC.len() as u64);
                tracing::warn!(
                    segment = %last.path.display(),
                    offset = c.offset,
                    bytes = c.bytes,
                    reason = c.reason,
                    "cut a torn spool tail"
                );
            }
            for (_, e) in &entries {
                match e {
                    Entry::Record(r) => {
                        records += 1;
                        recovery.head = Some(head_of(r));
                    }
                    Entry::Checkpoint(c) => recovery.last_checkpoint = Some(c.clone()),
                }
            }
            if let Some(Entry::Record(r)) = entries
                .iter()
                .rev()
                .map(|(_, e)| e)
                .find(|e| matches!(e, Entry::Record(_)))
            {
                recovery.last_record = Record::decode(r.body.as_slice()).ok();
            }
            recovery.corruption = corruption;
        }
        // The newest segment may hold no intact record (cut off): the head is then the end
        // of the one before.
        while recovery.head.is_none() && segments.len() > 1 {
            let empty = segments.pop();
            if let Some(empty) = empty {
                std::fs::remove_file(&empty.path)?;
            }
            if let Some(prev) = segments.last() {
                let bytes = read_segment(&prev.path)?;
                let (entries, _) =
                    decode_entries(bytes.get(MAGIC.len()..).unwrap_or(&[]), MAGIC.len() as u64);
                for (_, e) in &entries {
                    match e {
                        Entry::Record(r) => {
                            recovery.head = Some(head_of(r));
                            recovery.last_record = Record::decode(r.body.as_slice()).ok();
                        }
                        Entry::Checkpoint(c) => recovery.last_checkpoint = Some(c.clone()),
                    }
                }
            }
        }
        for pair in segments.windows(2) {
            records += pair[1].first_seq.saturating_sub(pair[0].first_seq);
        }
        recovery.records = records;
        let last_seq = recovery.head.map_or(0, |h| h.seq);
        let file = match segments.last() {
            Some(s) => Some(OpenOptions::new().append(true).open(&s.path)?),
            None => None,
        };
        let durable = Durable {
            segment: segments.last().map_or(0, |s| s.first_seq),
            offset: segments.last().map_or(0, |s| s.bytes),
            seq: last_seq,
        };
        Ok((
            Spool {
                dir: dir.to_owned(),
                segments,
                file,
                segment_limit,
                unsynced: false,
                pending: Vec::new(),
                last_seq,
                durable: Arc::new(Mutex::new(durable)),
                records,
            },
            recovery,
        ))
    }

    /// Shared view of the durable position (for readers).
    pub fn durable_handle(&self) -> Arc<Mutex<Durable>> {
        Arc::clone(&self.durable)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Records held (appended, not released).
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Hands the buffered entries to the kernel (one `write`).
    fn write_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let Some(f) = self.file.as_mut() else {
            return Err(io::Error::other("no spool segment"));
        };
        f.write_all(&self.pending)?;
        self.pending.clear();
        Ok(())
    }

    fn start_segment(&mut self, first_seq: u64) -> io::Result<()> {
        self.write_pending()?;
        if let Some(f) = &self.file
            && self.unsynced
        {
            f.sync_data()?;
            self.unsynced = false;
        }
        let path = self.dir.join(segment_name(first_seq));
        let mut f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        f.write_all(MAGIC)?;
        f.sync_all()?;
        File::open(&self.dir)?.sync_all()?;
        self.segments.push(Segment {
            first_seq,
            path,
            bytes: MAGIC.len() as u64,
        });
        self.file = Some(f);
        self.publish();
        Ok(())
    }

    /// Appends an entry (buffered; written and made durable by the next `sync`).
    pub fn append(&mut self, entry: &Entry) -> io::Result<()> {
        let bytes = encode_entry(entry);
        if let Entry::Record(r) = entry {
            let full = self
                .segments
                .last()
                .is_none_or(|s| s.bytes + bytes.len() as u64 > self.segment_limit);
            if full {
                self.start_segment(r.seq)?;
            }
            self.last_seq = r.seq;
            self.records += 1;
        } else if self.segments.is_empty() {
            return Err(io::Error::other("a checkpoint cannot open the spool"));
        }
        if self.file.is_none() {
            return Err(io::Error::other("no spool segment"));
        }
        self.pending.extend_from_slice(&bytes);
        if let Some(s) = self.segments.last_mut() {
            s.bytes += bytes.len() as u64;
        }
        self.unsynced = true;
        if self.pending.len() >= PENDING_LIMIT {
            self.write_pending()?;
        }
        Ok(())
    }

    /// Makes everything appended durable (`fdatasync`) and publishes the new position.
    /// Returns whether anything was synced.
    pub fn sync(&mut self) -> io::Result<bool> {
        if !self.unsynced {
            return Ok(false);
        }
        self.write_pending()?;
        if let Some(f) = &self.file {
            f.sync_data()?;
        }
        self.unsynced = false;
        self.publish();
        Ok(true)
    }

    fn publish(&self) {
        if let Ok(mut d) = self.durable.lock() {
            *d = Durable {
                segment: self.segments.last().map_or(0, |s| s.first_seq),
                offset: self.segments.last().map_or(0, |s| s.bytes),
                seq: if self.unsynced { d.seq } else { self.last_seq },
            };
        }
    }

    /// The last durable record seq.
    pub fn durable_seq(&self) -> u64 {
        self.durable.lock().map(|d| d.seq).unwrap_or(0)
    }

    /// Deletes segments whose records are all acknowledged (`<= acked`). The newest segment
    /// always stays. Returns the number of records released.
    pub fn release(&mut self, acked: u64) -> io::Result<u64> {
        let mut released = 0;
        while self.segments.len() > 1 && self.segments[1].first_seq <= acked + 1 {
            let s = self.segments.remove(0);
            released += self.segments[0].first_seq - s.first_seq;
            std::fs::remove_file(&s.path)?;
        }
        self.records = self.records.saturating_sub(released);
        Ok(released)
    }
}

/// Reads durable entries in order, for sending.
pub struct SpoolReader {
    dir: PathBuf,
    durable: Arc<Mutex<Durable>>,
    /// Current segment: first seq, open file, read offset.
    current: Option<(u64, File, u64)>,
    /// Skip records `<= after` (and checkpoints `< after`).
    after: u64,
}

impl SpoolReader {
    /// A reader over `spool`'s directory, positioned after record `after`.
    pub fn new(spool: &Spool, after: u64) -> Self {
        Self::open(spool.dir.clone(), spool.durable_handle(), after)
    }

    /// A reader over a spool directory whose writer publishes `durable`.
    pub fn open(dir: PathBuf, durable: Arc<Mutex<Durable>>, after: u64) -> Self {
        SpoolReader {
            dir,
            durable,
            current: None,
            after,
        }
    }

    fn open_segment_for(&mut self, seq: u64) -> io::Result<bool> {
        let segs = list_segments(&self.dir)?;
        let Some(seg) = segs
            .iter()
            .rev()
            .find(|s| s.first_seq <= seq)
            .or(segs.first())
        else {
            return Ok(false);
        };
        let f = File::open(&seg.path)?;
        self.current = Some((seg.first_seq, f, MAGIC.len() as u64));
        Ok(true)
    }

    /// Up to `max` durable entries after the current position; empty when caught up.
    pub fn next_batch(&mut self, max: usize) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        let durable = self.durable.lock().map(|d| *d).unwrap_or_default();
        if durable.segment == 0 {
            return Ok(out);
        }
        // Start in the segment of record `after`: a checkpoint over it may follow it there.
        if self.current.is_none() && !self.open_segment_for(self.after.max(1))? {
            return Ok(out);
        }
        while out.len() < max {
            let Some((first, file, offset)) = self.current.as_mut() else {
                break;
            };
            let limit = if *first == durable.segment {
                durable.offset
            } else {
                file.metadata()?.len()
            };
            if *offset >= limit {
                if *first == durable.segment {
                    break;
                }
                // Go on with the next segment.
                let next = list_segments(&self.dir)?
                    .into_iter()
                    .find(|s| s.first_seq > *first);
                match next {
                    Some(s) => {
                        let f = File::open(&s.path)?;
                        self.current = Some((s.first_seq, f, MAGIC.len() as u64));
                        continue;
                    }
                    None => break,
                }
            }
            let want = ((limit - *offset) as usize).min(4 << 20);
            file.seek(SeekFrom::Start(*offset))?;
            let mut buf = vec![0u8; want];
            file.read_exact(&mut buf)?;
            let (entries, corruption) = decode_entries(&buf, *offset);
            if entries.is_empty() {
                match corruption {
                    // An entry longer than the read window: read it alone.
                    Some(c) if c.reason == "torn entry" && want == 4 << 20 => {
                        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                        let mut one = vec![0u8; len + 8];
                        file.seek(SeekFrom::Start(*offset))?;
                        file.read_exact(&mut one)?;
                        let (e, _) = decode_entries(&one, *offset);
                        if e.is_empty() {
                            return Err(io::Error::other("corrupt spool entry"));
                        }
                        *offset += one.len() as u64;
                        for (_, entry) in e {
                            take(entry, &mut self.after, &mut out);
                        }
                        continue;
                    }
                    Some(c) => {
                        return Err(io::Error::other(format!(
                            "spool segment {first} is corrupt at offset {}: {}",
                            c.offset, c.reason
                        )));
                    }
                    None => break,
                }
            }
            let mut consumed = *offset;
            for (at, entry) in entries {
                if out.len() >= max {
                    break;
                }
                consumed = at + 8 + encoded_len(&entry) as u64;
                take(entry, &mut self.after, &mut out);
            }
            *offset = consumed;
        }
        Ok(out)
    }
}

/// Keeps `entry` if it lies after the reader's position, and advances it.
fn take(entry: Entry, after: &mut u64, out: &mut Vec<Entry>) {
    let keep = match &entry {
        Entry::Record(r) => r.seq > *after,
        Entry::Checkpoint(c) => c.seq >= *after,
    };
    if keep {
        if let Entry::Record(r) = &entry {
            *after = r.seq;
        }
        out.push(entry);
    }
}

fn encoded_len(entry: &Entry) -> usize {
    1 + match entry {
        Entry::Record(r) => r.encoded_len(),
        Entry::Checkpoint(c) => c.encoded_len(),
    }
}

#[cfg(test)]
mod tests {
    use phi_proto::v1::{Heartbeat, record::Event};

    use super::*;
    use crate::seal::Sealer;

    fn records(sealer: &mut Sealer, n: u64) -> Vec<Entry> {
        (0..n)
            .map(|i| {
                let mut r = Record {
                    host_id: "h".into(),
                    event: Some(Event::Heartbeat(Heartbeat {
                        records_since_start: i,
                        spool_records: 0,
                    })),
                    ..Default::default()
                };
                Entry::Record(sealer.seal(&mut r))
            })
            .collect()
    }

    #[test]
    fn appends_syncs_reads_and_releases_across_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut spool, rec) = Spool::open_with(dir.path(), 1024).expect("open");
        assert!(rec.head.is_none());
        let mut sealer = Sealer::new(Head::EMPTY);
        for e in records(&mut sealer, 100) {
            spool.append(&e).expect("append");
        }
        let mut reader = SpoolReader::new(&spool, 0);
        spool.sync().expect("sync");
        let got = reader.next_batch(1000).expect("read");
        assert_eq!(got.len(), 100);
        assert_eq!(got.first().map(Entry::seq), Some(1));
        assert_eq!(got.last().map(Entry::seq), Some(100));
        assert!(list_segments(dir.path()).expect("list").len() > 3);
        // Acknowledge half: older segments go, the chain head stays.
        let released = spool.release(50).expect("release");
        assert!(released > 0 && released <= 50);
        drop(spool);
        let (spool, rec) = Spool::open_with(dir.path(), 1024).expect("reopen");
        assert_eq!(rec.head.map(|h| h.seq), Some(100));
        assert_eq!(rec.head, Some(sealer.head()));
        let mut reader = SpoolReader::new(&spool, 50);
        let rest = reader.next_batch(1000).expect("read");
        assert_eq!(rest.first().map(Entry::seq), Some(51));
        assert_eq!(rest.len(), 50);
    }

    #[test]
    fn only_synced_entries_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut spool, _) = Spool::open(dir.path()).expect("open");
        let mut sealer = Sealer::new(Head::EMPTY);
        let entries = records(&mut sealer, 3);
        spool.append(&entries[0]).expect("append");
        spool.sync().expect("sync");
        spool.append(&entries[1]).expect("append");
        let mut reader = SpoolReader::new(&spool, 0);
        let seqs: Vec<u64> = reader
            .next_batch(10)
            .expect("read")
            .iter()
            .map(Entry::seq)
            .collect();
        assert_eq!(seqs, vec![1], "the unsynced entry is not read");
        spool.append(&entries[2]).expect("append");
        spool.sync().expect("sync");
        let seqs: Vec<u64> = reader
            .next_batch(10)
            .expect("read")
            .iter()
            .map(Entry::seq)
            .collect();
        assert_eq!(seqs, vec![2, 3]);
        assert!(reader.next_batch(10).expect("read").is_empty());
    }

    #[test]
    fn appends_reach_the_file_in_one_write_at_sync_or_when_the_buffer_fills() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut spool, _) = Spool::open(dir.path()).expect("open");
        let mut sealer = Sealer::new(Head::EMPTY);
        let entries = records(&mut sealer, 3);
        let file_len = |spool: &Spool| {
            std::fs::metadata(&spool.segments.last().expect("segment").path)
                .expect("segment file")
                .len()
        };
        spool.append(&entries[0]).expect("append");
        let after_first = file_len(&spool);
        spool.append(&entries[1]).expect("append");
        assert_eq!(file_len(&spool), after_first, "buffered until sync");
        spool.sync().expect("sync");
        assert_eq!(file_len(&spool), spool.bytes(), "written and synced");
        // Dropping the writer hands what is buffered to the kernel.
        spool.append(&entries[2]).expect("append");
        let expected = spool.bytes();
        let path = spool.segments.last().expect("segment").path.clone();
        drop(spool);
        assert_eq!(std::fs::metadata(path).expect("file").len(), expected);
        let (spool, recovery) = Spool::open(dir.path()).expect("reopen");
        assert_eq!(spool.records(), 3, "{recovery:?}");
    }

    #[test]
    fn a_torn_tail_is_cut_and_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut spool, _) = Spool::open(dir.path()).expect("open");
        let mut sealer = Sealer::new(Head::EMPTY);
        let entries = records(&mut sealer, 3);
        for e in &entries {
            spool.append(e).expect("append");
        }
        spool.sync().expect("sync");
        drop(spool);
        let seg = list_segments(dir.path()).expect("list").remove(0);
        let len = std::fs::metadata(&seg.path).expect("stat").len();
        let f = OpenOptions::new()
            .write(true)
            .open(&seg.path)
            .expect("open");
        f.set_len(len - 5).expect("truncate mid-record");
        let (mut spool, rec) = Spool::open(dir.path()).expect("reopen");
        let c = rec.corruption.expect("corruption reported");
        assert_eq!(c.reason, "torn entry");
        assert_eq!(
            rec.head.map(|h| h.seq),
            Some(2),
            "the head is the last intact record"
        );
        // Appending continues cleanly after the cut.
        let mut sealer = Sealer::new(rec.head.expect("head"));
        for e in records(&mut sealer, 1) {
            spool.append(&e).expect("append");
        }
        spool.sync().expect("sync");
        let mut reader = SpoolReader::new(&spool, 0);
        let seqs: Vec<u64> = reader
            .next_batch(10)
            .expect("read")
            .iter()
            .map(Entry::seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
    }

    #[test]
    fn decode_stops_at_garbage() {
        let mut sealer = Sealer::new(Head::EMPTY);
        let mut bytes = Vec::new();
        for e in records(&mut sealer, 2) {
            bytes.extend(encode_entry(&e));
        }
        let good = bytes.len();
        bytes.extend_from_slice(&[0xff; 12]);
        let (entries, corruption) = decode_entries(&bytes, 0);
        assert_eq!(entries.len(), 2);
        assert_eq!(corruption.map(|c| c.offset), Some(good as u64));
        let mut flipped = bytes[..good].to_vec();
        flipped[20] ^= 0x40;
        let (entries, corruption) = decode_entries(&flipped, 0);
        assert!(entries.is_empty());
        assert_eq!(corruption.map(|c| c.reason), Some("checksum mismatch"));
    }
}
