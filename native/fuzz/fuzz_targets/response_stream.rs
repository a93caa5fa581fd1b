//! A peer's bytes, cut into reads at places the input chooses, through the response stream and
//! the client's head: nothing panics, and what comes out is bounded by what went in.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_native::http::response::{client_head, Out, ResponseHead, ResponseStream, Sink};

#[derive(Default)]
struct Count {
    body: usize,
    heads: usize,
    ends: usize,
}

impl Sink<ResponseHead> for Count {
    fn head(&mut self, head: Box<ResponseHead>) {
        self.heads += 1;
        for (client_v11, chunked, keep_alive) in [(true, true, true), (false, false, false)] {
            let out = client_head(&head, Out { client_v11, chunked, keep_alive });
            assert!(out.ends_with(b"\r\n\r\n"));
            assert!(!out.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'), "a bare LF to the client");
        }
    }
    fn body(&mut self, data: &[u8]) {
        self.body += data.len();
    }
    fn end(&mut self) {
        self.ends += 1;
    }
}

fuzz_target!(|input: &[u8]| {
    // The first byte sets the read size and the exchange: a HEAD, an upgrade asked for.
    let Some((&first, data)) = input.split_first() else { return };
    let step = usize::from(first % 64) + 1;
    let mut stream = ResponseStream::default();
    stream.expect(first & 0x40 != 0, first & 0x80 != 0);
    let mut count = Count::default();
    for piece in data.chunks(step) {
        match stream.feed(piece, &mut count) {
            Ok(Some(_)) | Err(_) => break,
            Ok(None) => {}
        }
    }
    assert!(count.body <= data.len());
    assert!(count.heads <= 1 && count.ends <= count.heads);
});
