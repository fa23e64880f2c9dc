//! A real rsyslog for one test: its own configuration (imtcp with the gtls driver on a free
//! loopback port, the test CA's certificate, every message written to one file with its
//! hostname, MSGID, structured data and MSG), run in the foreground as a child, stopped when
//! dropped. The Debian packages `rsyslog` and `rsyslog-gnutls` are installed when missing.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{collector::Pki, free_port};

const GTLS: &str = "/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so";

fn ensure_installed() {
    if !(Path::new("/usr/sbin/rsyslogd").exists() && Path::new(GTLS).exists()) {
        crate::apt_install(&["rsyslog", "rsyslog-gnutls"]);
    }
}

pub struct Rsyslog {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

/// One message as rsyslog wrote it.
#[derive(Clone, Debug)]
pub struct Line {
    pub hostname: String,
    pub msgid: String,
    pub structured_data: String,
    pub msg: String,
}

impl Line {
    /// The value of an SD-PARAM (unescaped).
    pub fn param(&self, name: &str) -> Option<String> {
        let key = format!(" {name}=\"");
        let start = self.structured_data.find(&key)? + key.len();
        let mut out = String::new();
        let mut chars = self.structured_data[start..].chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.push(chars.next()?),
                '"' => return Some(out),
                c => out.push(c),
            }
        }
        None
    }
}

impl Rsyslog {
    pub fn start(pki: &Pki) -> Rsyslog {
        ensure_installed();
        let dir = tempfile::Builder::new()
            .prefix("phi-rsyslog-")
            .tempdir()
            .expect("rsyslog dir");
        std::fs::create_dir(dir.path().join("work")).expect("work dir");
        let mut r = Rsyslog {
            child: None,
            port: free_port(),
            dir,
        };
        let conf = format!(
            r#"global(
  workDirectory="{work}"
  maxMessageSize="256k"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="{ca}"
  defaultNetstreamDriverCertFile="{cert}"
  defaultNetstreamDriverKeyFile="{key}"
)
main_queue(queue.type="Direct")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
input(type="imtcp" address="127.0.0.1" port="{port}")
template(name="siem" type="string" string="%hostname%|%msgid%|%structured-data%|%msg%\n")
action(type="omfile" file="{out}" template="siem" asyncWriting="off" flushOnTXEnd="on")
"#,
            work = r.dir.path().join("work").display(),
            ca = pki.path("ca.pem").display(),
            cert = pki.path("collector.pem").display(),
            key = pki.path("collector.key").display(),
            port = r.port,
            out = r.out().display(),
        );
        std::fs::write(r.conf(), conf).expect("write rsyslog.conf");
        r.restart();
        r
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("rsyslog.conf")
    }

    /// The file rsyslog writes every message to.
    pub fn out(&self) -> PathBuf {
        self.dir.path().join("messages.log")
    }

    /// Starts rsyslogd (again) on the same port and file; returns when it listens.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "rsyslogd already runs");
        let log = std::fs::File::create(self.dir.path().join("rsyslogd.log")).expect("log");
        let child = Command::new("/usr/sbin/rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(self.conf())
            .arg("-i")
            .arg(self.dir.path().join("rsyslogd.pid"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start rsyslogd");
        self.child = Some(child);
        crate::wait_listening("rsyslogd", &[self.port], Duration::from_secs(20), || {
            self.log()
        });
    }

    /// Stops rsyslogd (SIGTERM, as a restart of the receiver does) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rsyslogd.log")).unwrap_or_default()
    }

    /// Every message written so far.
    pub fn lines(&self) -> Vec<Line> {
        let text = std::fs::read_to_string(self.out()).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut parts = l.splitn(4, '|');
                Some(Line {
                    hostname: parts.next()?.to_owned(),
                    msgid: parts.next()?.to_owned(),
                    structured_data: parts.next()?.to_owned(),
                    msg: parts.next()?.trim_start().to_owned(),
                })
            })
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
