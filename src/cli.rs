//! Command line: raw flags are validated into plain options once, then handed to the library.
mod checks;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};

use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::calibrate::data::{self, CalibrationSet};
use crate::calibrate::{slice_with_pca_streaming, Allocation, Calibrated, CalibrationOptions};
use crate::graph::Model;
use crate::inspect;
use crate::onnx::{self, SaveOptions, Storage};
use crate::report::Report;
use crate::runtime::{init_runtime, Ep, SessionConfig};
use crate::size::{Budget, Plan};
use crate::transform::{self, BasisMode, Dimensions, Orientation};
use checks::{usage, Checked};

const SLICE_EXAMPLES: &str = "\
Examples:
  onnx-slice model.onnx -o model.sliced.onnx --target-size 80%
      the best model at most 80 % of the input's weight bytes (calibrated on the built-in English
      text with the tokenizer.json beside the model)
  onnx-slice model.onnx --target-size 80% --dry-run
      the widths, parameters and bytes that would be written, in seconds, without calibrating
  onnx-slice model.onnx -o model.sliced.onnx --ratio 0.25
      a quarter of the stream width removed (a width, not a size)
  onnx-slice model.onnx -o small.onnx --ratio 0.3 --calib corpus.txt --report small.json
      calibrate on your own text; write a JSON report of widths, sizes and times
  onnx-slice model.onnx -o small.onnx --ratio 0.2 --calib-ids tokens.npy --ep cuda
      calibrate on token ids, through the CUDA execution provider
  onnx-slice model.onnx -o check.onnx --ratio 0.25 --orientation random --seed 1
      no calibration: a valid model of the sliced shape, for checking a deployment

Exit codes:
  0  done
  1  the work failed (an unreadable model, ONNX Runtime, calibration data)
  2  the command line is wrong (a flag's value, a path that is missing, a folder, or the input
     itself); found before any long work and before anything is written
  3  the model is not one onnx-slice can slice: no transformer found in it, it is quantized, or
     it is the output of onnx-slice already ('onnx-slice inspect MODEL' says which)
  4  no slicing meets --target-size / --target-params; nothing was written";

const INSPECT_EXAMPLES: &str = "\
Examples:
  onnx-slice inspect model.onnx               summary and the detected transformer
  onnx-slice inspect model.onnx --explain     also every rejected normalization candidate
  onnx-slice inspect model.sliced.onnx        says what sliced a model onnx-slice wrote, and how
  onnx-slice inspect model.onnx --json | jq .transformer.found.width";

const CONVERT_EXAMPLES: &str = "\
Examples:
  onnx-slice convert model.onnx -o big.onnx --external-data     weights to big.onnx.data
  onnx-slice convert big.onnx -o model.onnx --inline            everything in one file
  onnx-slice convert model.onnx -o out.onnx --external-data --size-threshold 4096";

const EVAL_EXAMPLES: &str = "\
Examples:
  onnx-slice eval model.sliced.onnx --text wiki.test.raw --seqlen 2048
  onnx-slice eval model.onnx --text notes.txt --max-windows 20 --json
  onnx-slice eval model.onnx --ids windows.npy --ignore-id 0 --ep cuda";

#[derive(Parser)]
#[command(
    name = "onnx-slice",
    version,
    about = "Compress exported ONNX transformer language models with SliceGPT",
    long_about = "Compress exported ONNX transformer language models with SliceGPT.\n\n\
                  onnx-slice MODEL -o OUT --ratio R   removes the fraction R of the residual stream width.",
    after_help = SLICE_EXAMPLES,
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
    /// Where to write the sliced model (a new file; its folder must exist). Not needed with --dry-run.
    #[arg(short, long, value_name = "OUT", required_unless_present = "dry_run")]
    output: Option<PathBuf>,
    /// Fraction of the residual stream WIDTH to remove (0 ≤ R < 1); not of the size (see --target-size).
    #[arg(
        long,
        value_name = "R",
        allow_negative_numbers = true,
        required_unless_present_any = ["target_size", "target_params"],
        conflicts_with_all = ["target_size", "target_params"]
    )]
    ratio: Option<f64>,
    /// Largest output instead of a ratio: weight bytes (BYTES) or a share of the input's (N%).
    /// The widest slicing that fits is chosen; if none fits, nothing is written (exit code 4).
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
    #[command(after_help = INSPECT_EXAMPLES)]
    Inspect(InspectArgs),
    /// Rewrite a model with its data inline or in an external data file, changing nothing else.
    #[command(after_help = CONVERT_EXAMPLES)]
    Convert(ConvertArgs),
    /// Perplexity of a model on a text (or token ids), by the reference method.
    #[command(after_help = EVAL_EXAMPLES)]
    Eval(crate::eval::EvalArgs),
}

