//! Authentication failures before the upgrade.

use crate::util::*;

fn refused(server: &Server, path: &str) -> (u16, serde_json::Value) {
    match Client::connect_raw(server, path) {
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            (
                resp.status().as_u16(),
                serde_json::from_slice(&body).unwrap(),
            )
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("upgrade should have been refused"),
    }
}

#[test]
fn bad_tokens_get_401_with_a_json_reason() {
    let server = Server::start(1);
    let (status, body) = refused(&server, "/v1/ws");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("missing_token"))
    );
    let (status, body) = refused(&server, "/v1/ws?token=not.a.jwt");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_token"))
    );
    let forged = proto::auth::mint_hs256(
        &proto::auth::Claims {
            sub: "eve".into(),
            exp: u64::MAX / 2,
            ..Default::default()
        },
        b"wrong",
    );
    let (status, body) = refused(&server, &format!("/v1/ws?token={forged}"));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_token"))
    );
    let expired = token("eve", |c| c.exp = 1);
    let (status, body) = refused(&server, &format!("/v1/ws?token={expired}"));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("token_expired"))
    );
    assert_eq!(server.metric("ringcast_auth_failures_total"), 4.0);
    assert_eq!(server.metric("ringcast_connections"), 0.0);
}

#[test]
fn token_from_header_or_subprotocol() {
    let server = Server::start(1);
    let tok = sub_token("hdr");
    let stream = std::net::TcpStream::connect(server.addr).unwrap();
    let mut req =
        tungstenite::client::IntoClientRequest::into_client_request(server.url("/v1/ws")).unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {tok}").parse().unwrap());
    let (mut ws, _) = tungstenite::client(req, stream).unwrap();
    assert!(ws
        .read()
        .unwrap()
        .to_text()
        .unwrap()
        .contains("\"customerId\":\"hdr\""));
    let stream = std::net::TcpStream::connect(server.addr).unwrap();
    let mut req =
        tungstenite::client::IntoClientRequest::into_client_request(server.url("/v1/ws")).unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        format!("ringcast.v1, {tok}").parse().unwrap(),
    );
    let (mut ws, resp) = tungstenite::client(req, stream).unwrap();
    assert_eq!(resp.headers()["Sec-WebSocket-Protocol"], "ringcast.v1");
    assert!(ws.read().unwrap().to_text().unwrap().contains("welcome"));
}

#[test]
fn origin_allowlist_and_forbidden_topics() {
    let server = Server::start_with(
        1,
        &[("RINGCAST_AUTH_ALLOWED_ORIGINS", "https://portal.example")],
    );
    let tok = token("olga", |c| c.channels = vec!["conversation:*".into()]);
    let (status, body) = refused(&server, &format!("/v1/ws?token={tok}"));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("origin_refused"))
    );
    let stream = std::net::TcpStream::connect(server.addr).unwrap();
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(
        server.url(&format!("/v1/ws?token={tok}")),
    )
    .unwrap();
    req.headers_mut()
        .insert("Origin", "https://portal.example".parse().unwrap());
    let (ws, _) = tungstenite::client(req, stream).unwrap();
    let mut c = Client {
        ws,
        welcome: serde_json::Value::Null,
    };
    c.welcome = c.recv_json();
    c.send_json(serde_json::json!({"type": "subscribe", "payload": {"topics": ["product:1"]}, "requestId": "s"}));
    let e = c.recv_json();
    assert_eq!(
        (
            e["code"].as_str(),
            e["requestId"].as_str(),
            e["receivedType"].as_str()
        ),
        (Some("forbidden"), Some("s"), Some("subscribe"))
    );
    // Still open, and an allowed topic works.
    c.subscribe(&["conversation:3"]);
}

#[test]
fn rs256_tokens_with_the_configured_public_key() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/tests/fixtures");
    let public = format!("{fixtures}/rs256-test-public.pem");
    let server = Server::start_with(
        1,
        &[
            ("RINGCAST_AUTH_JWT_ALGORITHM", "RS256"),
            ("RINGCAST_AUTH_JWT_PUBLIC_KEY_FILE", &public),
        ],
    );
    let private = std::fs::read(format!("{fixtures}/rs256-test-private.pem")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = proto::auth::Claims {
        sub: "rsa-user".into(),
        exp: now + 60,
        ..Default::default()
    };
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    let rs = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&private).unwrap(),
    )
    .unwrap();
    let c = Client::connect(&server, &rs);
    assert_eq!(c.welcome["data"]["customerId"], "rsa-user");
    // An HS256 token (even with the shared test secret) is refused: the algorithm is pinned.
    let (status, body) = refused(&server, &format!("/v1/ws?token={}", sub_token("rsa-user")));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_token"))
    );
}

/// A connection accepted on a shard that does not own its customer moves to the owner with
/// its verified claims: each token's signature is checked once, not again after the move.
#[test]
fn a_handed_off_connection_is_verified_once() {
    let server = Server::start(2);
    let mut clients: Vec<Client> = (0..12)
        .map(|i| Client::connect(&server, &sub_token(&format!("once-{i}"))))
        .collect();
    let mut streams: Vec<SseClient> = (0..4)
        .map(|i| {
            let path = format!(
                "/v1/events/stream?token={}",
                sub_token(&format!("once-sse-{i}"))
            );
            let mut s = SseClient::open(&server, &path, &[]);
            assert_eq!(s.next().unwrap().event, "connection_established");
            s
        })
        .collect();
    for c in &mut clients {
        c.drain_until_pong();
    }
    assert!(
        server.metric("ringcast_handoffs_total") > 0.0,
        "no connection was handed off"
    );
    assert_eq!(server.metric("ringcast_tokens_verified_total"), 16.0);
    streams.clear();
}
