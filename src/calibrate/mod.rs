//! Calibration through ONNX Runtime, shared by the methods: the model cut into segments, one per
//! pair of consecutive stream points (docs/design.md §2), each run once over the calibration set
//! on the stream the segment before it produced. A run returns its output stream and what the
//! method asked to observe in it: the output stream's covariance (SliceGPT's PCA), the moments of
//! a value inside the segment (an MLP's activations). Methods decide what to run, in which order,
//! and what to change between runs.
pub mod data;
mod segment;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use ndarray::{Array2, ArrayD, Ix2, IxDyn};

use crate::algebra;
use crate::error::{Error, Result};
use crate::graph::{DataType, Graph, Model, ValueInfo};
use crate::interface::InputPlan;
use crate::pca::{principal_basis, Basis, Covariance};
use crate::runtime::{EpChoice, ModelSession, RunOutputs, SessionConfig, TensorValue};
use crate::structure::Layout;
use data::CalibrationSet;

const PASS: &str = "calibrate";

/// How calibration runs, whatever the method.
#[derive(Clone)]
pub struct Settings {
    /// Calibration sequences per ONNX Runtime run.
    pub batch: usize,
    pub session: SessionConfig,
    /// The model file: its folder holds the segments' external data and the config files that
    /// give an empty KV cache's shape.
    pub model_path: Option<PathBuf>,
    /// Told the execution provider of the first session, and of any later one that got another.
    pub on_execution_provider: Option<EpHook>,
}

/// Receives the execution provider ONNX Runtime gave a calibration session.
pub type EpHook = std::sync::Arc<dyn Fn(&EpChoice) + Send + Sync>;

/// Where calibration's time went.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Timings {
    pub fuse_seconds: f64,
    /// Cutting segment models out of the graph and creating their ONNX Runtime sessions.
    pub session_seconds: f64,
    /// Running the segments over the calibration set.
    pub runtime_seconds: f64,
    /// Accumulating statistics (covariances, correlations) and decomposing them.
    pub pca_seconds: f64,
    /// Rewriting weights (rotating, slicing, refitting).
    pub rotate_seconds: f64,
}

/// What a calibration run tells the report.
#[derive(Debug, Clone, Default)]
pub struct CalibrationRun {
    pub tokens: u64,
    /// Where the calibration tokens came from.
    pub source: String,
    pub timings: Timings,
    /// The execution provider of the last session calibration ran (every session asks for the
    /// same one; `auto` could in principle get CUDA for one and the CPU for another).
    pub ep: Option<EpChoice>,
}

/// The moments of a value's rows over the calibration tokens: `Σ hᵀh` and `Σ h` (f64), padding
/// left out. The value's last axis is its width.
#[derive(Debug, Clone)]
pub struct Moments {
    pub value: String,
    pub gram: Covariance,
    pub sum: Vec<f64>,
}

impl Moments {
    pub fn new(value: impl Into<String>, width: usize) -> Self {
        Moments { value: value.into(), gram: Covariance::new(width), sum: vec![0.0; width] }
    }

    fn add(&mut self, rows: &[f32], mask: &[bool]) {
        let width = self.sum.len();
        for (row, _) in rows.chunks_exact(width).zip(mask).filter(|(_, &real)| real) {
            for (s, &x) in self.sum.iter_mut().zip(row) {
                *s += x as f64;
            }
        }
        self.gram.add_rows(rows, Some(mask));
    }
}

/// One calibration batch: token ids `[b, L]`, their attention mask, and which tokens are real.
pub struct Batch {
    ids: Array2<i64>,
    mask: Array2<i64>,
    rows: Vec<bool>,
}

impl Batch {
    pub fn new(ids: ArrayD<i64>, mask: ArrayD<i64>) -> Result<Self> {
        let matrix = |a: ArrayD<i64>| {
            a.into_dimensionality::<Ix2>().map_err(|e| Error::Pass {
                pass: PASS,
                node: "(calibration data)".into(),
                message: format!("token ids must be [batch, length]: {e}"),
            })
        };
        let rows = mask.iter().map(|&m| m != 0).collect();
        Ok(Batch { ids: matrix(ids)?, mask: matrix(mask)?, rows })
    }

    pub fn real_tokens(&self) -> u64 {
        self.rows.iter().filter(|&&r| r).count() as u64
    }

    /// Which rows of the batch's flattened tokens are real (not padding).
    pub fn rows(&self) -> &[bool] {
        &self.rows
    }
}

/// The calibration set in batches of `batch` sequences.
pub fn batches(set: &CalibrationSet, batch: usize) -> Result<Vec<Batch>> {
    set.batches(batch.max(1)).map(|(ids, mask)| Batch::new(ids, mask)).collect()
}

