use super::*;

/// `web.service.mesh` as a wire name.
const NAME: &[u8] = b"\x03web\x07service\x04mesh\x00";
const SRV: [u8; 4] = [0, 33, 0, 1];

fn key() -> Vec<u8> {
    [NAME, &SRV[..]].concat()
}

fn table(rest_len: usize, rotations: usize) -> Table {
    let mut t = Table::new();
    let rots = (0..rotations).map(|i| vec![i as u8; rest_len]).collect();
    t.insert(key(), FastEntry::new(0, (2, 0, 2), rots, true));
    t
}

fn query(flags: [u8; 2], name: &[u8], arcount: u16, tail: &[u8]) -> Vec<u8> {
    let mut q = vec![0xab, 0xcd, flags[0], flags[1], 0, 1, 0, 0, 0, 0];
    q.extend_from_slice(&arcount.to_be_bytes());
    q.extend_from_slice(name);
    q.extend_from_slice(&SRV);
    q.extend_from_slice(tail);
    q
}

fn edns(payload: u16, version: u8, do_bit: bool, rdata: &[u8]) -> Vec<u8> {
    let mut o = vec![0, 0, 41];
    o.extend_from_slice(&payload.to_be_bytes());
    o.extend_from_slice(&[0, version, if do_bit { 0x80 } else { 0 }, 0]);
    o.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    o.extend_from_slice(rdata);
    o
}

fn run(t: &Table, q: &[u8], udp: bool) -> Option<Vec<u8>> {
    let mut out = vec![1, 2, 3];
    answer(t, q, udp, &mut out).map(|_| out)
}

#[test]
fn a_plain_query_gets_its_id_flags_counts_question_and_records() {
    let t = table(20, 1);
    let q = query([0x01, 0x00], NAME, 0, &[]);
    assert_eq!(
        answer(&t, &q, true, &mut Vec::new()),
        Some(33),
        "the question's type"
    );
    let r = run(&t, &q, true).expect("answered");
    // ID, QR|AA|RD|RA, 1 question, 2 answers, 0 authority, 2 additional.
    assert_eq!(&r[..12], &[0xab, 0xcd, 0x85, 0x80, 0, 1, 0, 2, 0, 0, 0, 2]);
    assert_eq!(&r[12..12 + key().len()], &key()[..]);
    assert_eq!(&r[12 + key().len()..], &[0u8; 20][..]);
}

#[test]
fn rd_clear_stays_clear_and_ra_follows_the_table() {
    let mut t = Table::new();
    t.insert(key(), FastEntry::new(3, (0, 1, 0), vec![vec![7; 5]], false));
    let r = run(&t, &query([0, 0], NAME, 0, &[]), false).expect("answered");
    assert_eq!(&r[2..4], &[0x84, 0x03]); // QR|AA, NXDOMAIN, no RD, no RA
}

#[test]
fn the_question_comes_back_in_the_clients_case() {
    let t = table(4, 1);
    let mixed = b"\x03wEB\x07SeRvIcE\x04MESH\x00";
    let r = run(&t, &query([1, 0], mixed, 0, &[]), true).expect("answered");
    assert_eq!(&r[12..12 + mixed.len()], &mixed[..]);
}

#[test]
fn anything_but_a_plain_query_for_a_known_name_is_declined() {
    let t = table(4, 1);
    let good = query([1, 0], NAME, 0, &[]);
    assert!(run(&t, &good, true).is_some());
    let mut cases = Vec::new();
    let mut response = good.clone();
    response[2] |= 0x80;
    cases.push(response);
    let mut notify = good.clone();
    notify[2] |= 4 << 3;
    cases.push(notify);
    for i in [4, 7, 9] {
        let mut c = good.clone();
        c[i] = 1; // 257 questions, an answer, an authority record
        cases.push(c);
    }
    cases.push(query([1, 0], b"\x03www\x07service\x04mesh\x00", 0, &[]));
    let mut other_class = good.clone();
    let last = other_class.len() - 1;
    other_class[last] = 3;
    cases.push(other_class);
    for c in cases {
        assert_eq!(run(&t, &c, true), None, "{c:?}");
    }
}

#[test]
fn every_cut_of_a_query_is_declined_without_a_panic() {
    let t = table(4, 1);
    let q = query([1, 0], NAME, 1, &edns(1232, 0, false, b"\x00\x0a\x00\x00"));
    assert!(run(&t, &q, true).is_some());
    for n in 0..q.len() {
        assert_eq!(run(&t, &q[..n], true), None, "cut at {n}");
    }
}

#[test]
fn without_edns_a_udp_reply_fits_512_bytes_or_is_left_to_the_general_path() {
    let fits = 512 - 12 - key().len();
    assert!(run(&table(fits, 1), &query([1, 0], NAME, 0, &[]), true).is_some());
    let t = table(fits + 1, 1);
    assert_eq!(run(&t, &query([1, 0], NAME, 0, &[]), true), None);
    assert!(
        run(&t, &query([1, 0], NAME, 0, &[]), false).is_some(),
        "TCP: 64 KiB"
    );
}

#[test]
fn edns_honours_the_clients_size_between_512_and_1232_and_echoes_do() {
    let head = 12 + key().len() + OPT_SIZE;
    let t = table(1232 - head, 1);
    let big = query([1, 0], NAME, 1, &edns(4096, 0, true, &[]));
    let r = run(&t, &big, true).expect("fits 1232");
    assert_eq!(r.len(), 1232);
    assert_eq!(&r[10..12], &[0, 3], "AR counts our OPT");
    assert_eq!(&r[r.len() - OPT_SIZE..], &opt(true));
    let small = query([1, 0], NAME, 1, &edns(1000, 0, false, &[]));
    assert_eq!(run(&t, &small, true), None);
    let t = table(512 - head, 1);
    let tiny = query([1, 0], NAME, 1, &edns(100, 0, false, &[]));
    let r = run(&t, &tiny, true).expect("at least 512");
    assert_eq!(&r[r.len() - OPT_SIZE..], &opt(false));
}

#[test]
fn an_opt_the_general_path_must_judge_is_declined() {
    let t = table(4, 1);
    let cases = [
        query([1, 0], NAME, 1, &edns(1232, 1, false, &[])), // BADVERS
        query([1, 0], NAME, 1, &edns(1232, 0, false, &[0; 8])[..15]), // RDATA cut
        query([1, 0], NAME, 2, &edns(1232, 0, false, &[])),
        query([1, 0], NAME, 1, &[1, 0, 41, 4, 0, 0, 0, 0, 0, 0, 0]), // owner not the root
        query([1, 0], NAME, 1, &[0, 0, 1, 4, 0, 0, 0, 0, 0, 0, 0]),  // not an OPT
    ];
    for c in cases {
        assert_eq!(run(&t, &c, true), None, "{c:?}");
    }
}

#[test]
fn rotations_take_turns() {
    let t = table(3, 3);
    let q = query([1, 0], NAME, 0, &[]);
    let firsts: Vec<u8> = (0..6)
        .map(|_| {
            *run(&t, &q, true)
                .expect("answered")
                .last()
                .expect("records")
        })
        .collect();
    assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
}

#[test]
fn a_question_longer_than_any_name_is_a_miss() {
    let t = table(3, 1);
    let mut long = vec![0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    long.extend(std::iter::repeat_n(1u8, 300));
    long.extend_from_slice(&[0, 0, 33, 0, 1]);
    assert_eq!(run(&t, &long, true), None);
}
