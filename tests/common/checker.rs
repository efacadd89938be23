//! The ONNX checker (`onnx.checker.check_model`, full check) on written models, run in the venv
//! scripts/setup-check.sh makes.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::scratch;

/// The python that runs the ONNX checker: `ONNX_SLICE_CHECK_PYTHON`, else the venv that
/// scripts/setup-check.sh makes. Missing → the test FAILS (never skips).
pub fn checker_python() -> PathBuf {
    if let Some(python) = std::env::var_os("ONNX_SLICE_CHECK_PYTHON") {
        let python = PathBuf::from(python);
        assert!(
            python.exists(),
            "ONNX_SLICE_CHECK_PYTHON={} does not exist (unset it and run scripts/setup-check.sh)",
            python.display()
        );
        return python;
    }
    let home = std::env::var_os("ONNX_SLICE_HOME").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is not set")).join(".cache")
        });
        cache.join("onnx-slice")
    });
    let python = home.join("venv-check/bin/python");
    assert!(
        python.exists(),
        "{} does not exist: run scripts/setup-check.sh (it makes a venv with onnx==1.23.2 for the ONNX checker), \
         or set ONNX_SLICE_CHECK_PYTHON to a python that imports onnx",
        python.display()
    );
    python
}

/// `onnx.checker.check_model(FILE, full_check=True)` for each file, in one python process (one
/// `import onnx` instead of 45). Returns the files that fail, with the checker's message.
pub fn onnx_checker_failures(python: &Path, files: &[PathBuf]) -> Vec<(PathBuf, String)> {
    const SCRIPT: &str = r#"
import sys, onnx
for path in sys.argv[1:]:
    try:
        onnx.checker.check_model(path, full_check=True)
        print("OK\t" + path)
    except Exception as e:
        print("FAIL\t" + path + "\t" + type(e).__name__ + ": " + " ".join(str(e).split()))
"#;
    // Run from a scratch directory: python puts the working directory first on sys.path.
    let cwd = scratch();
    let out = Command::new(python)
        .current_dir(cwd.path())
        .arg("-c")
        .arg(SCRIPT)
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{} failed running the ONNX checker (does it import onnx? run scripts/setup-check.sh):\n{}\n{}", python.display(), stdout, String::from_utf8_lossy(&out.stderr));
    let mut verdicts: BTreeMap<&str, Option<String>> = BTreeMap::new();
    for line in stdout.lines() {
        let mut parts = line.splitn(3, '\t');
        match (parts.next(), parts.next()) {
            (Some("OK"), Some(path)) => verdicts.insert(path, None),
            (Some("FAIL"), Some(path)) => {
                verdicts.insert(path, Some(parts.next().unwrap_or("").to_string()))
            }
            _ => None,
        };
    }
    files
        .iter()
        .filter_map(|f| match verdicts.get(f.to_str().unwrap()) {
            Some(None) => None,
            Some(Some(why)) => Some((f.clone(), why.clone())),
            None => Some((f.clone(), "the checker gave no verdict".into())),
        })
        .collect()
}
