//! The DNS fast path: a query answered from the rendered reply table with no parsing beyond
//! the header and the question's bytes.
//!
//! Python renders every reply of a registry snapshot once (sidecar/dns_answer.py) and hands
//! the ones that can be sent as they are to a [`Table`]. Per query, [`answer`] checks that
//! the query is plain (QR=0, opcode QUERY, one question, no answer or authority records,
//! nothing in the additional section but maybe one well-formed OPT), looks the lower-cased
//! question up, and writes the reply: the query's ID, the entry's flags (RD echoed) and
//! counts, the question exactly as received (the client's letter case, RFC 4343 §4.1), the
//! rendered records and, for an EDNS query, our OPT with the client's DO bit echoed. A reply
//! that would not fit the client's size limit is not answered here: the general path in
//! Python cuts it and sets TC, and answers every query this one declines (misses, names to
//! forward, malformed packets, other opcodes, EDNS versions other than 0).
//!
//! Declining is always safe; the one rule is that what this module sends is byte for byte
//! what the general path would send for the same query (tests/unit/test_dns_native.py).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

const HEADER: usize = 12;
/// RFC 1035 §4.2.1: a reply to a query without EDNS0 fits in 512 bytes.
const CLASSIC_UDP_LIMIT: usize = 512;
/// DNS Flag Day 2020: the largest UDP reply we send, whatever the client offers.
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// The two-byte length prefix of DNS over TCP.
const MAX_TCP_MESSAGE: usize = 65535;
/// The longest question: a 255-byte wire name, its type and class.
const MAX_QUESTION: usize = 255 + 4;

const QR: u16 = 0x8000;
const AA: u16 = 0x0400;
const RD: u16 = 0x0100;
const RA: u16 = 0x0080;
const TYPE_OPT: u16 = 41;
/// RFC 3225: the DO bit, in the first byte of the OPT record's flags.
const DO_BIT: u8 = 0x80;
/// Our OPT record: root owner, type OPT, our UDP size, extended rcode 0, version 0, flags,
/// no options.
pub const OPT_SIZE: usize = 11;

fn opt(do_bit: bool) -> [u8; OPT_SIZE] {
    let [t0, t1] = TYPE_OPT.to_be_bytes();
    let [p0, p1] = MAX_UDP_PAYLOAD.to_be_bytes();
    let flags = if do_bit { DO_BIT } else { 0 };
    [0, t0, t1, p0, p1, 0, 0, flags, 0, 0, 0]
}

/// One rendered reply: the bytes after the question in each of its record orders, and the
/// header (flags and counts) for each of RD=0/1 without and with OPT.
#[derive(Debug)]
pub struct FastEntry {
    rotations: Box<[Box<[u8]>]>,
    next: AtomicUsize,
    /// The longest rotation (they are all one length: the same records in other orders).
    len: usize,
    /// Bytes 2..12 of the reply header: flags, then QD, AN, NS, AR counts.
    heads: [[u8; 10]; 4],
}

impl FastEntry {
    /// `counts`: (answer, authority, additional) of the rendered records; `ra`: whether
    /// replies say recursion is available. An entry with no rotation answers nothing.
    pub fn new(rcode: u16, counts: (u16, u16, u16), rotations: Vec<Vec<u8>>, ra: bool) -> Self {
        let (an, ns, ar) = counts;
        let mut heads = [[0; 10]; 4];
        for (i, head) in heads.iter_mut().enumerate() {
            let with_opt = i >= 2;
            let rd = if i % 2 == 1 { RD } else { 0 };
            let flags = QR | AA | if ra { RA } else { 0 } | rd | (rcode & 0x000f);
            let words = [flags, 1, an, ns, ar.saturating_add(u16::from(with_opt))];
            for (pair, word) in head.chunks_exact_mut(2).zip(words) {
                pair.copy_from_slice(&word.to_be_bytes());
            }
        }
        let len = rotations.iter().map(Vec::len).max().unwrap_or(0);
        FastEntry {
            rotations: rotations.into_iter().map(Vec::into_boxed_slice).collect(),
            next: AtomicUsize::new(0),
            len,
            heads,
        }
    }

