//! A peer's response, as the proxy must read it: the head parsed by httparse and held to the
//! rules that keep a misframed response from reaching a client (CL with TE, several or
//! malformed Content-Length, a transfer coding other than chunked, bare LF, control bytes: the
//! response is refused); interim 1xx heads skipped; a 101 only when the request asked for an
//! upgrade; no body after HEAD, 204 or 304; heads bounded like request heads; and the head the
//! client gets, rebuilt.
#![deny(clippy::indexing_slicing)]

use std::mem::MaybeUninit;

use super::chunked::Decoder;
use super::fields::{named, read_head, tokens, with_held, Lines};
use super::request::Version;
use super::{offset_in, MAX_HEADERS, MAX_HEADER_BYTES};

/// Why a response is refused. Either way the client gets a 502 if nothing was sent yet, and
/// the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A well-formed head the proxy will not forward (a coding it cannot pass on, a 101 nobody
    /// asked for, a head over the limits): the peer failed as a gateway.
    Gateway(&'static str),
    /// Bytes that are not a response, or whose framing is broken.
    Broken(&'static str),
}

impl Fault {
    pub fn reason(self) -> &'static str {
        match self {
            Fault::Gateway(r) | Fault::Broken(r) => r,
        }
    }
}

/// A response head, as the proxy needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: Vec<u8>,
    pub version: Version,
    /// The fields forwarded as they came: hop-by-hop ones, framing and `Via` are left out.
    pub lines: Lines,
    /// None for a 204 (RFC 9110 §8.6: never sent with one).
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// The head declared a body (chunked, or a length above 0), whether or not one follows.
    pub declared_body: bool,
    /// The tokens of every `Connection` field, lower-cased.
    pub connection: Vec<Vec<u8>>,
    pub upgrade: Vec<u8>,
    /// `Via` values received, each followed by ", ".
    pub via: Vec<u8>,
    /// The peer keeps the connection open after this response.
    pub keep_alive: bool,
}

impl ResponseHead {
    fn has_token(&self, token: &[u8]) -> bool {
        self.connection.iter().any(|t| t == token)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ContentLength,
    TransferEncoding,
    Connection,
    Upgrade,
    Via,
    Dropped,
    Plain,
}

fn kind(name: &[u8]) -> Kind {
    const NAMES: [(&[u8], Kind); 11] = [
        (b"content-length", Kind::ContentLength),
        (b"transfer-encoding", Kind::TransferEncoding),
        (b"connection", Kind::Connection),
        (b"upgrade", Kind::Upgrade),
        (b"via", Kind::Via),
        (b"keep-alive", Kind::Dropped),
        (b"proxy-connection", Kind::Dropped),
        (b"te", Kind::Dropped),
        (b"trailer", Kind::Dropped),
        (b"proxy-authenticate", Kind::Dropped),
        (b"proxy-authorization", Kind::Dropped),
    ];
    NAMES
        .iter()
        .find(|(n, _)| n.len() == name.len() && n.eq_ignore_ascii_case(name))
        .map_or(Kind::Plain, |&(_, k)| k)
}

pub enum Parsed {
    Partial,
    Complete(Box<ResponseHead>, usize),
}

/// Parse a response head from the start of `src`.
pub fn parse(src: &[u8]) -> Result<Parsed, Fault> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let n = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        src,
        &mut fields,
    ) {
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => return Err(Fault::Gateway("too many fields")),
        Err(_) => return Err(Fault::Broken("malformed response head")),
    };
    let version = match resp.version {
        Some(0) => Version::Http10,
        Some(1) => Version::Http11,
        _ => return Err(Fault::Broken("unsupported HTTP version")),
    };
    let status = resp.code.unwrap_or(0);
    if status < 100 {
        return Err(Fault::Broken("bad status code"));
    }
    let mut head = ResponseHead {
        status,
        reason: resp.reason.unwrap_or_default().as_bytes().to_vec(),
        version,
        lines: Lines::with_capacity(n, resp.headers.len()),
        content_length: None,
        chunked: false,
        declared_body: false,
        connection: Vec::new(),
        upgrade: Vec::new(),
        via: Vec::new(),
        keep_alive: true,
    };
    for field in resp.headers.iter() {
        let (name, value) = (field.name.as_bytes(), field.value);
        match kind(name) {
            Kind::Plain => head.lines.push(name, value),
            Kind::Dropped => {}
            Kind::ContentLength => {
                if head.content_length.is_some() {
                    return Err(Fault::Broken("several Content-Length fields"));
                }
                if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                    return Err(Fault::Broken("bad Content-Length"));
                }
                let n = value
                    .iter()
                    .try_fold(0u64, |n, &d| {
                        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
                    })
                    .ok_or(Fault::Broken("Content-Length overflow"))?;
                head.content_length = Some(n);
            }
            Kind::TransferEncoding => {
                let end = offset_in(src, value) + value.len();
                let after = src.get(end..).unwrap_or_default();
                if after
                    .iter()
                    .take_while(|&&b| b == b' ' || b == b'\t')
                    .any(|&b| b == b'\t')
                {
                    return Err(Fault::Broken("a tab after Transfer-Encoding"));
                }
                if head.chunked || !value.eq_ignore_ascii_case(b"chunked") {
                    // Another coding (gzip, a list, a second field): its body ends only at
                    // the close, under a coding the proxy would have to pass on. nginx and
                    // Envoy refuse such a response too.
                    return Err(Fault::Gateway("a transfer coding other than chunked"));
                }
                head.chunked = true;
            }
            Kind::Connection => head.connection.extend(tokens(value)),
            Kind::Upgrade => head.upgrade = value.to_vec(),
            Kind::Via => {
                head.via.extend_from_slice(value);
                head.via.extend_from_slice(b", ");
            }
        }
    }
    if head.chunked && head.content_length.is_some() {
        return Err(Fault::Broken("both Content-Length and Transfer-Encoding"));
    }
    head.declared_body = head.chunked || head.content_length.is_some_and(|n| n > 0);
    if status == 204 {
        head.content_length = None;
    }
    head.keep_alive = match version {
        Version::Http11 => !head.has_token(b"close"),
        Version::Http10 => head.has_token(b"keep-alive"),
    };
    Ok(Parsed::Complete(Box::new(head), n))
}

