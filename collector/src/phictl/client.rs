//! Where phictl's answers come from: a collector's API over gRPC with TLS (`--collector`),
//! or a store opened directly (`--db`, the same API run in-process as a local operator;
//! its queries are recorded in the store's access log like any other).

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context as _, bail};
use phi_collector::{
    api::{Api, Caller, Items},
    store::Pool,
};
use phi_proto::v1::{
    AccessLogRequest, AccessLogResponse, AddPrincipalRequest, AddPrincipalResponse, AlertsRequest,
    AlertsResponse, DisablePrincipalRequest, ExportChunk, ExportRequest, HoldRequest, HoldResponse,
    HostsRequest, HostsResponse, Principal, PrincipalsRequest, PrincipalsResponse, PruneRequest,
    PruneResponse, ReplayItem, ReplayRequest, SessionsRequest, SessionsResponse, StoredRecord,
    TimelineRequest, VerifyProgress, VerifyRequest, WhoAmIRequest, WhoAmIResponse,
    query_client::QueryClient,
};
use tokio::sync::mpsc;
use tonic::{
    Status,
    metadata::MetadataValue,
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

/// How to reach a collector.
#[derive(Clone, Debug, Default)]
pub struct Remote {
    pub url: String,
    pub token: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub server_name: Option<String>,
}

type Grpc = QueryClient<InterceptedService<Channel, Auth>>;

#[derive(Clone)]
pub struct Auth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub enum Client {
    Remote(Box<Grpc>),
    Local(Api, Caller),
}

/// Collects a server stream (remote) into the same channel type as the local API.
fn forward<T: Send + 'static>(mut s: tonic::Streaming<T>) -> Items<T> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            match s.message().await {
                Ok(Some(item)) => {
                    if tx.send(Ok(item)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(st) => {
                    let _ = tx.send(Err(st)).await;
                    return;
                }
            }
        }
    });
    rx
}

