//! mesh's native core: what runs per request and per query. Plain modules that know nothing
//! of Python, each with its own tests; [`py`] is the one place that speaks PyO3.
#![forbid(unsafe_code)]

pub mod table;

mod py;
