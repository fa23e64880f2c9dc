//! A record's proto3 JSON, written directly: byte for byte what `serde_json` writes through the
//! pbjson serde impls, without their allocations (a `String` for every 64-bit number, hash and
//! time) and with a faster string escape. The envelope and the open event (most records of a
//! busy host) are written here; other events and an inline process go through serde.
//!
//! Equality with the serde output is the contract: the tests compare the two over every event
//! kind and over strings with every character class that JSON escapes.

use std::io;

use phi_proto::v1::{Open, OpenSyscall, Outcome, PathSource, Record, record::Event};

/// Writes records; keeps the text of the last second it formatted.
#[derive(Default)]
pub struct RecordWriter {
    /// Unix second and its `YYYY-MM-DDTHH:MM:SS` text.
    second: Option<(i64, Vec<u8>)>,
}

impl RecordWriter {
    /// Appends the JSON object of `record` to `out` (no newline).
    pub fn record(&mut self, out: &mut Vec<u8>, r: &Record) -> io::Result<()> {
        let start = out.len();
        if let Err(e) = self.envelope(out, r) {
            out.truncate(start);
            return Err(e);
        }
        Ok(())
    }

    fn envelope(&mut self, out: &mut Vec<u8>, r: &Record) -> io::Result<()> {
        out.extend_from_slice(b"{\"seq\":\"");
        out.extend_from_slice(itoa::Buffer::new().format(r.seq).as_bytes());
        out.extend_from_slice(b"\",\"prevHash\":\"");
        base64(out, &r.prev_hash);
        out.extend_from_slice(b"\",\"hash\":\"");
        base64(out, &r.hash);
        out.extend_from_slice(b"\",\"hostId\":");
        string(out, &r.host_id);
        if let Some(t) = &r.time {
            out.extend_from_slice(b",\"time\":");
            self.timestamp(out, t)?;
        }
        out.extend_from_slice(b",\"bootId\":");
        string(out, &r.boot_id);
        if let Some(p) = &r.process {
            out.extend_from_slice(b",\"process\":");
            serde(out, p)?;
        }
        out.extend_from_slice(b",\"redactions\":");
        if r.redactions.is_empty() {
            out.extend_from_slice(b"[]");
        } else {
            serde(out, &r.redactions)?;
        }
        if let Some(event) = &r.event {
            match event {
                Event::Open(o) => {
                    out.extend_from_slice(b",\"open\":");
                    open(out, o)?;
                }
                Event::Exec(v) => member(out, "exec", v)?,
                Event::Connect(v) => member(out, "connect", v)?,
                Event::Accept(v) => member(out, "accept", v)?,
                Event::Gap(v) => member(out, "gap", v)?,
                Event::Heartbeat(v) => member(out, "heartbeat", v)?,
                Event::Agent(v) => member(out, "agent", v)?,
                Event::ConfigChange(v) => member(out, "configChange", v)?,
                Event::Exit(v) => member(out, "exit", v)?,
            }
        }
        out.push(b'}');
        Ok(())
    }

    /// RFC 3339 in UTC as chrono's `to_rfc3339` writes it (pbjson's `Timestamp`): seconds,
    /// then as many of 3, 6 or 9 fraction digits as the nanoseconds need, then `+00:00`.
    fn timestamp(&mut self, out: &mut Vec<u8>, t: &phi_proto::Timestamp) -> io::Result<()> {
        if !(0..1_000_000_000).contains(&t.nanos) {
            // Out of the plain range (leap second, invalid): as serde writes it, or its error.
            return serde(out, t);
        }
        if self.second.as_ref().is_none_or(|(s, _)| *s != t.seconds) {
            let Some(whole) = chrono::DateTime::from_timestamp(t.seconds, 0) else {
                return serde(out, t);
            };
            let mut text = whole.to_rfc3339().into_bytes();
            let Some(len) = text.len().checked_sub(UTC.len()) else {
                return serde(out, t);
            };
            text.truncate(len);
            self.second = Some((t.seconds, text));
        }
        let Some((_, text)) = &self.second else {
            return serde(out, t);
        };
        out.push(b'"');
        out.extend_from_slice(text);
        let nanos = t.nanos as u32;
        if nanos != 0 {
            let (value, digits) = if nanos.is_multiple_of(1_000_000) {
                (nanos / 1_000_000, 3)
            } else if nanos.is_multiple_of(1_000) {
                (nanos / 1_000, 6)
            } else {
                (nanos, 9)
            };
            out.push(b'.');
            let mut buf = [b'0'; 9];
            let mut v = value;
            for d in buf[..digits].iter_mut().rev() {
                *d = b'0' + (v % 10) as u8;
                v /= 10;
            }
            out.extend_from_slice(&buf[..digits]);
        }
        out.extend_from_slice(UTC);
        out.push(b'"');
        Ok(())
    }
}

