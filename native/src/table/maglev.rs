//! Maglev (Eisenbud et al., NSDI 2016) with Envoy's weighted fill: a lookup is one index into
//! a table of `size` entries. The size must be prime; 65537 is Envoy's default and balances
//! within ~1-4 % up to ~100 endpoints.
//!
//! The table is the same, entry for entry, as the one mesh's first (Python) implementation
//! built: an endpoint's permutation comes from BLAKE2b-128 of its `host:port` key, so every LB
//! that sees the same set builds the same table.

use blake2::digest::consts::U16;
use blake2::{Blake2b, Digest};

use super::{counts, walk, EMPTY};

/// Envoy's default table size.
pub const DEFAULT_SIZE: u32 = 65_537;
/// From this many free slots on, the fill walks sorted free lists instead of probing
/// (see [`populate`]).
const TAIL_MIN_SLOTS: usize = 64;
/// The largest table size accepted: `(size - 1)²` must fit in a `u64` product.
pub const MAX_SIZE: u32 = u32::MAX - 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildError {
    /// The size is not a prime (or is out of range): permutations would not visit every slot.
    SizeNotPrime(u64),
    /// More endpoints than a table entry can name, or weights and keys of different lengths.
    BadEndpoints(&'static str),
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildError::SizeNotPrime(n) => write!(f, "Maglev table size must be prime, got {n}"),
            BuildError::BadEndpoints(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for BuildError {}

pub fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut i = 2u64;
    while i * i <= n {
        if n.is_multiple_of(i) {
            return false;
        }
        i += 1;
    }
    true
}

/// A built Maglev table: slot → endpoint index.
#[derive(Debug, Clone)]
pub struct Maglev {
    table: Vec<u32>,
    n_endpoints: usize,
}

impl Maglev {
    /// Build the table for endpoints named by `keys` (their `host:port`) with `weights`.
    pub fn build<K: AsRef<[u8]>>(
        keys: &[K],
        weights: &[u32],
        size: u32,
    ) -> Result<Self, BuildError> {
        if size > MAX_SIZE || !is_prime(u64::from(size)) {
            return Err(BuildError::SizeNotPrime(u64::from(size)));
        }
        if keys.len() != weights.len() {
            return Err(BuildError::BadEndpoints("one weight per endpoint"));
        }
        if keys.len() >= EMPTY as usize {
            return Err(BuildError::BadEndpoints("too many endpoints"));
        }
        if weights.contains(&0) {
            return Err(BuildError::BadEndpoints("weights must be at least 1"));
        }
        let size = size as usize;
        let mut table = vec![EMPTY; size];
        if !keys.is_empty() {
            let (offsets, skips) = permutations(keys, size as u64);
            populate(&mut table, &offsets, &skips, weights);
        }
        Ok(Maglev {
            table,
            n_endpoints: keys.len(),
        })
    }

    pub fn size(&self) -> usize {
        self.table.len()
    }

    pub fn n_endpoints(&self) -> usize {
        self.n_endpoints
    }

    /// The home endpoint's index for a key hash, or `None` in a table of no endpoints.
    pub fn lookup(&self, key_hash: u32) -> Option<u32> {
        let slot = key_hash as usize % self.table.len();
        self.table.get(slot).copied().filter(|&i| i != EMPTY)
    }

    /// The home endpoint, then the endpoints to try next, in table order, distinct.
    pub fn candidates(&self, key_hash: u32, limit: usize) -> Vec<u32> {
        walk(
            &self.table,
            key_hash as usize % self.table.len(),
            self.n_endpoints,
            limit,
        )
    }

    /// Slots per endpoint.
    pub fn counts(&self) -> Vec<u32> {
        counts(&self.table, self.n_endpoints)
    }

    pub fn entries(&self) -> &[u32] {
        &self.table
    }
}

/// Each endpoint's permutation of the table: slot `offset + j·skip (mod size)` is its j-th choice.
fn permutations<K: AsRef<[u8]>>(keys: &[K], size: u64) -> (Vec<usize>, Vec<usize>) {
    keys.iter()
        .map(|key| {
            let d = Blake2b::<U16>::digest(key.as_ref());
            let (lo, hi) = d.split_at(8);
            let lo = u64::from_le_bytes(lo.try_into().unwrap_or_default());
            let hi = u64::from_le_bytes(hi.try_into().unwrap_or_default());
            ((lo % size) as usize, (hi % (size - 1) + 1) as usize)
        })
        .unzip()
}

/// The order in which endpoints take slots. Envoy's weighted fill: an endpoint of weight w
/// takes a slot on every (max_w / w)-th round, so its share of the table is proportional to w;
/// with equal weights, plain rounds.
struct Turns<'a> {
    weights: &'a [u32],
    max_w: u64,
    equal: bool,
    target: Vec<u64>,
    iteration: u64,
    next: usize,
}

impl<'a> Turns<'a> {
    fn new(weights: &'a [u32]) -> Self {
        let max_w = weights.iter().copied().max().unwrap_or(1);
        let min_w = weights.iter().copied().min().unwrap_or(1);
        Turns {
            weights,
            max_w: u64::from(max_w),
            equal: min_w == max_w,
            target: vec![0; weights.len()],
            iteration: 1,
            next: 0,
        }
    }
}

impl Iterator for Turns<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let n = self.weights.len();
        if n == 0 {
            return None;
        }
        loop {
            let (i, round) = (self.next, self.iteration);
            self.next += 1;
            if self.next == n {
                self.next = 0;
                self.iteration += 1;
            }
            if self.equal {
                return Some(i);
            }
            // An endpoint whose weight × round is still behind its target sits this round out.
            if round * u64::from(self.weights[i]) < self.target[i] {
                continue;
            }
            self.target[i] += self.max_w;
            return Some(i);
        }
    }
}

