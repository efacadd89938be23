//! Calibration through ONNX Runtime, shared by the methods: the model cut into segments, one per
//! pair of consecutive stream points (docs/design.md §2), each run once over the calibration set
//! on the stream the segment before it produced. A run returns its output stream and what the
//! method asked to observe in it: the output stream's covariance (SliceGPT's PCA), the moments of
//! a value inside the segment (an MLP's activations). Methods decide what to run, in which order,
//! and what to change between runs.
pub mod data;
mod segment;
pub mod statistics;

use statistics::MomentsRequest;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use faer::{Mat, MatRef};
use indicatif::ProgressBar;
use ndarray::{Array2, ArrayD, Ix2, IxDyn};

use crate::algebra;
use crate::error::{Error, Result};
use crate::graph::{toposort, DataType, Graph, Model, ValueInfo};
use crate::interface::InputPlan;
use crate::pca::{principal_basis, Basis, Covariance};
use crate::runtime::{
    BoundOutputs, DeviceTensor, EpChoice, Feed, ModelSession, Placement, RunOutputs, SessionConfig,
    SharedArena, TensorValue,
};
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
    /// Where the statistics a method observes are computed.
    pub statistics: Statistics,
}

/// Where a segment's statistics (Gram matrices, sums) are computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Statistics {
    /// In the segment model, in the execution provider's GEMM, summed over the batches in double
    /// where the segment runs; the host adds the sums into its f64 accumulators once per segment.
    /// The stream stays where the segment ran.
    #[default]
    InGraph,
    /// On the host in f64 from the rows themselves (the stream is read back after every run): the
    /// reference the in-graph statistics are tested against.
    Host,
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

    fn add_gram(&mut self, gram: &[f64], sum: &[f64], tokens: u64) {
        for (s, &x) in self.sum.iter_mut().zip(sum) {
            *s += x;
        }
        self.gram.add_gram(gram, tokens);
    }
}

/// The calibration stream after a segment: one tensor per batch, in the model's element type,
/// where the segment ran; and the projection SliceGPT gave it since, applied by the segment that
/// reads it next.
pub struct Stream {
    batches: Vec<DeviceTensor>,
    projection: Option<Mat<f64>>,
}

impl Stream {
    /// `y ← y Q` for every batch, as the next segment reads it.
    pub fn project(&mut self, q: MatRef<'_, f64>) -> Result<()> {
        let width = match &self.projection {
            Some(p) => p.ncols(),
            None => self.batches.first().and_then(|b| b.shape().last().copied()).unwrap_or(0),
        };
        if width != q.nrows() {
            return Err(Error::Pass {
                pass: PASS,
                node: "(stream)".into(),
                message: format!("stream of width {width}, basis of {} rows", q.nrows()),
            });
        }
        self.projection = Some(match self.projection.take() {
            Some(p) => &p * q,
            None => q.to_owned(),
        });
        Ok(())
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
    /// The sessions' CPU memory: one arena for all of them, kept warm from segment to segment.
    _arena: SharedArena,
    session: SessionConfig,
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
        let session = SessionConfig { shared_arena: true, ..settings.session.clone() };
        Ok(Runner {
            shell,
            layout,
            settings,
            batches,
            progress,
            timings,
            ep,
            plan,
            cuts,
            unpadded,
            _arena: SharedArena::acquire()?,
            session,
        })
    }

