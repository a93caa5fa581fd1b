//! The chunked transfer coding (RFC 9112 §7.1), as a proxy must read it: strictly. A chunk
//! size is hex digits only (no sign, prefix or whitespace), every line ends in CRLF, chunk
//! extensions are skipped, trailer fields are read with httparse and dropped, and bytes that
//! carry no body data (extensions, trailers) are bounded like a head: unbounded, a peer could
//! make the proxy hold or scan without end.
#![deny(clippy::indexing_slicing)]

use super::{has_bare_lf, Reject, MAX_HEADERS, MAX_HEADER_BYTES};

/// Hex digits in a chunk size: 16 fill a u64 (llhttp and Envoy refuse more, as overflow).
const MAX_SIZE_DIGITS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a chunk-size line.
    Size,
    /// Body bytes left in this chunk.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then the empty line.
    Trailers,
    Done,
}

/// A chunked-body decoder. Feed it bytes; it hands out body data and says how much input it
/// took, so the caller keeps the rest (a line cut by the read) for next time.
#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
    /// Bytes read since body data last moved (extensions, trailers, line ends).
    quiet: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            state: State::Size,
            quiet: 0,
        }
    }
}

/// What one call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Input bytes taken; the caller passes the rest again with more bytes behind it.
    pub used: usize,
    /// The last chunk and the trailers are read: the body is over.
    pub done: bool,
}

impl Decoder {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decode from `src`, calling `data` with each piece of body data.
    pub fn decode(&mut self, src: &[u8], mut data: impl FnMut(&[u8])) -> Result<Progress, Reject> {
        let mut pos = 0;
        loop {
            let rest = src.get(pos..).unwrap_or_default();
            match self.state {
                State::Done => {
                    return Ok(Progress {
                        used: pos,
                        done: true,
                    })
                }
                State::Data(left) => {
                    if rest.is_empty() {
                        break;
                    }
                    let take = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    data(rest.get(..take).unwrap_or_default());
                    self.quiet = 0;
                    pos += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                }
                State::DataEnd => {
                    match rest {
                        [b'\r', b'\n', ..] => {}
                        [] | [b'\r'] => break,
                        _ => return Err(Reject::new(400, "chunk data longer than its size")),
                    }
                    pos += 2;
                    self.quiet += 2;
                    self.state = State::Size;
                }
                State::Size => {
                    let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
                        self.bound(rest.len())?;
                        break;
                    };
                    let line = rest.get(..lf).unwrap_or_default();
                    let line = line
                        .strip_suffix(b"\r")
                        .ok_or(Reject::new(400, "bare LF after a chunk size"))?;
                    let size = chunk_size(line)?;
                    pos += lf + 1;
                    self.quiet += lf + 1;
                    self.bound(0)?;
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::Data(size)
                    };
                }
                State::Trailers => {
                    if rest.starts_with(b"\r\n") {
                        pos += 2;
                        self.state = State::Done;
                        continue;
                    }
                    // The section's own bytes only: what follows it is the next request's.
                    let end = rest.windows(4).position(|w| w == b"\r\n\r\n");
                    let section = rest
                        .get(..end.map_or(rest.len(), |e| e + 4))
                        .unwrap_or_default();
                    if has_bare_lf(None, section) || has_bare_cr(section) {
                        return Err(Reject::new(400, "bare CR or LF in the trailer section"));
                    }
                    if end.is_none() {
                        self.bound(rest.len())?;
                        break;
                    }
                    self.bound(section.len())?;
                    trailers(section)?;
                    pos += section.len();
                    self.state = State::Done;
                }
            }
        }
        Ok(Progress {
            used: pos,
            done: false,
        })
    }

    /// Bytes that move no body data are bounded like a head (`pending` not yet taken).
    fn bound(&self, pending: usize) -> Result<(), Reject> {
        if self.quiet + pending > MAX_HEADER_BYTES {
            return Err(Reject::new(
                431,
                "chunk extensions or trailer section too large",
            ));
        }
        Ok(())
    }
}

/// A CR followed by anything but LF (one at the very end may still get its LF).
fn has_bare_cr(data: &[u8]) -> bool {
    data.windows(2)
        .any(|w| matches!(w, [b'\r', next] if *next != b'\n'))
}

/// `1*HEXDIG [ ";" chunk-ext ]`; the extension is skipped, but may hold no control byte.
fn chunk_size(line: &[u8]) -> Result<u64, Reject> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let (hex, ext) = line.split_at(digits);
    if hex.is_empty() {
        return Err(Reject::new(400, "bad chunk size"));
    }
    if !ext.is_empty()
        && (ext.first() != Some(&b';') || ext.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f))
    {
        return Err(Reject::new(400, "bad chunk size"));
    }
    let significant = hex.iter().skip_while(|&&b| b == b'0').count();
    if significant > MAX_SIZE_DIGITS {
        return Err(Reject::new(400, "chunk size overflow"));
    }
    Ok(hex
        .iter()
        .fold(0u64, |n, &b| (n << 4) | u64::from(hex_value(b))))
}

fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b.wrapping_sub(b'A').wrapping_add(10) & 0x0f,
    }
}

/// Trailer fields are dropped, but read: framing in them is refused as in a head.
fn trailers(section: &[u8]) -> Result<(), Reject> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((_, fields))) => {
            for f in fields {
                if f.name.eq_ignore_ascii_case("content-length") {
                    return Err(Reject::new(400, "Content-Length in the trailer section"));
                }
                if f.name.eq_ignore_ascii_case("transfer-encoding") {
                    return Err(Reject::new(501, "Transfer-Encoding in the trailer section"));
                }
            }
            Ok(())
        }
        Err(httparse::Error::TooManyHeaders) => Err(Reject::new(431, "too many trailer fields")),
        _ => Err(Reject::new(400, "malformed trailer section")),
    }
}

/// The chunk header for `len` bytes of data: `{len:x}\r\n` (the data and its CRLF follow).
pub fn chunk_header(len: usize) -> Vec<u8> {
    format!("{len:x}\r\n").into_bytes()
}

/// The last chunk, with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // a test fails by panicking
mod tests {
    use super::*;

    fn decode_all(src: &[u8], step: usize) -> Result<(Vec<u8>, bool), Reject> {
        let mut d = Decoder::default();
        let mut body = Vec::new();
        let mut held: Vec<u8> = Vec::new();
        for piece in src.chunks(step.max(1)) {
            held.extend_from_slice(piece);
            let p = d.decode(&held, |b| body.extend_from_slice(b))?;
            held.drain(..p.used);
            if p.done {
                return Ok((body, true));
            }
        }
        Ok((body, false))
    }

    #[test]
    fn any_split_gives_the_same_body() {
        let src = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n";
        for step in 1..src.len() {
            assert_eq!(
                decode_all(src, step),
                Ok((b"hello0123456789".to_vec(), true)),
                "step {step}"
            );
        }
    }

    #[test]
    fn strict_framing() {
        let bad: &[(&[u8], u16)] = &[
            (b"ffffffffffffffffff5\r\nhello\r\n0\r\n\r\n", 400),
            (b"10000000000000005\r\nhello\r\n0\r\n\r\n", 400),
            (b"-5\r\nhello\r\n0\r\n\r\n", 400),
            (b"0x5\r\nhello\r\n0\r\n\r\n", 400),
            (b"5 \r\nhello\r\n0\r\n\r\n", 400),
            (b"zz\r\nhello\r\n0\r\n\r\n", 400),
            (b"5;ext\nhello\r\n0\r\n\r\n", 400),
            (b"5\r\nhelloXX\r\n0\r\n\r\n", 400),
            (b"5\nhello\n0\n\n", 400),
            (b"5\r\nhello\r\n0\r\nX-T: 1\n\r\n", 400),
            (b"5\r\nhello\r\n0\r\n\r\x00", 400),
            (b"5\r\nhello\r\n0\r\nX-T: 1\r\r\n", 400),
            (b"5\r\nhello\r\n0\r\nContent-Length: 50\r\n\r\n", 400),
            (
                b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n",
                501,
            ),
        ];
        for &(src, want) in bad {
            for step in [1, 3, src.len()] {
                assert_eq!(
                    decode_all(src, step).err().map(|r| r.status),
                    Some(want),
                    "{src:?} step {step}"
                );
            }
        }
        assert_eq!(
            decode_all(b"0000000000000000005\r\nhello\r\n0\r\n\r\n", 4),
            Ok((b"hello".to_vec(), true))
        );
    }

    #[test]
    fn extensions_and_trailers_are_bounded() {
        let ext = [&b"5;"[..], &[b'x'; 70_000], b"\r\nhello\r\n0\r\n\r\n"].concat();
        assert_eq!(decode_all(&ext, 4096).err().map(|r| r.status), Some(431));
        let trailer = [
            &b"5\r\nhello\r\n0\r\nX-T: "[..],
            &[b'x'; 70_000],
            b"\r\n\r\n",
        ]
        .concat();
        assert_eq!(
            decode_all(&trailer, 4096).err().map(|r| r.status),
            Some(431)
        );
    }

    #[test]
    fn chunk_header_is_hex() {
        assert_eq!(chunk_header(255), b"ff\r\n");
        assert_eq!(chunk_header(0), b"0\r\n");
    }
}
