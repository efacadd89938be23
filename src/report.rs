//! `--report FILE.json`: what a slicing run did, for CI jobs that gate model size.
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::calibrate::{Calibrated, Timings};
use crate::inspect::ModelSummary;
use crate::onnx::Saved;
use crate::transform::{Dimensions, Rewritten};

#[derive(Debug, Serialize)]
pub struct Report {
    pub input: String,
    pub output: String,
    pub external_data: Option<String>,
    pub ratio: f64,
    pub round_to: usize,
    pub slice_head: bool,
    pub orientation: String,
    /// Which stream points share a basis: point, block or global.
    pub basis: crate::transform::BasisMode,
    /// `--target-size` / `--target-params`, and the limit it set (bytes or parameters).
    pub target: Option<crate::size::Budget>,
    pub target_limit: Option<u64>,
    /// Every embedding row's mean was subtracted (`--center-embeddings` on an RMSNorm model).
    pub centered_embeddings: bool,
    /// D, the original residual stream width.
    pub stream_width: usize,
    /// k at every stream point (embeddings first, the head's input last).
    pub widths: Vec<usize>,
    pub blocks: usize,
    /// Parameters and bytes of the floating-point initializers (weights, biases, shortcuts).
    pub parameters_before: u64,
    pub parameters_after: u64,
    /// Of `parameters_after`: the k_a×k_b matrices on the residual skip paths.
    pub shortcut_parameters: u64,
    pub weight_bytes_before: u64,
    pub weight_bytes_after: u64,
    /// Bytes written: the model file and its external data file.
    pub file_bytes_after: u64,
    pub calibration_tokens: u64,
    pub calibration_source: Option<String>,
    pub seconds: Seconds,
}

#[derive(Debug, Serialize)]
pub struct Seconds {
    #[serde(flatten)]
    pub phases: Timings,
    pub save_seconds: f64,
    pub total_seconds: f64,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        input: &Path,
        saved: &Saved,
        rewritten: &Rewritten,
        dims: &Dimensions,
        orientation: &str,
        before: &ModelSummary,
        after: &ModelSummary,
        calibration: Option<&Calibrated>,
        save_seconds: f64,
        started: Instant,
    ) -> Self {
        let shortcut_parameters = shortcut_parameters(&rewritten.widths, &rewritten.groups);
        Report {
            input: input.display().to_string(),
            output: saved.path.display().to_string(),
            external_data: saved.data_file.as_ref().map(|(p, _)| p.display().to_string()),
            ratio: dims.ratio,
            round_to: dims.round_to,
            slice_head: dims.slice_head,
            orientation: orientation.to_string(),
            basis: dims.basis,
            target: None,
            target_limit: None,
            centered_embeddings: rewritten.centered_embeddings,
            stream_width: rewritten.layout.width,
            widths: rewritten.widths.clone(),
            blocks: rewritten.layout.block_count(),
            parameters_before: before.weights.parameters,
            parameters_after: after.weights.parameters,
            shortcut_parameters,
            weight_bytes_before: before.weights.bytes,
            weight_bytes_after: after.weights.bytes,
            file_bytes_after: saved.model_bytes + saved.data_file.as_ref().map_or(0, |(_, n)| *n),
            calibration_tokens: calibration.map_or(0, |c| c.tokens),
            calibration_source: calibration.map(|c| c.source.clone()),
            seconds: Seconds {
                phases: calibration.map(|c| c.timings.clone()).unwrap_or_default(),
                save_seconds,
                total_seconds: started.elapsed().as_secs_f64(),
            },
        }
    }
}

/// One `k_p × k_{p+1}` matrix on the skip path of every segment whose ends have different bases.
fn shortcut_parameters(widths: &[usize], groups: &[usize]) -> u64 {
    widths
        .windows(2)
        .zip(groups.windows(2))
        .filter(|(_, g)| g[0] != g[1])
        .map(|(w, _)| (w[0] * w[1]) as u64)
        .sum()
}
