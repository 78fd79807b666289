//! What the benchmarks share.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The real SmolLM2-135M-Instruct GGUF (`ARENAFLOW_SMOLLM2_GGUF`, or where
/// scripts/fetch-smollm2.sh puts it).
pub fn smollm2_gguf() -> PathBuf {
    let path = std::env::var("ARENAFLOW_SMOLLM2_GGUF").map_or_else(
        |_| root().join(".models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-smollm2.sh",
        path.display()
    );
    path
}
