//! What the data path counts per try: per-endpoint counters and latency histograms, each
//! endpoint's try also counted into its cluster's. Counters only grow; the admin port reads
//! a [`Snapshot`] of them, so reading costs nothing per request.
//!
//! The counters are relaxed atomics: a try is counted with a few uncontended adds and no
//! lock, and a snapshot taken while tries are counted sees each counter whole.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds (seconds, inclusive) of the latency buckets, as Prometheus' `le`; one more
/// bucket, `+Inf`, follows the last.
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const N_BUCKETS: usize = LATENCY_BUCKETS.len() + 1;

/// Response classes 1xx to 5xx.
pub const CLASSES: usize = 5;

#[derive(Debug, Default)]
struct Count(AtomicU64);

impl Count {
    fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A latency histogram: counts per bucket and the sum of what was observed.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [Count; N_BUCKETS],
    sum_bits: AtomicU64, // an f64
}

impl Histogram {
    fn observe(&self, seconds: f64) {
        // NaN and negative times (neither comes from a monotonic clock) count as zero.
        let seconds = if seconds > 0.0 { seconds } else { 0.0 };
        self.buckets[bucket(seconds)].add(1);
        // Never fails: the closure always returns Some.
        let _ = self.sum_bits.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) + seconds).to_bits())
        });
    }
}

/// The bucket a latency falls in: the first whose bound is at least it, else `+Inf`.
pub fn bucket(seconds: f64) -> usize {
    LATENCY_BUCKETS.partition_point(|&bound| bound < seconds)
}

/// How one try at an endpoint ended.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Try {
    /// The response's status, 0 when none came (connect failure, reset, timeout).
    pub status: u16,
    /// Seconds from sending the request to the response's first byte (when a response came).
    pub latency: f64,
    /// The response went to the client (not a 5xx dropped for a retry).
    pub forwarded: bool,
    /// The try counts against the endpoint (any outcome but success, and not the client's
    /// own doing).
    pub failed: bool,
}

impl Try {
    fn class(&self) -> Option<usize> {
        match self.status / 100 {
            0 => None,
            c => Some(usize::from(c.min(5)) - 1),
        }
    }
}

/// One endpoint's or one cluster's counters.
#[derive(Debug, Default)]
pub struct Counters {
    tries: Count,
    responses: [Count; CLASSES],
    failures: Count,
    spills: Count,
    latency: Histogram,
}

/// Whose count a try goes into.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Seen {
    /// The endpoint's: every response it gave counts.
    ByEndpoint,
    /// Its cluster's: only a response that reached the client counts as one (every
    /// response's latency counts).
    ByCluster,
}

impl Counters {
    pub fn count(&self, t: &Try, seen: Seen) {
        self.tries.add(1);
        if let Some(class) = t.class() {
            if t.forwarded || seen == Seen::ByEndpoint {
                self.responses[class].add(1);
            }
            self.latency.observe(t.latency);
        }
        if t.failed {
            self.failures.add(1);
        }
    }

    /// A request sent off its home endpoint by bounded loads.
    pub fn spill(&self) {
        self.spills.add(1);
    }

    pub fn snapshot(&self) -> Snapshot {
        let latency_buckets: [u64; N_BUCKETS] =
            std::array::from_fn(|i| self.latency.buckets[i].get());
        Snapshot {
            tries: self.tries.get(),
            responses: std::array::from_fn(|i| self.responses[i].get()),
            failures: self.failures.get(),
            spills: self.spills.get(),
            latency_count: latency_buckets.iter().sum(),
            latency_buckets,
            latency_sum: f64::from_bits(self.latency.sum_bits.load(Relaxed)),
        }
    }
}

/// The counters at one moment. `latency_buckets` are per bucket, not cumulative.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub tries: u64,
    pub responses: [u64; CLASSES],
    pub failures: u64,
    pub spills: u64,
    pub latency_buckets: [u64; N_BUCKETS],
    pub latency_sum: f64,
    pub latency_count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bounds_are_inclusive() {
        assert_eq!(bucket(0.0), 0);
        assert_eq!(bucket(0.001), 0);
        assert_eq!(bucket(0.0011), 1);
        assert_eq!(bucket(10.0), 12);
        assert_eq!(bucket(10.5), 13);
        assert_eq!(bucket(f64::INFINITY), 13);
    }

    #[test]
    fn endpoint_counts_every_response_cluster_only_forwarded_ones() {
        let ep = Counters::default();
        let cluster = Counters::default();
        let dropped = Try {
            status: 503,
            latency: 0.002,
            forwarded: false,
            failed: true,
        };
        let served = Try {
            status: 200,
            latency: 0.02,
            forwarded: true,
            failed: false,
        };
        let refused = Try {
            status: 0,
            latency: 0.0,
            forwarded: false,
            failed: true,
        };
        for t in [dropped, served, refused] {
            ep.count(&t, Seen::ByEndpoint);
            cluster.count(&t, Seen::ByCluster);
        }
        let e = ep.snapshot();
        assert_eq!(e.tries, 3);
        assert_eq!(e.responses, [0, 1, 0, 0, 1]);
        assert_eq!(e.failures, 2);
        assert_eq!(e.latency_count, 2);
        assert_eq!(e.latency_buckets[1], 1);
        assert_eq!(e.latency_buckets[4], 1);
        assert!((e.latency_sum - 0.022).abs() < 1e-12);
        let c = cluster.snapshot();
        assert_eq!(c.tries, 3);
        assert_eq!(c.failures, 2);
        assert_eq!(c.responses, [0, 1, 0, 0, 0]);
        assert_eq!(c.latency_count, 2);
    }

    #[test]
    fn odd_statuses_and_times_are_counted_not_lost() {
        let c = Counters::default();
        let odd = Try {
            status: 999,
            latency: f64::NAN,
            forwarded: true,
            failed: false,
        };
        c.count(&odd, Seen::ByCluster);
        c.count(
            &Try {
                status: 101,
                latency: -1.0,
                ..odd
            },
            Seen::ByCluster,
        );
        let s = c.snapshot();
        assert_eq!(s.responses, [1, 0, 0, 0, 1]);
        assert_eq!(s.latency_buckets[0], 2);
        assert_eq!(s.latency_sum, 0.0);
    }

    #[test]
    fn spills_count() {
        let c = Counters::default();
        c.spill();
        c.spill();
        assert_eq!(c.snapshot().spills, 2);
    }
}
