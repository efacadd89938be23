//! Command line: raw flags are validated into plain options once, then handed to the library.
//! It lives in the binary only: the library (`onnx_slice`) knows nothing of flags or exit codes.
mod checks;
mod eval;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use checks::usage;
use onnx_slice::calibrate::data;
use onnx_slice::export::{self, Destination};
use onnx_slice::inspect;
use onnx_slice::onnx::{self, SaveOptions, Storage};
use onnx_slice::pipeline::{self, CalibrationData, MethodOptions, Notice};
use onnx_slice::runtime::{Ep, LogLevel};
use onnx_slice::size::Budget;
use onnx_slice::slicegpt::{BasisMode, Orientation, SliceGpt};
use onnx_slice::{Combined, Neurons};

const SLICE_EXAMPLES: &str = "\
Examples:
  onnx-slice model.onnx -o model.sliced.onnx --target-size 80%
      the best model at most 80 % of the input's weight bytes (calibrated on the built-in English
      text with the tokenizer.json beside the model)
  onnx-slice model.onnx --target-size 80% --dry-run
      the widths, parameters and bytes that would be written, in seconds, without calibrating
  onnx-slice model.onnx -o model.sliced.onnx --ratio 0.25
      a quarter of the stream width removed (a width, not a size)
  onnx-slice smollm2-onnx/ -o smollm2-sliced/ --ratio 0.25
      an optimum or onnxruntime-genai export folder in, a new folder out that the same client
      (ORTModelForCausalLM, onnxruntime_genai.Model) loads as it is: config and tokenizer files
      copied unchanged, external data named as that client expects
  onnx-slice model.onnx -o small.onnx --ratio 0.3 --calib corpus.txt --report small.json
      calibrate on your own text; write a JSON report of widths, sizes and times
  onnx-slice model.onnx -o small.onnx --ratio 0.2 --calib-ids tokens.npy --ep cuda
      calibrate on token ids, through the CUDA execution provider
  onnx-slice model.onnx -o check.onnx --ratio 0.25 --orientation random-basis --seed 1
      no calibration: a valid model of the sliced shape, for checking a deployment
  onnx-slice model.onnx -o small.onnx --sparsity 0.25 --ep auto -v
      --sparsity is --ratio (the reference's and Olive's name); -v shows ONNX Runtime's warnings
      and the execution provider calibration really ran on (-vv, -vvv: more of ONNX Runtime's log)

Exit codes:
  0  done
  1  the work failed (an unreadable model, ONNX Runtime, calibration data)
  2  the command line is wrong (a flag's value, a path that is missing, a folder that is not an
     export folder, or the input itself, or inside the input folder); found before any long work
     and before anything is written
  3  the model is not one onnx-slice can slice: no transformer found in it, it is quantized, or
     it is the output of onnx-slice already ('onnx-slice inspect MODEL' says which)
  4  no slicing meets --target-size / --target-params; nothing was written
130  interrupted (Ctrl-C, SIGTERM, SIGHUP); the unfinished output was removed";

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
  onnx-slice convert model.onnx -o out.onnx --external-data --size-threshold 4096
  onnx-slice convert export/ -o export-ext/ --external-data     a folder: model.onnx_data (optimum)";

const EVAL_EXAMPLES: &str = "\
Examples:
  onnx-slice eval model.sliced.onnx --text wiki.test.raw --seqlen 2048
  onnx-slice eval model.onnx --text notes.txt --max-windows 20 --json
  onnx-slice eval model.onnx --ids windows.npy --ignore-id 0 --ep cuda";

#[derive(Parser)]
#[command(
    name = "onnx-slice",
    version,
    about = "Compress exported ONNX transformer language models (MLP neurons, SliceGPT)",
    long_about = "Compress exported ONNX transformer language models to a size you name.\n\n\
                  onnx-slice MODEL -o OUT --target-size 80%   removes MLP neurons (--method neurons) until the weights fit.\n\
                  onnx-slice MODEL -o OUT --ratio R           SliceGPT: removes the fraction R of the residual stream width.",
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
    /// The exported model (.onnx; external data files are found beside it), or an optimum or
    /// onnxruntime-genai export folder.
    #[arg(required = true)]
    model: Option<PathBuf>,
    /// Where to write the sliced model: a new file (its folder must exist), or for an export folder a
    /// new (or empty) folder that its client loads as it is. An output that exists is refused, never
    /// replaced. Not needed with --dry-run.
    #[arg(short, long, value_name = "OUT", required_unless_present = "dry_run")]
    output: Option<PathBuf>,
    /// Fraction of the residual stream WIDTH to remove (0 ≤ R < 1); not of the size (see
    /// --target-size). --sparsity is the same (the reference's and Olive's name for it).
    #[arg(
        long,
        visible_alias = "sparsity",
        value_name = "R",
        allow_negative_numbers = true,
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
    #[arg(long, default_value_t = SliceGpt::default().basis)]
    basis: BasisMode,
    /// How to compress: slicegpt (SliceGPT: the residual stream rotated and cut to fewer
    /// dimensions; --ratio or a target), neurons (the stream keeps its width, every MLP keeps its
    /// most needed neurons and its down projection is refit; a target only) or combined (SliceGPT
    /// on a small share of the stream, then neurons; a target only). Default: slicegpt with
    /// --ratio or any of SliceGPT's own flags, else neurons (the best measured per byte).
    #[arg(long, value_enum)]
    method: Option<MethodArg>,
    /// With --method combined: the share of the stream's width SliceGPT removes before the MLPs
    /// lose neurons for the rest of the target.
    #[arg(long, value_name = "R", default_value_t = Combined::default().stream_ratio)]
    stream_ratio: f64,
    /// Print the widths, parameters and bytes the command would write, without calibrating or
    /// writing anything.
    #[arg(long)]
    dry_run: bool,
    /// With a target and slicegpt: give each stream point its own width, from the unsliced
    /// model's spectra (one more calibration pass), instead of one width everywhere. The neurons
    /// and combined methods allocate their MLP widths this way by default (see --uniform-widths).
    #[arg(long)]
    allocate_widths: bool,
    /// With neurons or combined: one MLP width in every block, instead of widths allocated from
    /// each block's error on the unsliced model (within 25 % of the mean; one more calibration pass).
    #[arg(long, conflicts_with = "allocate_widths")]
    uniform_widths: bool,
    /// Round sliced widths down to a multiple of this.
    #[arg(long, default_value_t = pipeline::DEFAULT_ROUND_TO)]
    round_to: usize,
    /// Slice the last stream point too (changes the head's input width).
    #[arg(long)]
    slice_head: bool,
    /// How to choose the basis at each stream point: pca (calibrated on data), random-basis (a
    /// random orthogonal basis, no calibration: a model of the sliced shape for checking a
    /// deployment; its outputs mean nothing) or identity (the stream's own coordinates, no
    /// calibration). random-basis is not the reference's and Olive's "random" (PCA, then a random
    /// rotation inside the kept subspace), hence its name; "random" is its deprecated old name.
    #[arg(long, default_value = "pca")]
    orientation: OrientationArg,
    /// Seed for --orientation random-basis.
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
    #[arg(long, default_value_t = data::DEFAULT_SAMPLES)]
    calib_samples: usize,
    /// Tokens per calibration sequence (capped by the model's position limit where it has one).
    #[arg(long, default_value_t = data::DEFAULT_SEQLEN)]
    calib_seqlen: usize,
    /// Calibration sequences per ONNX Runtime run.
    #[arg(long, default_value_t = pipeline::DEFAULT_CALIB_BATCH)]
    calib_batch: usize,
    /// Seed for choosing calibration windows.
    #[arg(long, default_value_t = data::DEFAULT_SEED)]
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
    #[arg(long, default_value_t = pipeline::Options::default().ep)]
    ep: Ep,
    /// libonnxruntime to load (default: ORT_DYLIB_PATH, else the setup-ort.sh location).
    #[arg(long, value_name = "PATH")]
    ort_lib: Option<PathBuf>,
    /// No progress bars or summary.
    #[arg(short, long)]
    quiet: bool,
    /// Say which execution provider ONNX Runtime really ran, and show its warnings (-vv: also
    /// its information messages; -vvv: everything it logs).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Flags of SliceGPT's with defaults (--basis, --orientation, --seed) given on the command line.
    #[arg(skip)]
    slicegpt_flags_given: bool,
}

