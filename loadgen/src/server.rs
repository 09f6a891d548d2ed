//! Questions to a ringcast server under test: counters from `/metrics` and histograms from
//! `/v1/stats/histograms` (the independent checks beside the load generator's own numbers).

/// Reads one counter from ringcast's /metrics (the independent check of delivery counts).
pub fn server_counter(host: &str, name: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

/// The server's histograms this tool reads, each cumulative since the server started.
pub struct ServerHistograms {
    /// Publish accepted to frame written.
    pub publish_to_write: hdrhistogram::Histogram<u64>,
    /// WebSocket handshakes.
    pub handshake: hdrhistogram::Histogram<u64>,
    /// A publish request's head parsed to its response written.
    pub publish_answer: hdrhistogram::Histogram<u64>,
}

impl ServerHistograms {
    /// What was recorded since `before` (another snapshot of the same server).
    pub fn since(mut self, before: &ServerHistograms) -> ServerHistograms {
        let _ = self.publish_to_write.subtract(&before.publish_to_write);
        let _ = self.handshake.subtract(&before.handshake);
        let _ = self.publish_answer.subtract(&before.publish_answer);
        self
    }
}

/// Fetches ringcast's `/v1/stats/histograms` and decodes its histograms (HdrHistogram V2 +
/// DEFLATE, base64).
pub fn server_histograms(host: &str) -> Option<ServerHistograms> {
    use base64::Engine as _;
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    write!(
        s,
        "GET /v1/stats/histograms HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let body: serde_json::Value = serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()?;
    let decode = |key: &str| -> Option<hdrhistogram::Histogram<u64>> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(body[key]["histogram"].as_str()?)
            .ok()?;
        hdrhistogram::serialization::Deserializer::new()
            .deserialize(&mut std::io::Cursor::new(bytes))
            .ok()
    };
    Some(ServerHistograms {
        publish_to_write: decode("publishToWrite")?,
        handshake: decode("handshake")?,
        publish_answer: decode("publishAnswer")?,
    })
}
