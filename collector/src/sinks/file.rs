//! `ocsf_file`: OCSF JSON lines appended to a local file, synced after every batch, rotated
//! by size (`path` → `path.1` → `path.2` …, the oldest removed past `max_files`). A line
//! torn by a crash is cut off when the file is opened again; its events are delivered again
//! because the sink's position had not moved past them.

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
};

use super::{Event, Sink, SinkError, config::OcsfFileConfig, ocsf};

pub const DEFAULT_MAX_BYTES: u64 = 100 << 20;
pub const DEFAULT_MAX_FILES: u32 = 10;

struct Open {
    file: File,
    size: u64,
}

struct Writer {
    path: PathBuf,
    max_bytes: u64,
    max_files: u32,
    open: Option<Open>,
}

pub struct OcsfFile {
    writer: Option<Writer>,
}

impl OcsfFile {
    pub fn new(c: &OcsfFileConfig) -> OcsfFile {
        OcsfFile {
            writer: Some(Writer {
                path: c.path.clone(),
                max_bytes: c.max_bytes.unwrap_or(DEFAULT_MAX_BYTES),
                max_files: c.max_files.unwrap_or(DEFAULT_MAX_FILES),
                open: None,
            }),
        }
    }
}

fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => File::open(".")?.sync_all(),
    }
}

impl Writer {
    fn open(&mut self) -> Result<&mut Open, SinkError> {
        if self.open.is_none() {
            let mut file = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| SinkError::new("open", format!("{}: {e}", self.path.display())))?;
            let mut size = file
                .metadata()
                .map_err(|e| SinkError::new("stat", e))?
                .len();
            if size > 0 {
                // Cut a torn last line (a crash in the middle of a write).
                let mut tail = Vec::new();
                let from = size.saturating_sub(1 << 20);
                file.seek(SeekFrom::Start(from))
                    .and_then(|_| file.read_to_end(&mut tail))
                    .map_err(|e| SinkError::new("read", e))?;
                if tail.last() != Some(&b'\n') {
                    let keep = tail
                        .iter()
                        .rposition(|b| *b == b'\n')
                        .map_or(from, |i| from + i as u64 + 1);
                    tracing::warn!(
                        path = %self.path.display(),
                        "cutting a torn last line ({} bytes)",
                        size - keep
                    );
                    file.set_len(keep)
                        .and_then(|()| file.sync_data())
                        .map_err(|e| SinkError::new("truncate", e))?;
                    size = keep;
                }
            }
            self.open = Some(Open { file, size });
        }
        self.open
            .as_mut()
            .ok_or_else(|| SinkError::new("open", "no file"))
    }

    fn rotate(&mut self) -> Result<(), SinkError> {
        if let Some(o) = self.open.take() {
            o.file.sync_all().map_err(|e| SinkError::new("fsync", e))?;
        }
        let oldest = rotated(&self.path, self.max_files);
        if oldest.exists() {
            std::fs::remove_file(&oldest).map_err(|e| SinkError::new("remove", e))?;
        }
        for n in (1..self.max_files).rev() {
            let from = rotated(&self.path, n);
            if from.exists() {
                std::fs::rename(&from, rotated(&self.path, n + 1))
                    .map_err(|e| SinkError::new("rename", e))?;
            }
        }
        std::fs::rename(&self.path, rotated(&self.path, 1))
            .map_err(|e| SinkError::new("rename", e))?;
        sync_dir(&self.path).map_err(|e| SinkError::new("fsync", e))?;
        Ok(())
    }

    fn write(&mut self, lines: &[String]) -> Result<(), SinkError> {
        let result = self.write_lines(lines);
        if result.is_err() {
            // Reopen (and cut what was half written) on the next attempt.
            self.open = None;
        }
        result
    }

    fn write_lines(&mut self, lines: &[String]) -> Result<(), SinkError> {
        let mut buf = Vec::new();
        for line in lines {
            let size = self.open()?.size + buf.len() as u64;
            if size > 0 && size + line.len() as u64 + 1 > self.max_bytes {
                let o = self.open()?;
                o.file
                    .write_all(&buf)
                    .map_err(|e| SinkError::new("write", e))?;
                o.size += buf.len() as u64;
                buf.clear();
                self.rotate()?;
            }
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
        }
        let o = self.open()?;
        o.file
            .write_all(&buf)
            .map_err(|e| SinkError::new("write", e))?;
        o.size += buf.len() as u64;
        o.file.sync_data().map_err(|e| SinkError::new("fsync", e))?;
        Ok(())
    }
}

#[tonic::async_trait]
impl Sink for OcsfFile {
    async fn send(&mut self, events: &[Event]) -> Result<(), SinkError> {
        let lines: Vec<String> = events.iter().map(ocsf::line).collect();
        let mut writer = self
            .writer
            .take()
            .ok_or_else(|| SinkError::new("write", "the file writer was lost"))?;
        let (writer, result) = tokio::task::spawn_blocking(move || {
            let r = writer.write(&lines);
            (writer, r)
        })
        .await
        .map_err(|e| SinkError::new("write", e))?;
        self.writer = Some(writer);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::event::RecordEvent;
    use phi_proto::v1::{Heartbeat, Record, record::Event as Kind};

    fn heartbeat(seq: u64) -> Event {
        Event::Record(RecordEvent {
            host_id: "h".into(),
            seq,
            hash: vec![1; 32],
            record: Box::new(Record {
                seq,
                host_id: "h".into(),
                time: Some(phi_proto::Timestamp {
                    seconds: 1_793_491_200,
                    nanos: 0,
                }),
                event: Some(Kind::Heartbeat(Heartbeat::default())),
                ..Default::default()
            }),
        })
    }

    fn seqs(path: &Path) -> Vec<u64> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("json line");
                v["unmapped"]["phi_audit"]["seq"].as_u64().expect("seq")
            })
            .collect()
    }

    #[tokio::test]
    async fn rotates_by_size_and_cuts_a_torn_line() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("events.jsonl");
        // A torn line from a crash in the middle of a write.
        std::fs::write(&path, "{\"class_uid\":0,\"unma").expect("write");
        let one = ocsf::line(&heartbeat(1)).len() as u64 + 1;
        let mut sink = OcsfFile::new(&OcsfFileConfig {
            name: "f".into(),
            path: path.clone(),
            max_bytes: Some(one * 3),
            max_files: Some(2),
            delivery: Default::default(),
        });
        let batch: Vec<Event> = (1..=4).map(heartbeat).collect();
        sink.send(&batch).await.expect("send");
        assert_eq!(seqs(&rotated(&path, 1)), [1, 2, 3], "the torn line is gone");
        assert_eq!(seqs(&path), [4]);
        let batch: Vec<Event> = (5..=10).map(heartbeat).collect();
        sink.send(&batch).await.expect("send");
        // .1 newest full file, .2 the one before; older ones removed (max_files = 2).
        assert_eq!(seqs(&rotated(&path, 2)), [4, 5, 6]);
        assert_eq!(seqs(&rotated(&path, 1)), [7, 8, 9]);
        assert_eq!(seqs(&path), [10]);
        assert!(!rotated(&path, 3).exists());
    }
}
