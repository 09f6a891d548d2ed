//! Presence with real WebSocket clients: members see each other join, leave and change
//! status; the API answers who is in a room and how a customer is; churn is coalesced.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::*;

/// A server whose `conversation:` namespace has presence, with a short coalescing window.
pub fn presence_server(shards: usize, window_ms: &str) -> (Server, tempfile_path::TempFile) {
    let file = tempfile_path::TempFile::new(
        "[[namespaces]]\nprefix = \"conversation:\"\npresence = true\nhistory_size = 50\n",
    );
    let server = Server::start_with(
        shards,
        &[
            ("RINGCAST_CONFIG", file.path()),
            ("RINGCAST_PRESENCE_COALESCE_MS", window_ms),
        ],
    );
    (server, file)
}

/// A scratch file removed on drop.
pub mod tempfile_path {
    pub struct TempFile(std::path::PathBuf);

    impl TempFile {
        pub fn new(content: &str) -> TempFile {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("ringcast-it-{}-{n}.toml", std::process::id()));
            std::fs::write(&p, content).unwrap();
            TempFile(p)
        }

        pub fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn until(c: &mut Client, pred: impl Fn(&Value) -> bool) -> Value {
    loop {
        let v = c.recv_json();
        if pred(&v) {
            return v;
        }
    }
}

fn get_json(server: &Server, path: &str) -> (u16, Value) {
    let (status, body) = server.http(
        "GET",
        path,
        &[("Authorization", &format!("Bearer {API_KEY}"))],
        "",
    );
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[test]
fn members_see_each_other_and_the_api_knows_who_is_there() {
    let (server, _cfg) = presence_server(2, "100");
    let tok = |sub: &str, room: &str| {
        let room = room.to_owned();
        token(sub, move |c| c.channels = vec![room, format!("presence:*")])
    };
    let mut a = Client::connect_raw(
        &server,
        &format!(
            "/v1/ws?platform=web&token={}",
            tok("doctor-a", "conversation:7")
        ),
    )
    .unwrap();
    a.recv_json();
    let mut b = Client::connect_raw(
        &server,
        &format!(
            "/v1/ws?platform=ios&token={}",
            tok("patient-b", "conversation:7")
        ),
    )
    .unwrap();
    b.recv_json();
    let mut c = Client::connect(&server, &tok("outsider-c", "conversation:8"));
    a.subscribe(&["conversation:7"]);
    b.subscribe(&["conversation:7"]);
    // A learns that B joined (possibly with itself in the same diff).
    let diff = until(&mut a, |v| {
        v["type"] == "presence_diff"
            && v["data"]["joined"]
                .as_array()
                .unwrap()
                .contains(&json!("patient-b"))
    });
    assert_eq!(diff["topic"], "conversation:7");
    // Who is in the room, and how B is.
    let (status, room) = get_json(&server, "/v1/presence/topics/conversation:7");
    assert_eq!(status, 200, "{room}");
    assert_eq!(room["count"], 2, "{room}");
    let (_, pb) = get_json(&server, "/v1/presence/customers/patient-b");
    assert_eq!(
        (pb["status"].as_str(), pb["connections"].as_u64()),
        (Some("online"), Some(1)),
        "{pb}"
    );
    assert_eq!(pb["platforms"], json!(["ios"]));
    // B goes away: A (a member) sees it; C (not a member) does not.
    b.send_json(json!({"type": "presence", "payload": {"status": "away"}, "requestId": "p"}));
    let p = until(&mut a, |v| v["type"] == "presence");
    assert_eq!(
        (
            p["topic"].as_str(),
            p["data"]["customerId"].as_str(),
            p["data"]["status"].as_str()
        ),
        (Some("conversation:7"), Some("patient-b"), Some("away")),
        "{p}"
    );
    let (_, pb) = get_json(&server, "/v1/presence/customers/patient-b");
    assert_eq!(pb["status"], "away");
    // Anyone allowed to subscribe to presence:<customer> follows that customer.
    c.subscribe(&["presence:patient-b"]);
    b.ws.close(None).unwrap();
    let _ = b.recv_close();
    let off = until(&mut c, |v| v["type"] == "presence");
    assert_eq!(
        (
            off["data"]["status"].as_str(),
            off["data"]["connections"].as_u64()
        ),
        (Some("offline"), Some(0)),
        "{off}"
    );
    assert!(off["data"]["lastSeen"].as_u64().is_some(), "{off}");
    // And A sees B leave the room.
    let left = until(&mut a, |v| {
        v["type"] == "presence_diff" && v["data"]["left"] == json!(["patient-b"])
    });
    assert_eq!(left["data"]["members"], 1);
    // The outsider never got the room's presence.
    assert!(c
        .drain_until_pong()
        .iter()
        .all(|v| v["topic"] != "conversation:7"));
    // Topics without presence are not tracked; customers and topics need the API key.
    let (status, _) = get_json(&server, "/v1/presence/topics/conversation8x");
    assert_eq!(status, 404);
    let (status, _) = server.http("GET", "/v1/presence/customers/patient-b", &[], "");
    assert_eq!(status, 401);
}

#[test]
fn a_room_reconnecting_at_once_produces_a_bounded_number_of_presence_messages() {
    const MEMBERS: usize = 200;
    let window = Duration::from_millis(500);
    let (server, _cfg) = presence_server(2, "500");
    let tok = |i: usize| {
        token(&format!("m-{i}"), |c| {
            c.channels = vec!["conversation:big".into()]
        })
    };
    let connect_all = || -> Vec<Client> {
        (0..MEMBERS)
            .map(|i| {
                let mut c = Client::connect(&server, &tok(i));
                c.send_json(
                    json!({"type": "subscribe", "payload": {"topics": ["conversation:big"]}}),
                );
                c
            })
            .collect()
    };
    let mut observer = Client::connect(
        &server,
        &token("observer", |c| c.channels = vec!["conversation:big".into()]),
    );
    observer.subscribe(&["conversation:big"]);
    let members = connect_all();
    // Wait until the room has settled (all joins reported).
    let start = Instant::now();
    loop {
        let (_, room) = get_json(&server, "/v1/presence/topics/conversation:big");
        if room["count"] == MEMBERS + 1 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{room}");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(window * 2);
    let diffs_before = server.metric("ringcast_presence_diffs_total");
    let sent_before = server.metric("ringcast_ephemeral_out_total");
    assert!(observer
        .drain_until_pong()
        .iter()
        .any(|v| v["type"] == "presence_diff"));
    // Everyone drops and reconnects.
    let churn = Instant::now();
    drop(members);
    let members = connect_all();
    let churn_time = churn.elapsed();
    let start = Instant::now();
    loop {
        let (_, room) = get_json(&server, "/v1/presence/topics/conversation:big");
        // The old connections are gone (their leaves were counted) and the new ones are in.
        if room["count"] == MEMBERS + 1
            && server.metric("ringcast_connections") == (MEMBERS + 1) as f64
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(window * 2);
    let diffs = server.metric("ringcast_presence_diffs_total") - diffs_before;
    let sent = server.metric("ringcast_ephemeral_out_total") - sent_before;
    let seen = observer
        .drain_until_pong()
        .into_iter()
        .filter(|v| v["type"] == "presence_diff")
        .count();
    // The bound: one diff per window the churn touches, each to every member.
    let windows = (churn_time.as_millis() / window.as_millis()) as f64 + 2.0;
    eprintln!(
        "churn of {MEMBERS} members over {churn_time:?}: {diffs} diffs, {sent} frames, observer saw {seen} (bound {windows} diffs; naive join/leave per member: {})",
        2 * MEMBERS * (MEMBERS + 1)
    );
    assert!(diffs <= windows, "{diffs} diffs for {windows} windows");
    assert!(seen as f64 <= windows);
    assert!(sent <= windows * (MEMBERS + 1) as f64);
    drop(members);
}

#[test]
fn preferences_are_validated_stored_and_survive_reconnects() {
    let server = Server::start(2);
    let mut c = Client::connect(&server, &sub_token("prefs-1"));
    c.send_json(json!({"type": "update_preferences", "payload": {
        "eventTypes": {"marketing_": false, "case_": true},
        "quietHours": {"start": "22:00", "end": "07:00", "timeZone": "Asia/Kuala_Lumpur"},
        "urgentOverride": true}, "requestId": "u1"}));
    let r = c.recv_json();
    assert_eq!(
        (r["type"].as_str(), r["requestId"].as_str()),
        (Some("preferences_updated"), Some("u1")),
        "{r}"
    );
    assert_eq!(r["data"]["urgentOverride"], true);
    // Invalid input is an error with the request id, and changes nothing.
    c.send_json(json!({"type": "update_preferences", "payload": {"quietHours": {"start": "22:00", "end": "07:00", "timeZone": "Mars Time"}}, "requestId": "u2"}));
    let e = c.recv_json();
    assert_eq!(
        (e["code"].as_str(), e["requestId"].as_str()),
        (Some("bad_request"), Some("u2")),
        "{e}"
    );
    // A partial update replaces only what it names.
    c.send_json(json!({"type": "update_preferences", "payload": {"urgentOverride": false}}));
    assert_eq!(
        c.recv_json()["data"]["quietHours"]["timeZone"],
        "Asia/Kuala_Lumpur"
    );
    drop(c);
    let mut again = Client::connect(&server, &sub_token("prefs-1"));
    again.send_json(json!({"type": "update_preferences", "payload": {}, "requestId": "u3"}));
    let r = again.recv_json();
    assert_eq!(
        r["data"]["eventTypes"],
        json!({"case_": true, "marketing_": false}),
        "{r}"
    );
    assert_eq!(r["data"]["urgentOverride"], false);
    let (status, body) = get_json(&server, "/v1/preferences/customers/prefs-1");
    assert_eq!(status, 200);
    assert_eq!(body["preferences"]["quietHours"]["end"], "07:00", "{body}");
}

/// Event types a customer switched off are neither delivered to it nor stored for it,
/// whether the event names the customer, one of its roles or everyone; the publisher sees
/// them as `declined`. Topic events (conversations it joined) are not filtered.
#[test]
fn event_types_switched_off_are_not_delivered_nor_stored() {
    let server = Server::start(2);
    let mut c = Client::connect(
        &server,
        &token("prefs-off", |c| {
            c.channels = vec!["*".into()];
            c.roles = vec!["ops".into()];
        }),
    );
    c.subscribe(&["news"]);
    c.send_json(json!({"type": "update_preferences", "payload": {
        "eventTypes": {"marketing_": false, "marketing_urgent": true}}, "requestId": "u"}));
    assert_eq!(c.recv_json()["type"], "preferences_updated");
    let off = server.publish(json!({"customers": ["prefs-off"],
        "event": {"type": "marketing_promo", "persistent": true}}));
    assert_eq!(off["declined"], 1, "{off}");
    assert_eq!(
        (
            off["queued"].as_u64(),
            off["delivered"]["websocket"].as_u64()
        ),
        (Some(0), Some(0)),
        "{off}"
    );
    for target in [json!({"roles": ["ops"]}), json!({"broadcast": true})] {
        let mut body = target.clone();
        body["event"] = json!({"type": "marketing_promo"});
        let r = server.publish(body);
        assert_eq!(r["delivered"]["websocket"], 0, "{target}: {r}");
    }
    let on = server.publish(json!({"customers": ["prefs-off"],
        "event": {"type": "marketing_urgent_recall", "persistent": true}}));
    assert_eq!(
        on["delivered"]["websocket"], 1,
        "the longest prefix decides: {on}"
    );
    let topic = server.publish(json!({"topics": ["news"], "event": {"type": "marketing_digest"}}));
    assert_eq!(topic["delivered"]["websocket"], 1, "{topic}");
    let kinds: Vec<_> = c
        .drain_until_pong()
        .iter()
        .map(|e| e["type"].clone())
        .collect();
    assert_eq!(kinds, ["marketing_urgent_recall", "marketing_digest"]);
    // Nothing declined was stored: a reconnect with the first cursor replays only what was
    // delivered.
    drop(c);
    let bearer = format!("Bearer {}", token("prefs-off", |_| {}));
    let (_, body) = server.http(
        "GET",
        "/v1/events/missed",
        &[("Authorization", &bearer)],
        "",
    );
    let missed: Value = serde_json::from_str(&body).unwrap();
    let stored: Vec<_> = missed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].clone())
        .collect();
    assert_eq!(stored, ["marketing_urgent_recall"], "{missed}");
}

#[test]
fn joining_a_chat_room_returns_its_last_messages() {
    let (server, _cfg) = presence_server(2, "100");
    for n in 1..=60 {
        server.publish(json!({"topics": ["conversation:9"], "event": {"type": "chat_message", "data": {"n": n}}}));
    }
    let mut c = Client::connect(&server, &sub_token("late-joiner"));
    // The namespace's history keeps 50; a configured namespace replays 50 on join.
    let confirmed = c.subscribe_collect(json!({"topics": ["conversation:9"]}));
    let ns: Vec<u64> = confirmed
        .iter()
        .map(|v| v["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, (11..=60).collect::<Vec<_>>());
    // `last` asks for fewer; a topic under no namespace replays nothing by default.
    let mut d = Client::connect(&server, &sub_token("late-2"));
    let few = d.subscribe_collect(json!({"topics": ["conversation:9"], "last": 3}));
    assert_eq!(
        few.iter()
            .map(|v| v["data"]["n"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [58, 59, 60]
    );
    server.publish(json!({"topics": ["plain"], "event": {"type": "t", "data": {}}}));
    assert!(d.subscribe_collect(json!({"topics": ["plain"]})).is_empty());
}

#[test]
fn namespaces_cap_subscribers_require_roles_and_keep_clients_from_publishing() {
    let cfg = tempfile_path::TempFile::new(
        "[[namespaces]]\nprefix = \"room:\"\nmax_subscribers = 2\n\n\
         [[namespaces]]\nprefix = \"hospital:\"\nroles = [\"physician\"]\nclient_publish = false\n",
    );
    let server = Server::start_with(2, &[("RINGCAST_CONFIG", cfg.path())]);
    let all = |sub: &str, roles: &[&str]| {
        let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        token(sub, move |c| {
            c.channels = vec!["*".into()];
            c.publish = vec!["*".into()];
            c.roles = roles;
        })
    };
    let mut a = Client::connect(&server, &all("cap-a", &[]));
    let b = {
        let mut b = Client::connect(&server, &all("cap-b", &[]));
        b.subscribe(&["room:1"]);
        b
    };
    a.subscribe(&["room:1"]);
    let mut c = Client::connect(&server, &all("cap-c", &[]));
    c.send_json(json!({"type": "subscribe", "payload": {"topics": ["room:1"]}, "requestId": "s"}));
    let e = c.recv_json();
    assert_eq!(
        (e["code"].as_str(), e["requestId"].as_str()),
        (Some("topic_full"), Some("s")),
        "{e}"
    );
    assert_eq!(server.metric("ringcast_topic_full_total"), 1.0);
    // A place frees up when a subscriber goes.
    drop(b);
    let start = Instant::now();
    loop {
        c.send_json(json!({"type": "subscribe", "payload": {"topics": ["room:1"]}}));
        if c.recv_json()["type"] == "subscription_confirmed" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the place was not freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Roles: a token without the namespace's role cannot subscribe, one with it can.
    a.send_json(
        json!({"type": "subscribe", "payload": {"topics": ["hospital:ward-3"]}, "requestId": "h"}),
    );
    let e = a.recv_json();
    assert_eq!(e["code"], "forbidden", "{e}");
    assert!(e["message"].as_str().unwrap().contains("physician"), "{e}");
    let mut doc = Client::connect(&server, &all("doc", &["physician"]));
    doc.subscribe(&["hospital:ward-3"]);
    // Backend-only namespace: even a token with a publish grant is refused.
    doc.send_json(json!({"type": "publish", "payload": {"topic": "hospital:ward-3", "type": "alert", "data": {}}, "requestId": "p"}));
    let e = doc.recv_json();
    assert_eq!(
        (e["code"].as_str(), e["requestId"].as_str()),
        (Some("forbidden"), Some("p")),
        "{e}"
    );
    // SSE is held to the same roles.
    let sse = SseClient::open(
        &server,
        &format!(
            "/v1/events/stream?topics=hospital:ward-3&token={}",
            all("nurse", &[])
        ),
        &[],
    );
    assert_eq!(sse.status, 403);
}
