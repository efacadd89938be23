//! SliceGPT's calibrated algorithm (docs/design.md §2): the bases chosen by PCA of the stream, in
//! stream order, each segment run on the stream already sliced before it (point and block
//! bases), or from one pass over the unsliced model (global); the model rotated and sliced as the
//! bases become known.
use std::sync::Arc;
use std::time::Instant;

use faer::Mat;
use indicatif::ProgressBar;

use crate::algebra::{self, complete_basis};
use crate::analysis::Analysis;
use crate::calibrate::data::CalibrationSet;
use crate::calibrate::{self, CalibrationRun, Runner, Settings, Stream, Timings};
use crate::error::Result;
use crate::graph::{KeepInGraph, Model, TensorSink};
use crate::pca::{Basis, Covariance};
use crate::rotate::{extends_last_basis, SkipForm, StreamEditor};

use super::dims::{basis_groups, BasisMode, Dimensions};
use super::rewrite::{self, GroupBases, Rewritten};

/// How SliceGPT calibrates.
pub struct PcaOptions {
    pub dims: Dimensions,
    pub settings: Settings,
    /// Subtract every embedding row's mean first, as the reference does (see
    /// [`rewrite::center_embeddings`]).
    pub center_embeddings: bool,
    /// Widths per point from their spectra under a size budget, instead of `dims`' uniform width.
    pub allocation: Option<Allocation>,
    /// Keep every point's basis in [`Calibrated::bases`] (to save them); otherwise each is dropped
    /// once its point is rotated.
    pub keep_bases: bool,
}

/// A size budget for widths allocated point by point ([`super::widths::allocate`]).
pub struct Allocation {
    pub plan: crate::size::Plan,
    pub budget: crate::size::Budget,
}

/// The result: the rewritten model's layout and widths, and the basis chosen at every point.
pub struct Calibrated {
    pub rewritten: Rewritten,
    /// The basis of every point (the points of a group share one), kept only when
    /// [`PcaOptions::keep_bases`] asks: one is `D × D` in f64, 134 MB for LLaMA-2-7B, and
    /// the paper's layout has one per point.
    pub bases: Vec<Arc<Basis>>,
    pub run: CalibrationRun,
}

/// Fuses the norms, then chooses, rotates and slices every stream point by PCA of calibration
/// activations, with the points grouped into bases by `options.dims.basis`. `progress` advances
/// once per (segment, batch).
pub fn slice_with_pca(
    model: &mut Model,
    set: &CalibrationSet,
    options: &PcaOptions,
    progress: &ProgressBar,
) -> Result<Calibrated> {
    let analysis = crate::analysis::analyze(model)?;
    slice_with_pca_streaming(model, &analysis, set, options, progress, &mut KeepInGraph)
}