impl Client {
    pub async fn remote(r: &Remote) -> anyhow::Result<Client> {
        let url = r.url.trim_end_matches('/');
        let Some(rest) = url.strip_prefix("https://") else {
            bail!(
                "collector URL {url:?} must start with https:// (the API speaks only TLS), \
                 e.g. https://collector.example:4434"
            );
        };
        let host = rest
            .split(['/', ':'])
            .next()
            .filter(|h| !h.is_empty())
            .context("the collector URL has no host")?;
        let mut tls = ClientTlsConfig::new()
            .domain_name(r.server_name.clone().unwrap_or_else(|| host.to_owned()));
        match &r.ca {
            Some(ca) => {
                let pem =
                    std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            None => bail!(
                "give the CA that signed the collector's certificate: --ca FILE (or PHICTL_CA)"
            ),
        }
        match (&r.cert, &r.key) {
            (Some(c), Some(k)) => {
                let cert =
                    std::fs::read(c).with_context(|| format!("cannot read {}", c.display()))?;
                let key =
                    std::fs::read(k).with_context(|| format!("cannot read {}", k.display()))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            _ => bail!("--cert and --key go together"),
        }
        if r.token.is_none() && r.cert.is_none() {
            bail!(
                "the collector needs credentials: --token TOKEN (or PHICTL_TOKEN, \
                 --token-file FILE), or a client certificate with --cert and --key"
            );
        }
        let channel = Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("invalid collector URL {url}"))?
            .tls_config(tls)
            .context("TLS configuration")?
            .connect_timeout(std::time::Duration::from_secs(10))
            .connect()
            .await
            .with_context(|| format!("cannot connect to the collector at {url}"))?;
        let auth = match &r.token {
            Some(t) => Some(
                format!("Bearer {}", t.trim())
                    .parse()
                    .context("the token has characters a header cannot carry")?,
            ),
            None => None,
        };
        Ok(Client::Remote(Box::new(
            QueryClient::with_interceptor(channel, Auth(auth)).max_decoding_message_size(64 << 20),
        )))
    }

    pub async fn local(db: &str) -> anyhow::Result<Client> {
        let pool = Pool::open_async(db, 2).await?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        Ok(Client::Local(
            Api::new(Arc::clone(&pool), format!("phictl@{host}")),
            Caller::local(),
        ))
    }

    pub async fn whoami(&mut self) -> Result<WhoAmIResponse, Status> {
        match self {
            Client::Remote(c) => Ok(c.who_am_i(WhoAmIRequest {}).await?.into_inner()),
            Client::Local(api, caller) => api.whoami(caller).await,
        }
    }

    pub async fn hosts(&mut self) -> Result<HostsResponse, Status> {
        match self {
            Client::Remote(c) => Ok(c.hosts(HostsRequest {}).await?.into_inner()),
            Client::Local(api, caller) => api.hosts(caller).await,
        }
    }

    pub async fn timeline(&mut self, req: TimelineRequest) -> Result<Items<StoredRecord>, Status> {
        match self {
            Client::Remote(c) => Ok(forward(c.timeline(req).await?.into_inner())),
            Client::Local(api, caller) => api.timeline(caller, req).await,
        }
    }

    pub async fn sessions(&mut self, req: SessionsRequest) -> Result<SessionsResponse, Status> {
        match self {
            Client::Remote(c) => Ok(c.sessions(req).await?.into_inner()),
            Client::Local(api, caller) => api.sessions(caller, req).await,
        }
    }

    pub async fn replay(&mut self, req: ReplayRequest) -> Result<Items<ReplayItem>, Status> {
        match self {
            Client::Remote(c) => Ok(forward(c.replay(req).await?.into_inner())),
            Client::Local(api, caller) => {
                let (session, mut rows) = api.replay(caller, req).await?;
                let (tx, rx) = mpsc::channel(256);
                tokio::spawn(async move {
                    let head = ReplayItem {
                        session: Some(session),
                        record: None,
                    };
                    if tx.send(Ok(head)).await.is_err() {
                        return;
                    }
                    while let Some(r) = rows.recv().await {
                        let item = r.map(|record| ReplayItem {
                            session: None,
                            record: Some(record),
                        });
                        if tx.send(item).await.is_err() {
                            return;
                        }
                    }
                });
                Ok(rx)
            }
        }
    }

    pub async fn verify(&mut self, req: VerifyRequest) -> Result<Items<VerifyProgress>, Status> {
        match self {
            Client::Remote(c) => Ok(forward(c.verify(req).await?.into_inner())),
            Client::Local(api, caller) => api.verify(caller, req).await,
        }
    }

    pub async fn export(&mut self, req: ExportRequest) -> Result<Items<ExportChunk>, Status> {
        match self {
            Client::Remote(c) => Ok(forward(c.export(req).await?.into_inner())),
            Client::Local(api, caller) => api.export(caller, req).await,
        }
    }

    pub async fn access_log(&mut self, req: AccessLogRequest) -> Result<AccessLogResponse, Status> {
        match self {
            Client::Remote(c) => Ok(c.access_log(req).await?.into_inner()),
            Client::Local(api, caller) => api.access_log(caller, req).await,
        }
    }

    pub async fn alerts(&mut self, req: AlertsRequest) -> Result<AlertsResponse, Status> {
        match self {
            Client::Remote(c) => Ok(c.alerts(req).await?.into_inner()),
            Client::Local(api, caller) => api.alerts(caller, req).await,
        }
    }

    pub async fn hold(&mut self, req: HoldRequest) -> Result<HoldResponse, Status> {
        match self {
            Client::Remote(c) => Ok(c.hold(req).await?.into_inner()),
            Client::Local(api, caller) => api.hold(caller, req).await,
        }
    }

    pub async fn prune(&mut self, req: PruneRequest) -> Result<PruneResponse, Status> {
        match self {
            Client::Remote(c) => Ok(c.prune(req).await?.into_inner()),
            Client::Local(api, caller) => api.prune(caller, req).await,
        }
    }

    pub async fn principals(&mut self) -> Result<PrincipalsResponse, Status> {
        match self {
            Client::Remote(c) => Ok(c.principals(PrincipalsRequest {}).await?.into_inner()),
            Client::Local(api, caller) => api.principals(caller).await,
        }
    }

    pub async fn add_principal(
        &mut self,
        req: AddPrincipalRequest,
    ) -> Result<AddPrincipalResponse, Status> {
        match self {
            Client::Remote(c) => Ok(c.add_principal(req).await?.into_inner()),
            Client::Local(api, caller) => api.add_principal(caller, req).await,
        }
    }

    pub async fn disable_principal(
        &mut self,
        req: DisablePrincipalRequest,
    ) -> Result<Principal, Status> {
        match self {
            Client::Remote(c) => Ok(c.disable_principal(req).await?.into_inner()),
            Client::Local(api, caller) => api.disable_principal(caller, req).await,
        }
    }
}