pub use super::fields::Sink;

#[derive(Debug, Clone)]
enum State {
    /// No response is expected: bytes now are a peer's mistake.
    Idle,
    Head,
    Body(u64),
    Chunked(Decoder),
    /// No length and not chunked: the body ends when the peer closes.
    UntilClose,
    /// A 101: what follows is the new protocol's.
    Upgraded,
    Failed(Fault),
}

/// One upstream connection's responses, one exchange at a time.
#[derive(Debug, Clone)]
pub struct ResponseStream {
    state: State,
    held: Vec<u8>,
    head_only: bool,
    upgrade_asked: bool,
    /// Bytes of interim (1xx) heads this exchange: they count toward the head's bound.
    interim_bytes: usize,
    /// Bytes arrived that no response of this exchange explains (after its end, or before it).
    stray: bool,
}

impl Default for ResponseStream {
    fn default() -> Self {
        ResponseStream {
            state: State::Idle,
            held: Vec::new(),
            head_only: false,
            upgrade_asked: false,
            interim_bytes: 0,
            stray: false,
        }
    }
}

impl ResponseStream {
    /// A request went out: read its response. `head_only`: it was a HEAD (no body follows);
    /// `upgrade_asked`: a 101 may come.
    pub fn expect(&mut self, head_only: bool, upgrade_asked: bool) {
        self.state = State::Head;
        self.head_only = head_only;
        self.upgrade_asked = upgrade_asked;
        self.interim_bytes = 0;
        self.held.clear();
        self.stray = false;
    }

    /// Whether bytes came that no response explains: such a connection is not reused.
    pub fn stray(&self) -> bool {
        self.stray
    }

    /// Read `data`; returns the offset in it where a 101's new protocol starts, if one did.
    pub fn feed(
        &mut self,
        data: &[u8],
        sink: &mut impl Sink<ResponseHead>,
    ) -> Result<Option<usize>, Fault> {
        if let State::Failed(f) = self.state {
            return Err(f);
        }
        let mut held = std::mem::take(&mut self.held);
        match with_held(&mut held, data, |src, before| self.run(src, before, sink)) {
            Ok(at) => {
                self.held = held;
                Ok(at)
            }
            Err(f) => {
                self.state = State::Failed(f);
                Err(f)
            }
        }
    }

