//! The HTTP endpoints.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get,
};

use crate::{Health, Registry};

#[derive(Clone)]
struct Shared {
    registry: Arc<Registry>,
    health: Arc<Health>,
}

fn answer(result: Result<(), String>) -> (StatusCode, String) {
    match result {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn healthz(State(s): State<Shared>) -> impl IntoResponse {
    answer(s.health.live())
}

async fn readyz(State(s): State<Shared>) -> impl IntoResponse {
    answer(s.health.readiness())
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.registry.render(),
    )
}

/// `--metrics-listen` as given: an address, or `off`.
pub fn parse_listen(text: &str, flag: &str) -> Result<Option<SocketAddr>, String> {
    match text.trim() {
        "off" => Ok(None),
        a => a
            .parse()
            .map(Some)
            .map_err(|_| format!("{flag} {a:?} is not an address (ADDR:PORT, or off)")),
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until `stop` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    health: Arc<Health>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Shared { registry, health });
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    async fn get_path(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn endpoints_answer_over_real_http() {
        let registry = Registry::new();
        registry
            .counter("phi_records_total", "Records.", &[("kind", "open")])
            .add(5);
        let health = Arc::new(Health::new(Duration::from_secs(30)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, registry, Arc::clone(&health), async {
            let _ = stop_rx.await;
        }));
        assert!(get_path(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let r = get_path(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.ends_with("starting\n"),
            "{r}"
        );
        health.ready();
        assert!(get_path(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let m = get_path(addr, "/metrics").await;
        assert!(m.contains("text/plain; version=0.0.4"), "{m}");
        assert!(m.contains("phi_records_total{kind=\"open\"} 5"), "{m}");
        let _ = stop_tx.send(());
        server.await.expect("join").expect("serve");
    }

    #[test]
    fn listen_addresses_or_off() {
        assert_eq!(parse_listen("off", "--metrics-listen"), Ok(None));
        assert!(
            parse_listen("127.0.0.1:9464", "--metrics-listen")
                .expect("ok")
                .is_some()
        );
        let e = parse_listen("localhost", "--metrics-listen").expect_err("bad");
        assert!(
            e.contains("--metrics-listen") && e.contains("ADDR:PORT"),
            "{e}"
        );
    }
}
