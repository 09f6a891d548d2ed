//! Routing: topics across shards, customer isolation, roles, broadcast, placement.

use proto::placement::owner_shard;
use serde_json::json;

use crate::util::*;

#[test]
fn topic_publish_reaches_every_subscriber_once_across_shards() {
    let server = Server::start(2);
    let mut clients: Vec<Client> = (0..12)
        .map(|i| Client::connect(&server, &sub_token(&format!("c-{i}"))))
        .collect();
    let shards: std::collections::BTreeSet<usize> = clients.iter().map(Client::shard).collect();
    assert_eq!(shards.len(), 2, "customers should land on both shards");
    for c in &mut clients {
        let reply = c.subscribe(&["conversation:1"]);
        assert!(reply["data"]["topics"]["conversation:1"]["epoch"].is_string());
    }
    for n in 1..=3 {
        let resp = server.publish(json!({"topics": ["conversation:1"], "event": {"type": "message_received", "data": {"n": n}}}));
        assert_eq!(resp["delivered"]["websocket"], 12, "{resp}");
    }
    for c in &mut clients {
        let got = c.drain_until_pong();
        let ns: Vec<_> = got
            .iter()
            .map(|e| {
                (
                    e["data"]["n"].as_i64().unwrap(),
                    e["offset"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ns,
            [(1, 1), (2, 2), (3, 3)],
            "exactly once, in order, with offsets"
        );
        assert_eq!(got[0]["topic"], "conversation:1");
        assert_eq!(got[0]["type"], "message_received");
    }
    // Unsubscribed clients stop receiving.
    clients[0].send_json(json!({"type": "unsubscribe", "payload": {"topics": ["conversation:1"]}}));
    assert_eq!(clients[0].recv_json()["type"], "unsubscribed");
    let resp = server.publish(json!({"topics": ["conversation:1"], "event": {"type": "t"}}));
    assert_eq!(resp["delivered"]["websocket"], 11);
    assert!(clients[0].drain_until_pong().is_empty());
}

#[test]
fn customer_events_never_reach_another_customer() {
    let server = Server::start(2);
    let mut alice = Client::connect(&server, &sub_token("alice"));
    let mut alice2 = Client::connect(&server, &sub_token("alice"));
    let mut bob = Client::connect(&server, &sub_token("bob"));
    let resp = server.publish(json!({"customers": ["alice"], "event": {"type": "case_status_update", "data": {"caseId": "C-1"}}}));
    assert_eq!(
        resp["delivered"]["websocket"], 2,
        "both of alice's connections"
    );
    for c in [&mut alice, &mut alice2] {
        let got = c.drain_until_pong();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["data"]["caseId"], "C-1");
    }
    assert!(
        bob.drain_until_pong().is_empty(),
        "bob must not see alice's event"
    );
    // An offline customer: nothing delivered, counted as dropped.
    let resp = server.publish(json!({"customers": ["carol"], "event": {"type": "x"}}));
    assert_eq!(
        (
            resp["delivered"]["websocket"].as_u64(),
            resp["dropped"].as_u64()
        ),
        (Some(0), Some(1))
    );
}

#[test]
fn all_connections_of_a_customer_live_on_its_owner_shard() {
    let server = Server::start(2);
    let mut handed_off = 0;
    for i in 0..10 {
        let customer = format!("placement-{i}");
        for _ in 0..3 {
            let c = Client::connect(&server, &sub_token(&customer));
            assert_eq!(c.shard(), owner_shard(&customer, 2), "{customer}");
        }
        handed_off += 3;
    }
    // With SO_REUSEPORT spreading accepts, some connections must have been handed over.
    let handoffs = server.metric("ringcast_handoffs_total");
    assert!(
        handoffs > 0.0 && handoffs <= handed_off as f64,
        "handoffs {handoffs}"
    );
    assert_eq!(server.metric("ringcast_handoffs_received_total"), handoffs);
}

#[test]
fn event_type_filters_apply_to_the_customer_stream() {
    let server = Server::start(1);
    let mut c = Client::connect(&server, &sub_token("dora"));
    c.send_json(json!({"type": "subscribe", "payload": {"events": ["case_"]}, "requestId": "e"}));
    let reply = c.recv_json();
    assert_eq!(reply["data"]["events"], json!(["case_"]));
    server.publish(json!({"customers": ["dora"], "event": {"type": "case_status_update"}}));
    server.publish(json!({"customers": ["dora"], "event": {"type": "journey_milestone"}}));
    let got = c.drain_until_pong();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["type"], "case_status_update");
}

#[test]
fn roles_and_broadcast() {
    let server = Server::start(2);
    let mut doc = Client::connect(
        &server,
        &token("doc-1", |c| c.roles = vec!["physician".into()]),
    );
    let mut nurse = Client::connect(
        &server,
        &token("nurse-1", |c| c.roles = vec!["nurse".into()]),
    );
    let resp = server.publish(
        json!({"roles": ["role:physician"], "event": {"type": "alert", "priority": "urgent"}}),
    );
    assert_eq!(resp["delivered"]["websocket"], 1);
    let got = doc.drain_until_pong();
    assert_eq!(
        (got.len(), got[0]["priority"].as_str()),
        (1, Some("urgent"))
    );
    assert!(nurse.drain_until_pong().is_empty());
    let resp = server.publish(json!({"broadcast": true, "event": {"type": "maintenance"}}));
    assert_eq!(resp["delivered"]["websocket"], 2);
    assert_eq!(doc.drain_until_pong().len(), 1);
    assert_eq!(nurse.drain_until_pong().len(), 1);
}

#[test]
fn client_publish_and_direct_messages_follow_the_token() {
    let server = Server::start(2);
    let mut a = Client::connect(
        &server,
        &token("anna", |c| {
            c.channels = vec!["conversation:*".into()];
            c.publish = vec!["conversation:*".into()];
            c.message = vec!["ben".into()];
        }),
    );
    let mut b = Client::connect(
        &server,
        &token("ben", |c| c.channels = vec!["conversation:*".into()]),
    );
    b.subscribe(&["conversation:7"]);
    a.send_json(json!({"type": "publish", "payload": {"topic": "conversation:7", "type": "chat", "data": {"text": "hi"}}, "requestId": "p1"}));
    assert_eq!(a.recv_json()["requestId"], "p1");
    let got = b.recv_json();
    assert_eq!(
        (
            got["type"].as_str(),
            got["from"].as_str(),
            got["data"]["text"].as_str()
        ),
        (Some("chat"), Some("anna"), Some("hi"))
    );
    // Ben's token allows neither publishing nor messaging.
    b.send_json(json!({"type": "publish", "payload": {"topic": "conversation:7", "type": "chat"}, "requestId": "p2"}));
    let e = b.recv_json();
    assert_eq!(
        (
            e["type"].as_str(),
            e["code"].as_str(),
            e["requestId"].as_str()
        ),
        (Some("error"), Some("forbidden"), Some("p2"))
    );
    b.send_json(json!({"type": "send_message", "payload": {"to": "anna", "data": {}}}));
    assert_eq!(b.recv_json()["code"], "forbidden");
    // Anna may message Ben: seed-portal shape `{recipientId, message}`.
    a.send_json(
        json!({"type": "send_message", "payload": {"recipientId": "ben", "message": "hello"}}),
    );
    assert_eq!(a.recv_json()["type"], "sent");
    let got = b.recv_json();
    assert_eq!(
        (
            got["type"].as_str(),
            got["from"].as_str(),
            got["data"]["message"].as_str()
        ),
        (Some("message_received"), Some("anna"), Some("hello"))
    );
}
