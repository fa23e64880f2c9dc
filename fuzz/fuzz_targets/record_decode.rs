//! What the collector does with bytes from the network: decode a batch, then check each
//! record against a chain. Must never panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phi_chain::seal::{Head, check_link, head_of};
use phi_proto::v1::{AgentMessage, Record, agent_message};
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = AgentMessage::decode(data)
        && let Some(agent_message::Msg::Batch(batch)) = msg.msg
    {
        let mut head = Head::EMPTY;
        for r in &batch.records {
            if check_link(head, r).is_ok() {
                head = head_of(r);
            }
        }
    }
    let _ = Record::decode(data);
});
