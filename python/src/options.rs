//! The keyword arguments of `onnx_slice.slice` and `onnx_slice.plan` onto the library's
//! [`Options`], in one place: one line per option. The Python functions pass the arguments the
//! caller gave (never `None`) as a JSON object, so every default is the library's own
//! ([`Options::default`], [`SliceGpt::default`]), the command line's too.
//!
//! A keyword is its flag's name with `_` for `-` (`calib_samples` is `--calib-samples`), and a
//! wrong value is refused with the command line's message, naming the flag.
//!
//! Adding an option: one line in [`slice_options`], and the keyword in
//! python/onnx_slice/__init__.py (`slice` and `plan`, with its docstring line). Adding a method:
//! its name in [`METHODS`] and [`MethodArg`], one arm where [`slice_options`] builds its
//! `MethodOptions` variant, and its keywords in the Python signatures.
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressStyle};
use onnx_slice::pipeline::{CalibrationData, MethodOptions, Notice, Options};
use onnx_slice::slicegpt::{BasisMode, Orientation, SliceGpt};
use onnx_slice::{Budget, Combined, Ep, LogLevel, Neurons, Storage};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::cli::checks::{usage, UsageError};
use crate::cli::{MethodArg, SliceArgs};

/// The methods `method=` names (the command line's `--method` values).
pub const METHODS: &[&str] = &["slicegpt", "neurons", "combined"];

/// A slicing request: the library's options, what the command line's checks read, and where the
/// JSON report goes.
pub struct Request {
    pub options: Options,
    pub args: SliceArgs,
    pub report: Option<PathBuf>,
    /// Warnings and notes said while slicing (Python warns them once the call returns).
    pub notices: Arc<Mutex<Vec<String>>>,
}

/// Every keyword argument onto [`Options`] and the checks' [`SliceArgs`]; an unknown keyword, or a
/// value that does not parse, is a usage error (as clap's are). `method`: `method=`, or `None` for
/// the command line's default (a ratio or SliceGPT's keywords: SliceGPT; a target alone:
/// [`MethodOptions::for_target`]). Which keywords fit the method is checked afterwards by the
/// command line's own `method_flags` (python/src/lib.rs), in the command line's order.
pub fn slice_options(
    method: Option<&str>,
    kwargs: Map<String, Value>,
    dry_run: bool,
    show_progress: bool,
) -> Result<Request, UsageError> {
    let mut kw = Kwargs(kwargs);
    let mut o = Options::default();
    let mut args = SliceArgs { dry_run, ..SliceArgs::default() };
    args.method = method
        .map(|name| {
            MethodArg::parse(name).ok_or_else(|| {
                usage(format!(
                    "invalid value '{name}' for '--method': expected {}",
                    METHODS.join(", ")
                ))
            })
        })
        .transpose()?;

    // The size: a ratio (SliceGPT) or a target (the method's best result that fits).
    args.ratio = kw.get::<f64>("ratio")?;
    args.target_size = kw.parsed("target_size", Budget::parse_size)?;
    args.target_params = kw.get::<u64>("target_params")?;
    conflict(args.ratio.is_some(), "ratio", args.target_size.is_some(), "target_size")?;
    conflict(args.ratio.is_some(), "ratio", args.target_params.is_some(), "target_params")?;
    conflict(
        args.target_size.is_some(),
        "target_size",
        args.target_params.is_some(),
        "target_params",
    )?;
    o.target = args.target_size.or(args.target_params.map(Budget::Parameters));
    // SliceGPT's own keywords (any of them given chooses SliceGPT when method= is not).
    let mut slicegpt = SliceGpt { ratio: args.ratio.unwrap_or(0.0), ..SliceGpt::default() };
    let basis = kw.parsed("basis", str::parse::<BasisMode>)?;
    let seed = kw.get::<u64>("seed")?;
    let orientation = kw.parsed("orientation", |s| orientation(s, seed.unwrap_or(0)))?;
    args.slicegpt_flags_given = basis.is_some() || seed.is_some() || orientation.is_some();
    slicegpt.basis = basis.unwrap_or(slicegpt.basis);
    slicegpt.orientation = orientation.unwrap_or(slicegpt.orientation);
    kw.set("allocate_widths", &mut slicegpt.allocate_widths)?;
    kw.set("slice_head", &mut slicegpt.slice_head)?;
    kw.set("center_embeddings", &mut slicegpt.center_embeddings)?;
    slicegpt.save_rotations = kw.path("save_rotations")?;
    args.allocate_widths = slicegpt.allocate_widths;
    args.slice_head = slicegpt.slice_head;
    args.center_embeddings = slicegpt.center_embeddings;
    args.save_rotations = slicegpt.save_rotations.clone();
    // neurons' and combined's.
    let stream_ratio = kw.get::<f64>("stream_ratio")?.unwrap_or(Combined::default().stream_ratio);
    kw.set("uniform_widths", &mut args.uniform_widths)?;
    conflict(args.uniform_widths, "uniform_widths", args.allocate_widths, "allocate_widths")?;
    let allocate_widths = !args.uniform_widths;
    o.method = match args.method() {
        MethodArg::Slicegpt => MethodOptions::SliceGpt(slicegpt),
        MethodArg::Neurons => MethodOptions::Neurons(Neurons { allocate_widths }),
        MethodArg::Combined => MethodOptions::Combined(Combined { stream_ratio, allocate_widths }),
    };
    kw.set("round_to", &mut o.round_to)?;
    // Calibration: text files (calib), token ids (calib_ids), else the built-in sample.
    args.calib = kw.paths("calib")?;
    args.calib_ids = kw.path("calib_ids")?;
    conflict(!args.calib.is_empty(), "calib", args.calib_ids.is_some(), "calib_ids")?;
    o.calibration = match (&args.calib_ids, args.calib.is_empty()) {
        (Some(ids), _) => CalibrationData::Ids(ids.clone()),
        (None, true) => CalibrationData::BuiltIn,
        (None, false) => CalibrationData::Texts(args.calib.clone()),
    };
    args.tokenizer = kw.path("tokenizer")?;
    o.tokenizer = args.tokenizer.clone();
    kw.set("calib_samples", &mut o.calib_samples)?;
    kw.set("calib_seqlen", &mut o.calib_seqlen)?;
    kw.set("calib_batch", &mut o.calib_batch)?;
    kw.set("calib_seed", &mut o.calib_seed)?;
    kw.set_parsed("ep", &mut o.ep, |s| s.parse::<Ep>().map_err(|e| e.to_string()))?;
    args.ort_lib = kw.path("ort_lib")?;
    o.ort_library = args.ort_lib.clone();
    let verbose = kw.get::<u8>("verbose")?.unwrap_or(0);
    o.ort_log_level = LogLevel::for_verbosity(verbose);
    kw.set_parsed("storage", &mut o.storage, storage)?;
    args.report = kw.path("report")?;

    if let Some(key) = kw.0.keys().next() {
        return Err(usage(format!("unexpected argument '{}'", flag(key))));
    }
    let notices = Arc::new(Mutex::new(Vec::new()));
    o.progress = progress_bar(show_progress);
    o.notices = Some(notice_hook(notices.clone(), verbose > 0));
    Ok(Request { options: o, report: args.report.clone(), args, notices })
}

