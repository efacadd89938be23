//! Calibration through ONNX Runtime: SliceGPT's sequential algorithm (docs/design.md §2), one segment of
//! the stream at a time. Each segment runs once over the calibration set with its readers already
//! rotated and sliced by its input point's basis and its writers not yet rotated, so it produces
//! the next point's stream in the original basis; the PCA of that gives the next basis, and
//! projecting it gives exactly the stream the next segment reads.
pub mod data;
mod segment;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faer::{Mat, MatRef};
use indicatif::ProgressBar;
use ndarray::{Array2, ArrayD, Ix2, IxDyn};

use crate::algebra;
use crate::error::{Error, Result};
use crate::graph::{DataType, KeepInGraph, Model, TensorSink};
use crate::interface::InputPlan;
use crate::pca::{principal_basis, Basis, Covariance};
use crate::rotate::StreamEditor;
use crate::runtime::{EpChoice, ModelSession, SessionConfig, TensorValue};
use crate::structure::Layout;
use crate::transform::{self, Dimensions, GroupBases, Rewritten};
use data::CalibrationSet;

const PASS: &str = "calibrate";

pub struct CalibrationOptions {
    pub dims: Dimensions,
    pub batch: usize,
    pub session: SessionConfig,
    /// Subtract every embedding row's mean first, as the reference does (see
    /// [`transform::center_embeddings`]).
    pub center_embeddings: bool,
    /// The model file: its folder holds the segments' external data and the config files that
    /// give an empty KV cache's shape.
    pub model_path: Option<PathBuf>,
    /// Widths per point from their spectra under a size budget, instead of `dims`' uniform width.
    pub allocation: Option<Allocation>,
    /// Told the execution provider of the first session, and of any later one that got another.
    pub on_execution_provider: Option<EpHook>,
    /// Keep every point's basis in [`Calibrated::bases`] (to save them); otherwise each is dropped
    /// once its point is rotated.
    pub keep_bases: bool,
}

/// Receives the execution provider ONNX Runtime gave a calibration session.
pub type EpHook = std::sync::Arc<dyn Fn(&EpChoice) + Send + Sync>;

/// A size budget for widths allocated point by point ([`crate::size::Plan::allocate`]).
pub struct Allocation {
    pub plan: crate::size::Plan,
    pub budget: crate::size::Budget,
}

