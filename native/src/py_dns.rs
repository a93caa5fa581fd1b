//! The Python face of [`crate::dns`]: the rendered reply table, and the UDP socket's batched
//! fast path (`recvmmsg`, answer from the table, `sendmmsg`).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::RawFd;

use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use crate::dns::{self, FastEntry, Table};

/// A query's largest size read (a longer datagram is read cut, as `recvfrom(4096)` does).
const RECV_SIZE: usize = 4096;

/// One entry as Python renders it: the lower-cased question key, the reply's rest in every
/// rotation, its rcode, and its (answer, authority, additional) counts.
type EntryIn = (Vec<u8>, Vec<Vec<u8>>, u16, (u16, u16, u16));

/// Every fast reply of one registry snapshot. Built whole, never changed: a new snapshot
/// makes a new table, and the socket answers from whichever it is handed.
#[pyclass(frozen, module = "mesh_native", name = "DnsTable")]
pub struct PyDnsTable(Table);

#[pymethods]
impl PyDnsTable {
    /// `ra`: whether replies say recursion is available (the sidecar forwards).
    #[new]
    fn new(entries: Vec<EntryIn>, ra: bool) -> PyResult<Self> {
        let mut table = Table::new();
        for (key, rotations, rcode, counts) in entries {
            if rotations.is_empty() {
                return Err(PyValueError::new_err(
                    "an entry needs at least one rotation",
                ));
            }
            table.insert(key, FastEntry::new(rcode, counts, rotations, ra));
        }
        Ok(PyDnsTable(table))
    }

    fn __len__(&self) -> usize {
        self.0.len()
    }

    /// The fast reply to `query`, or None when the general path must answer it.
    #[pyo3(signature = (query, udp = true))]
    fn answer<'py>(&self, py: Python<'py>, query: &[u8], udp: bool) -> Option<Bound<'py, PyBytes>> {
        let mut out = Vec::new();
        dns::answer(&self.0, query, udp, &mut out).map(|_| PyBytes::new(py, &out))
    }
}

/// A UDP socket's batched path. `drain` reads every datagram waiting (up to `batch` per
/// system call, `rounds` calls), answers those the table can, sends those replies in one
/// `sendmmsg` per batch, and returns the rest with their senders for the general path.
#[pyclass(unsendable, module = "mesh_native", name = "DnsUdp")]
pub struct PyDnsUdp {
    fd: RawFd,
    bufs: Vec<Vec<u8>>,
    replies: Vec<Vec<u8>>,
    rounds: usize,
    /// Datagrams answered here, and replies the socket would not take.
    #[pyo3(get)]
    answered: u64,
    #[pyo3(get)]
    unsent: u64,
    /// Replies sent from the table, by (question type, rcode): the types the table holds.
    by_type: Vec<(u16, u8, u64)>,
    /// `recvmmsg`'s headers and sender addresses, made once: preallocating them per call
    /// cost more than answering a query.
    recv_headers: MultiHeaders<SockaddrStorage>,
}

#[pymethods]
impl PyDnsUdp {
    /// `fd`: a non-blocking UDP socket the caller keeps open while this is used.
    #[new]
    #[pyo3(signature = (fd, batch = 64, rounds = 4))]
    fn new(fd: RawFd, batch: usize, rounds: usize) -> PyResult<Self> {
        if batch == 0 || batch > 1024 || rounds == 0 {
            return Err(PyValueError::new_err(
                "batch must be 1..=1024 and rounds ≥ 1",
            ));
        }
        Ok(PyDnsUdp {
            fd,
            bufs: vec![vec![0; RECV_SIZE]; batch],
            replies: vec![Vec::new(); batch],
            rounds,
            answered: 0,
            unsent: 0,
            by_type: Vec::new(),
            recv_headers: MultiHeaders::preallocate(batch, None),
        })
    }

    /// (question type, rcode, replies) for every pair answered here so far.
    fn counts(&self) -> Vec<(u16, u8, u64)> {
        self.by_type.clone()
    }

