//! Hostile input to the collector: every bound answers with a clear gRPC status, nothing
//! crashes it, and what must not be accepted is stored as a tamper alert.

use std::time::Duration;

use integration_tests::collector::{Collector, Pki, raw_client};
use phi_chain::{
    checkpoint::HostKey,
    seal::{Head, Sealer},
};
use phi_proto::v1::{
    AgentMessage, Batch, CollectorMessage, Hello, Record, SealedRecord, agent_message,
    collector_message, record::Event,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const HOST: &str = "it-hostile";

fn hello(key: &HostKey) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            host_id: HOST.into(),
            public_key: key.public_key().to_vec(),
            agent_version: "test".into(),
            boot_id: String::new(),
        })),
    }
}

fn batch(records: Vec<SealedRecord>) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Batch(Batch {
            records,
            checkpoints: Vec::new(),
        })),
    }
}

fn heartbeats(n: usize) -> Vec<SealedRecord> {
    let mut sealer = Sealer::new(Head::EMPTY);
    (0..n)
        .map(|_| {
            sealer.seal(&mut Record {
                host_id: HOST.into(),
                event: Some(Event::Heartbeat(Default::default())),
                ..Default::default()
            })
        })
        .collect()
}

/// Sends `messages` (then keeps the stream open) and returns the replies until the first
/// error status.
async fn exchange(
    pki: &Pki,
    collector: &Collector,
    messages: Vec<AgentMessage>,
) -> (Vec<CollectorMessage>, Option<tonic::Status>) {
    let mut client = raw_client(pki, collector, HOST).await;
    let (tx, rx) = mpsc::channel(16);
    for m in messages {
        tx.send(m).await.expect("queue");
    }
    let mut replies = Vec::new();
    let mut inbound = match client.stream(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => return (replies, Some(status)),
    };
    loop {
        match tokio::time::timeout(Duration::from_secs(20), inbound.message()).await {
            Err(_) => return (replies, None),
            Ok(Ok(Some(m))) => {
                let is_ack = matches!(m.msg, Some(collector_message::Msg::Ack(_)));
                replies.push(m);
                if is_ack {
                    return (replies, None);
                }
            }
            Ok(Ok(None)) => return (replies, None),
            Ok(Err(status)) => {
                drop(tx);
                return (replies, Some(status));
            }
        }
    }
}

fn code(status: &Option<tonic::Status>) -> Option<Code> {
    status.as_ref().map(tonic::Status::code)
}

#[test]
fn every_bound_answers_with_a_clear_status_and_the_collector_survives() {
    integration_tests::require_root();
    let pki = Pki::new(&[HOST]);
    let collector = Collector::start_with(
        &pki,
        &[
            "--first-message-timeout",
            "1",
            "--max-batch",
            "10",
            "--max-message-bytes",
            "65536",
        ],
    );
    let key = HostKey::from_secret([5; 32]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // A batch before the Hello.
        let (_, st) = exchange(&pki, &collector, vec![batch(heartbeats(1))]).await;
        assert_eq!(code(&st), Some(Code::InvalidArgument), "{st:?}");

        // No Hello at all within the time allowed.
        let (_, st) = exchange(&pki, &collector, vec![]).await;
        assert_eq!(code(&st), Some(Code::DeadlineExceeded), "{st:?}");

        // A public key of the wrong size.
        let mut bad = hello(&key);
        if let Some(agent_message::Msg::Hello(h)) = bad.msg.as_mut() {
            h.public_key = vec![1, 2, 3];
        }
        let (_, st) = exchange(&pki, &collector, vec![bad]).await;
        assert_eq!(code(&st), Some(Code::InvalidArgument), "{st:?}");

        // Too many records in one batch.
        let (replies, st) =
            exchange(&pki, &collector, vec![hello(&key), batch(heartbeats(11))]).await;
        assert!(matches!(
            replies.first().and_then(|m| m.msg.as_ref()),
            Some(collector_message::Msg::Welcome(_))
        ));
        assert_eq!(code(&st), Some(Code::ResourceExhausted), "{st:?}");

        // A message over the size limit.
        let mut huge = heartbeats(1);
        huge[0].body = vec![0u8; 200_000];
        let (_, st) = exchange(&pki, &collector, vec![hello(&key), batch(huge)]).await;
        assert!(
            matches!(code(&st), Some(Code::ResourceExhausted | Code::OutOfRange)),
            "{st:?}"
        );

        // Garbage where a record should be: refused and kept as evidence.
        let garbage = SealedRecord {
            seq: 1,
            body: b"not a record at all".to_vec(),
            hash: vec![7; 32],
        };
        let (_, st) = exchange(&pki, &collector, vec![hello(&key), batch(vec![garbage])]).await;
        assert_eq!(code(&st), Some(Code::FailedPrecondition), "{st:?}");
        assert!(st.expect("status").message().contains("tamper alert"));

        // Still serving: a valid stream is acknowledged.
        let (replies, st) =
            exchange(&pki, &collector, vec![hello(&key), batch(heartbeats(3))]).await;
        assert!(st.is_none(), "{st:?}");
        assert!(matches!(
            replies.last().and_then(|m| m.msg.as_ref()),
            Some(collector_message::Msg::Ack(a)) if a.durable_seq == 3
        ));
    });
    let alerts = collector.alerts();
    assert!(
        alerts.iter().any(|(kind, _)| kind == "chain-break"),
        "the garbage record was stored as an alert: {alerts:?}"
    );
    assert_eq!(collector.records(HOST).len(), 3);
}

