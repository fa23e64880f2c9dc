//! Where records go. For now: JSON lines on standard output (`--stdout`); the spool and the
//! collector stream attach here too.

use std::io::{self, BufWriter, Write};

use phi_proto::v1::Record;

/// A destination for records, in chain order.
pub trait Sink {
    fn write(&mut self, record: &Record) -> io::Result<()>;
    /// Makes everything written so far visible downstream.
    fn flush(&mut self) -> io::Result<()>;
}

/// One JSON object per record per line: the proto3 JSON mapping of `phiaudit.v1.Record`.
pub struct JsonLines<W: Write> {
    out: BufWriter<W>,
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
        }
    }
}

impl<W: Write> Sink for JsonLines<W> {
    fn write(&mut self, record: &Record) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, record).map_err(io::Error::other)?;
        self.out.write_all(b"\n")
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use phi_proto::v1::{Open, Outcome, record::Event};

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
            sink.write(&rec).expect("write");
            sink.write(&rec).expect("write");
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
}
