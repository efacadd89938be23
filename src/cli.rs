//! Command line: raw flags are validated into plain options once, then handed to the library.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::inspect;
use crate::onnx::{self, SaveOptions, Storage};
use crate::transform::{self, Dimensions, Orientation};

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
    #[arg(short, long, required = true)]
    output: Option<PathBuf>,
    /// Fraction of the residual stream width to remove (0 ≤ R < 1).
    #[arg(long, required = true)]
    ratio: Option<f64>,
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

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Inspect(args)) => run_inspect(args),
        Some(Command::Convert(args)) => run_convert(args),
        None => run_slice(cli.slice),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
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
    let (Some(input), Some(output), Some(ratio)) = (args.model, args.output, args.ratio) else {
        bail!("usage: onnx-slice MODEL -o OUTPUT --ratio R (see --help)");
    };
    if !(0.0..1.0).contains(&ratio) {
        bail!("--ratio must be at least 0 and less than 1, got {ratio}");
    }
    if args.round_to == 0 {
        bail!("--round-to must be at least 1");
    }
    let orientation = match args.orientation {
        OrientationArg::Random => Orientation::Random { seed: args.seed },
        OrientationArg::Identity => Orientation::Identity,
        OrientationArg::Pca => bail!(
            "--orientation pca needs calibration through ONNX Runtime, which onnx-slice cannot do yet; \
             --orientation random or identity give a valid model without calibration (its quality is not the point)"
        ),
    };
    let storage = match (args.external_data, args.inline) {
        (true, _) => Storage::External,
        (_, true) => Storage::Inline,
        _ => Storage::Auto,
    };
    let mut model = onnx::load(&input)?;
    let before = inspect::summarize(&model);
    let dims = Dimensions { ratio, round_to: args.round_to, slice_head: args.slice_head };
    let rewritten = transform::rotate(&mut model, orientation, &dims).with_context(|| format!("rewriting {}", input.display()))?;
    transform::record_in_metadata(&mut model, &rewritten, &dims, orientation);
    let saved = onnx::save(&model, &output, &SaveOptions { storage, ..Default::default() })?;
    let after = inspect::summarize(&model);
    eprint!("{}", inspect::slicing_summary(&rewritten, &before, &after, &saved));
    Ok(())
}

fn run_convert(args: ConvertArgs) -> anyhow::Result<()> {
    if args.output.as_os_str().is_empty() {
        bail!("the output path is empty");
    }
    let storage = match (args.external_data, args.inline) {
        (true, _) => Storage::External,
        (_, true) => Storage::Inline,
        _ => Storage::Auto,
    };
    let model = onnx::load(&args.input)?;
    let options = SaveOptions { storage, size_threshold: args.size_threshold };
    let saved = onnx::save(&model, &args.output, &options).with_context(|| format!("converting {}", args.input.display()))?;
    eprintln!("wrote {} ({} bytes)", saved.path.display(), saved.model_bytes);
    if let Some((data, len)) = saved.data_file {
        eprintln!("wrote {} ({} bytes)", data.display(), len);
    }
    Ok(())
}
