//! The client side of the wire: TCP connections from chosen source addresses, the WebSocket
//! opening handshake, masked client frames, and a push decoder for server frames.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{bail, Context as _};
use bytes::BytesMut;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use proto::ws::{frame::encode_client_frame, FrameHeader, OpCode};

/// Opens a TCP connection from `source` (port chosen by the kernel) to `target`.
///
/// The socket is non-blocking before `connect`, so a full listen backlog never blocks the
/// executor; the handshake's first write waits for the connection instead.
///
/// With `keep_dup`, a second handle on the socket comes back too (for [`Client::keep_dup`]).
pub fn connect_from(
    source: Option<IpAddr>,
    target: SocketAddr,
    keep_dup: bool,
) -> anyhow::Result<(TcpStream, Option<socket2::Socket>)> {
    let domain = if target.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    sock.set_nodelay(true)?;
    if let Some(ip) = source {
        sock.bind(&SocketAddr::new(ip, 0).into())
            .with_context(|| format!("binding {ip}"))?;
    }
    sock.set_nonblocking(true)?;
    match sock.connect(&target.into()) {
        Ok(()) => {}
        Err(e)
            if e.raw_os_error() == Some(libc_einprogress())
                || e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e).with_context(|| format!("connecting to {target}")),
    }
    let dup = if keep_dup {
        Some(sock.try_clone()?)
    } else {
        None
    };
    Ok((TcpStream::from(sock), dup))
}

fn libc_einprogress() -> i32 {
    115 // EINPROGRESS on Linux
}

/// How a stream's bytes are framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// RFC 6455 frames.
    WebSocket,
    /// Server-Sent Events records (receive only).
    Sse,
}

/// A connected client: a WebSocket, or an SSE stream read the same way.
pub struct Client {
    /// The socket.
    pub stream: TcpStream,
    /// A second handle on the socket, kept when the client will leave glommio for a
    /// [`Plain`] receive loop (see [`Client::into_plain`]).
    dup: Option<socket2::Socket>,
    dec: Decoder,
    mask_seed: u32,
    /// Connected to another cluster node than the one that takes the publishes: its
    /// latency is also counted as cross-node.
    pub remote: bool,
}

/// What a stream's bytes become: frames or SSE records, from a buffer of bytes read but not
/// yet decoded.
struct Decoder {
    pending: Vec<u8>,
    framing: Framing,
    /// The SSE decoder (SSE streams only).
    sse: Option<Box<proto::sse::Decoder>>,
}

/// A receive-only client outside glommio: a non-blocking socket in a thread's `mio` poll set.
/// A subscriber that only reads is served by one readiness wait and a `recv` until it would
/// block, as an epoll client is, instead of a task woken per read (one io_uring poll and a
/// cross-thread wake-up each), which made the load generator's own latency part of what it
/// measured.
pub struct Plain {
    /// The socket.
    pub stream: mio::net::TcpStream,
    dec: Decoder,
    /// See [`Client::remote`].
    pub remote: bool,
}

/// Bytes asked of the socket per read.
const CHUNK: usize = 4096;

impl Plain {
    /// One `recv` into the pending buffer: `Ok(0)` at end of stream, `WouldBlock` when
    /// drained.
    pub fn read_some(&mut self) -> std::io::Result<usize> {
        use std::io::Read as _;
        let len = self.dec.pending.len();
        self.dec.pending.resize(len + CHUNK, 0);
        let got = self.stream.read(&mut self.dec.pending[len..]);
        self.dec.pending.truncate(len + *got.as_ref().unwrap_or(&0));
        got
    }

