//! Chat semantics with real WebSocket clients: the consultation seed's flow (typing, a
//! message with its offset, a read receipt, WebRTC signalling by direct message) and a third
//! customer who is not a member and receives none of it.

use serde_json::{json, Value};

use crate::util::*;

/// Reads until a message of type `kind` arrives; returns it and what came before.
fn until_type(c: &mut Client, kind: &str) -> (Value, Vec<Value>) {
    let mut before = Vec::new();
    loop {
        let v = c.recv_json();
        if v["type"] == kind {
            return (v, before);
        }
        before.push(v);
    }
}

#[test]
fn consultation_flow_between_two_members_and_nothing_for_an_outsider() {
    // `conversation:` rooms have presence (namespace config), diffs every 100 ms.
    let (server, _cfg) = crate::presence::presence_server(2, "100");
    let tok = |sub: &str, room: &str| {
        let room = room.to_owned();
        token(sub, move |c| {
            c.channels = vec![room];
            c.publish = vec!["conversation:*".into()];
        })
    };
    let mut a = Client::connect(&server, &tok("doctor-a", "conversation:7"));
    let mut b = Client::connect(&server, &tok("patient-b", "conversation:7"));
    let mut c = Client::connect(&server, &tok("outsider-c", "conversation:8"));
    a.subscribe(&["conversation:7"]);
    b.subscribe(&["conversation:7"]);
    // Both see each other in the room's presence.
    let joined = |v: &Value, who: &str| {
        v["type"] == "presence_diff"
            && v["data"]["joined"]
                .as_array()
                .is_some_and(|j| j.contains(&json!(who)))
    };
    loop {
        let v = a.recv_json();
        if joined(&v, "patient-b") {
            break;
        }
    }
    // B joined second: its first diff may already name A, or A was announced before B
    // subscribed; the room's member list (what B asks the backend or sees) has both.
    let (status, room) = server.http(
        "GET",
        "/v1/presence/topics/conversation:7",
        &[("Authorization", &format!("Bearer {API_KEY}"))],
        "",
    );
    assert_eq!(status, 200);
    assert!(
        room.contains("doctor-a") && room.contains("patient-b"),
        "{room}"
    );
    b.send_json(json!({"type": "presence", "payload": {"status": "busy"}}));
    let (p, _) = until_type(&mut a, "presence");
    assert_eq!(
        (
            p["data"]["customerId"].as_str(),
            p["data"]["status"].as_str()
        ),
        (Some("patient-b"), Some("busy")),
        "{p}"
    );
    a.send_json(json!({"type": "presence", "payload": {"status": "away"}}));
    let (p, _) = until_type(&mut b, "presence");
    assert_eq!(
        (
            p["data"]["customerId"].as_str(),
            p["data"]["status"].as_str()
        ),
        (Some("doctor-a"), Some("away")),
        "{p}"
    );
    // The outsider cannot join.
    c.send_json(
        json!({"type": "subscribe", "payload": {"topics": ["conversation:7"]}, "requestId": "x"}),
    );
    let refused = c.recv_json();
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{refused}"
    );

    // A types: B sees it, A does not get its own indicator.
    a.send_json(
        json!({"type": "typing", "payload": {"topic": "conversation:7", "state": "start"}}),
    );
    let (typing, _) = until_type(&mut b, "typing");
    assert_eq!(typing["topic"], "conversation:7");
    assert_eq!(
        typing["data"],
        json!({"customerId": "doctor-a", "state": "start"})
    );
    // A second start within the throttle window is dropped; a stop goes through.
    a.send_json(
        json!({"type": "typing", "payload": {"topic": "conversation:7", "state": "start"}}),
    );
    a.send_json(json!({"type": "typing", "payload": {"topic": "conversation:7", "state": "stop"}}));
    let (stop, skipped) = until_type(&mut b, "typing");
    assert_eq!(
        stop["data"]["state"], "stop",
        "throttled start skipped: {skipped:?}"
    );
    assert!(a.drain_until_pong().iter().all(|v| v["type"] != "typing"));

    // A's message reaches B with its offset and sender.
    a.send_json(json!({"type": "publish", "payload": {"topic": "conversation:7", "type": "chat_message", "data": {"text": "hello"}}, "requestId": "m1"}));
    let (published, _) = until_type(&mut a, "published");
    let id = published["data"]["id"].as_str().unwrap().to_owned();
    let (msg, _) = until_type(&mut b, "chat_message");
    assert_eq!(msg["from"], "doctor-a");
    assert_eq!(msg["id"], id.as_str());
    assert_eq!(msg["topic"], "conversation:7");
    assert!(msg["offset"].as_u64().unwrap() >= 1, "{msg}");
    assert_eq!(msg["data"], json!({"text": "hello"}));

    // B's read receipt reaches A.
    b.send_json(json!({"type": "ack", "payload": {"ids": [id], "status": "read"}}));
    let (receipt, _) = until_type(&mut a, "message_read");
    assert_eq!(
        receipt["data"],
        json!({"id": id, "by": "patient-b", "topic": "conversation:7"})
    );

    // WebRTC signalling by direct message (no token grant: they share a topic).
    a.send_json(json!({"type": "send_message", "payload": {"to": "patient-b", "type": "webrtc_offer", "data": {"sdp": "v=0 offer"}}, "requestId": "o"}));
    let (sent, _) = until_type(&mut a, "sent");
    assert_eq!(sent["requestId"], "o");
    let (offer, _) = until_type(&mut b, "webrtc_offer");
    assert_eq!(offer["from"], "doctor-a");
    assert_eq!(offer["data"], json!({"sdp": "v=0 offer"}));
    b.send_json(json!({"type": "send_message", "payload": {"to": "doctor-a", "type": "webrtc_answer", "data": {"sdp": "v=0 answer"}}}));
    let (answer, _) = until_type(&mut a, "webrtc_answer");
    assert_eq!(answer["from"], "patient-b");
    assert_eq!(answer["data"], json!({"sdp": "v=0 answer"}));

    // The outsider got none of it, and cannot message or type into the room.
    c.send_json(json!({"type": "send_message", "payload": {"to": "doctor-a", "type": "webrtc_offer", "data": {}}, "requestId": "c1"}));
    let e = c.recv_json();
    assert_eq!(
        (e["code"].as_str(), e["requestId"].as_str()),
        (Some("forbidden"), Some("c1")),
        "{e}"
    );
    c.send_json(
        json!({"type": "typing", "payload": {"topic": "conversation:7"}, "requestId": "c2"}),
    );
    let e = c.recv_json();
    assert_eq!(e["code"], "not_member", "{e}");
    assert!(
        c.drain_until_pong().is_empty(),
        "the outsider received something"
    );
    // And nothing of the outsider's reached the members.
    assert!(a
        .drain_until_pong()
        .iter()
        .all(|v| v["from"] != "outsider-c"));
    assert!(b
        .drain_until_pong()
        .iter()
        .all(|v| v["from"] != "outsider-c"));
    assert_eq!(server.metric("ringcast_receipts_total"), 1.0);
    assert_eq!(server.metric("ringcast_direct_forbidden_total"), 1.0);
}

