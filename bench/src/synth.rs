//! Synthetic host chains that weigh what a real agent's do.
//!
//! Each host's chain is sealed with [`phi_chain::seal::Sealer`] and signed with an Ed25519
//! host key every [`CHECKPOINT_EVERY`] records and at its end (an agent signs at stop), and
//! the entries are cut into batches of records and checkpoints the way the agent's spool
//! reader does. Records are deterministic (a fixed seed per host), so two runs with the same
//! parameters produce the same bytes.
//!
//! The records follow the shape of `phi-agent --stdout`: an identity with its login session
//! and privilege chain, a process with executable, argv, working directory and ancestors, and
//! mostly `open` events on pseudonymized patient paths under `/srv/ehr/<department>/`, with
//! some `exec`, `connect` and `exit` events. Activity comes in blocks: login sessions of one
//! of [`PEOPLE`] (ssh from the clinic network or the console, some escalated through sudo)
//! and stretches of service activity outside any login (`login_user` unset).

use phi_chain::{checkpoint::HostKey, seal::Sealer, spool::Entry};
use phi_proto::{
    Timestamp,
    v1::{
        Ancestor, Batch, ChainLink, Checkpoint, Connect, Exec, Identity, LoginSession, Open,
        Outcome, Process, ProcessExit, Record, Redaction, SealedRecord, record::Event,
    },
};

/// Records between two signed checkpoints (the agent's default `[chain] checkpoint_records`).
pub const CHECKPOINT_EVERY: u64 = 1000;

/// Names the record generator; part of every dataset description, so that a store loaded by
/// another generator is never mistaken for this one's.
pub const GENERATOR: &str = "phi-bench-synthetic/1";

/// The people who log in (20): a timeline filtered by one of them sees about 4% of a day.
pub const PEOPLE: &[&str] = &[
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "kim",
    "laura", "mike", "nina", "oscar", "peggy", "quinn", "rupert", "sybil", "trent",
];

/// Departments: the watched tree holds `/srv/ehr/<department>/…` (8: a path-prefix filter on
/// one of them sees about 1/8 of the opens).
pub const DEPARTMENTS: &[&str] = &[
    "cardiology",
    "oncology",
    "radiology",
    "pediatrics",
    "labs",
    "billing",
    "pharmacy",
    "psychiatry",
];

const DOCUMENTS: &[&str] = &[
    "chart.txt",
    "labs.csv",
    "imaging.dcm",
    "notes.pdf",
    "summary.json",
    "orders.hl7",
];

const TOOLS: &[(&str, &str)] = &[
    ("cat", "/usr/bin/cat"),
    ("less", "/usr/bin/less"),
    ("vim", "/usr/bin/vim.basic"),
    ("python3", "/usr/bin/python3.11"),
    ("grep", "/usr/bin/grep"),
    ("cp", "/usr/bin/cp"),
    ("java", "/usr/lib/jvm/java-17-openjdk-amd64/bin/java"),
];

/// The name of host `i` in every benchmark store (the bench refuses to wipe a store with
/// other hosts).
pub fn host_name(i: usize) -> String {
    format!("bench-{i:03}")
}

