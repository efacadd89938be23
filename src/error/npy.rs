//! Why a NumPy file (`--calib-ids`, `eval --ids`) could not be read (`runtime::npy`).

use std::path::PathBuf;

/// Why a `.npy` or `.npz` file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("cannot read {}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },

    #[error("{origin} is not a valid {kind} file: {reason}")]
    Invalid { origin: String, kind: &'static str, reason: String },

    #[error(
        "{origin} has an element type onnx-slice cannot read; supported are little-endian int64 (<i8), \
         int32 (<i4), float32 (<f4) and float64 (<f8)"
    )]
    UnsupportedDtype { origin: String },

    #[error("{origin} has no array named `{name}`; it has: {}", available.join(", "))]
    MissingEntry { origin: String, name: String, available: Vec<String> },

    #[error("expected an array of {expected}, got {found}")]
    WrongDtype { expected: &'static str, found: &'static str },
}
