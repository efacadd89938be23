//! onnx-slice: SliceGPT for exported ONNX transformer language models.
//!
//! Data flow: `onnx` (load) → `graph` (own IR) → … → `onnx` (save); `runtime` runs models in
//! ONNX Runtime.
pub mod algebra;
pub mod analysis;
pub mod calibrate;
pub mod error;
pub mod eval;
pub mod export;
pub mod files;
pub mod fuse;
pub mod graph;
pub mod inspect;
pub mod interface;
pub mod method;
pub mod onnx;
pub mod pattern;
pub mod pca;
pub mod pipeline;
pub mod protobuf;
pub mod provenance;
pub mod report;
pub mod rotate;
pub mod runtime;
pub mod size;
pub mod slicegpt;
pub mod structure;

pub use error::{Error, Result};
pub use pipeline::{plan, slice, Options};
