//! `splunk_hec`: the Splunk HTTP Event Collector. Each batch is one POST of concatenated
//! event objects to `/services/collector/event` with `Authorization: Splunk <token>` and the
//! request channel in `X-Splunk-Request-Channel`. With indexer acknowledgement (`ack`, on
//! by default) the batch counts as delivered only when `/services/collector/ack` reports its
//! ack id as indexed; a batch not acknowledged within `ack_timeout` is sent again.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::{
    Event, Sink, SinkError,
    config::HecConfig,
    http::{HttpsClient, HttpsUrl},
    ocsf, tls,
};

pub const EVENT_PATH: &str = "/services/collector/event";
pub const ACK_PATH: &str = "/services/collector/ack";

pub struct Hec {
    client: HttpsClient,
    authorization: String,
    channel: String,
    index: Option<String>,
    source: String,
    sourcetype: String,
    ack: bool,
    ack_timeout: Duration,
    base: String,
}

/// A GUID-shaped channel derived from the sink's name (stable across restarts).
pub fn channel_for(name: &str) -> String {
    let h = hex::encode(Sha256::digest(format!("phi-audit hec channel {name}")));
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

impl Hec {
    pub fn new(c: &HecConfig) -> anyhow::Result<Hec> {
        let url = HttpsUrl::parse(&c.url).map_err(anyhow::Error::msg)?;
        let token = match (&c.token, &c.token_file) {
            (Some(t), _) => t.trim().to_owned(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| anyhow::anyhow!("cannot read `token_file` {}: {e}", f.display()))?
                .trim()
                .to_owned(),
            (None, None) => anyhow::bail!("give `token` or `token_file`"),
        };
        let config = tls::client_config(&c.tls, &[b"http/1.1"])?;
        let name = tls::server_name(c.tls.server_name.as_deref(), &url.host)?;
        let base = url.path.trim_end_matches('/').to_owned();
        Ok(Hec {
            client: HttpsClient::new(
                url,
                config,
                name,
                c.timeout.map_or(Duration::from_secs(30), |t| t.0),
            ),
            authorization: format!("Splunk {token}"),
            channel: c.channel.clone().unwrap_or_else(|| channel_for(&c.name)),
            index: c.index.clone(),
            source: c.source.clone().unwrap_or_else(|| "phi-audit".into()),
            sourcetype: c.sourcetype.clone().unwrap_or_else(|| "ocsf".into()),
            ack: c.ack.unwrap_or(true),
            ack_timeout: c.ack_timeout.map_or(Duration::from_secs(60), |t| t.0),
            base,
        })
    }

    fn body(&self, events: &[Event]) -> String {
        let mut body = String::new();
        for e in events {
            let mut o = json!({
                // Seconds with milliseconds, as HEC reads `time`.
                "time": e.time_ns().div_euclid(1_000_000) as f64 / 1000.0,
                "host": e.host_id(),
                "source": self.source,
                "sourcetype": self.sourcetype,
                "event": ocsf::to_ocsf(e),
            });
            if let Some(i) = &self.index {
                o["index"] = json!(i);
            }
            body.push_str(&o.to_string());
            body.push('\n');
        }
        body
    }

    async fn post(&mut self, path: &str, body: String) -> Result<Value, SinkError> {
        let path = format!("{}{path}", self.base);
        let headers = [
            ("authorization", self.authorization.as_str()),
            ("x-splunk-request-channel", self.channel.as_str()),
            ("content-type", "application/json"),
        ];
        let answer = self.client.post(&path, &headers, Bytes::from(body)).await?;
        let json: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
        if answer.status != 200 {
            let text = json.get("text").and_then(Value::as_str).map_or_else(
                || String::from_utf8_lossy(&answer.body).into_owned(),
                str::to_owned,
            );
            let hint = match answer.status {
                401 | 403 => " (check the token)",
                400 if text.contains("hannel") => " (indexer acknowledgement needs a channel)",
                503 | 429 => " (the indexers are busy; retrying)",
                _ => "",
            };
            return Err(SinkError::new(
                "POST",
                format!("{path}: HTTP {}: {text}{hint}", answer.status),
            ));
        }
        Ok(json)
    }

    /// Polls until `ack_id` is indexed or the time is up.
    async fn acknowledged(&mut self, ack_id: u64) -> Result<(), SinkError> {
        let deadline = Instant::now() + self.ack_timeout;
        let mut wait = Duration::from_millis(100);
        loop {
            let answer = self
                .post(ACK_PATH, json!({"acks": [ack_id]}).to_string())
                .await?;
            if answer
                .get("acks")
                .and_then(|a| a.get(ack_id.to_string()))
                .and_then(Value::as_bool)
                == Some(true)
            {
                return Ok(());
            }
            if Instant::now() + wait > deadline {
                return Err(SinkError::new(
                    "ack",
                    format!(
                        "ack id {ack_id} was not acknowledged within {:?}; the batch is sent again",
                        self.ack_timeout
                    ),
                ));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }
}

#[tonic::async_trait]
impl Sink for Hec {
    async fn send(&mut self, events: &[Event]) -> Result<(), SinkError> {
        let body = self.body(events);
        let answer = self.post(EVENT_PATH, body).await?;
        if !self.ack {
            return Ok(());
        }
        let ack_id = answer.get("ackId").and_then(Value::as_u64).ok_or_else(|| {
            SinkError::new(
                "POST",
                "the answer has no ackId: indexer acknowledgement is off for this token; \
                 turn it on in Splunk or set `ack = false`",
            )
        })?;
        self.acknowledged(ack_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_are_guids() {
        let c = channel_for("splunk");
        assert_eq!(c.len(), 36);
        assert_eq!(c, channel_for("splunk"));
        assert_ne!(c, channel_for("other"));
        assert_eq!(c.matches('-').count(), 4);
    }
}
