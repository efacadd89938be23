//! `neurons`: the residual stream keeps its width D; every block's MLP keeps only some of its
//! neurons, and its down projection is refit in closed form so that the kept neurons reproduce
//! the full MLP's output on calibration data (docs/design.md §9, the MoDeGPT/FLAP/SlimGPT family).
//!
//! Block by block, on the model compressed so far: run the block's MLP segment over the
//! calibration set observing the moments of its activation `h` (`Σ hᵀh`, `Σ h`, f64), keep the
//! neurons of largest ridge leverage, keep their columns of the up/gate (fc1) weights, biases and
//! per-neuron constants, refit the down projection and its bias by least squares
//! ([`fit`]), then run the segment again to give the next one its input. With
//! `allocate_widths`, one pass over the unsliced model first gives every block's error curve,
//! and the widths go where removing neurons costs least ([`allocate`]). Keeping every neuron is
//! the identity. Norms, attention, embeddings and the head are not touched.
pub mod allocate;
pub mod edit;
pub mod fit;

use std::time::Instant;

use faer::Mat;

use crate::analysis::Analysis;
use crate::calibrate::{self, Batch, CalibrationRun, Moments, Runner, Timings};
use crate::error::{DetectError, Error, Result};
use crate::graph::{Graph, Model};
use crate::method::{Applied, Method, Work};
use crate::pca::Covariance;
use crate::size::{Budget, Plan, Prediction, Shape};
use crate::structure::{Bias, Layout, Mlp};

const PASS: &str = "neurons";

/// The `neurons` method's options.
#[derive(Debug, Clone, PartialEq)]
pub struct Neurons {
    /// A width per block from each block's reconstruction error (one more calibration pass,
    /// within [`allocate::BAND`] of the uniform width), instead of one width everywhere: lower
    /// perplexity at every size measured (bench/README.md, "Methods"), hence the default.
    pub allocate_widths: bool,
}

impl Default for Neurons {
    fn default() -> Self {
        Neurons { allocate_widths: true }
    }
}

/// The MLP widths the budget allows, one per block (uniform), and whether calibration allocates
/// them anew under the same total.
pub struct NeuronPlan {
    widths: Vec<usize>,
    allocate: bool,
    /// Widths are multiples of this (or a block's full width).
    round: usize,
}

impl Method for Neurons {
    type Plan = NeuronPlan;

    fn name(&self) -> &'static str {
        "neurons"
    }

    fn check(&self, budget: Option<&Budget>) -> Result<()> {
        if budget.is_none() {
            return Err(Error::Invalid {
                option: "target",
                message: "the neurons method needs a size target (--target-size or --target-params): it has no ratio, \
                          which is SliceGPT's stream width"
                    .into(),
            });
        }
        Ok(())
    }

    fn calibrates(&self) -> bool {
        true
    }

    fn plan(
        &self,
        sizes: &Plan,
        analysis: &Analysis,
        budget: Option<&Budget>,
        round_to: usize,
    ) -> Result<(NeuronPlan, Prediction)> {
        let full: Vec<usize> = mlps(&analysis.layout)?.iter().map(|m| m.width).collect();
        let Some(budget) = budget else {
            let shape = Shape { stream: None, mlp: full.clone(), mlp_biases: true };
            return Ok((NeuronPlan::new(full, false, round_to), sizes.predict(&shape)));
        };
        let (widths, prediction) = widest_fitting(sizes, None, &full, budget, round_to)?;
        Ok((NeuronPlan::new(widths, self.allocate_widths, round_to), prediction))
    }

    fn apply(&self, plan: NeuronPlan, work: Work<'_>) -> Result<Applied> {
        let Work { input, model, analysis, calibration, settings, progress, finished } = work;
        let set = calibration.ok_or_else(|| Error::Invalid {
            option: "calibration",
            message: "the neurons method calibrates".into(),
        })?;
        let layout = &analysis.layout;
        let stream = vec![layout.width; layout.stream_points().len()];
        let removed =
            remove_neurons(model, layout, &stream, &set, &settings, progress, finished, &plan)
                .map_err(|e| Error::Context {
                    doing: format!("removing MLP neurons from {}", input.display()),
                    source: Box::new(e),
                })?;
        let points = layout.stream_points().len();
        Ok(Applied {
            stream_width: layout.width,
            widths: stream,
            groups: (0..points).collect(),
            blocks: layout.block_count(),
            ratio: 0.0,
            slice_head: false,
            basis: None,
            orientation: format!("none ({} calibration tokens)", removed.calibration.tokens),
            metadata: [("method".to_string(), self.name().to_string())]
                .into_iter()
                .chain([("stream_width".to_string(), layout.width.to_string())])
                .chain(removed.metadata())
                .collect(),
            centered_embeddings: false,
            calibration: Some(removed.calibration),
            mlp_widths: Some(removed.widths),
        })
    }
}

