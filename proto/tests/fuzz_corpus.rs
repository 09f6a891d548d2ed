//! Replays the fuzz corpus on stable Rust: every file under `proto/fuzz/corpus/<target>/` and
//! `proto/fuzz/artifacts/<target>/` (crashes a fuzzer found, kept as regressions) goes through
//! its target in `proto::fuzz`. The fuzzers themselves need nightly (`proto/fuzz/run.sh`);
//! this test is what every test run checks.
//!
//! `cargo test -p ringcast-proto --test fuzz_corpus -- --ignored write_seeds` (re)writes the
//! hand-made seeds the corpus started from.

use std::{fs, path::PathBuf};

use proto::{
    auth::{mint_hs256, Audience, Claims},
    bus::{self, Position, ShardMsg, Target},
    event::{Event, Priority},
    fuzz,
    ws::{frame::encode_client_frame, OpCode},
};

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

#[test]
fn corpus_replays_without_a_crash() {
    let mut total = 0;
    for target in fuzz::TARGETS {
        let mut n = 0;
        for dir in ["corpus", "artifacts"] {
            let Ok(entries) = fs::read_dir(fuzz_dir().join(dir).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = fs::read(&path).unwrap();
                // A panic names the file: rerun it with `cargo fuzz run <target> <file>`.
                eprintln!("{}", path.display());
                fuzz::run(target, &data);
                n += 1;
            }
        }
        for seed in seeds(target) {
            fuzz::run(target, &seed);
        }
        assert!(n > 0, "no corpus for {target}");
        total += n;
    }
    eprintln!("replayed {total} corpus files");
}

/// Rewrites `corpus/<target>/seed-<n>` from [`seeds`].
#[test]
#[ignore = "writes files; run by hand when the seeds change"]
fn write_seeds() {
    for target in fuzz::TARGETS {
        let dir = fuzz_dir().join("corpus").join(target);
        fs::create_dir_all(&dir).unwrap();
        for (i, seed) in seeds(target).into_iter().enumerate() {
            fs::write(dir.join(format!("seed-{i}")), seed).unwrap();
        }
    }
}

fn frame(op: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    encode_client_frame(op, fin, payload, [0x37, 0xfa, 0x21, 0x3d], &mut out);
    out.to_vec()
}

