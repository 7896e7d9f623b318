//! Every decoder of untrusted bytes, fed the fuzz seed corpus (`fuzz/corpus/`), every
//! input a fuzzer once crashed on (`fuzz/regressions/`), and mutations of both, on the
//! stable compiler: none may panic, and what decodes must re-encode to something that
//! decodes. `cargo fuzz` (fuzz/README.md) explores further; this keeps what it found.

use std::path::{Path, PathBuf};

use proptest::prelude::*;

include!("../../fuzz/decoders.rs");

const TARGETS: [&str; 7] = ["client_request", "client_response", "federation_frame", "signed_unit", "key_document", "identifiers", "config"];

fn inputs(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz").join(kind).join(target);
    let Ok(rd) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut v: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).filter_map(|p| std::fs::read(&p).ok().map(|d| (p, d))).collect();
    v.sort();
    v
}

#[test]
fn the_seed_corpus_and_every_past_crash_decode_without_panicking() {
    let mut n = 0;
    for t in TARGETS {
        let corpus = inputs("corpus", t);
        assert!(!corpus.is_empty(), "no seed corpus for {t}: run python3 fuzz/seed_corpus.py");
        for (path, data) in corpus.iter().chain(inputs("regressions", t).iter()) {
            let r = std::panic::catch_unwind(|| decode_all(t, data));
            assert!(r.is_ok(), "{t} panicked on {}", path.display());
            n += 1;
        }
    }
    println!("{n} inputs decoded");
}

fn seeds() -> &'static [(usize, Vec<u8>)] {
    static SEEDS: std::sync::OnceLock<Vec<(usize, Vec<u8>)>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(|| TARGETS.iter().enumerate().flat_map(|(i, t)| inputs("corpus", t).into_iter().map(move |(_, d)| (i, d))).collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_inputs_never_panic(
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..8),
    ) {
        let seeds = seeds();
        let (t, mut data) = seeds[pick.index(seeds.len())].clone();
        for (at, byte, op) in edits {
            let i = if data.is_empty() { 0 } else { at.index(data.len()) };
            match op {
                0 if !data.is_empty() => data[i] = byte,
                1 => data.insert(i, byte),
                2 if !data.is_empty() => { data.remove(i); }
                _ => data.truncate(i),
            }
        }
        decode_all(TARGETS[t], &data);
    }

    #[test]
    fn random_bytes_never_panic(t in 0..TARGETS.len(), data in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_all(TARGETS[t], &data);
    }
}