    fn run(
        &mut self,
        src: &[u8],
        before: usize,
        sink: &mut impl Sink<ResponseHead>,
    ) -> Result<(Option<usize>, usize), Fault> {
        let mut pos = 0;
        loop {
            let rest = src.get(pos..).unwrap_or_default();
            match &mut self.state {
                State::Failed(f) => return Err(*f),
                State::Upgraded => return Ok((None, src.len())),
                State::Idle => {
                    if !rest.is_empty() {
                        self.stray = true;
                    }
                    return Ok((None, src.len()));
                }
                State::Head => {
                    if rest.is_empty() {
                        return Ok((None, pos));
                    }
                    let fresh_from = before.max(pos).saturating_sub(pos);
                    let parse = |r: &[u8]| {
                        parse(r).map(|p| match p {
                            Parsed::Complete(h, n) => Some((h, n)),
                            Parsed::Partial => None,
                        })
                    };
                    let bare_lf = Fault::Broken("bare LF in the response head");
                    let parsed = read_head(rest, fresh_from, parse, bare_lf)?;
                    let head_end = parsed.as_ref().map_or(rest.len(), |(_, n)| *n);
                    if self.interim_bytes + head_end > MAX_HEADER_BYTES {
                        return Err(Fault::Gateway("response head too large"));
                    }
                    let Some((head, n)) = parsed else {
                        return Ok((None, pos));
                    };
                    pos += n;
                    let status = head.status;
                    if (100..200).contains(&status) && status != 101 {
                        self.interim_bytes += n; // 100 Continue, 103 Early Hints: not forwarded
                        continue;
                    }
                    if status == 101 {
                        if !self.upgrade_asked {
                            // A switch nobody asked for (RFC 9110 §15.2.2): tunnelling it would
                            // hand the client's later requests to this peer unparsed.
                            return Err(Fault::Gateway(
                                "a 101 to a request that asked for no upgrade",
                            ));
                        }
                        self.state = State::Upgraded;
                        sink.head(head);
                        return Ok((Some(pos), src.len()));
                    }
                    let no_body = self.head_only || status == 204 || status == 304;
                    self.state = if no_body {
                        State::Body(0)
                    } else if head.chunked {
                        State::Chunked(Decoder::default())
                    } else if let Some(n) = head.content_length {
                        State::Body(n)
                    } else {
                        State::UntilClose
                    };
                    sink.head(head);
                }
                State::Body(left) => {
                    if *left == 0 {
                        self.state = State::Idle;
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
                State::UntilClose => {
                    if !rest.is_empty() {
                        sink.body(rest);
                    }
                    return Ok((None, src.len()));
                }
                State::Chunked(decoder) => {
                    let p = decoder
                        .decode(rest, |d| sink.body(d))
                        .map_err(|r| Fault::Broken(r.reason))?;
                    pos += p.used;
                    if !p.done {
                        return Ok((None, pos));
                    }
                    self.state = State::Idle;
                    sink.end();
                }
            }
        }
    }
}

/// Reason phrases for a peer that sent none (RFC 9110 §15).
fn reason_phrase(status: u16) -> &'static [u8] {
    match status {
        100 => b"Continue",
        101 => b"Switching Protocols",
        200 => b"OK",
        201 => b"Created",
        202 => b"Accepted",
        204 => b"No Content",
        206 => b"Partial Content",
        301 => b"Moved Permanently",
        302 => b"Found",
        303 => b"See Other",
        304 => b"Not Modified",
        307 => b"Temporary Redirect",
        308 => b"Permanent Redirect",
        400 => b"Bad Request",
        401 => b"Unauthorized",
        403 => b"Forbidden",
        404 => b"Not Found",
        405 => b"Method Not Allowed",
        408 => b"Request Timeout",
        409 => b"Conflict",
        413 => b"Content Too Large",
        429 => b"Too Many Requests",
        500 => b"Internal Server Error",
        501 => b"Not Implemented",
        502 => b"Bad Gateway",
        503 => b"Service Unavailable",
        504 => b"Gateway Timeout",
        _ => b"",
    }
}

/// How the head goes to the client: its HTTP version, whether the body is re-chunked (a body
/// of unknown length to an HTTP/1.1 client), and whether the connection stays open.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    pub client_v11: bool,
    pub chunked: bool,
    pub keep_alive: bool,
}

