//! HTTP/JSON for the same API: `POST /v1/<method>` with the request as proto3 JSON (an empty
//! body is an empty request). Unary methods answer a JSON object; `timeline` and `replay`
//! answer JSON lines (`application/x-ndjson`); `verify` answers the final report; `export`
//! answers the evidence bundle itself (`application/gzip`). Errors are
//! `{"error": "...", "code": "..."}` with a matching HTTP status. `GET /healthz` answers
//! `ok` without credentials.

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Serialize, de::DeserializeOwned};
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::{Code, Status};

use super::{Api, Caller, Peer};

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/{method}", post(call))
        .with_state(api)
}

fn http_status(code: Code) -> StatusCode {
    match code {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_json(s: &Status) -> serde_json::Value {
    serde_json::json!({
        "error": s.message(),
        "code": format!("{:?}", s.code()),
    })
}

fn error(s: Status) -> Response {
    let mut r = axum::Json(error_json(&s)).into_response();
    *r.status_mut() = http_status(s.code());
    r
}

fn ok<T: Serialize>(v: T) -> Response {
    axum::Json(v).into_response()
}

fn parse<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T, Status> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| Status::invalid_argument(format!("the request is not valid JSON: {e}")))
}

/// JSON lines from a stream of results; an error mid-stream becomes a last `{"error"}` line.
fn ndjson<T: Serialize + Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<Result<T, Status>>,
) -> Response {
    let lines = ReceiverStream::new(rx).map(|item| {
        let mut line = match item {
            Ok(v) => serde_json::to_vec(&v).unwrap_or_default(),
            Err(s) => serde_json::to_vec(&error_json(&s)).unwrap_or_default(),
        };
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

async fn call(
    State(api): State<Api>,
    Path(method): Path<String>,
    headers: HeaderMap,
    peer: Option<axum::Extension<Peer>>,
    body: Bytes,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let caller = match api
        .authenticate(authorization, peer.as_ref().map(|p| &p.0))
        .await
    {
        Ok(c) => c,
        Err(s) => return error(s),
    };
    match dispatch(&api, &caller, &method, &body).await {
        Ok(r) => r,
        Err(s) => error(s),
    }
}

async fn dispatch(api: &Api, c: &Caller, method: &str, body: &Bytes) -> Result<Response, Status> {
    Ok(match method {
        "whoami" => ok(api.whoami(c).await?),
        "hosts" => ok(api.hosts(c).await?),
        "timeline" => ndjson(api.timeline(c, parse(body)?).await?),
        "sessions" => ok(api.sessions(c, parse(body)?).await?),
        "replay" => {
            let (session, rx) = api.replay(c, parse(body)?).await?;
            let (tx, out) = tokio::sync::mpsc::channel(64);
            tokio::spawn(async move {
                let first = phi_proto::v1::ReplayItem {
                    session: Some(session),
                    record: None,
                };
                if tx.send(Ok(first)).await.is_err() {
                    return;
                }
                let mut rx = rx;
                while let Some(item) = rx.recv().await {
                    let item = item.map(|r| phi_proto::v1::ReplayItem {
                        session: None,
                        record: Some(r),
                    });
                    if tx.send(item).await.is_err() {
                        return;
                    }
                }
            });
            ndjson(out)
        }
        "verify" => {
            let mut rx = api.verify(c, parse(body)?).await?;
            let mut report = None;
            while let Some(p) = rx.recv().await {
                if let Some(r) = p?.report {
                    report = Some(r);
                }
            }
            ok(report.ok_or_else(|| Status::internal("verification ended without a report"))?)
        }
        "export" => {
            let rx = api.export(c, parse(body)?).await?;
            let data = ReceiverStream::new(rx).filter_map(|item| match item {
                Ok(chunk) if chunk.data.is_empty() => None,
                Ok(chunk) => Some(Ok(Bytes::from(chunk.data))),
                Err(s) => Some(Err(std::io::Error::other(s.message().to_owned()))),
            });
            (
                [
                    (header::CONTENT_TYPE, "application/gzip"),
                    (
                        header::CONTENT_DISPOSITION,
                        "attachment; filename=\"evidence.tar.gz\"",
                    ),
                ],
                Body::from_stream(data),
            )
                .into_response()
        }
        "access-log" => ok(api.access_log(c, parse(body)?).await?),
        "alerts" => ok(api.alerts(c, parse(body)?).await?),
        "hold" => ok(api.hold(c, parse(body)?).await?),
        "prune" => ok(api.prune(c, parse(body)?).await?),
        "principals" => ok(api.principals(c).await?),
        "add-principal" => ok(api.add_principal(c, parse(body)?).await?),
        "disable-principal" => ok(api.disable_principal(c, parse(body)?).await?),
        other => {
            return Err(Status::not_found(format!(
                "no method {other:?}: use whoami, hosts, timeline, sessions, replay, verify, \
                 export, access-log, alerts, hold, prune, principals, add-principal, \
                 disable-principal"
            )));
        }
    })
}
