//! What both directions share: the field lines a head forwards, the tokens of `Connection`,
//! and the bytes a read leaves unfinished for the next one.
#![deny(clippy::indexing_slicing)]

use super::has_bare_lf;

/// What a stream hands out, in order: heads (a request's or a response's), body data, ends.
pub trait Sink<H> {
    fn head(&mut self, head: Box<H>);
    fn body(&mut self, data: &[u8]);
    fn end(&mut self);
}

/// One field line in [`Lines`]: where it lies, and where its name ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    pub start: usize,
    pub name_end: usize,
    pub end: usize,
}

/// Field lines to forward, as they will be sent (`Name: value\r\n` each), in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lines {
    pub bytes: Vec<u8>,
    pub spans: Vec<Line>,
}

impl Lines {
    pub fn with_capacity(bytes: usize, lines: usize) -> Self {
        Lines {
            bytes: Vec::with_capacity(bytes),
            spans: Vec::with_capacity(lines),
        }
    }

    pub fn push(&mut self, name: &[u8], value: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(name);
        let name_end = self.bytes.len();
        self.bytes.extend_from_slice(b": ");
        self.bytes.extend_from_slice(value);
        self.bytes.extend_from_slice(b"\r\n");
        self.spans.push(Line {
            start,
            name_end,
            end: self.bytes.len(),
        });
    }

    pub fn name(&self, line: &Line) -> &[u8] {
        self.bytes
            .get(line.start..line.name_end)
            .unwrap_or_default()
    }

    /// Write the lines to `out`, but those whose name is one of `names` (any case).
    pub fn write_without(&self, out: &mut Vec<u8>, names: &[&[u8]]) {
        if names.is_empty() {
            out.extend_from_slice(&self.bytes);
            return;
        }
        for span in &self.spans {
            if !names
                .iter()
                .any(|n| self.name(span).eq_ignore_ascii_case(n))
            {
                out.extend_from_slice(self.bytes.get(span.start..span.end).unwrap_or_default());
            }
        }
    }

    /// Remove the lines named `name`.
    pub fn remove(&mut self, name: &[u8]) {
        let mut kept = Lines::with_capacity(self.bytes.len(), self.spans.len());
        self.write_without(&mut kept.bytes, &[name]);
        for span in &self.spans {
            if !self.name(span).eq_ignore_ascii_case(name) {
                let start = kept.spans.last().map_or(0, |l| l.end);
                kept.spans.push(Line {
                    start,
                    name_end: start + (span.name_end - span.start),
                    end: start + (span.end - span.start),
                });
            }
        }
        *self = kept;
    }
}

/// The tokens of a `Connection` value, lower-cased, empty ones skipped.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    value
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
}

/// The fields a `Connection` header names for removal (RFC 9110 §7.6.1): its tokens but the
/// plain ones, and but `keep` (fields the proxy never lets a peer remove).
pub fn named<'a>(connection: &'a [Vec<u8>], keep: &[&[u8]]) -> Vec<&'a [u8]> {
    connection
        .iter()
        .map(Vec::as_slice)
        .filter(|t| !matches!(*t, b"close" | b"keep-alive" | b"upgrade") && !keep.contains(t))
        .collect()
}

/// A head this short is parsed on every read; a longer one when a line may have ended.
const EAGER_PARSE_BYTES: usize = 1024;

/// The step both streams take while a head arrives. `rest` holds the bytes from the head's
/// start, those from `fresh_from` on not looked at before. httparse reads a head from its
/// start each time, so it is asked again only when a line may have ended (a CR or LF came), or
/// while the head is short: garbage is refused as it arrives, and a head dripped byte by byte
/// costs a few scans of itself. A bare LF in the head's own bytes (never the body's behind
/// it) is refused as `bare_lf`. `parse` gives the head and its length, or None for more bytes.
pub fn read_head<T, E>(
    rest: &[u8],
    fresh_from: usize,
    parse: impl FnOnce(&[u8]) -> Result<Option<(T, usize)>, E>,
    bare_lf: E,
) -> Result<Option<(T, usize)>, E> {
    let fresh = rest.get(fresh_from..).unwrap_or_default();
    let ended = fresh.contains(&b'\n') || fresh.contains(&b'\r');
    let parsed = if ended || rest.len() <= EAGER_PARSE_BYTES {
        parse(rest)?
    } else {
        None
    };
    let head_end = parsed.as_ref().map_or(rest.len(), |(_, n)| *n);
    let prev = fresh_from.checked_sub(1).and_then(|i| rest.get(i)).copied();
    let own = fresh
        .get(..head_end.saturating_sub(fresh_from))
        .unwrap_or_default();
    if has_bare_lf(prev, own) {
        return Err(bare_lf);
    }
    Ok(parsed)
}

/// Run a reader over the bytes held from earlier reads followed by `data`; what it leaves
/// unused is held for the next read. `run(src, before)` gets the bytes and how many of them
/// were held, and returns an offset in `src` (the start of an upgraded stream) and how many
/// bytes it used; the offset comes back relative to `data`.
pub fn with_held<E>(
    held: &mut Vec<u8>,
    data: &[u8],
    run: impl FnOnce(&[u8], usize) -> Result<(Option<usize>, usize), E>,
) -> Result<Option<usize>, E> {
    let before = held.len();
    if before == 0 {
        let (at, used) = run(data, 0)?;
        held.extend_from_slice(data.get(used..).unwrap_or_default());
        return Ok(at);
    }
    let mut src = std::mem::take(held);
    src.extend_from_slice(data);
    let (at, used) = run(&src, before)?;
    src.drain(..used.min(src.len()));
    *held = src; // keeps its allocation
    Ok(at.map(|at| at.saturating_sub(before)))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // a test fails by panicking
mod tests {
    use super::*;

    #[test]
    fn lines_write_and_remove() {
        let mut l = Lines::default();
        l.push(b"Host", b"a");
        l.push(b"X-Hop", b"1");
        l.push(b"X-A", b"2");
        let mut out = Vec::new();
        l.write_without(&mut out, &[b"x-hop"]);
        assert_eq!(out, b"Host: a\r\nX-A: 2\r\n");
        l.remove(b"HOST");
        assert_eq!(l.bytes, b"X-Hop: 1\r\nX-A: 2\r\n");
        assert_eq!(l.name(&l.spans[1]), b"X-A");
        assert_eq!(
            named(
                &[b"close".to_vec(), b"x-hop".to_vec(), b"host".to_vec()],
                &[b"host"]
            ),
            vec![&b"x-hop"[..]]
        );
    }

    #[test]
    fn held_bytes_carry_over() {
        let mut held = Vec::new();
        // A reader that uses all but the last byte, and names an offset of 3.
        let run = |src: &[u8], _before: usize| -> Result<(Option<usize>, usize), ()> {
            Ok((Some(3), src.len() - 1))
        };
        assert_eq!(with_held(&mut held, b"abcd", run), Ok(Some(3)));
        assert_eq!(held, b"d");
        assert_eq!(with_held(&mut held, b"efg", run), Ok(Some(2)));
        assert_eq!(held, b"g");
    }
}