    /// The next record order, round robin: stub resolvers mostly take the first record.
    fn rest(&self) -> Option<&[u8]> {
        let n = self.rotations.len();
        if n == 1 {
            return self.rotations.first().map(|r| &r[..]);
        }
        let i = self.next.fetch_add(1, Relaxed) % n.max(1);
        self.rotations.get(i).map(|r| &r[..])
    }
}

/// Every fast reply of one snapshot, keyed by lower-cased wire name + type + class. Built
/// whole and never changed while it answers: a new snapshot makes a new table.
#[derive(Debug, Default)]
pub struct Table {
    entries: HashMap<Box<[u8]>, FastEntry>,
}

impl Table {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, key: Vec<u8>, entry: FastEntry) {
        self.entries.insert(key.into_boxed_slice(), entry);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn get(&self, question: &[u8]) -> Option<&FastEntry> {
        if question.len() > MAX_QUESTION {
            return None;
        }
        let mut key = [0u8; MAX_QUESTION];
        let key = key.get_mut(..question.len())?;
        for (k, q) in key.iter_mut().zip(question) {
            *k = q.to_ascii_lowercase();
        }
        self.entries.get(&key[..])
    }
}

fn byte(data: &[u8], i: usize) -> Option<u8> {
    data.get(i).copied()
}

fn word(data: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([
        byte(data, i)?,
        byte(data, i.checked_add(1)?)?,
    ]))
}

/// Writes the reply to `query` into `out` (cleared first) and returns the question's type,
/// or returns None when the general path must answer it. `udp`: the reply must fit the
/// client's UDP size (512 without EDNS0; with it, what the client offers between 512 and
/// 1232).
pub fn answer(table: &Table, query: &[u8], udp: bool, out: &mut Vec<u8>) -> Option<u16> {
    let answered = reply(table, query, udp, out);
    if answered.is_none() {
        out.clear();
    }
    answered
}

fn reply(table: &Table, query: &[u8], udp: bool, out: &mut Vec<u8>) -> Option<u16> {
    out.clear();
    // One question, no answer or authority record, QR=0, opcode QUERY.
    if query.len() <= 16 || byte(query, 2)? & 0xf8 != 0 || query.get(4..10)? != [0, 1, 0, 0, 0, 0] {
        return None;
    }
    // The question ends four bytes after the first zero byte: a hit in the table means the
    // bytes are one of our own wire names, which hold no zero byte but their last.
    let zero = query.get(HEADER..)?.iter().position(|&b| b == 0)?;
    let end = HEADER + zero + 5;
    let question = query.get(HEADER..end)?;
    let entry = table.get(question)?;
    let rd = usize::from(byte(query, 2)? & 1);
    let rest_len = end + entry.len;
    let (head, opt) = match word(query, 10)? {
        0 => {
            if udp && rest_len > CLASSIC_UDP_LIMIT {
                return None;
            }
            (entry.heads.get(rd)?, None)
        }
        1 => {
            // One OPT record (root owner, type 41), version 0, its RDATA all there.
            if query.get(end..end + 3)? != [0, 0, TYPE_OPT as u8] || byte(query, end + 6)? != 0 {
                return None;
            }
            let rdlen = usize::from(word(query, end + 9)?);
            if query.len() < end + OPT_SIZE + rdlen {
                return None;
            }
            let limit = if udp {
                usize::from(word(query, end + 3)?)
                    .clamp(CLASSIC_UDP_LIMIT, usize::from(MAX_UDP_PAYLOAD))
            } else {
                MAX_TCP_MESSAGE
            };
            if rest_len + OPT_SIZE > limit {
                return None;
            }
            let do_bit = byte(query, end + 7)? & DO_BIT != 0;
            (entry.heads.get(2 + rd)?, Some(opt(do_bit)))
        }
        _ => return None,
    };
    let rest = entry.rest()?;
    out.reserve(end + rest.len() + OPT_SIZE);
    out.extend_from_slice(query.get(..2)?);
    out.extend_from_slice(head);
    out.extend_from_slice(question);
    out.extend_from_slice(rest);
    if let Some(opt) = opt {
        out.extend_from_slice(&opt);
    }
    word(question, question.len() - 4)
}

#[cfg(test)]
mod tests;
