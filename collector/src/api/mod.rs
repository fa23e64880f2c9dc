//! The compliance API: one implementation of every query and administrative action, served
//! over gRPC and HTTP/JSON by the collector ([`server`]) and run in-process by `phictl --db`.
//!
//! Every call is authorized by role (auditor: read and export; admin: also manage) and
//! recorded in the collector's hash-chained access log before any data is returned.

pub mod auth;
pub mod grpc;
pub mod http;
pub mod server;

use std::{sync::Arc, time::Duration};

use phi_chain::checkpoint;
use phi_proto::{
    Timestamp,
    v1::{
        AccessEntry, AccessLogRequest, AccessLogResponse, AddPrincipalRequest,
        AddPrincipalResponse, Alert as AlertMsg, AlertsRequest, AlertsResponse,
        DisablePrincipalRequest, ExportChunk, ExportRequest, HoldRequest, HoldResponse,
        HostSummary, HostsResponse, LegalHold, Principal as PrincipalMsg, PrincipalsResponse,
        PruneRequest, PruneResponse, Record, ReplayRequest, SessionSummary, SessionsRequest,
        SessionsResponse, StoredRecord, TimelineRequest, VerifyProgress, VerifyRequest,
        WhoAmIResponse,
    },
};
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::Status;

pub use self::auth::{Caller, Peer};
use crate::{
    export::{self, ExportSpec},
    retention,
    store::{
        Filter, Hold, HostInfo, Pool, Principal, Role, Row, Session, SessionFilter, StoreError,
        now_ns,
    },
    verify::verify_chain,
};

/// Records per page read from the store while streaming.
const PAGE: usize = 1000;
/// Bytes per export chunk.
const CHUNK: usize = 64 << 10;

pub fn timestamp(ns: i64) -> Timestamp {
    Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

pub fn ns(t: &Timestamp) -> i64 {
    t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos)
}

fn opt_ts(ns: i64) -> Option<Timestamp> {
    (ns != 0).then(|| timestamp(ns))
}

fn nonempty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// A store error as the API reports it.
pub fn status(e: StoreError) -> Status {
    match e {
        StoreError::Invalid(m) => Status::invalid_argument(m),
        other => {
            tracing::error!("store: {other}");
            Status::unavailable(format!("the store cannot answer right now: {other}"))
        }
    }
}

pub fn host_summary(h: HostInfo) -> HostSummary {
    HostSummary {
        key_id: checkpoint::key_id(&h.public_key),
        public_key: h.public_key,
        host_id: h.host_id,
        first_seen: opt_ts(h.first_seen_ns),
        last_seen: opt_ts(h.last_seen_ns),
        agent_version: h.agent_version,
        head_seq: h.head_seq,
        checkpoint_seq: h.checkpoint_seq,
        checkpoint_time: opt_ts(h.checkpoint_time_ns),
        pruned_through: h.anchor_seq,
        alerts: h.alerts,
        hold: h.hold.map(|d| LegalHold {
            reason: d.reason,
            set_by: d.set_by,
            since: opt_ts(d.since_ns),
        }),
        last_record_time: opt_ts(h.last_record_ns),
    }
}

fn session_summary(s: Session) -> SessionSummary {
    SessionSummary {
        session: s.session,
        host_id: s.host_id,
        boot_id: s.boot_id,
        audit_session: s.audit_session,
        kind: s.kind,
        user: s.user,
        source_address: s.source_address,
        source_port: s.source_port,
        tty: s.tty,
        login_time: opt_ts(s.login_ns),
        first: opt_ts(s.first_ns),
        last: opt_ts(s.last_ns),
        records: s.records,
        phi_accesses: s.phi_accesses,
        denied: s.denied,
        execs: s.execs,
        first_seq: s.first_seq,
        last_seq: s.last_seq,
    }
}

fn principal_msg(p: Principal) -> PrincipalMsg {
    PrincipalMsg {
        name: p.name,
        role: p.role.as_str().into(),
        cert_name: p.cert_name.unwrap_or_default(),
        has_token: p.has_token,
        disabled: p.disabled,
        created: opt_ts(p.created_ns),
    }
}

