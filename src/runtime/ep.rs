//! Execution providers: what the user asks for (`--ep cpu|cuda|auto`) and what a session got.

use std::fmt;
use std::str::FromStr;

use crate::error::RuntimeError;

/// The execution provider a user asks for.
///
/// `Auto` tries CUDA and falls back to the CPU, reporting why in [`EpChoice`].
/// The default is `Cpu`: it is always there and gives the same numbers everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ep {
    #[default]
    Cpu,
    Cuda,
    Auto,
}

impl FromStr for Ep {
    type Err = RuntimeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "auto" => Ok(Self::Auto),
            _ => Err(RuntimeError::UnknownEp(text.to_string())),
        }
    }
}

impl fmt::Display for Ep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Auto => "auto",
        })
    }
}

/// The execution provider a session really runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActiveEp {
    Cpu,
    Cuda,
}

impl fmt::Display for ActiveEp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "CPU",
            Self::Cuda => "CUDA",
        })
    }
}

/// What a session got, and, when `auto` fell back to the CPU, why CUDA was not used.
///
/// Displays as `CUDA`, `CPU`, or `CUDA unavailable (reason), using CPU`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpChoice {
    pub active: ActiveEp,
    pub cuda_unavailable: Option<String>,
}

impl EpChoice {
    pub(crate) fn cpu() -> Self {
        Self { active: ActiveEp::Cpu, cuda_unavailable: None }
    }

    pub(crate) fn cuda() -> Self {
        Self { active: ActiveEp::Cuda, cuda_unavailable: None }
    }

    pub(crate) fn cpu_because(reason: String) -> Self {
        Self { active: ActiveEp::Cpu, cuda_unavailable: Some(reason) }
    }

    /// True when `auto` wanted CUDA and had to use the CPU.
    pub fn fell_back(&self) -> bool {
        self.cuda_unavailable.is_some()
    }

    /// The line a user is shown about this choice: a CUDA→CPU fallback always ("note: CUDA
    /// unavailable (reason), using CPU": the work may take far longer than expected), the
    /// provider itself only when `verbose`.
    pub fn notice(&self, verbose: bool) -> Option<String> {
        if self.fell_back() {
            Some(format!("note: {self}"))
        } else if verbose {
            Some(format!("note: ONNX Runtime runs on the {} execution provider", self.active))
        } else {
            None
        }
    }
}

impl fmt::Display for EpChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cuda_unavailable {
            Some(reason) => write!(f, "CUDA unavailable ({reason}), using CPU"),
            None => write!(f, "{}", self.active),
        }
    }
}

/// The CUDA execution provider as onnx-slice uses it.
///
/// TF32 is off: with it the CUDA EP's f32 matmuls differ from the CPU EP by ~1e-3, without it
/// by ~1e-6, and SliceGPT's checks compare logits at 1e-4. A failed registration is an error
/// rather than a silent CPU fallback, so that `--ep cuda` never quietly runs on the CPU.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_provider() -> Result<ort::ep::ExecutionProviderDispatch, RuntimeError> {
    Ok(ort::ep::CUDA::default().with_tf32(false).build().error_on_failure())
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn cuda_provider() -> Result<ort::ep::ExecutionProviderDispatch, RuntimeError> {
    Err(RuntimeError::CudaUnavailable {
        reason: "onnx-slice was built without its `cuda` cargo feature".into(),
    })
}
