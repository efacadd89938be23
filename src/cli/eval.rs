//! `onnx-slice eval`: the perplexity of a model on text or token ids, by the library's
//! [`onnx_slice::eval`].
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;

use onnx_slice::calibrate::data::token_rows;
use onnx_slice::eval::{perplexity, text_windows};
use onnx_slice::interface::{find_tokenizer, load_tokenizer, position_limit};
use onnx_slice::runtime::npy::read_npy;
use onnx_slice::runtime::{init_runtime, Ep, ModelSession, SessionConfig};

/// `onnx-slice eval`: the perplexity of a model on text or token ids.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// The model (.onnx), or an export folder.
    pub model: PathBuf,
    /// Evaluation text (UTF-8; paragraphs separated by blank lines are documents). Repeatable.
    #[arg(
        long = "text",
        value_name = "FILE",
        required_unless_present = "ids",
        conflicts_with = "ids"
    )]
    pub text: Vec<PathBuf>,
    /// Token ids [N, L] (int64/int32 .npy): each row is one window; --seqlen does not apply.
    #[arg(long, value_name = "FILE.npy")]
    pub ids: Option<PathBuf>,
    /// The tokenizer.json to use with --text (default: tokenizer.json beside the model).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Window length in tokens for --text.
    #[arg(long, default_value_t = 512)]
    pub seqlen: usize,
    /// Evaluate only the first N windows.
    #[arg(long, value_name = "N")]
    pub max_windows: Option<usize>,
    /// Windows per model run.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Leave targets equal to this token id out of the mean (e.g. the padding id).
    #[arg(long, value_name = "ID")]
    pub ignore_id: Option<i64>,
    /// Execution provider: cpu, cuda or auto (CUDA when available, else CPU).
    #[arg(long, default_value = "cpu")]
    pub ep: Ep,
    /// libonnxruntime to load (default: ORT_DYLIB_PATH, else the setup-ort.sh location).
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Say which execution provider ONNX Runtime really ran, and show its warnings (-vv: also
    /// its information messages; -vvv: everything it logs).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Runs `onnx-slice eval`.
pub fn run_eval_command(args: &EvalArgs) -> anyhow::Result<()> {
    if args.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    let (mut windows, mut source) = load_windows(args)?;
    if let Some(max) = args.max_windows {
        if max == 0 {
            anyhow::bail!("--max-windows must be at least 1");
        }
        if max < windows.len() {
            source = format!("{source}, the first {max} windows");
            windows.truncate(max);
        }
    }
    let length = windows.first().map_or(0, Vec::len);
    warn_about_position_limit(&args.model, length);
    init_runtime(args.ort_lib.as_deref())?;
    if let Some(level) = onnx_slice::runtime::LogLevel::for_verbosity(args.verbose) {
        onnx_slice::runtime::set_log_level(level)?;
    }
    let config = SessionConfig { ep: args.ep, intra_threads: None, shared_arena: false };
    let mut session = ModelSession::from_file(&args.model, &config)?;
    if let Some(line) = session.ep().notice(args.verbose > 0) {
        eprintln!("{line}");
    }
    let bar = indicatif::ProgressBar::new(windows.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "evaluating {bar:30} {pos}/{len} windows [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let result = perplexity(&mut session, &windows, args.ignore_id, args.batch, &mut |done, _| {
        bar.set_position(done as u64)
    });
    bar.finish_and_clear();
    let result = result?;
    let seconds = start.elapsed().as_secs_f64();
    let ep = session.ep().active.to_string();
    let mut out = String::new();
    if args.json {
        let json = serde_json::json!({
            "model": args.model.display().to_string(),
            "source": source,
            "perplexity": result.value,
            "mean_nll": result.mean_nll,
            "windows": result.windows,
            "window_tokens": length,
            "tokens": result.tokens,
            "ignore_id": args.ignore_id,
            "ep": ep,
            "seconds": seconds,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&json)?)?;
    } else {
        writeln!(out, "model       {}", args.model.display())?;
        writeln!(out, "data        {source}")?;
        writeln!(out, "perplexity  {:.4}", result.value)?;
        writeln!(out, "mean NLL    {:.6} nats/token", result.mean_nll)?;
        writeln!(out, "windows     {} × {length} tokens", result.windows)?;
        let ignored =
            args.ignore_id.map_or(String::new(), |id| format!(" (targets = {id} ignored)"));
        writeln!(out, "tokens      {} predicted{ignored}", result.tokens)?;
        writeln!(out, "time        {seconds:.1} s on {ep}")?;
    }
    super::print_out(&out)
}

fn load_windows(args: &EvalArgs) -> anyhow::Result<(Vec<Vec<i64>>, String)> {
    if let Some(path) = &args.ids {
        let array =
            read_npy(path).with_context(|| format!("reading token ids from {}", path.display()))?;
        let rows = token_rows(array, path)?;
        let source = format!("{} ({} rows × {} tokens)", path.display(), rows.len(), rows[0].len());
        return Ok((rows, source));
    }
    if args.text.is_empty() {
        anyhow::bail!("give the evaluation data with --text FILE or --ids FILE.npy");
    }
    let tokenizer_path = find_tokenizer(&args.model, args.tokenizer.as_deref(), "--ids FILE.npy")?;
    let tokenizer = load_tokenizer(&tokenizer_path)?;
    let texts = args
        .text
        .iter()
        .map(|path| {
            std::fs::read_to_string(path)
                .with_context(|| format!("reading evaluation text {}", path.display()))
        })
        .collect::<anyhow::Result<Vec<String>>>()?;
    let windows = text_windows(&tokenizer, &texts, args.seqlen)?;
    let names: Vec<String> = args.text.iter().map(|path| path.display().to_string()).collect();
    let source = format!(
        "{} ({} windows × {} tokens, tokenizer {})",
        names.join(", "),
        windows.len(),
        args.seqlen,
        tokenizer_path.display()
    );
    Ok((windows, source))
}

/// A warning (not an error: a rotary model's configured limit is not a hard one) when the windows
/// are longer than the model's position limit.
fn warn_about_position_limit(model: &Path, length: usize) {
    let Ok(loaded) = onnx_slice::onnx::load(model) else { return };
    if let Some(limit) = position_limit(&loaded) {
        if length > limit {
            eprintln!(
                "warning: windows of {length} tokens are longer than the {limit} positions {} supports; the numbers \
                 will be meaningless or the run will fail",
                model.display()
            );
        }
    }
}
