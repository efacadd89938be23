//! `--report FILE.json`: what a slicing run did, for CI jobs that gate model size.
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::calibrate::Timings;
use crate::inspect::ModelSummary;
use crate::method::Applied;
use crate::onnx::Saved;

/// The version of [`Report`]'s layout: raised when a field changes meaning or goes away (not
/// when one is added). Reports before this field existed are version 0; version 2 added `method`
/// and `mlp_widths`, and `basis` became null for a method that keeps the stream.
pub const SCHEMA_VERSION: u32 = 2;

#[derive(Debug, Serialize)]
pub struct Report {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The onnx-slice that wrote it, e.g. "onnx-slice 0.1.0".
    pub tool: String,
    pub input: String,
    /// SHA-256 of the input model file (hex), the first of `input_files`.
    pub input_sha256: String,
    /// Every file the input was read from (the model file, then its external data files).
    pub input_files: Vec<InputFile>,
    pub output: String,
    /// The method that compressed the model: `slicegpt` or `neurons`.
    pub method: String,
    pub external_data: Option<String>,
    /// Bytes of the external data file, when one was written.
    pub external_data_bytes: Option<u64>,
    pub ratio: f64,
    pub round_to: usize,
    pub slice_head: bool,
    pub orientation: String,
    /// Which stream points share a basis: point, block or global.
    pub basis: Option<String>,
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
    /// Every block's MLP width after the rewrite, when the method changed them (`neurons`).
    pub mlp_widths: Option<Vec<usize>>,
    /// Parameters and bytes of the floating-point initializers (weights, biases, shortcuts).
    pub parameters_before: u64,
    pub parameters_after: u64,
    /// Of `parameters_after`: the k_a×k_b matrices on the residual skip paths.
    pub shortcut_parameters: u64,
    /// The MatMuls to leave in float when quantizing the output (a quantizer's
    /// `nodes_to_exclude`), each with its reason; also in the model's metadata.
    pub quantize_exclude: Vec<crate::quantizers::FloatNode>,
    pub weight_bytes_before: u64,
    pub weight_bytes_after: u64,
    /// Bytes written: the model file and its external data file.
    pub file_bytes_after: u64,
    pub calibration_tokens: u64,
    pub calibration_source: Option<String>,
    /// The ONNX Runtime version that calibrated (as the loaded library reports it); `null` when
    /// no calibration ran (orientation identity or random-basis).
    pub onnx_runtime: Option<String>,
    /// The execution provider calibration asked for (cpu, cuda, auto) and the one it ran on (CPU,
    /// CUDA); `null` without calibration.
    pub execution_provider_requested: Option<String>,
    pub execution_provider: Option<String>,
    /// Why `auto` ran on the CPU instead of CUDA.
    pub cuda_unavailable: Option<String>,
    /// Warnings about the calibration data (as printed while slicing).
    pub warnings: Vec<String>,
    pub seconds: Seconds,
}

/// One file the input model was read from.
#[derive(Debug, Clone, Serialize)]
pub struct InputFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
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
        method: &str,
        applied: &Applied,
        round_to: usize,
        before: &ModelSummary,
        after: &ModelSummary,
        save_seconds: f64,
        started: Instant,
    ) -> Self {
        let calibration = applied.calibration.as_ref();
        Report {
            schema_version: SCHEMA_VERSION,
            tool: format!("onnx-slice {}", env!("CARGO_PKG_VERSION")),
            input: input.display().to_string(),
            input_sha256: String::new(),
            input_files: Vec::new(),
            output: saved.path.display().to_string(),
            method: method.to_string(),
            external_data: saved.data_file.as_ref().map(|(p, _)| p.display().to_string()),
            external_data_bytes: saved.data_file.as_ref().map(|(_, n)| *n),
            ratio: applied.ratio,
            round_to,
            slice_head: applied.slice_head,
            orientation: applied.orientation.clone(),
            basis: applied.basis.clone(),
            target: None,
            target_limit: None,
            centered_embeddings: applied.centered_embeddings,
            stream_width: applied.stream_width,
            widths: applied.widths.clone(),
            blocks: applied.blocks,
            mlp_widths: applied.mlp_widths.clone(),
            parameters_before: before.weights.parameters,
            parameters_after: after.weights.parameters,
            shortcut_parameters: 0,
            quantize_exclude: Vec::new(),
            weight_bytes_before: before.weights.bytes,
            weight_bytes_after: after.weights.bytes,
            file_bytes_after: saved.model_bytes + saved.data_file.as_ref().map_or(0, |(_, n)| *n),
            calibration_tokens: calibration.map_or(0, |c| c.tokens),
            calibration_source: calibration.map(|c| c.source.clone()),
            onnx_runtime: None,
            execution_provider_requested: None,
            execution_provider: None,
            cuda_unavailable: None,
            warnings: Vec::new(),
            seconds: Seconds {
                phases: calibration.map(|c| c.timings.clone()).unwrap_or_default(),
                save_seconds,
                total_seconds: started.elapsed().as_secs_f64(),
            },
        }
    }
}

impl Report {
    /// The execution provider a run got.
    pub fn set_execution_provider(&mut self, choice: Option<&crate::runtime::EpChoice>) {
        self.execution_provider = choice.map(|c| c.active.to_string());
        self.cuda_unavailable = choice.and_then(|c| c.cuda_unavailable.clone());
    }

    /// What a slicing wrote, for people: widths, parameters and bytes before → after, and the
    /// files.
    pub fn summary(&self) -> String {
        let totals = |parameters, bytes| crate::size::Totals { parameters, bytes };
        let mut out = crate::inspect::size_summary(
            self.stream_width,
            &self.widths,
            self.blocks,
            totals(self.parameters_before, self.weight_bytes_before),
            totals(self.parameters_after, self.weight_bytes_after),
        );
        if let Some(widths) = &self.mlp_widths {
            out += &format!("MLP widths: {}\n", crate::inspect::width_list(widths));
        }
        out += &format!("wrote {}", self.output);
        if let (Some(data), Some(len)) = (&self.external_data, self.external_data_bytes) {
            out.push_str(&format!(" and {data} ({} bytes)", crate::inspect::group_thousands(len)));
        }
        out.push('\n');
        out
    }
}
