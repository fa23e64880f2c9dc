//! Blocks: how the SQLite store keeps records. One block holds the consecutive records of one
//! host that one append accepted (a batch), encoded together and compressed with zstd.
//!
//! A row per record cost the single SQLite writer a B-tree insert per record into the table
//! and one more into each of its indexes (host and time, all-hosts time, session, login user,
//! path), and wrote each record about twice to disk (WAL, then the checkpoint): about 19 µs
//! per record. A block is one row, and the records of a batch, which share their host,
//! process and identity, compress about tenfold together. Lookups go through what a block
//! row states of its records: host, sequence range, time range; the distinct sessions and
//! users (`block_keys`); and a Bloom filter of its paths and their directories
//! (`block_paths`). A query then decodes only the blocks that can hold what it asks for and
//! filters their records exactly.

use std::collections::BTreeSet;

use prost::Message;

use super::{Filter, Row, StoreError, index::Columns, prefix_end};

/// One record as a block stores it: the sealed record and its query columns.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredRecord {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(sint64, tag = "2")]
    pub time_ns: i64,
    #[prost(string, tag = "3")]
    pub kind: String,
    #[prost(int64, optional, tag = "4")]
    pub uid: Option<i64>,
    #[prost(string, optional, tag = "5")]
    pub user: Option<String>,
    #[prost(string, optional, tag = "6")]
    pub login_user: Option<String>,
    #[prost(string, optional, tag = "7")]
    pub session: Option<String>,
    #[prost(string, optional, tag = "8")]
    pub path: Option<String>,
    #[prost(bytes = "vec", tag = "9")]
    pub hash: Vec<u8>,
    #[prost(bytes = "vec", tag = "10")]
    pub prev_hash: Vec<u8>,
    #[prost(bytes = "vec", tag = "11")]
    pub body: Vec<u8>,
}

impl StoredRecord {
    pub fn new(seq: u64, hash: Vec<u8>, prev_hash: Vec<u8>, body: Vec<u8>, c: Columns) -> Self {
        StoredRecord {
            seq,
            time_ns: c.time_ns,
            kind: c.kind.to_owned(),
            uid: c.uid,
            user: c.user,
            login_user: c.login_user,
            session: c.session,
            path: c.path,
            hash,
            prev_hash,
            body,
        }
    }

