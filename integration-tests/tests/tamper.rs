//! Someone with write access to the collector's database edits what is stored. For every
//! kind of edit, `phictl verify` must fail (exit status 1) and name the first bad seq, on
//! SQLite and on PostgreSQL. The chain comes from a real agent through a real collector.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use integration_tests::{
    Agent, TestDir,
    collector::{Collector, Phictl, Pki, open_path},
    postgres::Postgres,
};
use phi_chain::seal::link_hash;
use phi_proto::v1::{Record, record::Event};
use prost::Message as _;

const HOST: &str = "tamper-host";
const OPENS: usize = 60;

fn open_close(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("cstring");
    // SAFETY: open/close of a valid path.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDONLY);
        assert!(fd >= 0, "open {}", path.display());
        libc::close(fd);
    }
}

/// Direct access to the stored rows, as an intruder with database rights would have.
enum Db {
    Lite(rusqlite::Connection),
    Pg(postgres::Client),
}

impl Db {
    fn open(url: &str) -> Db {
        match url.strip_prefix("sqlite:") {
            Some(path) => Db::Lite(rusqlite::Connection::open(path).expect("open sqlite")),
            None => Db::Pg(postgres::Client::connect(url, postgres::NoTls).expect("connect")),
        }
    }

    fn row(&mut self, seq: u64) -> (Vec<u8>, Vec<u8>) {
        let q = "SELECT hash, body FROM records WHERE host_id = $1 AND seq = $2";
        match self {
            Db::Lite(c) => {
                let r = lite::blocks(c, seq, seq)
                    .into_iter()
                    .flat_map(|(_, records)| records)
                    .find(|r| r.seq == seq)
                    .expect("row");
                (r.hash, r.body)
            }
            Db::Pg(c) => {
                let r = c.query_one(q, &[&HOST, &(seq as i64)]).expect("row");
                (r.get(0), r.get(1))
            }
        }
    }

    fn put(&mut self, seq: u64, hash: &[u8], body: &[u8]) {
        let prev = Record::decode(body)
            .map(|r| r.prev_hash)
            .unwrap_or_default();
        let q = "UPDATE records SET hash = $1, prev_hash = $2, body = $3
                 WHERE host_id = $4 AND seq = $5";
        match self {
            Db::Lite(c) => {
                for (id, mut records) in lite::blocks(c, seq, seq) {
                    for r in records.iter_mut().filter(|r| r.seq == seq) {
                        r.hash = hash.to_vec();
                        r.prev_hash.clone_from(&prev);
                        r.body = body.to_vec();
                    }
                    lite::put(c, id, records);
                }
            }
            Db::Pg(c) => {
                c.execute(q, &[&hash, &prev, &body, &HOST, &(seq as i64)])
                    .expect("update");
            }
        }
    }

    /// Deletes records with seq in `from..=to`.
    fn delete(&mut self, from: u64, to: u64) {
        let q = "DELETE FROM records WHERE host_id = $1 AND seq >= $2 AND seq <= $3";
        let to = to.min(i64::MAX as u64) as i64;
        match self {
            Db::Lite(c) => {
                for (id, mut records) in lite::blocks(c, from, to as u64) {
                    records.retain(|r| r.seq < from || r.seq > to as u64);
                    lite::put(c, id, records);
                }
            }
            Db::Pg(c) => {
                c.execute(q, &[&HOST, &(from as i64), &to]).expect("delete");
            }
        }
    }

    fn set_head_hash(&mut self, hash: &[u8]) {
        let q = "UPDATE hosts SET head_hash = $1 WHERE host_id = $2";
        match self {
            Db::Lite(c) => {
                c.execute(q, rusqlite::params![hash, HOST]).expect("head");
            }
            Db::Pg(c) => {
                c.execute(q, &[&hash, &HOST]).expect("head");
            }
        }
    }
}

/// SQLite keeps records in blocks (`phi_collector::store::block`): the intruder decodes,
/// edits and writes them back.
mod lite {
    use phi_collector::store::block::{self, StoredRecord};

    use super::HOST;

