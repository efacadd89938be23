//! `combined`: SliceGPT with one global basis at a mild ratio, then `neurons` on the sliced model,
//! under one budget. The stream loses `stream_ratio` of its width (its least energetic directions,
//! from one pass over the unsliced model: no shortcut matrices), and the MLPs lose neurons for the
//! rest of the budget, calibrated on the sliced model.
use crate::analysis::Analysis;
use crate::error::{Error, Result};
use crate::graph::KeepInGraph;
use crate::method::{Applied, Method, Work};
use crate::neurons::{self, NeuronPlan, Neurons};
use crate::size::{Budget, Plan, Prediction};
use crate::slicegpt::{self, BasisMode, Dimensions, PcaOptions};

/// The `combined` method's options.
#[derive(Debug, Clone, PartialEq)]
pub struct Combined {
    /// The share of the stream's width SliceGPT removes (0 ≤ r < 1); the MLPs take the rest of
    /// the budget.
    pub stream_ratio: f64,
    /// Widths per block for the MLPs (as `neurons --allocate-widths`).
    pub allocate_widths: bool,
}

/// The stream's share of the cut when none is given: measured on SmolLM2-135M (bench/README.md,
/// "Methods").
pub const DEFAULT_STREAM_RATIO: f64 = 0.05;

impl Default for Combined {
    fn default() -> Self {
        Combined {
            stream_ratio: DEFAULT_STREAM_RATIO,
            allocate_widths: Neurons::default().allocate_widths,
        }
    }
}

/// SliceGPT's dimensions and the MLP widths that fit the rest of the budget.
pub struct CombinedPlan {
    dims: Dimensions,
    neurons: NeuronPlan,
}

impl Method for Combined {
    type Plan = CombinedPlan;

    fn name(&self) -> &'static str {
        "combined"
    }

    fn check(&self, budget: Option<&Budget>) -> Result<()> {
        if !(0.0..1.0).contains(&self.stream_ratio) {
            return Err(Error::Invalid {
                option: "stream_ratio",
                message: format!("must be at least 0 and less than 1, got {}", self.stream_ratio),
            });
        }
        if budget.is_none() {
            return Err(Error::Invalid {
                option: "target",
                message:
                    "the combined method needs a size target (--target-size or --target-params)"
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
    ) -> Result<(CombinedPlan, Prediction)> {
        let dims = Dimensions {
            ratio: self.stream_ratio,
            width: None,
            round_to,
            slice_head: false,
            basis: BasisMode::Global,
        };
        let layout = &analysis.layout;
        let widths = dims.widths(layout);
        let groups = slicegpt::basis_groups(layout, dims.basis, &widths);
        let full = sizes.mlp_widths();
        let (mlp, prediction) = match budget {
            Some(budget) => {
                neurons::widest_fitting(sizes, Some((widths, groups)), &full, budget, round_to)?
            }
            None => {
                let shape = crate::size::Shape {
                    stream: Some((widths, groups)),
                    mlp: full.clone(),
                    mlp_biases: true,
                };
                (full, sizes.predict(&shape))
            }
        };
        let neurons = NeuronPlan::new(mlp, self.allocate_widths, round_to);
        Ok((CombinedPlan { dims, neurons }, prediction))
    }

    fn apply(&self, plan: CombinedPlan, work: Work<'_>) -> Result<Applied> {
        let Work { input, model, analysis, calibration, settings, progress, finished } = work;
        let set = calibration.ok_or_else(|| Error::Invalid {
            option: "calibration",
            message: "the combined method calibrates".into(),
        })?;
        let context = |e: Error| Error::Context {
            doing: format!("compressing {}", input.display()),
            source: Box::new(e),
        };
        let pca = PcaOptions {
            dims: plan.dims,
            settings: settings.clone(),
            center_embeddings: false,
            allocation: None,
            keep_bases: false,
        };
        // The MLPs' weights change again after the rotation: nothing is final before the end.
        let sliced = slicegpt::slice_with_pca_streaming(
            model,
            analysis,
            &set,
            &pca,
            progress,
            &mut KeepInGraph,
        )
        .map_err(context)?;
        progress.reset();
        let rewritten = sliced.rewritten;
        let removed = neurons::remove_neurons(
            model,
            &rewritten.layout,
            &rewritten.widths,
            &set,
            &settings,
            progress,
            finished,
            &plan.neurons,
        )
        .map_err(context)?;
        let mut calibration = removed.calibration.clone();
        let first = &sliced.run.timings;
        let t = &mut calibration.timings;
        t.fuse_seconds += first.fuse_seconds;
        t.session_seconds += first.session_seconds;
        t.runtime_seconds += first.runtime_seconds;
        t.pca_seconds += first.pca_seconds;
        t.rotate_seconds += first.rotate_seconds;
        let orientation = format!("pca ({} calibration tokens)", calibration.tokens);
        let mut metadata =
            slicegpt::rewrite::metadata_entries(&rewritten, &plan.dims, &orientation);
        metadata[0].1 = self.name().to_string();
        metadata.extend(removed.metadata());
        Ok(Applied {
            stream_width: rewritten.layout.width,
            widths: rewritten.widths.clone(),
            groups: rewritten.groups.clone(),
            blocks: rewritten.layout.block_count(),
            ratio: plan.dims.ratio,
            slice_head: false,
            basis: Some(plan.dims.basis.to_string()),
            orientation,
            metadata,
            centered_embeddings: false,
            calibration: Some(calibration),
            mlp_widths: Some(removed.widths),
        })
    }
}
