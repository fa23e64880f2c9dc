//! `syslog`: RFC 5424 messages over TLS (RFC 5425) with octet-counting framing
//! (`LEN SP MSG`). Each message carries the structured data
//! `[phiaudit@32473 host="…" seq="…" hash="…" kind="…"]` (alerts: `alert="<id>"` and the seq
//! they concern) and the event's OCSF JSON as MSG.
//!
//! Syslog has no acknowledgement. A batch counts as delivered once the receiver's TCP stack
//! has acknowledged every byte (the socket's send queue is empty) and the connection is still
//! open; a receiver that closes or resets the connection before that gets the batch again.
//! What a receiver loses after it has taken the bytes (a crash before it writes them) is
//! beyond what this protocol can tell.

use std::{os::fd::AsRawFd as _, sync::Arc, time::Duration};

use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

use super::{Event, Sink, SinkError, config::SyslogConfig, ocsf, tls};

pub const DEFAULT_SD_ID: &str = "phiaudit@32473";

/// `HOST:PORT` → (host, port).
pub fn split_address(a: &str) -> Result<(String, u16), String> {
    let (host, port) = a
        .rsplit_once(':')
        .ok_or_else(|| format!("{a:?} must be HOST:PORT (the receiver's TLS port, often 6514)"))?;
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("{a:?}: the port {port:?} is not a number"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{a:?} has no host"));
    }
    Ok((host.to_owned(), port))
}

/// The facility number of a name.
pub fn facility(name: Option<&str>) -> Result<u8, String> {
    Ok(match name.unwrap_or("authpriv") {
        "auth" => 4,
        "daemon" => 3,
        "authpriv" => 10,
        "local0" => 16,
        "local1" => 17,
        "local2" => 18,
        "local3" => 19,
        "local4" => 20,
        "local5" => 21,
        "local6" => 22,
        "local7" => 23,
        other => {
            return Err(format!(
                "{other:?} is not a facility phi-audit writes to: use auth, authpriv, daemon or \
                 local0 … local7"
            ));
        }
    })
}

/// An SD-NAME (RFC 5424 §6.3.2): 1–32 printable ASCII, no '=', ' ', ']', '"'.
pub fn valid_sd_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| (33..=126).contains(&b) && !matches!(b, b'=' | b']' | b'"'))
}

/// A header field: printable ASCII, bounded, "-" when empty.
fn field(s: &str, max: usize) -> String {
    let f: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if f.is_empty() { "-".into() } else { f }
}

/// An SD-PARAM value with '"', '\' and ']' escaped.
fn param(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One RFC 5424 message (without framing).
pub fn message(e: &Event, facility: u8, app_name: &str, sd_id: &str) -> String {
    let severity: u8 = match e {
        Event::Alert(_) => 2,
        Event::Record(r) if r.record.kind() == "gap" => 4,
        Event::Record(_) => 6,
    };
    let time = chrono::DateTime::from_timestamp_nanos(e.time_ns())
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    let (procid, sd) = match e {
        Event::Record(r) => (
            r.record
                .process
                .as_ref()
                .map_or_else(|| "-".to_owned(), |p| p.pid.to_string()),
            format!(
                "[{sd_id} host=\"{}\" seq=\"{}\" hash=\"{}\" kind=\"{}\"]",
                param(&r.host_id),
                r.seq,
                hex::encode(&r.hash),
                r.record.kind()
            ),
        ),
        Event::Alert(a) => (
            "-".to_owned(),
            format!(
                "[{sd_id} host=\"{}\" alert=\"{}\" kind=\"{}\"{}]",
                param(&a.alert.host_id),
                a.id,
                param(&a.alert.kind),
                a.alert
                    .seq
                    .map(|s| format!(" seq=\"{s}\""))
                    .unwrap_or_default()
            ),
        ),
    };
    format!(
        "<{}>1 {time} {} {} {} {} {sd} {}",
        u16::from(facility) * 8 + u16::from(severity),
        field(e.host_id(), 255),
        field(app_name, 48),
        field(&procid, 128),
        field(e.kind(), 32),
        ocsf::line(e)
    )
}

pub struct Syslog {
    address: String,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    timeout: Duration,
    facility: u8,
    app_name: String,
    sd_id: String,
    conn: Option<TlsStream<TcpStream>>,
}

impl Syslog {
    pub fn new(c: &SyslogConfig) -> anyhow::Result<Syslog> {
        let (host, _) = split_address(&c.address).map_err(anyhow::Error::msg)?;
        Ok(Syslog {
            address: c.address.clone(),
            server_name: tls::server_name(c.tls.server_name.as_deref(), &host)?,
            tls: tls::client_config(&c.tls, &[])?,
            timeout: c.timeout.map_or(Duration::from_secs(30), |t| t.0),
            facility: facility(c.facility.as_deref()).map_err(anyhow::Error::msg)?,
            app_name: c.app_name.clone().unwrap_or_else(|| "phi-audit".into()),
            sd_id: c.sd_id.clone().unwrap_or_else(|| DEFAULT_SD_ID.into()),
            conn: None,
        })
    }

    async fn connect(&mut self) -> Result<(), SinkError> {
        let tcp = TcpStream::connect(&self.address)
            .await
            .map_err(|e| SinkError::new("connect", format!("{}: {e}", self.address)))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| SinkError::new("TLS handshake", format!("{}: {e}", self.address)))?;
        self.conn = Some(tls);
        Ok(())
    }

    async fn write(&mut self, framed: &[u8]) -> Result<(), SinkError> {
        if let Some(c) = self.conn.as_mut()
            && !open(c).await
        {
            tracing::info!(address = %self.address, "the syslog receiver closed the connection");
            self.conn = None;
        }
        if self.conn.is_none() {
            self.connect().await?;
        }
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| SinkError::new("connect", "no connection"))?;
        conn.write_all(framed)
            .await
            .map_err(|e| SinkError::new("write", e))?;
        conn.flush().await.map_err(|e| SinkError::new("write", e))?;
        // Delivered when the receiver's TCP stack has every byte and did not close on us.
        let fd = conn.get_ref().0.as_raw_fd();
        loop {
            match unsent(fd) {
                Ok(0) => break,
                Ok(_) => tokio::time::sleep(Duration::from_millis(2)).await,
                Err(e) => return Err(SinkError::new("ioctl(SIOCOUTQ)", e)),
            }
        }
        if !open(conn).await {
            return Err(SinkError::new(
                "write",
                "the receiver closed the connection before it took the batch",
            ));
        }
        Ok(())
    }
}