#[test]
fn a_receipt_only_counts_from_a_recipient() {
    let server = Server::start(2);
    let tok = |sub: &str| {
        token(sub, |c| {
            c.channels = vec!["conversation:*".into()];
            c.publish = vec!["conversation:*".into()];
        })
    };
    let mut a = Client::connect(&server, &tok("sender"));
    let mut b = Client::connect(&server, &tok("member"));
    let mut c = Client::connect(&server, &tok("elsewhere"));
    a.subscribe(&["conversation:1"]);
    b.subscribe(&["conversation:1"]);
    c.subscribe(&["conversation:2"]);
    a.send_json(json!({"type": "publish", "payload": {"topic": "conversation:1", "type": "chat_message", "data": {}}}));
    let (published, _) = until_type(&mut a, "published");
    let id = published["data"]["id"].as_str().unwrap().to_owned();
    // A non-member that learnt the id: no receipt.
    c.send_json(json!({"type": "ack", "payload": {"ids": [id], "status": "read"}}));
    assert!(c.drain_until_pong().is_empty());
    // The member's delivered receipt does reach the sender.
    b.send_json(json!({"type": "ack", "payload": {"ids": [id], "status": "delivered"}}));
    let (receipt, before) = until_type(&mut a, "message_delivered");
    assert_eq!(receipt["data"]["by"], "member");
    assert!(
        before.iter().all(|v| v["type"] != "message_read"),
        "{before:?}"
    );
    assert_eq!(server.metric("ringcast_receipts_total"), 1.0);
}
