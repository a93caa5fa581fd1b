//! HTTP/1.1 on the data path: request heads parsed with httparse (the grammar is never
//! hand-written here), and on top of it the framing and smuggling rules a proxy must hold
//! (RFC 9112 §6.1 and §6.3; what nginx and Envoy refuse), the chunked codec, and the head
//! sent upstream. Bytes in, decisions out: nothing here does I/O or knows of Python.

pub mod chunked;
pub mod fields;
pub mod reader;
pub mod relay;
pub mod request;
pub mod response;
pub mod rewrite;

/// The whole request head; Envoy 60 KiB, nginx 4 × 8 KiB, h11 16 KiB.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Envoy's `max_headers_count` default.
pub const MAX_HEADERS: usize = 100;
/// nginx `large_client_header_buffers` (8 KiB): a longer request line is a 414.
pub const MAX_REQUEST_LINE_BYTES: usize = 8 * 1024;

/// Why a request cannot be served: the status to answer before closing, and a reason for
/// the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub reason: &'static str,
}

impl Reject {
    pub const fn new(status: u16, reason: &'static str) -> Self {
        Reject { status, reason }
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.reason)
    }
}

impl std::error::Error for Reject {}

/// The bytes in `inner` start at this offset of `outer` (`inner` is a subslice of it).
pub(crate) fn offset_in(outer: &[u8], inner: &[u8]) -> usize {
    (inner.as_ptr() as usize).saturating_sub(outer.as_ptr() as usize)
}

/// Whether a line feed in `data` has no carriage return before it (`prev` is the byte before
/// `data`, if any): RFC 9112 §2.2 lets a recipient accept a bare LF, and a proxy must not,
/// since the peer behind it may not.
pub(crate) fn has_bare_lf(prev: Option<u8>, data: &[u8]) -> bool {
    let mut from = 0;
    // Line feeds are few: jump from one to the next (memchr) and look behind each.
    while let Some(i) = data
        .get(from..)
        .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
    {
        let at = from + i;
        let before = at.checked_sub(1).map_or(prev, |b| data.get(b).copied());
        if before != Some(b'\r') {
            return true;
        }
        from = at + 1;
    }
    false
}
