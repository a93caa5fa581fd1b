//! mesh's native core: what runs per request and per query. Plain modules that know nothing
//! of Python, each with its own tests: `http` (parse, frame, rewrite), `table` (route),
//! `stats` (count) and `dns` (answer from the rendered table). `py`, `py_http`, `py_stats`
//! and `py_dns` (the `python` feature) are the only places that speak PyO3.
#![forbid(unsafe_code)]

pub mod dns;
pub mod http;
pub mod stats;
pub mod table;

#[cfg(feature = "python")]
mod py;
#[cfg(feature = "python")]
mod py_dns;
#[cfg(feature = "python")]
mod py_http;
#[cfg(feature = "python")]
mod py_stats;