impl SliceArgs {
    /// `--method`, or the default ([`checks::chosen_method`]).
    fn method(&self) -> MethodArg {
        checks::chosen_method(self)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MethodArg {
    Slicegpt,
    Neurons,
    Combined,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OrientationArg {
    Pca,
    RandomBasis,
    Identity,
    /// random-basis's old name, kept working with a deprecation warning.
    #[value(hide = true)]
    Random,
}

impl OrientationArg {
    fn name(self) -> &'static str {
        match self {
            OrientationArg::Pca => "pca",
            OrientationArg::RandomBasis => "random-basis",
            OrientationArg::Identity => "identity",
            OrientationArg::Random => "random",
        }
    }
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
    Eval(eval::EvalArgs),
}

#[derive(Args)]
struct InspectArgs {
    /// The model (.onnx; external data files are found beside it), or an export folder.
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
    /// The model to rewrite (.onnx), or an export folder.
    input: PathBuf,
    /// Where to write it (a new file; its folder must exist; external data goes to OUT.data), or for
    /// an export folder a new (or empty) folder (external data named as the folder's client
    /// expects). An output that exists is refused, never replaced.
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
#[cfg(test)]
fn command_line() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

pub fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli =
        <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let given = |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    cli.slice.slicegpt_flags_given = ["basis", "orientation", "seed"].into_iter().any(given);
    remove_staged_outputs_on_signal();
    let result = match cli.command {
        Some(Command::Inspect(args)) => run_inspect(args),
        Some(Command::Convert(args)) => run_convert(args),
        Some(Command::Eval(mut args)) => export::resolve_input(&args.model)
            .map(|input| args.model = input.model)
            .map_err(|e| anyhow::Error::from(flagged("MODEL", e)))
            .and_then(|()| Ok(checks::eval_command(&args)?))
            .and_then(|()| eval::run_eval_command(&args)),
        None => run_slice(cli.slice),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `onnx-slice inspect MODEL | head -1`: the reader has what it wanted.
        Err(e) if stdout_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(checks::exit_code(&e))
        }
    }
}

/// Writes `text` to stdout. Not `print!`, which panics when the reader has closed the pipe: that
/// is [`StdoutClosed`], which ends the program quietly.
pub fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            anyhow::Error::new(StdoutClosed)
        } else {
            anyhow::Error::new(e).context("writing to stdout")
        }
    })
}