    /// Decodes what was read, calling `f` for each frame or record.
    pub fn drain(&mut self, f: impl FnMut(Incoming<'_>)) -> anyhow::Result<()> {
        self.dec.drain(f)
    }

    /// Answers a ping (best effort: a pong that does not fit the socket buffer is dropped;
    /// the server's next ping asks again).
    pub fn pong(&mut self, payload: &[u8], mask: [u8; 4]) {
        use std::io::Write as _;
        let mut out = BytesMut::with_capacity(payload.len() + 14);
        encode_client_frame(OpCode::Pong, true, payload, mask, &mut out);
        let _ = self.stream.write(&out);
    }
}

/// A frame from the server.
pub enum Incoming<'a> {
    /// A text message (single-frame; servers under test do not fragment small events).
    Text(&'a [u8]),
    /// A ping to answer.
    Ping(&'a [u8]),
    /// The server closed with this code.
    Close(u16),
    /// Anything else (binary, pong, continuation).
    Other,
}

impl Client {
    /// Performs the opening handshake for `path` (which carries `?token=` if needed).
    pub async fn handshake(
        stream: TcpStream,
        host: &str,
        path: &str,
        timeout: Duration,
    ) -> anyhow::Result<Client> {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        Client::open(
            stream,
            &req,
            b"HTTP/1.1 101",
            "upgrade",
            timeout,
            Framing::WebSocket,
        )
        .await
    }

    /// Opens an SSE stream: `GET path` with `Accept: text/event-stream`, expects 200.
    pub async fn open_sse(
        stream: TcpStream,
        host: &str,
        path: &str,
        timeout: Duration,
    ) -> anyhow::Result<Client> {
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n");
        Client::open(
            stream,
            &req,
            b"HTTP/1.1 200",
            "SSE stream",
            timeout,
            Framing::Sse,
        )
        .await
    }

    /// Sends `req`, reads the response head within `timeout` and expects `status`; what
    /// follows the head is the stream's first bytes.
    async fn open(
        mut stream: TcpStream,
        req: &str,
        status: &[u8],
        what: &str,
        timeout: Duration,
        framing: Framing,
    ) -> anyhow::Result<Client> {
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        stream
            .write_all(req.as_bytes())
            .await
            .with_context(|| format!("sending the {what} request"))?;
        let (mut pending, head_end) = read_head(&mut stream).await?;
        if !pending.starts_with(status) {
            bail!("{what} refused: {}", status_line(&pending));
        }
        pending.drain(..head_end);
        stream
            .set_read_timeout(None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Client {
            stream,
            dup: None,
            dec: Decoder {
                pending,
                framing,
                sse: None,
            },
            mask_seed: 0x9E37_79B9,
            remote: false,
        })
    }

    /// Keeps a second handle on the socket so that [`Client::into_plain`] can take it out of
    /// glommio later.
    pub fn keep_dup(&mut self, dup: socket2::Socket) {
        self.dup = Some(dup);
    }

    /// Leaves glommio: the socket (through the handle kept by [`Client::keep_dup`]) and the
    /// bytes read so far become a [`Plain`] receiver; glommio's handle is closed.
    pub fn into_plain(self) -> anyhow::Result<Plain> {
        let Client {
            stream,
            dup,
            dec,
            remote,
            ..
        } = self;
        let dup = dup.context("no second handle kept (keep_dup)")?;
        drop(stream);
        dup.set_nonblocking(true)?;
        let std: std::net::TcpStream = dup.into();
        Ok(Plain {
            stream: mio::net::TcpStream::from_std(std),
            dec,
            remote,
        })
    }

    fn next_mask(&mut self) -> [u8; 4] {
        // xorshift: masks need not be cryptographic for a load generator.
        let mut x = self.mask_seed;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.mask_seed = x;
        x.to_le_bytes()
    }

    /// Sends a masked frame (WebSocket only).
    pub async fn send(&mut self, opcode: OpCode, payload: &[u8]) -> anyhow::Result<()> {
        if self.dec.framing == Framing::Sse {
            bail!("an SSE stream is receive-only");
        }
        let mut out = BytesMut::with_capacity(payload.len() + 14);
        let mask = self.next_mask();
        encode_client_frame(opcode, true, payload, mask, &mut out);
        self.stream.write_all(&out).await?;
        Ok(())
    }

    /// Whether the bytes read and not yet drained contain `needle`.
    pub fn buffered_contains(&self, needle: &[u8]) -> bool {
        self.dec.pending.windows(needle.len()).any(|w| w == needle)
    }

    /// Reads more bytes from the socket into the pending buffer; false at end of stream.
    /// Straight into the buffer: no per-connection scratch space and no second copy.
    pub async fn fill(&mut self) -> anyhow::Result<bool> {
        let pending = &mut self.dec.pending;
        let len = pending.len();
        pending.resize(len + CHUNK, 0);
        let got = self.stream.read(&mut pending[len..]).await;
        let n = *got.as_ref().unwrap_or(&0);
        pending.truncate(len + n);
        Ok(got? > 0)
    }

    /// Decodes the frames (or SSE records) in the pending buffer, calling `f` for each.
    pub fn drain(&mut self, f: impl FnMut(Incoming<'_>)) -> anyhow::Result<()> {
        self.dec.drain(f)
    }
}

impl Decoder {
    fn drain(&mut self, f: impl FnMut(Incoming<'_>)) -> anyhow::Result<()> {
        match self.framing {
            Framing::WebSocket => self.drain_frames(f),
            Framing::Sse => {
                // Each record's data is handed over as a text message; comments (`: ping`)
                // and records without data are skipped.
                let mut f = f;
                let decoder = self.sse.get_or_insert_with(Box::default);
                decoder.feed(&self.pending, |r| f(Incoming::Text(r.data)));
                self.pending.clear();
                Ok(())
            }
        }
    }

    fn drain_frames(&mut self, mut f: impl FnMut(Incoming<'_>)) -> anyhow::Result<()> {
        let mut pos = 0;
        while let Some((h, n)) = FrameHeader::parse(&self.pending[pos..])
            .map_err(|e| anyhow::anyhow!("bad server frame: {e}"))?
        {
            let end = pos + n + h.payload_len as usize;
            if self.pending.len() < end {
                break;
            }
            let payload = &self.pending[pos + n..end];
            f(match h.opcode {
                OpCode::Text => Incoming::Text(payload),
                OpCode::Ping => Incoming::Ping(payload),
                OpCode::Close => Incoming::Close(if payload.len() >= 2 {
                    u16::from_be_bytes([payload[0], payload[1]])
                } else {
                    1005
                }),
                _ => Incoming::Other,
            });
            pos = end;
        }
        self.pending.drain(..pos);
        Ok(())
    }
}

/// Reads an HTTP response head; returns the bytes read and where the head ends.
async fn read_head(stream: &mut TcpStream) -> anyhow::Result<(Vec<u8>, usize)> {
    let mut pending = Vec::with_capacity(512);
    let mut buf = [0u8; 2048];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .context("reading the response head")?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        pending.extend_from_slice(&buf[..n]);
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok((pending, i + 4));
        }
        if pending.len() > 16 * 1024 {
            bail!("oversized response head");
        }
    }
}

fn status_line(head: &[u8]) -> String {
    let end = head.iter().position(|&b| b == b'\r').unwrap_or(head.len());
    String::from_utf8_lossy(&head[..end]).into_owned()
}

/// Finds `"key":<number>` in a JSON text without parsing all of it, returning the number.
#[cfg(test)]
pub fn json_u64(text: &[u8], key: &str) -> Option<u64> {
    let pat = format!("\"{key}\":");
    number_after(text, &memchr::memmem::Finder::new(pat.as_bytes()))
}

fn number_after(text: &[u8], finder: &memchr::memmem::Finder<'_>) -> Option<u64> {
    let i = finder.find(text)? + finder.needle().len();
    let mut n: u64 = 0;
    let mut digits = 0;
    for &b in &text[i..] {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(n)
}

/// Precompiled searches for the fields a receiver reads from each event.
pub struct Fields {
    ts: memchr::memmem::Finder<'static>,
    offset: memchr::memmem::Finder<'static>,
}

impl Fields {
    /// Finders for `"ts":` and `"offset":`.
    pub fn new() -> Self {
        Fields {
            ts: memchr::memmem::Finder::new(b"\"ts\":"),
            offset: memchr::memmem::Finder::new(b"\"offset\":"),
        }
    }

    /// The event's send timestamp (µs since the epoch).
    pub fn ts(&self, text: &[u8]) -> Option<u64> {
        number_after(text, &self.ts)
    }

    /// The topic offset, for servers that number events.
    pub fn offset(&self, text: &[u8]) -> Option<u64> {
        number_after(text, &self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_numbers() {
        let t = br#"{"type":"lg","data":{"seq":42,"ts":1700000000000123},"offset":7}"#;
        assert_eq!(json_u64(t, "seq"), Some(42));
        assert_eq!(json_u64(t, "ts"), Some(1_700_000_000_000_123));
        assert_eq!(json_u64(t, "offset"), Some(7));
        assert_eq!(json_u64(t, "nope"), None);
        let f = Fields::new();
        assert_eq!(
            (f.ts(t), f.offset(t)),
            (Some(1_700_000_000_000_123), Some(7))
        );
    }
}
