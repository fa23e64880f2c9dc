//! Helpers for the SIEM tests: feeding a collector signed synthetic chains over the wire,
//! collector configuration files with `[[sinks]]`, an HTTPS receiver on loopback (OCSF over
//! HTTP, Splunk HEC) and the OCSF 1.x class requirements the emitted events must meet.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use phi_proto::v1::{AgentMessage, Batch, Hello, agent_message, collector_message};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    collector::{Collector, Pki, raw_client},
    synthetic::Chain,
};

/// Streams `batches` of `chain`'s host and waits for the acknowledgement of the last.
pub async fn feed(pki: &Pki, collector: &Collector, chain: &Chain, batches: Vec<Batch>) {
    if let Err(e) = try_feed(pki, collector, chain, batches).await {
        panic!("the collector refused the batches: {e}");
    }
}

/// [`feed`], returning the collector's refusal.
pub async fn try_feed(
    pki: &Pki,
    collector: &Collector,
    chain: &Chain,
    batches: Vec<Batch>,
) -> Result<(), tonic::Status> {
    let mut client = raw_client(pki, collector, &chain.host).await;
    let (tx, rx) = mpsc::channel(batches.len() + 2);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            host_id: chain.host.clone(),
            public_key: chain.key.public_key().to_vec(),
            agent_version: "test".into(),
            boot_id: String::new(),
        })),
    })
    .await
    .expect("queue hello");
    let want = batches
        .iter()
        .filter_map(|b| b.records.last().map(|r| r.seq))
        .max()
        .unwrap_or(0);
    for b in batches {
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Batch(b)),
        })
        .await
        .expect("queue batch");
    }
    let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .expect("an answer from the collector")?
            .expect("the stream stays open");
        if let Some(collector_message::Msg::Ack(a)) = m.msg
            && a.durable_seq >= want
        {
            break;
        }
    }
    drop(tx);
    Ok(())
}

/// Seals `records` onto `chain` (host, boot and seq set here) as one batch.
pub fn seal(chain: &mut Chain, records: Vec<phi_proto::v1::Record>) -> Batch {
    let mut batch = Batch::default();
    for mut r in records {
        r.host_id.clone_from(&chain.host);
        r.boot_id = crate::synthetic::BOOT.into();
        let sealed = chain.sealer.seal(&mut r);
        chain.records.push(sealed.clone());
        batch.records.push(sealed);
    }
    batch
}

/// Writes a collector configuration with `body` (the `[[sinks]]` tables) and returns the
/// `serve` arguments that load it.
pub fn config_args(dir: &std::path::Path, body: &str) -> Vec<String> {
    let path = dir.join("collector.toml");
    std::fs::write(&path, body).expect("write the collector config");
    vec!["--config".into(), path.display().to_string()]
}