    /// Runs segment `point` → `point + 1` (or the embeddings, for `None`) over every batch; returns
    /// the covariance of its output stream and the output itself (original basis, full width).
    pub fn segment(
        &mut self,
        graph: &Graph,
        point: Option<usize>,
        stream: Option<&Stream>,
        widths: &[usize],
    ) -> Result<(Covariance, Stream)> {
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
        stream: Option<&Stream>,
        widths: &[usize],
        mut covariance: Option<&mut Covariance>,
        observe: &mut [Moments],
    ) -> Result<Stream> {
        let started = Instant::now();
        let segment =
            self.segment_model(graph, point, stream, widths, covariance.is_some(), observe)?;
        let mut session = session_for(&segment.model, self.settings, &self.session)?;
        self.note_execution_provider(session.ep());
        let setup = started.elapsed();
        self.timings.session_seconds += setup.as_secs_f64();
        let stream_placement = match self.settings.statistics {
            Statistics::InGraph => Placement::Device,
            Statistics::Host => Placement::HostKept,
        };
        let sums = segment.running_sums();
        let first_zeros: Vec<TensorValue> =
            sums.iter().map(|s| TensorValue::F64(ArrayD::zeros(IxDyn(&vec![1; s.rank])))).collect();
        let mut carried: Vec<DeviceTensor> = Vec::new();
        let mut outputs = Vec::with_capacity(self.batches.len());
        let mut pca_time = Duration::ZERO;
        for (b, batch) in self.batches.iter().enumerate() {
            crate::files::check_stop()?;
            // The sums stay where the segment runs until the last batch brings them back (to be
            // read in place: a 7B model's is 134 MB).
            let last = b + 1 == self.batches.len();
            let sum_placement = if last { Placement::HostKept } else { Placement::Device };
            let mut wanted = vec![(segment.output.as_str(), stream_placement)];
            wanted.extend(sums.iter().map(|s| (s.output.as_str(), sum_placement)));
            wanted.extend(segment.host_values.iter().map(|v| (v.as_str(), Placement::Host)));
            let result = {
                let own = self.plan.feed(&batch.ids, Some(&batch.mask))?;
                let real_rows = segment.masked.then(|| real_rows(batch));
                let before: Vec<(&str, Feed<'_>)> = sums
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let feed = carried.get(i).map_or(Feed::Host(&first_zeros[i]), Feed::Kept);
                        (s.input.as_str(), feed)
                    })
                    .collect();
                let input = stream.map(|s| &s.batches[b]);
                let feeds = segment_feeds(&segment, &own, input, real_rows.as_ref(), &before)?;
                session.run_bound(&feeds, &wanted)?
            };
            let BoundOutputs { host: mut values, kept } = result;
            let mut kept = kept.into_iter();
            let y = kept.next().ok_or_else(not_float)?;
            carried = kept.collect();
            self.cuts[point.map_or(0, |p| p + 1)].rank = Some(y.shape().len());
            let pca_started = Instant::now();
            let cov = covariance.as_deref_mut();
            match self.settings.statistics {
                Statistics::InGraph if last => {
                    let tokens = self.batches.iter().map(Batch::real_tokens).sum();
                    add_sums(&carried, &segment, cov, observe, tokens)?;
                }
                Statistics::InGraph => {}
                Statistics::Host => {
                    self.add_on_host(&mut values, &y, &segment, cov, observe, batch)?
                }
            }
            pca_time += pca_started.elapsed();
            outputs.push(y);
            self.progress.inc(1);
        }
        self.timings.pca_seconds += pca_time.as_secs_f64();
        self.timings.runtime_seconds += (started.elapsed() - pca_time - setup).as_secs_f64();
        Ok(Stream { batches: outputs, projection: None })
    }

    /// The segment model with what this run observes: the running sums (in graph), or the observed
    /// values themselves (on the host); and the input stream's pending projection.
    fn segment_model(
        &self,
        graph: &Graph,
        point: Option<usize>,
        stream: Option<&Stream>,
        widths: &[usize],
        covariance: bool,
        observe: &[Moments],
    ) -> Result<SegmentModel> {
        let model = Model { graph: graph.clone(), ..self.shell.clone() };
        let mut sub =
            segment::segment_model(model, self.layout, point, widths, &self.cuts, self.unpadded)?;
        let opset = sub.opset_version("").unwrap_or(1);
        let dtype = self.cuts[0].dtype;
        let output = sub.graph.outputs[0].name.clone();
        let mut stream_input = point.map(|p| self.cuts[p].value.clone());
        if let (Some(cut), Some(q)) = (&stream_input, stream.and_then(|s| s.projection.as_ref())) {
            let cut = cut.clone();
            stream_input = Some(statistics::project_input(&mut sub.graph, &cut, q.as_ref(), dtype));
        }
        let in_graph = self.settings.statistics == Statistics::InGraph;
        let masked = in_graph && !self.unpadded && (covariance || !observe.is_empty());
        let mut covariance_sum = None;
        let mut observed = Vec::new();
        let mut host_values = Vec::new();
        if in_graph {
            if covariance {
                let request = MomentsRequest {
                    value: &output,
                    width: self.layout.width,
                    dtype,
                    precision: DataType::Float,
                    masked,
                    with_sum: false,
                };
                covariance_sum =
                    Some(statistics::emit_moments(&mut sub.graph, &request, opset).gram);
            }
            for moments in observe {
                let request = MomentsRequest {
                    value: &moments.value,
                    width: moments.sum.len(),
                    dtype,
                    precision: DataType::Double,
                    masked,
                    with_sum: true,
                };
                observed.push(statistics::emit_moments(&mut sub.graph, &request, opset));
            }
        } else {
            for moments in observe {
                sub.graph.outputs.push(ValueInfo::tensor_of_rank_unknown(&moments.value, dtype));
                host_values.push(moments.value.clone());
            }
        }
        toposort(&mut sub.graph)?;
        Ok(SegmentModel {
            model: sub,
            output,
            stream_input,
            covariance: covariance_sum,
            observed,
            host_values,
            masked,
        })
    }

    /// Adds a batch's statistics from its rows, in f64 on the host.
    fn add_on_host(
        &self,
        result: &mut RunOutputs,
        y: &DeviceTensor,
        segment: &SegmentModel,
        covariance: Option<&mut Covariance>,
        observe: &mut [Moments],
        batch: &Batch,
    ) -> Result<()> {
        if let Some(cov) = covariance {
            let y = stream_as_f32(y.to_host()?).ok_or_else(not_float)?;
            let rows = standard_rows(&y, self.layout.width, batch.rows.len(), &segment.output)?;
            cov.add_rows(rows.as_slice().unwrap_or(&[]), Some(&batch.rows));
        }
        for moments in observe.iter_mut() {
            let h = float_output(result, &moments.value)?;
            let width = moments.sum.len();
            let rows = standard_rows(&h, width, batch.rows.len(), &moments.value)?;
            moments.add(rows.as_slice().unwrap_or(&[]), &batch.rows);
        }
        Ok(())
    }

    fn note_execution_provider(&mut self, choice: &EpChoice) {
        if self.ep.as_ref() != Some(choice) {
            if let Some(hook) = &self.settings.on_execution_provider {
                hook(choice);
            }
            *self.ep = Some(choice.clone());
        }
    }

    /// Ends the runs: the sessions' arena goes once the streams from it have gone too. Returns the
    /// timings, for the work that follows.
    pub fn finish(self) -> &'a mut Timings {
        self.timings
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
        message: "the value is not a float32 or float16 tensor".into(),
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

