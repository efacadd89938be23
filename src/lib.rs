//! onnx-slice: SliceGPT for exported ONNX transformer language models.
//!
//! Data flow: `onnx` (load) → `graph` (own IR) → … → `onnx` (save); `runtime` runs models in
//! ONNX Runtime.
pub mod cli;
pub mod error;
pub mod graph;
pub mod inspect;
pub mod onnx;
pub mod runtime;

pub use error::{Error, Result};