/// Waits until `done` holds, or fails with `what` and the collector's log.
pub fn wait_until(collector: &Collector, what: &str, timeout: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n--- collector log ---\n{}",
            collector.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The OCSF 1.x requirements phi-audit's events must meet: the base event attributes, the
/// class and category of each class, `type_uid = class_uid * 100 + activity_id`, and the
/// attributes each class requires (actor, device, file, process, endpoints, finding).
pub fn check_ocsf(e: &Value) -> Result<(), String> {
    let int = |k: &str| {
        e.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("`{k}` is missing or not an integer in {e}"))
    };
    let text = |v: &Value, path: &str| -> Result<(), String> {
        let mut cur = v;
        for part in path.split('.') {
            cur = cur
                .get(part)
                .ok_or_else(|| format!("`{path}` is missing in {e}"))?;
        }
        match cur {
            Value::String(s) if !s.is_empty() => Ok(()),
            Value::Number(_) => Ok(()),
            _ => Err(format!("`{path}` is empty in {e}")),
        }
    };
    let object = |path: &str| -> Result<&Value, String> {
        let mut cur = e;
        for part in path.split('.') {
            cur = cur
                .get(part)
                .ok_or_else(|| format!("`{path}` is missing in {e}"))?;
        }
        cur.is_object()
            .then_some(cur)
            .ok_or_else(|| format!("`{path}` is not an object in {e}"))
    };
    let class = int("class_uid")?;
    let category = int("category_uid")?;
    let activity = int("activity_id")?;
    let type_uid = int("type_uid")?;
    int("severity_id")?;
    let time = int("time")?;
    if time < 1_000_000_000_000 {
        return Err(format!(
            "`time` {time} is not in milliseconds since the epoch"
        ));
    }
    if type_uid != class * 100 + activity {
        return Err(format!(
            "`type_uid` {type_uid} is not class_uid * 100 + activity_id"
        ));
    }
    let version = e
        .pointer("/metadata/version")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("`metadata.version` is missing in {e}"))?;
    if !version.starts_with("1.") {
        return Err(format!("`metadata.version` {version} is not OCSF 1.x"));
    }
    text(e, "metadata.product.name")?;
    text(e, "metadata.product.vendor_name")?;
    text(e, "device.hostname")?;
    object("unmapped")?;
    let expected_category = match class {
        1001 | 1007 => 1,
        4001 => 4,
        2004 => 2,
        0 => 0,
        other => return Err(format!("unexpected class_uid {other}")),
    };
    if category != expected_category {
        return Err(format!(
            "class {class} belongs to category {expected_category}, not {category}"
        ));
    }
    let activities: &[u64] = match class {
        1001 => &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 99],
        1007 => &[1, 2, 3, 4, 5, 99],
        4001 => &[1, 2, 3, 4, 5, 6, 7, 99],
        2004 => &[1, 2, 3],
        _ => &[99],
    };
    if !activities.contains(&activity) {
        return Err(format!(
            "activity_id {activity} is not one of class {class}"
        ));
    }
    match class {
        1001 => {
            text(e, "actor.user.name")?;
            text(e, "file.path")?;
            text(e, "file.name")?;
            int("status_id")?;
        }
        1007 => {
            text(e, "actor.user.name")?;
            object("process")?;
            text(e, "process.pid")?;
        }
        4001 => {
            text(e, "actor.user.name")?;
            object("dst_endpoint")?;
            object("src_endpoint")?;
        }
        2004 => {
            text(e, "finding_info.uid")?;
            text(e, "finding_info.title")?;
        }
        _ => {}
    }
    Ok(())
}

/// What the HTTPS receiver got.
#[derive(Default)]
pub struct Received {
    /// OCSF lines POSTed to /ocsf, in arrival order.
    pub ocsf: Vec<Value>,
    /// HEC events whose batch was acknowledged, in arrival order.
    pub hec: Vec<Value>,
    /// HEC batches by ack id, not yet acknowledged.
    pub pending: BTreeMap<u64, Vec<Value>>,
    pub next_ack: u64,
    /// Acknowledgement polls answered "not yet" for these ack ids (the batch is then lost
    /// by the receiver, as an indexer that failed would lose it).
    pub lose_acks: u64,
    /// Requests refused with 503 while this is above zero (one per request).
    pub refuse: u64,
    /// Problems with what arrived (wrong headers, bad JSON).
    pub problems: Vec<String>,
    pub requests: u64,
}

/// An HTTPS receiver on 127.0.0.1 with the collector's test certificate: `/ocsf` takes JSON
/// lines; `/services/collector/event` and `/services/collector/ack` behave as Splunk's HEC
/// with indexer acknowledgement (token `hec-token`, a channel header required).
pub struct Receiver {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<Received>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    tls: Arc<rustls::ServerConfig>,
}

pub const HEC_TOKEN: &str = "hec-token";

fn tls_config(pki: &Pki) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(pki.path("collector.pem"))
            .expect("cert")
            .collect::<Result<_, _>>()
            .expect("cert pem");
    let key = PrivateKeyDer::from_pem_file(pki.path("collector.key")).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server cert");
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

