//! The request path's Python face: `RequestReader` drives [`RequestStream`] for one client
//! connection and hands its sink `RequestHead`s, body bytes and ends; `BadRequest` carries
//! the status to answer (a class of `mesh_native/__init__.py`).

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use crate::http::reader::{RequestStream, Sink};
use crate::http::relay::{end, Exchange, Relay};
use crate::http::request::{Head, Version};
use crate::http::response::{Fault, ResponseStream};
use crate::http::{rewrite, Reject};

/// `mesh_native.BadRequest` (a Python class: an abi3 module cannot subclass exceptions).
static BAD_REQUEST: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn bad_request(py: Python<'_>, r: Reject) -> PyErr {
    let class = BAD_REQUEST.get_or_try_init(py, || {
        py.import("mesh_native")
            .and_then(|m| m.getattr("BadRequest"))
            .map(Bound::unbind)
    });
    match class.and_then(|c| c.call1(py, (r.status, r.reason))) {
        Ok(exc) => PyErr::from_value(exc.into_bound(py)),
        Err(e) => e,
    }
}

/// A parsed request head. The fields Python reads are made once, when the head is.
#[pyclass(frozen, module = "mesh_native", name = "RequestHead")]
pub struct RequestHead {
    head: Box<Head>,
    #[pyo3(get)]
    method: Py<PyBytes>,
    #[pyo3(get)]
    url: Py<PyBytes>,
    #[pyo3(get)]
    version: Py<PyString>,
    #[pyo3(get)]
    host: Py<PyBytes>,
    #[pyo3(get)]
    upgrade: Option<Py<PyBytes>>,
    #[pyo3(get)]
    content_length: Option<u64>,
    #[pyo3(get)]
    chunked: bool,
    #[pyo3(get)]
    keep_alive: bool,
    #[pyo3(get)]
    expect_continue: bool,
}

/// "1.0" and "1.1", made once: a head takes a reference, not a new string.
static VERSIONS: PyOnceLock<[Py<PyString>; 2]> = PyOnceLock::new();

fn version_str(py: Python<'_>, v: Version) -> Py<PyString> {
    let [v10, v11] = VERSIONS.get_or_init(py, || {
        [
            PyString::intern(py, "1.0").unbind(),
            PyString::intern(py, "1.1").unbind(),
        ]
    });
    match v {
        Version::Http10 => v10.clone_ref(py),
        Version::Http11 => v11.clone_ref(py),
    }
}

impl RequestHead {
    fn new(py: Python<'_>, head: Box<Head>) -> PyResult<Self> {
        Ok(RequestHead {
            method: PyBytes::new(py, &head.method).unbind(),
            url: PyBytes::new(py, &head.target).unbind(),
            version: version_str(py, head.version),
            host: PyBytes::new(py, &head.host).unbind(),
            upgrade: head
                .upgrade
                .as_deref()
                .map(|u| PyBytes::new(py, u).unbind()),
            content_length: head.content_length,
            chunked: head.chunked,
            keep_alive: head.keep_alive,
            expect_continue: head.expect_continue,
            head,
        })
    }
}

#[pymethods]
impl RequestHead {
    #[getter]
    fn has_body(&self) -> bool {
        self.head.has_body()
    }

    /// `(lower-cased name, value)` of the fields the router asked for, in order.
    #[getter]
    fn picked<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let pairs: Vec<Bound<'py, PyTuple>> = self
            .head
            .picked
            .iter()
            .map(|(n, v)| PyTuple::new(py, [PyBytes::new(py, n), PyBytes::new(py, v)]))
            .collect::<PyResult<_>>()?;
        PyList::new(py, pairs)
    }

    /// The key hash (ketama, as `key_hash`) of the first non-empty value of the picked field
    /// `name` (lower-case), or None: the router's common case in one call.
    fn key_hash(&self, name: &[u8]) -> Option<u32> {
        self.head
            .picked
            .iter()
            .find(|(n, v)| n.as_slice() == name && !v.is_empty())
            .map(|(_, v)| crate::table::key_hash(v))
    }

    /// The head to send upstream (see `native/src/http/rewrite.rs`).
    #[pyo3(signature = (client_ip, *, upgrade = false, default_host = b"".as_slice()))]
    fn upstream_head<'py>(
        &self,
        py: Python<'py>,
        client_ip: &[u8],
        upgrade: bool,
        default_host: &[u8],
    ) -> Bound<'py, PyBytes> {
        PyBytes::new(
            py,
            &rewrite::upstream_head(&self.head, client_ip, upgrade, default_host),
        )
    }

    fn __repr__(&self) -> String {
        let url = String::from_utf8_lossy(&self.head.target);
        let url: String = url.chars().take(60).collect();
        format!(
            "<RequestHead {} {url}>",
            String::from_utf8_lossy(&self.head.method)
        )
    }
}

enum Event {
    Head(Py<PyAny>),
    Body(Py<PyBytes>),
    End,
}

