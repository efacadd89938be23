//! Helpers shared by the integration tests: where the fixtures are, scratch folders.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

pub mod checker;
pub mod cli;
pub mod reference;

pub const ARCHS: [&str; 6] = ["gpt2", "opt", "llama", "qwen2", "phi", "gpt_neox"];

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn fixture(rel: &str) -> PathBuf {
    let path = fixtures_dir().join(rel);
    assert!(path.exists(), "missing fixture {}", path.display());
    path
}

/// Every exported model in fixtures/: (arch, exporter, path to model.onnx).
pub fn all_models() -> Vec<(String, String, PathBuf)> {
    let mut models = Vec::new();
    for arch in ARCHS {
        let dir = fixtures_dir().join(arch);
        let mut exporters: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("model.onnx").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        exporters.sort();
        for exporter in exporters {
            let path = dir.join(&exporter).join("model.onnx");
            models.push((arch.to_string(), exporter, path));
        }
    }
    assert!(models.len() >= 40, "expected the full fixture set, found {}", models.len());
    models
}

/// Models whose weights are in an external data file.
pub fn has_external_data(model: &Path) -> bool {
    model.with_file_name("model.onnx.data").exists()
}

pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A NumPy `.npy` file (format 1.0) as `np.save` writes it: `descr` like `<i8`, raw little-endian data.
pub fn write_npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) {
    let shape_text = match shape {
        [n] => format!("({n},)"),
        dims => format!("({})", dims.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// The names of the files in a folder, sorted.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a folder entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
