//! A request head: parsed by httparse, then held to the rules a proxy in front of other
//! parsers must enforce. The statuses are nginx's and Envoy's: CL with TE → 400; several
//! Content-Length → 400; a transfer coding other than `chunked` → 501; TE in HTTP/1.0 → 400;
//! HTTP/1.1 without exactly one Host → 400; CONNECT → 405; oversized heads → 414 / 431;
//! bare LF, obs-fold, whitespace before a colon, control bytes → 400.
#![deny(clippy::indexing_slicing)]

use std::mem::MaybeUninit;

use super::fields::{tokens, Lines};
use super::{offset_in, Reject, MAX_HEADERS, MAX_HEADER_BYTES, MAX_REQUEST_LINE_BYTES};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "1.0",
            Version::Http11 => "1.1",
        }
    }
}

/// A request head, as the proxy needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: Vec<u8>,
    /// The target in origin form (an absolute-form target is rewritten, RFC 9112 §3.2.2).
    pub target: Vec<u8>,
    pub version: Version,
    /// The fields forwarded as they came, hop-by-hop and rewritten ones left out.
    pub lines: Lines,
    /// `(lower-cased name, value)` of the fields the router asked for (hash keys).
    pub picked: Vec<(Vec<u8>, Vec<u8>)>,
    pub content_length: Option<u64>,
    pub chunked: bool,
    pub keep_alive: bool,
    /// The protocol asked for, when `Connection` names `upgrade` (RFC 9110 §7.8).
    pub upgrade: Option<Vec<u8>>,
    pub expect_continue: bool,
    pub host: Vec<u8>,
    /// `X-Forwarded-For` and `Via` values received, each followed by ", ".
    pub xff: Vec<u8>,
    pub via: Vec<u8>,
    /// The tokens of every `Connection` field, lower-cased.
    pub connection: Vec<Vec<u8>>,
}

impl Head {
    pub fn has_body(&self) -> bool {
        self.chunked || self.content_length.is_some_and(|n| n > 0)
    }

    fn has_token(&self, token: &[u8]) -> bool {
        self.connection.iter().any(|t| t == token)
    }
}

/// What a field name means to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Special {
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    Upgrade,
    Expect,
    XForwardedFor,
    Via,
    /// Hop-by-hop, or rewritten by the proxy: not forwarded.
    Dropped,
    /// Forwarded as it came.
    Plain,
}

fn special(name: &[u8]) -> Special {
    // A table by length: most fields match none, and no name is copied to be compared.
    const NAMES: [(&[u8], Special); 16] = [
        (b"host", Special::Host),
        (b"content-length", Special::ContentLength),
        (b"transfer-encoding", Special::TransferEncoding),
        (b"connection", Special::Connection),
        (b"upgrade", Special::Upgrade),
        (b"expect", Special::Expect),
        (b"x-forwarded-for", Special::XForwardedFor),
        (b"via", Special::Via),
        (b"keep-alive", Special::Dropped),
        (b"proxy-connection", Special::Dropped),
        (b"te", Special::Dropped),
        (b"trailer", Special::Dropped),
        (b"proxy-authenticate", Special::Dropped),
        (b"proxy-authorization", Special::Dropped),
        (b"x-forwarded-proto", Special::Dropped),
        (b"x-forwarded-host", Special::Dropped),
    ];
    NAMES
        .iter()
        .find(|(n, _)| n.len() == name.len() && n.eq_ignore_ascii_case(name))
        .map_or(Special::Plain, |&(_, kind)| kind)
}

/// The methods forwarded: HTTP's (RFC 9110 §9), WebDAV's, and the others registered with
/// IANA that llhttp, and so Node and most upstreams behind mesh, parse. Any other method is
/// refused, lower-case ones included: an upstream that refuses it would do so after the
/// proxy had committed the connection to it.
const METHODS: [&[u8]; 34] = [
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"COPY",
    b"LOCK",
    b"MKCOL",
    b"MOVE",
    b"PROPFIND",
    b"PROPPATCH",
    b"SEARCH",
    b"UNLOCK",
    b"BIND",
    b"REBIND",
    b"UNBIND",
    b"ACL",
    b"REPORT",
    b"MKACTIVITY",
    b"CHECKOUT",
    b"MERGE",
    b"M-SEARCH",
    b"NOTIFY",
    b"SUBSCRIBE",
    b"UNSUBSCRIBE",
    b"PURGE",
    b"MKCALENDAR",
    b"LINK",
    b"UNLINK",
    b"SOURCE",
];