/// Collects what the stream hands out while it runs; the sink is called after, so that a
/// sink may read the reader's state (no borrow is held across Python code).
struct Collect<'py> {
    py: Python<'py>,
    events: Vec<Event>,
    error: Option<PyErr>,
}

/// A head as the Python object the sink gets.
trait ToPython: Sized {
    fn to_python(py: Python<'_>, head: Box<Self>) -> PyResult<Py<PyAny>>;
}

impl ToPython for Head {
    fn to_python(py: Python<'_>, head: Box<Self>) -> PyResult<Py<PyAny>> {
        Ok(Py::new(py, RequestHead::new(py, head)?)?.into_any())
    }
}

impl<H: ToPython> Sink<H> for Collect<'_> {
    fn head(&mut self, head: Box<H>) {
        match H::to_python(self.py, head) {
            Ok(h) => self.events.push(Event::Head(h)),
            Err(e) => self.error = Some(e),
        }
    }

    fn body(&mut self, data: &[u8]) {
        self.events
            .push(Event::Body(PyBytes::new(self.py, data).unbind()));
    }

    fn end(&mut self) {
        self.events.push(Event::End);
    }
}

/// One client connection's request reader: `feed(data)` parses, then calls the sink's
/// `on_request(head, ended)`, `on_body(data)` and `on_request_end()` in order (`ended`: the
/// request ended with its head, and no `on_request_end` follows); it raises
/// `BadRequest` for a request that cannot be served, and returns the offset in `data` where
/// an upgraded stream starts, if one does.
#[pyclass(module = "mesh_native", name = "RequestReader")]
pub struct RequestReader {
    stream: RequestStream,
    /// The sink's three methods. The sink holds its reader too: the collector sees the cycle
    /// through `__traverse__` and breaks it with `__clear__`.
    sink: Option<SinkMethods>,
}

struct SinkMethods {
    on_head: Py<PyAny>,
    on_body: Py<PyAny>,
    on_end: Py<PyAny>,
}

impl SinkMethods {
    fn of(sink: &Bound<'_, PyAny>, [head, body, end]: [&str; 3]) -> PyResult<Self> {
        Ok(SinkMethods {
            on_head: sink.getattr(head)?.unbind(),
            on_body: sink.getattr(body)?.unbind(),
            on_end: sink.getattr(end)?.unbind(),
        })
    }

    fn clone_ref(&self, py: Python<'_>) -> Self {
        SinkMethods {
            on_head: self.on_head.clone_ref(py),
            on_body: self.on_body.clone_ref(py),
            on_end: self.on_end.clone_ref(py),
        }
    }

    fn traverse(this: Option<&Self>, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(s) = this {
            visit.call(&s.on_head)?;
            visit.call(&s.on_body)?;
            visit.call(&s.on_end)?;
        }
        Ok(())
    }
}

#[pymethods]
impl RequestReader {
    #[new]
    #[pyo3(signature = (sink, wanted = None))]
    fn new(sink: &Bound<'_, PyAny>, wanted: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let mut names = Vec::new();
        if let Some(wanted) = wanted {
            for name in wanted.try_iter()? {
                names.push(name?.extract::<Vec<u8>>()?);
            }
        }
        Ok(RequestReader {
            stream: RequestStream::new(names),
            sink: Some(SinkMethods::of(
                sink,
                ["on_request", "on_body", "on_request_end"],
            )?),
        })
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        SinkMethods::traverse(self.sink.as_ref(), &visit)
    }

    fn __clear__(&mut self) {
        self.sink = None;
    }

    #[getter]
    fn in_head(&self) -> bool {
        self.stream.in_head()
    }

    fn feed(slf: &Bound<'_, Self>, data: &[u8]) -> PyResult<Option<usize>> {
        let py = slf.py();
        let mut out = Collect {
            py,
            events: Vec::new(),
            error: None,
        };
        // The borrow ends before the sink runs: the sink may read this reader.
        let (result, sink) = {
            let mut this = slf.borrow_mut();
            (
                this.stream.feed(data, &mut out),
                this.sink.as_ref().map(|s| s.clone_ref(py)),
            )
        };
        out.deliver(sink)?;
        result.map_err(|r| bad_request(py, r))
    }
}

impl Collect<'_> {
    /// Call the sink's methods with what the feed collected, in order. What was read before
    /// a refusal is still delivered: an earlier pipelined request is served before the bad
    /// one is answered.
    fn deliver(self, sink: Option<SinkMethods>) -> PyResult<()> {
        let Some(sink) = sink else {
            return Err(PyRuntimeError::new_err("the reader's sink is gone"));
        };
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut events = self.events.into_iter().peekable();
        while let Some(event) = events.next() {
            match event {
                // A head whose request ends with it (no body): one call, `ended` true.
                Event::Head(h) => {
                    let ended = matches!(events.peek(), Some(Event::End));
                    if ended {
                        events.next();
                    }
                    sink.on_head.call1(self.py, (h, ended))?
                }
                Event::Body(b) => sink.on_body.call1(self.py, (b,))?,
                Event::End => sink.on_end.call0(self.py)?,
            };
        }
        Ok(())
    }
}

