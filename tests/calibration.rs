//! SliceGPT with PCA through ONNX Runtime on the tiny fixtures: at ratio 0 the calibrated,
//! rotated model computes the original logits; sliced models keep the interface; reruns are
//! byte-identical.
mod common;

use common::reference::*;
use common::*;
use indicatif::ProgressBar;
use onnx_slice::calibrate::data::CalibrationSet;
use onnx_slice::calibrate::Settings;
use onnx_slice::graph::Model;
use onnx_slice::interface::load_tokenizer;
use onnx_slice::onnx;
use onnx_slice::slicegpt::{self as transform, BasisMode, Dimensions};
use onnx_slice::slicegpt::{slice_with_pca, PcaOptions};

fn calibration_set(arch: &str) -> CalibrationSet {
    let tokenizer = load_tokenizer(&fixture(&format!("_hf/{arch}/tokenizer.json"))).unwrap();
    let text = onnx_slice::calibrate::data::default_calibration_text();
    let texts = vec![text[..20_000].to_string()];
    CalibrationSet::from_texts(&texts, &tokenizer, 6, 32, 0).unwrap()
}

fn calibrate(path: &std::path::Path, arch: &str, ratio: f64) -> Model {
    calibrate_with(path, arch, ratio, false)
}

fn calibrate_with(
    path: &std::path::Path,
    arch: &str,
    ratio: f64,
    center_embeddings: bool,
) -> Model {
    calibrate_dims(path, arch, Dimensions { ratio, ..Dimensions::default() }, center_embeddings)
}

fn calibrate_dims(
    path: &std::path::Path,
    arch: &str,
    dims: Dimensions,
    center_embeddings: bool,
) -> Model {
    let mut model = onnx::load(path).unwrap();
    // Opset-23 dynamo exports run in ONNX Runtime at batch 1 only (an exporter bug, see
    // fixtures/README.md).
    let batch = if path.to_string_lossy().contains("dynamo23") { 1 } else { 4 };
    let options = PcaOptions {
        dims,
        settings: Settings {
            batch,
            session: cpu(),
            model_path: Some(path.to_path_buf()),
            on_execution_provider: None,
            statistics: Default::default(),
        },
        center_embeddings,
        allocation: None,
        keep_bases: false,
    };
    slice_with_pca(&mut model, &calibration_set(arch), &options, &ProgressBar::hidden())
        .unwrap_or_else(|e| panic!("{e}"));
    model
}