async fn handle(
    state: Arc<Mutex<Received>>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<String>, std::convert::Infallible> {
    use http_body_util::BodyExt as _;
    let path = req.uri().path().to_owned();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let channel = req
        .headers()
        .get("x-splunk-request-channel")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(reply(400, "{}")),
    };
    let mut st = state.lock().expect("state");
    st.requests += 1;
    if st.refuse > 0 {
        st.refuse -= 1;
        return Ok(reply(503, r#"{"text":"Server is busy","code":9}"#));
    }
    match path.as_str() {
        "/ocsf" => {
            for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                match serde_json::from_slice::<Value>(line) {
                    Ok(v) => st.ocsf.push(v),
                    Err(e) => st.problems.push(format!("bad JSON line: {e}")),
                }
            }
            Ok(reply(200, "{}"))
        }
        "/services/collector/event" | "/services/collector/ack" => {
            if auth.as_deref() != Some(&format!("Splunk {HEC_TOKEN}")) {
                return Ok(reply(401, r#"{"text":"Invalid token","code":4}"#));
            }
            if channel.as_deref().is_none_or(|c| c.len() != 36) {
                return Ok(reply(
                    400,
                    r#"{"text":"Data channel is missing","code":10}"#,
                ));
            }
            if path.ends_with("/event") {
                let mut events = Vec::new();
                for v in serde_json::Deserializer::from_slice(&body).into_iter::<Value>() {
                    match v {
                        Ok(v) => {
                            for k in ["time", "host", "source", "sourcetype", "event"] {
                                if v.get(k).is_none() {
                                    st.problems.push(format!("HEC event without `{k}`: {v}"));
                                }
                            }
                            events.push(v);
                        }
                        Err(e) => {
                            st.problems.push(format!("bad HEC JSON: {e}"));
                            return Ok(reply(400, r#"{"text":"Invalid data format","code":6}"#));
                        }
                    }
                }
                let id = st.next_ack;
                st.next_ack += 1;
                st.pending.insert(id, events);
                Ok(reply(
                    200,
                    &format!(r#"{{"text":"Success","code":0,"ackId":{id}}}"#),
                ))
            } else {
                let asked: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let mut acks = serde_json::Map::new();
                for id in asked
                    .get("acks")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_u64)
                {
                    let done = if st.lose_acks > 0 && st.pending.contains_key(&id) {
                        st.lose_acks -= 1;
                        st.pending.remove(&id);
                        false
                    } else if let Some(events) = st.pending.remove(&id) {
                        st.hec.extend(events);
                        true
                    } else {
                        false
                    };
                    acks.insert(id.to_string(), Value::Bool(done));
                }
                Ok(reply(200, &serde_json::json!({ "acks": acks }).to_string()))
            }
        }
        _ => Ok(reply(404, "{}")),
    }
}

fn reply(status: u16, body: &str) -> hyper::Response<String> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .expect("response")
}

impl Receiver {
    pub async fn start(pki: &Pki) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("addr");
        let mut r = Receiver {
            addr,
            state: Arc::new(Mutex::new(Received::default())),
            stop: None,
            task: None,
            tls: tls_config(pki),
        };
        r.serve(listener);
        r
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&self.tls));
        let state = Arc::clone(&self.state);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let (tcp, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    _ = &mut stop_rx => break,
                };
                let acceptor = acceptor.clone();
                let state = Arc::clone(&state);
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc =
                        hyper::service::service_fn(move |req| handle(Arc::clone(&state), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
            // An outage: every open connection goes too.
            conns.shutdown().await;
        });
        self.stop = Some(stop_tx);
        self.task = Some(task);
    }

    /// Stops listening and drops every connection (a receiver outage).
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        assert!(self.task.is_none(), "already running");
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("bind the receiver again");
        self.serve(listener);
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }
}