fn session_for(model: &Model, settings: &Settings, config: &SessionConfig) -> Result<ModelSession> {
    let bytes = crate::onnx::to_bytes(model)?;
    let dir = settings.model_path.as_deref().and_then(Path::parent);
    Ok(ModelSession::from_bytes(&bytes, dir, config)?)
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

/// A segment model as one run uses it.
struct SegmentModel {
    model: Model,
    /// Its output stream.
    output: String,
    /// The input that takes the stream, when the segment has one.
    stream_input: Option<String>,
    /// The running Gram matrix of the output stream (in graph).
    covariance: Option<statistics::RunningSum>,
    /// The running moments of each observed value (in graph).
    observed: Vec<statistics::EmittedMoments>,
    /// The observed values themselves, copied to the host after every batch (host statistics).
    host_values: Vec<String>,
    /// Takes [`statistics::REAL_ROWS`].
    masked: bool,
}

impl SegmentModel {
    /// Every running sum, in the order the runs carry them: the covariance's, then each observed
    /// value's Gram matrix and sum.
    fn running_sums(&self) -> Vec<&statistics::RunningSum> {
        let observed = self.observed.iter().flat_map(|m| std::iter::once(&m.gram).chain(&m.sum));
        self.covariance.iter().chain(observed).collect()
    }
}

/// Adds the sums the last batch brought back (`sums`, in [`SegmentModel::running_sums`]' order)
/// into the f64 accumulators.
fn add_sums(
    sums: &[DeviceTensor],
    segment: &SegmentModel,
    covariance: Option<&mut Covariance>,
    observe: &mut [Moments],
    tokens: u64,
) -> Result<()> {
    let names = segment.running_sums();
    let value = |i: usize, width: usize, square: bool| -> Result<&[f64]> {
        let name = names.get(i).map_or("(a running sum)", |s| s.output.as_str());
        let values = sums.get(i).and_then(DeviceTensor::f64_values).ok_or_else(|| Error::Pass {
            pass: PASS,
            node: name.to_string(),
            message: "the running sum is not a double tensor the host can read".into(),
        })?;
        let expected = if square { width * width } else { width };
        if values.len() != expected {
            let shape = sums.get(i).map(DeviceTensor::shape).unwrap_or_default();
            return Err(wrong_shape(name, &shape, width));
        }
        Ok(values)
    };
    let mut i = 0;
    if let (Some(cov), Some(_)) = (covariance, &segment.covariance) {
        cov.add_gram(value(i, cov.d(), true)?, tokens);
        i += 1;
    }
    for moments in observe.iter_mut().take(segment.observed.len()) {
        let width = moments.sum.len();
        let (gram, sum) = (value(i, width, true)?, value(i + 1, width, false)?);
        moments.add_gram(gram, sum, tokens);
        i += 2;
    }
    Ok(())
}

/// The feeds of one batch: the model's own inputs, filled by the plan, the stream, the rows'
/// weights and the running sums so far.
fn segment_feeds<'f>(
    segment: &'f SegmentModel,
    own: &'f [(String, TensorValue)],
    stream: Option<&'f DeviceTensor>,
    real_rows: Option<&'f TensorValue>,
    sums: &[(&'f str, Feed<'f>)],
) -> Result<Vec<(&'f str, Feed<'f>)>> {
    let mut feeds = Vec::new();
    for input in &segment.model.graph.inputs {
        let name = input.name.as_str();
        let feed = if Some(name) == segment.stream_input.as_deref() {
            stream.map(Feed::Kept)
        } else if name == statistics::REAL_ROWS {
            real_rows.map(Feed::Host)
        } else if let Some(&(_, feed)) = sums.iter().find(|(n, _)| *n == name) {
            Some(feed)
        } else {
            own.iter().find(|(n, _)| n == name).map(|(_, v)| Feed::Host(v))
        };
        let Some(feed) = feed else {
            return Err(Error::Pass {
                pass: PASS,
                node: input.name.clone(),
                message:
                    "the model has an input onnx-slice does not know how to fill for calibration"
                        .into(),
            });
        };
        feeds.push((name, feed));
    }
    Ok(feeds)
}

/// `[rows, 1]`: 1 for a real token, 0 for padding.
fn real_rows(batch: &Batch) -> TensorValue {
    let weights: Vec<f32> = batch.rows.iter().map(|&real| if real { 1.0 } else { 0.0 }).collect();
    let rows = weights.len();
    TensorValue::F32(ArrayD::from_shape_vec(IxDyn(&[rows, 1]), weights).unwrap_or_default())
}

fn wrong_shape(name: &str, shape: &[usize], width: usize) -> Error {
    Error::Pass {
        pass: PASS,
        node: name.into(),
        message: format!("a statistic of shape {shape:?}, expected width {width}"),
    }
}

fn not_float() -> Error {
    Error::Pass {
        pass: PASS,
        node: "(stream)".into(),
        message: "the stream is not a float32 or float16 tensor".into(),
    }
}