/// The result: the rewritten model's layout and widths, and the basis chosen at every point.
pub struct Calibrated {
    pub rewritten: Rewritten,
    /// The basis of every point (the points of a group share one), kept only when
    /// [`CalibrationOptions::keep_bases`] asks: one is `D × D` in f64, 134 MB for LLaMA-2-7B, and
    /// the paper's layout has one per point.
    pub bases: Vec<Arc<Basis>>,
    pub tokens: u64,
    /// Where the calibration tokens came from.
    pub source: String,
    pub timings: Timings,
    /// The execution provider of the last session calibration ran (every session asks for the
    /// same one; `auto` could in principle get CUDA for one and the CPU for another).
    pub ep: Option<EpChoice>,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Timings {
    pub fuse_seconds: f64,
    /// Cutting segment models out of the graph and creating their ONNX Runtime sessions.
    pub session_seconds: f64,
    /// Running the segments over the calibration set.
    pub runtime_seconds: f64,
    pub pca_seconds: f64,
    pub rotate_seconds: f64,
}

/// Fuses the norms, then chooses, rotates and slices every stream point by PCA of calibration
/// activations, with the points grouped into bases by `options.dims.basis`. `progress` advances
/// once per (segment, batch).
pub fn slice_with_pca(
    model: &mut Model,
    set: &CalibrationSet,
    options: &CalibrationOptions,
    progress: &ProgressBar,
) -> Result<Calibrated> {
    slice_with_pca_streaming(model, set, options, progress, &mut KeepInGraph)
}

/// [`slice_with_pca`], handing every rotated tensor to `finished` as soon as it is final (the
/// output's data file: docs/design.md §8).
pub fn slice_with_pca_streaming(
    model: &mut Model,
    set: &CalibrationSet,
    options: &CalibrationOptions,
    progress: &ProgressBar,
    finished: &mut dyn TensorSink,
) -> Result<Calibrated> {
    let mut timings = Timings::default();
    let mut ep = None;
    let started = Instant::now();
    let mut rewritten = transform::fuse(model)?;
    if options.center_embeddings {
        transform::center_embeddings(model, &mut rewritten)?;
    }
    timings.fuse_seconds = started.elapsed().as_secs_f64();
    let layout = rewritten.layout.clone();
    let batches = set
        .batches(options.batch.max(1))
        .map(|(ids, mask)| Batch::new(ids, mask))
        .collect::<Result<Vec<_>>>()?;
    let shell = Model { graph: Default::default(), ..model.clone() };
    let mut run = Runner::new(
        &shell,
        &model.graph,
        &layout,
        options,
        &batches,
        progress,
        (&mut timings, &mut ep),
    )?;
    // One basis for the whole stream has one spectrum: its allocation is the uniform width.
    let widths = match &options.allocation {
        Some(allocation) if options.dims.basis != transform::BasisMode::Global => {
            allocated_widths(&mut run, &model.graph, allocation)?
        }
        _ => options.dims.widths(&layout),
    };
    let groups = transform::basis_groups(&layout, options.dims.basis, &widths);
    let bases = match options.dims.basis {
        transform::BasisMode::Global => global_bases(run, model, &widths, &groups, finished)?,
        _ => sequential_bases(run, model, &widths, &groups, finished)?,
    };
    rewritten.widths = widths;
    rewritten.groups = groups;
    let tokens = batches.iter().map(|b| b.real_tokens()).sum();
    Ok(Calibrated { rewritten, bases, tokens, source: set.source.clone(), timings, ep })
}

/// SliceGPT's order: each segment runs on the sliced stream of the points before it, so every
/// basis sees the slicing error upstream. A basis shared by a block's input and middle point is
/// chosen when the input is reached, from the input's covariance and the middle point's as the
/// unsliced attention computes it (one extra attention run per block); the attention then runs
/// again on the sliced input.
fn sequential_bases(
    mut run: Runner<'_>,
    model: &mut Model,
    widths: &[usize],
    groups: &[usize],
    finished: &mut dyn TensorSink,
) -> Result<Vec<Arc<Basis>>> {
    let layout = run.layout;
    let d = layout.width;
    let points = widths.len();
    run.progress.set_length((run.batches.len() * (points + lookahead_runs(groups))) as u64);
    let (mut cov, mut full) = run.segment(&model.graph, None, None, widths)?;
    let mut editor = StreamEditor::new(&mut model.graph, layout).streaming_to(finished);
    let mut kept: Vec<Arc<Basis>> = Vec::new();
    let mut previous: Option<Arc<Basis>> = None;
    let mut q_in: Option<Mat<f64>> = None;
    for p in 0..points {
        let basis = match previous.take() {
            Some(shared) if groups[p] == groups[p - 1] => shared,
            _ => {
                let mut group = Covariance::new(d);
                group.merge_normalized(&cov);
                let mut ahead: Option<Vec<ArrayD<f32>>> = None;
                for q in (p + 1..points).take_while(|&q| groups[q] == groups[p]) {
                    let mut current = widths.to_vec();
                    current[q - 1..].fill(d);
                    let (next_cov, next) = run.segment(
                        editor.graph(),
                        Some(q - 1),
                        Some(ahead.as_deref().unwrap_or(&full)),
                        &current,
                    )?;
                    group.merge_normalized(&next_cov);
                    ahead = Some(next);
                }
                Arc::new(run.basis(&group)?)
            }
        };
        let step = Instant::now();
        let q_out = basis.columns(widths[p]);
        match &q_in {
            None => editor.rotate_embeddings(q_out.as_ref())?,
            Some(q_in) => {
                editor.rotate_writers(p - 1, q_out.as_ref())?;
                if groups[p] == groups[p - 1] {
                    editor.clear_shortcut(p - 1)?;
                } else {
                    editor.set_final_shortcut(
                        p - 1,
                        algebra::shortcut(q_in.as_ref(), q_out.as_ref()).as_ref(),
                    )?;
                }
            }
        }
        editor.set_point_width(p, widths[p])?;
        project(&mut full, q_out.as_ref())?;
        editor.rotate_readers(p, q_out.as_ref())?;
        if run.options.keep_bases {
            kept.push(basis.clone());
        }
        previous = Some(basis);
        if p + 1 < points {
            // The segment's skip carries the sliced stream back to the original basis, so that it
            // produces the next point in the original basis at full width.
            editor.set_shortcut(p, q_out.transpose())?; // replaced at the next point
            editor.set_point_width(p + 1, d)?;
            run.timings.rotate_seconds += step.elapsed().as_secs_f64();
            let mut current = widths.to_vec();
            current[p + 1..].fill(d);
            (cov, full) = run.segment(editor.graph(), Some(p), Some(&full), &current)?;
        } else {
            run.timings.rotate_seconds += step.elapsed().as_secs_f64();
        }
        q_in = Some(q_out);
    }
    let step = Instant::now();
    editor.finish()?;
    run.timings.rotate_seconds += step.elapsed().as_secs_f64();
    Ok(kept)
}

/// Segment runs of the unsliced model that choose shared bases ahead of the sliced runs.
fn lookahead_runs(groups: &[usize]) -> usize {
    groups.windows(2).filter(|w| w[0] == w[1]).count()
}

/// One pass over the unsliced model gives every point's covariance; each group's basis is the PCA
/// of the sum of its points' trace-normalized covariances, and the model is rotated once.
fn global_bases(
    mut run: Runner<'_>,
    model: &mut Model,
    widths: &[usize],
    groups: &[usize],
    finished: &mut dyn TensorSink,
) -> Result<Vec<Arc<Basis>>> {
    let layout = run.layout;
    run.progress.set_length((run.batches.len() * widths.len()) as u64);
    let bases = unsliced_group_bases(&mut run, &model.graph, groups)?;
    let step = Instant::now();
    let columns = GroupBases::new(groups, |group| Ok(bases[group].columns(widths[group])))?;
    crate::rotate::rotate_and_slice(
        &mut model.graph,
        layout,
        &columns.per_point(),
        groups,
        finished,
    )?;
    run.timings.rotate_seconds += step.elapsed().as_secs_f64();
    Ok(if run.options.keep_bases { bases } else { Vec::new() })
}

/// The basis of every point's group from one pass over the unsliced `graph`: the PCA of the sum of
/// the group's trace-normalized covariances.
fn unsliced_group_bases(
    run: &mut Runner<'_>,
    graph: &crate::graph::Graph,
    groups: &[usize],
) -> Result<Vec<Arc<Basis>>> {
    let (d, points) = (run.layout.width, groups.len());
    let full_widths = vec![d; points];
    let mut sums: Vec<Option<Covariance>> = vec![None; points];
    let (mut cov, mut full) = run.segment(graph, None, None, &full_widths)?;
    for p in 0..points {
        sums[groups[p]].get_or_insert_with(|| Covariance::new(d)).merge_normalized(&cov);
        if p + 1 < points {
            (cov, full) = run.segment(graph, Some(p), Some(&full), &full_widths)?;
        }
    }
    let mut group_bases: Vec<Option<Arc<Basis>>> = vec![None; points];
    for (g, sum) in sums.iter().enumerate() {
        if let Some(sum) = sum {
            group_bases[g] = Some(Arc::new(run.basis(sum)?));
        }
    }
    Ok(groups.iter().filter_map(|&g| group_bases[g].clone()).collect())
}

/// Widths under the allocation's budget from the spectra of the unsliced model (one extra pass):
/// points that the basis mode groups share a spectrum.
fn allocated_widths(
    run: &mut Runner<'_>,
    graph: &crate::graph::Graph,
    allocation: &Allocation,
) -> Result<Vec<usize>> {
    let points = run.layout.stream_points().len();
    let groups = transform::basis_groups(
        run.layout,
        run.options.dims.basis,
        &vec![run.layout.width; points],
    );
    run.progress.set_length((run.batches.len() * points) as u64);
    let bases = unsliced_group_bases(run, graph, &groups)?;
    run.progress.reset();
    let spectra: Vec<Vec<f64>> = bases.iter().map(|b| b.eigenvalues.clone()).collect();
    allocation.plan.allocate(&run.options.dims, &allocation.budget, &spectra)
}

/// One calibration batch: token ids `[b, L]`, their attention mask, and which tokens are real.
struct Batch {
    ids: Array2<i64>,
    mask: Array2<i64>,
    rows: Vec<bool>,
}

impl Batch {
    fn new(ids: ArrayD<i64>, mask: ArrayD<i64>) -> Result<Self> {
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

    fn real_tokens(&self) -> u64 {
        self.rows.iter().filter(|&&r| r).count() as u64
    }
}

struct Runner<'a> {
    shell: &'a Model,
    layout: &'a Layout,
    options: &'a CalibrationOptions,
    batches: &'a [Batch],
    progress: &'a ProgressBar,
    timings: &'a mut Timings,
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
    /// their ranks as the segments run.
    fn new(
        shell: &'a Model,
        graph: &crate::graph::Graph,
        layout: &'a Layout,
        options: &'a CalibrationOptions,
        batches: &'a [Batch],
        progress: &'a ProgressBar,
        (timings, ep): (&'a mut Timings, &'a mut Option<EpChoice>),
    ) -> Result<Self> {
        let label = options
            .model_path
            .as_deref()
            .map_or_else(|| "the model".to_string(), |p| p.display().to_string());
        let plan = InputPlan::for_graph(graph, &label, options.model_path.as_deref())?;
        let dtype = stream_dtype(graph, layout)?;
        let cuts = segment::stream_cuts(graph, layout)
            .into_iter()
            .map(|value| segment::Cut { value, rank: None, dtype })
            .collect();
        let unpadded = batches.iter().all(|b| b.rows.iter().all(|&real| real));
        Ok(Runner { shell, layout, options, batches, progress, timings, ep, plan, cuts, unpadded })
    }