/// True for a host id this generator makes.
pub fn is_bench_host(id: &str) -> bool {
    id.strip_prefix("bench-")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// SplitMix64: small, fast, deterministic.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

fn timestamp(ns: i64) -> Timestamp {
    Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

/// Who acts during a block of records.
#[derive(Clone, Debug)]
struct Activity {
    /// Records left in the block.
    left: u64,
    person: &'static str,
    uid: u32,
    /// The login session (None: service activity outside any login).
    session: Option<LoginSession>,
    /// Escalated to root through sudo.
    sudo: bool,
    /// The login shell's pid.
    shell_pid: u32,
}

/// One host's chain, produced on demand.
pub struct HostChain {
    pub host: String,
    key: HostKey,
    sealer: Sealer,
    rng: Rng,
    boot_id: String,
    /// Time of record 1 and the spacing of records (ns).
    start_ns: i64,
    step_ns: i64,
    /// Records the chain will hold.
    length: u64,
    prev_signature: Vec<u8>,
    /// A checkpoint that did not fit into the previous batch.
    pending: Option<Checkpoint>,
    activity: Activity,
    next_audit_session: u32,
    next_pid: u32,
    /// Patient pseudonyms seen on this host.
    patients: Vec<String>,
}

impl HostChain {
    /// Host `index`'s chain of `length` records: record `seq` happens at
    /// `start_ns + (seq - 1) * step_ns`.
    pub fn new(index: usize, length: u64, start_ns: i64, step_ns: i64) -> HostChain {
        let host = host_name(index);
        let mut seed = Rng::new(0x7068_692d_6265_6e63 ^ (index as u64).wrapping_mul(0x1000_0001));
        let mut secret = [0u8; 32];
        for chunk in secret.chunks_mut(8) {
            chunk.copy_from_slice(&seed.next_u64().to_le_bytes());
        }
        let boot = seed.next_u64();
        let boot_id = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            boot >> 32,
            (boot >> 16) & 0xffff,
            boot & 0xfff,
            (boot >> 20) & 0xfff,
            seed.next_u64() & 0xffff_ffff_ffff
        );
        let patients = (0..5000)
            .map(|_| format!("{:016x}", seed.next_u64()))
            .collect();
        HostChain {
            host,
            key: HostKey::from_secret(secret),
            sealer: Sealer::new(phi_chain::seal::Head::EMPTY),
            rng: Rng::new(seed.next_u64()),
            boot_id,
            start_ns,
            step_ns,
            length,
            prev_signature: Vec::new(),
            pending: None,
            activity: Activity {
                left: 0,
                person: "root",
                uid: 0,
                session: None,
                sudo: false,
                shell_pid: 1,
            },
            next_audit_session: 1,
            next_pid: 2000 + index as u32 * 7,
            patients,
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.public_key()
    }

    /// Records sealed so far.
    pub fn sealed(&self) -> u64 {
        self.sealer.head().seq
    }

    pub fn length(&self) -> u64 {
        self.length
    }

    /// Everything sealed and signed, and handed out.
    pub fn done(&self) -> bool {
        self.sealed() >= self.length && self.pending.is_none()
    }

    /// The next batch of at most `max` entries (records and checkpoints, in chain order),
    /// or None when the chain is complete.
    pub fn next_batch(&mut self, max: usize) -> Option<Batch> {
        if self.done() {
            return None;
        }
        let mut batch = Batch::default();
        let mut entries = 0;
        while entries < max.max(1) {
            if let Some(cp) = self.pending.take() {
                batch.checkpoints.push(cp);
                entries += 1;
                continue;
            }
            if self.sealed() >= self.length {
                break;
            }
            match self.next_entry() {
                Entry::Record(r) => batch.records.push(r),
                Entry::Checkpoint(c) => batch.checkpoints.push(c),
            }
            entries += 1;
        }
        Some(batch)
    }

    /// Seals the next record; a checkpoint that falls due waits in `pending`.
    fn next_entry(&mut self) -> Entry {
        let seq = self.sealed() + 1;
        let mut record = self.record(seq);
        let sealed: SealedRecord = self.sealer.seal(&mut record);
        if seq.is_multiple_of(CHECKPOINT_EVERY) || seq == self.length {
            let cp = self.key.checkpoint(
                &self.host,
                &self.boot_id,
                seq,
                &self.sealer.head().hash,
                timestamp(self.time_ns(seq) + 1_000_000),
                &self.prev_signature,
            );
            self.prev_signature.clone_from(&cp.signature);
            self.pending = Some(cp);
        }
        Entry::Record(sealed)
    }

    fn time_ns(&self, seq: u64) -> i64 {
        self.start_ns + (seq as i64 - 1) * self.step_ns
    }

    fn pid(&mut self) -> u32 {
        self.next_pid = if self.next_pid >= 4_000_000 {
            300
        } else {
            self.next_pid + 1 + self.rng.below(3) as u32
        };
        self.next_pid
    }

    /// Starts the next block of activity at `seq`.
    fn new_activity(&mut self, seq: u64) {
        let rng = &mut self.rng;
        let left = 50 + rng.below(350);
        if rng.chance(80) {
            let person_index = rng.below(PEOPLE.len() as u64) as usize;
            let person = PEOPLE[person_index];
            let uid = 1001 + person_index as u32;
            let id = self.next_audit_session;
            self.next_audit_session += 1;
            let ssh = rng.chance(85);
            let tty = format!("pts/{}", rng.below(8));
            let source_address = if ssh {
                format!("10.1.{}.{}", rng.below(16), 2 + rng.below(250))
            } else {
                String::new()
            };
            let source_port = if ssh {
                32768 + rng.below(28000) as u32
            } else {
                0
            };
            let sudo = rng.chance(25);
            let leader = self.pid();
            let shell_pid = self.pid();
            self.activity = Activity {
                left,
                person,
                uid,
                session: Some(LoginSession {
                    id,
                    kind: if ssh { "ssh" } else { "console" }.into(),
                    user: person.into(),
                    login_uid: uid,
                    source_address,
                    source_port,
                    local_port: if ssh { 22 } else { 0 },
                    tty,
                    login_time: Some(timestamp(self.time_ns(seq) - 2_000_000_000)),
                    leader_pid: leader,
                    leader_exe: if ssh {
                        "/usr/sbin/sshd".into()
                    } else {
                        "/usr/bin/login".into()
                    },
                    source_from: if ssh { "socket".into() } else { String::new() },
                }),
                sudo,
                shell_pid,
            };
        } else {
            let shell_pid = self.pid();
            let (person, uid) = if self.rng.chance(50) {
                ("root", 0)
            } else {
                ("ehr-sync", 998)
            };
            self.activity = Activity {
                left,
                person,
                uid,
                session: None,
                sudo: false,
                shell_pid,
            };
        }
    }

    fn identity(&self) -> Identity {
        let a = &self.activity;
        let (uid, user) = if a.sudo {
            (0, "root")
        } else {
            (a.uid, a.person)
        };
        let mut chain = Vec::new();
        if a.session.is_some() {
            chain.push(ChainLink {
                uid: a.uid,
                user: a.person.into(),
                pid: a.shell_pid,
                via: "login".into(),
            });
            if a.sudo {
                chain.push(ChainLink {
                    uid: 0,
                    user: "root".into(),
                    pid: a.shell_pid + 1,
                    via: "sudo".into(),
                });
            }
        }
        Identity {
            uid,
            euid: uid,
            gid: uid,
            egid: uid,
            login_uid: a.session.as_ref().map(|_| a.uid),
            audit_session: a.session.as_ref().map(|s| s.id),
            user: user.into(),
            euser: user.into(),
            group: user.into(),
            login_user: if a.session.is_some() {
                a.person.into()
            } else {
                "unset".into()
            },
            session: a.session.clone(),
            chain,
        }
    }

    fn ancestors(&self) -> Vec<Ancestor> {
        let a = &self.activity;
        let mut out = Vec::new();
        if a.sudo {
            out.push(Ancestor {
                pid: a.shell_pid + 1,
                comm: "sudo".into(),
                exe: "/usr/bin/sudo".into(),
                uid: 0,
                user: "root".into(),
                ..Default::default()
            });
        }
        match &a.session {
            Some(s) => {
                out.push(Ancestor {
                    pid: a.shell_pid,
                    comm: "bash".into(),
                    exe: "/usr/bin/bash".into(),
                    uid: a.uid,
                    user: a.person.into(),
                    ..Default::default()
                });
                out.push(Ancestor {
                    pid: s.leader_pid,
                    comm: if s.kind == "ssh" { "sshd" } else { "login" }.into(),
                    exe: s.leader_exe.clone(),
                    uid: 0,
                    user: "root".into(),
                    ..Default::default()
                });
            }
            None => out.push(Ancestor {
                pid: a.shell_pid,
                comm: "systemd".into(),
                exe: "/usr/lib/systemd/systemd".into(),
                uid: 0,
                user: "root".into(),
                ..Default::default()
            }),
        }
        out
    }

    /// Record `seq` (before sealing).
    fn record(&mut self, seq: u64) -> Record {
        if self.activity.left == 0 {
            self.new_activity(seq);
        }
        self.activity.left -= 1;
        let time_ns = self.time_ns(seq);
        let pid = self.pid();
        let (comm, exe) = *self.rng.pick(TOOLS);
        let department = *self.rng.pick(DEPARTMENTS);
        let patient = self.rng.pick(&self.patients).clone();
        let document = *self.rng.pick(DOCUMENTS);
        let path = format!("/srv/ehr/{department}/[patient-name:{patient}]/{document}");
        let roll = self.rng.below(100);
        let mut redactions = Vec::new();
        let mut argv = vec![comm.to_owned(), path.clone()];
        let event = if roll < 78 {
            let outcome = match self.rng.below(100) {
                0..=91 => Outcome {
                    success: true,
                    ret: 3 + self.rng.below(20) as i64,
                    errno: String::new(),
                },
                92..=96 => Outcome {
                    success: false,
                    ret: -13,
                    errno: "EACCES".into(),
                },
                _ => Outcome {
                    success: false,
                    ret: -2,
                    errno: "ENOENT".into(),
                },
            };
            let write = comm == "cp" || comm == "vim";
            redactions.push(Redaction {
                rule: "patient-name".into(),
                field: "open.path".into(),
                count: 1,
                action: "pseudonymize".into(),
            });
            Event::Open(Open {
                path: path.clone(),
                path_source: if outcome.success { 1 } else { 2 },
                syscall: 2,
                flags: if write { 0o2_001_101 } else { 0o2_000_000 },
                read: !write,
                write,
                create: write,
                truncate: write,
                mode: if write { 0o644 } else { 0 },
                inode: if outcome.success {
                    100_000 + self.rng.below(5_000_000)
                } else {
                    0
                },
                requested: if outcome.success {
                    String::new()
                } else {
                    path.clone()
                },
                outcome: Some(outcome),
                watch: "/srv/ehr".into(),
                device: "253:1".into(),
                ..Default::default()
            })
        } else if roll < 93 {
            Event::Exec(Exec {
                exe: exe.into(),
                filename: exe.into(),
                argv: argv.clone(),
                argv_bytes: argv.iter().map(|a| a.len() as u32 + 1).sum(),
                env: vec![
                    "LANG=C.UTF-8".into(),
                    "PATH=/usr/local/bin:/usr/bin:/bin".into(),
                    format!("HOME=/home/{}", self.activity.person),
                ],
                env_bytes: 96,
                ..Default::default()
            })
        } else if roll < 98 {
            argv = vec!["psql".into(), "-h".into(), "10.2.0.5".into(), "ehr".into()];
            Event::Connect(Connect {
                family: 1,
                address: "10.2.0.5".into(),
                port: 5432,
                local_address: "10.1.0.7".into(),
                local_port: 40000 + self.rng.below(20000) as u32,
                outcome: Some(Outcome {
                    success: true,
                    ret: 0,
                    errno: String::new(),
                }),
                address_source: 1,
                fd: 3,
                socket_type: "stream".into(),
                ..Default::default()
            })
        } else {
            Event::Exit(ProcessExit {
                status: Some(0),
                ..Default::default()
            })
        };
        if argv.len() > 1 && argv[1].contains("[patient-name:") {
            redactions.push(Redaction {
                rule: "patient-name".into(),
                field: "process.argv[1]".into(),
                count: 1,
                action: "pseudonymize".into(),
            });
        }
        let person = self.activity.person;
        Record {
            host_id: self.host.clone(),
            time: Some(timestamp(time_ns)),
            boot_id: self.boot_id.clone(),
            process: Some(Process {
                pid,
                tid: pid,
                ppid: self.activity.shell_pid,
                comm: comm.into(),
                exe: exe.into(),
                argv,
                start_time: Some(timestamp(time_ns - 3_000_000)),
                identity: Some(self.identity()),
                cgroup_id: 4242 + u64::from(self.activity.uid),
                cwd: if self.activity.session.is_some() {
                    format!("/home/{person}")
                } else {
                    "/".into()
                },
                ancestors: self.ancestors(),
                container: None,
            }),
            redactions,
            event: Some(event),
            ..Default::default()
        }
    }
}

/// A set of host chains, pre-generated and cut into batches.
pub struct Dataset {
    /// Per host: (host id, public key, batches in chain order).
    pub hosts: Vec<(String, [u8; 32], Vec<Batch>)>,
    pub records: u64,
    pub checkpoints: u64,
    pub batches: u64,
    /// Total bytes of the sealed record bodies (the hashed canonical encoding).
    pub body_bytes: u64,
}

/// Splits `records` over `hosts` as evenly as possible (the first hosts get one more).
pub fn split(records: u64, hosts: usize) -> Vec<u64> {
    let hosts = hosts.max(1) as u64;
    (0..hosts)
        .map(|i| records / hosts + u64::from(i < records % hosts))
        .collect()
}

/// Bytes of the record bodies in `batch`.
pub fn body_bytes(batch: &Batch) -> u64 {
    batch.records.iter().map(|r| r.body.len() as u64).sum()
}

/// Generates `records` records over `hosts` chains, one record every `step_ns` from
/// `start_ns`, in batches of `batch` entries.
pub fn generate(records: u64, hosts: usize, batch: usize, start_ns: i64, step_ns: i64) -> Dataset {
    let mut out = Dataset {
        hosts: Vec::new(),
        records: 0,
        checkpoints: 0,
        batches: 0,
        body_bytes: 0,
    };
    for (i, n) in split(records, hosts).into_iter().enumerate() {
        let mut chain = HostChain::new(i, n, start_ns, step_ns);
        let mut batches = Vec::new();
        while let Some(b) = chain.next_batch(batch) {
            out.records += b.records.len() as u64;
            out.checkpoints += b.checkpoints.len() as u64;
            out.body_bytes += body_bytes(&b);
            batches.push(b);
        }
        out.batches += batches.len() as u64;
        out.hosts
            .push((chain.host.clone(), chain.public_key(), batches));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use phi_chain::seal::{Head, check_link, head_of};

    #[test]
    fn chains_link_and_checkpoints_verify() {
        let d = generate(2_500, 2, 512, 1_790_000_000_000_000_000, 1_000_000_000);
        assert_eq!(d.records, 2_500);
        // 1250 per host: one checkpoint at 1000 and one at the end.
        assert_eq!(d.checkpoints, 4);
        for (host, key, batches) in &d.hosts {
            assert!(is_bench_host(host));
            let mut head = Head::EMPTY;
            let mut prev = Vec::new();
            for b in batches {
                assert!(b.records.len() + b.checkpoints.len() <= 512);
                for r in &b.records {
                    let record = check_link(head, r).expect("links");
                    assert_eq!(&record.host_id, host);
                    head = head_of(r);
                }
                for c in &b.checkpoints {
                    phi_chain::checkpoint::verify(c, key, &prev).expect("signature");
                    prev.clone_from(&c.signature);
                }
            }
            assert_eq!(head.seq, 1_250);
        }
        let mean = d.body_bytes / d.records;
        assert!(
            (500..1500).contains(&mean),
            "record bodies weigh {mean} bytes"
        );
    }

    #[test]
    fn generation_is_deterministic() {
        let a = generate(300, 3, 100, 0, 1_000);
        let b = generate(300, 3, 100, 0, 1_000);
        assert_eq!(a.hosts[2].2[0].records, b.hosts[2].2[0].records);
    }
}
