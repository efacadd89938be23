//! The keyword arguments of `onnx_slice.slice` and `onnx_slice.plan` onto the library's
//! [`Options`], in one place: one line per option. The Python functions pass the arguments the
//! caller gave (never `None`) as a JSON object, so every default is the library's own
//! ([`Options::default`], [`SliceGpt::default`]), the command line's too.
//!
//! A keyword is its flag's name with `_` for `-` (`calib_samples` is `--calib-samples`), and a
//! wrong value is refused with the command line's message, naming the flag.
//!
//! Adding an option: one line in [`slice_options`] (or in its method's arm of [`method_options`]),
//! and the keyword in python/onnx_slice/__init__.py (`slice` and `plan`, with its docstring line).
//! Adding a method: one arm in [`method_options`] that reads its keywords into its
//! `MethodOptions` variant, its name in [`METHODS`], and its keywords in the Python signatures.
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressStyle};
use onnx_slice::pipeline::{CalibrationData, MethodOptions, Notice, Options};
use onnx_slice::slicegpt::{BasisMode, Orientation, SliceGpt};
use onnx_slice::{Budget, Ep, LogLevel, Storage};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::cli::checks::{usage, UsageError};
use crate::cli::SliceArgs;

/// The methods `method=` names.
pub const METHODS: &[&str] = &["slicegpt"];

/// A slicing request: the library's options, what the command line's checks read, and where the
/// JSON report goes.
pub struct Request {
    pub options: Options,
    pub args: SliceArgs,
    pub report: Option<PathBuf>,
    /// Warnings and notes said while slicing (Python warns them once the call returns).
    pub notices: Arc<Mutex<Vec<String>>>,
}

/// Every keyword argument onto [`Options`] and the checks' [`SliceArgs`]; an unknown keyword, or
/// one that does not fit the method, is a usage error.
pub fn slice_options(
    method: &str,
    kwargs: Map<String, Value>,
    dry_run: bool,
    show_progress: bool,
) -> Result<Request, UsageError> {
    let mut kw = Kwargs(kwargs);
    let mut o = Options::default();
    let mut args = SliceArgs { dry_run, ..SliceArgs::default() };

    // The size target (the method's best result that fits), else the method's own setting.
    let target_size = kw.parsed("target_size", Budget::parse_size)?;
    let target_params = kw.get::<u64>("target_params")?;
    conflict(target_size.is_some(), "target_size", target_params.is_some(), "target_params")?;
    let target_key = target_size.map(|_| "target_size").or(target_params.map(|_| "target_params"));
    o.target = target_size.or(target_params.map(Budget::Parameters));
    o.method = method_options(method, &mut kw, target_key, &mut args)?;
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
        return Err(usage(format!("unexpected argument '{}' for method {method}", flag(key))));
    }
    let notices = Arc::new(Mutex::new(Vec::new()));
    o.progress = progress_bar(show_progress);
    o.notices = Some(notice_hook(notices.clone(), verbose > 0));
    Ok(Request { options: o, report: args.report.clone(), args, notices })
}

/// The method's own keywords onto its [`MethodOptions`]. `target`: the size target's keyword,
/// when one was given.
fn method_options(
    method: &str,
    kw: &mut Kwargs,
    target: Option<&str>,
    args: &mut SliceArgs,
) -> Result<MethodOptions, UsageError> {
    match method {
        "slicegpt" => {
            let mut m = SliceGpt::default();
            let ratio = kw.get::<f64>("ratio")?;
            conflict(ratio.is_some(), "ratio", target.is_some(), target.unwrap_or_default())?;
            if ratio.is_none() && target.is_none() {
                return Err(usage(
                    "the following required arguments were not provided: --ratio (or --target-size, \
                     --target-params)",
                ));
            }
            m.ratio = ratio.unwrap_or(m.ratio);
            kw.set_parsed("basis", &mut m.basis, str::parse::<BasisMode>)?;
            let seed = kw.get::<u64>("seed")?.unwrap_or(0);
            kw.set_parsed("orientation", &mut m.orientation, |s| orientation(s, seed))?;
            kw.set("allocate_widths", &mut m.allocate_widths)?;
            kw.set("slice_head", &mut m.slice_head)?;
            kw.set("center_embeddings", &mut m.center_embeddings)?;
            m.save_rotations = kw.path("save_rotations")?;
            args.allocate_widths = m.allocate_widths;
            args.save_rotations = m.save_rotations.clone();
            Ok(MethodOptions::SliceGpt(m))
        }
        other => Err(usage(format!(
            "invalid value '{other}' for 'method': expected {}",
            METHODS.join(", ")
        ))),
    }
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
