//! The Python face of the native core: the extension module `mesh_native._core`. Types are converted
//! here and nowhere else; the modules it wraps are plain Rust.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::table::{self, ketama::Ring, maglev::Maglev};

/// A Maglev table, built once and never changed.
#[pyclass(frozen, module = "mesh_native", name = "MaglevTable")]
struct PyMaglev(Maglev);

#[pymethods]
impl PyMaglev {
    /// Build the table for endpoints named by `keys` (`host:port`) with `weights`, without
    /// holding the GIL.
    #[new]
    fn new(py: Python<'_>, keys: Vec<String>, weights: Vec<u32>, size: u32) -> PyResult<Self> {
        py.detach(|| Maglev::build(&keys, &weights, size))
            .map(PyMaglev)
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    #[getter]
    fn size(&self) -> usize {
        self.0.size()
    }

    /// The home endpoint's index for a key hash, -1 in a table of no endpoints.
    fn lookup(&self, key_hash: u32) -> i64 {
        self.0.lookup(key_hash).map_or(-1, i64::from)
    }

    /// The home endpoint, then the endpoints to try next, in table order, distinct.
    #[pyo3(signature = (key_hash, limit = 8))]
    fn candidates(&self, key_hash: u32, limit: usize) -> Vec<u32> {
        self.0.candidates(key_hash, limit)
    }

    /// Slots per endpoint.
    fn counts(&self) -> Vec<u32> {
        self.0.counts()
    }

    /// Every slot's endpoint index, -1 where none (only in a table of no endpoints).
    fn entries(&self) -> Vec<i64> {
        self.0
            .entries()
            .iter()
            .map(|&i| if i == table::EMPTY { -1 } else { i64::from(i) })
            .collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "<MaglevTable M={} endpoints={}>",
            self.0.size(),
            self.0.n_endpoints()
        )
    }
}

/// A ketama ring, built once and never changed.
#[pyclass(frozen, module = "mesh_native", name = "RingTable")]
struct PyRing(Ring);

#[pymethods]
impl PyRing {
    #[new]
    fn new(py: Python<'_>, keys: Vec<String>, weights: Vec<u32>) -> PyResult<Self> {
        py.detach(|| Ring::build(&keys, &weights))
            .map(PyRing)
            .map_err(PyValueError::new_err)
    }

    #[getter]
    fn size(&self) -> usize {
        self.0.n_points()
    }

    fn lookup(&self, key_hash: u32) -> i64 {
        self.0.lookup(key_hash).map_or(-1, i64::from)
    }

    #[pyo3(signature = (key_hash, limit = 8))]
    fn candidates(&self, key_hash: u32, limit: usize) -> Vec<u32> {
        self.0.candidates(key_hash, limit)
    }

    fn counts(&self) -> Vec<u32> {
        self.0.counts()
    }

    /// The sorted points and, aligned with them, their owners.
    fn points(&self) -> (Vec<u32>, Vec<u32>) {
        (self.0.points().to_vec(), self.0.owners().to_vec())
    }

    fn __repr__(&self) -> String {
        format!(
            "<RingTable points={} endpoints={}>",
            self.0.n_points(),
            self.0.n_endpoints()
        )
    }
}

/// The 32-bit ketama hash of a key (MD5, first 4 bytes little-endian), as uhashring.
#[pyfunction]
fn key_hash(data: &[u8]) -> u32 {
    table::key_hash(data)
}

/// Whether `n` is prime (a Maglev table size must be).
#[pyfunction]
fn is_prime(n: u64) -> bool {
    table::maglev::is_prime(n)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyMaglev>()?;
    m.add_class::<PyRing>()?;
    crate::py_http::register(m)?;
    m.add_class::<crate::py_dns::PyDnsTable>()?;
    m.add_class::<crate::py_dns::PyDnsUdp>()?;
    m.add_function(wrap_pyfunction!(key_hash, m)?)?;
    m.add_function(wrap_pyfunction!(is_prime, m)?)?;
    m.add("MAGLEV_DEFAULT_SIZE", table::maglev::DEFAULT_SIZE)?;
    crate::py_stats::register(m)?;
    Ok(())
}
