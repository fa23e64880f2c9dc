//! `ocsf_http`: each batch is one HTTPS POST of OCSF JSON lines
//! (`Content-Type: application/x-ndjson`); any 2xx answer accepts the whole batch, anything
//! else (or no answer) makes it be sent again.

use std::time::Duration;

use bytes::Bytes;

use super::{
    Event, Sink, SinkError,
    config::OcsfHttpConfig,
    http::{HttpsClient, HttpsUrl},
    ocsf, tls,
};

pub struct OcsfHttp {
    client: HttpsClient,
    headers: Vec<(String, String)>,
}

impl OcsfHttp {
    pub fn new(c: &OcsfHttpConfig) -> anyhow::Result<OcsfHttp> {
        let url = HttpsUrl::parse(&c.url).map_err(anyhow::Error::msg)?;
        let config = tls::client_config(&c.tls, &[b"http/1.1"])?;
        let name = tls::server_name(c.tls.server_name.as_deref(), &url.host)?;
        Ok(OcsfHttp {
            client: HttpsClient::new(
                url,
                config,
                name,
                c.timeout.map_or(Duration::from_secs(30), |t| t.0),
            ),
            headers: c
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }
}

#[tonic::async_trait]
impl Sink for OcsfHttp {
    async fn send(&mut self, events: &[Event]) -> Result<(), SinkError> {
        let mut body = String::new();
        for e in events {
            body.push_str(&ocsf::line(e));
            body.push('\n');
        }
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/x-ndjson")];
        headers.extend(self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let path = self.client.url().path.clone();
        let answer = self.client.post(&path, &headers, Bytes::from(body)).await?;
        if (200..300).contains(&answer.status) {
            Ok(())
        } else {
            Err(SinkError::new(
                "POST",
                format!(
                    "the receiver answered {}: {}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body[..answer.body.len().min(300)])
                ),
            ))
        }
    }
}
