//! mesh's native core: what runs per request and per query. Plain modules that know nothing
//! of Python, each with its own tests; `py` and `py_http` (the `python` feature) are the only
//! places that speak PyO3.
#![forbid(unsafe_code)]

pub mod http;
pub mod table;

#[cfg(feature = "python")]
mod py;
#[cfg(feature = "python")]
mod py_http;