    /// Runs segment `point` → `point + 1` (or the embeddings, for `None`) over every batch; returns
    /// the covariance of its output stream and the output itself (original basis, full width).
    fn segment(
        &mut self,
        graph: &crate::graph::Graph,
        point: Option<usize>,
        stream: Option<&[ArrayD<f32>]>,
        widths: &[usize],
    ) -> Result<(Covariance, Vec<ArrayD<f32>>)> {
        let started = Instant::now();
        let model = Model { graph: graph.clone(), ..self.shell.clone() };
        let sub =
            segment::segment_model(model, self.layout, point, widths, &self.cuts, self.unpadded)?;
        let mut session = session_for(&sub, self.options)?;
        self.note_execution_provider(session.ep());
        let setup = started.elapsed();
        self.timings.session_seconds += setup.as_secs_f64();
        let input_name = point.map(|p| self.cuts[p].value.clone());
        let output_name = sub.graph.outputs[0].name.clone();
        let mut cov = Covariance::new(self.layout.width);
        let mut outputs = Vec::with_capacity(self.batches.len());
        let mut pca_time = Duration::ZERO;
        for (b, batch) in self.batches.iter().enumerate() {
            let feeds = self.feeds(&sub, batch, input_name.as_deref(), stream.map(|s| &s[b]))?;
            let named: Vec<(&str, &TensorValue)> =
                feeds.iter().map(|(n, v)| (n.as_str(), v)).collect();
            let mut result = session.run_for(&named, &[output_name.as_str()])?;
            let y =
                result.remove(&output_name).and_then(stream_as_f32).ok_or_else(|| Error::Pass {
                    pass: PASS,
                    node: output_name.clone(),
                    message: "the stream is not a float32 or float16 tensor".into(),
                })?;
            self.cuts[point.map_or(0, |p| p + 1)].rank = Some(y.ndim());
            let pca_started = Instant::now();
            let rows = standard_rows(&y, self.layout.width, batch.rows.len(), &output_name)?;
            cov.add_rows(rows.as_slice().unwrap_or(&[]), Some(&batch.rows));
            pca_time += pca_started.elapsed();
            outputs.push(y);
            self.progress.inc(1);
        }
        self.timings.pca_seconds += pca_time.as_secs_f64();
        self.timings.runtime_seconds += (started.elapsed() - pca_time - setup).as_secs_f64();
        Ok((cov, outputs))
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
            if let Some(hook) = &self.options.on_execution_provider {
                hook(choice);
            }
            *self.ep = Some(choice.clone());
        }
    }

