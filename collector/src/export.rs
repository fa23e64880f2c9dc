//! Evidence bundles: one host's records for a time window, with the signed checkpoints that
//! cover them and the host's public key, in a single `.tar.gz` that anyone can verify
//! offline (`phictl verify-bundle`), without the collector or its database.
//!
//! The window is widened to whole checkpoint intervals, so that every record in it is covered
//! by a signature: the bundle starts right after a checkpoint (or at the chain's start) and
//! ends at the next checkpoint after the window (or at the newest record, when none is signed
//! yet; the verifier says so).
//!
//! Contents, in this order (`manifest.json` names every other file with its SHA-256):
//!
//! | file | what |
//! | --- | --- |
//! | `manifest.json` | format, host, key, window, seq ranges, files and their hashes |
//! | `README.txt` | what the bundle is and how to verify it |
//! | `checkpoints.pb` | `phiaudit.v1.Checkpoint` messages, length-delimited, in seq order |
//! | `records.pb` | `phiaudit.v1.SealedRecord` messages (the hashed bytes), length-delimited |
//! | `records.jsonl` | the same records decoded, one proto3 JSON object per line |
//! | `alerts.json` | tamper alerts the collector raised for the host |

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, BufReader, BufWriter, Read, Write},
    path::Path,
};

use phi_chain::{
    checkpoint,
    seal::{GENESIS, check_hash},
};
use phi_proto::v1::{Checkpoint, Record, SealedRecord};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::store::{Store, StoreError};

pub const FORMAT: &str = "phi-audit-evidence/1";
const PAGE: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("writing the bundle: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Invalid(String),
}

/// What to export.
#[derive(Clone, Debug)]
pub struct ExportSpec {
    pub host_id: String,
    pub since_ns: i64,
    pub until_ns: i64,
    /// Who asked ("alice (auditor)").
    pub created_by: String,
    /// Which collector produced it.
    pub collector: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    pub name: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format: String,
    pub created: String,
    pub created_by: String,
    pub collector: String,
    pub collector_version: String,
    pub host_id: String,
    /// The host's Ed25519 public key (hex) and its id, SHA-256 of the key (hex). Compare the
    /// id with the `keyId` of the host's agent start records or `phictl hosts`.
    pub public_key: String,
    pub key_id: String,
    /// The requested window (RFC 3339; `until` exclusive).
    pub since: String,
    pub until: String,
    /// Records whose time is in the window: seq range and count (0 when none).
    pub window_first_seq: u64,
    pub window_last_seq: u64,
    /// All records in the bundle (the window widened to checkpoints).
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    /// The checkpoint whose head hash the first record links to (0: the chain's start).
    pub anchor_seq: u64,
    pub checkpoints: u64,
    /// The last record covered by a checkpoint signature in the bundle.
    pub signed_through: u64,
    pub files: Vec<FileEntry>,
}

/// A file being written with its hash and size.
struct Part {
    name: &'static str,
    file: BufWriter<File>,
    hash: Sha256,
    bytes: u64,
}

