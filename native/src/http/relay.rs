//! One exchange's response, as the client gets it: the head rebuilt (`client_head`), the body
//! passed on (re-chunked when its length is unknown and the client speaks HTTP/1.1), the last
//! chunk at the end, and what the exchange's end means for both connections. The response
//! reader ([`ResponseStream`](super::response::ResponseStream)) feeds it as its sink, so one
//! read from a peer becomes the bytes of one write to the client.

use super::response::{client_head, Out, ResponseHead, Sink};

/// A peer's 502, 503 or 504 that a retry may replace is dropped, not forwarded, while tries
/// remain (Envoy `retry_on: gateway-error`).
pub fn retryable(status: u16) -> bool {
    matches!(status, 502..=504)
}

/// The request's side of one exchange, fixed when it starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Exchange {
    pub head_only: bool,
    pub client_v11: bool,
    /// The client asked to keep its connection open.
    pub client_keep_alive: bool,
    /// Drop a retryable answer (tries remain).
    pub discard_retryable: bool,
}

/// What an exchange's end tells the proxy, as bits of one integer.
pub mod end {
    /// The response ended in this read.
    pub const COMPLETE: u8 = 1;
    /// A 101: what follows is the new protocol's.
    pub const UPGRADED: u8 = 2;
    /// The client's connection closes after this response (the head said so).
    pub const CLIENT_CLOSE: u8 = 4;
    /// The peer's connection may carry the next request.
    pub const REUSABLE: u8 = 8;
}

#[derive(Debug, Default)]
pub struct Relay {
    exchange: Exchange,
    /// Whether the client's connection may stay open, as the proxy saw it at the last read.
    pub keep_alive: bool,
    pub status: u16,
    /// A byte of the response is on its way to the client.
    pub started: bool,
    discard: bool,
    pub chunked_out: bool,
    pub keep_alive_out: bool,
    /// No length and not chunked: the body ends when the peer closes.
    pub close_delimited: bool,
    /// The peer may be asked again on this connection (it keeps it open, and no body it
    /// declared was left unread).
    peer_reusable: bool,
    ended: bool,
    upgraded: bool,
    /// The bytes for the client gathered during one read.
    pub out: Vec<u8>,
}

impl Relay {
    /// A request went out: its response is relayed under these terms.
    pub fn start(&mut self, exchange: Exchange) {
        *self = Relay {
            exchange,
            out: std::mem::take(&mut self.out),
            ..Relay::default()
        };
        self.out.clear();
    }

    /// What this read ended, as [`end`] bits (0: the response goes on).
    pub fn end_bits(&self, stray: bool) -> u8 {
        if self.upgraded {
            return end::UPGRADED;
        }
        if !self.ended {
            return 0;
        }
        let mut bits = end::COMPLETE;
        if self.started && !self.keep_alive_out {
            bits |= end::CLIENT_CLOSE;
        }
        if self.peer_reusable && !stray {
            bits |= end::REUSABLE;
        }
        bits
    }
}

impl Sink<ResponseHead> for Relay {
    fn head(&mut self, head: Box<ResponseHead>) {
        let status = head.status;
        self.status = status;
        let x = self.exchange;
        let no_body = x.head_only || status == 204 || status == 304;
        // No body follows (RFC 9112 §6.3), whatever the head declared. A peer that declared
        // one may still write it, later and in another segment, where the next request on a
        // pooled connection would read it as its own response: such a connection is not
        // pooled.
        self.peer_reusable = head.keep_alive && !(no_body && head.declared_body);
        if status == 101 {
            self.upgraded = true;
        }
        if x.discard_retryable && retryable(status) {
            self.discard = true; // the caller retries elsewhere
            return;
        }
        let no_body = no_body || status == 101;
        let length = if head.chunked {
            None
        } else {
            head.content_length
        };
        let mut keep = self.keep_alive && x.client_keep_alive;
        self.chunked_out = if no_body || length.is_some() {
            false
        } else if x.client_v11 {
            true
        } else {
            keep = false; // an HTTP/1.0 client, a length unknown: the close ends the body
            false
        };
        self.close_delimited = length.is_none() && !head.chunked && !no_body;
        self.keep_alive_out = keep;
        self.started = true;
        self.out.extend_from_slice(&client_head(
            &head,
            Out {
                client_v11: x.client_v11,
                chunked: self.chunked_out,
                keep_alive: keep,
            },
        ));
    }

    fn body(&mut self, data: &[u8]) {
        if self.discard {
            return;
        }
        if self.chunked_out {
            self.out
                .extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            self.out.extend_from_slice(data);
            self.out.extend_from_slice(b"\r\n");
        } else {
            self.out.extend_from_slice(data);
        }
    }

