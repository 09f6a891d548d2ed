//! Ordering promises of docs/protocol.md that depend on how shards interleave work: they
//! are checked here against the real server under concurrent traffic.

use serde_json::json;

use crate::util::*;

/// Events a client sends in order reach other subscribers in that order, whatever their
/// kind: a published message, then a typing indicator, must not arrive swapped.
#[test]
fn a_typing_indicator_does_not_overtake_a_message_sent_before_it() {
    let server = Server::start_with(
        2,
        &[("RINGCAST_LIMITS_CLIENT_MESSAGES_PER_MINUTE", "10000")],
    );
    let sender_token = |sub: &str| {
        token(sub, |c| {
            c.channels = vec!["conversation:*".into()];
            c.publish = vec!["conversation:*".into()];
        })
    };
    // A few receivers, so they land on both shards.
    let mut receivers: Vec<Client> = (0..6)
        .map(|i| Client::connect(&server, &sender_token(&format!("recv-{i}"))))
        .collect();
    for r in &mut receivers {
        r.subscribe(&["conversation:typing-order"]);
    }
    let mut a = Client::connect(&server, &sender_token("sender"));
    a.subscribe(&["conversation:typing-order"]);
    let rounds = 40;
    for n in 0..rounds {
        a.send_json(json!({"type": "publish", "payload": {"topic": "conversation:typing-order", "type": "chat_message", "data": {"n": n}}}));
        let state = if n % 2 == 0 { "start" } else { "stop" };
        a.send_json(json!({"type": "typing", "payload": {"topic": "conversation:typing-order", "state": state}}));
    }
    for (i, r) in receivers.iter_mut().enumerate() {
        // A "stop" is sent after each odd-numbered message. Some indicators may be dropped
        // (throttling, repeats), so the k-th stop to arrive was sent after message 2k+1 or a
        // later one: at least 2k+2 messages must have arrived before it.
        let (mut messages, mut stops) = (0, 0);
        let mut early = Vec::new();
        while messages < rounds {
            let v = r.recv_json();
            match v["type"].as_str() {
                Some("chat_message") => messages += 1,
                Some("typing") if v["data"]["state"] == "stop" => {
                    if messages < 2 * stops + 2 {
                        early.push(format!("stop #{stops} after {messages} messages"));
                    }
                    stops += 1;
                }
                _ => {}
            }
        }
        assert!(
            early.is_empty(),
            "receiver {i}: typing overtook messages: {early:?}"
        );
    }
}
