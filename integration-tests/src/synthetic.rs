//! Synthetic host chains for the collector tests: deterministic records (sessions, opens,
//! execs, denials) sealed and signed like an agent's, fed through the store or the wire.

use phi_chain::{checkpoint::HostKey, seal::Sealer};
use phi_proto::{
    Timestamp,
    v1::{
        Batch, Checkpoint, Exec, Identity, LoginSession, Open, Outcome, Process, Record,
        SealedRecord, record::Event,
    },
};

pub const BOOT: &str = "0d9f3c2a-1111-4222-8333-944455556666";
/// 2026-11-01T00:00:00Z.
pub const T0: i64 = 1_793_491_200;

/// A deterministic host chain: record `i` happens at T0 + i minutes. Records 1..=20 belong
/// to alice's ssh session 7, 21..=30 to bob's console session 8, the rest to no session.
pub struct Chain {
    pub key: HostKey,
    pub sealer: Sealer,
    pub records: Vec<SealedRecord>,
    pub checkpoints: Vec<Checkpoint>,
    pub host: String,
    /// Time of record 0 (seconds since the epoch); record i is i minutes later.
    pub base: i64,
}

/// Record `i` of a synthetic chain, at `base` + i minutes.
pub fn record(host: &str, i: u64, base: i64) -> Record {
    let (user, uid, session, kind) = match i {
        1..=20 => ("alice", 1001, Some(7), "ssh"),
        21..=30 => ("bob", 1002, Some(8), "console"),
        _ => ("root", 0, None, ""),
    };
    let identity = Identity {
        uid,
        user: user.into(),
        login_user: if session.is_some() {
            user.into()
        } else {
            "unset".into()
        },
        login_uid: session.map(|_| uid),
        audit_session: session,
        session: session.map(|id| LoginSession {
            id,
            kind: kind.into(),
            user: user.into(),
            source_address: if kind == "ssh" {
                "10.1.4.20".into()
            } else {
                String::new()
            },
            source_port: if kind == "ssh" { 51514 } else { 0 },
            tty: "pts/0".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let event = if i.is_multiple_of(5) {
        Event::Exec(Exec {
            exe: "/usr/bin/cat".into(),
            argv: vec!["cat".into(), format!("/srv/ehr/p{i}.json")],
            ..Default::default()
        })
    } else {
        Event::Open(Open {
            path: if i.is_multiple_of(2) {
                format!("/srv/ehr/labs/p{i}.csv")
            } else {
                format!("/srv/ehr/p{i}.json")
            },
            read: true,
            outcome: Some(Outcome {
                success: !i.is_multiple_of(7),
                ret: if i.is_multiple_of(7) { -13 } else { 3 },
                errno: if !i.is_multiple_of(7) {
                    String::new()
                } else {
                    "EACCES".into()
                },
            }),
            ..Default::default()
        })
    };
    Record {
        host_id: host.into(),
        boot_id: BOOT.into(),
        time: Some(Timestamp {
            seconds: base + i as i64 * 60,
            nanos: 0,
        }),
        process: Some(Process {
            pid: 1000 + i as u32,
            comm: "cat".into(),
            identity: Some(identity),
            ..Default::default()
        }),
        event: Some(event),
        ..Default::default()
    }
}

impl Chain {
    pub fn new(host: &str) -> Chain {
        Chain::at(host, T0)
    }

    /// A chain whose record i happens at `base` + i minutes.
    pub fn at(host: &str, base: i64) -> Chain {
        Chain {
            key: HostKey::from_secret([7; 32]),
            sealer: Sealer::new(phi_chain::seal::Head::EMPTY),
            records: Vec::new(),
            checkpoints: Vec::new(),
            host: host.into(),
            base,
        }
    }

    /// Appends `n` records and a checkpoint after every tenth.
    pub fn grow(&mut self, n: u64) -> Batch {
        let mut batch = Batch::default();
        for _ in 0..n {
            let i = self.sealer.head().seq + 1;
            let sealed = self.sealer.seal(&mut record(&self.host, i, self.base));
            self.records.push(sealed.clone());
            batch.records.push(sealed);
            if i.is_multiple_of(10) {
                let prev = self
                    .checkpoints
                    .last()
                    .map(|c| c.signature.clone())
                    .unwrap_or_default();
                let cp = self.key.checkpoint(
                    &self.host,
                    BOOT,
                    i,
                    &self.sealer.head().hash,
                    Timestamp {
                        seconds: self.base + i as i64 * 60 + 1,
                        nanos: 0,
                    },
                    &prev,
                );
                self.checkpoints.push(cp.clone());
                batch.checkpoints.push(cp);
            }
        }
        batch
    }
}