    fn end(&mut self) {
        self.ended = true;
        if self.started && self.chunked_out {
            self.out.extend_from_slice(LAST_CHUNK);
        }
    }
}

pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // a test fails by panicking
mod tests {
    use super::super::response::ResponseStream;
    use super::*;

    fn relay(src: &[u8], step: usize, x: Exchange) -> (Vec<u8>, u8, Relay) {
        let mut s = ResponseStream::default();
        s.expect(x.head_only, false);
        let mut r = Relay::default();
        r.start(x);
        r.keep_alive = true;
        let mut out = Vec::new();
        let mut bits = 0;
        for piece in src.chunks(step.max(1)) {
            s.feed(piece, &mut r).expect("a valid response");
            out.append(&mut r.out);
            bits = r.end_bits(s.stray());
        }
        (out, bits, r)
    }

    const V11: Exchange = Exchange {
        head_only: false,
        client_v11: true,
        client_keep_alive: true,
        discard_retryable: false,
    };

    #[test]
    fn a_body_of_unknown_length_is_rechunked_for_an_http11_client() {
        let src = b"HTTP/1.1 200 OK\r\nConnection: close\r\nX-A: 1\r\n\r\nto the close";
        for step in 1..=src.len() {
            let (out, bits, r) = relay(src, step, V11);
            let head =
                b"HTTP/1.1 200 OK\r\nX-A: 1\r\nVia: 1.1 mesh\r\nTransfer-Encoding: chunked\r\n\r\n";
            assert!(out.starts_with(head), "step {step}");
            // Each read's piece is its own chunk; together they are the body.
            let mut body = Vec::new();
            let mut d = super::super::chunked::Decoder::default();
            d.decode(&out[head.len()..], |p| body.extend_from_slice(p))
                .expect("valid chunks");
            assert_eq!(body, b"to the close", "step {step}");
            assert!(r.close_delimited && r.chunked_out && bits == 0);
        }
    }

    #[test]
    fn an_http10_client_gets_the_close_and_no_chunks() {
        let x = Exchange {
            client_v11: false,
            ..V11
        };
        let (out, _, r) = relay(b"HTTP/1.1 200 OK\r\n\r\nabc", 100, x);
        assert_eq!(
            out,
            b"HTTP/1.0 200 OK\r\nVia: 1.1 mesh\r\nConnection: close\r\n\r\nabc"
        );
        assert!(!r.keep_alive_out && r.close_delimited);
    }

    #[test]
    fn the_end_says_what_each_connection_does_next() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (out, bits, _) = relay(ok, 5, V11);
        assert!(out.ends_with(b"Content-Length: 2\r\n\r\nok"));
        assert_eq!(bits, end::COMPLETE | end::REUSABLE);
        let (_, bits, _) = relay(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokNO",
            100,
            V11,
        );
        assert_eq!(bits, end::COMPLETE, "stray bytes: not pooled");
        let closing = Exchange {
            client_keep_alive: false,
            ..V11
        };
        let (out, bits, _) = relay(ok, 100, closing);
        assert!(out.windows(19).any(|w| w == b"Connection: close\r\n"));
        assert_eq!(bits, end::COMPLETE | end::CLIENT_CLOSE | end::REUSABLE);
        let head = Exchange {
            head_only: true,
            ..V11
        };
        let (out, bits, _) = relay(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 100, head);
        assert!(out.ends_with(b"Content-Length: 5\r\n\r\n"));
        assert_eq!(
            bits,
            end::COMPLETE,
            "a HEAD answer that declared a body: not pooled"
        );
        let (_, bits, _) = relay(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
            100,
            V11,
        );
        assert_eq!(bits, end::COMPLETE | end::REUSABLE);
    }

    #[test]
    fn a_retryable_answer_is_dropped_while_tries_remain() {
        let src = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy";
        let x = Exchange {
            discard_retryable: true,
            ..V11
        };
        let (out, bits, r) = relay(src, 7, x);
        assert!(out.is_empty() && !r.started && r.status == 503);
        assert_eq!(bits, end::COMPLETE | end::REUSABLE);
        let (out, _, r) = relay(src, 7, V11);
        assert!(out.ends_with(b"\r\n\r\nbusy") && r.started);
        let (out, _, _) = relay(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 1\r\n\r\nx",
            7,
            x,
        );
        assert!(
            out.ends_with(b"\r\n\r\nx"),
            "a 500 is not retried: forwarded"
        );
    }

    #[test]
    fn a_chunked_body_is_passed_on_rechunked_with_its_last_chunk() {
        let src = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        let (out, bits, _) = relay(src, 100, V11);
        assert!(out.ends_with(b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"));
        assert_eq!(bits, end::COMPLETE | end::REUSABLE);
    }
}