const UTC: &[u8] = b"+00:00";

/// `,"key":` and `value` through serde.
fn member<T: serde::Serialize>(out: &mut Vec<u8>, key: &str, value: &T) -> io::Result<()> {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    serde(out, value)
}

fn serde<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> io::Result<()> {
    serde_json::to_writer(out, value).map_err(io::Error::other)
}

fn open(out: &mut Vec<u8>, o: &Open) -> io::Result<()> {
    let source = PathSource::try_from(o.path_source)
        .map_err(|_| invalid(o.path_source))?
        .as_str_name();
    let syscall = OpenSyscall::try_from(o.syscall)
        .map_err(|_| invalid(o.syscall))?
        .as_str_name();
    out.extend_from_slice(b"{\"path\":");
    string(out, &o.path);
    out.extend_from_slice(b",\"pathSource\":\"");
    out.extend_from_slice(source.as_bytes());
    out.extend_from_slice(b"\",\"syscall\":\"");
    out.extend_from_slice(syscall.as_bytes());
    out.extend_from_slice(b"\",\"flags\":");
    out.extend_from_slice(itoa::Buffer::new().format(o.flags).as_bytes());
    out.extend_from_slice(b",\"read\":");
    boolean(out, o.read);
    out.extend_from_slice(b",\"write\":");
    boolean(out, o.write);
    out.extend_from_slice(b",\"create\":");
    boolean(out, o.create);
    out.extend_from_slice(b",\"truncate\":");
    boolean(out, o.truncate);
    out.extend_from_slice(b",\"mode\":");
    out.extend_from_slice(itoa::Buffer::new().format(o.mode).as_bytes());
    if let Some(outcome) = &o.outcome {
        out.extend_from_slice(b",\"outcome\":");
        self::outcome(out, outcome);
    }
    out.extend_from_slice(b",\"watch\":");
    string(out, &o.watch);
    out.extend_from_slice(b",\"pathTruncated\":");
    boolean(out, o.path_truncated);
    out.extend_from_slice(b",\"requested\":");
    string(out, &o.requested);
    out.extend_from_slice(b",\"inode\":\"");
    out.extend_from_slice(itoa::Buffer::new().format(o.inode).as_bytes());
    out.extend_from_slice(b"\",\"device\":");
    string(out, &o.device);
    out.extend_from_slice(b",\"compat\":");
    boolean(out, o.compat);
    out.push(b'}');
    Ok(())
}

fn outcome(out: &mut Vec<u8>, o: &Outcome) {
    out.extend_from_slice(b"{\"success\":");
    boolean(out, o.success);
    out.extend_from_slice(b",\"ret\":\"");
    out.extend_from_slice(itoa::Buffer::new().format(o.ret).as_bytes());
    out.extend_from_slice(b"\",\"errno\":");
    string(out, &o.errno);
    out.push(b'}');
}

/// The error pbjson's serializer gives for an enum value outside the enum.
fn invalid(value: i32) -> io::Error {
    io::Error::other(format!("Invalid variant {value}"))
}

fn boolean(out: &mut Vec<u8>, v: bool) {
    out.extend_from_slice(if v { b"true" } else { b"false" });
}