/// Bytes the peer has not acknowledged yet.
fn unsent(fd: std::os::fd::RawFd) -> std::io::Result<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int through the pointer, which is valid.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n)
    }
}

/// True while the receiver keeps the connection open: one poll of a read, which only
/// completes on end of stream, an error, or data (a syslog receiver sends none).
async fn open(c: &mut TlsStream<TcpStream>) -> bool {
    let mut buf = [0u8; 512];
    match tokio::time::timeout(Duration::ZERO, c.read(&mut buf)).await {
        Err(_) => true,
        Ok(Ok(n)) => n > 0,
        Ok(Err(_)) => false,
    }
}

#[tonic::async_trait]
impl Sink for Syslog {
    async fn send(&mut self, events: &[Event]) -> Result<(), SinkError> {
        let mut framed = Vec::new();
        for e in events {
            let m = message(e, self.facility, &self.app_name, &self.sd_id);
            framed.extend_from_slice(format!("{} ", m.len()).as_bytes());
            framed.extend_from_slice(m.as_bytes());
        }
        let timeout = self.timeout;
        let result = match tokio::time::timeout(timeout, self.write(&framed)).await {
            Ok(r) => r,
            Err(_) => Err(SinkError::new(
                "write",
                format!("the receiver did not take the batch within {timeout:?}"),
            )),
        };
        if result.is_err() {
            self.conn = None;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::event::RecordEvent;
    use phi_proto::v1::Record;

    #[test]
    fn messages_follow_rfc_5424() {
        let e = Event::Record(RecordEvent {
            host_id: "ehr-1".into(),
            seq: 42,
            hash: vec![0xab; 32],
            record: Box::new(Record {
                host_id: "ehr-1".into(),
                time: Some(phi_proto::Timestamp {
                    seconds: 1_793_491_200,
                    nanos: 5000,
                }),
                event: Some(phi_proto::v1::record::Event::Heartbeat(Default::default())),
                ..Default::default()
            }),
        });
        let m = message(&e, 10, "phi-audit", DEFAULT_SD_ID);
        let expected = format!(
            "<86>1 2026-11-01T00:00:00.000005Z ehr-1 phi-audit - heartbeat \
             [phiaudit@32473 host=\"ehr-1\" seq=\"42\" hash=\"{}\" kind=\"heartbeat\"] {{",
            "ab".repeat(32)
        );
        assert!(m.starts_with(&expected), "{m}");
        assert_eq!(param("a\"b]c\\"), "a\\\"b\\]c\\\\");
        assert!(valid_sd_name("phiaudit@32473"));
        assert!(!valid_sd_name("a b"));
    }
}
