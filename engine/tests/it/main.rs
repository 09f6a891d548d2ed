//! Integration tests: the real `ringcast` binary on loopback port 0, driven by real clients
//! (tungstenite for WebSocket, raw HTTP/1.1 for the API).

mod util;

mod api;
mod auth;
mod chat;
mod cluster;
mod delivery;
mod lifecycle;
mod limits;
mod ordering;
mod parking;
mod presence;
mod property;
mod protocol;
mod reliable;
mod security;
