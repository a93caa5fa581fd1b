//! The request head sent upstream: always rebuilt, never the client's bytes forwarded raw.
//! Hop-by-hop fields are gone (and those the client's `Connection` names, RFC 9110 §7.6.1),
//! `X-Forwarded-For/-Proto/-Host` and `Via` are added, Host is kept, and the body framing is
//! declared again.

use super::fields::named;
use super::request::Head;

/// This proxy's `Via` entry (RFC 9110 §7.6.3).
pub const VIA: &[u8] = b"1.1 mesh";

/// Fields a client's Connection header may not remove: Host is end to end and routing reads
/// it (a `Connection: Host` would otherwise forward a request without one).
const CONNECTION_PROTECTED: [&[u8]; 1] = [b"host"];

/// The upstream head for `head` from a client at `client_ip`. `upgrade`: ask the peer to
/// switch protocols; `default_host`: the Host to send when the request had none (HTTP/1.0),
/// the upstream's address, as nginx does.
pub fn upstream_head(head: &Head, client_ip: &[u8], upgrade: bool, default_host: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.lines.bytes.len() + head.target.len() + 160);
    out.extend_from_slice(&head.method);
    out.push(b' ');
    out.extend_from_slice(&head.target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    head.lines
        .write_without(&mut out, &named(&head.connection, &CONNECTION_PROTECTED));
    if head.host.is_empty() {
        out.extend_from_slice(b"Host: ");
        out.extend_from_slice(default_host);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"X-Forwarded-For: ");
    out.extend_from_slice(&head.xff);
    out.extend_from_slice(client_ip);
    out.extend_from_slice(b"\r\nX-Forwarded-Proto: http\r\n");
    if !head.host.is_empty() {
        out.extend_from_slice(b"X-Forwarded-Host: ");
        out.extend_from_slice(&head.host);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Via: ");
    out.extend_from_slice(&head.via);
    out.extend_from_slice(VIA);
    out.extend_from_slice(b"\r\n");
    if upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\nUpgrade: ");
        out.extend_from_slice(head.upgrade.as_deref().unwrap_or_default());
        out.extend_from_slice(b"\r\n\r\n");
    } else if head.chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
    } else if let Some(n) = head.content_length {
        out.extend_from_slice(format!("Content-Length: {n}\r\n\r\n").as_bytes());
    } else {
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::request::{parse, Parsed};

    fn head(src: &[u8]) -> Head {
        match parse(src, &[]) {
            Ok(Parsed::Complete(h, _)) => *h,
            _ => panic!("not a head"),
        }
    }

    #[test]
    fn hop_by_hop_out_forwarding_fields_in() {
        let h = head(
            b"POST /up HTTP/1.1\r\nHost: app\r\nConnection: keep-alive, X-Hop, Host\r\nX-Hop: s\r\n\
              X-Forwarded-For: 203.0.113.9\r\nVia: 1.0 edge\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let up = upstream_head(&h, b"10.0.0.7", false, b"");
        assert_eq!(
            String::from_utf8_lossy(&up),
            "POST /up HTTP/1.1\r\nHost: app\r\nX-Forwarded-For: 203.0.113.9, 10.0.0.7\r\n\
             X-Forwarded-Proto: http\r\nX-Forwarded-Host: app\r\nVia: 1.0 edge, 1.1 mesh\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn http10_without_host_gets_the_upstream_address() {
        let up = upstream_head(
            &head(b"GET /x HTTP/1.0\r\n\r\n"),
            b"1.2.3.4",
            false,
            b"10.0.0.1:80",
        );
        let up = String::from_utf8_lossy(&up);
        assert!(
            up.contains("Host: 10.0.0.1:80\r\n") && !up.contains("X-Forwarded-Host"),
            "{up}"
        );
    }

    #[test]
    fn upgrade_and_length() {
        let h = head(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        );
        assert!(upstream_head(&h, b"1", true, b"")
            .ends_with(b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n"));
        let h = head(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n");
        assert!(upstream_head(&h, b"1", false, b"")
            .ends_with(b"Via: 1.1 mesh\r\nContent-Length: 12\r\n\r\n"));
    }
}