fn valid_method(m: &[u8]) -> bool {
    METHODS.contains(&m)
}

/// A Content-Length value: ASCII digits only (no sign, list or whitespace inside), no overflow.
fn content_length(value: &[u8]) -> Result<u64, Reject> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(Reject::new(400, "bad Content-Length"));
    }
    value
        .iter()
        .try_fold(0u64, |n, &d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or(Reject::new(400, "Content-Length overflow"))
}

pub enum Parsed {
    /// More bytes are needed; the head so far breaks no rule.
    Partial,
    /// A whole head, and how many bytes of the input it took.
    Complete(Box<Head>, usize),
}

/// Parse a request head from the start of `src` (its leading empty lines already skipped).
/// `wanted` are the lower-cased names whose values the router asked for.
pub fn parse(src: &[u8], wanted: &[Vec<u8>]) -> Result<Parsed, Reject> {
    // Left uninitialised: httparse writes the fields it finds (no 100-entry fill per head).
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let n = match req.parse_with_uninit_headers(src, &mut fields) {
        Ok(httparse::Status::Partial) => {
            // A method no request could have is refused now, not when its head is complete.
            let word = src.split(|&b| b == b' ').next().unwrap_or_default();
            let whole = word.len() < src.len();
            let known = |m: &&[u8]| {
                if whole {
                    *m == word
                } else {
                    m.starts_with(word)
                }
            };
            if !METHODS.iter().any(known) {
                return Err(Reject::new(400, "bad method"));
            }
            return Ok(Parsed::Partial);
        }
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reject::new(431, "too many header fields"))
        }
        Err(httparse::Error::Version) => return Err(Reject::new(400, "unsupported HTTP version")),
        Err(_) => return Err(Reject::new(400, "malformed request head")),
    };
    let method = req.method.unwrap_or_default().as_bytes();
    let target = req.path.unwrap_or_default().as_bytes();
    let version = match req.version {
        Some(0) => Version::Http10,
        Some(1) => Version::Http11,
        _ => return Err(Reject::new(400, "unsupported HTTP version")),
    };
    if target.len() > MAX_REQUEST_LINE_BYTES {
        return Err(Reject::new(414, "request line too long"));
    }
    if !target.iter().all(|&b| b.is_ascii_graphic()) {
        // httparse takes UTF-8 in a target; RFC 3986 has none (it is percent-encoded), and
        // llhttp refuses it.
        return Err(Reject::new(
            400,
            "a byte outside ASCII in the request target",
        ));
    }
    if !valid_method(method) {
        return Err(Reject::new(400, "bad method"));
    }
    let mut head = Head {
        method: method.to_vec(),
        target: target.to_vec(),
        version,
        lines: Lines::with_capacity(n, req.headers.len()),
        picked: Vec::new(),
        content_length: None,
        chunked: false,
        keep_alive: true,
        upgrade: None,
        expect_continue: false,
        host: Vec::new(),
        xff: Vec::new(),
        via: Vec::new(),
        connection: Vec::new(),
    };
    let mut head_bytes = target.len();
    let mut hosts = 0u32;
    for field in req.headers.iter() {
        let (name, value) = (field.name.as_bytes(), field.value);
        head_bytes += name.len() + value.len() + 4;
        if head_bytes > MAX_HEADER_BYTES {
            return Err(Reject::new(431, "header section too large"));
        }
        if !wanted.is_empty() && wanted.iter().any(|w| w.eq_ignore_ascii_case(name)) {
            head.picked
                .push((name.to_ascii_lowercase(), value.to_vec()));
        }
        match special(name) {
            Special::Plain => head.lines.push(name, value),
            Special::Dropped => {}
            Special::Host => {
                hosts += 1;
                if hosts > 1 {
                    return Err(Reject::new(400, "several Host fields")); // RFC 9112 §3.2
                }
                head.host = value.to_vec();
                head.lines.push(name, value);
            }
            Special::ContentLength => {
                if head.content_length.is_some() {
                    return Err(Reject::new(400, "several Content-Length fields"));
                }
                head.content_length = Some(content_length(value)?);
            }
            Special::TransferEncoding => {
                // httparse trims the value: what followed it is seen in the raw bytes. Spaces
                // are plain OWS; a tab there is how two parsers come to disagree (llhttp
                // refuses it too).
                let end = offset_in(src, value) + value.len();
                let after = src.get(end..).unwrap_or_default();
                let ws = after.iter().take_while(|&&b| b == b' ' || b == b'\t');
                if !value.is_empty() && ws.clone().any(|&b| b == b'\t') {
                    return Err(Reject::new(400, "a tab after Transfer-Encoding"));
                }
                if head.chunked || !value.eq_ignore_ascii_case(b"chunked") {
                    return Err(Reject::new(
                        501,
                        "only Transfer-Encoding: chunked is implemented",
                    ));
                }
                head.chunked = true;
            }
            Special::Connection => head.connection.extend(tokens(value)),
            // An empty Upgrade names no protocol: nothing to switch to.
            Special::Upgrade => head.upgrade = (!value.is_empty()).then(|| value.to_vec()),
            Special::Expect => head.expect_continue = value.eq_ignore_ascii_case(b"100-continue"),
            Special::XForwardedFor => {
                head.xff.extend_from_slice(value);
                head.xff.extend_from_slice(b", ");
            }
            Special::Via => {
                head.via.extend_from_slice(value);
                head.via.extend_from_slice(b", ");
            }
        }
    }
    if head.chunked && head.content_length.is_some() {
        return Err(Reject::new(
            400,
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if head.chunked && version == Version::Http10 {
        return Err(Reject::new(400, "Transfer-Encoding in HTTP/1.0"));
    }
    if head.method == b"CONNECT" {
        // A reverse proxy is no tunnel (Envoy and nginx refuse it too): the bytes behind it
        // would otherwise be read as the tunnel's.
        return Err(Reject::new(405, "CONNECT is not served"));
    }
    if !head.target.starts_with(b"/") && head.target != b"*" {
        absolute_form(&mut head, hosts)?;
    } else if version == Version::Http11 && hosts == 0 {
        return Err(Reject::new(400, "HTTP/1.1 request without Host")); // RFC 9112 §3.2
    }
    head.keep_alive = match version {
        Version::Http11 => !head.has_token(b"close"),
        Version::Http10 => head.has_token(b"keep-alive"),
    };
    if head.upgrade.is_some() && !head.has_token(b"upgrade") {
        head.upgrade = None; // RFC 9110 §7.8: Upgrade counts only when Connection names it
    }
    Ok(Parsed::Complete(Box::new(head), n))
}

/// RFC 9112 §3.2.2: with an absolute-form target, its authority replaces any Host field, and
/// the request goes upstream in origin form.
fn absolute_form(head: &mut Head, hosts: u32) -> Result<(), Reject> {
    let bad_form = Reject::new(
        400,
        "request target is neither origin-form nor absolute-form",
    );
    let t = head.target.as_slice();
    let sep = t.windows(3).position(|w| w == b"://").ok_or(bad_form)?;
    let (scheme, rest) = (
        t.get(..sep).unwrap_or_default(),
        t.get(sep + 3..).unwrap_or_default(),
    );
    if !scheme.eq_ignore_ascii_case(b"http") && !scheme.eq_ignore_ascii_case(b"https") {
        return Err(bad_form);
    }
    let (mut authority, path) = match rest.iter().position(|&b| b == b'/') {
        Some(i) => (
            rest.get(..i).unwrap_or_default(),
            rest.get(i..).unwrap_or_default(),
        ),
        None => (rest, &b"/"[..]),
    };
    let mut query: &[u8] = b"";
    if let Some(q) = authority.iter().position(|&b| b == b'?') {
        // http://host?q: no path, a query
        query = authority.get(q..).unwrap_or_default();
        authority = authority.get(..q).unwrap_or_default();
    }
    if authority.is_empty() || !authority.iter().all(|&b| authority_byte(b)) {
        return Err(Reject::new(400, "bad authority in the request target"));
    }
    let (authority, origin) = (authority.to_vec(), [path, query].concat());
    if hosts > 0 {
        head.lines.remove(b"host");
    }
    head.lines.push(b"Host", &authority);
    head.host = authority;
    head.target = origin;
    Ok(())
}

/// RFC 3986 §3.2: host (reg-name, IP literal) and port; no userinfo (`@`), which would let a
/// client dress one host as another.
fn authority_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:[]".contains(&b)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // a test fails by panicking
mod tests {
    use super::*;

    fn head(src: &[u8]) -> Result<Head, Reject> {
        let wanted = vec![b"x-user".to_vec()];
        match parse(src, &wanted)? {
            Parsed::Complete(h, n) => {
                assert_eq!(n, src.len());
                Ok(*h)
            }
            Parsed::Partial => panic!("partial"),
        }
    }

    fn status(src: &[u8]) -> u16 {
        head(src).err().map_or(0, |r| r.status)
    }

    #[test]
    fn fields_are_sorted_into_forwarded_and_read() {
        let h = head(
            b"POST /up?x=1 HTTP/1.1\r\nHost: app\r\nX-User: alice\r\nConnection: keep-alive, X-Hop\r\n\
              X-Hop: s\r\nX-Forwarded-For: 203.0.113.9\r\nTransfer-Encoding: chunked\r\nKeep-Alive: 5\r\n\r\n",
        )
        .expect("valid");
        assert_eq!(h.method, b"POST");
        assert_eq!(h.target, b"/up?x=1");
        assert!(h.chunked && h.keep_alive && h.has_body());
        assert_eq!(h.host, b"app");
        assert_eq!(h.picked, vec![(b"x-user".to_vec(), b"alice".to_vec())]);
        assert_eq!(h.lines.bytes, b"Host: app\r\nX-User: alice\r\nX-Hop: s\r\n");
        assert_eq!(h.xff, b"203.0.113.9, ");
        assert_eq!(
            h.connection,
            vec![b"keep-alive".to_vec(), b"x-hop".to_vec()]
        );
    }

    #[test]
    fn framing_rules() {
        let cases: &[(&[u8], u16)] = &[
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\t\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\x0b\r\n\r\n", 400),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
            (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\x7fc\r\n\r\n", 400),
            (b"GET /a\xe9 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET /\xc2\x80 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET ftp://a/ HTTP/1.1\r\n\r\n", 400),
            (b"GET http://u@a/ HTTP/1.1\r\n\r\n", 400),
            (b"GET http://a<b/ HTTP/1.1\r\n\r\n", 400),
            (b"GET a HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ];
        for &(src, want) in cases {
            assert_eq!(status(src), want, "{}", String::from_utf8_lossy(src));
        }
    }

    #[test]
    fn limits() {
        let many: Vec<u8> = [
            &b"GET / HTTP/1.1\r\nHost: a\r\n"[..],
            &(0..100)
                .flat_map(|i| format!("X-{i}: v\r\n").into_bytes())
                .collect::<Vec<_>>(),
            b"\r\n",
        ]
        .concat();
        assert_eq!(status(&many), 431);
        let long = [
            &b"GET / HTTP/1.1\r\nHost: a\r\nX: "[..],
            &[b'a'; 70_000],
            b"\r\n\r\n",
        ]
        .concat();
        assert_eq!(status(&long), 431);
        let target = [
            &b"GET /"[..],
            &[b'a'; 9000],
            b" HTTP/1.1\r\nHost: a\r\n\r\n",
        ]
        .concat();
        assert_eq!(status(&target), 414);
    }

    #[test]
    fn absolute_form_takes_the_authority_as_host() {
        let h = head(b"GET http://b.example:8080/p?q HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\n")
            .expect("valid");
        assert_eq!(h.target, b"/p?q");
        assert_eq!(h.host, b"b.example:8080");
        assert_eq!(h.lines.bytes, b"X: y\r\nHost: b.example:8080\r\n");
        let h = head(b"GET http://b?q=1 HTTP/1.0\r\n\r\n").expect("valid");
        assert_eq!(
            (h.target.as_slice(), h.host.as_slice()),
            (&b"/?q=1"[..], &b"b"[..])
        );
    }

    #[test]
    fn keep_alive_and_upgrade() {
        let h = head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").expect("valid");
        assert!(h.keep_alive && !h.has_body());
        let h = head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nConnection: x\r\n\r\n")
            .expect("valid");
        assert!(!h.keep_alive);
        let h = head(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n").expect("valid");
        assert_eq!(h.upgrade, None);
        let h = head(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .expect("valid");
        assert_eq!(h.upgrade.as_deref(), Some(&b"websocket"[..]));
    }

    #[test]
    fn a_partial_head_is_partial_and_a_bad_one_fails_early() {
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: a\r\n", &[]),
            Ok(Parsed::Partial)
        ));
        assert_eq!(parse(b"GET /a\x00", &[]).err().map(|r| r.status), Some(400));
        assert_eq!(parse(b"!", &[]).err().map(|r| r.status), Some(400));
        assert_eq!(parse(b"GETX ", &[]).err().map(|r| r.status), Some(400));
        assert!(matches!(parse(b"PROP", &[]), Ok(Parsed::Partial)));
    }
}
