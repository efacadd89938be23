//! Command line: raw flags are validated into plain options once, then handed to the library.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::calibrate::data::{self, CalibrationSet};
use crate::calibrate::{slice_with_pca, Allocation, CalibrationOptions, Calibrated};
use crate::graph::Model;
use crate::inspect;
use crate::onnx::{self, SaveOptions, Storage};
use crate::report::Report;
use crate::runtime::{init_runtime, Ep, SessionConfig};
use crate::size::{Budget, Plan};
use crate::transform::{self, BasisMode, Dimensions, Orientation};

#[derive(Parser)]
#[command(
    name = "onnx-slice",
    version,
    about = "Compress exported ONNX transformer language models with SliceGPT",
    long_about = "Compress exported ONNX transformer language models with SliceGPT.\n\n\
                  onnx-slice MODEL -o OUT --ratio R   removes the fraction R of the residual stream width.",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    slice: SliceArgs,
}

#[derive(Args)]
struct SliceArgs {
    /// The exported model (.onnx; external data files are found beside it).
    #[arg(required = true)]
    model: Option<PathBuf>,
    /// Where to write the sliced model.
    #[arg(short, long, required_unless_present = "dry_run")]
    output: Option<PathBuf>,
    /// Fraction of the residual stream WIDTH to remove (0 ≤ R < 1); not of the size (see --target-size).
    #[arg(long, required_unless_present_any = ["target_size", "target_params"], conflicts_with_all = ["target_size", "target_params"])]
    ratio: Option<f64>,
    /// Largest output instead of a ratio: weight bytes (BYTES) or a share of the input's (N%).
    /// The widest slicing that fits is chosen; if none fits, nothing is written (exit code 3).
    #[arg(long, value_name = "BYTES|N%", value_parser = Budget::parse_size, conflicts_with = "target_params")]
    target_size: Option<Budget>,
    /// Largest number of output parameters instead of a ratio (as --target-size).
    #[arg(long, value_name = "N")]
    target_params: Option<u64>,
    /// Which stream points share a basis: global (one basis, no shortcuts; the best measured
    /// quality per byte), block (one per block: one shortcut per block) or point (the paper: one
    /// per point, a shortcut on every skip).
    #[arg(long, default_value = "global")]
    basis: BasisMode,
    /// Print the widths, parameters and bytes the command would write, without calibrating or
    /// writing anything.
    #[arg(long)]
    dry_run: bool,
    /// With a target: give each stream point its own width, from the spectra of the unsliced
    /// model (one more calibration pass), instead of one width everywhere.
    #[arg(long)]
    allocate_widths: bool,
    /// Round sliced widths down to a multiple of this.
    #[arg(long, default_value_t = 8)]
    round_to: usize,
    /// Slice the last stream point too (changes the head's input width).
    #[arg(long)]
    slice_head: bool,
    /// How to choose the basis at each stream point: pca (calibrated), random or identity.
    #[arg(long, default_value = "pca")]
    orientation: OrientationArg,
    /// Seed for --orientation random.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write tensors to OUTPUT.data (default: only when the model exceeds 2 GiB).
    #[arg(long, conflicts_with = "inline")]
    external_data: bool,
    /// Keep every tensor inside the model file.
    #[arg(long)]
    inline: bool,
    /// Calibration text file (UTF-8, documents separated by blank lines). Repeatable. Default: a
    /// built-in English Wikipedia sample.
    #[arg(long, value_name = "FILE", conflicts_with = "calib_ids")]
    calib: Vec<PathBuf>,
    /// Calibration token ids instead of text: an int64 (or int32) [N, L] .npy file.
    #[arg(long, value_name = "FILE.npy")]
    calib_ids: Option<PathBuf>,
    /// tokenizer.json for the calibration text (default: beside the model).
    #[arg(long, value_name = "FILE")]
    tokenizer: Option<PathBuf>,
    /// Number of calibration sequences.
    #[arg(long, default_value_t = 128)]
    calib_samples: usize,
    /// Tokens per calibration sequence (capped by the model's position limit where it has one).
    #[arg(long, default_value_t = 2048)]
    calib_seqlen: usize,
    /// Calibration sequences per ONNX Runtime run.
    #[arg(long, default_value_t = 4)]
    calib_batch: usize,
    /// Seed for choosing calibration windows.
    #[arg(long, default_value_t = 42)]
    calib_seed: u64,
    /// Subtract every embedding row's mean before calibrating, as the reference implementation
    /// does. Changes RMSNorm models a little (ratio 0 is then no longer exact) and at high ratios
    /// slices them as the reference does; LayerNorm models are centered exactly anyway.
    #[arg(long)]
    center_embeddings: bool,
    /// Write every basis Q and its eigenvalues to this .safetensors file.
    #[arg(long, value_name = "FILE")]
    save_rotations: Option<PathBuf>,
    /// Write a JSON report (widths, parameters, bytes, calibration tokens, time per phase).
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Execution provider for calibration: cpu, cuda or auto.
    #[arg(long, default_value = "cpu")]
    ep: Ep,
    /// libonnxruntime to load (default: ORT_DYLIB_PATH, else the setup-ort.sh location).
    #[arg(long, value_name = "PATH")]
    ort_lib: Option<PathBuf>,
    /// No progress bars or summary.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OrientationArg {
    Pca,
    Random,
    Identity,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a model: producer, opsets, inputs and outputs, operators, parameters, external files.
    Inspect(InspectArgs),
    /// Rewrite a model with its data inline or in an external data file, changing nothing else.
    Convert(ConvertArgs),
    /// Perplexity of a model on a text (or token ids), by the reference method.
    Eval(crate::eval::EvalArgs),
}