    fn basis(&mut self, cov: &Covariance) -> Result<Basis> {
        let started = Instant::now();
        let basis = principal_basis(cov, crate::pca::DEFAULT_DAMPING)?;
        self.timings.pca_seconds += started.elapsed().as_secs_f64();
        Ok(basis)
    }
}

/// The stream's element type, when calibration can run it: float32, or float16 (ONNX Runtime's
/// CPU provider runs float16 graphs, casting up around the kernels it lacks). The activations are
/// kept in float32 between segments, as the float16 model's own rounding leaves them.
fn stream_dtype(graph: &crate::graph::Graph, layout: &Layout) -> Result<DataType> {
    match algebra::created_dtype(algebra::stream_dtype(graph, layout)) {
        dtype @ (DataType::Float | DataType::Float16) => Ok(dtype),
        other => Err(Error::Pass {
            pass: PASS,
            node: layout.embeddings[0].output.clone(),
            message: format!(
                "PCA calibration runs float32 and float16 models; this one's stream is {} (ONNX Runtime's CPU provider has no kernels for \
                 it): convert the model to float16 or float32 first, or use --orientation random|identity",
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

fn session_for(model: &Model, options: &CalibrationOptions) -> Result<ModelSession> {
    let bytes = crate::onnx::to_bytes(model)?;
    let dir = options.model_path.as_deref().and_then(Path::parent);
    Ok(ModelSession::from_bytes(&bytes, dir, &options.session)?)
}

/// The stream as contiguous rows of width D, one per token of the batch.
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

/// `y ← y Q` over the last axis, for every cached batch.
fn project(stream: &mut [ArrayD<f32>], q: MatRef<'_, f64>) -> Result<()> {
    let q32: Mat<f32> = Mat::from_fn(q.nrows(), q.ncols(), |i, j| q[(i, j)] as f32);
    let k = q.ncols();
    for y in stream.iter_mut() {
        let mut shape = y.shape().to_vec();
        let d = shape.last().copied().unwrap_or(0);
        if d != q.nrows() {
            return Err(Error::Pass {
                pass: PASS,
                node: "(stream)".into(),
                message: format!("stream of width {d}, basis of {} rows", q.nrows()),
            });
        }
        let rows = y.len() / d.max(1);
        let input = y.as_standard_layout();
        let data = input.as_slice().unwrap_or(&[]);
        let mut out = vec![0f32; rows * k];
        faer::linalg::matmul::matmul(
            faer::MatMut::from_row_major_slice_mut(&mut out, rows, k),
            faer::Accum::Replace,
            faer::MatRef::from_row_major_slice(data, rows, d),
            q32.as_ref(),
            1.0,
            faer::get_global_parallelism(),
        );
        if let Some(last) = shape.last_mut() {
            *last = k;
        }
        *y = ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| Error::Pass {
            pass: PASS,
            node: "(stream)".into(),
            message: format!("projecting the stream: {e}"),
        })?;
    }
    Ok(())
}
