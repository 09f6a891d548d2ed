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

/// Fetches ringcast's `/v1/stats/histograms` and decodes the publish-to-write and handshake
/// histograms (HdrHistogram V2 + DEFLATE, base64).
pub fn server_histograms(
    host: &str,
) -> Option<(hdrhistogram::Histogram<u64>, hdrhistogram::Histogram<u64>)> {
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
    Some((decode("publishToWrite")?, decode("handshake")?))
}
