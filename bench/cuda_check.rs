//! End-to-end check of the CUDA execution provider on the tiny fixtures (see bench/README.md).
//!
//! `cargo build --release --features cuda --example cuda_check`, then
//! `cuda_check [--ep cuda|cpu] [--json FILE] [--calib-samples N] [--calib-seqlen L] [MODEL.onnx...]`
//! from the repository root
//! (default: every `fixtures/<arch>/<exporter>/model.onnx`, as the tests enumerate them).
//!
//! For each model, on its reference input (`input_ids` and `attention_mask` from
//! `fixtures/<arch>/reference.npz`, first row only for `dynamo23`; fed by the library's
//! `InputPlan`, as calibration and `eval` feed models):
//! 1. the original model's logits on the CPU EP and on `--ep`: max |Δ|;
//! 2. PCA slicing at ratio 0 with calibration on `--ep`, the result run on `--ep`: max |Δ| against
//!    the original on `--ep` (must be ≤ 1e-4);
//! 3. slicing at ratio 0.25 with calibration on `--ep` and on the CPU EP, both results run on the
//!    CPU EP: max |Δ| between them, and whether the saved files are byte-identical;
//! 4. the seconds of each slicing (load, calibrate, rotate, save) and the EP the sessions got.
//!
//! Slicing is the library's one call, `onnx_slice::slice`, which the CLI makes: PCA on the built-in
//! calibration text with the CLI's defaults (128 samples, 2048 tokens capped by the model's
//! position limit, batch 4, seed 42; samples and length can be changed as in the CLI) except the
//! basis, one per point (`--basis point`, the paper's; the most calibration runs on the EP under
//! test), and batch 1 for `dynamo23` exports, which ONNX Runtime runs at batch 1 only
//! (fixtures/README.md). The tokenizer is the one beside the model, else the fixture's
//! `_hf/<arch>/tokenizer.json`.
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, ensure, Context as _};
use clap::Parser;
use ndarray::{Array2, ArrayD, Axis, Ix2};
use onnx_slice::calibrate::data;
use onnx_slice::interface::{self, InputPlan};
use onnx_slice::runtime::npy::Npz;
use onnx_slice::runtime::{init_runtime, Ep, ModelSession, RuntimeError, SessionConfig};
use onnx_slice::slicegpt::BasisMode;
use onnx_slice::Options;
use serde::Serialize;

/// Ratio-0 slicing must reproduce the original logits to this.
const TOLERANCE: f32 = 1e-4;
/// The order of tests/common's fixture list.
const ARCHS: [&str; 6] = ["gpt2", "opt", "llama", "qwen2", "phi", "gpt_neox"];
const CALIB_BATCH: usize = 4;

