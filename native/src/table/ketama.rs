//! A ketama ring (libketama, nginx `hash … consistent`, uhashring): MD5 points on a 32-bit
//! circle, a **fixed number of points per unit of weight** (160 per [`WEIGHT_UNIT`]). Sizing
//! points by total ring size / N (Envoy) moves extra keys when N changes; a fixed count per
//! weight moves exactly the leaving endpoint's keys.

use std::collections::HashMap;

use md5::{Digest, Md5};

use super::{counts, walk};

/// libketama: 40 names × 4 points from each MD5 = 160 points per unit of weight.
pub const NAMES_PER_UNIT: u64 = 40;
/// The registry's default weight: one unit.
pub const WEIGHT_UNIT: u64 = 100;

/// MD5 names (4 points each) for a weight: 40 per unit, rounded, at least one.
pub fn names_for(weight: u32) -> u64 {
    // 40·w/100 = 2w/5 is never exactly half an integer, so rounding has no tie to break.
    ((NAMES_PER_UNIT * u64::from(weight) + WEIGHT_UNIT / 2) / WEIGHT_UNIT).max(1)
}

/// Sorted 32-bit points, each owned by an endpoint index.
#[derive(Debug, Clone)]
pub struct Ring {
    points: Vec<u32>,
    owners: Vec<u32>,
    n_endpoints: usize,
}

impl Ring {
    pub fn build<K: AsRef<[u8]>>(keys: &[K], weights: &[u32]) -> Result<Self, &'static str> {
        if keys.len() != weights.len() {
            return Err("one weight per endpoint");
        }
        if keys.len() >= super::EMPTY as usize {
            return Err("too many endpoints");
        }
        let mut owner_of: HashMap<u32, u32> = HashMap::new();
        let mut name = Vec::new();
        for (idx, (key, &weight)) in keys.iter().zip(weights).enumerate() {
            for w in 0..names_for(weight) {
                name.clear();
                name.extend_from_slice(key.as_ref());
                name.push(b'-');
                name.extend_from_slice(w.to_string().as_bytes());
                let d = Md5::digest(&name);
                for p in d.chunks_exact(4) {
                    // Each 16-byte digest gives four little-endian points. On a collision the
                    // later endpoint wins, as in uhashring.
                    let point = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
                    owner_of.insert(point, idx as u32);
                }
            }
        }
        let mut pairs: Vec<(u32, u32)> = owner_of.into_iter().collect();
        pairs.sort_unstable();
        let (points, owners) = pairs.into_iter().unzip();
        Ok(Ring {
            points,
            owners,
            n_endpoints: keys.len(),
        })
    }

    pub fn n_points(&self) -> usize {
        self.points.len()
    }

    pub fn n_endpoints(&self) -> usize {
        self.n_endpoints
    }

    /// The first point at or after the hash (strictly after an equal one, as `bisect_right`),
    /// wrapping to the first.
    fn index(&self, key_hash: u32) -> usize {
        let i = self.points.partition_point(|&p| p <= key_hash);
        if i == self.points.len() {
            0
        } else {
            i
        }
    }

    pub fn lookup(&self, key_hash: u32) -> Option<u32> {
        self.owners.get(self.index(key_hash)).copied()
    }

    pub fn candidates(&self, key_hash: u32, limit: usize) -> Vec<u32> {
        walk(&self.owners, self.index(key_hash), self.n_endpoints, limit)
    }

    pub fn counts(&self) -> Vec<u32> {
        counts(&self.owners, self.n_endpoints)
    }

    pub fn points(&self) -> &[u32] {
        &self.points
    }

    pub fn owners(&self) -> &[u32] {
        &self.owners
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_per_weight() {
        assert_eq!(names_for(100), 40);
        assert_eq!(names_for(1), 1);
        assert_eq!(names_for(250), 100);
        assert_eq!(names_for(3), 1);
        assert_eq!(names_for(4), 2);
        let r = Ring::build(&["a:1", "b:1"], &[100, 100]).expect("valid");
        assert_eq!(r.n_points(), 320);
        assert_eq!(r.counts(), vec![160, 160]);
    }

    #[test]
    fn lookup_is_the_next_point_and_wraps() {
        let r = Ring::build(&["a:1", "b:1", "c:1"], &[100, 100, 100]).expect("valid");
        let pts = r.points();
        let first = r.owners()[0];
        assert_eq!(r.lookup(u32::MAX), Some(first));
        assert_eq!(r.lookup(pts[5]), Some(r.owners()[6]));
        assert_eq!(r.lookup(pts[5] - 1), Some(r.owners()[5]));
        assert_eq!(r.candidates(pts[5], 3)[0], r.owners()[6]);
    }

    #[test]
    fn an_empty_ring_routes_nowhere() {
        let r = Ring::build::<&str>(&[], &[]).expect("valid");
        assert_eq!(r.lookup(1), None);
        assert!(r.candidates(1, 4).is_empty());
    }
}
