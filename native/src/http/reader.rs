//! One client connection's request stream: bytes in as they are read, heads, body pieces and
//! ends out, in order, pipelined requests included. A read that ends inside a head or a chunk
//! line leaves its tail here for the next one; the tail is bounded like a head.
#![deny(clippy::indexing_slicing)]

use super::chunked::Decoder;
use super::fields::{read_head, with_held};
use super::request::{self, Head, Parsed};
use super::{Reject, MAX_HEADER_BYTES, MAX_REQUEST_LINE_BYTES};

pub use super::fields::Sink;

#[derive(Debug, Clone)]
enum State {
    /// Between requests: empty lines are skipped (RFC 9112 §2.2).
    Idle,
    /// A head has begun; `line_done`: its request line has ended.
    Head {
        line_done: bool,
    },
    /// Body bytes left (Content-Length).
    Body(u64),
    Chunked(Decoder),
    /// The head of an Upgrade request ended: what follows is the new protocol's.
    Upgraded,
    /// A request was refused: nothing more is read.
    Failed(Reject),
    /// A request that closes the connection has ended: what follows is dropped, never read
    /// as another request (nor refused while that request's response is still to come).
    Closed,
}

#[derive(Debug, Clone)]
pub struct RequestStream {
    state: State,
    /// The request being read keeps the connection open after it.
    keep_alive: bool,
    /// Bytes of an unfinished head or chunk line, kept from earlier reads.
    held: Vec<u8>,
    /// Lower-cased names of the fields the router reads.
    wanted: Vec<Vec<u8>>,
}

impl RequestStream {
    pub fn new(wanted: Vec<Vec<u8>>) -> Self {
        let wanted = wanted.into_iter().map(|w| w.to_ascii_lowercase()).collect();
        RequestStream {
            state: State::Idle,
            keep_alive: true,
            held: Vec::new(),
            wanted,
        }
    }

    /// A head has begun and not ended (the header timeout runs meanwhile).
    pub fn in_head(&self) -> bool {
        matches!(self.state, State::Head { .. })
    }

    /// Read `data`. Returns the offset in `data` where an upgraded stream starts, if a head
    /// that asked for one ended in it; after that, nothing more is read.
    pub fn feed(
        &mut self,
        data: &[u8],
        sink: &mut impl Sink<Head>,
    ) -> Result<Option<usize>, Reject> {
        if let State::Failed(r) = self.state {
            return Err(r);
        }
        let mut held = std::mem::take(&mut self.held);
        match with_held(&mut held, data, |src, before| self.run(src, before, sink)) {
            Ok(at) => {
                self.held = held;
                Ok(at)
            }
            Err(reject) => {
                self.state = State::Failed(reject);
                Err(reject)
            }
        }
    }

    /// Run over `src`, of which the first `before` bytes were held from earlier reads.
    /// Returns the upgrade offset in `src` and how many bytes were used.
    fn run(
        &mut self,
        src: &[u8],
        before: usize,
        sink: &mut impl Sink<Head>,
    ) -> Result<(Option<usize>, usize), Reject> {
        let mut pos = 0;
        loop {
            let rest = src.get(pos..).unwrap_or_default();
            match &mut self.state {
                State::Failed(r) => return Err(*r),
                State::Upgraded | State::Closed => return Ok((None, src.len())),
                State::Idle => {
                    let skip = rest
                        .iter()
                        .take_while(|&&b| b == b'\r' || b == b'\n')
                        .count();
                    pos += skip;
                    if pos == src.len() {
                        return Ok((None, pos));
                    }
                    self.state = State::Head { line_done: false };
                }
                State::Head { line_done } => {
                    // Only bytes not seen before can end a line, or hold a bare LF.
                    let fresh_from = before.max(pos).saturating_sub(pos);
                    *line_done |= rest.get(fresh_from..).unwrap_or_default().contains(&b'\n');
                    let wanted = &self.wanted;
                    let parse = |r: &[u8]| {
                        request::parse(r, wanted).map(|p| match p {
                            Parsed::Complete(h, n) => Some((h, n)),
                            Parsed::Partial => None,
                        })
                    };
                    let bare_lf = Reject::new(400, "bare LF in the request head");
                    match read_head(rest, fresh_from, parse, bare_lf)? {
                        None => {
                            if !*line_done && rest.len() > MAX_REQUEST_LINE_BYTES {
                                return Err(Reject::new(414, "request line too long"));
                            }
                            if rest.len() > MAX_HEADER_BYTES + MAX_REQUEST_LINE_BYTES {
                                return Err(Reject::new(431, "header section too large"));
                            }
                            return Ok((None, pos));
                        }
                        Some((head, n)) => {
                            pos += n;
                            let upgrade = head.upgrade.is_some();
                            self.keep_alive = head.keep_alive;
                            self.state = if upgrade {
                                State::Upgraded
                            } else if head.chunked {
                                State::Chunked(Decoder::default())
                            } else {
                                State::Body(head.content_length.unwrap_or(0))
                            };
                            sink.head(head);
                            if upgrade {
                                // The new protocol's bytes are the caller's from here.
                                sink.end();
                                return Ok((Some(pos), src.len()));
                            }
                        }
                    }
                }
                State::Body(left) => {
                    if *left == 0 {
                        self.state = self.after_request();
                        sink.end();
                        continue;
                    }
                    if rest.is_empty() {
                        return Ok((None, pos));
                    }
                    let take = rest.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= take as u64;
                    sink.body(rest.get(..take).unwrap_or_default());
                    pos += take;
                }
                State::Chunked(decoder) => {
                    let p = decoder.decode(rest, |d| sink.body(d))?;
                    pos += p.used;
                    if !p.done {
                        return Ok((None, pos));
                    }
                    self.state = self.after_request();
                    sink.end();
                }
            }
        }
    }