impl NeuronPlan {
    /// Keeps `widths` (one per block), allocated anew under the same total when `allocate`.
    pub fn new(widths: Vec<usize>, allocate: bool, round: usize) -> Self {
        NeuronPlan { widths, allocate, round: round.max(1) }
    }

    pub fn widths(&self) -> &[usize] {
        &self.widths
    }
}

/// What [`remove_neurons`] did.
pub struct Removed {
    /// Every block's MLP width before and after.
    pub before: Vec<usize>,
    pub widths: Vec<usize>,
    /// Every block's refit error relative to its MLP's output energy (0 where it kept all).
    pub errors: Vec<f64>,
    pub calibration: CalibrationRun,
}

impl Removed {
    /// The `onnx_slice.*` metadata entries of the MLP widths and errors.
    pub fn metadata(&self) -> Vec<(String, String)> {
        let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        let errors: Vec<String> = self.errors.iter().map(|e| format!("{e:.4}")).collect();
        vec![
            ("mlp_widths_before".into(), list(&self.before)),
            ("mlp_widths".into(), list(&self.widths)),
            ("mlp_relative_errors".into(), errors.join(",")),
        ]
    }
}

/// Removes MLP neurons from `model` as `plan` says, calibrating on `set`: the layout's stream
/// has the widths `stream` at its points (D everywhere, or what SliceGPT left).
#[allow(clippy::too_many_arguments)]
pub fn remove_neurons(
    model: &mut Model,
    layout: &Layout,
    stream: &[usize],
    set: &crate::calibrate::data::CalibrationSet,
    settings: &crate::calibrate::Settings,
    progress: &indicatif::ProgressBar,
    finished: &mut dyn crate::graph::TensorSink,
    plan: &NeuronPlan,
) -> Result<Removed> {
    let mlps = mlps(layout)?;
    let mut timings = Timings::default();
    let mut ep = None;
    let batches = calibrate::batches(set, settings.batch)?;
    let shell = Model { graph: Default::default(), ..model.clone() };
    let graph = &mut model.graph;
    let widths = if plan.allocate {
        let sample = &batches[..allocation_batches(batches.len())];
        let mut run = Runner::new(
            &shell,
            graph,
            layout,
            settings,
            sample,
            progress,
            (&mut timings, &mut ep),
        )?;
        allocated_widths(&mut run, graph, &mlps, stream, &plan.widths, plan.round)?
    } else {
        plan.widths.clone()
    };
    let mut run =
        Runner::new(&shell, graph, layout, settings, &batches, progress, (&mut timings, &mut ep))?;
    let errors = prune(&mut run, graph, &mlps, stream, &widths, finished)?;
    graph.forget_constant_shapes();
    crate::graph::cleanup(graph);
    crate::graph::toposort(graph)?;
    progress.finish_and_clear();
    let tokens = batches.iter().map(Batch::real_tokens).sum();
    Ok(Removed {
        before: mlps.iter().map(|m| m.width).collect(),
        widths,
        errors,
        calibration: CalibrationRun { tokens, source: set.source.clone(), timings, ep },
    })
}

