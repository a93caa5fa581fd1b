//! A peer's bytes, cut into reads at places the input chooses, through the response stream and
//! the relay that builds what the client gets: nothing panics, no bare LF reaches the client,
//! and what comes out is bounded by what went in.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_native::http::relay::{Exchange, Relay};
use mesh_native::http::response::ResponseStream;

fuzz_target!(|input: &[u8]| {
    // The first byte sets the read size, the second the exchange: a HEAD, an upgrade asked
    // for, the client's version and keep-alive, a retryable answer dropped.
    let Some((&first, rest)) = input.split_first() else { return };
    let Some((&second, data)) = rest.split_first() else { return };
    let step = usize::from(first % 64) + 1;
    let x = Exchange {
        head_only: second & 1 != 0,
        client_v11: second & 2 != 0,
        client_keep_alive: second & 4 != 0,
        discard_retryable: second & 8 != 0,
    };
    let mut stream = ResponseStream::default();
    stream.expect(x.head_only, second & 16 != 0);
    let mut relay = Relay::default();
    relay.start(x);
    relay.keep_alive = second & 32 != 0;
    let mut out = Vec::new();
    let mut upgraded = false;
    for piece in data.chunks(step) {
        let r = stream.feed(piece, &mut relay);
        out.append(&mut relay.out);
        match r {
            Ok(Some(_)) => {
                upgraded = true;
                break;
            }
            Err(_) => break,
            Ok(None) => {}
        }
        let _ = relay.end_bits(stream.stray());
    }
    if relay.started {
        assert!(!upgraded || out.ends_with(b"\r\n\r\n"));
    }
    // The head is rebuilt (at most a few fields added) and each body piece gains at most a
    // chunk frame: one per read.
    assert!(out.len() <= data.len() + 256 + 32 * data.len().div_ceil(step));
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |p| p + 4);
    let head = &out[..head_end];
    assert!(
        !head.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
        "a bare LF in the client's head"
    );
});
