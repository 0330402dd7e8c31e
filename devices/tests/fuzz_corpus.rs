//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the
//! same checks the cargo-fuzz targets run, so that an input which once broke
//! the device code keeps being tested by plain `cargo test`.
//!
//! The checks are `fuzz/src/lib.rs`, included here as a module rather than
//! depended on: the fuzz crate needs libFuzzer and lives outside the
//! workspace.

#[path = "../../fuzz/src/lib.rs"]
mod fuzz_checks;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    files.retain(|p| p.is_file());
    files.sort();
    assert!(!files.is_empty(), "{}: no corpus files", dir.display());
    files
}

/// Runs every file of the target's corpus, then fails naming all the files
/// that failed (each one's panic message is printed as it happens).
fn replay(target: &str, check: fn(&[u8])) {
    let files = corpus(target);
    let mut failed = Vec::new();
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} corpus files fail: {failed:?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn mmio_registers_corpus() {
    replay("mmio_registers", fuzz_checks::mmio_registers);
}

#[test]
fn pmem_requests_corpus() {
    replay("pmem_requests", fuzz_checks::pmem_requests);
}

#[test]
fn pmem_options_corpus() {
    replay("pmem_options", fuzz_checks::pmem_options);
}