/// [`slice_with_pca`], handing every rotated tensor to `finished` as soon as it is final (the
/// output's data file: docs/design.md §8).
pub fn slice_with_pca_streaming(
    model: &mut Model,
    analysis: &Analysis,
    set: &CalibrationSet,
    options: &PcaOptions,
    progress: &ProgressBar,
    finished: &mut dyn TensorSink,
) -> Result<Calibrated> {
    let mut timings = Timings::default();
    let mut ep = None;
    let started = Instant::now();
    let mut rewritten = rewrite::fuse_analysed(model, analysis)?;
    if options.center_embeddings {
        rewrite::center_embeddings(model, &mut rewritten)?;
    }
    timings.fuse_seconds = started.elapsed().as_secs_f64();
    let layout = rewritten.layout.clone();
    let batches = calibrate::batches(set, options.settings.batch)?;
    let shell = Model { graph: Default::default(), ..model.clone() };
    let mut run = Runner::new(
        &shell,
        &model.graph,
        &layout,
        &options.settings,
        &batches,
        progress,
        (&mut timings, &mut ep),
    )?;
    // One basis for the whole stream has one spectrum: its allocation is the uniform width.
    let widths = match &options.allocation {
        Some(allocation) if options.dims.basis != BasisMode::Global => {
            allocated_widths(&mut run, &model.graph, &options.dims, allocation)?
        }
        _ => options.dims.widths(&layout),
    };
    let groups = basis_groups(&layout, options.dims.basis, &widths);
    let keep = options.keep_bases;
    let bases = match options.dims.basis {
        BasisMode::Global => global_bases(run, model, &widths, &groups, keep, finished)?,
        _ => sequential_bases(run, model, &widths, &groups, keep, finished)?,
    };
    rewritten.widths = widths;
    rewritten.groups = groups;
    let tokens = batches.iter().map(|b| b.real_tokens()).sum();
    let run = CalibrationRun { tokens, source: set.source.clone(), timings, ep };
    Ok(Calibrated { rewritten, bases, run })
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
    keep_bases: bool,
    finished: &mut dyn TensorSink,
) -> Result<Vec<Arc<Basis>>> {
    let layout = run.layout;
    let d = layout.width;
    let points = widths.len();
    run.progress.set_length((run.batches.len() * (points + lookahead_runs(groups))) as u64);
    let (mut cov, mut full) = run.segment(&model.graph, None, None, widths)?;
    let skips = SkipForm::for_model(model);
    let extends_last = extends_last_basis(d, groups, widths);
    let mut editor =
        StreamEditor::new(&mut model.graph, layout).with_skips(skips).streaming_to(finished);
    let mut kept: Vec<Arc<Basis>> = Vec::new();
    let mut previous: Option<Arc<Basis>> = None;
    let mut q_in: Option<Mat<f64>> = None;
    for p in 0..points {
        let basis = match previous.take() {
            Some(shared) if groups[p] == groups[p - 1] => shared,
            _ => {
                let mut group = Covariance::new(d);
                group.merge_normalized(&cov);
                let mut ahead: Option<Stream> = None;
                for q in (p + 1..points).take_while(|&q| groups[q] == groups[p]) {
                    let mut current = widths.to_vec();
                    current[q - 1..].fill(d);
                    let (next_cov, next) = run.segment(
                        editor.graph(),
                        Some(q - 1),
                        Some(ahead.as_ref().unwrap_or(&full)),
                        &current,
                    )?;
                    group.merge_normalized(&next_cov);
                    ahead = Some(next);
                }
                Arc::new(run.basis(&group)?)
            }
        };
        let step = Instant::now();
        // The saved last basis is the one the model gets, with its own covariance's spectrum.
        let basis = match &q_in {
            Some(q_in) if extends_last && p + 1 == points => Arc::new(Basis {
                q: complete_basis(q_in.as_ref()),
                eigenvalues: basis.eigenvalues.clone(),
            }),
            _ => basis,
        };
        let q_out = basis.columns(widths[p]);
        match &q_in {
            None => editor.rotate_embeddings(q_out.as_ref())?,
            Some(q_in) => {
                editor.rotate_writers(p - 1, q_out.as_ref())?;
                if groups[p] == groups[p - 1] {
                    editor.clear_shortcut(p - 1)?;
                } else if extends_last && p + 1 == points {
                    editor.set_final_extension(p - 1, q_in.ncols())?;
                } else {
                    editor.set_final_shortcut(
                        p - 1,
                        algebra::shortcut(q_in.as_ref(), q_out.as_ref()).as_ref(),
                    )?;
                }
            }
        }
        editor.set_point_width(p, widths[p])?;
        full.project(q_out.as_ref())?;
        editor.rotate_readers(p, q_out.as_ref())?;
        if keep_bases {
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
    // The stream and the sessions' arena are not needed for the last writes.
    drop(full);
    let timings = run.finish();
    let step = Instant::now();
    editor.finish()?;
    timings.rotate_seconds += step.elapsed().as_secs_f64();
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
    keep_bases: bool,
    finished: &mut dyn TensorSink,
) -> Result<Vec<Arc<Basis>>> {
    let layout = run.layout;
    run.progress.set_length((run.batches.len() * widths.len()) as u64);
    let mut bases = unsliced_group_bases(&mut run, &model.graph, groups)?;
    let timings = run.finish();
    let step = Instant::now();
    let columns = GroupBases::new(groups, |group| Ok(bases[group].columns(widths[group])))?;
    let per_point = columns.per_point();
    let skips = SkipForm::for_model(model);
    let extension = crate::rotate::rotate_and_slice(
        &mut model.graph,
        layout,
        &per_point,
        groups,
        skips,
        finished,
    )?;
    timings.rotate_seconds += step.elapsed().as_secs_f64();
    if !keep_bases {
        return Ok(Vec::new());
    }
    // The saved last basis is the one the model got, with its own covariance's spectrum.
    if let (Some(q), Some(last)) = (extension, bases.last_mut()) {
        *last = Arc::new(Basis { q, eigenvalues: last.eigenvalues.clone() });
    }
    Ok(bases)
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
    dims: &Dimensions,
    allocation: &Allocation,
) -> Result<Vec<usize>> {
    let points = run.layout.stream_points().len();
    let groups = basis_groups(run.layout, dims.basis, &vec![run.layout.width; points]);
    run.progress.set_length((run.batches.len() * points) as u64);
    let bases = unsliced_group_bases(run, graph, &groups)?;
    run.progress.reset();
    let spectra: Vec<Vec<f64>> = bases.iter().map(|b| b.eigenvalues.clone()).collect();
    super::widths::allocate(&allocation.plan, dims, &allocation.budget, &spectra)
}