/// stdout is a pipe whose reader has gone (`onnx-slice inspect MODEL | head -1`): the reader has
/// what it wanted, so the command ends quietly, with exit code 0.
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

fn stdout_closed(error: &anyhow::Error) -> bool {
    error.downcast_ref::<StdoutClosed>().is_some()
}

/// Ctrl-C, `kill` or a closed terminal end the process without running destructors; the handler
/// removes the staged outputs (files::interrupt) so that nothing half-written stays behind.
fn remove_staged_outputs_on_signal() {
    let handler = || {
        let removed = onnx_slice::files::remove_staged();
        eprintln!("\ninterrupted: {removed} unfinished output(s) removed");
        // SAFETY: _exit only ends the process. Not `exit`: its atexit handlers and C++ static
        // destructors would run while ONNX Runtime's threads are still computing.
        unsafe { libc::_exit(i32::from(checks::EXIT_INTERRUPTED)) }
    };
    if let Err(e) = ctrlc::set_handler(handler) {
        eprintln!("warning: no signal handler ({e}): an interrupted run may leave .part files");
    }
}

fn run_inspect(args: InspectArgs) -> anyhow::Result<()> {
    let input = export::resolve_input(&args.model).map_err(|e| flagged("MODEL", e))?.model;
    checks::input_file("MODEL", &input)?;
    let model = onnx::load(&input)?;
    let summary = inspect::summarize(&model);
    let layout = inspect::describe_layout(&model, args.explain);
    if args.json {
        let json = serde_json::json!({ "model": summary, "transformer": layout });
        print_out(&(serde_json::to_string_pretty(&json)? + "\n"))
    } else {
        print_out(&format!("{summary}{layout}"))
    }
}

