//! A small HTTPS client for the sinks that POST (OCSF over HTTP, Splunk HEC): HTTP/1.1 over
//! rustls, one kept-alive connection, rebuilt after any error.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, pki_types::ServerName};

use super::SinkError;

/// `https://HOST[:PORT][/PATH]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpsUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl HttpsUrl {
    pub fn parse(url: &str) -> Result<HttpsUrl, String> {
        let rest = url.strip_prefix("https://").ok_or_else(|| {
            format!("{url:?} must start with https:// (records leave only over TLS)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(format!(
                "{url:?}: put credentials in headers or a token, not in the URL"
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("{url:?}: the port {p:?} is not a number"))?,
            ),
            _ => (authority, 443),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        Ok(HttpsUrl {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    /// The same server with another path.
    pub fn with_path(&self, path: &str) -> HttpsUrl {
        HttpsUrl {
            path: path.to_owned(),
            ..self.clone()
        }
    }
}

/// An answer: status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

pub struct HttpsClient {
    url: HttpsUrl,
    tls: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    timeout: Duration,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl HttpsClient {
    pub fn new(
        url: HttpsUrl,
        tls: Arc<ClientConfig>,
        server_name: ServerName<'static>,
        timeout: Duration,
    ) -> HttpsClient {
        HttpsClient {
            url,
            tls,
            server_name,
            timeout,
            conn: None,
        }
    }

    pub fn url(&self) -> &HttpsUrl {
        &self.url
    }

    async fn connect(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, SinkError> {
        if let Some(c) = &self.conn
            && c.is_closed()
        {
            self.conn = None;
        }
        if self.conn.is_none() {
            let addr = format!("{}:{}", self.url.host, self.url.port);
            let tcp = tokio::net::TcpStream::connect(&addr)
                .await
                .map_err(|e| SinkError::new("connect", format!("{addr}: {e}")))?;
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| SinkError::new("TLS handshake", format!("{addr}: {e}")))?;
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| SinkError::new("HTTP handshake", format!("{addr}: {e}")))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("sink connection ended: {e}");
                }
            });
            self.conn = Some(send);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| SinkError::new("connect", "no connection"))
    }

    /// POSTs `body` to `path` with `headers`; any failure drops the connection.
    pub async fn post(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer, SinkError> {
        let timeout = self.timeout;
        let result = tokio::time::timeout(timeout, self.post_inner(path, headers, body)).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(SinkError::new(
                "POST",
                format!("no answer within {timeout:?}"),
            )),
        };
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    async fn post_inner(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer, SinkError> {
        let authority = if self.url.port == 443 {
            self.url.host.clone()
        } else {
            format!("{}:{}", self.url.host, self.url.port)
        };
        let mut req = Request::post(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_LENGTH, body.len());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| SinkError::new("POST", e))?;
        let conn = self.connect().await?;
        conn.ready().await.map_err(|e| SinkError::new("POST", e))?;
        let resp = conn
            .send_request(req)
            .await
            .map_err(|e| SinkError::new("POST", e))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| SinkError::new("reading the answer", e))?
            .to_bytes();
        Ok(Answer { status, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = HttpsUrl::parse("https://siem.example.org:8088/services/collector").expect("url");
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("siem.example.org", 8088, "/services/collector")
        );
        let u = HttpsUrl::parse("https://lake.example.org").expect("url");
        assert_eq!((u.port, u.path.as_str()), (443, "/"));
        assert!(HttpsUrl::parse("http://x").is_err());
        assert!(HttpsUrl::parse("https://u:p@x/").is_err());
        assert!(HttpsUrl::parse("https://x:y/").is_err());
    }
}