/// Runs segments of one model over the calibration batches.
pub struct Runner<'a> {
    shell: &'a Model,
    pub layout: &'a Layout,
    settings: &'a Settings,
    pub batches: &'a [Batch],
    pub progress: &'a ProgressBar,
    pub timings: &'a mut Timings,
    /// The execution provider the latest session got.
    ep: &'a mut Option<EpChoice>,
    /// How the model's own inputs (ids, mask, positions, empty KV cache) are filled.
    plan: InputPlan,
    /// Where the stream is cut at each point.
    cuts: Vec<segment::Cut>,
    /// No calibration token is padding.
    unpadded: bool,
}

impl<'a> Runner<'a> {
    /// The model's inputs are planned from its declarations; the stream's cuts are found here,
    /// their ranks as the segments run. `shell` is the model without its graph (the segments get
    /// the graph they are cut from).
    pub fn new(
        shell: &'a Model,
        graph: &Graph,
        layout: &'a Layout,
        settings: &'a Settings,
        batches: &'a [Batch],
        progress: &'a ProgressBar,
        (timings, ep): (&'a mut Timings, &'a mut Option<EpChoice>),
    ) -> Result<Self> {
        let label = settings
            .model_path
            .as_deref()
            .map_or_else(|| "the model".to_string(), |p| p.display().to_string());
        let plan = InputPlan::for_graph(graph, &label, settings.model_path.as_deref())?;
        let dtype = stream_dtype(graph, layout)?;
        let cuts = segment::stream_cuts(graph, layout)
            .into_iter()
            .map(|value| segment::Cut { value, rank: None, dtype })
            .collect();
        let unpadded = batches.iter().all(|b| b.rows.iter().all(|&real| real));
        Ok(Runner { shell, layout, settings, batches, progress, timings, ep, plan, cuts, unpadded })
    }

    /// Runs segment `point` → `point + 1` (or the embeddings, for `None`) over every batch; returns
    /// the covariance of its output stream and the output itself (original basis, full width).
    pub fn segment(
        &mut self,
        graph: &Graph,
        point: Option<usize>,
        stream: Option<&[ArrayD<f32>]>,
        widths: &[usize],
    ) -> Result<(Covariance, Vec<ArrayD<f32>>)> {
        let mut cov = Covariance::new(self.layout.width);
        let outputs = self.run(graph, point, stream, widths, Some(&mut cov), &mut [])?;
        Ok((cov, outputs))
    }

    /// Runs a segment like [`Runner::segment`], accumulating the moments of each of `observe`'s
    /// values (values the segment computes), and the output stream's covariance into `covariance`
    /// when given. Returns the output stream.
    pub fn run(
        &mut self,
        graph: &Graph,
        point: Option<usize>,
        stream: Option<&[ArrayD<f32>]>,
        widths: &[usize],
        mut covariance: Option<&mut Covariance>,
        observe: &mut [Moments],
    ) -> Result<Vec<ArrayD<f32>>> {
        let started = Instant::now();
        let model = Model { graph: graph.clone(), ..self.shell.clone() };
        let mut sub =
            segment::segment_model(model, self.layout, point, widths, &self.cuts, self.unpadded)?;
        for moments in observe.iter() {
            let declared = ValueInfo::tensor_of_rank_unknown(&moments.value, self.cuts[0].dtype);
            sub.graph.outputs.push(declared);
        }
        let mut session = session_for(&sub, self.settings)?;
        self.note_execution_provider(session.ep());
        let setup = started.elapsed();
        self.timings.session_seconds += setup.as_secs_f64();
        let input_name = point.map(|p| self.cuts[p].value.clone());
        let output_name = sub.graph.outputs[0].name.clone();
        let observed: Vec<String> = observe.iter().map(|m| m.value.clone()).collect();
        let mut wanted: Vec<&str> = vec![output_name.as_str()];
        wanted.extend(observed.iter().map(String::as_str));
        let mut outputs = Vec::with_capacity(self.batches.len());
        let mut pca_time = Duration::ZERO;
        for (b, batch) in self.batches.iter().enumerate() {
            crate::files::check_stop()?;
            let feeds = self.feeds(&sub, batch, input_name.as_deref(), stream.map(|s| &s[b]))?;
            let named: Vec<(&str, &TensorValue)> =
                feeds.iter().map(|(n, v)| (n.as_str(), v)).collect();
            let mut result = session.run_for(&named, &wanted)?;
            let y = float_output(&mut result, &output_name)?;
            self.cuts[point.map_or(0, |p| p + 1)].rank = Some(y.ndim());
            let pca_started = Instant::now();
            if let Some(cov) = covariance.as_deref_mut() {
                let rows = standard_rows(&y, self.layout.width, batch.rows.len(), &output_name)?;
                cov.add_rows(rows.as_slice().unwrap_or(&[]), Some(&batch.rows));
            }
            for moments in observe.iter_mut() {
                let h = float_output(&mut result, &moments.value)?;
                let width = moments.sum.len();
                let rows = standard_rows(&h, width, batch.rows.len(), &moments.value)?;
                moments.add(rows.as_slice().unwrap_or(&[]), &batch.rows);
            }
            pca_time += pca_started.elapsed();
            outputs.push(y);
            self.progress.inc(1);
        }
        self.timings.pca_seconds += pca_time.as_secs_f64();
        self.timings.runtime_seconds += (started.elapsed() - pca_time - setup).as_secs_f64();
        Ok(outputs)
    }