/// A stored row as the API returns it: decoded, with its hash.
pub fn stored_record(row: Row) -> Result<StoredRecord, Status> {
    let mut record = Record::decode(row.body.as_slice()).map_err(|e| {
        Status::data_loss(format!(
            "stored record {} of {} does not decode ({e}): run phictl verify --host {}",
            row.seq, row.host_id, row.host_id
        ))
    })?;
    record.hash.clone_from(&row.hash);
    Ok(StoredRecord {
        host_id: row.host_id,
        seq: row.seq,
        hash: row.hash,
        record: Some(record),
        session: row.session.unwrap_or_default(),
    })
}

/// The API over one store.
#[derive(Clone)]
pub struct Api {
    pool: Arc<Pool>,
    /// This collector's name in the access log.
    name: String,
    metrics: Option<Arc<crate::telemetry::CollectorMetrics>>,
}

/// What a streaming call returns.
pub type Items<T> = mpsc::Receiver<Result<T, Status>>;

impl Api {
    pub fn new(pool: Arc<Pool>, name: impl Into<String>) -> Api {
        Api {
            pool,
            name: name.into(),
            metrics: None,
        }
    }

    /// Counts calls in these metrics.
    pub fn with_metrics(mut self, metrics: Arc<crate::telemetry::CollectorMetrics>) -> Api {
        self.metrics = Some(metrics);
        self
    }

    fn count(&self, method: &str, outcome: &str) {
        if let Some(m) = &self.metrics {
            m.api_call(method, outcome);
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn crate::store::Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        self.pool.run(f).await.map_err(status)
    }

    /// Identifies the caller from an `authorization` header value and the TLS peer.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        peer: Option<&Peer>,
    ) -> Result<Caller, Status> {
        let remote = peer.map(|p| p.addr.clone()).unwrap_or_default();
        let found = if let Some(token) = authorization.and_then(auth::bearer) {
            let hash = auth::token_hash(token);
            let p = self
                .run(move |s| s.principal_by_token(&hash))
                .await?
                .filter(|p| !p.disabled);
            match p {
                Some(p) => Ok((p, "token")),
                None => Err("the bearer token is unknown or was revoked".to_owned()),
            }
        } else if let Some(names) = peer.map(|p| p.cert_names.clone()).filter(|n| !n.is_empty()) {
            let shown = names.join(", ");
            let first = names[0].clone();
            match self.run(move |s| s.principal_by_cert(&names)).await? {
                Some(p) if !p.disabled => Ok((p, "certificate")),
                Some(p) => Err(format!("principal {} is disabled", p.name)),
                None => Err(format!(
                    "the client certificate ({shown}) is not registered: an admin can run \
                     `phictl principals add NAME --role auditor --cert-name {first}`"
                )),
            }
        } else {
            Err(
                "no credentials: give a bearer token (phictl --token, or the header \
                 `authorization: Bearer …`) or a registered client certificate"
                    .to_owned(),
            )
        };
        match found {
            Ok((p, method)) => Ok(Caller {
                principal: p.name,
                role: p.role,
                method,
                remote,
            }),
            Err(why) => {
                self.count("Authenticate", "denied");
                let entry = AccessEntry {
                    time: Some(timestamp(now_ns())),
                    principal: "anonymous".into(),
                    action: "Authenticate".into(),
                    outcome: "denied".into(),
                    detail: why.clone(),
                    remote,
                    collector: self.name.clone(),
                    ..Default::default()
                };
                self.run(move |s| s.log_access(entry)).await?;
                Err(Status::unauthenticated(why))
            }
        }
    }