// The response path

/// `mesh_native.BadResponse`, a Python class like `BadRequest`.
static BAD_RESPONSE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn bad_response(py: Python<'_>, f: Fault) -> PyErr {
    let class = BAD_RESPONSE.get_or_try_init(py, || {
        py.import("mesh_native")
            .and_then(|m| m.getattr("BadResponse"))
            .map(Bound::unbind)
    });
    let gateway = matches!(f, Fault::Gateway(_));
    match class.and_then(|c| c.call1(py, (gateway, f.reason()))) {
        Ok(exc) => PyErr::from_value(exc.into_bound(py)),
        Err(e) => e,
    }
}

/// One upstream connection's response reader and relay. `start(head, …)` before each
/// exchange returns the request head to send; `feed(data, keep_alive)` reads what the peer
/// sent and returns `(out, status, started, end)`: the bytes for the client from this read
/// (one write), the response's status (0 before its head), whether any of it goes to the
/// client, and what ended (`END_*` bits, 0 while the response goes on). It raises
/// `BadResponse` for a response that must not reach the client; `take()` then gives what was
/// relayed before the fault.
#[pyclass(module = "mesh_native", name = "ResponseReader")]
#[derive(Default)]
pub struct PyResponseReader {
    stream: ResponseStream,
    relay: Relay,
    upgrade_at: Option<usize>,
}

fn out_bytes<'py>(py: Python<'py>, out: &mut Vec<u8>) -> Option<Bound<'py, PyBytes>> {
    if out.is_empty() {
        return None;
    }
    let b = PyBytes::new(py, out);
    out.clear();
    Some(b)
}

#[pymethods]
impl PyResponseReader {
    #[new]
    fn new() -> Self {
        PyResponseReader::default()
    }

    /// A request goes out: the head to send (see `native/src/http/rewrite.rs`), and its
    /// response read from now on. `discard_5xx`: a 502, 503 or 504 is dropped (a retry
    /// follows).
    #[pyo3(signature = (head, client_ip, default_host, *, discard_5xx))]
    fn start<'py>(
        &mut self,
        py: Python<'py>,
        head: &RequestHead,
        client_ip: &[u8],
        default_host: &[u8],
        discard_5xx: bool,
    ) -> Bound<'py, PyBytes> {
        let h = &head.head;
        let head_only = h.method.as_slice() == b"HEAD";
        let upgrade = h.upgrade.is_some();
        self.stream.expect(head_only, upgrade);
        self.relay.start(Exchange {
            head_only,
            client_v11: h.version == Version::Http11,
            client_keep_alive: h.keep_alive,
            discard_retryable: discard_5xx,
        });
        self.upgrade_at = None;
        PyBytes::new(
            py,
            &rewrite::upstream_head(h, client_ip, upgrade, default_host),
        )
    }

    /// `keep_alive`: the client's connection may stay open, as far as the proxy is
    /// concerned (it is not draining, the client has not half-closed).
    fn feed<'py>(
        &mut self,
        py: Python<'py>,
        data: &[u8],
        keep_alive: bool,
    ) -> PyResult<(Option<Bound<'py, PyBytes>>, u16, bool, u8)> {
        self.relay.keep_alive = keep_alive;
        match self.stream.feed(data, &mut self.relay) {
            Ok(at) => {
                if at.is_some() {
                    self.upgrade_at = at;
                }
                let r = &mut self.relay;
                let bits = r.end_bits(self.stream.stray());
                Ok((out_bytes(py, &mut r.out), r.status, r.started, bits))
            }
            Err(f) => Err(bad_response(py, f)),
        }
    }

    /// What was relayed in the read that raised `BadResponse`, before the fault.
    fn take<'py>(&mut self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        out_bytes(py, &mut self.relay.out)
    }

    /// Where the new protocol starts in the data of the read that ended with `END_UPGRADED`.
    #[getter]
    fn upgrade_at(&self) -> Option<usize> {
        self.upgrade_at
    }

    #[getter]
    fn status(&self) -> u16 {
        self.relay.status
    }

    #[getter]
    fn started(&self) -> bool {
        self.relay.started
    }

    /// The body goes to the client re-chunked (its length unknown, the client on HTTP/1.1).
    #[getter]
    fn chunked_out(&self) -> bool {
        self.relay.chunked_out
    }

    /// The client's connection stays open after this response (what its head said).
    #[getter]
    fn keep_alive_out(&self) -> bool {
        self.relay.keep_alive_out
    }

    /// The body ends when the peer closes (no length, not chunked).
    #[getter]
    fn close_delimited(&self) -> bool {
        self.relay.close_delimited
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<RequestReader>()?;
    m.add_class::<RequestHead>()?;
    m.add_class::<PyResponseReader>()?;
    m.add("END_COMPLETE", end::COMPLETE)?;
    m.add("END_UPGRADED", end::UPGRADED)?;
    m.add("END_CLIENT_CLOSE", end::CLIENT_CLOSE)?;
    m.add("END_REUSABLE", end::REUSABLE)?;
    Ok(())
}
