//! Reliable delivery: topic history and recovery, the customer stream's offline queue, acks,
//! cursors, SSE, long poll, deduplication, time to live.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::{sub_token, Client, Server, SseClient, API_KEY};

/// `GET path` with a customer's token; returns (status, JSON body).
fn get_json(server: &Server, path: &str, token: &str) -> (u16, Value) {
    let (status, body) = server.http(
        "GET",
        path,
        &[("Authorization", &format!("Bearer {token}"))],
        "",
    );
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn persistent(customer: &str, kind: &str, n: u64) -> Value {
    json!({"customers": [customer], "event": {"type": kind, "data": {"n": n}, "persistent": true}})
}

/// Reads until `subscription_confirmed`; returns the events before it and the reply.
fn until_confirmed(c: &mut Client) -> (Vec<Value>, Value) {
    let mut events = Vec::new();
    loop {
        let v = c.recv_json();
        if v["type"] == "subscription_confirmed" {
            return (events, v);
        }
        events.push(v);
    }
}

#[test]
fn topic_recovery_replays_exactly_the_missed_events() {
    let server = Server::start_with(2, &[("RINGCAST_HISTORY_SIZE", "5")]);
    let token = sub_token("alice");
    let pub_topic = |n: u64| {
        server.publish(json!({"topics": ["room:1"], "event": {"type": "chat", "data": {"n": n}}}))
    };
    let mut a = Client::connect(&server, &token);
    let confirmed = a.subscribe(&["room:1"]);
    let epoch = confirmed["data"]["topics"]["room:1"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    for n in 1..=2 {
        pub_topic(n);
    }
    let live: Vec<u64> = (0..2)
        .map(|_| a.recv_json()["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(live, [1, 2]);
    drop(a);
    for n in 3..=5 {
        pub_topic(n);
    }
    // Back with the last offset seen: exactly 3, 4, 5, in order, then live with no gap.
    let mut a = Client::connect(&server, &token);
    a.send_json(json!({"type": "subscribe", "requestId": "r",
        "payload": {"topics": ["room:1"], "since": {"room:1": {"offset": 2, "epoch": epoch}}}}));
    let (replayed, reply) = until_confirmed(&mut a);
    let offsets: Vec<u64> = replayed
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [3, 4, 5], "{replayed:?}");
    assert_eq!(replayed[0]["data"]["n"], 3);
    assert_eq!(reply["data"]["topics"]["room:1"]["recovered"], true);
    assert_eq!(reply["data"]["topics"]["room:1"]["offset"], 5);
    pub_topic(6);
    assert_eq!(a.recv_json()["offset"], 6);
    assert!(
        a.drain_until_pong().is_empty(),
        "no duplicate after the switch to live"
    );
    drop(a);
    // Ten more while away: the history keeps five, so offset 6 cannot be recovered.
    for n in 7..=16 {
        pub_topic(n);
    }
    let mut a = Client::connect(&server, &token);
    a.send_json(json!({"type": "subscribe", "requestId": "r",
        "payload": {"topics": ["room:1"], "since": {"room:1": {"offset": 6, "epoch": epoch}}}}));
    let (replayed, reply) = until_confirmed(&mut a);
    assert!(replayed.is_empty(), "{replayed:?}");
    assert_eq!(reply["data"]["topics"]["room:1"]["recovered"], false);
    assert_eq!(reply["data"]["topics"]["room:1"]["offset"], 16);
    // A stale epoch (a restarted server) is never "recovered".
    let mut b = Client::connect(&server, &token);
    b.send_json(json!({"type": "subscribe", "requestId": "r",
        "payload": {"topics": ["room:1"], "since": {"room:1": {"offset": 15, "epoch": "old"}}}}));
    let (replayed, reply) = until_confirmed(&mut b);
    assert!(replayed.is_empty());
    assert_eq!(reply["data"]["topics"]["room:1"]["recovered"], false);
    // Within the window it works again: 14, 15, 16.
    let mut c = Client::connect(&server, &token);
    c.send_json(json!({"type": "subscribe", "requestId": "r",
        "payload": {"topics": ["room:1"], "since": {"room:1": {"offset": 13, "epoch": epoch}}}}));
    let (replayed, reply) = until_confirmed(&mut c);
    let offsets: Vec<u64> = replayed
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [14, 15, 16]);
    assert_eq!(reply["data"]["topics"]["room:1"]["recovered"], true);
}

#[test]
fn portal_mobile_flow_missed_events_then_acknowledged_replay() {
    let server = Server::start(2);
    let token = sub_token("patient-7");
    let ws = Client::connect(&server, &token);
    let cursor = ws.welcome["data"]["cursor"].as_str().unwrap().to_owned();
    drop(ws);
    std::thread::sleep(Duration::from_millis(200));
    let mut ids = Vec::new();
    for n in 1..=3 {
        let r = server.publish(persistent("patient-7", "case_status_update", n));
        assert_eq!(r["queued"], 1, "{r}");
        assert_eq!(r["delivered"]["websocket"], 0);
        ids.push(r["id"].as_str().unwrap().to_owned());
    }
    let (status, missed) = get_json(
        &server,
        &format!("/v1/portal/events/missed?since={cursor}"),
        &token,
    );
    assert_eq!(status, 200, "{missed}");
    let events = missed["events"].as_array().unwrap();
    assert_eq!(events.len(), 3, "{missed}");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["type"], "case_status_update");
        assert_eq!(e["data"]["n"], i as u64 + 1);
        assert_eq!(e["id"], ids[i]);
        assert_eq!(e["persistent"], true);
    }
    assert_eq!(missed["recovered"], true);
    // Without a cursor the seed's background sync gets the same three.
    let (_, all) = get_json(&server, "/v1/portal/events/missed", &token);
    assert_eq!(all["events"].as_array().unwrap().len(), 3);
    // Reconnect: the three come first, once each, in order; acknowledged, they never return.
    let mut ws = Client::connect(&server, &token);
    let replayed: Vec<Value> = (0..3).map(|_| ws.recv_json()).collect();
    let got: Vec<&str> = replayed.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(got, ids);
    assert!(replayed.iter().all(|e| e["cursor"].is_string()));
    assert!(ws.drain_until_pong().is_empty());
    ws.send_json(json!({"type": "ack", "requestId": "a1", "payload": {"ids": ids}}));
    let acked = ws.recv_json();
    assert_eq!(
        (acked["type"].as_str(), acked["data"]["acked"].as_u64()),
        (Some("acked"), Some(3))
    );
    drop(ws);
    let mut ws = Client::connect(&server, &token);
    assert!(
        ws.drain_until_pong().is_empty(),
        "acknowledged events came back"
    );
    let (_, after) = get_json(&server, "/v1/portal/events/missed", &token);
    assert_eq!(after["events"].as_array().unwrap().len(), 0);
    assert_eq!(server.metric("ringcast_acks_total"), 3.0);
}