#[derive(Args)]
struct InspectArgs {
    /// The model (.onnx; external data files are found beside it).
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
    /// The model to rewrite (.onnx).
    input: PathBuf,
    /// Where to write it (a new file; its folder must exist; external data goes to OUT.data).
    #[arg(short, long, value_name = "OUT")]
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

/// The command line's definition (for checks on its help texts).
pub fn command_line() -> clap::Command {
    Cli::command()
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Inspect(args)) => run_inspect(args),
        Some(Command::Convert(args)) => run_convert(args),
        Some(Command::Eval(args)) => checks::eval_command(&args)
            .map_err(anyhow::Error::from)
            .and_then(|()| crate::eval::run_eval_command(&args)),
        None => run_slice(cli.slice),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(checks::exit_code(&e))
        }
    }
}

fn run_inspect(args: InspectArgs) -> anyhow::Result<()> {
    checks::input_file("MODEL", &args.model)?;
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
    let Some(input) = args.model.clone() else {
        return Err(usage("usage: onnx-slice MODEL -o OUTPUT --ratio R (see --help)").into());
    };
    let dims = slice_dimensions(&args)?;
    checks::slice_command(&args, &input, args.output.as_deref())?;
    let storage = storage_of(args.external_data, args.inline);
    let mut model = onnx::load(&input)?;
    transform::refuse_sliced(&model)?;
    crate::structure::refuse_quantized(&model.graph)?;
    checks::slice_tokenizer(&args, &input)?;
    let budget = args.target_size.or(args.target_params.map(Budget::Parameters));
    // The size plan reads the layout and may compare the head with the embedding table byte for
    // byte: only a target or a dry run needs it.
    let plan = if budget.is_some() || args.dry_run {
        Some(Plan::new(&model).with_context(|| format!("planning {}", input.display()))?)
    } else {
        None
    };
    let dims = match (&plan, &budget) {
        (Some(plan), Some(budget)) => plan.solve(&dims, budget)?,
        _ => dims,
    };
    if let (true, Some(plan)) = (args.dry_run, &plan) {
        let p = plan.predict(&dims);
        print!(
            "{}",
            inspect::size_summary(
                plan.layout.width,
                &p.widths,
                plan.layout.block_count(),
                p.before,
                p.after
            )
        );
        println!(
            "basis {}: {} shortcut matrices, {} parameters",
            dims.basis, p.shortcuts, p.shortcut_parameters
        );
        return Ok(());
    }
    let Some(output) = args.output.clone() else {
        return Err(usage("-o OUTPUT is required (or --dry-run)").into());
    };
    let save_options = SaveOptions { storage, ..Default::default() };
    // Rewritten weights go to scratch files beside the output, finished ones straight to its data
    // file: memory holds one segment, not the model (docs/design.md §8).
    onnx::check_save_target(&model, &output).map_err(|e| usage(format!("-o: {e}")))?;
    let mut stream = onnx::DataStream::new(&model, &output, &save_options)?;
    let _scratch = crate::files::ScratchScope::enter(&crate::files::parent_folder(&output));
    let before = inspect::summarize(&model);
    let (rewritten, orientation, calibration) = match args.orientation {
        OrientationArg::Pca => {
            let allocation = budget
                .filter(|_| args.allocate_widths)
                .zip(plan)
                .map(|(budget, plan)| Allocation { plan, budget });
            let calibrated =
                calibrate_and_slice(&args, &input, &mut model, &dims, allocation, &mut stream)?;
            let description = format!("pca ({} calibration tokens)", calibrated.tokens);
            (calibrated.rewritten.clone(), description, Some(calibrated))
        }
        other => {
            let orientation = match other {
                OrientationArg::Random => Orientation::Random { seed: args.seed },
                _ => Orientation::Identity,
            };
            let rewritten =
                transform::rotate_streaming(&mut model, orientation, &dims, &mut stream)
                    .with_context(|| format!("rewriting {}", input.display()))?;
            (rewritten, orientation.to_string(), None)
        }
    };
    if let Some(budget) = &budget {
        budget.check(before.weights, crate::size::weight_totals(&model.graph))?;
    }
    transform::record_in_metadata(&mut model, &rewritten, &dims, &orientation);
    let saving = Instant::now();
    let saved = stream.save(&model)?;
    let save_seconds = saving.elapsed().as_secs_f64();
    let after = inspect::summarize(&model);
    if !args.quiet {
        eprint!("{}", inspect::slicing_summary(&rewritten, &before, &after, &saved));
    }
    if let Some(path) = &args.report {
        let mut report = Report::new(
            &input,
            &saved,
            &rewritten,
            &dims,
            &orientation,
            &before,
            &after,
            calibration.as_ref(),
            save_seconds,
            started,
        );
        report.target = budget;
        report.target_limit = budget.map(|b| b.limit(before.weights));
        write_json(path, &report)?;
    }
    Ok(())
}

fn slice_dimensions(args: &SliceArgs) -> Checked<Dimensions> {
    let ratio = args.ratio.unwrap_or(0.0);
    if !(0.0..1.0).contains(&ratio) {
        return Err(usage(format!("--ratio must be at least 0 and less than 1, got {ratio}")));
    }
    checks::at_least_one("--round-to", args.round_to)?;
    Ok(Dimensions {
        ratio,
        round_to: args.round_to,
        slice_head: args.slice_head,
        basis: args.basis,
        width: None,
    })
}