/// The widest MLP width (the same in every block, a multiple of `round_to`) whose output fits
/// `budget`, with the stream as `stream` leaves it (SliceGPT's widths and groups, or untouched).
pub fn widest_fitting(
    sizes: &Plan,
    stream: Option<(Vec<usize>, Vec<usize>)>,
    full: &[usize],
    budget: &Budget,
    round_to: usize,
) -> Result<(Vec<usize>, Prediction)> {
    let shape = |k: usize| Shape {
        stream: stream.clone(),
        mlp: full.iter().map(|&f| k.min(f)).collect(),
        mlp_biases: true,
    };
    let round = round_to.max(1);
    let widest = full.iter().copied().max().unwrap_or(0);
    let mut candidates: Vec<usize> = (1..=widest / round).map(|m| m * round).collect();
    if candidates.last() != Some(&widest) {
        candidates.push(widest);
    }
    let limit = budget.limit(sizes.before);
    let fits = |k: usize| budget.measure(sizes.predict(&shape(k)).after) <= limit;
    let fitting = candidates.partition_point(|&k| fits(k));
    if fitting == 0 {
        let smallest = budget.measure(sizes.predict(&shape(candidates[0])).after);
        return Err(Error::Budget {
            message: format!(
                "no MLP width fits the target of {limit} {}: the narrowest ({} neurons per block, at --round-to {round}) \
                 gives {smallest}",
                budget.unit(),
                candidates[0]
            ),
        });
    }
    let k = candidates[fitting - 1];
    let prediction = sizes.predict(&shape(k));
    Ok((full.iter().map(|&f| k.min(f)).collect(), prediction))
}

/// Every block's MLP, or detection's word on the first block without one.
fn mlps(layout: &Layout) -> Result<Vec<Mlp>> {
    layout
        .blocks
        .iter()
        .map(|block| {
            block.mlp.clone().map_err(|why| {
                let segment = &layout.segments[block.segments.start];
                Error::Detect(DetectError {
                    node: segment.output.clone(),
                    op: "block".into(),
                    expected: format!("an MLP whose neurons can be removed: {why}"),
                })
            })
        })
        .collect()
}

/// The segment runs: the embeddings, then every segment in order; `allocation` adds one pass.
fn runs(layout: &Layout, mlps: &[Mlp], widths: &[usize]) -> usize {
    let reruns = mlps.iter().zip(widths).filter(|(m, &k)| k < m.width).count();
    1 + layout.segments.len() + reruns
}

/// Block by block on the model compressed so far: observe the MLP's activation, keep its
/// neurons, refit, and run the segment again for the next one's input. Returns every block's
/// relative error.
fn prune(
    run: &mut Runner<'_>,
    graph: &mut Graph,
    mlps: &[Mlp],
    full: &[usize],
    widths: &[usize],
    finished: &mut dyn crate::graph::TensorSink,
) -> Result<Vec<f64>> {
    let layout = run.layout;
    run.progress.set_length((run.batches.len() * runs(layout, mlps, widths)) as u64);
    let mut stream = run.run(graph, None, None, full, None, &mut [])?;
    let mut errors = vec![0.0; mlps.len()];
    let segments = layout.segments.len();
    for s in 0..segments {
        let pruned = mlps.iter().zip(widths).position(|(m, &k)| m.segment == s && k < m.width);
        let Some(b) = pruned else {
            if s + 1 < segments {
                stream = run.run(graph, Some(s), Some(&stream), full, None, &mut [])?;
            }
            continue;
        };
        let mlp = &mlps[b];
        let mut moments = [Moments::new(&mlp.activation, mlp.width)];
        run.run(graph, Some(s), Some(&stream), full, None, &mut moments)?;
        let started = Instant::now();
        let [moments] = moments;
        errors[b] = keep_best_neurons(graph, layout, mlp, widths[b], moments, finished)?;
        run.timings.rotate_seconds += started.elapsed().as_secs_f64();
        if s + 1 < segments {
            stream = run.run(graph, Some(s), Some(&stream), full, None, &mut [])?;
        }
    }
    Ok(errors)
}

/// Chooses `k` neurons of `mlp` by leverage, refits its down projection and rewrites the graph.
/// Returns the refit's relative error.
fn keep_best_neurons(
    graph: &mut Graph,
    layout: &Layout,
    mlp: &Mlp,
    k: usize,
    moments: Moments,
    finished: &mut dyn crate::graph::TensorSink,
) -> Result<f64> {
    let stats = statistics(moments);
    let what = &layout.linear(mlp.writer).node_name;
    let scores = fit::leverage(&stats, what)?;
    let keep = fit::top(&scores, k);
    let (w, b) = down_projection(graph, layout, mlp)?;
    let refit = fit::refit(stats, w.as_ref(), &b, &keep, what)?;
    edit::keep_neurons(graph, layout, mlp, &keep, &refit, true, finished)?;
    Ok(refit.relative_error)
}