/// True for the bytes serde_json escapes: control characters, `"` and `\`.
#[inline]
fn escaped(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// A JSON string, escaped as serde_json escapes it: `\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`,
/// other control characters as `\u00XX` (lowercase hex), everything else as it is.
fn string(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.push(b'"');
    // Most strings need no escape: test every byte without an early exit (the compiler
    // turns the fold into vector compares), then copy them whole.
    if !bytes.iter().fold(false, |any, &b| any | escaped(b)) {
        out.extend_from_slice(bytes);
    } else {
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if !escaped(b) {
                continue;
            }
            out.extend_from_slice(&bytes[start..i]);
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0c => out.extend_from_slice(b"\\f"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                _ => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0xf)]);
                }
            }
            start = i + 1;
        }
        out.extend_from_slice(&bytes[start..]);
    }
    out.push(b'"');
}

/// Standard base64 with padding (what pbjson writes for `bytes` fields).
fn base64(out: &mut Vec<u8>, data: &[u8]) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut chunks = data.chunks_exact(3);
    for c in &mut chunks {
        let n = u32::from(c[0]) << 16 | u32::from(c[1]) << 8 | u32::from(c[2]);
        out.extend_from_slice(&[
            ALPHABET[(n >> 18) as usize & 63],
            ALPHABET[(n >> 12) as usize & 63],
            ALPHABET[(n >> 6) as usize & 63],
            ALPHABET[n as usize & 63],
        ]);
    }
    match *chunks.remainder() {
        [a] => {
            let n = u32::from(a) << 16;
            out.extend_from_slice(&[
                ALPHABET[(n >> 18) as usize & 63],
                ALPHABET[(n >> 12) as usize & 63],
                b'=',
                b'=',
            ]);
        }
        [a, b] => {
            let n = u32::from(a) << 16 | u32::from(b) << 8;
            out.extend_from_slice(&[
                ALPHABET[(n >> 18) as usize & 63],
                ALPHABET[(n >> 12) as usize & 63],
                ALPHABET[(n >> 6) as usize & 63],
                b'=',
            ]);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use phi_proto::v1::{
        AgentLifecycle, Connect, Exec, Gap, Heartbeat, Process, ProcessExit, Redaction,
    };

    use super::*;

    fn serde_bytes(r: &Record) -> Vec<u8> {
        serde_json::to_vec(r).expect("serde writes the record")
    }

    fn fast_bytes(w: &mut RecordWriter, r: &Record) -> Vec<u8> {
        let mut out = Vec::new();
        w.record(&mut out, r).expect("the record is written");
        out
    }

    /// Strings with every class of character JSON treats specially, and some it does not.
    fn strings() -> Vec<String> {
        let mut all: Vec<String> = vec![
            String::new(),
            "/data/ehr/patient-0001.json".into(),
            "quote \" backslash \\ slash / del \u{7f}".into(),
            "tab\tnewline\nreturn\rbackspace\u{8}formfeed\u{c}".into(),
            "nul \u{0} unit separator \u{1f} escape \u{1b}".into(),
            "ünïcödé ✓ 𝄞 \u{2028}\u{2029}".into(),
            "\\\\\"\"".into(),
        ];
        all.push((0u8..0x80).map(char::from).collect());
        all.push("x".repeat(300) + "\"" + &"y".repeat(17));
        all
    }

    fn records() -> Vec<Record> {
        let mut out = Vec::new();
        let times = [
            None,
            Some(phi_proto::Timestamp {
                seconds: 1_764_790_378,
                nanos: 944_225_734,
            }),
            Some(phi_proto::Timestamp {
                seconds: 1_764_790_378,
                nanos: 0,
            }),
            Some(phi_proto::Timestamp {
                seconds: 1_764_790_379,
                nanos: 5_000_000,
            }),
            Some(phi_proto::Timestamp {
                seconds: 0,
                nanos: 120_000,
            }),
            Some(phi_proto::Timestamp {
                seconds: -86_400 * 365,
                nanos: 1,
            }),
            Some(phi_proto::Timestamp {
                seconds: 253_402_300_800,
                nanos: 999_999_999,
            }),
        ];
        for (i, s) in strings().into_iter().enumerate() {
            let open = Open {
                path: s.clone(),
                path_source: (i % 3) as i32,
                syscall: (i % 5) as i32,
                flags: 0o100_1102 * i as u32,
                read: i % 2 == 0,
                write: i % 3 == 0,
                create: i % 2 == 1,
                truncate: i % 4 == 0,
                mode: 0o644,
                outcome: (i % 3 != 1).then(|| Outcome {
                    success: i % 2 == 0,
                    ret: if i % 2 == 0 { i as i64 } else { -2 },
                    errno: s.clone(),
                }),
                watch: s.clone(),
                path_truncated: i % 5 == 0,
                requested: s.clone(),
                inode: u64::MAX - i as u64,
                device: format!("{i}:{s}"),
                compat: i % 2 == 1,
            };
            let base = Record {
                seq: if i == 0 { u64::MAX } else { i as u64 },
                prev_hash: (0..i as u8 * 5).collect(),
                hash: vec![0xff; 32 + i % 3],
                host_id: s.clone(),
                time: times[i % times.len()],
                boot_id: s.clone(),
                process: None,
                redactions: (0..i % 3)
                    .map(|n| Redaction {
                        rule: s.clone(),
                        field: format!("open.path[{n}]"),
                        count: n as u32,
                        action: "mask".into(),
                    })
                    .collect(),
                event: Some(Event::Open(open)),
            };
            out.push(base.clone());
            out.push(Record {
                process: Some(Process {
                    pid: 7,
                    comm: s.clone(),
                    argv: vec![s.clone(), "-d".into()],
                    ..Default::default()
                }),
                ..base.clone()
            });
            for event in [
                Event::Exec(Exec {
                    exe: s.clone(),
                    argv: vec![s.clone()],
                    ..Default::default()
                }),
                Event::Connect(Connect {
                    address: s.clone(),
                    port: 443,
                    ..Default::default()
                }),
                Event::Gap(Gap {
                    count: 3,
                    by_kind: [(s.clone(), 2u64)].into_iter().collect(),
                    ..Default::default()
                }),
                Event::Heartbeat(Heartbeat::default()),
                Event::Agent(AgentLifecycle {
                    reason: s.clone(),
                    ..Default::default()
                }),
                Event::Exit(ProcessExit::default()),
            ] {
                out.push(Record {
                    event: Some(event),
                    ..base.clone()
                });
            }
            out.push(Record {
                event: None,
                ..base
            });
        }
        out
    }

    #[test]
    fn writes_what_serde_writes() {
        let mut w = RecordWriter::default();
        let records = records();
        assert!(records.len() > 80);
        for r in &records {
            let want = serde_bytes(r);
            let got = fast_bytes(&mut w, r);
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want),
                "record {r:?}"
            );
        }
        // Again in reverse order: the cached second never leaks into another record's time.
        for r in records.iter().rev() {
            assert_eq!(fast_bytes(&mut w, r), serde_bytes(r));
        }
    }

    #[test]
    fn every_fraction_width_matches_chrono() {
        let mut w = RecordWriter::default();
        for nanos in [
            0,
            1,
            9,
            10,
            999,
            1_000,
            1_001,
            10_000,
            999_000,
            1_000_000,
            1_500_000,
            10_000_000,
            100_000_000,
            123_456_789,
            999_999_999,
        ] {
            let t = phi_proto::Timestamp {
                seconds: 1_764_790_378,
                nanos,
            };
            let mut out = Vec::new();
            w.timestamp(&mut out, &t).expect("written");
            assert_eq!(out, serde_json::to_vec(&t).expect("serde"), "{nanos}");
        }
    }

    #[test]
    fn an_enum_value_outside_the_enum_is_an_error_as_with_serde() {
        let r = Record {
            event: Some(Event::Open(Open {
                path_source: 99,
                ..Default::default()
            })),
            ..Default::default()
        };
        assert!(serde_json::to_vec(&r).is_err());
        let mut out = b"kept".to_vec();
        assert!(RecordWriter::default().record(&mut out, &r).is_err());
        assert_eq!(out, b"kept", "nothing of the failed record is left behind");
    }

    #[test]
    fn base64_matches_the_standard_alphabet_with_padding() {
        for len in 0..70u8 {
            let data: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
            let mut out = Vec::new();
            base64(&mut out, &data);
            let r = Record {
                hash: data,
                ..Default::default()
            };
            let v: serde_json::Value = serde_json::from_slice(&serde_bytes(&r)).expect("json");
            assert_eq!(v["hash"].as_str().expect("a string").as_bytes(), out);
        }
    }
}