#[test]
fn unacknowledged_events_come_back_and_a_cursor_acknowledges() {
    let server = Server::start(1);
    let token = sub_token("c1");
    let mut ws = Client::connect(&server, &token);
    let r = server.publish(persistent("c1", "case_status_update", 1));
    assert_eq!(
        (r["delivered"]["websocket"].as_u64(), r["queued"].as_u64()),
        (Some(1), Some(0))
    );
    let first = ws.recv_json();
    drop(ws);
    // Not acknowledged: delivered again (at least once).
    let mut ws = Client::connect(&server, &token);
    let again = ws.recv_json();
    assert_eq!(again["id"], first["id"]);
    drop(ws);
    // Reconnecting with the event's cursor acknowledges it and everything before.
    let path = format!(
        "/v1/ws?token={token}&since={}",
        first["cursor"].as_str().unwrap()
    );
    let mut ws = Client::connect_raw(&server, &path).unwrap();
    let welcome = ws.recv_json();
    assert_eq!(welcome["data"]["recovered"], true);
    assert!(ws.drain_until_pong().is_empty());
    // A cursor from another epoch is refused politely: recovered false, everything stored.
    server.publish(persistent("c1", "case_status_update", 2));
    let stored = ws.recv_json();
    drop(ws);
    let mut ws =
        Client::connect_raw(&server, &format!("/v1/ws?token={token}&since=bogus-9")).unwrap();
    let welcome = ws.recv_json();
    assert_eq!(welcome["data"]["recovered"], false);
    assert_eq!(ws.recv_json()["id"], stored["id"]);
}