    /// Checks the caller's role and records the call; only then may it proceed.
    async fn allow(
        &self,
        caller: &Caller,
        need: Role,
        action: &str,
        request: String,
    ) -> Result<(), Status> {
        let allowed = caller.role >= need;
        self.count(action, if allowed { "ok" } else { "denied" });
        let entry = AccessEntry {
            time: Some(timestamp(now_ns())),
            principal: caller.principal.clone(),
            role: caller.role.as_str().into(),
            method: caller.method.into(),
            action: action.into(),
            request,
            outcome: if allowed { "ok" } else { "denied" }.into(),
            detail: if allowed {
                String::new()
            } else {
                format!("needs the {} role", need.as_str())
            },
            remote: caller.remote.clone(),
            collector: self.name.clone(),
            ..Default::default()
        };
        self.run(move |s| s.log_access(entry)).await?;
        if allowed {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{action} needs the {} role; {} has {}",
                need.as_str(),
                caller.principal,
                caller.role.as_str()
            )))
        }
    }

    pub async fn whoami(&self, caller: &Caller) -> Result<WhoAmIResponse, Status> {
        self.allow(caller, Role::Auditor, "WhoAmI", "{}".into())
            .await?;
        Ok(WhoAmIResponse {
            principal: caller.principal.clone(),
            role: caller.role.as_str().into(),
            method: caller.method.into(),
        })
    }

    pub async fn hosts(&self, caller: &Caller) -> Result<HostsResponse, Status> {
        self.allow(caller, Role::Auditor, "Hosts", "{}".into())
            .await?;
        let hosts = self.run(|s| s.hosts()).await?;
        Ok(HostsResponse {
            hosts: hosts.into_iter().map(host_summary).collect(),
        })
    }

    async fn known_host(&self, host: &str) -> Result<HostInfo, Status> {
        let h = host.to_owned();
        self.run(move |s| s.host_info(&h)).await?.ok_or_else(|| {
            Status::not_found(format!(
                "no host {host:?} in this store (phictl hosts lists them)"
            ))
        })
    }

    /// Streams rows of `filter` page by page, up to `limit` (0: all).
    fn stream_rows(&self, filter: Filter, limit: u64) -> Items<StoredRecord> {
        let (tx, rx) = mpsc::channel(4 * PAGE);
        let pool = Arc::clone(&self.pool);
        tokio::spawn(async move {
            let mut cursor = None;
            let mut sent = 0u64;
            loop {
                let want = if limit == 0 {
                    PAGE
                } else {
                    PAGE.min((limit - sent) as usize)
                };
                if want == 0 {
                    break;
                }
                let f = filter.clone();
                let after = cursor.clone();
                let page = match pool
                    .run(move |s| s.timeline(&f, after.as_ref(), want))
                    .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(status(e))).await;
                        break;
                    }
                };
                let Some(last) = page.last() else { break };
                cursor = Some(last.cursor());
                let n = page.len();
                for row in page {
                    if tx.send(stored_record(row)).await.is_err() {
                        return;
                    }
                }
                sent += n as u64;
                if n < want {
                    break;
                }
            }
        });
        rx
    }

    pub async fn timeline(
        &self,
        caller: &Caller,
        req: TimelineRequest,
    ) -> Result<Items<StoredRecord>, Status> {
        self.allow(caller, Role::Auditor, "Timeline", json(&req))
            .await?;
        if let Some(h) = nonempty(&req.host) {
            self.known_host(&h).await?;
        }
        let filter = Filter {
            host: nonempty(&req.host),
            since_ns: req.since.as_ref().map(ns),
            until_ns: req.until.as_ref().map(ns),
            user: nonempty(&req.user),
            path_prefix: nonempty(&req.path_prefix),
            kinds: req
                .kinds
                .iter()
                .filter_map(|k| nonempty(k))
                .map(|k| k.replace('-', "_"))
                .collect(),
            session: nonempty(&req.session),
        };
        Ok(self.stream_rows(filter, req.limit))
    }

    pub async fn sessions(
        &self,
        caller: &Caller,
        req: SessionsRequest,
    ) -> Result<SessionsResponse, Status> {
        self.allow(caller, Role::Auditor, "Sessions", json(&req))
            .await?;
        let filter = SessionFilter {
            host: nonempty(&req.host),
            since_ns: req.since.as_ref().map(ns),
            until_ns: req.until.as_ref().map(ns),
            user: nonempty(&req.user),
        };
        let sessions = self.run(move |s| s.sessions(&filter)).await?;
        Ok(SessionsResponse {
            sessions: sessions.into_iter().map(session_summary).collect(),
        })
    }

    /// The session's summary first, then its records in order.
    pub async fn replay(
        &self,
        caller: &Caller,
        req: ReplayRequest,
    ) -> Result<(SessionSummary, Items<StoredRecord>), Status> {
        self.allow(caller, Role::Auditor, "Replay", json(&req))
            .await?;
        let key = req.session.trim().to_owned();
        let k = key.clone();
        let Some(session) = self.run(move |s| s.session(&k)).await? else {
            return Err(Status::not_found(format!(
                "no login session {key:?} (phictl sessions --host HOST lists them)"
            )));
        };
        let rows = self.stream_rows(
            Filter {
                session: Some(key),
                ..Default::default()
            },
            0,
        );
        Ok((session_summary(session), rows))
    }

    pub async fn verify(
        &self,
        caller: &Caller,
        req: VerifyRequest,
    ) -> Result<Items<VerifyProgress>, Status> {
        self.allow(caller, Role::Auditor, "Verify", json(&req))
            .await?;
        let host = req.host.trim().to_owned();
        self.known_host(&host).await?;
        let (tx, rx) = mpsc::channel(64);
        let pool = Arc::clone(&self.pool);
        tokio::spawn(async move {
            let progress_tx = tx.clone();
            let result = pool
                .run(move |s| {
                    verify_chain(s, &host, &mut |done, total| {
                        let _ = progress_tx.blocking_send(Ok(VerifyProgress {
                            done,
                            total,
                            report: None,
                        }));
                    })
                })
                .await;
            let _ = tx
                .send(result.map_err(status).map(|report| VerifyProgress {
                    done: report.records,
                    total: report.records,
                    report: Some(report),
                }))
                .await;
        });
        Ok(rx)
    }

    pub async fn export(
        &self,
        caller: &Caller,
        req: ExportRequest,
    ) -> Result<Items<ExportChunk>, Status> {
        self.allow(caller, Role::Auditor, "Export", json(&req))
            .await?;
        let host = req.host.trim().to_owned();
        self.known_host(&host).await?;
        let (Some(since), Some(until)) = (req.since.as_ref(), req.until.as_ref()) else {
            return Err(Status::invalid_argument(
                "an export needs a window: give --since and --until",
            ));
        };
        let spec = ExportSpec {
            host_id: host,
            since_ns: ns(since),
            until_ns: ns(until),
            created_by: caller.label(),
            collector: self.name.clone(),
        };
        if spec.until_ns <= spec.since_ns {
            return Err(Status::invalid_argument(
                "the window is empty: --until must be after --since",
            ));
        }
        let (tx, rx) = mpsc::channel(64);
        let pool = Arc::clone(&self.pool);
        // What was handed out is recorded too: the bundle's hash ties a file an auditor
        // presents later to this export.
        let done_entry = AccessEntry {
            principal: caller.principal.clone(),
            role: caller.role.as_str().into(),
            method: caller.method.into(),
            action: "Export".into(),
            request: json(&req),
            outcome: "ok".into(),
            remote: caller.remote.clone(),
            collector: self.name.clone(),
            ..Default::default()
        };
        tokio::spawn(async move {
            let progress_tx = tx.clone();
            let built = pool
                .run(move |s| {
                    let mut file = tempfile::tempfile().map_err(|e| {
                        StoreError::Invalid(format!("cannot create a temporary file: {e}"))
                    })?;
                    let manifest = export::write_bundle(s, &spec, &mut file, &mut |done, total| {
                        let _ = progress_tx.blocking_send(Ok(ExportChunk {
                            done,
                            total,
                            data: Vec::new(),
                        }));
                    })
                    .map_err(|e| match e {
                        export::ExportError::Store(e) => e,
                        other => StoreError::Invalid(other.to_string()),
                    })?;
                    let (bytes, sha256) = export::file_digest(&mut file).map_err(|e| {
                        StoreError::Invalid(format!("cannot read the bundle back: {e}"))
                    })?;
                    s.log_access(AccessEntry {
                        time: Some(timestamp(now_ns())),
                        detail: format!(
                            "evidence bundle of {bytes} bytes, SHA-256 {sha256}: {} records, \
                             seq {}..{}, signed through {}",
                            manifest.records,
                            manifest.first_seq,
                            manifest.last_seq,
                            manifest.signed_through
                        ),
                        ..done_entry
                    })?;
                    Ok(file)
                })
                .await;
            let file = match built {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.send(Err(status(e))).await;
                    return;
                }
            };
            // Stream the finished bundle.
            let _ = tokio::task::spawn_blocking(move || {
                use std::io::{Read as _, Seek as _};
                let mut file = file;
                if let Err(e) = file.rewind() {
                    let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
                    return;
                }
                let mut buf = vec![0u8; CHUNK];
                loop {
                    match file.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            let chunk = ExportChunk {
                                data: buf[..n].to_vec(),
                                ..Default::default()
                            };
                            if tx.blocking_send(Ok(chunk)).is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
                            break;
                        }
                    }
                }
            })
            .await;
        });
        Ok(rx)
    }

    pub async fn access_log(
        &self,
        caller: &Caller,
        req: AccessLogRequest,
    ) -> Result<AccessLogResponse, Status> {
        self.allow(caller, Role::Auditor, "AccessLog", json(&req))
            .await?;
        let limit = match req.limit {
            0 => 1000,
            n => n.min(100_000) as usize,
        };
        let after = req.after;
        let entries = self
            .run(move |s| s.access_log(after, limit))
            .await?
            .into_iter()
            .map(|(e, _)| e)
            .collect();
        let mut out = AccessLogResponse {
            entries,
            ..Default::default()
        };
        if req.verify {
            let (ok, first_bad, problem) = self.run(verify_access_log).await?;
            out.verified = ok;
            out.first_bad_seq = first_bad;
            out.problem = problem;
        }
        Ok(out)
    }

    pub async fn alerts(
        &self,
        caller: &Caller,
        req: AlertsRequest,
    ) -> Result<AlertsResponse, Status> {
        self.allow(caller, Role::Auditor, "Alerts", json(&req))
            .await?;
        let host = nonempty(&req.host);
        let alerts = self.run(move |s| s.alerts(host.as_deref())).await?;
        Ok(AlertsResponse {
            alerts: alerts
                .into_iter()
                .map(|a| AlertMsg {
                    id: a.id,
                    time: opt_ts(a.time_ns),
                    host_id: a.alert.host_id,
                    kind: a.alert.kind,
                    seq: a.alert.seq.unwrap_or(0),
                    detail: a.alert.detail,
                    evidence: a.alert.evidence,
                })
                .collect(),
        })
    }

    pub async fn hold(&self, caller: &Caller, req: HoldRequest) -> Result<HoldResponse, Status> {
        self.allow(caller, Role::Admin, "Hold", json(&req)).await?;
        let host = req.host.trim().to_owned();
        if req.hold && req.reason.trim().is_empty() {
            return Err(Status::invalid_argument(
                "a legal hold needs a reason (--reason \"matter 2026-17\")",
            ));
        }
        let hold = req.hold.then(|| Hold {
            reason: req.reason.trim().to_owned(),
            set_by: caller.principal.clone(),
            since_ns: now_ns(),
        });
        let h = host.clone();
        let found = self
            .run(move |s| {
                if !s.set_hold(&h, hold.as_ref())? {
                    return Ok(None);
                }
                s.host_info(&h)
            })
            .await?;
        match found {
            Some(info) => Ok(HoldResponse {
                host: Some(host_summary(info)),
            }),
            None => Err(Status::not_found(format!("no host {host:?} in this store"))),
        }
    }

    pub async fn prune(&self, caller: &Caller, req: PruneRequest) -> Result<PruneResponse, Status> {
        self.allow(caller, Role::Admin, "Prune", json(&req)).await?;
        let by = caller.principal.clone();
        self.run(move |s| retention::run(s, now_ns(), req.dry_run, &by))
            .await
    }

    pub async fn principals(&self, caller: &Caller) -> Result<PrincipalsResponse, Status> {
        self.allow(caller, Role::Admin, "Principals", "{}".into())
            .await?;
        let list = self.run(|s| s.principals()).await?;
        Ok(PrincipalsResponse {
            principals: list.into_iter().map(principal_msg).collect(),
        })
    }

    pub async fn add_principal(
        &self,
        caller: &Caller,
        req: AddPrincipalRequest,
    ) -> Result<AddPrincipalResponse, Status> {
        self.allow(caller, Role::Admin, "AddPrincipal", json(&req))
            .await?;
        add_principal(&self.pool, req).await
    }

    pub async fn disable_principal(
        &self,
        caller: &Caller,
        req: DisablePrincipalRequest,
    ) -> Result<PrincipalMsg, Status> {
        self.allow(caller, Role::Admin, "DisablePrincipal", json(&req))
            .await?;
        let name = req.name.trim().to_owned();
        let n = name.clone();
        match self.run(move |s| s.disable_principal(&n)).await? {
            Some(p) => Ok(principal_msg(p)),
            None => Err(Status::not_found(format!("no principal {name:?}"))),
        }
    }
}