/// The head the client gets: hop-by-hop fields gone (and those the peer's `Connection`
/// names), `Via` appended, the framing declared again.
pub fn client_head(head: &ResponseHead, out: Out) -> Vec<u8> {
    let mut w = Vec::with_capacity(head.lines.bytes.len() + 96);
    w.extend_from_slice(if out.client_v11 {
        b"HTTP/1.1 "
    } else {
        b"HTTP/1.0 "
    });
    w.extend_from_slice(head.status.to_string().as_bytes());
    w.push(b' ');
    w.extend_from_slice(if head.reason.is_empty() {
        reason_phrase(head.status)
    } else {
        &head.reason
    });
    w.extend_from_slice(b"\r\n");
    head.lines
        .write_without(&mut w, &named(&head.connection, &[]));
    w.extend_from_slice(b"Via: ");
    w.extend_from_slice(&head.via);
    w.extend_from_slice(match head.version {
        Version::Http11 => b"1.1 mesh\r\n",
        Version::Http10 => b"1.0 mesh\r\n",
    });
    if head.status == 101 {
        w.extend_from_slice(b"Connection: upgrade\r\nUpgrade: ");
        w.extend_from_slice(&head.upgrade);
        w.extend_from_slice(b"\r\n");
    } else {
        match (head.chunked, head.content_length) {
            (false, Some(n)) => w.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes()),
            _ if out.chunked => w.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
            _ => {}
        }
        if !out.keep_alive {
            w.extend_from_slice(b"Connection: close\r\n");
        } else if !out.client_v11 {
            w.extend_from_slice(b"Connection: keep-alive\r\n");
        }
    }
    w.extend_from_slice(b"\r\n");
    w
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // a test fails by panicking
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect {
        heads: Vec<ResponseHead>,
        body: Vec<u8>,
        ends: usize,
    }

    impl Sink<ResponseHead> for Collect {
        fn head(&mut self, head: Box<ResponseHead>) {
            self.heads.push(*head);
        }
        fn body(&mut self, data: &[u8]) {
            self.body.extend_from_slice(data);
        }
        fn end(&mut self) {
            self.ends += 1;
        }
    }

    fn read(
        src: &[u8],
        step: usize,
        head_only: bool,
    ) -> (Collect, Result<Option<usize>, Fault>, bool) {
        let mut s = ResponseStream::default();
        s.expect(head_only, false);
        let mut c = Collect::default();
        let mut last = Ok(None);
        for piece in src.chunks(step.max(1)) {
            last = s.feed(piece, &mut c);
            if last.is_err() {
                break;
            }
        }
        (c, last, s.stray())
    }

    #[test]
    fn framings_and_interim_heads() {
        let src = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: X-A, keep-alive\r\n\
            Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        for step in 1..=src.len() {
            let (c, r, stray) = read(src, step, false);
            assert_eq!(
                (r, stray, c.ends, c.body.as_slice()),
                (Ok(None), false, 1, &b"ok"[..]),
                "step {step}"
            );
            assert_eq!(c.heads.len(), 1);
            let h = &c.heads[0];
            let out = client_head(
                h,
                Out {
                    client_v11: true,
                    chunked: true,
                    keep_alive: true,
                },
            );
            assert_eq!(
                out,
                b"HTTP/1.1 200 OK\r\nVia: 1.1 mesh\r\nTransfer-Encoding: chunked\r\n\r\n"
            );
        }
    }

    #[test]
    fn misframed_responses_are_refused() {
        let cases: &[(&[u8], Fault)] = &[
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n",
                Fault::Broken("both Content-Length and Transfer-Encoding"),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 8\r\n\r\n",
                Fault::Broken("several Content-Length fields"),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
                Fault::Gateway("a transfer coding other than chunked"),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
                Fault::Broken("bad Content-Length"),
            ),
            (
                b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
                Fault::Broken("bare LF in the response head"),
            ),
            (
                b"NOT HTTP AT ALL\r\n\r\n",
                Fault::Broken("malformed response head"),
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
                Fault::Gateway("a 101 to a request that asked for no upgrade"),
            ),
        ];
        for &(src, want) in cases {
            assert_eq!(
                read(src, src.len(), false).1,
                Err(want),
                "{}",
                String::from_utf8_lossy(src)
            );
        }
        let long = [&b"HTTP/1.1 200 OK\r\nX-A: "[..], &[b'a'; 70_000]].concat();
        assert_eq!(
            read(&long, 4096, false).1,
            Err(Fault::Gateway("response head too large"))
        );
    }

    #[test]
    fn bodiless_responses_and_stray_bytes() {
        let (c, r, stray) = read(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 6\r\n\r\nPOISON",
            100,
            false,
        );
        assert_eq!((r, stray, c.ends, c.body.len()), (Ok(None), true, 1, 0));
        assert!(c.heads[0].declared_body && c.heads[0].content_length.is_none());
        let (c, _, stray) = read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 100, true);
        assert_eq!(
            (c.ends, stray, c.heads[0].content_length),
            (1, false, Some(5))
        );
        let (c, _, stray) = read(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokPOISON",
            3,
            false,
        );
        assert_eq!((c.body.as_slice(), stray), (&b"ok"[..], true));
        let (c, _, _) = read(b"HTTP/1.0 200 OK\r\n\r\nto the close", 4, false);
        assert_eq!(
            (c.body.as_slice(), c.ends, c.heads[0].keep_alive),
            (&b"to the close"[..], 0, false)
        );
    }

    #[test]
    fn an_upgrade_asked_for_hands_over_the_rest() {
        let mut s = ResponseStream::default();
        s.expect(false, true);
        let mut c = Collect::default();
        let src = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nFRAME";
        let at = s.feed(src, &mut c).expect("valid").expect("upgraded");
        assert_eq!(&src[at..], b"FRAME");
        let out = client_head(
            &c.heads[0],
            Out {
                client_v11: true,
                chunked: false,
                keep_alive: true,
            },
        );
        assert!(
            out.ends_with(b"Via: 1.1 mesh\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        );
    }
}
