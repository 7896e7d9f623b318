//! Only the writer thread writes the store: the protocol core's caches are valid only
//! because of that (ARCHITECTURE.md, "one writer"). This reads the server's sources and
//! fails if a `Store::write` call appears anywhere but in the writer.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn only_the_writer_writes_the_store() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut calls = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        // Unit tests may wrap a store; the engine's own tests write it directly.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (i, line) in code.lines().enumerate() {
            if line.contains("store.write(") {
                calls.push(format!("{}:{}", f.strip_prefix(&src).unwrap().display(), i + 1));
            }
        }
    }
    assert_eq!(calls.len(), 1, "Store::write is called from {calls:?}; only the writer (sequencer.rs) may write");
    assert!(calls[0].starts_with("sequencer.rs:"), "the one write is not the writer's: {calls:?}");
}