/// Creates or updates a principal, with a fresh token when asked.
pub async fn add_principal(
    pool: &Arc<Pool>,
    req: AddPrincipalRequest,
) -> Result<AddPrincipalResponse, Status> {
    let name = req.name.trim().to_owned();
    if !auth::valid_name(&name) {
        return Err(Status::invalid_argument(format!(
            "principal name {name:?} is not valid (letters, digits and . _ @ -)"
        )));
    }
    let role = Role::parse(req.role.trim()).map_err(status)?;
    let cert_name = nonempty(&req.cert_name);
    if !req.token && cert_name.is_none() {
        return Err(Status::invalid_argument(
            "a principal needs a way to sign in: --issue-token, --cert-name NAME, or both",
        ));
    }
    let token = if req.token {
        Some(auth::new_token().map_err(|e| Status::internal(format!("no randomness: {e}")))?)
    } else {
        None
    };
    let hash = token.as_deref().map(auth::token_hash);
    let p = pool
        .run(move |s| s.add_principal(&name, role, cert_name.as_deref(), hash.as_deref()))
        .await
        .map_err(status)?;
    Ok(AddPrincipalResponse {
        principal: Some(principal_msg(p)),
        token: token.unwrap_or_default(),
    })
}

/// Re-verifies the access log's hash chain: (ok, first bad seq, what is wrong).
fn verify_access_log(s: &mut dyn crate::store::Store) -> Result<(bool, u64, String), StoreError> {
    let mut prev_seq = 0u64;
    let mut prev_hash = phi_chain::seal::GENESIS.to_vec();
    loop {
        let page = s.access_log(prev_seq, 10_000)?;
        if page.is_empty() {
            return Ok((true, 0, String::new()));
        }
        for (entry, body) in page {
            let seq = entry.seq;
            if seq != prev_seq + 1 {
                return Ok((
                    false,
                    prev_seq + 1,
                    format!("access log entry {} is missing", prev_seq + 1),
                ));
            }
            if phi_chain::seal::link_hash(&prev_hash, &body).as_slice() != entry.hash.as_slice() {
                return Ok((
                    false,
                    seq,
                    format!("access log entry {seq} was changed: it does not match its hash"),
                ));
            }
            let inner = AccessEntry::decode(body.as_slice()).unwrap_or_default();
            if inner.seq != seq || inner.prev_hash != prev_hash {
                return Ok((
                    false,
                    seq,
                    format!("access log entry {seq} does not link to the entry before it"),
                ));
            }
            prev_seq = seq;
            prev_hash = entry.hash;
        }
    }
}

