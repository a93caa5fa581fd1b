//! A chunked body, cut into reads at places the input chooses: nothing panics, the data out
//! is never more than came in, and the same bytes decode the same whatever the cuts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_native::http::chunked::Decoder;

fn decode(data: &[u8], step: usize) -> (Vec<u8>, Option<u16>, bool) {
    let mut d = Decoder::default();
    let mut body = Vec::new();
    let mut held = Vec::new();
    for piece in data.chunks(step) {
        held.extend_from_slice(piece);
        match d.decode(&held, |b| body.extend_from_slice(b)) {
            Ok(p) => {
                held.drain(..p.used);
                if p.done {
                    return (body, None, true);
                }
            }
            Err(r) => return (body, Some(r.status), false),
        }
    }
    (body, None, false)
}

fuzz_target!(|input: &[u8]| {
    let Some((&cut, data)) = input.split_first() else { return };
    let step = usize::from(cut % 32) + 1;
    let (body, status, done) = decode(data, step);
    assert!(body.len() <= data.len());
    let (whole_body, whole_status, whole_done) = decode(data, data.len().max(1));
    assert_eq!((done, status), (whole_done, whole_status));
    if done {
        assert_eq!(body, whole_body);
    }
});