#[test]
fn non_persistent_events_to_offline_customers_are_dropped_and_counted() {
    let server = Server::start(2);
    let r = server.publish(json!({"customers": ["ghost", "ghost2"], "event": {"type": "x"}}));
    assert_eq!(
        (r["dropped"].as_u64(), r["queued"].as_u64()),
        (Some(2), Some(0))
    );
    let r =
        server.publish(json!({"customers": ["ghost"], "event": {"type": "x", "persistent": true}}));
    assert_eq!(
        (r["dropped"].as_u64(), r["queued"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(server.metric("ringcast_offline_dropped_total"), 2.0);
    assert_eq!(server.metric("ringcast_events_queued_total"), 1.0);
}

#[test]
fn offline_queue_is_bounded_and_says_what_was_lost() {
    let server = Server::start_with(1, &[("RINGCAST_DELIVERY_OFFLINE_QUEUE", "3")]);
    let token = sub_token("c2");
    let ws = Client::connect(&server, &token);
    let cursor = ws.welcome["data"]["cursor"].as_str().unwrap().to_owned();
    drop(ws);
    std::thread::sleep(Duration::from_millis(200));
    for n in 1..=5 {
        server.publish(persistent("c2", "case_status_update", n));
    }
    let (_, missed) = get_json(
        &server,
        &format!("/v1/events/missed?since={cursor}"),
        &token,
    );
    let ns: Vec<u64> = missed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, [3, 4, 5], "the last three are kept");
    assert_eq!(
        missed["recovered"], false,
        "1 and 2 were lost: the client must reload"
    );
    assert_eq!(server.metric("ringcast_stored_events_lost_total"), 2.0);
}

#[test]
fn ttl_expires_stored_events() {
    let server = Server::start(1);
    let token = sub_token("c3");
    server.publish(
        json!({"customers": ["c3"], "event": {"type": "t", "persistent": true, "ttl": 1}}),
    );
    server.publish(json!({"customers": ["c3"], "event": {"type": "keep", "persistent": true}}));
    std::thread::sleep(Duration::from_millis(2100));
    let (_, missed) = get_json(&server, "/v1/events/missed", &token);
    let kinds: Vec<&str> = missed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["keep"]);
    let (status, _) = server.http(
        "POST",
        "/v1/publish",
        &[("Authorization", &format!("Bearer {API_KEY}"))],
        &json!({"customers": ["c3"], "event": {"type": "t", "ttl": 0}}).to_string(),
    );
    assert_eq!(status, 400);
}

#[test]
fn publisher_chosen_ids_are_delivered_once() {
    let server = Server::start(2);
    let mut c = Client::connect(&server, &sub_token("c4"));
    c.subscribe(&["news"]);
    let body = json!({"customers": ["c4"], "topics": ["news"],
        "event": {"type": "n", "id": "evt-1", "persistent": true}});
    let first = server.publish(body.clone());
    assert_eq!(first["delivered"]["websocket"], 2, "{first}");
    let second = server.publish(body);
    assert_eq!(second["duplicates"], 2, "{second}");
    assert_eq!(second["delivered"]["websocket"], 0);
    let got = c.drain_until_pong();
    assert_eq!(
        got.len(),
        2,
        "one via the stream, one via the topic: {got:?}"
    );
    // Generated ids are never deduplicated.
    let r = server.publish(json!({"customers": ["c4"], "event": {"type": "n"}}));
    let r2 = server.publish(json!({"customers": ["c4"], "event": {"type": "n"}}));
    assert_eq!(
        (
            r["delivered"]["websocket"].as_u64(),
            r2["delivered"]["websocket"].as_u64()
        ),
        (Some(1), Some(1))
    );
}

#[test]
fn long_poll_parks_until_an_event_arrives() {
    let server = Server::start(2);
    let token = sub_token("c5");
    let (_, first) = get_json(&server, "/v1/events/missed", &token);
    let cursor = first["cursor"].as_str().unwrap().to_owned();
    std::thread::scope(|scope| {
        let poll = scope.spawn(|| {
            let started = Instant::now();
            let path = format!("/v1/events/missed?since={cursor}&wait=10");
            (get_json(&server, &path, &token), started.elapsed())
        });
        // Wait until the poll is parked, then publish (not persistent: only a waiting poll gets it).
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.metric("ringcast_polls_waiting") < 1.0 {
            assert!(Instant::now() < deadline, "the poll never parked");
            std::thread::sleep(Duration::from_millis(20));
        }
        let r = server
            .publish(json!({"customers": ["c5"], "event": {"type": "alert", "data": {"bed": 4}}}));
        assert_eq!(r["delivered"]["poll"], 1, "{r}");
        let ((status, body), took) = poll.join().unwrap();
        check_poll_result(&server, &token, status, &body, took);
    });
}

fn check_poll_result(server: &Server, token: &str, status: u16, body: &Value, took: Duration) {
    assert_eq!(status, 200);
    assert!(
        took < Duration::from_secs(9),
        "returned on the event, not the timeout"
    );
    let events = body["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["data"]["bed"], 4);
    // An empty wait times out with nothing and a cursor to continue from.
    let next = body["cursor"].as_str().unwrap();
    let (status, body) = get_json(
        server,
        &format!("/v1/events/missed?since={next}&wait=1"),
        token,
    );
    assert_eq!(status, 200);
    assert_eq!(body["events"].as_array().unwrap().len(), 0);
    let (status, _) = get_json(server, "/v1/events/missed?wait=soon", token);
    assert_eq!(status, 400);
    let (status, _) = get_json(server, "/v1/events/missed", "not-a-token");
    assert_eq!(status, 401);
}

#[test]
fn sse_streams_filters_and_resumes_from_last_event_id() {
    let server = Server::start(2);
    let token = sub_token("c6");
    let path = format!("/v1/events/stream?token={token}&events=case_&topics=ward:1");
    let mut sse = SseClient::open(&server, &path, &[]);
    assert_eq!(sse.status, 200);
    let hello = sse.next().unwrap();
    assert_eq!(hello.event, "connection_established");
    assert_eq!(hello.id, None, "the greeting leaves Last-Event-ID alone");
    let hello: Value = serde_json::from_str(&hello.data).unwrap();
    assert_eq!(hello["customerId"], "c6");
    // The topic subscription is live once this record arrives.
    let confirmed = sse.next().unwrap();
    assert_eq!(confirmed.event, "subscription_confirmed");
    assert_eq!(confirmed.id, None);
    let confirmed: Value = serde_json::from_str(&confirmed.data).unwrap();
    assert_eq!(
        confirmed["topics"]["ward:1"]["recovered"], true,
        "{confirmed}"
    );
    // Filtered out, then one that passes, then a topic event.
    server.publish(json!({"customers": ["c6"], "event": {"type": "message_received"}}));
    let r = server.publish(persistent("c6", "case_status_update", 1));
    assert_eq!(r["delivered"]["sse"], 1, "{r}");
    let e = sse.next().unwrap();
    assert_eq!(e.event, "case_status_update");
    assert_eq!(
        serde_json::from_str::<Value>(&e.data).unwrap(),
        json!({"n": 1})
    );
    let last_id = e.id.clone().expect("customer events carry a cursor");
    let r = server.publish(
        json!({"topics": ["ward:1"], "event": {"type": "ward_update", "data": {"beds": 3}}}),
    );
    assert_eq!(r["delivered"]["sse"], 1, "{r}");
    let topic_event = sse.next().unwrap();
    assert_eq!(topic_event.event, "ward_update");
    assert_eq!(topic_event.id, None);
    drop(sse);
    std::thread::sleep(Duration::from_millis(200));
    for n in 2..=3 {
        server.publish(persistent("c6", "case_status_update", n));
    }
    // Resume as a browser does.
    let path = format!("/v1/events/stream?token={token}&events=case_");
    let mut sse = SseClient::open(&server, &path, &[("Last-Event-ID", &last_id)]);
    assert_eq!(sse.next().unwrap().event, "connection_established");
    let ns: Vec<u64> = (0..2)
        .map(|_| {
            let e = sse.next().unwrap();
            serde_json::from_str::<Value>(&e.data).unwrap()["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(ns, [2, 3]);
    // Refusals before the stream starts.
    let forbidden = crate::util::token("c7", |c| c.channels = vec!["own:*".into()]);
    let sse = SseClient::open(
        &server,
        &format!("/v1/events/stream?token={forbidden}&topics=ward:1"),
        &[],
    );
    assert_eq!(sse.status, 403);
    let sse = SseClient::open(&server, "/v1/events/stream", &[]);
    assert_eq!(sse.status, 401);
}

#[test]
fn disconnect_closes_a_customers_connections() {
    let server = Server::start(2);
    let token = sub_token("c8");
    let mut ws = Client::connect(&server, &token);
    let mut sse = SseClient::open(&server, &format!("/v1/events/stream?token={token}"), &[]);
    assert_eq!(sse.next().unwrap().event, "connection_established");
    let (status, body) = server.http(
        "POST",
        "/v1/disconnect",
        &[("Authorization", &format!("Bearer {API_KEY}"))],
        &json!({"customers": ["c8"], "code": 4003}).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            v["closed"]["websocket"].as_u64(),
            v["closed"]["sse"].as_u64()
        ),
        (Some(1), Some(1))
    );
    let close = ws.recv_close().expect("close frame");
    assert_eq!(u16::from(close.code), 4003);
    assert!(sse.next().is_none(), "the SSE stream ends");
    let (status, _) = server.http(
        "POST",
        "/v1/disconnect",
        &[("Authorization", &format!("Bearer {API_KEY}"))],
        &json!({"customers": ["c8"], "code": 1234}).to_string(),
    );
    assert_eq!(status, 400);
}

/// Publisher-chosen ids are scoped by the kind of target: the same id sent to topic `x` and
/// to customer `x` are two events, not a repeat (they shared one id space before).
#[test]
fn the_same_id_to_a_topic_and_to_a_customer_of_that_name_is_not_a_repeat() {
    // A name whose topic and customer live on the same shard, where they shared a key.
    let name = (0..)
        .map(|i| format!("same-name-{i}"))
        .find(|n| proto::placement::topic_shard(n, 2) == proto::placement::owner_shard(n, 2))
        .unwrap();
    let server = Server::start(2);
    let mut c = Client::connect(&server, &sub_token(&name));
    c.subscribe(&[name.as_str()]);
    let to_topic =
        server.publish(json!({"topics": [name], "event": {"type": "t", "id": "evt-same"}}));
    assert_eq!(to_topic["delivered"]["websocket"], 1, "{to_topic}");
    let to_customer =
        server.publish(json!({"customers": [name], "event": {"type": "c", "id": "evt-same"}}));
    assert_eq!(to_customer["duplicates"], 0, "{to_customer}");
    assert_eq!(to_customer["delivered"]["websocket"], 1, "{to_customer}");
    let kinds: Vec<_> = c
        .drain_until_pong()
        .iter()
        .map(|e| e["type"].clone())
        .collect();
    assert_eq!(kinds, ["t", "c"]);
}