#[derive(Parser)]
#[command(about = "Check the CUDA execution provider end to end on the fixtures")]
struct Args {
    /// Execution provider under test (compared with the CPU EP).
    #[arg(long, value_enum, default_value = "cuda")]
    ep: EpArg,
    /// Also write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Calibration sequences (the CLI's --calib-samples).
    #[arg(long, default_value_t = data::DEFAULT_SAMPLES)]
    calib_samples: usize,
    /// Tokens per calibration sequence, capped by the model's position limit where the library
    /// finds one (the CLI's --calib-seqlen).
    #[arg(long, default_value_t = data::DEFAULT_SEQLEN)]
    calib_seqlen: usize,
    /// Fixture models (default: every fixtures/<arch>/<exporter>/model.onnx).
    models: Vec<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum EpArg {
    Cuda,
    Cpu,
}

#[derive(Serialize)]
struct Summary {
    ep: String,
    ort_library: String,
    tolerance: f32,
    pass: bool,
    /// Why the run stopped early (the EP could not be used at all).
    aborted: Option<String>,
    calibration: Calibration,
    seconds: f64,
    models: Vec<Row>,
}

/// Calibration settings: samples, and tokens per sample before the position-limit cap.
#[derive(Serialize)]
struct Calibration {
    samples: usize,
    seqlen: usize,
}

#[derive(Serialize)]
struct Row {
    model: String,
    #[serde(flatten)]
    measures: Option<Measures>,
    error: Option<String>,
}

#[derive(Serialize)]
struct Measures {
    /// What the session on `--ep` got (`EpChoice`); calibration sessions on `--ep cuda` use CUDA
    /// or fail, never fall back.
    ep_used: String,
    /// Step 1: original model, CPU EP vs `--ep`.
    diff_original_cpu_vs_ep: f32,
    /// Step 2: ratio 0 sliced on `--ep` vs original, both run on `--ep`.
    diff_ratio0: f32,
    /// Step 3: ratio 0.25 calibrated on `--ep` vs on CPU, both run on the CPU EP.
    diff_ratio025_ep_vs_cpu: f32,
    ratio025_bytes_identical: bool,
    calibration_tokens: u64,
    seconds_ratio0_ep: f64,
    seconds_ratio025_ep: f64,
    seconds_ratio025_cpu: f64,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<bool> {
    let started = Instant::now();
    let ep = match args.ep {
        EpArg::Cuda => Ep::Cuda,
        EpArg::Cpu => Ep::Cpu,
    };
    ensure!(
        args.calib_samples > 0 && args.calib_seqlen > 0,
        "--calib-samples and --calib-seqlen must be at least 1"
    );
    let calibration = Calibration { samples: args.calib_samples, seqlen: args.calib_seqlen };
    let library = init_runtime(None)?;
    let models = if args.models.is_empty() { fixture_models()? } else { args.models };
    println!("EP under test: {ep}; ONNX Runtime: {}; {} models", library.display(), models.len());
    println!(
        "{:<22} {:<5} {:>10} {:>10} {:>12} {:>6} {:>7} {:>8} {:>9}",
        "model", "EP", "|Δ|ep/cpu", "|Δ|r0", "|Δ|r.25 e/c", "same", "s r0", "s r.25", "s r.25cpu"
    );
    let mut rows = Vec::new();
    let mut aborted = None;
    for path in &models {
        let name = display_name(path);
        let result = check(path, ep, &calibration);
        match &result {
            Ok(m) => println!(
                "{name:<22} {:<5} {:>10.2e} {:>10.2e} {:>12.2e} {:>6} {:>7.2} {:>8.2} {:>9.2}{}",
                m.ep_used,
                m.diff_original_cpu_vs_ep,
                m.diff_ratio0,
                m.diff_ratio025_ep_vs_cpu,
                if m.ratio025_bytes_identical { "yes" } else { "no" },
                m.seconds_ratio0_ep,
                m.seconds_ratio025_ep,
                m.seconds_ratio025_cpu,
                if m.diff_ratio0 <= TOLERANCE { "" } else { "  FAIL: ratio 0 changed the logits" }
            ),
            Err(e) => println!("{name:<22} error: {e:#}"),
        }
        std::io::stdout().flush().ok();
        let (measures, error) = match result {
            Ok(m) => (Some(m), None),
            Err(e) => {
                if cuda_unavailable(&e) {
                    aborted = Some(format!("{e:#}"));
                }
                (None, Some(format!("{e:#}")))
            }
        };
        rows.push(Row { model: name, measures, error });
        if aborted.is_some() {
            println!("stopping: the {ep} execution provider cannot be used, so every model would fail the same way");
            break;
        }
    }
    // `<=` is false for NaN, so a NaN difference fails.
    let pass = aborted.is_none()
        && rows.iter().all(|r| r.measures.as_ref().is_some_and(|m| m.diff_ratio0 <= TOLERANCE));
    let failed = rows
        .iter()
        .filter(|r| !r.measures.as_ref().is_some_and(|m| m.diff_ratio0 <= TOLERANCE))
        .count();
    let seconds = started.elapsed().as_secs_f64();
    let skipped = models.len() - rows.len();
    println!(
        "{}: {} of {} models failed{} (ratio-0 tolerance {TOLERANCE:e}, EP {ep}), {seconds:.1} s",
        if pass { "PASS" } else { "FAIL" },
        failed,
        models.len(),
        if skipped > 0 { format!(", {skipped} not run") } else { String::new() }
    );
    if let Some(path) = &args.json {
        let summary = Summary {
            ep: ep.to_string(),
            ort_library: library.display().to_string(),
            tolerance: TOLERANCE,
            pass,
            aborted,
            calibration,
            seconds,
            models: rows,
        };
        std::fs::write(path, serde_json::to_string_pretty(&summary)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(pass)
}

/// Steps 1–4 for one model.
fn check(path: &Path, ep: Ep, calibration: &Calibration) -> anyhow::Result<Measures> {
    let input = ReferenceInput::for_model(path)?;
    let scratch = tempfile::tempdir()?;
    let (original_cpu, _) = logits(path, path, Ep::Cpu, &input)?;
    let (original_ep, ep_used) = logits(path, path, ep, &input)?;

    let r0 = scratch.path().join("ratio0.onnx");
    let (seconds_ratio0_ep, calibration_tokens) = slice(path, calibration, 0.0, ep, &r0)?;
    let (ratio0, _) = logits(&r0, path, ep, &input)?;

    let (on_ep, on_cpu) =
        (scratch.path().join("r025-ep.onnx"), scratch.path().join("r025-cpu.onnx"));
    let (seconds_ratio025_ep, _) = slice(path, calibration, 0.25, ep, &on_ep)?;
    let (seconds_ratio025_cpu, _) = slice(path, calibration, 0.25, Ep::Cpu, &on_cpu)?;
    let (ep_sliced, _) = logits(&on_ep, path, Ep::Cpu, &input)?;
    let (cpu_sliced, _) = logits(&on_cpu, path, Ep::Cpu, &input)?;

    Ok(Measures {
        ep_used,
        diff_original_cpu_vs_ep: max_abs_diff(&original_cpu, &original_ep)?,
        diff_ratio0: max_abs_diff(&ratio0, &original_ep)?,
        diff_ratio025_ep_vs_cpu: max_abs_diff(&ep_sliced, &cpu_sliced)?,
        ratio025_bytes_identical: std::fs::read(&on_ep)? == std::fs::read(&on_cpu)?,
        calibration_tokens,
        seconds_ratio0_ep,
        seconds_ratio025_ep,
        seconds_ratio025_cpu,
    })
}

/// The library's one slicing call, as the CLI makes it: PCA on `ep` at `ratio`, the paper's basis
/// per point, recorded and saved. Returns the seconds it took and the calibration tokens.
fn slice(
    path: &Path,
    calibration: &Calibration,
    ratio: f64,
    ep: Ep,
    out: &Path,
) -> anyhow::Result<(f64, u64)> {
    let started = Instant::now();
    let options = Options {
        method: onnx_slice::pipeline::MethodOptions::SliceGpt(onnx_slice::slicegpt::SliceGpt {
            ratio,
            basis: BasisMode::Point,
            ..Default::default()
        }),
        calib_samples: calibration.samples,
        calib_seqlen: calibration.seqlen,
        calib_batch: if exporter(path) == "dynamo23" { 1 } else { CALIB_BATCH },
        tokenizer: fixture_tokenizer(path),
        ep,
        ..Options::default()
    };
    let report = onnx_slice::slice(path, out, &options)
        .with_context(|| format!("slicing {} at {ratio} on {ep}", path.display()))?;
    Ok((started.elapsed().as_secs_f64(), report.calibration_tokens))
}

/// The tokenizer beside the model, else the fixture's `_hf/<arch>/tokenizer.json`.
fn fixture_tokenizer(path: &Path) -> Option<PathBuf> {
    match interface::find_tokenizer(path, None, "--calib-ids FILE.npy") {
        Ok(_) => None,
        Err(_) => Some(fixture_dir(path).join(format!("_hf/{}/tokenizer.json", arch(path)))),
    }
}

/// The logits of `model` on `ep` for the reference input, and the EP the session got. The
/// inputs are planned with the config files beside `original` (a sliced model has the same
/// interface).
fn logits(
    model: &Path,
    original: &Path,
    ep: Ep,
    input: &ReferenceInput,
) -> anyhow::Result<(ArrayD<f32>, String)> {
    let mut session =
        ModelSession::from_file(model, &SessionConfig { ep, ..SessionConfig::default() })?;
    let plan = InputPlan::for_session(&session, Some(original))?;
    let logits = plan.logits(&mut session, &input.ids, Some(&input.mask))?;
    Ok((logits, session.ep().to_string()))
}

/// `input_ids` and `attention_mask` from the arch's reference.npz (no padding, so the plan's
/// position ids `cumsum(mask) − 1` are the reference's).
struct ReferenceInput {
    ids: Array2<i64>,
    mask: Array2<i64>,
}

impl ReferenceInput {
    fn for_model(path: &Path) -> anyhow::Result<Self> {
        let npz_path = fixture_dir(path).join(arch(path)).join("reference.npz");
        let npz = Npz::read(&npz_path)?;
        let rows = if exporter(path) == "dynamo23" { 1 } else { usize::MAX };
        let matrix = |name: &str| -> anyhow::Result<Array2<i64>> {
            let array = npz.array(name)?.clone().into_i64()?.into_dimensionality::<Ix2>()?;
            let rows = rows.min(array.nrows());
            Ok(array.slice_axis(Axis(0), (0..rows).into()).to_owned())
        };
        Ok(Self { ids: matrix("input_ids")?, mask: matrix("attention_mask")? })
    }
}

fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> anyhow::Result<f32> {
    ensure!(a.shape() == b.shape(), "logits of shapes {:?} and {:?}", a.shape(), b.shape());
    // NaN propagates (f32::max would drop it).
    Ok(a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, |m, d| {
        if d.is_nan() || m.is_nan() {
            f32::NAN
        } else {
            m.max(d)
        }
    }))
}

fn cuda_unavailable(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(cause.downcast_ref::<RuntimeError>(), Some(RuntimeError::CudaUnavailable { .. }))
            || cause.downcast_ref::<onnx_slice::Error>().is_some_and(|e| {
                matches!(e.root(), onnx_slice::Error::Runtime(RuntimeError::CudaUnavailable { .. }))
            })
    })
}

/// `fixtures/` in the current directory (the device machine runs a copy of the repository
/// elsewhere than where this was built), else this crate's.
fn fixtures_root() -> PathBuf {
    let here = PathBuf::from("fixtures");
    if here.is_dir() {
        here
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
    }
}

/// Every `fixtures/<arch>/<exporter>/model.onnx`, in the tests' order.
fn fixture_models() -> anyhow::Result<Vec<PathBuf>> {
    let root = fixtures_root();
    let mut models = Vec::new();
    for arch in ARCHS {
        let dir = root.join(arch);
        let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|entry| Some(entry.ok()?.path().join("model.onnx")))
            .filter(|model| model.is_file())
            .collect();
        found.sort();
        models.extend(found);
    }
    if models.is_empty() {
        bail!("no fixture models under {}", root.display());
    }
    Ok(models)
}

/// A fixture model is `<fixtures>/<arch>/<exporter>/model.onnx`.
fn exporter(path: &Path) -> String {
    component(path, 1)
}

fn arch(path: &Path) -> String {
    component(path, 2)
}

fn fixture_dir(path: &Path) -> PathBuf {
    path.ancestors().nth(3).map_or_else(fixtures_root, Path::to_path_buf)
}

fn component(path: &Path, up: usize) -> String {
    path.ancestors()
        .nth(up)
        .and_then(Path::file_name)
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

fn display_name(path: &Path) -> String {
    format!("{}/{}", arch(path), exporter(path))
}