fn orientation(text: &str, seed: u64) -> Result<Orientation, String> {
    match text {
        "pca" => Ok(Orientation::Pca),
        "random-basis" => Ok(Orientation::RandomBasis { seed }),
        "identity" => Ok(Orientation::Identity),
        _ => Err(format!("expected pca, random-basis or identity, got '{text}'")),
    }
}

fn storage(text: &str) -> Result<Storage, String> {
    match text {
        "auto" => Ok(Storage::Auto),
        "inline" => Ok(Storage::Inline),
        "external" => Ok(Storage::External),
        _ => Err(format!("expected auto, inline or external, got '{text}'")),
    }
}

/// Two options that cannot be given together, as clap says it.
fn conflict(a: bool, a_key: &str, b: bool, b_key: &str) -> Result<(), UsageError> {
    if a && b {
        return Err(usage(format!(
            "the argument '{}' cannot be used with '{}'",
            flag(a_key),
            flag(b_key)
        )));
    }
    Ok(())
}

/// The command line's flag for a keyword.
fn flag(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

/// The keyword arguments not read yet.
struct Kwargs(Map<String, Value>);

impl Kwargs {
    /// The value of `key` as a `T` (a number, a bool), taken out.
    fn get<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>, UsageError> {
        let Some(value) = self.0.remove(key) else { return Ok(None) };
        serde_json::from_value(value.clone()).map(Some).map_err(|e| {
            usage(format!("invalid value '{}' for '{}': {e}", shown(&value), flag(key)))
        })
    }

    /// `*slot = value` when the keyword was given.
    fn set<T: DeserializeOwned>(&mut self, key: &str, slot: &mut T) -> Result<(), UsageError> {
        if let Some(value) = self.get(key)? {
            *slot = value;
        }
        Ok(())
    }

    /// `*slot = parse(value)` when the keyword was given.
    fn set_parsed<T>(
        &mut self,
        key: &str,
        slot: &mut T,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<(), UsageError> {
        if let Some(value) = self.parsed(key, parse)? {
            *slot = value;
        }
        Ok(())
    }

    /// A string value (a number is taken as its digits) parsed as the command line parses it.
    fn parsed<T>(
        &mut self,
        key: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, UsageError> {
        let Some(value) = self.0.remove(key) else { return Ok(None) };
        let text = shown(&value);
        parse(&text)
            .map(Some)
            .map_err(|e| usage(format!("invalid value '{text}' for '{}': {e}", flag(key))))
    }

    fn path(&mut self, key: &str) -> Result<Option<PathBuf>, UsageError> {
        Ok(self.get::<String>(key)?.map(PathBuf::from))
    }

    /// One path or a list of them.
    fn paths(&mut self, key: &str) -> Result<Vec<PathBuf>, UsageError> {
        match self.0.get(key) {
            Some(Value::String(_)) => Ok(self.path(key)?.into_iter().collect()),
            _ => Ok(self
                .get::<Vec<String>>(key)?
                .unwrap_or_default()
                .into_iter()
                .map(PathBuf::from)
                .collect()),
        }
    }
}

fn shown(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The command line's progress bar (src/cli.rs `progress_bar`), shown only when the Python side
/// found a terminal.
fn progress_bar(show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let template = "calibrating [{bar:30}] {pos}/{len} segment runs {elapsed}, {eta} left";
    let style =
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::no_length().with_style(style.progress_chars("=> "))
}

/// Warnings and the execution provider's notes, kept for the Python side; as the command line
/// prints them (`-v` adds the provider calibration ran on).
fn notice_hook(
    notices: Arc<Mutex<Vec<String>>>,
    verbose: bool,
) -> onnx_slice::pipeline::NoticeHook {
    Arc::new(move |notice| {
        let line = match notice {
            Notice::Warning(message) => Some(format!("warning: {message}")),
            Notice::ExecutionProvider(choice) => choice.notice(verbose),
        };
        if let Some(line) = line {
            notices.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    })
}