    /// The blocks of `HOST` that hold records in `from..=to`, decoded.
    pub fn blocks(c: &rusqlite::Connection, from: u64, to: u64) -> Vec<(i64, Vec<StoredRecord>)> {
        let to = to.min(i64::MAX as u64) as i64;
        let mut stmt = c
            .prepare(
                "SELECT id, data FROM blocks WHERE host_id = ?1 AND last_seq >= ?2
                 AND first_seq <= ?3 ORDER BY first_seq",
            )
            .expect("blocks");
        let rows: Vec<(i64, Vec<u8>)> = stmt
            .query_map(rusqlite::params![HOST, from as i64, to], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("blocks")
            .collect::<Result<_, _>>()
            .expect("blocks");
        rows.into_iter()
            .map(|(id, data)| (id, block::decode(id, &data).expect("decode")))
            .collect()
    }

    /// Writes block `id` back with `records` (deletes it when none are left).
    pub fn put(c: &rusqlite::Connection, id: i64, records: Vec<StoredRecord>) {
        if records.is_empty() {
            c.execute("DELETE FROM blocks WHERE id = ?1", [id])
                .expect("delete block");
            return;
        }
        let (first, last) = (records[0].seq, records[records.len() - 1].seq);
        let data = block::encode(records).expect("encode");
        c.execute(
            "UPDATE blocks SET data = ?2, first_seq = ?3, last_seq = ?4 WHERE id = ?1",
            rusqlite::params![id, data, first as i64, last as i64],
        )
        .expect("update block");
    }
}

/// The chain, as stored: (head seq, checkpoint seqs, seqs of open records).
struct Stored {
    head: u64,
    checkpoints: Vec<u64>,
    opens: Vec<u64>,
}

/// Runs a real agent against a real collector on `db` until `OPENS` opens and a few
/// checkpoints are stored; returns the shape of the stored chain.
fn populate(pki: &Pki, db: Option<&str>) -> (Collector, Stored) {
    let mut collector = Collector::start_on(pki, db, &[]);
    let w = TestDir::new("tamper");
    let config = w.file(
        "agent.toml",
        "[chain]\ncheckpoint_records = 10\ncheckpoint_seconds = 3600\n",
    );
    let data = w.path().join("ehr");
    std::fs::create_dir_all(&data).expect("data dir");
    // Written before the agent starts: only the reads below are recorded.
    let files: Vec<PathBuf> = (0..OPENS)
        .map(|i| {
            let p = data.join(format!("patient-{i:03}.json"));
            std::fs::write(&p, "{}").expect("write");
            p
        })
        .collect();
    let mut args: Vec<std::ffi::OsString> = vec![
        "--config".into(),
        config.into(),
        "--watch".into(),
        data.clone().into(),
        "--no-connect".into(),
    ];
    args.extend(pki.agent_args(&collector.url(), HOST, HOST));
    let mut agent = Agent::start(args);
    // In groups, each seen by the agent before the next: the agent signs a checkpoint at
    // the end of a batch that crossed ten records.
    for group in files.chunks(10) {
        for f in group {
            open_close(f);
        }
        let last = group.last().expect("group");
        agent.wait_for(
            "the group's last open",
            integration_tests::is::open_of(last),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let stopped = agent.stop();
    assert!(stopped.status.success());
    let records = collector.wait_for(
        HOST,
        "every open and the stop record",
        Duration::from_secs(30),
        |r| {
            r.iter()
                .filter(|s| open_path(&s.record).is_some_and(|p| p.contains("patient-")))
                .count()
                == OPENS
                && r.iter()
                    .any(|s| matches!(&s.record.event, Some(Event::Agent(a)) if a.phase == 2))
        },
    );
    let head = records.last().expect("records").sealed.seq;
    let checkpoints: Vec<u64> = collector
        .store()
        .checkpoints(HOST, 0, u64::MAX)
        .expect("checkpoints")
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert!(
        checkpoints.len() >= 5,
        "checkpoints every 10 records: {checkpoints:?}"
    );
    assert_eq!(
        checkpoints.last(),
        Some(&head),
        "the stop checkpoint signs the head"
    );
    let opens = records
        .iter()
        .filter(|s| open_path(&s.record).is_some_and(|p| p.contains("patient-")))
        .map(|s| s.sealed.seq)
        .collect();
    // The intact chain verifies.
    let ok = collector.phictl_db(&["verify", "--host", HOST]);
    assert!(ok.ok(), "{}", ok.text());
    collector.stop();
    (
        collector,
        Stored {
            head,
            checkpoints,
            opens,
        },
    )
}

/// One kind of tampering: its name, the edit, the seq verify must name and words it must use.
type Case = (&'static str, Box<dyn Fn(&mut Db)>, u64, &'static str);

/// The tampering, each on a fresh copy of the stored chain, and what verify must say.
fn cases(s: &Stored) -> Vec<Case> {
    let edit_at = s.opens[OPENS / 3];
    let delete_at = s.opens[OPENS / 2];
    let swap_at = s.opens[OPENS / 2 + 5];
    let keep_through = s.head - 4;
    let rewrite_from = s.opens[OPENS / 4];
    // The checkpoint before the rewritten record is the last one that still holds.
    let last_good = s
        .checkpoints
        .iter()
        .copied()
        .filter(|c| *c < rewrite_from)
        .max()
        .unwrap_or(0);
    let head = s.head;
    vec![
        (
            "change a path",
            Box::new(move |db: &mut Db| {
                let (hash, body) = db.row(edit_at);
                let mut r = Record::decode(body.as_slice()).expect("record");
                if let Some(Event::Open(o)) = &mut r.event {
                    o.path = "/srv/ehr/someone-else.json".into();
                }
                db.put(edit_at, &hash, &r.encode_to_vec());
            }),
            edit_at,
            "was changed",
        ),
        (
            "delete a row",
            Box::new(move |db: &mut Db| db.delete(delete_at, delete_at)),
            delete_at,
            "is missing",
        ),
        (
            "swap two rows",
            Box::new(move |db: &mut Db| {
                let (h1, b1) = db.row(swap_at);
                let (h2, b2) = db.row(swap_at + 1);
                db.put(swap_at, &h2, &b2);
                db.put(swap_at + 1, &h1, &b1);
            }),
            swap_at,
            "rows were moved",
        ),
        (
            "drop the newest rows",
            Box::new(move |db: &mut Db| db.delete(keep_through + 1, u64::MAX)),
            keep_through + 1,
            "are missing",
        ),
        (
            "rewrite a range and recompute its hashes",
            Box::new(move |db: &mut Db| {
                let (_, body) = db.row(rewrite_from);
                let mut prev = Record::decode(body.as_slice()).expect("record").prev_hash;
                for seq in rewrite_from..=head {
                    let (_, body) = db.row(seq);
                    let mut r = Record::decode(body.as_slice()).expect("record");
                    if seq == rewrite_from
                        && let Some(Event::Open(o)) = &mut r.event
                    {
                        o.path = "/srv/ehr/nobody.json".into();
                    }
                    r.prev_hash.clone_from(&prev);
                    let body = r.encode_to_vec();
                    let hash = link_hash(&prev, &body).to_vec();
                    db.put(seq, &hash, &body);
                    prev = hash;
                }
                db.set_head_hash(&prev);
            }),
            last_good + 1,
            "were rewritten after they were signed",
        ),
    ]
}

fn expect_failure(out: &Phictl, seq: u64, words: &str, case: &str) {
    assert_eq!(out.code, 1, "{case}: verify must fail\n{}", out.text());
    assert!(
        out.stdout.contains(&format!("first bad seq {seq}:")),
        "{case}: must name seq {seq}\n{}",
        out.text()
    );
    assert!(
        out.stdout.contains(words),
        "{case}: must say {words:?}\n{}",
        out.text()
    );
}

#[test]
fn every_edit_of_a_sqlite_store_is_named_by_verify() {
    let pki = Pki::new(&[HOST]);
    let (collector, stored) = populate(&pki, None);
    let original = collector
        .db
        .strip_prefix("sqlite:")
        .expect("sqlite")
        .to_owned();
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, (case, tamper, seq, words)) in cases(&stored).into_iter().enumerate() {
        let copy = dir.path().join(format!("case-{i}.db"));
        std::fs::copy(&original, &copy).expect("copy the database");
        let url = format!("sqlite:{}", copy.display());
        tamper(&mut Db::open(&url));
        let out = Phictl::run(
            std::process::Command::new(integration_tests::collector::phictl_bin())
                .args(["--db", &url, "verify", "--host", HOST]),
        );
        expect_failure(&out, seq, words, case);
    }
}

#[test]
fn every_edit_of_a_postgres_store_is_named_by_verify_also_through_the_api() {
    let pg = Postgres::start();
    let base = pg.database("tamper_base");
    let pki = Pki::new(&[HOST]);
    let (collector, stored) = populate(&pki, Some(&base));
    drop(collector);
    for (i, (case, tamper, seq, words)) in cases(&stored).into_iter().enumerate() {
        let url = pg.copy_database("tamper_base", &format!("tamper_case_{i}"));
        tamper(&mut Db::open(&url));
        let out = Phictl::run(
            std::process::Command::new(integration_tests::collector::phictl_bin())
                .args(["--db", &url, "verify", "--host", HOST]),
        );
        expect_failure(&out, seq, words, case);
        if i == 0 {
            // The same verdict from a running collector's API.
            let c = Collector::start_on(&pki, Some(&url), &[]);
            let token = c.token_for("auditor1", "auditor");
            let out = c.phictl_api(&pki, &token, &["verify", "--host", HOST]);
            expect_failure(&out, seq, words, case);
        }
    }
}
