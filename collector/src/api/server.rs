//! The API listener: TLS (HTTP/2 and HTTP/1.1 by ALPN), an optional client certificate
//! checked against the client CA, and one router for gRPC (`phiaudit.v1.Query`) and
//! HTTP/JSON (`/v1/…`). Each request carries its connection's [`Peer`].

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use phi_proto::v1::query_server::QueryServer;
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{Api, Peer, grpc::GrpcQuery, http};
use crate::tls::certificate_names;

/// Largest gRPC message the API accepts (requests are small).
const MAX_REQUEST: usize = 1 << 20;
/// How long a TLS handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Server TLS with an optional client certificate (tokens are the other way in).
pub fn tls_config(cert: &Path, key: &Path, client_ca: &Path) -> anyhow::Result<ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{} is not a PEM private key", key.display()))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(client_ca)
        .with_context(|| format!("cannot read {}", client_ca.display()))?
    {
        roots
            .add(ca.with_context(|| format!("{} is not a PEM certificate", client_ca.display()))?)
            .with_context(|| format!("{} is not a usable CA", client_ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .context("client CA")?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("the API certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The router: gRPC and HTTP/JSON side by side.
pub fn router(api: Api) -> axum::Router {
    let grpc = tonic::service::Routes::new(
        QueryServer::new(GrpcQuery::new(api.clone())).max_decoding_message_size(MAX_REQUEST),
    )
    .into_axum_router();
    http::router(api).merge(grpc)
}

/// Serves until `shutdown` resolves; open connections then get a few seconds to finish.
pub async fn serve(
    listener: TcpListener,
    tls: ServerConfig,
    api: Api,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let router = router(api);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("API accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%addr, "API TLS handshake failed: {e}");
                    return;
                }
                Err(_) => return,
            };
            let peer = Peer {
                cert_names: tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| certificate_names(c.as_ref()))
                    .unwrap_or_default(),
                addr: addr.to_string(),
            };
            let service = tower::service_fn(move |mut req: axum::http::Request<_>| {
                req.extensions_mut().insert(peer.clone());
                let mut router = router.clone();
                async move {
                    use tower::Service as _;
                    router.call(req.map(axum::body::Body::new)).await
                }
            });
            let conn = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(
                    TokioIo::new(tls),
                    TowerToHyperService::new(service),
                )
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%addr, "API connection ended: {e}");
            }
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(5)) => {}
    }
    Ok(())
}

/// Binds the API address with a clear error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the API (--api-listen)"))
}
