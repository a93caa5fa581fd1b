//! A datagram answered from a reply table: nothing panics, and a reply is only ever sent
//! for a plain query of a name the table holds, with the query's ID and question, QR set,
//! one question, and within the size the client may receive.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mesh_native::dns::{answer, FastEntry, Table};

/// `web.service.mesh` A (three record orders, short) and SRV (near the 512 limit), and
/// `big.service.mesh` A (beyond 1232 bytes: TCP only).
fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let name = b"\x03web\x07service\x04mesh\x00".to_vec();
        let big = b"\x03big\x07service\x04mesh\x00".to_vec();
        let mut t = Table::new();
        let rots = (0..3).map(|i| vec![i; 48]).collect();
        t.insert(
            [&name[..], b"\x00\x01\x00\x01"].concat(),
            FastEntry::new(0, (3, 0, 0), rots, true),
        );
        t.insert(
            [&name[..], b"\x00\x21\x00\x01"].concat(),
            FastEntry::new(0, (9, 0, 9), vec![vec![7; 460]], false),
        );
        t.insert(
            [&big[..], b"\x00\x01\x00\x01"].concat(),
            FastEntry::new(0, (90, 0, 0), vec![vec![9; 1400]], true),
        );
        t
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, query)) = input.split_first() else {
        return;
    };
    let udp = mode & 1 == 1;
    let mut out = Vec::new();
    let Some(qtype) = answer(table(), query, udp, &mut out) else {
        assert!(out.is_empty());
        return;
    };
    assert_eq!(&out[..2], &query[..2], "the query's ID");
    assert!(
        query[2] & 0xf8 == 0 && out[2] & 0x80 != 0,
        "a plain query; QR set"
    );
    assert_eq!(&out[4..6], &[0, 1]);
    let qlen = query[12..].iter().position(|&b| b == 0).expect("a name") + 5;
    assert_eq!(
        &out[12..12 + qlen],
        &query[12..12 + qlen],
        "the question as received"
    );
    if udp {
        let limit = if query[10..12] == [0, 0] { 512 } else { 1232 };
        assert!(out.len() <= limit, "{} bytes over UDP", out.len());
    }
});