    pub fn row(self, host_id: &str) -> Row {
        Row {
            host_id: host_id.to_owned(),
            seq: self.seq,
            hash: self.hash,
            body: self.body,
            time_ns: self.time_ns,
            session: self.session,
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredBlock {
    #[prost(message, repeated, tag = "1")]
    records: Vec<StoredRecord>,
}

/// The zstd level of new blocks: the fastest levels compress a batch about as well as the
/// default one, at a fraction of its time.
const LEVEL: i32 = 1;

/// Per thread, reused: zstd contexts and the buffers of a block. A context costs hundreds of
/// KiB and a batch's buffers about as much: made anew for every block, the kernel spent a
/// seventh of the writer's time zeroing their pages.
struct Codec {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    raw: Vec<u8>,
    packed: Vec<u8>,
}

thread_local! {
    static CODEC: std::cell::RefCell<Codec> = const {
        std::cell::RefCell::new(Codec {
            compressor: None,
            decompressor: None,
            raw: Vec::new(),
            packed: Vec::new(),
        })
    };
}

fn zstd_error(what: &str, e: &std::io::Error) -> StoreError {
    StoreError::Invalid(format!("{what} a block: {e}"))
}

/// Encodes and compresses records (consecutive, of one host) and hands the block's bytes to
/// `write`.
pub fn encode_with<T>(
    records: Vec<StoredRecord>,
    write: impl FnOnce(&[u8]) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    CODEC.with_borrow_mut(|c| {
        let block = StoredBlock { records };
        c.raw.clear();
        block
            .encode(&mut c.raw)
            .map_err(|e| StoreError::Invalid(format!("encoding a block: {e}")))?;
        drop(block);
        let compressor = match &mut c.compressor {
            Some(z) => z,
            empty => empty.insert(
                zstd::bulk::Compressor::new(LEVEL).map_err(|e| zstd_error("compressing", &e))?,
            ),
        };
        c.packed.clear();
        c.packed
            .reserve(zstd::zstd_safe::compress_bound(c.raw.len()));
        compressor
            .compress_to_buffer(&c.raw, &mut c.packed)
            .map_err(|e| zstd_error("compressing", &e))?;
        write(&c.packed)
    })
}

/// Encodes and compresses records (consecutive, of one host).
pub fn encode(records: Vec<StoredRecord>) -> Result<Vec<u8>, StoreError> {
    encode_with(records, |data| Ok(data.to_vec()))
}

/// Decompresses and decodes a block; `id` names it in the error of a damaged one.
pub fn decode(id: i64, data: &[u8]) -> Result<Vec<StoredRecord>, StoreError> {
    let damaged = |what: String| {
        StoreError::Invalid(format!(
            "stored block {id} is damaged ({what}); `phictl verify` names the records it held"
        ))
    };
    let size = zstd::zstd_safe::get_frame_content_size(data)
        .ok()
        .flatten()
        .ok_or_else(|| damaged("no zstd frame".into()))?;
    // A block holds one batch: far below this. A larger stated size is damage, not data.
    if size > 1 << 30 {
        return Err(damaged(format!("states {size} bytes")));
    }
    CODEC.with_borrow_mut(|c| {
        let decompressor = match &mut c.decompressor {
            Some(z) => z,
            empty => {
                empty.insert(zstd::bulk::Decompressor::new().map_err(|e| damaged(e.to_string()))?)
            }
        };
        c.raw.clear();
        c.raw.reserve(size as usize);
        let n = decompressor
            .decompress_to_buffer(data, &mut c.raw)
            .map_err(|e| damaged(e.to_string()))?;
        if n as u64 != size {
            return Err(damaged(format!("{n} of {size} bytes")));
        }
        Ok(StoredBlock::decode(c.raw.as_slice())
            .map_err(|e| damaged(e.to_string()))?
            .records)
    })
}

/// The most records in one block: a larger batch is cut (a query decodes whole blocks).
pub const BLOCK_RECORDS: usize = 512;

/// The widest time range of one block (1 hour). A time search starts that far before its
/// window (see `block_span` in the SQLite store), so a batch whose records lie far apart in
/// time (a clock step on the host, a backlog sent late) is cut rather than widening every
/// search.
pub const BLOCK_SPAN_NS: i64 = 3_600 * 1_000_000_000;

/// Groups consecutive records of one host into blocks of at most [`BLOCK_RECORDS`] records
/// and [`BLOCK_SPAN_NS`] of time.
#[derive(Default)]
pub struct Cutter {
    pending: Vec<StoredRecord>,
    min_ns: i64,
    max_ns: i64,
}

impl Cutter {
    /// Adds `r`; returns the block it does not fit in, if any.
    pub fn push(&mut self, r: StoredRecord) -> Option<Vec<StoredRecord>> {
        let (min_ns, max_ns) = (self.min_ns.min(r.time_ns), self.max_ns.max(r.time_ns));
        let fits =
            self.pending.len() < BLOCK_RECORDS && max_ns.saturating_sub(min_ns) <= BLOCK_SPAN_NS;
        let full = if self.pending.is_empty() || fits {
            None
        } else {
            Some(std::mem::take(&mut self.pending))
        };
        if self.pending.is_empty() {
            (self.min_ns, self.max_ns) = (r.time_ns, r.time_ns);
        } else {
            (self.min_ns, self.max_ns) = (min_ns, max_ns);
        }
        self.pending.push(r);
        full
    }

    /// The last block, if any records are left.
    pub fn finish(&mut self) -> Option<Vec<StoredRecord>> {
        (!self.pending.is_empty()).then(|| std::mem::take(&mut self.pending))
    }
}

/// What a block row states of its records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub first_seq: u64,
    pub last_seq: u64,
    pub min_ns: i64,
    pub max_ns: i64,
    pub records: usize,
    /// Distinct lookup keys (see [`key`]).
    pub keys: BTreeSet<String>,
    /// Bloom filter of the paths and their directories (see [`Bloom`]).
    pub paths: Option<Vec<u8>>,
}

/// What a lookup key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyKind {
    Session,
    LoginUser,
    User,
    Uid,
}

/// A lookup key: the kind's letter, a colon, the value.
pub fn key(kind: KeyKind, value: &str) -> String {
    let letter = match kind {
        KeyKind::Session => 's',
        KeyKind::LoginUser => 'l',
        KeyKind::User => 'n',
        KeyKind::Uid => 'i',
    };
    format!("{letter}:{value}")
}

/// Summarizes records (non-empty, consecutive, of one host).
pub fn summarize(records: &[StoredRecord]) -> Summary {
    // Distinct values first: a batch repeats a handful of them hundreds of times.
    let mut named: BTreeSet<(KeyKind, &str)> = BTreeSet::new();
    let mut uids: BTreeSet<i64> = BTreeSet::new();
    let mut paths = Vec::new();
    let mut min_ns = i64::MAX;
    let mut max_ns = i64::MIN;
    for r in records {
        min_ns = min_ns.min(r.time_ns);
        max_ns = max_ns.max(r.time_ns);
        for (kind, value) in [
            (KeyKind::Session, &r.session),
            (KeyKind::LoginUser, &r.login_user),
            (KeyKind::User, &r.user),
        ] {
            if let Some(v) = value {
                named.insert((kind, v.as_str()));
            }
        }
        if let Some(u) = r.uid {
            uids.insert(u);
        }
        if let Some(p) = &r.path {
            paths.push(p.as_str());
        }
    }
    let keys = named
        .into_iter()
        .map(|(kind, v)| key(kind, v))
        .chain(uids.into_iter().map(|u| key(KeyKind::Uid, &u.to_string())))
        .collect();
    Summary {
        first_seq: records.first().map_or(0, |r| r.seq),
        last_seq: records.last().map_or(0, |r| r.seq),
        min_ns,
        max_ns,
        records: records.len(),
        keys,
        paths: (!paths.is_empty()).then(|| Bloom::of_paths(&paths).0),
    }
}

/// A Bloom filter over strings: 10 bits per item and 7 probes (about 1% false positives),
/// FNV-1a hashing (stable: filters are stored). It holds each path and every prefix of it
/// that ends with `/`, so that a path-prefix query tests the directory its prefix names.
pub struct Bloom(pub Vec<u8>);

const PROBES: u64 = 7;

fn fnv1a(s: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Bloom {
    fn probes(item: &str, bits: u64) -> impl Iterator<Item = u64> {
        let h = fnv1a(item.as_bytes());
        let (a, b) = (h & 0xffff_ffff, (h >> 32) | 1);
        (0..PROBES).map(move |i| a.wrapping_add(i.wrapping_mul(b)) % bits)
    }

    /// The items of `path`: itself and each of its directories (`/srv/`, `/srv/ehr/`, …)
    /// but the root, which every path has and no query tests (see [`prefix_item`]).
    fn items(path: &str) -> impl Iterator<Item = &str> {
        path.match_indices('/')
            .filter(|(i, _)| *i > 0)
            .map(move |(i, _)| &path[..=i])
            .chain(std::iter::once(path))
    }

    pub fn of_paths(paths: &[&str]) -> Bloom {
        let mut items: Vec<&str> = paths.iter().flat_map(|p| Self::items(p)).collect();
        items.sort_unstable();
        items.dedup();
        let bytes = (items.len() * 10).div_ceil(8).max(8);
        let mut bits = vec![0u8; bytes];
        let n = (bytes * 8) as u64;
        for item in items {
            for p in Self::probes(item, n) {
                bits[(p / 8) as usize] |= 1 << (p % 8);
            }
        }
        Bloom(bits)
    }

    /// False: no path of the block has `item` as itself or as a directory.
    pub fn may_hold(bits: &[u8], item: &str) -> bool {
        if bits.is_empty() {
            return false;
        }
        let n = (bits.len() * 8) as u64;
        Self::probes(item, n).all(|p| bits[(p / 8) as usize] & (1 << (p % 8)) != 0)
    }
}

/// The item a path-prefix query tests: the directory its prefix names (everything up to the
/// last `/`), None when that is the root (every path has it).
pub fn prefix_item(prefix: &str) -> Option<&str> {
    let dir = &prefix[..=prefix.rfind('/')?];
    (dir != "/").then_some(dir)
}

/// Whether a record satisfies a timeline's filter (its host and cursor aside): the same
/// conditions as the SQL of [`super::query::timeline`].
pub fn matches(r: &StoredRecord, f: &Filter, since_ns: Option<i64>) -> bool {
    if since_ns.is_some_and(|s| r.time_ns < s) || f.until_ns.is_some_and(|u| r.time_ns >= u) {
        return false;
    }
    if let Some(u) = &f.user {
        let named = r.login_user.as_deref() == Some(u) || r.user.as_deref() == Some(u);
        let uid = u.parse::<i64>().ok();
        if !named && (uid.is_none() || r.uid != uid) {
            return false;
        }
    }
    if let Some(p) = &f.path_prefix {
        let end = prefix_end(p);
        match r.path.as_deref() {
            Some(path) if path >= p.as_str() && path < end.as_str() => {}
            _ => return false,
        }
    }
    if !f.kinds.is_empty() && !f.kinds.contains(&r.kind) {
        return false;
    }
    if let Some(s) = &f.session
        && r.session.as_ref() != Some(s)
    {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, time_ns: i64, path: Option<&str>, user: &str) -> StoredRecord {
        StoredRecord {
            seq,
            time_ns,
            kind: "open".into(),
            uid: Some(1001),
            user: Some(user.into()),
            login_user: Some("alice".into()),
            session: Some("db1/a1a5aa6d/3".into()),
            path: path.map(str::to_owned),
            hash: vec![seq as u8; 32],
            prev_hash: vec![seq.wrapping_sub(1) as u8; 32],
            body: vec![7; 600],
        }
    }

    #[test]
    fn a_block_decodes_to_what_was_encoded_and_compresses() {
        let records: Vec<_> = (1..=512)
            .map(|s| record(s, s as i64 * 10, Some("/srv/ehr/a/b.pdf"), "root"))
            .collect();
        let data = encode(records.clone()).expect("encode");
        assert!(data.len() * 5 < 512 * 600, "{} bytes", data.len());
        assert_eq!(decode(1, &data).expect("decode"), records);
        let mut bad = data.clone();
        bad.truncate(data.len() / 2);
        let e = decode(9, &bad).expect_err("damaged").to_string();
        assert!(e.contains("stored block 9 is damaged"), "{e}");
        assert!(decode(9, b"not zstd").is_err());
    }

    #[test]
    fn the_summary_names_ranges_keys_and_paths() {
        let records = vec![
            record(5, 300, Some("/srv/ehr/cardiology/p1/note.txt"), "root"),
            record(6, 100, None, "bob"),
            record(7, 200, Some("/srv/ehr/oncology/p2/scan.dcm"), "root"),
        ];
        let s = summarize(&records);
        assert_eq!((s.first_seq, s.last_seq, s.records), (5, 7, 3));
        assert_eq!((s.min_ns, s.max_ns), (100, 300));
        let keys: Vec<_> = s.keys.iter().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["i:1001", "l:alice", "n:bob", "n:root", "s:db1/a1a5aa6d/3"]
        );
        let bloom = s.paths.expect("paths");
        for held in [
            "/srv/",
            "/srv/ehr/",
            "/srv/ehr/cardiology/",
            "/srv/ehr/cardiology/p1/",
            "/srv/ehr/cardiology/p1/note.txt",
            "/srv/ehr/oncology/p2/",
        ] {
            assert!(Bloom::may_hold(&bloom, held), "{held}");
        }
        // Absent items: with 10 bits per item a few of many may pass; most must not.
        let passed = (0..1000)
            .filter(|i| Bloom::may_hold(&bloom, &format!("/srv/ehr/radiology/p{i}/")))
            .count();
        assert!(passed < 100, "{passed} of 1000 absent items passed");
        assert!(summarize(&[record(1, 1, None, "x")]).paths.is_none());
        assert!(!Bloom::may_hold(&[], "/srv/"));
    }

    #[test]
    fn batches_are_cut_by_count_and_by_time_span() {
        let mut cut = Cutter::default();
        let mut blocks = Vec::new();
        let hour = BLOCK_SPAN_NS;
        // 600 records a second apart, then one an hour and a second later, then one within
        // the hour of it, then one at time 0 (an unset clock).
        let times = (0..600).map(|i| i * 1_000_000_000).chain([
            599_000_000_000 + hour + 1_000_000_000,
            600_000_000_000 + hour,
            0,
        ]);
        for (seq, t) in (1..).zip(times) {
            blocks.extend(cut.push(record(seq, t, None, "root")));
        }
        blocks.extend(cut.finish());
        assert!(cut.finish().is_none());
        let shape: Vec<(u64, usize)> = blocks.iter().map(|b| (b[0].seq, b.len())).collect();
        assert_eq!(shape, [(1, 512), (513, 88), (601, 2), (603, 1)]);
        for b in &blocks {
            let s = summarize(b);
            assert!(s.max_ns - s.min_ns <= hour, "{s:?}");
        }
    }

    #[test]
    fn a_prefix_tests_the_directory_it_names() {
        assert_eq!(
            Bloom::items("/srv/ehr/a.pdf").collect::<Vec<_>>(),
            ["/srv/", "/srv/ehr/", "/srv/ehr/a.pdf"]
        );
        assert_eq!(Bloom::items("/").collect::<Vec<_>>(), ["/"]);
        assert_eq!(Bloom::items("rel/x").collect::<Vec<_>>(), ["rel/", "rel/x"]);
        assert_eq!(prefix_item("/srv/ehr/card"), Some("/srv/ehr/"));
        assert_eq!(prefix_item("/srv/ehr/"), Some("/srv/ehr/"));
        assert_eq!(prefix_item("/srv/ehr/a/b.pdf"), Some("/srv/ehr/a/"));
        assert_eq!(prefix_item("/sr"), None);
        assert_eq!(prefix_item("relative"), None);
    }

    #[test]
    fn records_match_the_filters_the_sql_applies() {
        let r = record(5, 300, Some("/srv/ehr/a/b.pdf"), "root");
        let all = Filter::default();
        assert!(matches(&r, &all, None));
        let f = |f: Filter| matches(&r, &f, None);
        assert!(!matches(&r, &all, Some(301)));
        assert!(matches(&r, &all, Some(300)));
        assert!(!f(Filter {
            until_ns: Some(300),
            ..Default::default()
        }));
        for (user, hit) in [
            ("alice", true),
            ("root", true),
            ("1001", true),
            ("1002", false),
            ("bob", false),
        ] {
            let filter = Filter {
                user: Some(user.into()),
                ..Default::default()
            };
            assert_eq!(f(filter), hit, "{user}");
        }
        for (prefix, hit) in [
            ("/srv/ehr/", true),
            ("/srv/ehr/a/b.pdf", true),
            ("/srv/ehr/a/b.pdfx", false),
            ("/srv/ehr/b", false),
        ] {
            let filter = Filter {
                path_prefix: Some(prefix.into()),
                ..Default::default()
            };
            assert_eq!(f(filter), hit, "{prefix}");
        }
        assert!(f(Filter {
            kinds: vec!["exec".into(), "open".into()],
            ..Default::default()
        }));
        assert!(!f(Filter {
            kinds: vec!["exec".into()],
            ..Default::default()
        }));
        assert!(!f(Filter {
            session: Some("db1/a1a5aa6d/4".into()),
            ..Default::default()
        }));
        let no_path = record(6, 300, None, "root");
        assert!(!matches(
            &no_path,
            &Filter {
                path_prefix: Some("/".into()),
                ..Default::default()
            },
            None
        ));
    }
}