    /// The inputs a segment model declares: the model's own, filled by the plan, and the stream.
    fn feeds(
        &self,
        model: &Model,
        batch: &Batch,
        stream_input: Option<&str>,
        stream: Option<&ArrayD<f32>>,
    ) -> Result<Vec<(String, TensorValue)>> {
        let mut own = self.plan.feed(&batch.ids, Some(&batch.mask))?;
        let mut feeds = Vec::new();
        for input in &model.graph.inputs {
            if Some(input.name.as_str()) == stream_input {
                let stream = stream.cloned().unwrap_or_default();
                let value = match self.cuts[0].dtype {
                    DataType::Float16 => TensorValue::F16(stream.mapv(half::f16::from_f32)),
                    _ => TensorValue::F32(stream),
                };
                feeds.push((input.name.clone(), value));
                continue;
            }
            let Some(i) = own.iter().position(|(name, _)| *name == input.name) else {
                return Err(Error::Pass {
                    pass: PASS,
                    node: input.name.clone(),
                    message: "the model has an input onnx-slice does not know how to fill for calibration".into(),
                });
            };
            feeds.push(own.swap_remove(i));
        }
        Ok(feeds)
    }

    fn note_execution_provider(&mut self, choice: &EpChoice) {
        if self.ep.as_ref() != Some(choice) {
            if let Some(hook) = &self.settings.on_execution_provider {
                hook(choice);
            }
            *self.ep = Some(choice.clone());
        }
    }

    /// The principal basis of a covariance (its time counted as PCA).
    pub fn basis(&mut self, cov: &Covariance) -> Result<Basis> {
        let started = Instant::now();
        let basis = principal_basis(cov, crate::pca::DEFAULT_DAMPING)?;
        self.timings.pca_seconds += started.elapsed().as_secs_f64();
        Ok(basis)
    }
}

/// A run's output as f32 (float16 values widen exactly).
fn float_output(result: &mut RunOutputs, name: &str) -> Result<ArrayD<f32>> {
    result.remove(name).and_then(stream_as_f32).ok_or_else(|| Error::Pass {
        pass: PASS,
        node: name.to_string(),
        message: "the stream is not a float32 or float16 tensor".into(),
    })
}

/// The stream's element type, when calibration can run it: float32, or float16 (ONNX Runtime's
/// CPU provider runs float16 graphs, casting up around the kernels it lacks). The activations are
/// kept in float32 between segments, as the float16 model's own rounding leaves them.
fn stream_dtype(graph: &Graph, layout: &Layout) -> Result<DataType> {
    match algebra::created_dtype(algebra::stream_dtype(graph, layout)) {
        dtype @ (DataType::Float | DataType::Float16) => Ok(dtype),
        other => Err(Error::Pass {
            pass: PASS,
            node: layout.embeddings[0].output.clone(),
            message: format!(
                "calibration runs float32 and float16 models; this one's stream is {} (ONNX Runtime's CPU provider has no kernels for \
                 it): convert the model to float16 or float32 first (SliceGPT can also rotate without calibration: --orientation \
                 random-basis|identity)",
                other.name()
            ),
        }),
    }
}

/// A segment's output as f32 (float16 values widen exactly).
fn stream_as_f32(value: TensorValue) -> Option<ArrayD<f32>> {
    match value {
        TensorValue::F32(y) => Some(y),
        TensorValue::F16(y) => Some(y.mapv(half::f16::to_f32)),
        _ => None,
    }
}

fn session_for(model: &Model, settings: &Settings) -> Result<ModelSession> {
    let bytes = crate::onnx::to_bytes(model)?;
    let dir = settings.model_path.as_deref().and_then(Path::parent);
    Ok(ModelSession::from_bytes(&bytes, dir, &settings.session)?)
}

/// A value as contiguous rows of `width`, one per token of the batch.
fn standard_rows<'y>(
    y: &'y ArrayD<f32>,
    width: usize,
    tokens: usize,
    name: &str,
) -> Result<ndarray::CowArray<'y, f32, IxDyn>> {
    if y.shape().last() != Some(&width) || y.len() != tokens * width {
        return Err(Error::Pass {
            pass: PASS,
            node: name.into(),
            message: format!(
                "stream tensor of shape {:?}, expected {tokens} tokens of width {width}",
                y.shape()
            ),
        });
    }
    Ok(y.as_standard_layout())
}