#[derive(Args)]
struct InspectArgs {
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also say, for every normalization candidate the matchers rejected, why.
    #[arg(long)]
    explain: bool,
}

#[derive(Args)]
struct ConvertArgs {
    input: PathBuf,
    #[arg(short, long)]
    output: PathBuf,
    /// Store tensors in OUTPUT.data beside the model.
    #[arg(long, conflicts_with = "inline")]
    external_data: bool,
    /// Store every tensor inside the model file (fails over protobuf's 2 GiB limit).
    #[arg(long)]
    inline: bool,
    /// With --external-data: tensors smaller than this many bytes stay inline.
    #[arg(long, default_value_t = onnx::DEFAULT_SIZE_THRESHOLD, requires = "external_data")]
    size_threshold: u64,
}

/// The exit code when a size target cannot be met (nothing is written).
pub const TARGET_NOT_MET: u8 = 3;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Inspect(args)) => run_inspect(args),
        Some(Command::Convert(args)) => run_convert(args),
        Some(Command::Eval(args)) => crate::eval::run_eval_command(&args),
        None => run_slice(cli.slice),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            let unreachable_target = e.chain().any(|c| matches!(c.downcast_ref::<crate::Error>(), Some(crate::Error::Budget { .. })));
            if unreachable_target {
                ExitCode::from(TARGET_NOT_MET)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run_inspect(args: InspectArgs) -> anyhow::Result<()> {
    let model = onnx::load(&args.model)?;
    let summary = inspect::summarize(&model);
    let layout = inspect::describe_layout(&model, args.explain);
    if args.json {
        let json = serde_json::json!({ "model": summary, "transformer": layout });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{summary}");
        print!("{layout}");
    }
    Ok(())
}

fn run_slice(args: SliceArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let Some(input) = args.model.clone() else { bail!("usage: onnx-slice MODEL -o OUTPUT --ratio R (see --help)") };
    let dims = slice_dimensions(&args)?;
    if args.center_embeddings && !matches!(args.orientation, OrientationArg::Pca) {
        bail!("--center-embeddings applies to PCA slicing (--orientation pca) only");
    }
    let storage = storage_of(args.external_data, args.inline);
    let mut model = onnx::load(&input)?;
    let budget = args.target_size.or(args.target_params.map(Budget::Parameters));
    let plan = Plan::new(&model).with_context(|| format!("planning {}", input.display()))?;
    let dims = match &budget {
        Some(budget) => plan.solve(&dims, budget)?,
        None => dims,
    };
    if args.allocate_widths && (budget.is_none() || args.dry_run || !matches!(args.orientation, OrientationArg::Pca)) {
        bail!("--allocate-widths needs a target (--target-size or --target-params) and PCA calibration (not --dry-run)");
    }
    if args.dry_run {
        let p = plan.predict(&dims);
        print!("{}", inspect::size_summary(plan.layout.width, &p.widths, plan.layout.block_count(), p.before, p.after));
        println!("basis {}: {} shortcut matrices, {} parameters", dims.basis, p.shortcuts, p.shortcut_parameters);
        return Ok(());
    }
    let Some(output) = args.output.clone() else { bail!("-o OUTPUT is required (or --dry-run)") };
    let before = inspect::summarize(&model);
    let (rewritten, orientation, calibration) = match args.orientation {
        OrientationArg::Pca => {
            let allocation = budget.filter(|_| args.allocate_widths).map(|budget| Allocation { plan, budget });
            let calibrated = calibrate_and_slice(&args, &input, &mut model, &dims, allocation)?;
            let description = format!("pca ({} calibration tokens)", calibrated.tokens);
            (calibrated.rewritten.clone(), description, Some(calibrated))
        }
        other => {
            let orientation = match other {
                OrientationArg::Random => Orientation::Random { seed: args.seed },
                _ => Orientation::Identity,
            };
            let rewritten = transform::rotate(&mut model, orientation, &dims).with_context(|| format!("rewriting {}", input.display()))?;
            (rewritten, orientation.to_string(), None)
        }
    };
    if let Some(budget) = &budget {
        budget.check(before.weights, crate::size::weight_totals(&model.graph))?;
    }
    transform::record_in_metadata(&mut model, &rewritten, &dims, &orientation);
    let saving = Instant::now();
    let saved = onnx::save(&model, &output, &SaveOptions { storage, ..Default::default() })?;
    let save_seconds = saving.elapsed().as_secs_f64();
    let after = inspect::summarize(&model);
    if !args.quiet {
        eprint!("{}", inspect::slicing_summary(&rewritten, &before, &after, &saved));
    }
    if let Some(path) = &args.report {
        let mut report = Report::new(&input, &saved, &rewritten, &dims, &orientation, &before, &after, calibration.as_ref(), save_seconds, started);
        report.target = budget;
        report.target_limit = budget.map(|b| b.limit(before.weights));
        write_json(path, &report)?;
    }
    Ok(())
}

fn slice_dimensions(args: &SliceArgs) -> anyhow::Result<Dimensions> {
    let ratio = args.ratio.unwrap_or(0.0);
    if !(0.0..1.0).contains(&ratio) {
        bail!("--ratio must be at least 0 and less than 1, got {ratio}");
    }
    if args.round_to == 0 {
        bail!("--round-to must be at least 1");
    }
    Ok(Dimensions { ratio, round_to: args.round_to, slice_head: args.slice_head, basis: args.basis, width: None })
}

fn calibrate_and_slice(args: &SliceArgs, input: &Path, model: &mut Model, dims: &Dimensions, allocation: Option<Allocation>) -> anyhow::Result<Calibrated> {
    if args.calib_samples == 0 || args.calib_seqlen == 0 || args.calib_batch == 0 {
        bail!("--calib-samples, --calib-seqlen and --calib-batch must be at least 1");
    }
    init_runtime(args.ort_lib.as_deref())?;
    let set = calibration_set(args, input, model)?;
    let progress = progress_bar(args.quiet, "calibrating");
    let options = CalibrationOptions {
        dims: *dims,
        batch: args.calib_batch,
        session: SessionConfig { ep: args.ep, intra_threads: None },
        center_embeddings: args.center_embeddings,
        model_path: Some(input.to_path_buf()),
        allocation,
    };
    let calibrated = slice_with_pca(model, &set, &options, &progress).with_context(|| format!("slicing {}", input.display()))?;
    progress.finish_and_clear();
    if let Some(path) = &args.save_rotations {
        let points: Vec<(String, &crate::pca::Basis, usize)> = calibrated
            .bases
            .iter()
            .zip(&calibrated.rewritten.widths)
            .enumerate()
            .map(|(p, (basis, &k))| (format!("point{p}"), basis, k))
            .collect();
        crate::pca::save_rotations(path, &points)?;
    }
    Ok(calibrated)
}

fn calibration_set(args: &SliceArgs, input: &Path, model: &Model) -> anyhow::Result<CalibrationSet> {
    let limit = data::position_limit(model);
    let seqlen = limit.map_or(args.calib_seqlen, |l| args.calib_seqlen.min(l));
    if let Some(ids) = &args.calib_ids {
        let set = CalibrationSet::from_npy(ids, Some(args.calib_samples))?;
        return Ok(if set.seqlen() > seqlen { set.truncated(seqlen) } else { set });
    }
    let texts: Vec<String> = if args.calib.is_empty() {
        vec![data::default_calibration_text().to_string()]
    } else {
        args.calib
            .iter()
            .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading calibration text {}", p.display())))
            .collect::<anyhow::Result<_>>()?
    };
    let tokenizer = data::load_tokenizer(&data::find_tokenizer(input, args.tokenizer.as_deref())?)?;
    Ok(CalibrationSet::from_texts(&texts, &tokenizer, args.calib_samples, seqlen, args.calib_seed)?)
}

/// A progress bar on stderr, hidden with --quiet or when stderr is not a terminal.
pub fn progress_bar(quiet: bool, what: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}/{eta}").unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.set_message(what.to_string());
    bar
}

/// `--external-data` / `--inline` / neither (external only over protobuf's 2 GiB limit).
fn storage_of(external_data: bool, inline: bool) -> Storage {
    match (external_data, inline) {
        (true, _) => Storage::External,
        (_, true) => Storage::Inline,
        _ => Storage::Auto,
    }
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

fn run_convert(args: ConvertArgs) -> anyhow::Result<()> {
    if args.output.as_os_str().is_empty() {
        bail!("the output path is empty");
    }
    let storage = storage_of(args.external_data, args.inline);
    let model = onnx::load(&args.input)?;
    let options = SaveOptions { storage, size_threshold: args.size_threshold };
    let saved = onnx::save(&model, &args.output, &options).with_context(|| format!("converting {}", args.input.display()))?;
    eprintln!("wrote {} ({} bytes)", saved.path.display(), saved.model_bytes);
    if let Some((data, len)) = saved.data_file {
        eprintln!("wrote {} ({} bytes)", data.display(), len);
    }
    Ok(())
}