    /// Read, answer, send; the datagrams left for the general path as (data, address).
    fn drain<'py>(
        &mut self,
        py: Python<'py>,
        table: &PyDnsTable,
    ) -> PyResult<Vec<(Bound<'py, PyBytes>, Bound<'py, PyTuple>)>> {
        let mut slow = Vec::new();
        let batch = self.bufs.len();
        for _ in 0..self.rounds {
            let got = match self.receive() {
                Ok(got) => got,
                Err(Errno::EAGAIN | Errno::EINTR) => break,
                // An ICMP error about an earlier reply: nothing to do, read on.
                Err(_) => continue,
            };
            let mut to_send: Vec<(usize, SockaddrStorage)> = Vec::with_capacity(got.len());
            for (i, (len, addr)) in got.iter().enumerate() {
                let Some(addr) = addr else { continue };
                let Some(data) = self.bufs.get(i).and_then(|b| b.get(..*len)) else {
                    continue;
                };
                let Some(reply) = self.replies.get_mut(i) else {
                    continue;
                };
                reply.clear();
                if let Some(qtype) = dns::answer(&table.0, data, true, reply) {
                    count(&mut self.by_type, qtype, reply);
                    to_send.push((i, *addr));
                } else if let Some(peer) = address(py, addr)? {
                    slow.push((PyBytes::new(py, data), peer));
                }
            }
            self.answered += to_send.len() as u64;
            self.send(&to_send);
            if got.len() < batch {
                break;
            }
        }
        Ok(slow)
    }
}

impl PyDnsUdp {
    /// One `recvmmsg`: (length, sender) of each datagram, in `bufs` order.
    fn receive(&mut self) -> Result<Vec<(usize, Option<SockaddrStorage>)>, Errno> {
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> = self
            .bufs
            .iter_mut()
            .map(|b| [IoSliceMut::new(b.as_mut_slice())])
            .collect();
        let results = recvmmsg(
            self.fd,
            &mut self.recv_headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )?;
        Ok(results.map(|m| (m.bytes, m.address)).collect())
    }

    /// `sendmmsg` the replies at these indexes; one the socket refuses is dropped (UDP
    /// clients retry), and a full socket drops the rest.
    fn send(&mut self, to_send: &[(usize, SockaddrStorage)]) {
        let mut start = 0;
        while start < to_send.len() {
            let rest = to_send.get(start..).unwrap_or_default();
            let slices: Vec<[IoSlice<'_>; 1]> = rest
                .iter()
                .map(|(i, _)| [IoSlice::new(self.replies.get(*i).map_or(&[][..], |r| r))])
                .collect();
            let addrs: Vec<Option<SockaddrStorage>> = rest.iter().map(|(_, a)| Some(*a)).collect();
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(rest.len(), None);
            let cmsgs: [ControlMessage<'_>; 0] = [];
            match sendmmsg(
                self.fd,
                &mut headers,
                &slices,
                &addrs,
                cmsgs,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(results) => {
                    let sent = results.count();
                    start += sent.max(1);
                    self.unsent += u64::from(sent == 0);
                }
                Err(Errno::EAGAIN) => {
                    self.unsent += rest.len() as u64;
                    return;
                }
                Err(_) => {
                    start += 1;
                    self.unsent += 1;
                }
            }
        }
    }
}

/// Counts one reply from the table under its question's type and its rcode (a few pairs:
/// the table holds five types).
fn count(by_type: &mut Vec<(u16, u8, u64)>, qtype: u16, reply: &[u8]) {
    let rcode = reply.get(3).map_or(0, |flags| flags & 0x0f);
    match by_type
        .iter_mut()
        .find(|(t, r, _)| *t == qtype && *r == rcode)
    {
        Some((_, _, n)) => *n += 1,
        None => by_type.push((qtype, rcode, 1)),
    }
}

/// A sender as Python's socket module gives it: (host, port), or (host, port, flowinfo,
/// scope_id) for IPv6; None for a family that cannot send DNS (never seen on UDP/IP).
fn address<'py>(py: Python<'py>, addr: &SockaddrStorage) -> PyResult<Option<Bound<'py, PyTuple>>> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Ok(Some((v4.ip().to_string(), v4.port()).into_pyobject(py)?));
    }
    if let Some(v6) = addr.as_sockaddr_in6() {
        let parts = (v6.ip().to_string(), v6.port(), v6.flowinfo(), v6.scope_id());
        return Ok(Some(parts.into_pyobject(py)?));
    }
    Ok(None)
}
