//! The `neurons` method on every fixture: keeping every neuron through the method's own edit path
//! reproduces the logits; removing neurons under a target gives a valid model (ONNX checker, ONNX
//! Runtime, the same interface) of exactly the predicted size; targets that cannot be met are
//! refused with nothing written; SliceGPT's flags are refused with it.
mod common;

use std::path::{Path, PathBuf};

use common::checker::{checker_python, onnx_checker_failures};
use common::cli::onnx_slice;
use common::reference::{logits_of, max_abs_diff, Reference};
use common::{all_models, fixture, scratch};
use onnx_slice::graph::KeepInGraph;
use onnx_slice::neurons::{down_projection, edit, fit};
use onnx_slice::pipeline::{CalibrationData, MethodOptions};
use onnx_slice::{Budget, Neurons, Options};

const TOLERANCE: f32 = 1e-4;

/// Every block keeps all its neurons, with its down projection "refit" to itself: the method's
/// whole rewrite (weights and biases re-written, reshapes re-pointed, a bias created where the
/// refit has one) changes nothing.
#[test]
fn keeping_every_neuron_reproduces_the_model() {
    let mut failures = Vec::new();
    for (arch, exporter, path) in all_models() {
        let reference = Reference::for_exporter(&arch, &exporter);
        let mut model = onnx_slice::onnx::load(&path).unwrap();
        let dir = path.parent().unwrap();
        let expected = logits_of(&model, dir, &reference);
        let analysis = onnx_slice::analysis::analyze(&mut model).unwrap();
        let layout = &analysis.layout;
        for block in &layout.blocks {
            let mlp = block.mlp.as_ref().unwrap();
            // Down projections without a bias get the refit's (zeros here): that path too.
            let (weight, bias) = down_projection(&model.graph, layout, mlp).unwrap();
            let keep: Vec<usize> = (0..mlp.width).collect();
            let refit = fit::Refit { weight, bias, relative_error: 0.0 };
            edit::keep_neurons(
                &mut model.graph,
                layout,
                mlp,
                &keep,
                &refit,
                true,
                &mut KeepInGraph,
            )
            .unwrap_or_else(|e| panic!("{arch}/{exporter}: {e}"));
        }
        let got = logits_of(&model, dir, &reference);
        let diff = max_abs_diff(&got, &expected);
        if diff.is_nan() || diff > TOLERANCE {
            failures.push(format!("{arch}/{exporter}: max |Δlogits| = {diff}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn options(target: Budget, allocate_widths: bool, exporter: &str) -> Options {
    Options {
        method: MethodOptions::Neurons(Neurons { allocate_widths }),
        target: Some(target),
        calibration: CalibrationData::Texts(vec![fixture("calibration.txt")]),
        tokenizer: Some(fixture("_hf/llama/tokenizer.json")),
        calib_samples: 8,
        calib_seqlen: 32,
        // ONNX Runtime runs the opset-23 rotary nodes at batch 1 only (fixtures/README.md).
        calib_batch: if exporter == "dynamo23" { 1 } else { 4 },
        ..Options::default()
    }
}

/// Removing neurons on every fixture: the model the dry run predicts is the one written (sizes and
/// widths), it passes the ONNX checker and runs with the input's interface.
#[test]
fn removing_neurons_gives_the_predicted_valid_model_on_every_fixture() {
    let dir = scratch();
    let mut written: Vec<PathBuf> = Vec::new();
    let mut failures = Vec::new();
    for (arch, exporter, path) in all_models() {
        for allocate in [false, true] {
            let label = format!("{arch}/{exporter} allocate {allocate}");
            let out = dir.path().join(format!("{arch}-{exporter}-{allocate}.onnx"));
            let options = options(Budget::BytesFraction(0.9), allocate, &exporter);
            let planned = onnx_slice::plan(&path, &options).unwrap();
            let report = match onnx_slice::slice(&path, &out, &options) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{label}: {e}"));
                    continue;
                }
            };
            if !allocate && report.weight_bytes_after != planned.after.bytes {
                failures.push(format!(
                    "{label}: predicted {} bytes, wrote {}",
                    planned.after.bytes, report.weight_bytes_after
                ));
            }
            let (before, after) = planned.mlp_widths.clone().unwrap();
            let got = report.mlp_widths.clone().unwrap();
            if !allocate && got != after {
                failures.push(format!("{label}: predicted MLP widths {after:?}, wrote {got:?}"));
            }
            if allocate && got.iter().sum::<usize>() > after.iter().sum::<usize>() {
                failures.push(format!("{label}: allocated {got:?}, more than {after:?} in all"));
            }
            if got.iter().zip(&before).any(|(k, f)| k > f) || got == before {
                failures.push(format!("{label}: widths {got:?} of {before:?}"));
            }
            if report.weight_bytes_after > (0.9 * report.weight_bytes_before as f64) as u64 {
                failures.push(format!("{label}: over the target"));
            }
            assert_eq!(report.method, "neurons");
            assert_eq!(report.widths, vec![64; report.widths.len()], "{label}: the stream keeps D");
            check_runs(&path, &out, &arch, &exporter, &mut failures);
            written.push(out);
        }
    }
    // Exports with ONNX Runtime's own ops in the default domain (SimplifiedLayerNormalization)
    // fail the checker as they are; the method leaves their norms as they are.
    let python = checker_python();
    let inputs: Vec<PathBuf> = all_models().into_iter().map(|(_, _, p)| p).collect();
    let invalid_inputs: Vec<String> = onnx_checker_failures(&python, &inputs)
        .into_iter()
        .map(|(file, _)| file.display().to_string())
        .collect();
    for (file, why) in onnx_checker_failures(&python, &written) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let mut parts = name.splitn(3, '-');
        let (arch, exporter) = (parts.next().unwrap(), parts.next().unwrap());
        let input = fixture(&format!("{arch}/{exporter}/model.onnx")).display().to_string();
        if !invalid_inputs.contains(&input) {
            failures.push(format!("{}: ONNX checker: {why}", file.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The written model runs on the reference input, with logits of the input's shape that differ
/// from the input's (neurons were removed) but not wildly.
fn check_runs(input: &Path, output: &Path, arch: &str, exporter: &str, failures: &mut Vec<String>) {
    let reference = Reference::for_exporter(arch, exporter);
    let original = onnx_slice::onnx::load(input).unwrap();
    let expected = logits_of(&original, input.parent().unwrap(), &reference);
    let model = onnx_slice::onnx::load(output).unwrap();
    let got = logits_of(&model, input.parent().unwrap(), &reference);
    if got.shape() != expected.shape() {
        failures.push(format!(
            "{arch}/{exporter}: logits {:?}, expected {:?}",
            got.shape(),
            expected.shape()
        ));
    } else if !max_abs_diff(&got, &expected).is_finite() {
        failures.push(format!("{arch}/{exporter}: logits are not finite"));
    }
}

/// A target below what keeping one step of neurons per block gives is refused with exit code 4
/// and nothing written; SliceGPT's flags and a missing target are command-line mistakes.
#[test]
fn impossible_targets_and_slicegpt_flags_are_refused() {
    let dir = scratch();
    let out = dir.path().join("out.onnx");
    let model = fixture("llama/optimum/model.onnx");
    let calib = fixture("calibration.txt");
    let run = onnx_slice([
        model.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
        "--method".as_ref(),
        "neurons".as_ref(),
        "--target-size".as_ref(),
        "10%".as_ref(),
        "--calib".as_ref(),
        calib.as_os_str(),
    ]);
    assert_eq!(run.code, Some(4), "{}", run.stderr);
    assert!(run.stderr.contains("no MLP width fits"), "{}", run.stderr);
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left behind");
    for extra in [&["--ratio", "0.2"][..], &["--target-size", "90%", "--slice-head"], &[]] {
        let mut args = vec![model.as_os_str(), "-o".as_ref(), out.as_os_str()];
        args.extend(["--method", "neurons"].map(std::ffi::OsStr::new));
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        let run = onnx_slice(args);
        assert_eq!(run.code, Some(2), "{extra:?}: {}", run.stderr);
        assert!(run.stderr.contains("neurons"), "{}", run.stderr);
    }
}

/// `combined` (SliceGPT's global basis on part of the stream, then neurons) on every family: the
/// predicted size is the written one, the stream and the MLPs are both narrower, and the model
/// runs with the input's interface.
#[test]
fn combined_slices_the_stream_and_removes_neurons_on_every_family() {
    let dir = scratch();
    let mut failures = Vec::new();
    for arch in common::ARCHS {
        let path = fixture(&format!("{arch}/optimum/model.onnx"));
        let out = dir.path().join(format!("{arch}.onnx"));
        let options = Options {
            method: MethodOptions::Combined(onnx_slice::Combined {
                stream_ratio: 0.1,
                allocate_widths: false,
            }),
            ..options(Budget::BytesFraction(0.8), false, "optimum")
        };
        let planned = onnx_slice::plan(&path, &options).unwrap();
        let report =
            onnx_slice::slice(&path, &out, &options).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert_eq!(report.method, "combined");
        assert_eq!(report.weight_bytes_after, planned.after.bytes, "{arch}");
        assert_eq!(report.widths, planned.widths, "{arch}");
        assert!(report.widths[0] < 64, "{arch}: the stream is sliced");
        let (before, after) = planned.mlp_widths.clone().unwrap();
        assert_eq!(report.mlp_widths.as_ref(), Some(&after), "{arch}");
        assert!(after.iter().zip(&before).all(|(a, b)| a <= b), "{arch}");
        check_runs(&path, &out, arch, "optimum", &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// float16 models stay float16 (the refit weights and the created biases too) and run; bfloat16
/// ones, which ONNX Runtime's CPU provider cannot calibrate, are refused before any work.
#[test]
fn float16_models_keep_their_type_and_bfloat16_ones_are_refused() {
    let dir = scratch();
    for arch in common::ARCHS {
        let path = fixture(&format!("lowp/{arch}/optimum_fp16/model.onnx"));
        let out = dir.path().join(format!("{arch}.onnx"));
        onnx_slice::slice(&path, &out, &options(Budget::BytesFraction(0.85), false, "optimum"))
            .unwrap_or_else(|e| panic!("{arch}: {e}"));
        let model = onnx_slice::onnx::load(&out).unwrap();
        let wide: Vec<&str> = model
            .graph
            .initializers
            .iter()
            .filter(|t| !t.dims.is_empty() && t.numel() >= 64)
            .filter(|t| t.dtype != onnx_slice::graph::DataType::Float16)
            .filter(|t| {
                t.dtype.byte_size().is_some()
                    && !matches!(t.dtype, onnx_slice::graph::DataType::Int64)
            })
            .map(|t| t.name.as_str())
            .collect();
        assert!(wide.is_empty(), "{arch}: tensors not float16: {wide:?}");
        let mut failures = Vec::new();
        check_runs(&path, &out, arch, "optimum", &mut failures);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
    let bf16 = fixture("lowp/llama/optimum_bf16/model.onnx");
    let options = options(Budget::BytesFraction(0.85), false, "optimum");
    let error = onnx_slice::slice(&bf16, &dir.path().join("bf16.onnx"), &options).unwrap_err();
    assert!(!dir.path().join("bf16.onnx").exists());
    let root = error.root().to_string();
    assert!(root.contains("bfloat16") && root.contains("float16 or float32"), "{root}");
}
