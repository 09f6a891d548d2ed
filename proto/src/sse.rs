//! Server-Sent Events, the event stream format of the HTML standard: the one encoder the
//! engine writes its records with, and an incremental decoder for clients (the load
//! generator, the tests).
//!
//! A record is `event:`, `data:` and `id:` lines and a blank line. A line ends with CRLF, LF or
//! a lone CR, so data containing any of them is written as several `data:` lines (a browser
//! joins them with `\n`): nothing a publisher sends can end a line early or inject a field.

/// Encodes one record: `event: <event>` if given, the data split into `data:` lines at every
/// CR, LF or CRLF (empty lines dropped; empty data is one empty `data:` line), `id: <id>` if
/// given, and the blank line that dispatches it. `event` and `id` must not contain CR or LF
/// (event types and cursors are validated tokens).
pub fn record(event: Option<&str>, data: &str, id: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + event.map_or(0, str::len) + data.len());
    if let Some(event) = event {
        debug_assert!(!event.contains(['\r', '\n']));
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(event.as_bytes());
        out.push(b'\n');
    }
    let mut lines = data
        .split(['\r', '\n'])
        .filter(|l| !l.is_empty())
        .peekable();
    if lines.peek().is_none() {
        out.extend_from_slice(b"data: \n");
    }
    for line in lines {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    if let Some(id) = id {
        debug_assert!(!id.contains(['\r', '\n']));
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(id.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

/// A comment line and a blank line (`: ping`): keeps a connection and its proxies alive
/// without dispatching anything.
pub fn comment(text: &str) -> Vec<u8> {
    format!(": {text}\n\n").into_bytes()
}

/// The reconnection delay a client should use, in milliseconds.
pub fn retry(millis: u64) -> Vec<u8> {
    format!("retry: {millis}\n\n").into_bytes()
}

/// A dispatched record, borrowed from the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// The `event:` field (empty: the default type, `message`).
    pub event: &'a [u8],
    /// The `data:` lines joined with `\n`.
    pub data: &'a [u8],
    /// This record's `id:` field, if it has one.
    pub id: Option<&'a [u8]>,
    /// The stream's last event id (the last `id:` seen so far): what a browser's
    /// `lastEventId` says and what it resumes with.
    pub last_id: Option<&'a [u8]>,
}

/// An incremental decoder: feed it bytes as they arrive; complete records are handed to a
/// callback, a partial line waits for the next bytes. Its buffers are reused from record to
/// record, so decoding allocates only while a record is larger than any before it.
#[derive(Debug, Default)]
pub struct Decoder {
    line: Vec<u8>,
    event: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    /// The record's `id:` field, if any.
    id: Option<Vec<u8>>,
    /// The last `id:` field of the stream.
    last_id: Option<Vec<u8>>,
    /// The previous byte was a CR: an LF right after it ends no new line.
    after_cr: bool,
}

impl Decoder {
    /// Decodes `input`, calling `dispatch` for every record it completes.
    pub fn feed(&mut self, input: &[u8], mut dispatch: impl FnMut(Record<'_>)) {
        for &b in input {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    self.end_line(&mut dispatch);
                }
                _ => {
                    self.after_cr = false;
                    self.line.push(b);
                }
            }
        }
    }

    fn end_line(&mut self, dispatch: &mut impl FnMut(Record<'_>)) {
        if self.line.is_empty() {
            // A blank line dispatches the record (one without data is dropped).
            if self.has_data {
                dispatch(Record {
                    event: &self.event,
                    data: &self.data,
                    id: self.id.as_deref(),
                    last_id: self.last_id.as_deref(),
                });
            }
            self.event.clear();
            self.data.clear();
            self.has_data = false;
            self.id = None;
            return;
        }
        let line = std::mem::take(&mut self.line);
        if line[0] != b':' {
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(i) => {
                    let v = &line[i + 1..];
                    (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
                }
                None => (&line[..], &b""[..]),
            };
            match field {
                b"event" => {
                    self.event.clear();
                    self.event.extend_from_slice(value);
                }
                b"data" => {
                    if self.has_data {
                        self.data.push(b'\n');
                    }
                    self.data.extend_from_slice(value);
                    self.has_data = true;
                }
                b"id" if !value.contains(&0) => {
                    self.id = Some(value.to_vec());
                    self.last_id = Some(value.to_vec());
                }
                _ => {} // retry and unknown fields: nothing to decode here
            }
        }
        self.line = line;
        self.line.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(event, data, last_id)` of each record.
    fn decode(chunks: &[&[u8]]) -> Vec<(String, String, Option<String>)> {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        let s = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
        for c in chunks {
            d.feed(c, |r| out.push((s(r.event), s(r.data), r.last_id.map(s))));
        }
        out
    }

    #[test]
    fn a_records_own_id_and_the_streams_last_id() {
        let mut d = Decoder::default();
        let mut ids = Vec::new();
        d.feed(b"data: a\nid: 1\n\ndata: b\n\n", |r| {
            ids.push((r.id.map(<[u8]>::to_vec), r.last_id.map(<[u8]>::to_vec)))
        });
        assert_eq!(
            ids,
            [
                (Some(b"1".to_vec()), Some(b"1".to_vec())),
                (None, Some(b"1".to_vec()))
            ]
        );
    }

    #[test]
    fn records_are_written_in_the_standard_form() {
        assert_eq!(
            record(Some("tick"), r#"{"n":1}"#, Some("e.0-7")),
            b"event: tick\ndata: {\"n\":1}\nid: e.0-7\n\n"
        );
        assert_eq!(record(None, "", None), b"data: \n\n");
        assert_eq!(
            record(None, "a\rb\r\nc\nd", None),
            b"data: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        assert_eq!(comment("ping"), b": ping\n\n");
        assert_eq!(retry(2000), b"retry: 2000\n\n");
    }

    #[test]
    fn what_is_written_decodes_back() {
        let mut bytes = retry(1000);
        bytes.extend(comment("ping"));
        bytes.extend(record(Some("a"), "x", Some("1")));
        bytes.extend(record(None, "line1\nline2", None));
        assert_eq!(
            decode(&[&bytes]),
            [
                ("a".into(), "x".into(), Some("1".into())),
                (String::new(), "line1\nline2".into(), Some("1".into())),
            ]
        );
    }

    #[test]
    fn every_line_ending_and_any_split_decode_the_same() {
        let want = [("e".to_string(), "d1\nd2".to_string(), None)];
        for text in [
            &b"event: e\ndata: d1\ndata: d2\n\n"[..],
            b"event: e\r\ndata: d1\r\ndata: d2\r\n\r\n",
            b"event: e\rdata: d1\rdata: d2\r\r",
            b"event:e\ndata:d1\ndata:d2\n\n",
        ] {
            assert_eq!(decode(&[text]), want, "{:?}", String::from_utf8_lossy(text));
            for cut in 0..text.len() {
                assert_eq!(decode(&[&text[..cut], &text[cut..]]), want, "cut at {cut}");
            }
        }
    }

    #[test]
    fn comments_unknown_fields_and_records_without_data_dispatch_nothing() {
        assert!(decode(&[b": hi\n\nevent: x\n\nretry: 5\nfoo: bar\n\n"]).is_empty());
        assert_eq!(decode(&[b"data: partial"]), [], "no blank line yet");
    }
}