/// Sends `messages` at once and returns every reply until the stream ends or fails.
async fn exchange_all(
    pki: &Pki,
    collector: &Collector,
    messages: Vec<AgentMessage>,
    acks_wanted: usize,
) -> (Vec<CollectorMessage>, Option<tonic::Status>) {
    let mut client = raw_client(pki, collector, HOST).await;
    let (tx, rx) = mpsc::channel(messages.len().max(1));
    for m in messages {
        tx.send(m).await.expect("queue");
    }
    let mut inbound = client
        .stream(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let mut replies = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), inbound.message()).await {
            Err(_) | Ok(Ok(None)) => return (replies, None),
            Ok(Ok(Some(m))) => {
                replies.push(m);
                let acks = replies
                    .iter()
                    .filter(|m| matches!(m.msg, Some(collector_message::Msg::Ack(_))))
                    .count();
                if acks == acks_wanted {
                    return (replies, None);
                }
            }
            Ok(Err(status)) => return (replies, Some(status)),
        }
    }
}

fn acks(replies: &[CollectorMessage]) -> Vec<u64> {
    replies
        .iter()
        .filter_map(|m| match &m.msg {
            Some(collector_message::Msg::Ack(a)) => Some(a.durable_seq),
            _ => None,
        })
        .collect()
}

#[test]
fn batches_sent_ahead_of_a_refused_one_are_acknowledged_and_those_behind_it_are_not_stored() {
    integration_tests::require_root();
    let pki = Pki::new(&[HOST]);
    let collector = Collector::start_with(&pki, &[]);
    let key = HostKey::from_secret([6; 32]);
    let good = heartbeats(80);
    let mut sent = good.clone();
    // Record 37 was edited after it was sealed.
    sent[36].body.push(0);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // Eight batches of ten, all sent before the first answer: the collector decodes and
        // queues batches behind the one it is storing.
        let mut messages = vec![hello(&key)];
        messages.extend(sent.chunks(10).map(|c| batch(c.to_vec())));
        let (replies, st) = exchange_all(&pki, &collector, messages, usize::MAX).await;
        assert_eq!(acks(&replies), vec![10, 20, 30], "{replies:?}");
        assert_eq!(code(&st), Some(Code::FailedPrecondition), "{st:?}");
        // The agent reconnects and sends again from the durable head.
        let mut messages = vec![hello(&key)];
        messages.extend(good[36..].chunks(10).map(|c| batch(c.to_vec())));
        let (replies, st) = exchange_all(&pki, &collector, messages, 5).await;
        assert!(st.is_none(), "{st:?}");
        assert!(matches!(
            replies.first().and_then(|m| m.msg.as_ref()),
            Some(collector_message::Msg::Welcome(w)) if w.durable_seq == 36
        ));
        assert_eq!(acks(&replies), vec![46, 56, 66, 76, 80]);
    });
    // One alert, for the edited record: the batches queued behind it were not verified
    // against a head that stops before it (each would have been a second, false alert).
    let alerts = collector.alerts();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].0, "chain-break");
    let seqs: Vec<u64> = collector
        .records(HOST)
        .iter()
        .map(|r| r.sealed.seq)
        .collect();
    assert_eq!(seqs, (1..=80).collect::<Vec<u64>>());
}
