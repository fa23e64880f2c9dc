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
