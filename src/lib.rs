//! onnx-slice: compresses exported ONNX transformer language models and writes smaller, ordinary
//! ONNX models: SliceGPT (the residual stream rotated and sliced) and methods that keep its width.
//!
//! What a caller needs is at the crate's root: [`slice`] (and [`plan`], what it would write)
//! with [`Options`], choosing a method in [`MethodOptions`] ([`SliceGpt`], [`Neurons`], [`Combined`]); the [`Report`] or
//! [`DryRun`] they return; [`Error`]; and [`inspect_model`] to describe a model. The command
//! line (`onnx-slice`) is one call of [`slice`].
//!
//! The modules are the implementation, in the order the data flows (docs/design.md §5):
//! `onnx` (load) → `graph` (own IR) → `analysis` (`structure`, `pattern`) → a method (`slicegpt`:
//! `fuse`, `calibrate`, `pca`, `rotate`) → `onnx` (save). They are public for the project's own
//! tests and benchmarks and hidden from the documentation: their items change without notice.
#[doc(hidden)]
pub mod algebra;
#[doc(hidden)]
pub mod analysis;
#[doc(hidden)]
pub mod calibrate;
#[doc(hidden)]
pub mod combined;
pub mod error;
#[doc(hidden)]
pub mod eval;
#[doc(hidden)]
pub mod export;
#[doc(hidden)]
pub mod files;
#[doc(hidden)]
pub mod fuse;
#[doc(hidden)]
pub mod graph;
#[doc(hidden)]
pub mod inspect;
#[doc(hidden)]
pub mod interface;
#[doc(hidden)]
pub mod method;
#[doc(hidden)]
pub mod neurons;
#[doc(hidden)]
pub mod onnx;
#[doc(hidden)]
pub mod pattern;
#[doc(hidden)]
pub mod pca;
pub mod pipeline;
#[doc(hidden)]
pub mod protobuf;
#[doc(hidden)]
pub mod provenance;
#[doc(hidden)]
pub mod quantizers;
pub mod report;
#[doc(hidden)]
pub mod rotate;
#[doc(hidden)]
pub mod runtime;
#[doc(hidden)]
pub mod size;
#[doc(hidden)]
pub mod slicegpt;
#[doc(hidden)]
pub mod structure;

pub use combined::Combined;
pub use error::{Error, Result};
pub use inspect::{LayoutSummary, ModelSummary};
pub use neurons::Neurons;
pub use onnx::Storage;
pub use pipeline::{
    plan, slice, CalibrationData, DryRun, MethodOptions, Notice, NoticeHook, Options,
};
pub use report::Report;
pub use runtime::{Ep, LogLevel};
pub use size::{Budget, Totals};
pub use slicegpt::{BasisMode, Orientation, SliceGpt};

/// What `onnx-slice inspect` says of a model file or export folder: its summary (producer,
/// opsets, inputs and outputs, operators, parameters, what onnx-slice did to it if it wrote it)
/// and the transformer detection finds in it (with every block's roles), or where detection
/// stopped. `explain` adds every normalization candidate the matchers rejected, and why.
pub fn inspect_model(
    model: &std::path::Path,
    explain: bool,
) -> Result<(ModelSummary, LayoutSummary)> {
    let input = export::resolve_input(model)?.model;
    let loaded = onnx::load(&input)?;
    Ok((inspect::summarize(&loaded), inspect::describe_layout(&loaded, explain)))
}
