//! What a compression method is to the pipeline: one implementation of [`Method`]. The pipeline
//! analyses the model once (`analysis`), asks the method to plan for the budget before any long
//! work (the sizes it will write, which `--dry-run` prints and the budget check trusts), then to
//! apply itself: calibrate, observing what it needs in the segments it runs
//! (`calibrate::Runner`: the stream's covariance for SliceGPT's PCA, the moments of an MLP's
//! activations for `inner`), and rewrite the model. Saving, the budget's final check, the
//! metadata and the report are the pipeline's, the same for every method.
use std::path::Path;

use indicatif::ProgressBar;

use crate::analysis::Analysis;
use crate::calibrate::data::CalibrationSet;
use crate::calibrate::{CalibrationRun, Settings};
use crate::error::Result;
use crate::graph::{Model, TensorSink};
use crate::size::{Budget, Plan, Prediction};

/// A compression method: its options, and what it does with them.
pub trait Method {
    /// What [`Method::plan`] decides and [`Method::apply`] follows.
    type Plan;

    /// The method's name, as `--method` takes it and reports and metadata show it.
    fn name(&self) -> &'static str;

    /// The options that cannot work whatever the model, each [`crate::Error::Invalid`] naming its
    /// field; `budget` is the run's size target, if any.
    fn check(&self, budget: Option<&Budget>) -> Result<()>;

    /// Whether [`Method::apply`] runs calibration data through the model (the pipeline then
    /// prepares the data and ONNX Runtime first).
    fn calibrates(&self) -> bool;

    /// What the method will do to this model: within `budget` when there is one ([`crate::Error::Budget`]
    /// when nothing fits), with the output's parameters and bytes predicted exactly.
    fn plan(
        &self,
        sizes: &Plan,
        analysis: &Analysis,
        budget: Option<&Budget>,
        round_to: usize,
    ) -> Result<(Self::Plan, Prediction)>;

    /// Rewrites the model as planned.
    fn apply(&self, plan: Self::Plan, work: Work<'_>) -> Result<Applied>;
}

/// What [`Method::apply`] works with.
pub struct Work<'a> {
    /// The model file (for messages, and the folder of its external data and config files).
    pub input: &'a Path,
    /// The analysed model, rewritten in place.
    pub model: &'a mut Model,
    pub analysis: &'a Analysis,
    /// The calibration data, when the method calibrates.
    pub calibration: Option<CalibrationSet>,
    pub settings: Settings,
    pub progress: &'a ProgressBar,
    /// Takes every tensor the moment it is final (the output's data file: docs/design.md §8).
    pub finished: &'a mut dyn TensorSink,
}

/// What a method did, for the metadata and the report.
#[derive(Debug, Clone)]
pub struct Applied {
    /// D, the original residual stream width.
    pub stream_width: usize,
    /// The stream's width at every point (D everywhere when the method keeps it).
    pub widths: Vec<usize>,
    /// The basis group of every point (a shortcut matrix sits between groups).
    pub groups: Vec<usize>,
    pub blocks: usize,
    /// SliceGPT's ratio, whether the head's input was sliced, and the basis option (`None` for a
    /// method that keeps the stream).
    pub ratio: f64,
    pub slice_head: bool,
    pub basis: Option<String>,
    /// How the method oriented the stream (SliceGPT), for the report: "pca (N calibration
    /// tokens)", "random-basis (seed 1)", "identity".
    pub orientation: String,
    /// The `onnx_slice.*` metadata entries after the version (keys without the prefix).
    pub metadata: Vec<(String, String)>,
    pub centered_embeddings: bool,
    pub calibration: Option<CalibrationRun>,
    /// Every block's MLP width, when the method changed them.
    pub mlp_widths: Option<Vec<usize>>,
}