impl Part {
    fn create(dir: &Path, name: &'static str) -> io::Result<Part> {
        Ok(Part {
            name,
            file: BufWriter::new(File::create(dir.join(name))?),
            hash: Sha256::new(),
            bytes: 0,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hash.update(bytes);
        self.bytes += bytes.len() as u64;
        self.file.write_all(bytes)
    }

    fn finish(mut self) -> io::Result<FileEntry> {
        self.file.flush()?;
        Ok(FileEntry {
            name: self.name.into(),
            sha256: hex::encode(self.hash.finalize()),
            bytes: self.bytes,
        })
    }
}

pub fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

const README: &str = "phi-audit evidence bundle

This archive holds audit records of one host, exactly as the host's agent sealed them into
its SHA-256 hash chain, with the Ed25519-signed checkpoints that cover them.

Verify it offline:

    phictl verify-bundle THIS_FILE

The verifier checks every file against manifest.json, every checkpoint signature with the
host key in manifest.json, that the records link without a gap from the anchor checkpoint,
and that each checkpoint signs the record at its seq. Compare the key id in manifest.json
with the host's key id from a trusted source (the agent's start records, `phictl hosts`).

records.jsonl is a readable copy of records.pb (proto3 JSON, one record per line); the
verifier checks that it says exactly what records.pb says.
";

/// Writes the bundle for `spec` as `.tar.gz` to `out`; `progress(done, total)` follows the
/// records.
pub fn write_bundle(
    store: &mut dyn Store,
    spec: &ExportSpec,
    out: impl Write,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Manifest, ExportError> {
    let info = store.host_info(&spec.host_id)?.ok_or_else(|| {
        ExportError::Invalid(format!(
            "no host {:?} in this store (phictl hosts lists them)",
            spec.host_id
        ))
    })?;
    if spec.until_ns <= spec.since_ns {
        return Err(ExportError::Invalid(
            "the window is empty: --until must be after --since".into(),
        ));
    }
    let window = store.seq_range(&spec.host_id, spec.since_ns, spec.until_ns)?;
    let (window_first, window_last) = window.unwrap_or((0, 0));
    // Widen to checkpoint boundaries.
    let (first, last) = match window {
        None => (0, 0),
        Some((lo, hi)) => {
            let start = store
                .checkpoint_near(&spec.host_id, lo, false)?
                .map_or(info.anchor_seq + 1, |c| c + 1)
                .max(info.anchor_seq + 1);
            let end = store
                .checkpoint_near(&spec.host_id, hi, true)?
                .unwrap_or(info.head_seq)
                .min(info.head_seq)
                .max(hi);
            (start, end)
        }
    };
    let anchor = first.saturating_sub(1);

    let dir = tempfile::tempdir()?;
    let mut readme = Part::create(dir.path(), "README.txt")?;
    readme.write(README.as_bytes())?;
    let mut cps = Part::create(dir.path(), "checkpoints.pb")?;
    let mut checkpoints = 0u64;
    let mut signed_at: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    if first > 0 {
        for (seq, body) in store.checkpoints(&spec.host_id, anchor, last)? {
            let cp = Checkpoint::decode(body.as_slice()).map_err(|e| {
                ExportError::Invalid(format!(
                    "the stored checkpoint at seq {seq} is damaged: {e}"
                ))
            })?;
            signed_at.insert(seq, cp.head_hash.clone());
            cps.write(&cp.encode_length_delimited_to_vec())?;
            checkpoints += 1;
        }
    }
    let mut recs = Part::create(dir.path(), "records.pb")?;
    let mut json = Part::create(dir.path(), "records.jsonl")?;
    let total = if first == 0 { 0 } else { last - first + 1 };
    let mut done = 0u64;
    let mut signed_through = 0;
    if first > 0 {
        let mut after = first - 1;
        'pages: loop {
            let rows = store.chain(&spec.host_id, after, PAGE)?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                if row.seq > last {
                    break 'pages;
                }
                after = row.seq;
                let record = Record::decode(row.body.as_slice()).map_err(|e| {
                    ExportError::Invalid(format!(
                        "the stored record {} does not decode ({e}): run phictl verify",
                        row.seq
                    ))
                })?;
                if signed_at.get(&row.seq) == Some(&row.hash) {
                    signed_through = row.seq;
                }
                let sealed = SealedRecord {
                    seq: row.seq,
                    body: row.body,
                    hash: row.hash,
                };
                recs.write(&sealed.encode_length_delimited_to_vec())?;
                json.write(json_line(&record)?.as_bytes())?;
                done += 1;
            }
            progress(done, total);
        }
    }
    progress(done, total);
    let alerts: Vec<serde_json::Value> = store
        .alerts(Some(&spec.host_id))?
        .into_iter()
        .map(|a| {
            serde_json::json!({
                "id": a.id,
                "time": rfc3339(a.time_ns),
                "kind": a.alert.kind,
                "seq": a.alert.seq,
                "detail": a.alert.detail,
                "evidence": hex::encode(&a.alert.evidence),
            })
        })
        .collect();
    let mut alerts_part = Part::create(dir.path(), "alerts.json")?;
    alerts_part.write(
        serde_json::to_string_pretty(&alerts)
            .map_err(io::Error::other)?
            .as_bytes(),
    )?;

    let files = vec![
        readme.finish()?,
        cps.finish()?,
        recs.finish()?,
        json.finish()?,
        alerts_part.finish()?,
    ];
    let manifest = Manifest {
        format: FORMAT.into(),
        created: rfc3339(crate::store::now_ns()),
        created_by: spec.created_by.clone(),
        collector: spec.collector.clone(),
        collector_version: env!("CARGO_PKG_VERSION").into(),
        host_id: spec.host_id.clone(),
        public_key: hex::encode(&info.public_key),
        key_id: hex::encode(checkpoint::key_id(&info.public_key)),
        since: rfc3339(spec.since_ns),
        until: rfc3339(spec.until_ns),
        window_first_seq: window_first,
        window_last_seq: window_last,
        first_seq: first,
        last_seq: if first == 0 { 0 } else { first + done - 1 },
        records: done,
        anchor_seq: if first == 0 { 0 } else { anchor },
        checkpoints,
        signed_through,
        files,
    };

    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let manifest_bytes = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?;
    append(&mut tar, "manifest.json", &manifest_bytes)?;
    for f in &manifest.files {
        let mut header = tar::Header::new_gnu();
        header.set_size(f.bytes);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        tar.append_data(&mut header, &f.name, File::open(dir.path().join(&f.name))?)?;
    }
    tar.into_inner()?.finish()?.flush()?;
    Ok(manifest)
}

