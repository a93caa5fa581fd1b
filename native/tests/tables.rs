//! The native tables against fixtures made by mesh's first (Python) tables and by uhashring:
//! see tests/fixtures/make_fixtures.py.

#![allow(clippy::expect_used, clippy::panic)] // a test fails by panicking

use mesh_native::table::{ketama::Ring, key_hash, maglev::Maglev, EMPTY};

const MAGLEV: &str = include_str!("fixtures/maglev.tsv");
const KETAMA: &str = include_str!("fixtures/ketama.tsv");
const UHASHRING: &str = include_str!("fixtures/uhashring.tsv");

fn fnv1a64(values: impl IntoIterator<Item = u32>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in v.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn rows(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split('\t').collect())
}

fn endpoints<'a>(keys: &'a str, weights: &str) -> (Vec<&'a str>, Vec<u32>) {
    let keys = keys.split(',').collect();
    let weights = weights
        .split(',')
        .map(|w| w.parse().expect("weight"))
        .collect();
    (keys, weights)
}

#[test]
fn maglev_tables_are_the_python_tables_entry_for_entry() {
    let mut cases = 0;
    for row in rows(MAGLEV) {
        let [size, keys, weights, digest, head] = row[..] else {
            panic!("bad row {row:?}")
        };
        let (keys, weights) = endpoints(keys, weights);
        let t = Maglev::build(&keys, &weights, size.parse().expect("size")).expect("valid");
        let first: Vec<String> = t.entries()[..32].iter().map(|i| i.to_string()).collect();
        assert_eq!(
            first.join(","),
            head,
            "size {size}, {} endpoints",
            keys.len()
        );
        assert_eq!(
            fnv1a64(t.entries().iter().copied()),
            digest,
            "size {size}, {keys:?}"
        );
        assert!(!t.entries().contains(&EMPTY));
        cases += 1;
    }
    assert!(cases >= 30, "{cases} fixtures read");
}

#[test]
fn ketama_rings_are_the_python_rings() {
    let mut cases = 0;
    for row in rows(KETAMA) {
        let [keys, weights, n_points, digest] = row[..] else {
            panic!("bad row {row:?}")
        };
        let (keys, weights) = endpoints(keys, weights);
        let r = Ring::build(&keys, &weights).expect("valid");
        assert_eq!(r.n_points().to_string(), n_points);
        let flat = r
            .points()
            .iter()
            .zip(r.owners())
            .flat_map(|(&p, &o)| [p, o]);
        assert_eq!(fnv1a64(flat), digest, "{keys:?}");
        cases += 1;
    }
    assert!(cases >= 10, "{cases} fixtures read");
}

#[test]
fn ketama_lookups_are_uhashrings() {
    let mut ring = None;
    let mut checked = 0;
    for row in rows(UHASHRING) {
        match row[..] {
            ["set", keys, weights] => {
                let (keys, weights) = endpoints(keys, weights);
                ring = Some((Ring::build(&keys, &weights).expect("valid"), keys));
            }
            [key, node] => {
                let (r, keys) = ring.as_ref().expect("a set first");
                let home = r.lookup(key_hash(key.as_bytes())).expect("not empty");
                assert_eq!(keys[home as usize], node, "key {key}");
                checked += 1;
            }
            _ => panic!("bad row {row:?}"),
        }
    }
    assert!(checked >= 900, "{checked} lookups checked");
}
