//! The Python face of [`crate::stats`]: one `Counters` object per endpoint and per cluster.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::stats::{self, Seen, Try};

/// An endpoint's or a cluster's counters. An endpoint's are made with its cluster's as
/// `parent`: one `record` counts the try in both.
#[pyclass(frozen, module = "mesh_native", name = "Counters")]
pub struct Counters {
    inner: stats::Counters,
    parent: Option<Py<Counters>>,
}

#[pymethods]
impl Counters {
    #[new]
    #[pyo3(signature = (parent = None))]
    fn new(parent: Option<Py<Counters>>) -> Self {
        Counters {
            inner: stats::Counters::default(),
            parent,
        }
    }

    /// One try ended: `status` 0 when no response came (then `latency` is not used).
    fn record(&self, py: Python<'_>, status: u16, latency: f64, forwarded: bool, failed: bool) {
        let t = Try {
            status,
            latency,
            forwarded,
            failed,
        };
        self.inner.count(&t, Seen::ByEndpoint);
        if let Some(parent) = &self.parent {
            parent.bind(py).get().inner.count(&t, Seen::ByCluster);
        }
    }

    /// A request sent off its home endpoint by bounded loads.
    fn spill(&self) {
        self.inner.spill();
    }

    /// The counters now: `tries`, `responses` (1xx to 5xx), `failures`, `spills`,
    /// `latency_buckets` (per bucket, the last one `+Inf`), `latency_sum`, `latency_count`.
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.snapshot();
        let d = PyDict::new(py);
        d.set_item("tries", s.tries)?;
        d.set_item("responses", s.responses)?;
        d.set_item("failures", s.failures)?;
        d.set_item("spills", s.spills)?;
        d.set_item("latency_buckets", s.latency_buckets)?;
        d.set_item("latency_sum", s.latency_sum)?;
        d.set_item("latency_count", s.latency_count)?;
        Ok(d)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Counters>()?;
    m.add("LATENCY_BUCKETS", stats::LATENCY_BUCKETS.to_vec())?;
    Ok(())
}