/// Real inputs of each parser, including the ones that once broke it.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let deep = format!("{}{}", "[".repeat(8750), "]".repeat(8750)).into_bytes();
    match target {
        "http_head" => [
            "GET /v1/ws?token=abc.def.ghi HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ringcast.v1, bearer.tok\r\nOrigin: https://a.example\r\n\r\n",
            "GET /v1/events/stream?topics=a,b&events=case_ HTTP/1.1\r\nHost: x\r\nLast-Event-ID: e.0-5\r\nX-Forwarded-For: 203.0.113.7, 10.0.0.2\r\n\r\n",
            "POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: 40\r\n\r\n{}",
            "POST /v1/publish HTTP/1.1\r\nContent-Length: +40\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /v1/events/missed?wait=20&since=x%2Fy HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        ]
        .map(|s| s.as_bytes().to_vec())
        .to_vec(),
        "ws_receiver" => {
            let mut fragmented = frame(OpCode::Text, false, b"{\"type\":");
            fragmented.extend(frame(OpCode::Ping, true, b"p"));
            fragmented.extend(frame(OpCode::Continue, true, b"\"ping\"}"));
            let mut pings = Vec::new();
            for _ in 0..50 {
                pings.extend(frame(OpCode::Ping, true, b""));
            }
            vec![
                [&[7u8][..], &frame(OpCode::Text, true, br#"{"type":"ping"}"#)].concat(),
                [&[1u8][..], &fragmented].concat(),
                [&[255u8][..], &pings].concat(),
                [&[3u8][..], &frame(OpCode::Close, true, b"\x03\xe8bye")].concat(),
                [&[9u8][..], &frame(OpCode::Text, true, b"\xce\xba\xe1\xbd\xb9\xcf")].concat(),
                [&[2u8][..], &frame(OpCode::Binary, true, &[0u8; 300])].concat(),
            ]
        }
        "client_json" => {
            let mut v: Vec<Vec<u8>> = [
                r#"{"type":"subscribe","payload":{"topics":["conversation:1"],"events":["case_"],"since":{"conversation:1":{"offset":3,"epoch":"e"}},"last":5},"requestId":"r1"}"#,
                r#"{"type":"publish","payload":{"topic":"t","type":"chat","data":{"text":"hi","n":[1,2.5,null,true]}}}"#,
                r#"{"type":"send_message","payload":{"recipientId":"bob","message":"hello \u00e9"}}"#,
                r#"{"type":"ack","payload":{"ids":["a"],"cursors":["e.0-1"],"upTo":"e.0-9","status":"read"}}"#,
                r#"{"type":"typing","payload":{"topic":"conversation:7","state":"stop"}}"#,
                r#"{"type":"presence","payload":{"status":"away"}}"#,
                r#"{"type":"update_preferences","payload":{"eventTypes":{"x":false},"quietHours":{"start":"22:00","end":"07:00","timeZone":"Europe/Paris"}}}"#,
                r#"{"type":"ping","requestId":7}"#,
                r#"{"type":"ping","x":"[[[[\"]]"}"#,
            ]
            .map(|s| s.as_bytes().to_vec())
            .to_vec();
            v.push(deep.clone());
            v.push(format!(r#"{{"type":"ping","x":{}1{}}}"#, "[".repeat(3000), "]".repeat(3000)).into_bytes());
            v
        }
        "proxy_header" => vec![
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 8080\r\nGET / HTTP/1.1\r\n\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 51000 8080\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            [
                &b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c"[..],
                &[203, 0, 113, 7, 10, 0, 0, 1, 0xc7, 0x38, 0x1f, 0x90],
            ]
            .concat(),
            [&b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00"[..]].concat(),
        ],
        "jwt" => {
            let mut c = Claims {
                sub: "alice".into(),
                exp: 1_800_000_000,
                iss: Some("fuzz".into()),
                aud: Some(Audience::Many(vec!["x".into(), "ringcast".into()])),
                nbf: Some(1_600_000_000),
                channels: vec!["conversation:*".into()],
                ..Claims::default()
            };
            let good = mint_hs256(&c, b"fuzz-secret");
            c.aud = Some(Audience::One("ringcast".into()));
            let single = mint_hs256(&c, b"fuzz-secret");
            vec![
                good.into_bytes(),
                single.into_bytes(),
                b"eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.".to_vec(),
                b"conversation:*:x*\nconversation:1:xyz".to_vec(),
            ]
        }
        "api_body" => {
            let mut v: Vec<Vec<u8>> = [
                r#"{"customers":["alice"],"topics":["conversation:1"],"roles":["role:admin"],"event":{"type":"case_status_update","id":"x","data":{"a":"b\rc"},"priority":"high","persistent":true,"ttl":60}}"#,
                r#"{"broadcast":true,"event":{"type":"announcement","data":{}}}"#,
                r#"[{"topics":["t"],"event":{"type":"k","data":[1]}},{"customers":[""],"event":{"type":"k"}}]"#,
                r#"{"customers":["a","b"],"code":4003}"#,
                r#"{"eventTypes":{"x":true},"quietHours":{"start":"22:00","end":"07:00","timeZone":"+02:00"},"urgentOverride":true}"#,
            ]
            .map(|s| s.as_bytes().to_vec())
            .to_vec();
            v.push(deep);
            v
        }
        "bus_message" => {
            let event = Event {
                id: "e".into(),
                kind: "k".into(),
                data: "{}".into(),
                priority: Priority::Urgent,
                persistent: true,
                ttl: Some(5),
                timestamp: "ts".into(),
                from: Some("bob".into()),
                idempotent: true,
            };
            [
                ShardMsg::Interest {
                    topic: "conversation:1".into(),
                    from: 3,
                    on: true,
                    req: 9,
                    last: 0,
                    member: "alice".into(),
                    since: Some(Position {
                        offset: 4,
                        epoch: "e".into(),
                    }),
                },
                ShardMsg::InterestAck {
                    req: 9,
                    offset: 7,
                    epoch: "e".into(),
                    recovered: true,
                    replay: vec![b"{}".to_vec()],
                    full: false,
                },
                ShardMsg::PublishTopic {
                    topic: "t".into(),
                    event,
                    origin: 1,
                    req: 2,
                    deliveries: false,
                },
                ShardMsg::Deliver {
                    target: Target::Topic("t".into()),
                    kind: "k".into(),
                    id: "i".into(),
                    idempotent: false,
                    origin: 0,
                    req: 1,
                },
            ]
            .iter()
            // Each message as a shard archive and as a node-to-node envelope.
            .flat_map(|m| {
                [
                    bus::encode(m).to_vec(),
                    bus::encode_node(&bus::NodeMsg::Shard(m.clone())),
                ]
            })
            .collect()
        }
        other => panic!("no seeds for {other}"),
    }
}