    fn after_request(&self) -> State {
        if self.keep_alive {
            State::Idle
        } else {
            State::Closed
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // a test fails by panicking
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect {
        heads: Vec<Head>,
        body: Vec<u8>,
        ends: usize,
    }

    impl Sink<Head> for Collect {
        fn head(&mut self, head: Box<Head>) {
            self.heads.push(*head);
        }
        fn body(&mut self, data: &[u8]) {
            self.body.extend_from_slice(data);
        }
        fn end(&mut self) {
            self.ends += 1;
        }
    }

    fn feed(src: &[u8], step: usize) -> (Collect, Result<Option<usize>, Reject>) {
        let mut s = RequestStream::new(vec![b"X-User".to_vec()]);
        let mut c = Collect::default();
        let mut last = Ok(None);
        for piece in src.chunks(step.max(1)) {
            last = s.feed(piece, &mut c);
            if last.is_err() {
                break;
            }
        }
        (c, last)
    }

    const PIPELINED: &[u8] =
        b"\r\nPOST /a HTTP/1.1\r\nHost: h\r\nX-User: u\r\nContent-Length: 3\r\n\r\nabc\
        POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n\
        GET /c HTTP/1.1\r\nHost: h\r\n\r\n";

    #[test]
    fn any_split_gives_the_same_requests() {
        for step in 1..=PIPELINED.len() {
            let (c, r) = feed(PIPELINED, step);
            assert_eq!(r, Ok(None), "step {step}");
            assert_eq!(c.heads.len(), 3, "step {step}");
            assert_eq!(c.body, b"abcde");
            assert_eq!(c.ends, 3);
            assert_eq!(c.heads[0].picked, vec![(b"x-user".to_vec(), b"u".to_vec())]);
            assert_eq!(c.heads[2].target, b"/c");
        }
    }

    #[test]
    fn an_upgrade_hands_over_the_rest() {
        let src =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nXYZ";
        let mut s = RequestStream::new(Vec::new());
        let mut c = Collect::default();
        assert_eq!(s.feed(&src[..20], &mut c), Ok(None));
        let at = s
            .feed(&src[20..], &mut c)
            .expect("valid")
            .expect("an upgrade");
        assert_eq!(&src[20 + at..], b"XYZ");
        assert_eq!(c.ends, 1);
    }

    #[test]
    fn bare_lf_and_oversized_heads_fail_as_they_arrive() {
        let (_, r) = feed(b"GET / HTTP/1.1\nHost: a\n\n", 1);
        assert_eq!(r.map_err(|e| e.status), Err(400));
        let long = [&b"GET /"[..], &[b'a'; 9000]].concat();
        assert_eq!(feed(&long, 512).1.map_err(|e| e.status), Err(414));
        let big = [&b"GET / HTTP/1.1\r\nX: "[..], &[b'a'; 80_000]].concat();
        assert_eq!(feed(&big, 4096).1.map_err(|e| e.status), Err(431));
    }

    #[test]
    fn a_body_may_hold_any_byte() {
        let src = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for step in [1, 7, src.len()] {
            let (c, r) = feed(src, step);
            assert_eq!(
                (c.heads.len(), c.body.as_slice(), r),
                (2, &b"\n\n"[..], Ok(None)),
                "step {step}"
            );
        }
    }

    #[test]
    fn nothing_is_read_after_a_request_that_closes() {
        let src = b"GET / HTTP/1.0\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n";
        let (c, r) = feed(src, 5);
        assert_eq!((c.heads.len(), c.ends, r), (1, 1, Ok(None)));
        let (c, r) = feed(
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\ngarbage",
            64,
        );
        assert_eq!((c.heads.len(), r), (1, Ok(None)));
    }

    #[test]
    fn a_refused_stream_stays_refused() {
        let mut s = RequestStream::new(Vec::new());
        let mut c = Collect::default();
        assert!(s.feed(b"GET / HTTP/1.1\r\n\r\n", &mut c).is_err());
        assert!(s
            .feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", &mut c)
            .is_err());
        assert!(c.heads.is_empty());
    }
}