fn run_slice(args: SliceArgs) -> anyhow::Result<()> {
    let Some(input) = args.model.clone() else {
        return Err(usage("usage: onnx-slice MODEL -o OUTPUT --ratio R (see --help)").into());
    };
    // A folder's model file and the output folder are checked here too, so that a mistake names
    // its flag; the library resolves them the same way.
    let source = export::resolve_input(&input).map_err(|e| flagged("MODEL", e))?;
    if args.orientation == OrientationArg::Random {
        eprintln!(
            "warning: --orientation random is deprecated: it is now called random-basis (a random orthogonal basis, no \
             calibration), not to be confused with the reference's and Olive's \"random\" (PCA, then a random rotation); \
             the old name will go away"
        );
    }
    checks::method_flags(&args)?;
    let options = slice_options(&args);
    options.check().map_err(flag_error)?;
    let output_file = args.output.as_deref().filter(|_| source.folder.is_none());
    checks::slice_command(&args, &source.model, output_file)?;
    let destination = args.output.as_deref().map(|o| export::plan_output(&source, o));
    if let Some(Destination::Folder(plan)) =
        destination.transpose().map_err(|e| flagged("-o", e))?
    {
        if !args.quiet {
            plan.skipped_folders
                .iter()
                .for_each(|f| eprintln!("note: the folder {f} is not copied"));
        }
    }
    if args.dry_run {
        return print_out(&pipeline::plan(&input, &options).map_err(flag_error)?.to_string());
    }
    let Some(output) = args.output.clone() else {
        return Err(usage("-o OUTPUT is required (or --dry-run)").into());
    };
    let report = pipeline::slice(&input, &output, &options).map_err(flag_error)?;
    if !args.quiet {
        eprint!("{}", report.summary());
    }
    if args.verbose > 0 && report.execution_provider.is_none() {
        eprintln!(
            "note: no ONNX Runtime session ran (--orientation {} does not calibrate)",
            args.orientation.name()
        );
    }
    if let Some(path) = &args.report {
        write_json(path, &report)?;
    }
    Ok(())
}

/// An export folder that cannot be used, as a command-line mistake that names its flag (exit code 2).
fn flagged(flag: &str, error: onnx_slice::Error) -> checks::UsageError {
    usage(format!("{flag} {error}"))
}

