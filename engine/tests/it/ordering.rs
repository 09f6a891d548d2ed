//! Ordering promises of docs/protocol.md that depend on how shards interleave work: they
//! are checked here against the real server under concurrent traffic.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
};

use serde_json::json;

use crate::util::*;

/// docs/protocol.md: on subscribe, the server sends the replayed history, then
/// `subscription_confirmed`, then live events, with no gap and no duplicate. A backend
/// publishes to the topics without pause while new clients subscribe to them.
#[test]
fn replay_then_confirmation_then_live_under_concurrent_publishes() {
    let server = Arc::new(Server::start(2));
    let topics = [
        "conversation:ord-a",
        "conversation:ord-b",
        "conversation:ord-c",
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (0..2)
        .map(|p| {
            let (server, stop) = (server.clone(), stop.clone());
            thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    server.publish(json!({"topics": topics, "event": {"type": "tick", "data": {"p": p, "n": n}}}));
                    n += 1;
                }
            })
        })
        .collect();
    let mut live_before_confirmation = Vec::new();
    for round in 0..30 {
        let mut c = Client::connect(&server, &sub_token(&format!("ord-{round}")));
        c.send_json(json!({"type": "subscribe", "payload": {"topics": topics, "last": 3}, "requestId": "s"}));
        let mut before = Vec::new();
        let confirmed = loop {
            let v = c.recv_json();
            if v["type"] == "subscription_confirmed" {
                break v;
            }
            before.push(v);
        };
        let offset = |t: &str| confirmed["data"]["topics"][t]["offset"].as_u64().unwrap();
        for e in &before {
            let t = e["topic"].as_str().unwrap();
            if e["offset"].as_u64().unwrap() > offset(t) {
                live_before_confirmation.push(format!("round {round}: {e}"));
            }
        }
        // Whatever the order, each topic's events form one run of offsets: no gap, no
        // duplicate, and the live ones continue right after the replayed ones.
        let after: Vec<_> = (0..9).map(|_| c.recv_json()).collect();
        for t in topics {
            let offsets: Vec<u64> = before
                .iter()
                .chain(&after)
                .filter(|e| e["topic"] == t)
                .map(|e| e["offset"].as_u64().unwrap())
                .collect();
            let run: Vec<u64> = (offsets[0]..offsets[0] + offsets.len() as u64).collect();
            assert_eq!(offsets, run, "round {round}, {t}: gap or duplicate");
        }
    }
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.join().unwrap();
    }
    assert!(
        live_before_confirmation.is_empty(),
        "live events arrived before subscription_confirmed: {live_before_confirmation:?}"
    );
}

/// The same promise on an SSE stream opened with `topics=`: no topic event comes before its
/// `subscription_confirmed` record (SSE topic subscriptions replay nothing).
#[test]
fn sse_confirmation_precedes_live_topic_events_under_concurrent_publishes() {
    let server = Arc::new(Server::start(2));
    let topics = ["conversation:sse-a", "conversation:sse-b"];
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (server, stop) = (server.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                server.publish(json!({"topics": topics, "event": {"type": "tick", "data": {}}}));
            }
        })
    };
    let mut early = Vec::new();
    for round in 0..20 {
        let path = format!(
            "/v1/events/stream?token={}&topics={}",
            sub_token(&format!("sse-ord-{round}")),
            topics.join(",")
        );
        let mut sse = SseClient::open(&server, &path, &[]);
        assert_eq!(sse.status, 200);
        let mut ticks_after = 0;
        let mut confirmed = false;
        while ticks_after < 3 {
            let e = sse.next().expect("stream open");
            match e.event.as_str() {
                "subscription_confirmed" => confirmed = true,
                "tick" if !confirmed => early.push(format!("round {round}: {}", e.data)),
                "tick" => ticks_after += 1,
                _ => {}
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    publisher.join().unwrap();
    assert!(
        early.is_empty(),
        "topic events before subscription_confirmed: {early:?}"
    );
}

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