#[test]
fn pca_rotation_at_ratio_zero_keeps_the_logits() {
    let mut failures = Vec::new();
    for (arch, exporter, path) in all_models() {
        let reference = Reference::for_exporter(&arch, &exporter);
        let dir = path.parent().unwrap();
        let expected = logits_of(&onnx::load(&path).unwrap(), dir, &reference);
        let result =
            std::panic::catch_unwind(|| logits_of(&calibrate(&path, &arch, 0.0), dir, &reference));
        match result {
            Ok(got) => {
                let diff = max_abs_diff(&got, &expected);
                if diff.is_nan() || diff > 1e-4 {
                    failures.push(format!("{arch}/{exporter}: max |Δlogits| = {diff}"));
                }
            }
            Err(e) => failures.push(format!(
                "{arch}/{exporter}: {}",
                e.downcast_ref::<String>().cloned().unwrap_or_default()
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The shared bases (`--basis block`, `--basis global`) have their own calibration order (a
/// look-ahead run per block; one unsliced pass): exact at ratio 0 on one export of every family.
#[test]
fn pca_block_and_global_bases_at_ratio_zero_keep_the_logits() {
    let mut failures = Vec::new();
    for arch in ARCHS {
        let path = fixture(&format!("{arch}/optimum/model.onnx"));
        let reference = Reference::for_exporter(arch, "optimum");
        let dir = path.parent().unwrap();
        let expected = logits_of(&onnx::load(&path).unwrap(), dir, &reference);
        for basis in [BasisMode::Block, BasisMode::Global] {
            let dims = Dimensions { basis, ..Dimensions::default() };
            let got = logits_of(&calibrate_dims(&path, arch, dims, false), dir, &reference);
            let diff = max_abs_diff(&got, &expected);
            if diff.is_nan() || diff > 1e-4 {
                failures.push(format!("{arch}/optimum, basis {basis}: max |Δlogits| = {diff}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn pca_sliced_models_keep_every_output_shape() {
    let mut failures = Vec::new();
    for (arch, exporter, path) in all_models() {
        let reference = Reference::for_exporter(&arch, &exporter);
        let expected = run_all(&path, &reference);
        let result = std::panic::catch_unwind(|| {
            let sliced = calibrate(&path, &arch, 0.25);
            let dir = scratch();
            let out = dir.path().join("sliced.onnx");
            onnx::save(&sliced, &out, &onnx::SaveOptions::default()).unwrap();
            run_all(&out, &reference)
        });
        match result {
            Ok(got) => {
                let shapes = |o: &[(String, onnx_slice::runtime::TensorValue)]| {
                    o.iter().map(|(n, v)| (n.clone(), v.shape().to_vec())).collect::<Vec<_>>()
                };
                if shapes(&got) != shapes(&expected) {
                    failures.push(format!(
                        "{arch}/{exporter}: outputs {:?}, expected {:?}",
                        shapes(&got),
                        shapes(&expected)
                    ));
                }
            }
            Err(e) => failures.push(format!(
                "{arch}/{exporter}: {}",
                e.downcast_ref::<String>().cloned().unwrap_or_default()
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn reruns_are_byte_identical() {
    for rel in ["llama/optimum/model.onnx", "gpt2/ts14/model.onnx", "phi/genai/model.onnx"] {
        let path = fixture(rel);
        let arch = rel.split('/').next().unwrap();
        let first = onnx::to_bytes(&calibrate(&path, arch, 0.25)).unwrap();
        let second = onnx::to_bytes(&calibrate(&path, arch, 0.25)).unwrap();
        assert!(first == second, "{rel}: two runs wrote different models");
    }
}

#[test]
fn the_command_writes_model_report_and_rotations() {
    let dir = scratch();
    let out = dir.path().join("sliced.onnx");
    let report = dir.path().join("report.json");
    let rotations = dir.path().join("rotations.safetensors");
    let model = fixture("gpt2/optimum/model.onnx");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_onnx-slice"))
        .args([
            model.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
            "--ratio".as_ref(),
            "0.25".as_ref(),
        ])
        .args(["--calib-samples", "8", "--calib-seqlen", "64", "--quiet"])
        .arg("--calib")
        .arg(fixture("calibration.txt"))
        .arg("--report")
        .arg(&report)
        .arg("--save-rotations")
        .arg(&rotations)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(run.stderr.is_empty(), "--quiet printed: {}", String::from_utf8_lossy(&run.stderr));

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["widths"], serde_json::json!([48, 48, 48, 48, 64]));
    assert_eq!(report["stream_width"], 64);
    assert_eq!(report["calibration_tokens"], 8 * 64);
    let seconds = report["seconds"].as_object().unwrap();
    assert!(
        seconds.keys().all(|k| k.ends_with("_seconds")) && seconds.contains_key("total_seconds"),
        "{seconds:?}"
    );
    let original = onnx_slice::size::weight_totals(&onnx::load(&model).unwrap().graph);
    let sliced = onnx::load(&out).unwrap();
    let after = onnx_slice::size::weight_totals(&sliced.graph);
    assert_eq!(report["parameters_before"], original.parameters);
    assert_eq!(report["parameters_after"], after.parameters);
    assert_eq!(report["weight_bytes_after"], after.bytes);
    assert_eq!(report["basis"], "global");
    // The default basis is global: one skip changes basis, into the head's input, which keeps D
    // and extends the global basis: a zero Pad (opset 18), no matrix.
    assert_eq!(report["shortcut_parameters"], 0);
    assert!(sliced.graph.nodes.iter().any(|n| n.op_type == "Pad"));
    assert!(
        sliced.metadata.iter().any(|(k, v)| k == "onnx_slice.widths" && v == "48,48,48,48,64"),
        "{:?}",
        sliced.metadata
    );

    let saved = onnx_slice::pca::load_rotations(&rotations).unwrap();
    assert_eq!(saved.len(), 5);
    let kept: Vec<usize> = saved.iter().map(|(_, _, k)| *k).collect();
    assert_eq!(kept, [48, 48, 48, 48, 64]);
    assert!(saved
        .iter()
        .all(|(_, basis, _)| basis.q.nrows() == 64
            && basis.eigenvalues.windows(2).all(|w| w[0] >= w[1])));
}

/// `--center-embeddings` changes an RMSNorm model (and only such a model), and PCA slicing at
/// ratio 0 then reproduces the changed model exactly.
#[test]
fn centered_embeddings_change_rmsnorm_models_only_and_slice_exactly() {
    for (arch, exporter) in [("llama", "optimum"), ("gpt2", "optimum")] {
        let path = fixture(&format!("{arch}/{exporter}/model.onnx"));
        let (dir, reference) = (path.parent().unwrap(), Reference::for_exporter(arch, exporter));
        let mut centered = onnx::load(&path).unwrap();
        let mut rewritten = transform::fuse(&mut centered).unwrap();
        transform::center_embeddings(&mut centered, &mut rewritten).unwrap();
        let changed = rewritten.centered_embeddings;
        assert_eq!(changed, arch == "llama", "{arch}: centering changed the model: {changed}");
        // A tied table (GPT-2) stays as it is: its adapter `A` is centred, which centres `E A`.
        let token = &rewritten.layout.embeddings[0];
        let table = centered
            .graph
            .initializer(token.adapter.as_ref().unwrap_or(&token.table))
            .unwrap()
            .to_f32()
            .unwrap();
        let worst_mean = table
            .chunks(rewritten.layout.width)
            .map(|row| (row.iter().map(|&v| v as f64).sum::<f64>() / row.len() as f64).abs())
            .fold(0.0, f64::max);
        assert!(worst_mean < 1e-6, "{arch}: an embedding row has mean {worst_mean}");

        let original = logits_of(&onnx::load(&path).unwrap(), dir, &reference);
        let expected = logits_of(&centered, dir, &reference);
        let moved = max_abs_diff(&expected, &original);
        assert_eq!(moved > 1e-4, changed, "{arch}: centering moved the logits by {moved}");
        let sliced = logits_of(&calibrate_with(&path, arch, 0.0, true), dir, &reference);
        let diff = max_abs_diff(&sliced, &expected);
        assert!(
            diff <= 1e-4,
            "{arch}: ratio 0 after centering differs from the centered model by {diff}"
        );
    }
}

#[test]
fn the_command_records_centered_embeddings_and_refuses_them_without_pca() {
    let dir = scratch();
    let out = dir.path().join("sliced.onnx");
    let report = dir.path().join("report.json");
    let model = fixture("llama/optimum/model.onnx");
    let slice = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_onnx-slice"))
            .args([
                model.as_os_str(),
                "-o".as_ref(),
                out.as_os_str(),
                "--ratio".as_ref(),
                "0.25".as_ref(),
            ])
            .args([
                "--calib-samples",
                "4",
                "--calib-seqlen",
                "32",
                "--quiet",
                "--center-embeddings",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let run = slice(&["--report", report.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["centered_embeddings"], true);
    let sliced = onnx::load(&out).unwrap();
    assert!(
        sliced.metadata.iter().any(|(k, v)| k == "onnx_slice.centered_embeddings" && v == "true"),
        "{:?}",
        sliced.metadata
    );

    std::fs::remove_file(&out).unwrap();
    let refused = slice(&["--orientation", "random-basis"]);
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--center-embeddings applies to PCA slicing"), "{stderr}");
    assert!(!out.exists(), "an output file was written");
}

/// Bases are held only when asked (a 7B model's are gigabytes), and then once per group: every
/// point of a group shares its group's one basis.
#[test]
fn bases_are_kept_only_when_asked_and_once_per_group() {
    let path = fixture("llama/optimum/model.onnx");
    for (basis, keep) in
        [(BasisMode::Global, true), (BasisMode::Block, true), (BasisMode::Point, false)]
    {
        let mut model = onnx::load(&path).unwrap();
        let options = PcaOptions {
            dims: Dimensions { ratio: 0.25, basis, ..Dimensions::default() },
            settings: Settings {
                batch: 4,
                session: cpu(),
                model_path: Some(path.clone()),
                on_execution_provider: None,
                statistics: Default::default(),
            },
            center_embeddings: false,
            allocation: None,
            keep_bases: keep,
        };
        let calibrated =
            slice_with_pca(&mut model, &calibration_set("llama"), &options, &ProgressBar::hidden())
                .unwrap();
        let groups = &calibrated.rewritten.groups;
        if !keep {
            assert!(calibrated.bases.is_empty(), "{basis:?}: bases kept unasked");
            continue;
        }
        assert_eq!(calibrated.bases.len(), groups.len(), "{basis:?}");
        for p in 1..groups.len() {
            let shared = std::sync::Arc::ptr_eq(&calibrated.bases[p], &calibrated.bases[p - 1]);
            assert_eq!(shared, groups[p] == groups[p - 1], "{basis:?}, point {p}");
        }
    }
}
