//! The models people deploy (fixtures/lowp, made by fixtures/generate_lowp.py with ONNX Runtime's
//! own converters): float16 exports are rewritten in float16 and stay accurate, bfloat16 keeps its
//! types, quantized models are refused by name with no output, and a graph that does not
//! type-check is never written. Every model these tests write is loaded by ONNX Runtime.
mod common;

use std::path::{Path, PathBuf};

use common::reference::*;
use common::*;
use indicatif::ProgressBar;
use ndarray::ArrayD;
use onnx_slice::algebra;
use onnx_slice::calibrate::data::CalibrationSet;
use onnx_slice::calibrate::Settings;
use onnx_slice::error::Error;
use onnx_slice::graph::{DataType, Model};
use onnx_slice::interface::load_tokenizer;
use onnx_slice::onnx::{self, SaveOptions};
use onnx_slice::rotate::SHORTCUT_NODE;
use onnx_slice::runtime::ModelSession;
use onnx_slice::slicegpt::{self as transform, Dimensions, FixedBasis as Orientation};
use onnx_slice::slicegpt::{slice_with_pca, PcaOptions};

/// A float16 fixture with its logits on the reference input and its own float16 error.
struct Fp16Case {
    arch: &'static str,
    exporter: &'static str,
    path: PathBuf,
    name: String,
    reference: Reference,
    original: Model,
    expected: ArrayD<f32>,
    base: f32,
}

impl Fp16Case {
    fn new((arch, exporter, path): (&'static str, &'static str, PathBuf)) -> Self {
        let reference = Reference::for_exporter(arch, exporter);
        let original = onnx::load(&path).unwrap();
        let expected = logits_of(&original, path.parent().unwrap(), &reference);
        let base = fp16_error(arch, exporter, &expected, &reference);
        Fp16Case {
            arch,
            exporter,
            name: format!("{arch}/{exporter}_fp16"),
            path,
            reference,
            original,
            expected,
            base,
        }
    }
}

/// Every float16 fixture: (arch, exporter of the fp32 original, path).
fn fp16_models() -> Vec<(&'static str, &'static str, PathBuf)> {
    let mut models: Vec<_> = ARCHS
        .iter()
        .map(|&arch| (arch, "optimum", fixture(&format!("lowp/{arch}/optimum_fp16/model.onnx"))))
        .collect();
    models.extend(
        ["llama", "qwen2", "phi"]
            .map(|arch| (arch, "genai", fixture(&format!("lowp/{arch}/genai_fp16/model.onnx")))),
    );
    models
}

