//! The error type of the ONNX Runtime layer (`runtime`): every message names what failed and what
//! to do. Here, below every layer, so that the crate's `Error` wraps it without depending on
//! `runtime`; `runtime` re-exports it.

use std::path::PathBuf;

use std::fmt;

use super::NpyError;

/// Everything that can go wrong while loading ONNX Runtime, building a session or running it.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime library not found: tried {} ({origin}). Run scripts/setup-ort.sh to install \
         ONNX Runtime {} at the default location{}, or pass --ort-lib PATH (or set \
         ORT_DYLIB_PATH) to point at an existing libonnxruntime.so",
        path.display(),
        version,
        default_hint(default.as_ref())
    )]
    LibraryNotFound {
        path: PathBuf,
        origin: LibrarySource,
        default: Option<PathBuf>,
        /// The ONNX Runtime version onnx-slice is built for.
        version: &'static str,
    },

    #[error(
        "cannot work out where ONNX Runtime is installed: HOME, XDG_CACHE_HOME and ONNX_SLICE_HOME \
         are all unset. Pass --ort-lib PATH or set ORT_DYLIB_PATH"
    )]
    NoDefaultLibraryLocation,

    #[error(
        "failed to load ONNX Runtime from {}: {reason}. It must be ONNX Runtime {} (or a newer \
         1.x) for this platform; scripts/setup-ort.sh installs the right one",
        path.display(),
        version
    )]
    LibraryLoad { path: PathBuf, reason: String, version: &'static str },

    #[error(
        "ONNX Runtime is already loaded from {} in this process; it cannot be reloaded from {}",
        loaded.display(),
        requested.display()
    )]
    AlreadyInitialised { loaded: PathBuf, requested: PathBuf },

    #[error("failed to create the ONNX Runtime environment: {reason}")]
    Environment { reason: String },

    #[error("unknown execution provider `{0}`: expected one of cpu, cuda, auto")]
    UnknownEp(String),

    #[error(
        "the CUDA execution provider is unavailable: {reason}. It needs an NVIDIA GPU, CUDA 13 and \
         libonnxruntime_providers_cuda.so from onnxruntime-gpu 1.31.1 beside libonnxruntime; \
         use --ep cpu, or --ep auto to fall back to the CPU"
    )]
    CudaUnavailable { reason: String },

    #[error("{step} failed for {model}: {reason}")]
    Session { model: String, step: SessionStep, reason: String },

    #[error("{model} has no input named `{name}`; its inputs are: {}", expected.join(", "))]
    UnknownInput { model: String, name: String, expected: Vec<String> },

    #[error("{model} has no output named `{name}`; its outputs are: {}", available.join(", "))]
    UnknownOutput { model: String, name: String, available: Vec<String> },

    #[error(
        "{model}: output `{output}` has element type {element_type}, which onnx-slice cannot read"
    )]
    UnsupportedOutputType { model: String, output: String, element_type: String },

    #[error("expected a {expected} tensor, got {found}")]
    WrongElementType { expected: String, found: String },

    #[error(transparent)]
    Npy(#[from] NpyError),
}

/// Where the chosen library path came from, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibrarySource {
    Flag,
    EnvVar,
    Default,
}

impl fmt::Display for LibrarySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Flag => "from --ort-lib",
            Self::EnvVar => "from ORT_DYLIB_PATH",
            Self::Default => "the default location",
        })
    }
}

/// The stage of a session's life an ONNX Runtime error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStep {
    Configure,
    Load,
    PrepareInputs,
    Run,
    ReadOutputs,
}

impl fmt::Display for SessionStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Configure => "configuring the ONNX Runtime session",
            Self::Load => "loading the model into ONNX Runtime",
            Self::PrepareInputs => "preparing the inputs",
            Self::Run => "running the model",
            Self::ReadOutputs => "reading the outputs",
        })
    }
}

fn default_hint(default: Option<&PathBuf>) -> String {
    default.map_or_else(String::new, |path| format!(" ({})", path.display()))
}
