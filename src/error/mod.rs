//! The library's error type: every variant says where (file, pass, node, tensor) and what.
use std::path::PathBuf;

mod npy;
mod runtime;
mod structure;
mod types;

pub use npy::NpyError;
pub use runtime::{LibrarySource, RuntimeError, SessionStep};
pub use structure::{DetectError, QuantizedForm, QuantizedModel};
pub use types::TypeError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: not a readable ONNX model: {message}")]
    NotOnnx { path: PathBuf, message: String },

    #[error("{model}: tensor '{tensor}' has external data in '{location}': {message}")]
    ExternalData { model: PathBuf, tensor: String, location: String, message: String },

    #[error("tensor '{tensor}': {message}")]
    Tensor { tensor: String, message: String },

    #[error("graph, node '{node}': {message}")]
    Graph { node: String, message: String },

    #[error("refusing to write {output}: {message}")]
    Save { output: PathBuf, message: String },

    /// An export folder that cannot be read as one, or an output folder that cannot be written
    /// (it exists, it is inside the input folder); found before any long work.
    #[error("{path}: {message}")]
    Folder { path: PathBuf, message: String },

    /// The graph about to be written does not type-check; nothing was written.
    #[error("refusing to write {output}, an invalid model: {source}")]
    IllTyped { output: PathBuf, source: TypeError },

    #[error("{pass}: node '{node}': {message}")]
    Pass { pass: &'static str, node: String, message: String },

    /// Calibration or evaluation data (text, token ids, tokenizer) that cannot be used; the
    /// message names the file and says what to do.
    #[error("{message}")]
    Calibration { message: String },

    /// A size target (`--target-size`, `--target-params`) that no slicing reaches.
    #[error("{message}")]
    Budget { message: String },

    #[error(transparent)]
    Detect(#[from] DetectError),

    /// The model was written by onnx-slice (its metadata says so), which does not slice its own
    /// output again.
    #[error("{model}: already sliced by {by}; onnx-slice does not slice its own output again: slice the original model with the ratio you want")]
    AlreadySliced { model: String, by: String },

    #[error(transparent)]
    Quantized(#[from] QuantizedModel),

    #[error(transparent)]
    Runtime(#[from] RuntimeError),

    /// An option of [`crate::pipeline::slice`] that cannot work as given (a value out of range,
    /// no tokenizer for text calibration, an output that would overwrite the input), found before
    /// any long work and before anything is written. `option` is the field of
    /// [`crate::pipeline::Options`] (`output` for the output path).
    #[error("option `{option}`: {message}")]
    Invalid { option: &'static str, message: String },

    /// The work was asked to stop ([`crate::files::request_stop`]); nothing was written.
    #[error("interrupted; nothing was written")]
    Interrupted,

    /// What was being done when `source` happened.
    #[error("{doing}")]
    Context {
        doing: String,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// The error under any [`Error::Context`] layers: what went wrong, for matching on.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.root(),
            other => other,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
