//! Command line: raw flags are validated into plain options once, then handed to the library.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::inspect;
use crate::onnx::{self, SaveOptions, Storage};

#[derive(Parser)]
#[command(name = "onnx-slice", version, about = "Compress exported ONNX transformer language models with SliceGPT")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
        Command::Inspect(args) => run_inspect(args),
        Command::Convert(args) => run_convert(args),
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
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{summary}");
    }
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