/// Modular inverse of `a` modulo the prime `p` (Fermat: a^(p-2)).
fn inverse(a: u64, p: u64) -> u64 {
    let (mut base, mut exp, mut acc) = (a % p, p - 2, 1u64);
    while exp > 0 {
        if exp & 1 == 1 {
            acc = acc * base % p;
        }
        base = base * base % p;
        exp >>= 1;
    }
    acc
}

/// Maglev's populate step: in turn, each endpoint takes the first slot not yet taken in its
/// own permutation of the table.
///
/// Done naively the last slots cost the most: with k slots left, an endpoint probes size/k
/// taken slots on average before it finds one, and the last ~size/4n fills make up most of the
/// probes of the whole build. So for those, each endpoint's permutation is cut to the slots
/// still free, sorted by their place in it (the place of slot e is (e - offset)·skip⁻¹ mod
/// size), and walked from there: the same slots in the same order as probing. The table is
/// identical.
fn populate(table: &mut [u32], offsets: &[usize], skips: &[usize], weights: &[u32]) {
    let size = table.len();
    let n = offsets.len();
    if n == 1 {
        table.fill(0); // a permutation visits every slot once
        return;
    }
    let mut turns = Turns::new(weights);
    let mut pos = offsets.to_vec(); // the slot each endpoint looks at next
    let mut filled = 0usize;
    let tail = size.saturating_sub(TAIL_MIN_SLOTS.max(size / (4 * n)));
    for i in turns.by_ref() {
        let skip = skips[i];
        let mut c = pos[i];
        while table[c] != EMPTY {
            c += skip;
            if c >= size {
                c -= size;
            }
        }
        table[c] = i as u32;
        c += skip;
        pos[i] = if c >= size { c - size } else { c };
        filled += 1;
        if filled >= tail {
            break;
        }
    }
    if filled == size {
        return;
    }
    let free: Vec<usize> = (0..size).filter(|&c| table[c] == EMPTY).collect();
    let p = size as u64;
    let walks: Vec<Vec<usize>> = (0..n)
        .map(|i| {
            let (inv, off) = (inverse(skips[i] as u64, p), offsets[i] as u64);
            let mut walk: Vec<(u64, usize)> = free
                .iter()
                .map(|&e| (((e as u64 + p - off) % p) * inv % p, e))
                .collect();
            walk.sort_unstable();
            walk.into_iter().map(|(_, e)| e).collect()
        })
        .collect();
    let mut at = vec![0usize; n];
    let mut left = free.len();
    for i in turns {
        let walk = &walks[i];
        let mut k = at[i];
        while table[walk[k]] != EMPTY {
            k += 1;
        }
        table[walk[k]] = i as u32;
        at[i] = k + 1;
        left -= 1;
        if left == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paper's loop, probing to the end: the fill above must give the same table.
    fn reference(keys: &[String], weights: &[u32], size: u32) -> Vec<u32> {
        let size = size as usize;
        let (offsets, skips) = permutations(keys, size as u64);
        let mut table = vec![EMPTY; size];
        let mut pos = offsets.clone();
        let mut left = size;
        for i in Turns::new(weights) {
            while table[pos[i]] != EMPTY {
                pos[i] = (pos[i] + skips[i]) % size;
            }
            table[pos[i]] = i as u32;
            left -= 1;
            if left == 0 {
                break;
            }
        }
        table
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:8080", i / 250, i % 250 + 1))
            .collect()
    }

    #[test]
    fn the_walked_tail_gives_the_paper_table() {
        for (n, size) in [(2, 251), (3, 65_537), (7, 1009), (50, 4099), (100, 65_537)] {
            let k = keys(n);
            let equal = vec![100; n];
            let weighted: Vec<u32> = (0..n as u32).map(|i| 1 + i * 37 % 300).collect();
            for w in [&equal, &weighted] {
                let t = Maglev::build(&k, w, size).expect("valid");
                assert_eq!(t.entries(), reference(&k, w, size), "n={n} size={size}");
            }
        }
    }

    #[test]
    fn weights_share_the_table() {
        let t = Maglev::build(&keys(3), &[100, 200, 100], 65_537).expect("valid");
        let c = t.counts();
        assert_eq!(c.iter().sum::<u32>(), 65_537);
        let ratio = f64::from(c[1]) / f64::from(c[0]);
        assert!((ratio - 2.0).abs() < 0.01, "{c:?}");
    }

    #[test]
    fn a_table_of_one_or_none() {
        let one = Maglev::build(&keys(1), &[5], 251).expect("valid");
        assert!(one.entries().iter().all(|&i| i == 0));
        let none = Maglev::build::<String>(&[], &[], 251).expect("valid");
        assert_eq!(none.lookup(7), None);
        assert!(none.candidates(7, 3).is_empty());
    }

    #[test]
    fn bad_sizes_and_sets_are_errors() {
        assert_eq!(
            Maglev::build(&keys(2), &[1, 1], 65_536).err(),
            Some(BuildError::SizeNotPrime(65_536))
        );
        assert!(Maglev::build(&keys(2), &[1, 1], 1).is_err());
        assert!(Maglev::build(&keys(2), &[1], 251).is_err());
        assert!(Maglev::build(&keys(2), &[1, 0], 251).is_err());
    }

    #[test]
    fn candidates_start_at_home_and_are_distinct() {
        let t = Maglev::build(&keys(10), &[100; 10], 65_537).expect("valid");
        for h in [0u32, 1, 65_536, u32::MAX, 123_456_789] {
            let c = t.candidates(h, 10);
            assert_eq!(Some(c[0]), t.lookup(h));
            let mut sorted = c.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 10);
        }
    }
}