/// Saves `model` and reads the logits back from the written file through ONNX Runtime.
fn saved_logits(model: &Model, reference: &Reference) -> ArrayD<f32> {
    let dir = scratch();
    let out = dir.path().join("model.onnx");
    onnx::save(model, &out, &SaveOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let mut session = open(&out, &cpu());
    let inputs = reference.inputs_for(&session);
    run_logits(&mut session, &inputs)
}

/// Bytes of the float weights (the norms' float32 constants aside).
fn weight_bytes(model: &Model) -> u64 {
    let weight = |t: &&onnx_slice::graph::Tensor| {
        t.dtype != DataType::Int64 && !t.name.starts_with("onnx_slice.norm")
    };
    model.graph.initializers.iter().filter(weight).map(|t| t.byte_len()).sum()
}

/// How far the float16 original is from its float32 source on the reference input: the scale
/// against which a float16 rewrite is judged.
fn fp16_error(arch: &str, exporter: &str, fp16: &ArrayD<f32>, reference: &Reference) -> f32 {
    let fp32 = fixture(&format!("{arch}/{exporter}/model.onnx"));
    let fp32_logits = logits_of(&onnx::load(&fp32).unwrap(), fp32.parent().unwrap(), reference);
    max_abs_diff(fp16, &fp32_logits)
}

/// A float16 rewrite rounds every weight and product once more in float16: its distance from the
/// float16 original must be of the order of the original's own float16 error (against float32),
/// and it must be no further from the float32 model than twice that.
fn judge(
    name: &str,
    got: &ArrayD<f32>,
    original: &ArrayD<f32>,
    base: f32,
    failures: &mut Vec<String>,
) {
    let diff = max_abs_diff(got, original);
    println!("{name}: fp16 original vs fp32 {base:.2e}, rewrite vs fp16 original {diff:.2e}");
    if diff.is_nan() || diff > 2.0 * base {
        failures.push(format!("{name}: rewrite differs from the fp16 original by {diff:.3e}, its own fp16 error is {base:.3e}"));
    }
}

/// The initializers of a rewrite keep their element types; the ones it creates are of the stream's
/// type (the norms' gains too), except the norms' float32 accumulation scalars.
fn check_dtypes(
    name: &str,
    original: &Model,
    rewritten: &Model,
    stream: DataType,
    failures: &mut Vec<String>,
) {
    for t in &rewritten.graph.initializers {
        let expected = match original.graph.initializer(&t.name) {
            Some(o) => o.dtype,
            None if t.dtype == DataType::Int64 => DataType::Int64,
            None if t.name.starts_with("onnx_slice.norm.gain") => stream,
            None if t.name.starts_with("onnx_slice.norm") => DataType::Float,
            None => stream,
        };
        if t.dtype != expected {
            failures.push(format!(
                "{name}: initializer '{}' is {}, expected {}",
                t.name,
                t.dtype.name(),
                expected.name()
            ));
        }
    }
    let interface = |m: &Model| {
        let decl = |v: &onnx_slice::graph::ValueInfo| (v.name.clone(), v.elem_type());
        (
            m.graph.inputs.iter().map(decl).collect::<Vec<_>>(),
            m.graph.outputs.iter().map(decl).collect::<Vec<_>>(),
        )
    };
    if interface(original) != interface(rewritten) {
        failures.push(format!("{name}: the inputs' and outputs' element types changed"));
    }
}

#[test]
fn fp16_rotation_keeps_the_types_halves_the_size_and_the_logits() {
    let mut failures = Vec::new();
    for Fp16Case { arch, exporter, name, reference, original, expected, base, .. } in
        fp16_models().into_iter().map(Fp16Case::new)
    {
        let mut rotated = original.clone();
        transform::rotate(&mut rotated, Orientation::Random { seed: 3 }, &Dimensions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        check_dtypes(&name, &original, &rotated, DataType::Float16, &mut failures);
        judge(&name, &saved_logits(&rotated, &reference), &expected, base, &mut failures);

        let fp32_path = fixture(&format!("{arch}/{exporter}/model.onnx"));
        let mut fp32 = onnx::load(&fp32_path).unwrap();
        transform::rotate(&mut fp32, Orientation::Random { seed: 3 }, &Dimensions::default())
            .unwrap();
        let (half, full) = (weight_bytes(&rotated), weight_bytes(&fp32));
        if 2 * half != full {
            failures.push(format!(
                "{name}: the fp16 rewrite's initializers have {half} bytes, the fp32 one's {full}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn calibration_set(arch: &str) -> CalibrationSet {
    let tokenizer = load_tokenizer(&fixture(&format!("_hf/{arch}/tokenizer.json"))).unwrap();
    let text = onnx_slice::calibrate::data::default_calibration_text();
    CalibrationSet::from_texts(&[text[..20_000].to_string()], &tokenizer, 6, 32, 0).unwrap()
}

fn pca(path: &Path, arch: &str, ratio: f64) -> onnx_slice::error::Result<Model> {
    let mut model = onnx::load(path).unwrap();
    let options = PcaOptions {
        dims: Dimensions { ratio, ..Dimensions::default() },
        settings: Settings {
            batch: 4,
            session: cpu(),
            model_path: Some(path.to_path_buf()),
            on_execution_provider: None,
            statistics: Default::default(),
        },
        center_embeddings: false,
        allocation: None,
        keep_bases: false,
    };
    slice_with_pca(&mut model, &calibration_set(arch), &options, &ProgressBar::hidden())?;
    Ok(model)
}

#[test]
fn fp16_pca_at_ratio_zero_reproduces_and_at_a_quarter_runs() {
    let mut failures = Vec::new();
    for Fp16Case { arch, path, name, reference, original, expected, base, .. } in
        fp16_models().into_iter().map(Fp16Case::new)
    {
        let exact = pca(&path, arch, 0.0).unwrap_or_else(|e| panic!("{name}: {e}"));
        judge(
            &format!("{name} PCA ratio 0"),
            &saved_logits(&exact, &reference),
            &expected,
            base,
            &mut failures,
        );

        let sliced = pca(&path, arch, 0.25).unwrap_or_else(|e| panic!("{name}: {e}"));
        check_dtypes(&name, &original, &sliced, DataType::Float16, &mut failures);
        let got = saved_logits(&sliced, &reference);
        if got.shape() != expected.shape() || got.iter().any(|v| !v.is_finite()) {
            failures
                .push(format!("{name}: sliced logits of shape {:?}, or not finite", got.shape()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The token table of `model` times `factor`, in the table's own type.
fn scale_embeddings(model: &mut Model, factor: f64) {
    let layout = onnx_slice::structure::detect(&model.graph).unwrap();
    let table = model.graph.initializer(&layout.embeddings[0].table).unwrap().clone();
    let values: Vec<f64> = table.to_f32().unwrap().iter().map(|&v| v as f64 * factor).collect();
    let matrix =
        faer::MatRef::from_row_major_slice(&values, table.dims[0] as usize, table.dims[1] as usize);
    model.graph.set_initializer(algebra::mat_to_tensor(table.name.clone(), matrix, table.dtype));
}

/// Real models carry stream values whose squares, summed over D in float16, pass 65504: at D = 64
/// an RMS over 32. The rewritten norms sum in float32 (checked on the graph: ONNX Runtime's CPU
/// provider has no float16 kernels for these ops and casts them up itself, so on the CPU a float16
/// sum would not overflow either; the CUDA provider runs them in float16). With the embeddings
/// scaled up that far (the stream's RMS is then about 100, its values still well inside float16),
/// the rewrite stays as close to the float32 model as the float16 original is.
#[test]
fn fp16_norm_does_not_overflow_on_a_large_stream() {
    const FACTOR: f64 = 2000.0;
    let reference = Reference::for_exporter("llama", "optimum");
    let (fp16_path, fp32_path) =
        (fixture("lowp/llama/optimum_fp16/model.onnx"), fixture("llama/optimum/model.onnx"));
    let mut fp32 = onnx::load(&fp32_path).unwrap();
    scale_embeddings(&mut fp32, FACTOR);
    let expected = logits_of(&fp32, fp32_path.parent().unwrap(), &reference);
    let mut original = onnx::load(&fp16_path).unwrap();
    scale_embeddings(&mut original, FACTOR);
    let table = original
        .graph
        .initializer(&onnx_slice::structure::detect(&original.graph).unwrap().embeddings[0].table)
        .unwrap();
    let rms = (table.to_f32().unwrap().iter().map(|&v| (v as f64).powi(2)).sum::<f64>()
        / table.numel() as f64)
        .sqrt();
    assert!(
        64.0 * rms * rms > 65504.0,
        "the scaled stream (RMS {rms}) must overflow a float16 sum of squares"
    );
    let base =
        max_abs_diff(&logits_of(&original, fp16_path.parent().unwrap(), &reference), &expected);
    let mut rewritten = original.clone();
    transform::rotate(&mut rewritten, Orientation::Random { seed: 5 }, &Dimensions::default())
        .unwrap();
    let types = onnx_slice::graph::value_types(&rewritten.graph);
    let sums: Vec<_> = rewritten
        .graph
        .nodes
        .iter()
        .filter(|n| n.name.starts_with("onnx_slice/norm") && n.is("ReduceMean"))
        .collect();
    assert_eq!(sums.len(), 5);
    for sum in sums {
        assert_eq!(
            types.get(&sum.outputs[0]),
            Some(&DataType::Float),
            "{} does not sum in float32",
            sum.name
        );
    }
    let got = saved_logits(&rewritten, &reference);
    let diff = max_abs_diff(&got, &expected);
    println!("scaled stream: fp16 original vs fp32 {base:.2e}, rewrite vs fp32 {diff:.2e}");
    assert!(
        got.iter().all(|v| v.is_finite()) && diff <= 2.0 * base,
        "scaled stream: {diff:.3e} from the fp32 logits (fp16 original: {base:.3e})"
    );
}

/// ONNX Runtime's CPU provider does not load this bfloat16 graph at all (it has no bfloat16
/// kernels for most of its ops), so what can be checked is what onnx-slice does: the rewrite keeps
/// every bfloat16 tensor bfloat16, the written graph type-checks, and PCA calibration is refused
/// with a remedy instead of failing inside ONNX Runtime.
#[test]
fn bf16_rewrite_keeps_the_types_and_pca_is_refused_clearly() {
    let path = fixture("lowp/llama/optimum_bf16/model.onnx");
    runtime();
    assert!(
        ModelSession::from_file(&path, &cpu()).is_err(),
        "ONNX Runtime runs the bfloat16 model now: test its logits"
    );
    let original = onnx::load(&path).unwrap();
    let mut sliced = original.clone();
    transform::rotate(
        &mut sliced,
        Orientation::Random { seed: 1 },
        &Dimensions { ratio: 0.25, ..Dimensions::default() },
    )
    .unwrap();
    let mut failures = Vec::new();
    check_dtypes("llama/optimum_bf16", &original, &sliced, DataType::Bfloat16, &mut failures);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let dir = scratch();
    onnx::save(&sliced, dir.path().join("model.onnx"), &SaveOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let err = pca(&path, "llama", 0.25).expect_err("PCA of a bfloat16 model");
    assert!(err.to_string().contains("this one's stream is bfloat16"), "{err}");
}

/// A shortcut matrix of the wrong type (float32 on a float16 stream, the bug this check exists for)
/// is refused before anything is written, and ONNX Runtime agrees that the graph is invalid.
#[test]
fn a_mistyped_graph_is_refused_and_nothing_is_written() {
    let path = fixture("lowp/gpt2/optimum_fp16/model.onnx");
    let mut model = onnx::load(&path).unwrap();
    transform::rotate(&mut model, Orientation::Random { seed: 2 }, &Dimensions::default()).unwrap();
    let shortcut = model.graph.nodes.iter().find(|n| n.name.starts_with(SHORTCUT_NODE)).unwrap();
    let matrix = model.graph.initializer(&shortcut.inputs[1]).unwrap().clone();
    let values: Vec<f64> = matrix.to_f32().unwrap().iter().map(|&v| v as f64).collect();
    let (rows, cols) = (matrix.dims[0] as usize, matrix.dims[1] as usize);
    let f32_matrix = algebra::mat_to_tensor(
        matrix.name.clone(),
        faer::MatRef::from_row_major_slice(&values, rows, cols),
        DataType::Float,
    );
    model.graph.set_initializer(f32_matrix);

    runtime();
    assert!(
        ModelSession::from_bytes(&onnx::to_bytes(&model).unwrap(), None, &cpu()).is_err(),
        "ONNX Runtime loads the mistyped graph"
    );
    let dir = scratch();
    let out = dir.path().join("model.onnx");
    match onnx::save(&model, &out, &SaveOptions::default()) {
        Err(Error::IllTyped { source, .. }) => {
            assert_eq!(source.op, "MatMul");
            assert!(
                source.message.contains("(float16)") && source.message.contains("(float32)"),
                "{source}"
            );
        }
        other => panic!("expected IllTyped, got {other:?}"),
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "something was written: {left:?}");
}

/// Each quantized form is refused by the command with its own message and the remedy, with PCA
/// (the default) and without, and no output file appears.
#[test]
fn quantized_models_are_refused_by_name() {
    for (rel, names) in [
        (
            "lowp/llama/optimum_int8/model.onnx",
            "int8 dynamically quantized (MatMulInteger/DynamicQuantizeLinear)",
        ),
        ("lowp/llama/optimum_qdq/model.onnx", "QDQ quantized (QuantizeLinear/DequantizeLinear)"),
        (
            "lowp/llama/genai_int4/model.onnx",
            "block quantized to int4 (MatMulNBits/GatherBlockQuantized)",
        ),
    ] {
        let model = fixture(rel);
        for extra in [&[][..], &["--orientation", "random-basis"][..]] {
            let dir = scratch();
            let out = dir.path().join("sliced.onnx");
            let run = std::process::Command::new(env!("CARGO_BIN_EXE_onnx-slice"))
                .args([
                    model.as_os_str(),
                    "-o".as_ref(),
                    out.as_os_str(),
                    "--ratio".as_ref(),
                    "0.25".as_ref(),
                    "--quiet".as_ref(),
                ])
                .args(["--calib-samples", "2", "--calib-seqlen", "16"])
                .args(extra)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&run.stderr);
            assert_eq!(
                run.status.code(),
                Some(3),
                "{rel} {extra:?}: exit code 3 (a model onnx-slice cannot slice): {stderr}"
            );
            assert!(stderr.contains(names), "{rel} {extra:?}: {stderr}");
            assert!(stderr.contains("then quantize the sliced model"), "{rel}: {stderr}");
            assert!(
                std::fs::read_dir(dir.path()).unwrap().next().is_none(),
                "{rel} {extra:?}: an output was written"
            );
        }
    }
}