/// Size and SHA-256 (hex) of a finished bundle file, read from its start.
pub fn file_digest(file: &mut File) -> io::Result<(u64, String)> {
    use std::io::Seek as _;
    file.rewind()?;
    let mut hasher = Sha256::new();
    let bytes = io::copy(file, &mut hasher)?;
    file.rewind()?;
    Ok((bytes, hex::encode(hasher.finalize())))
}

fn append<W: Write>(tar: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, name, bytes)
}

/// The readable form of a record: its proto3 JSON and a newline.
fn json_line(record: &Record) -> io::Result<String> {
    let mut line = serde_json::to_string(record).map_err(io::Error::other)?;
    line.push('\n');
    Ok(line)
}

/// What the offline verifier found.
#[derive(Clone, Debug, Default)]
pub struct BundleReport {
    pub manifest: Manifest,
    pub ok: bool,
    /// Everything wrong, first problem first.
    pub problems: Vec<String>,
    pub notes: Vec<String>,
    pub records: u64,
    pub checkpoints: u64,
    pub signed_through: u64,
}

/// Reads a length-delimited message stream.
fn delimited<M: prost::Message + Default>(bytes: &[u8]) -> Result<Vec<M>, String> {
    let mut buf = bytes;
    let mut out = Vec::new();
    while !buf.is_empty() {
        out.push(M::decode_length_delimited(&mut buf).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

/// Verifies a bundle read from `input` (a `.tar.gz`), without any other source.
pub fn verify_bundle(
    input: impl Read,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<BundleReport, ExportError> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(input)));
    let mut report = BundleReport::default();
    let mut manifest: Option<Manifest> = None;
    let mut seen: BTreeMap<String, (String, u64)> = BTreeMap::new();
    let mut checkpoints: BTreeMap<u64, Checkpoint> = BTreeMap::new();
    let mut regenerated_json = Sha256::new();
    let mut key: Vec<u8> = Vec::new();
    let bad = |m: String| ExportError::Invalid(m);
    for entry in archive
        .entries()
        .map_err(|e| bad(format!("not a phi-audit evidence bundle (.tar.gz): {e}")))?
    {
        let mut entry =
            entry.map_err(|e| bad(format!("the archive is damaged or truncated: {e}")))?;
        let name = entry
            .path()
            .map_err(|e| bad(format!("an archive entry has no usable name: {e}")))?
            .to_string_lossy()
            .into_owned();
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("{name}: cannot read it: {e}")))?;
        if name == "manifest.json" {
            let m: Manifest = serde_json::from_slice(&bytes)
                .map_err(|e| bad(format!("manifest.json is not a manifest: {e}")))?;
            if m.format != FORMAT {
                return Err(bad(format!(
                    "this bundle has format {:?}; this phictl reads {FORMAT}",
                    m.format
                )));
            }
            key = hex::decode(&m.public_key)
                .map_err(|_| bad("manifest.json: public_key is not hex".into()))?;
            if hex::encode(checkpoint::key_id(&key)) != m.key_id {
                report
                    .problems
                    .push("manifest.json: key_id is not the SHA-256 of public_key".into());
            }
            manifest = Some(m);
            continue;
        }
        let Some(m) = manifest.as_ref() else {
            return Err(bad(
                "manifest.json must be the first file in the bundle".into()
            ));
        };
        seen.insert(
            name.clone(),
            (hex::encode(Sha256::digest(&bytes)), bytes.len() as u64),
        );
        match name.as_str() {
            "checkpoints.pb" => match delimited::<Checkpoint>(&bytes) {
                Ok(list) => {
                    let mut prev: Option<Vec<u8>> = None;
                    for cp in list {
                        // The first checkpoint links to one outside the bundle, unless the
                        // bundle starts the chain.
                        let expected = prev.clone().unwrap_or_else(|| {
                            if m.first_seq <= 1 {
                                Vec::new()
                            } else {
                                cp.prev_signature.clone()
                            }
                        });
                        if cp.host_id != m.host_id {
                            report.problems.push(format!(
                                "checkpoint at seq {} is for host {:?}",
                                cp.seq, cp.host_id
                            ));
                        } else if let Err(e) = checkpoint::verify(&cp, &key, &expected) {
                            report.problems.push(e.to_string());
                        }
                        prev = Some(cp.signature.clone());
                        checkpoints.insert(cp.seq, cp);
                    }
                    report.checkpoints = checkpoints.len() as u64;
                }
                Err(e) => report
                    .problems
                    .push(format!("checkpoints.pb does not decode: {e}")),
            },
            "records.pb" => {
                let records = match delimited::<SealedRecord>(&bytes) {
                    Ok(r) => r,
                    Err(e) => {
                        report
                            .problems
                            .push(format!("records.pb does not decode: {e}"));
                        continue;
                    }
                };
                let total = records.len() as u64;
                let mut prev_hash: Vec<u8> = if m.first_seq <= 1 {
                    GENESIS.to_vec()
                } else {
                    match checkpoints.get(&(m.first_seq - 1)) {
                        Some(cp) => cp.head_hash.clone(),
                        None => {
                            report.problems.push(format!(
                                "the first record ({}) is not anchored: the checkpoint at seq {} \
                                 is not in the bundle",
                                m.first_seq,
                                m.first_seq - 1
                            ));
                            Vec::new()
                        }
                    }
                };
                let mut expected_seq = m.first_seq;
                let mut broken = !report.problems.is_empty();
                for (i, sealed) in records.into_iter().enumerate() {
                    if sealed.seq != expected_seq {
                        report.problems.push(format!(
                            "record {expected_seq} is missing (found {} in its place)",
                            sealed.seq
                        ));
                        broken = true;
                        expected_seq = sealed.seq;
                    }
                    let link = if prev_hash.is_empty() {
                        Record::decode(sealed.body.as_slice())
                            .map(|r| r.prev_hash)
                            .unwrap_or_default()
                    } else {
                        prev_hash.clone()
                    };
                    match check_hash(&link, &sealed) {
                        Ok(record) => {
                            if record.host_id != m.host_id {
                                report.problems.push(format!(
                                    "record {} is for host {:?}",
                                    sealed.seq, record.host_id
                                ));
                                broken = true;
                            }
                            regenerated_json.update(json_line(&record)?.as_bytes());
                        }
                        Err(e) => {
                            report.problems.push(format!("record {}: {e}", sealed.seq));
                            broken = true;
                        }
                    }
                    if let Some(cp) = checkpoints.get(&sealed.seq) {
                        if cp.head_hash == sealed.hash {
                            if !broken {
                                report.signed_through = sealed.seq;
                            }
                        } else {
                            report.problems.push(format!(
                                "the checkpoint at seq {} signs another record than the one in \
                                 the bundle",
                                sealed.seq
                            ));
                            broken = true;
                        }
                    }
                    prev_hash.clone_from(&sealed.hash);
                    expected_seq += 1;
                    report.records += 1;
                    if i % PAGE == 0 {
                        progress(i as u64, total);
                    }
                }
                progress(total, total);
                if m.records != report.records {
                    report.problems.push(format!(
                        "the manifest lists {} records, records.pb holds {}",
                        m.records, report.records
                    ));
                }
            }
            "records.jsonl" => {
                let regenerated = hex::encode(regenerated_json.clone().finalize());
                if regenerated != hex::encode(Sha256::digest(&bytes)) {
                    report.problems.push(
                        "records.jsonl does not say what records.pb says (it was edited)".into(),
                    );
                }
            }
            _ => {}
        }
    }
    let Some(manifest) = manifest else {
        return Err(bad("the bundle has no manifest.json".into()));
    };
    for f in &manifest.files {
        match seen.get(&f.name) {
            None => report
                .problems
                .push(format!("{} is listed in the manifest but missing", f.name)),
            Some((sha, bytes)) if *sha != f.sha256 || *bytes != f.bytes => {
                report.problems.push(format!(
                    "{} was changed: its SHA-256 differs from the manifest",
                    f.name
                ))
            }
            Some(_) => {}
        }
    }
    for name in seen.keys() {
        if !manifest.files.iter().any(|f| &f.name == name) {
            report
                .problems
                .push(format!("{name} is in the bundle but not in the manifest"));
        }
    }
    if report.records > 0 && report.signed_through < manifest.last_seq {
        report.notes.push(format!(
            "records {} to {} are hash-linked but not covered by a checkpoint signature yet \
             (they were the newest when the bundle was made)",
            report
                .signed_through
                .max(manifest.first_seq.saturating_sub(1))
                + 1,
            manifest.last_seq
        ));
    }
    if manifest.window_first_seq == 0 {
        report
            .notes
            .push("the host has no records in the requested window".into());
    }
    report.ok = report.problems.is_empty();
    report.manifest = manifest;
    Ok(report)
}
