//! Where records go. For now: JSON lines on standard output (`--stdout`); the spool and the
//! collector stream attach here too.

mod json;

use std::io::{self, BufWriter, Write};

use phi_proto::v1::Record;

use crate::record::Prepared;

/// A destination for records, in chain order.
pub trait Sink {
    /// Writes `record`; a record from the kernel comes without its process context, which
    /// is `process`.
    fn write(&mut self, record: &Record, process: Option<&Prepared>) -> io::Result<()>;
    /// Makes everything written so far visible downstream.
    fn flush(&mut self) -> io::Result<()>;
}

/// One JSON object per record per line: the proto3 JSON mapping of `phiaudit.v1.Record`. A
/// prepared process context is serialized once for all its records and written as the last
/// member.
pub struct JsonLines<W: Write> {
    out: BufWriter<W>,
    line: Vec<u8>,
    json: json::RecordWriter,
}

impl JsonLines<io::Stdout> {
    pub fn stdout() -> Self {
        JsonLines::new(io::stdout())
    }
}

impl<W: Write> JsonLines<W> {
    pub fn new(w: W) -> Self {
        JsonLines {
            out: BufWriter::with_capacity(1 << 16, w),
            line: Vec::with_capacity(4096),
            json: json::RecordWriter::default(),
        }
    }
}

impl<W: Write> Sink for JsonLines<W> {
    fn write(&mut self, record: &Record, process: Option<&Prepared>) -> io::Result<()> {
        self.line.clear();
        self.json.record(&mut self.line, record)?;
        if let Some(process) = process {
            let context = process.json().map_err(io::Error::other)?;
            // `{…}` becomes `{…,"process":{…}}`.
            self.line.pop();
            if self.line.len() > 1 {
                self.line.push(b',');
            }
            self.line.extend_from_slice(b"\"process\":");
            self.line.extend_from_slice(context);
            self.line.push(b'}');
        }
        self.line.push(b'\n');
        self.out.write_all(&self.line)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use phi_proto::v1::{Open, Outcome, Process, record::Event};

    use super::*;

    #[test]
    fn writes_proto3_json_lines() {
        let mut buf = Vec::new();
        {
            let mut sink = JsonLines::new(&mut buf);
            let rec = Record {
                seq: 7,
                host_id: "h1".into(),
                event: Some(Event::Open(Open {
                    path: "/data/phi/a".into(),
                    read: true,
                    outcome: Some(Outcome {
                        success: true,
                        ret: 3,
                        errno: String::new(),
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            };
            sink.write(&rec, None).expect("write");
            sink.write(&rec, None).expect("write");
            sink.flush().expect("flush");
        }
        let text = String::from_utf8(buf).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).expect("json");
        // proto3 JSON: camelCase names, 64-bit integers as strings.
        assert_eq!(v["seq"], "7");
        assert_eq!(v["hostId"], "h1");
        assert_eq!(v["open"]["path"], "/data/phi/a");
        assert_eq!(v["open"]["outcome"]["ret"], "3");
        let back: Record = serde_json::from_str(lines[1]).expect("round trip");
        assert_eq!(back.seq, 7);
    }

    fn process(pid: u32, tid: u32, argv: &[&str]) -> Process {
        Process {
            pid,
            tid,
            comm: "psql".into(),
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            start_time: Some(phi_proto::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            ancestors: vec![phi_proto::v1::Ancestor {
                pid: 1,
                comm: "init".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// A prepared context, serialized once and written on each of its records, reads back on
    /// every line as that record's own `process`; records without one are written whole.
    #[test]
    fn each_line_carries_its_own_process_context() {
        let contexts = [
            Some(process(10, 10, &["psql", "-d", "ehr"])),
            Some(process(20, 20, &["cat"])),
            None,
            Some(Process::default()),
        ]
        .map(|p| p.map(|p| Prepared::new(p, Vec::new())));
        let mut want = Vec::new();
        let mut buf = Vec::new();
        {
            let mut sink = JsonLines::new(&mut buf);
            for (i, context) in [0, 0, 1, 0, 2, 3, 1].into_iter().enumerate() {
                let record = Record {
                    seq: i as u64 + 1,
                    host_id: "h1".into(),
                    event: Some(Event::Open(Open {
                        path: format!("/data/phi/{i}"),
                        ..Default::default()
                    })),
                    ..Default::default()
                };
                let context = contexts[context].as_ref();
                sink.write(&record, context).expect("write");
                want.push(Record {
                    process: context.map(|c| c.process.clone()),
                    ..record
                });
            }
            // A record with nothing but its context is still one valid object.
            sink.write(&Record::default(), contexts[1].as_ref())
                .expect("write");
            want.push(Record {
                process: Some(process(20, 20, &["cat"])),
                ..Default::default()
            });
            sink.flush().expect("flush");
        }
        let text = String::from_utf8(buf).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), want.len());
        for (line, want) in lines.iter().zip(&want) {
            let got: serde_json::Value = serde_json::from_str(line).expect("json");
            let direct: serde_json::Value =
                serde_json::from_str(&serde_json::to_string(want).expect("json")).expect("json");
            assert_eq!(got, direct, "{line}");
            let back: Record = serde_json::from_str(line).expect("round trip");
            assert_eq!(&back, want);
        }
    }
}
