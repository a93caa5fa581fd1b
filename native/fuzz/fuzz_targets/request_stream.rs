//! A client's bytes, cut into reads at places the input chooses, through the request stream
//! and the upstream head: nothing panics, and what comes out is bounded by what went in.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_native::http::reader::{RequestStream, Sink};
use mesh_native::http::request::Head;
use mesh_native::http::rewrite::upstream_head;

#[derive(Default)]
struct Count {
    body: usize,
    heads: usize,
    ends: usize,
}

impl Sink<Head> for Count {
    fn head(&mut self, head: Box<Head>) {
        self.heads += 1;
        let up = upstream_head(&head, b"192.0.2.1", head.upgrade.is_some(), b"up:80");
        assert!(up.ends_with(b"\r\n\r\n"));
        assert!(!up.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'), "a bare LF went upstream");
    }
    fn body(&mut self, data: &[u8]) {
        self.body += data.len();
    }
    fn end(&mut self) {
        self.ends += 1;
    }
}

fuzz_target!(|input: &[u8]| {
    // The first byte sets the read size, as the network would cut the stream.
    let Some((&cut, data)) = input.split_first() else { return };
    let step = usize::from(cut % 64) + 1;
    let mut stream = RequestStream::new(vec![b"x-user".to_vec()]);
    let mut count = Count::default();
    for piece in data.chunks(step) {
        match stream.feed(piece, &mut count) {
            Ok(Some(_)) | Err(_) => break,
            Ok(None) => {}
        }
    }
    assert!(count.body <= data.len());
    assert!(count.ends <= count.heads);
});