/// A request's parameters for the access log.
fn json<T: serde::Serialize>(req: &T) -> String {
    serde_json::to_string(req).unwrap_or_else(|_| "{}".into())
}

/// How long the background retention job waits between runs.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

/// Applies retention now and records it in the access log as the collector's own action.
pub async fn retention_pass(api: &Api) -> Result<PruneResponse, Status> {
    let name = api.name.clone();
    api.run(move |s| {
        let result = retention::run(s, now_ns(), false, "retention")?;
        let pruned: Vec<String> = result
            .hosts
            .iter()
            .filter(|h| h.records > 0)
            .map(|h| {
                format!(
                    "{} through seq {} ({} records)",
                    h.host_id, h.through_seq, h.records
                )
            })
            .collect();
        if !pruned.is_empty() {
            s.log_access(AccessEntry {
                time: Some(timestamp(now_ns())),
                principal: "retention".into(),
                role: Role::Admin.as_str().into(),
                method: "local".into(),
                action: "Prune".into(),
                request: format!("{{\"retentionSeconds\":{}}}", result.retention_seconds),
                outcome: "ok".into(),
                detail: pruned.join("; "),
                remote: "local".into(),
                collector: name,
                ..Default::default()
            })?;
        }
        Ok(result)
    })
    .await
}
