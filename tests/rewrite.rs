//! The exact rewrite on every fixture: fusing the norms, and fusing + rotating by random
//! orthogonal matrices, leave the logits unchanged (ONNX Runtime, original vs rewritten model);
//! slicing gives a valid, smaller model with the same interface.
mod common;

use common::reference::*;
use common::*;
use ndarray::ArrayD;
use onnx_slice::graph::Model;
use onnx_slice::onnx;
use onnx_slice::slicegpt::{self as transform, Dimensions, FixedBasis as Orientation};

const TOLERANCE: f32 = 1e-4;

/// Rewrites every fixture and compares its logits on the reference input with the original's
/// (`compare` returns what is wrong, if anything); reports every fixture that fails.
fn check_all(
    what: &str,
    rewrite: impl Fn(&mut Model),
    compare: impl Fn(&ArrayD<f32>, &ArrayD<f32>) -> Option<String>,
) {
    let mut failures = Vec::new();
    for (arch, exporter, path) in all_models() {
        let reference = Reference::for_exporter(&arch, &exporter);
        let original = onnx::load(&path).unwrap();
        let dir = path.parent().unwrap();
        let expected = logits_of(&original, dir, &reference);
        let mut rewritten = original.clone();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rewrite(&mut rewritten);
            logits_of(&rewritten, dir, &reference)
        }));
        match result {
            Ok(got) => failures
                .extend(compare(&got, &expected).map(|why| format!("{arch}/{exporter}: {why}"))),
            Err(e) => failures.push(format!(
                "{arch}/{exporter}: {}",
                e.downcast_ref::<String>().cloned().unwrap_or_default()
            )),
        }
    }
    assert!(failures.is_empty(), "{what}:\n{}", failures.join("\n"));
}

fn same_logits(got: &ArrayD<f32>, expected: &ArrayD<f32>) -> Option<String> {
    let diff = max_abs_diff(got, expected);
    (diff.is_nan() || diff > TOLERANCE).then(|| format!("max |Δlogits| = {diff}"))
}

fn same_shape(got: &ArrayD<f32>, expected: &ArrayD<f32>) -> Option<String> {
    (got.shape() != expected.shape())
        .then(|| format!("logits {:?}, expected {:?}", got.shape(), expected.shape()))
}

#[test]
fn fusing_the_norms_keeps_the_logits() {
    check_all("fused", |m| drop(transform::fuse(m).unwrap_or_else(|e| panic!("{e}"))), same_logits);
}

#[test]
fn fusing_and_rotating_by_random_orthogonal_matrices_keeps_the_logits() {
    let rotate = |m: &mut Model| {
        drop(
            transform::rotate(m, Orientation::Random { seed: 7 }, &Dimensions::default())
                .unwrap_or_else(|e| panic!("{e}")),
        )
    };
    check_all("rotated", rotate, same_logits);
}

#[test]
fn sliced_models_run_with_the_same_output_shapes() {
    let dims = Dimensions { ratio: 0.25, ..Dimensions::default() };
    let slice = |m: &mut Model| {
        drop(
            transform::rotate(m, Orientation::Random { seed: 3 }, &dims)
                .unwrap_or_else(|e| panic!("{e}")),
        )
    };
    check_all("sliced", slice, same_shape);
}