fn calibrate_and_slice(
    args: &SliceArgs,
    input: &Path,
    model: &mut Model,
    dims: &Dimensions,
    allocation: Option<Allocation>,
    finished: &mut onnx::DataStream,
) -> anyhow::Result<Calibrated> {
    init_runtime(args.ort_lib.as_deref())?;
    let set = calibration_set(args, input, model)?;
    let progress = progress_bar(args.quiet, "calibrating", "segment runs");
    let options = CalibrationOptions {
        dims: *dims,
        batch: args.calib_batch,
        session: SessionConfig { ep: args.ep, intra_threads: None },
        center_embeddings: args.center_embeddings,
        model_path: Some(input.to_path_buf()),
        allocation,
    };
    let calibrated = slice_with_pca_streaming(model, &set, &options, &progress, finished)
        .with_context(|| format!("slicing {}", input.display()))?;
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

fn calibration_set(
    args: &SliceArgs,
    input: &Path,
    model: &Model,
) -> anyhow::Result<CalibrationSet> {
    let limit = crate::interface::position_limit(model);
    let seqlen = limit.map_or(args.calib_seqlen, |l| args.calib_seqlen.min(l));
    if let Some(ids) = &args.calib_ids {
        let set = CalibrationSet::from_npy(ids, Some(args.calib_samples))?;
        warn_if_short(&set, args.calib_samples, "rows in the file");
        return Ok(if set.seqlen() > seqlen { set.truncated(seqlen) } else { set });
    }
    let texts: Vec<String> = if args.calib.is_empty() {
        vec![data::default_calibration_text().to_string()]
    } else {
        args.calib
            .iter()
            .map(|p| {
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading calibration text {}", p.display()))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let tokenizer_path =
        crate::interface::find_tokenizer(input, args.tokenizer.as_deref(), "--calib-ids FILE.npy")?;
    let tokenizer = crate::interface::load_tokenizer(&tokenizer_path)?;
    let set = CalibrationSet::from_texts(
        &texts,
        &tokenizer,
        args.calib_samples,
        seqlen,
        args.calib_seed,
    )?;
    warn_if_short(&set, args.calib_samples, "windows in the text; give more text with --calib");
    if let Some(unknown) = data::unknown_tokens(&set, &tokenizer) {
        if unknown.share() > UNKNOWN_WARNING_SHARE {
            eprintln!(
                "warning: {:.1} % of the calibration tokens are the unknown token '{}' of {}: the tokenizer does not read \
                 this text, and PCA on it says little about real input; calibrate on text in the model's vocabulary \
                 (--calib FILE) or on token ids (--calib-ids FILE.npy)",
                100.0 * unknown.share(),
                unknown.token,
                tokenizer_path.display()
            );
        }
    }
    Ok(set)
}

/// More unknown tokens than this share in the calibration set gets a warning: byte-level
/// tokenizers have none on any text, word-level ones a few on text of their language.
const UNKNOWN_WARNING_SHARE: f64 = 0.05;

/// A warning on stderr when the data gave fewer samples than asked for.
fn warn_if_short(set: &CalibrationSet, requested: usize, why: &str) {
    if set.len() < requested {
        eprintln!(
            "warning: calibrating on {} of the {requested} samples asked for (--calib-samples), {} tokens in all: there are \
             no more {why}",
            set.len(),
            set.tokens()
        );
    }
}

/// A progress bar on stderr, hidden with --quiet or when stderr is not a terminal. It is drawn
/// first when its length is set (no empty "0/0" bar while the work is prepared); `unit` names
/// what it counts.
pub fn progress_bar(quiet: bool, what: &str, unit: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let template = format!("{what} [{{bar:30}}] {{pos}}/{{len}} {unit} {{elapsed}}, {{eta}} left");
    let style =
        ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::no_length().with_style(style.progress_chars("=> "))
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
    let text = serde_json::to_string_pretty(value)? + "\n";
    crate::files::write_atomically(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn run_convert(args: ConvertArgs) -> anyhow::Result<()> {
    checks::input_file("INPUT", &args.input)?;
    checks::output_files(&[("-o", &args.output)], &[&args.input])?;
    let storage = storage_of(args.external_data, args.inline);
    let model = onnx::load(&args.input)?;
    onnx::check_save_target(&model, &args.output).map_err(|e| usage(format!("-o: {e}")))?;
    let options = SaveOptions { storage, size_threshold: args.size_threshold };
    let saved = onnx::save(&model, &args.output, &options)
        .with_context(|| format!("converting {}", args.input.display()))?;
    eprintln!("wrote {} ({} bytes)", saved.path.display(), saved.model_bytes);
    if let Some((data, len)) = saved.data_file {
        eprintln!("wrote {} ({} bytes)", data.display(), len);
    }
    Ok(())
}
