//! Support for ferry's end-to-end tests: the built binaries, and running them as separate
//! processes against real services.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Path of a workspace binary, built once per test process (`cargo build --bins`), so the
/// tests run the same executables a user runs.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--bins", "--manifest-path", manifest]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build for the ferry binaries");
        assert!(status.success(), "cargo build --bins failed");
        // Test executables live in target/{profile}/deps; binaries one level up.
        let exe = std::env::current_exe().expect("test executable path");
        exe.parent().and_then(|d| d.parent()).expect("target/{profile}").to_path_buf()
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}
