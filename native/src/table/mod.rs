//! Consistent-hash tables: Maglev and a ketama-compatible ring. Built once, never changed,
//! swapped whole by the caller.
//!
//! Both map a 32-bit key hash to an endpoint index, and both give the ordered list of other
//! endpoints to try next (retries, ejected hosts, bounded-load spill), so a key whose home is
//! unusable moves to the same place from every LB.

pub mod ketama;
pub mod maglev;

use md5::{Digest, Md5};

/// The 32-bit ketama hash of a key: MD5, first 4 bytes little-endian (libketama, uhashring).
pub fn key_hash(data: &[u8]) -> u32 {
    let d = Md5::digest(data);
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// Distinct endpoint indexes met walking `seq` forward (wrapping) from `start`, at most
/// `limit` of them. Entries equal to `EMPTY` are skipped.
pub(crate) fn walk(seq: &[u32], start: usize, n_endpoints: usize, limit: usize) -> Vec<u32> {
    let want = limit.min(n_endpoints);
    let mut out = Vec::with_capacity(want);
    if want == 0 || seq.is_empty() {
        return out;
    }
    // A short list is searched in place; a long one (the admin port's whole order) keeps a mark
    // per endpoint.
    let mut seen = if want > 16 {
        vec![false; n_endpoints]
    } else {
        Vec::new()
    };
    let (tail, head) = seq.split_at(start.min(seq.len()));
    for &idx in head.iter().chain(tail) {
        if idx == EMPTY {
            continue;
        }
        let fresh = match seen.get_mut(idx as usize) {
            Some(mark) => !std::mem::replace(mark, true),
            None => !out.contains(&idx),
        };
        if fresh {
            out.push(idx);
            if out.len() >= want {
                break;
            }
        }
    }
    out
}

/// A slot or point that no endpoint owns (only in a table of no endpoints).
pub const EMPTY: u32 = u32::MAX;

/// Entries per endpoint (Maglev slots or ring points), as Envoy reports them.
pub(crate) fn counts(owners: &[u32], n_endpoints: usize) -> Vec<u32> {
    let mut counts = vec![0u32; n_endpoints];
    for &i in owners {
        if let Some(c) = counts.get_mut(i as usize) {
            *c += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hash_is_ketama() {
        // md5("alice") = 6384e2b2184bcbf58eccf10ca7a6563c; first four bytes little-endian.
        assert_eq!(key_hash(b"alice"), 0xb2e2_8463);
        assert_eq!(key_hash(b""), u32::from_le_bytes([0xd4, 0x1d, 0x8c, 0xd9]));
    }

    #[test]
    fn walk_wraps_and_keeps_first_sightings() {
        let seq = [2, 2, EMPTY, 0, 2, 1];
        assert_eq!(walk(&seq, 4, 3, 8), vec![2, 1, 0]);
        assert_eq!(walk(&seq, 4, 3, 2), vec![2, 1]);
        assert_eq!(walk(&seq, 0, 3, 1), vec![2]);
        assert_eq!(walk(&[], 0, 3, 8), Vec::<u32>::new());
        let long: Vec<u32> = (0..40).rev().collect();
        assert_eq!(walk(&long, 39, 40, 40)[..3], [0, 39, 38]);
    }
}