/// The library's options for a slicing command line (checked by [`pipeline::Options::check`]).
fn slice_options(args: &SliceArgs) -> pipeline::Options {
    let calibration = match (&args.calib_ids, args.calib.is_empty()) {
        (Some(ids), _) => CalibrationData::Ids(ids.clone()),
        (None, true) => CalibrationData::BuiltIn,
        (None, false) => CalibrationData::Texts(args.calib.clone()),
    };
    let verbose = args.verbose;
    let progress = progress_bar(args.quiet, "calibrating", "segment runs");
    let slicegpt = SliceGpt {
        ratio: args.ratio.unwrap_or(0.0),
        slice_head: args.slice_head,
        basis: args.basis,
        orientation: match args.orientation {
            OrientationArg::Pca => Orientation::Pca,
            OrientationArg::RandomBasis | OrientationArg::Random => {
                Orientation::RandomBasis { seed: args.seed }
            }
            OrientationArg::Identity => Orientation::Identity,
        },
        allocate_widths: args.allocate_widths,
        center_embeddings: args.center_embeddings,
        save_rotations: args.save_rotations.clone(),
    };
    let method = match args.method() {
        MethodArg::Slicegpt => MethodOptions::SliceGpt(slicegpt),
        MethodArg::Neurons => {
            MethodOptions::Neurons(Neurons { allocate_widths: !args.uniform_widths })
        }
        MethodArg::Combined => MethodOptions::Combined(Combined {
            stream_ratio: args.stream_ratio,
            allocate_widths: !args.uniform_widths,
        }),
    };
    pipeline::Options {
        method,
        target: args.target_size.or(args.target_params.map(Budget::Parameters)),
        round_to: args.round_to,
        calibration,
        tokenizer: args.tokenizer.clone(),
        calib_samples: args.calib_samples,
        calib_seqlen: args.calib_seqlen,
        calib_batch: args.calib_batch,
        calib_seed: args.calib_seed,
        ep: args.ep,
        ort_library: args.ort_lib.clone(),
        ort_log_level: LogLevel::for_verbosity(verbose),
        storage: storage_of(args.external_data, args.inline),
        progress: progress.clone(),
        // Printed above the progress bar, not through it.
        notices: Some(Arc::new(move |notice| match notice {
            Notice::Warning(message) => progress.suspend(|| eprintln!("warning: {message}")),
            Notice::ExecutionProvider(choice) => {
                if let Some(line) = choice.notice(verbose > 0) {
                    progress.suspend(|| eprintln!("{line}"));
                }
            }
        })),
    }
}

/// A library error as the command line says it: an invalid option names its flag and exits 2.
fn flag_error(error: onnx_slice::Error) -> anyhow::Error {
    match error {
        onnx_slice::Error::Invalid { option, message } => usage(match option {
            "output" => format!("-o: {message}"),
            "tokenizer" => message,
            _ => format!("--{} {message}", option.replace('_', "-")),
        })
        .into(),
        other => other.into(),
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
    onnx_slice::files::write_atomically(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn run_convert(args: ConvertArgs) -> anyhow::Result<()> {
    let source = export::resolve_input(&args.input).map_err(|e| flagged("INPUT", e))?;
    let input = &source.model;
    checks::input_file("INPUT", input)?;
    if source.folder.is_none() {
        checks::output_files(&[("-o", &args.output)], &[input])?;
        checks::new_output(&args.output)?;
    }
    let destination = export::plan_output(&source, &args.output).map_err(|e| flagged("-o", e))?;
    let storage = storage_of(args.external_data, args.inline);
    let model = onnx::load(input)?;
    if let Destination::File(output) = &destination {
        onnx::check_save_target(&model, output).map_err(|e| usage(format!("-o: {e}")))?;
    }
    let options = SaveOptions { storage, size_threshold: args.size_threshold };
    let saved = destination
        .save(&model, &options)
        .with_context(|| format!("converting {}", input.display()))?;
    eprintln!("wrote {} ({} bytes)", saved.path.display(), saved.model_bytes);
    if let Some((data, len)) = saved.data_file {
        eprintln!("wrote {} ({} bytes)", data.display(), len);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command and every argument has help, and every command shows examples; the main help
    /// lists the exit codes.
    #[test]
    fn every_command_has_help_and_examples() {
        let mut command = command_line();
        command.build();
        let mut missing = Vec::new();
        for cmd in std::iter::once(&command).chain(command.get_subcommands()) {
            if cmd.get_name() == "help" {
                continue;
            }
            if !cmd.get_after_help().is_some_and(|h| h.to_string().contains("Examples:")) {
                missing.push(format!("{}: no examples", cmd.get_name()));
            }
            for arg in
                cmd.get_arguments().filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
            {
                if arg.get_help().is_none() {
                    missing.push(format!("{} {}: no help", cmd.get_name(), arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "{missing:#?}");
        let help = command.render_long_help().to_string();
        assert!(help.contains("Exit codes:") && help.contains("Examples:"), "{help}");
    }
}