fn statistics(moments: Moments) -> fit::Statistics {
    let tokens = moments.gram.tokens() as f64;
    fit::Statistics { gram: moments.gram.into_matrix(), sum: moments.sum, tokens }
}

/// The down projection's logical `[F, out]` weight and its bias (zeros when it has none), in f64.
pub fn down_projection(graph: &Graph, layout: &Layout, mlp: &Mlp) -> Result<(Mat<f64>, Vec<f64>)> {
    let writer = layout.linear(mlp.writer);
    let missing = |name: &str| Error::Pass {
        pass: PASS,
        node: writer.node_name.clone(),
        message: format!("'{name}' is not an initializer"),
    };
    let weight = graph.initializer(&writer.weight).ok_or_else(|| missing(&writer.weight))?;
    let values = weight.to_f32()?;
    let (rows, cols) = (weight.dims[0] as usize, weight.dims[1] as usize);
    let stored_in_out = (writer.layout == crate::structure::WeightLayout::InOut)
        != writer.through_transpose.is_some();
    let w = if stored_in_out {
        Mat::from_fn(rows, cols, |i, o| values[i * cols + o] as f64)
    } else {
        Mat::from_fn(cols, rows, |i, o| values[o * cols + i] as f64)
    };
    let bias = match &writer.bias {
        Some(Bias::GemmC(name) | Bias::AddNode { initializer: name, .. }) => graph
            .initializer(name)
            .ok_or_else(|| missing(name))?
            .to_f32()?
            .iter()
            .map(|&v| v as f64)
            .collect(),
        None => vec![0.0; w.ncols()],
    };
    Ok((w, bias))
}

/// The calibration batches the allocation's pass reads: the first quarter (at least one). The
/// curves only rank the blocks against each other; the fit itself uses every batch.
fn allocation_batches(batches: usize) -> usize {
    batches.div_ceil(4).max(1).min(batches)
}

/// One pass over the unsliced model: every MLP's error curve (neurons in leverage order) and the
/// energy of the stream it writes to; the widths that keep as many neurons in all as `uniform`.
fn allocated_widths(
    run: &mut Runner<'_>,
    graph: &Graph,
    mlps: &[Mlp],
    full: &[usize],
    uniform: &[usize],
    round: usize,
) -> Result<Vec<usize>> {
    let layout = run.layout;
    run.progress.set_length((run.batches.len() * (1 + layout.segments.len())) as u64);
    let mut stream = run.run(graph, None, None, full, None, &mut [])?;
    let mut curves = Vec::with_capacity(mlps.len());
    for s in 0..layout.segments.len() {
        let Some(mlp) = mlps.iter().find(|m| m.segment == s) else {
            stream = run.run(graph, Some(s), Some(&stream), full, None, &mut [])?;
            continue;
        };
        let mut moments = [Moments::new(&mlp.activation, mlp.width)];
        let mut written = Covariance::new(layout.width);
        stream = run.run(graph, Some(s), Some(&stream), full, Some(&mut written), &mut moments)?;
        let started = Instant::now();
        let [moments] = moments;
        let stats = statistics(moments);
        let what = &layout.linear(mlp.writer).node_name;
        let order = fit::order(&fit::leverage(&stats, what)?);
        let (w, b) = down_projection(graph, layout, mlp)?;
        let error = fit::error_curve(stats, w.as_ref(), &b, &order, what)?;
        // The energy of the stream the MLP writes to: Σ ‖y_t‖² over the real tokens.
        let scale = written.trace();
        curves.push(allocate::Curve { error, scale });
        run.timings.pca_seconds += started.elapsed().as_secs_f64();
    }
    run.progress.reset();
    Ok(allocate::allocate(&curves, uniform.iter().sum(), round, allocate::BAND))
}
