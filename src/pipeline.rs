//! The slicing pipeline in one place: [`slice`] loads a model, refuses what onnx-slice cannot
//! slice, solves a size target, rewrites the model (calibrating by PCA through ONNX Runtime, or
//! with a basis that needs no calibration), checks the target, records what it did in the model's
//! metadata, and saves it; [`plan`] stops after the target and says what [`slice`] would write.
//! The command line, the benchmarks and `bench/cuda_check.rs` all slice through these two calls.
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use indicatif::ProgressBar;
use sha2::Digest as _;

use crate::analysis::{self, Analysis};
use crate::calibrate::data::{self, CalibrationSet};
use crate::calibrate::Settings;
use crate::combined::Combined;
use crate::error::{Error, Result};
use crate::export::{self, Destination};
use crate::files::ScratchScope;
use crate::graph::Model;
use crate::inspect;
use crate::method::{Method, Work};
use crate::neurons::Neurons;
use crate::onnx::{self, SaveOptions, Storage};
use crate::report::{InputFile, Report};
use crate::runtime::{self, Ep, EpChoice, LogLevel, SessionConfig};
use crate::size::{Budget, Plan, Totals};
use crate::slicegpt::{BasisMode, SliceGpt};
use crate::structure::EmbeddingRole;

/// Which method compresses the model, with its own options.
#[derive(Debug, Clone, PartialEq)]
pub enum MethodOptions {
    /// SliceGPT: the residual stream rotated and sliced.
    SliceGpt(SliceGpt),
    /// The stream keeps its width; MLP neurons are removed and the down projections refit.
    Neurons(Neurons),
    /// SliceGPT with one global basis at a mild ratio, then neurons, under one budget.
    Combined(Combined),
}

impl Default for MethodOptions {
    fn default() -> Self {
        MethodOptions::SliceGpt(SliceGpt::default())
    }
}

impl MethodOptions {
    /// The method for a size target when none is chosen: the one that measured best per byte
    /// (`neurons`; bench/README.md, "Methods"). A ratio is SliceGPT's.
    pub fn for_target() -> Self {
        MethodOptions::Neurons(Neurons::default())
    }
}

/// What calibration reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CalibrationData {
    /// The built-in English Wikipedia sample, tokenized with the model's tokenizer.
    #[default]
    BuiltIn,
    /// UTF-8 text files (documents separated by blank lines), tokenized with the model's tokenizer.
    Texts(Vec<PathBuf>),
    /// Token ids: an int64 (or int32) `[N, L]` .npy file.
    Ids(PathBuf),
}

/// What [`slice`] tells its caller while it works (besides the progress bar).
#[derive(Debug, Clone, Copy)]
pub enum Notice<'a> {
    /// Something the user should know about the result (fewer calibration samples than asked
    /// for, text the tokenizer does not read). Also kept in [`Report::warnings`].
    Warning(&'a str),
    /// The execution provider ONNX Runtime gave calibration: said at its first session, and again
    /// if a later session got another one.
    ExecutionProvider(&'a EpChoice),
}

/// A receiver of [`Notice`]s.
pub type NoticeHook = Arc<dyn Fn(Notice<'_>) + Send + Sync>;

/// Everything [`slice`] and [`plan`] can be told; `Options::default()` is the command line's
/// default (`onnx-slice MODEL -o OUT --ratio 0`).
#[derive(Clone)]
pub struct Options {
    /// The method and its options.
    pub method: MethodOptions,
    /// The largest output: the method's best fitting result is chosen (for SliceGPT, the widest
    /// slicing instead of its ratio); none fitting is [`Error::Budget`] and nothing is written.
    pub target: Option<Budget>,
    /// Widths the method chooses are rounded down to a multiple of this (at least 1).
    pub round_to: usize,
    pub calibration: CalibrationData,
    /// tokenizer.json for calibration text (default: beside the model).
    pub tokenizer: Option<PathBuf>,
    /// Calibration sequences.
    pub calib_samples: usize,
    /// Tokens per calibration sequence (capped by the model's position limit where it has one).
    pub calib_seqlen: usize,
    /// Calibration sequences per ONNX Runtime run.
    pub calib_batch: usize,
    /// Seed for choosing calibration windows from text.
    pub calib_seed: u64,
    /// Execution provider for calibration.
    pub ep: Ep,
    /// libonnxruntime to load (default: ORT_DYLIB_PATH, else the setup-ort.sh location).
    pub ort_library: Option<PathBuf>,
    /// ONNX Runtime's own log level while calibrating (default: ONNX Runtime's, errors only).
    pub ort_log_level: Option<LogLevel>,
    pub storage: Storage,
    /// Advanced once per calibration segment run; hidden by default.
    pub progress: ProgressBar,
    /// Receives warnings and the execution provider as they happen; none by default (warnings
    /// are in the report either way).
    pub notices: Option<NoticeHook>,
}

/// The command line's defaults, in one place: the flags take theirs from here.
pub const DEFAULT_ROUND_TO: usize = 8;
pub const DEFAULT_CALIB_BATCH: usize = 4;

impl Default for Options {
    fn default() -> Self {
        Options {
            method: MethodOptions::default(),
            target: None,
            round_to: DEFAULT_ROUND_TO,
            calibration: CalibrationData::BuiltIn,
            tokenizer: None,
            calib_samples: data::DEFAULT_SAMPLES,
            calib_seqlen: data::DEFAULT_SEQLEN,
            calib_batch: DEFAULT_CALIB_BATCH,
            calib_seed: data::DEFAULT_SEED,
            ep: Ep::Cpu,
            ort_library: None,
            ort_log_level: None,
            storage: Storage::Auto,
            progress: ProgressBar::hidden(),
            notices: None,
        }
    }
}

impl Options {
    /// SliceGPT with these options, and every other option at its default.
    pub fn slicegpt(method: SliceGpt) -> Self {
        Options { method: MethodOptions::SliceGpt(method), ..Options::default() }
    }

    /// The values that cannot work whatever the model: each is [`Error::Invalid`] naming the
    /// field. [`slice`] and [`plan`] check them first; a caller may check them earlier.
    pub fn check(&self) -> Result<()> {
        at_least_one("round_to", self.round_to)?;
        match &self.method {
            MethodOptions::SliceGpt(m) => m.check(self.target.as_ref())?,
            MethodOptions::Neurons(m) => m.check(self.target.as_ref())?,
            MethodOptions::Combined(m) => m.check(self.target.as_ref())?,
        }
        at_least_one("calib_samples", self.calib_samples)?;
        at_least_one("calib_seqlen", self.calib_seqlen)?;
        at_least_one("calib_batch", self.calib_batch)
    }

    fn notify(&self, notice: Notice<'_>) {
        if let Some(hook) = &self.notices {
            hook(notice);
        }
    }
}

fn invalid(option: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid { option, message: message.into() }
}

fn at_least_one(option: &'static str, value: usize) -> Result<()> {
    if value == 0 {
        return Err(invalid(option, "must be at least 1"));
    }
    Ok(())
}

/// What [`plan`] predicts [`slice`] would write.
#[derive(Debug, Clone)]
pub struct DryRun {
    /// The method's name.
    pub method: &'static str,
    /// D, the original residual stream width.
    pub stream_width: usize,
    /// k at every stream point.
    pub widths: Vec<usize>,
    pub blocks: usize,
    pub before: Totals,
    pub after: Totals,
    /// SliceGPT's basis option (`None` for a method that keeps the stream).
    pub basis: Option<BasisMode>,
    /// Skips that get a shortcut MatMul, and their parameters.
    pub shortcuts: usize,
    pub shortcut_parameters: u64,
    /// Every block's MLP width before and after (`None` when the method keeps the MLPs).
    pub mlp_widths: Option<(Vec<usize>, Vec<usize>)>,
    /// The widths are allocated per block at calibration, under the same total.
    pub allocated: bool,
}

impl std::fmt::Display for DryRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&inspect::size_summary(
            self.stream_width,
            &self.widths,
            self.blocks,
            self.before,
            self.after,
        ))?;
        if let Some(basis) = self.basis {
            writeln!(
                f,
                "basis {basis}: {} shortcut matrices, {} parameters",
                self.shortcuts, self.shortcut_parameters
            )?;
        }
        if let Some((before, after)) = &self.mlp_widths {
            writeln!(
                f,
                "MLP widths: {} → {}{}",
                inspect::width_list(before),
                inspect::width_list(after),
                if self.allocated {
                    " (per block at calibration, as many neurons in all)"
                } else {
                    ""
                }
            )?;
        }
        Ok(())
    }
}

/// The widths, parameters and bytes [`slice`] would write for `input`, without calibrating or
/// writing anything.
pub fn plan(input: &Path, options: &Options) -> Result<DryRun> {
    let source = export::resolve_input(input)?;
    match &options.method {
        MethodOptions::SliceGpt(method) => dry_run(method, &source.model, options),
        MethodOptions::Neurons(method) => dry_run(method, &source.model, options),
        MethodOptions::Combined(method) => dry_run(method, &source.model, options),
    }
}

fn dry_run<M: Method>(method: &M, input: &Path, options: &Options) -> Result<DryRun> {
    let prepared = prepare(method, input, options)?;
    let predicted = prepared.prediction;
    Ok(DryRun {
        method: method.name(),
        stream_width: prepared.analysis.layout.width,
        widths: predicted.widths,
        blocks: prepared.analysis.layout.block_count(),
        before: predicted.before,
        after: predicted.after,
        basis: match &options.method {
            MethodOptions::SliceGpt(m) => Some(m.basis),
            MethodOptions::Neurons(_) => None,
            MethodOptions::Combined(_) => Some(BasisMode::Global),
        },
        shortcuts: predicted.shortcuts,
        shortcut_parameters: predicted.shortcut_parameters,
        mlp_widths: match &options.method {
            MethodOptions::SliceGpt(_) => None,
            MethodOptions::Neurons(_) | MethodOptions::Combined(_) => Some((
                prepared
                    .analysis
                    .layout
                    .blocks
                    .iter()
                    .map(|b| b.mlp.as_ref().map_or(0, |m| m.width))
                    .collect(),
                predicted.mlp_widths,
            )),
        },
        allocated: match &options.method {
            MethodOptions::SliceGpt(m) => m.allocate_widths,
            MethodOptions::Neurons(m) => m.allocate_widths,
            MethodOptions::Combined(m) => m.allocate_widths,
        },
    })
}

/// Slices the model at `input` (a `.onnx` file, its external data found beside it; or an optimum
/// or onnxruntime-genai export folder) and writes the result to `output` (a new file whose folder
/// exists, never one the model was read from; for a folder, a new folder outside it that the same
/// client loads as it is, see [`crate::export`]).
/// Nothing is written unless the whole rewrite succeeded and met the target. The report says what
/// was done; `output` holds the same facts in its `onnx_slice.*` metadata.
///
/// Errors: [`Error::Invalid`] for an option that cannot work (checked before any long work),
/// [`Error::Detect`], [`Error::Quantized`] or [`Error::AlreadySliced`] for a model onnx-slice
/// cannot slice, [`Error::Budget`] for a target no slicing meets, and the errors of loading,
/// calibration, ONNX Runtime and saving, each naming its file.
///
/// ```
/// use onnx_slice::{Options, Orientation, SliceGpt};
///
/// # fn main() -> onnx_slice::Result<()> {
/// let model = std::path::Path::new("fixtures/llama/optimum/model.onnx");
/// let out = tempfile::tempdir().expect("a temporary folder");
/// let output = out.path().join("model.sliced.onnx");
/// // A quarter of the stream width, with a random orthogonal basis (no calibration: a model of
/// // the sliced shape); `Orientation::Pca` (the default) calibrates on the built-in text.
/// let options = Options::slicegpt(SliceGpt {
///     ratio: 0.25,
///     orientation: Orientation::RandomBasis { seed: 1 },
///     ..SliceGpt::default()
/// });
/// let report = onnx_slice::slice(model, &output, &options)?;
/// assert_eq!(report.stream_width, 64);
/// assert_eq!(report.widths, [48, 48, 48, 48, 64]); // the head's input keeps its width
/// assert!(report.weight_bytes_after < report.weight_bytes_before);
/// assert_eq!(report.input_sha256.len(), 64);
/// # Ok(()) }
/// ```
pub fn slice(input: &Path, output: &Path, options: &Options) -> Result<Report> {
    match &options.method {
        MethodOptions::SliceGpt(method) => slice_with(method, input, output, options),
        MethodOptions::Neurons(method) => slice_with(method, input, output, options),
        MethodOptions::Combined(method) => slice_with(method, input, output, options),
    }
}

fn slice_with<M: Method>(
    method: &M,
    input: &Path,
    output: &Path,
    options: &Options,
) -> Result<Report> {
    let started = Instant::now();
    let source = export::resolve_input(input)?;
    let destination = export::plan_output(&source, output)?;
    let input = source.model.as_path();
    let prepared = prepare(method, input, options)?;
    if let Destination::File(output) = &destination {
        onnx::check_save_target(&prepared.model, output)
            .map_err(|e| invalid("output", e.to_string()))?;
    }
    let files = model_files(&prepared.model, input);
    // The input is hashed beside the work: it is only read, and a large model takes seconds.
    std::thread::scope(|scope| {
        let hashing = scope.spawn(|| hash_inputs(&files));
        let sliced = rewrite_and_save(method, input, &destination, options, prepared, started);
        let hashed = hashing.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let (mut report, input_files) = (sliced?, hashed?);
        report.input_sha256 = input_files.first().map(|f| f.sha256.clone()).unwrap_or_default();
        report.input_files = input_files;
        Ok(report)
    })
}

/// [`slice`] once the options and the model are known to work: the rewrite, the target's check,
/// the metadata, the save, and the report.
fn rewrite_and_save<M: Method>(
    method: &M,
    input: &Path,
    destination: &Destination,
    options: &Options,
    prepared: Prepared<M::Plan>,
    started: Instant,
) -> Result<Report> {
    let Prepared { mut model, analysis, plan, before, .. } = prepared;
    let save_options = SaveOptions { storage: options.storage, ..Default::default() };
    // Rewritten weights are parked in scratch files beside the output, finished ones go straight to
    // its data file: memory holds one segment, not the model (docs/design.md §8).
    let mut output = destination.open(&model, &save_options)?;
    let _scratch = ScratchScope::enter(output.scratch_folder());
    let mut warnings = Vec::new();
    let calibration = if method.calibrates() {
        runtime::init_runtime(options.ort_library.as_deref())?;
        if let Some(level) = options.ort_log_level {
            runtime::set_log_level(level)?;
        }
        let vocabulary = vocabulary(&model, &analysis);
        Some(calibration_set(input, &model, vocabulary, options, &mut warnings)?)
    } else {
        None
    };
    let work = Work {
        input,
        model: &mut model,
        analysis: &analysis,
        calibration,
        settings: calibration_settings(input, options),
        progress: &options.progress,
        finished: &mut output,
    };
    let applied = method.apply(plan, work)?;
    if let Some(budget) = &options.target {
        budget.check(before.weights, crate::size::weight_totals(&model.graph))?;
    }
    let float_nodes = crate::quantizers::float_nodes(&model.graph);
    let mut metadata = applied.metadata.clone();
    metadata.extend(crate::quantizers::metadata_entry(&float_nodes));
    crate::provenance::record(&mut model, &metadata);
    let saving = Instant::now();
    let saved = output.finish(&model)?;
    let save_seconds = saving.elapsed().as_secs_f64();
    let after = inspect::summarize(&model);
    let mut report = Report::new(
        input,
        &saved,
        method.name(),
        &applied,
        options.round_to,
        &before,
        &after,
        save_seconds,
        started,
    );
    report.shortcut_parameters = crate::quantizers::shortcut_parameters(&model.graph);
    report.quantize_exclude = float_nodes;
    let calibration = applied.calibration.as_ref();
    report.target = options.target;
    report.target_limit = options.target.map(|b| b.limit(before.weights));
    report.execution_provider_requested = calibration.is_some().then(|| options.ep.to_string());
    report.set_execution_provider(calibration.and_then(|c| c.ep.as_ref()));
    report.onnx_runtime = calibration.and_then(|_| runtime::loaded_version()).map(str::to_string);
    report.warnings = warnings;
    Ok(report)
}

/// The model analysed and its method's plan made: everything before the long work.
struct Prepared<P> {
    model: Model,
    analysis: Analysis,
    plan: P,
    prediction: crate::size::Prediction,
    /// The input model as loaded, before analysis changed anything.
    before: inspect::ModelSummary,
}

fn prepare<M: Method>(method: &M, input: &Path, options: &Options) -> Result<Prepared<M::Plan>> {
    options.check()?;
    let mut model = onnx::load(input)?;
    let before = inspect::summarize(&model);
    let analysis = analysis::analyze(&mut model).map_err(|e| match e {
        Error::Detect(_) => {
            in_context(e, format!("finding the transformer in {}", input.display()))
        }
        other => other,
    })?;
    if method.calibrates() && !matches!(options.calibration, CalibrationData::Ids(_)) {
        crate::interface::find_tokenizer(input, options.tokenizer.as_deref(), IDS_HINT)
            .map_err(|e| invalid("tokenizer", e.to_string()))?;
    }
    let sizes = Plan::new(&model, &analysis)
        .map_err(|e| in_context(e, format!("planning {}", input.display())))?;
    let (plan, prediction) =
        method.plan(&sizes, &analysis, options.target.as_ref(), options.round_to)?;
    Ok(Prepared { model, analysis, plan, prediction, before })
}

/// How calibration runs for `input`.
fn calibration_settings(input: &Path, options: &Options) -> Settings {
    let notices = options.notices.clone();
    Settings {
        batch: options.calib_batch,
        session: SessionConfig { ep: options.ep, intra_threads: None, shared_arena: false },
        model_path: Some(input.to_path_buf()),
        on_execution_provider: notices.map(|hook| {
            Arc::new(move |choice: &EpChoice| hook(Notice::ExecutionProvider(choice)))
                as crate::calibrate::EpHook
        }),
        statistics: crate::calibrate::Statistics::InGraph,
    }
}

/// How a tokenizer-less model is told to give token ids instead (the command line's flag).
const IDS_HINT: &str = "--calib-ids FILE.npy";

/// The token embedding table's rows: the token ids the model reads (`None` when the table is not
/// an initializer of known shape).
fn vocabulary(model: &Model, analysis: &Analysis) -> Option<usize> {
    let token = analysis.layout.embeddings.iter().find(|e| e.role == EmbeddingRole::Token)?;
    let table = model.graph.initializer(&token.table)?;
    let axis = usize::from(token.through_transpose.is_some());
    usize::try_from(*table.dims.get(axis)?).ok()
}

/// The first token id of `set` outside `0..vocabulary`, with its row and column.
fn outside_vocabulary(set: &CalibrationSet, vocabulary: usize) -> Option<(i64, usize, usize)> {
    set.ids.iter().enumerate().find_map(|(row, ids)| {
        let column =
            ids.iter().position(|&id| usize::try_from(id).map_or(true, |i| i >= vocabulary))?;
        Some((ids[column], row, column))
    })
}

/// `vocabulary`: the model's (see [`vocabulary`]); ids outside it are refused here, before any
/// calibration run, instead of failing inside ONNX Runtime's Gather.
fn calibration_set(
    input: &Path,
    model: &Model,
    vocabulary: Option<usize>,
    options: &Options,
    warnings: &mut Vec<String>,
) -> Result<CalibrationSet> {
    let mut warn = |message: String| {
        options.notify(Notice::Warning(&message));
        warnings.push(message);
    };
    let limit = crate::interface::position_limit(model);
    let seqlen = limit.map_or(options.calib_seqlen, |l| options.calib_seqlen.min(l));
    let samples = options.calib_samples;
    let texts: Vec<String> = match &options.calibration {
        CalibrationData::Ids(ids) => {
            let set = CalibrationSet::from_npy(ids, Some(samples))?;
            if let Some((v, (id, row, column))) =
                vocabulary.and_then(|v| outside_vocabulary(&set, v).map(|o| (v, o)))
            {
                return Err(invalid(
                    "calib_ids",
                    format!(
                        "{}: token id {id} (row {row}, column {column}) is outside the model's vocabulary \
                         of {v} (ids 0 to {}): were these ids made with this model's tokenizer?",
                        ids.display(),
                        v.saturating_sub(1)
                    ),
                ));
            }
            if let Some(message) = shortfall(&set, samples, "rows in the file") {
                warn(message);
            }
            return Ok(if set.seqlen() > seqlen { set.truncated(seqlen) } else { set });
        }
        CalibrationData::BuiltIn => vec![data::default_calibration_text().to_string()],
        CalibrationData::Texts(paths) => paths
            .iter()
            .map(|p| {
                std::fs::read_to_string(p).map_err(|e| {
                    in_context(Error::io(p, e), format!("reading calibration text {}", p.display()))
                })
            })
            .collect::<Result<_>>()?,
    };
    let tokenizer_path =
        crate::interface::find_tokenizer(input, options.tokenizer.as_deref(), IDS_HINT)?;
    let tokenizer = crate::interface::load_tokenizer(&tokenizer_path)?;
    let set = CalibrationSet::from_texts(&texts, &tokenizer, samples, seqlen, options.calib_seed)?;
    if let Some((v, (id, _, _))) =
        vocabulary.and_then(|v| outside_vocabulary(&set, v).map(|o| (v, o)))
    {
        return Err(invalid(
            "tokenizer",
            format!(
                "the tokenizer {} gives token id {id}, outside the model's vocabulary of {v}: it is not \
                 this model's tokenizer (give the model's with --tokenizer FILE)",
                tokenizer_path.display(),
            ),
        ));
    }
    if let Some(message) =
        shortfall(&set, samples, "windows in the text; give more text with --calib")
    {
        warn(message);
    }
    if let Some(unknown) = data::unknown_tokens(&set, &tokenizer) {
        if unknown.share() > UNKNOWN_WARNING_SHARE {
            warn(format!(
                "{:.1} % of the calibration tokens are the unknown token '{}' of {}: the tokenizer does not read \
                 this text, and PCA on it says little about real input; calibrate on text in the model's vocabulary \
                 (--calib FILE) or on token ids (--calib-ids FILE.npy)",
                100.0 * unknown.share(),
                unknown.token,
                tokenizer_path.display()
            ));
        }
    }
    Ok(set)
}

/// More unknown tokens than this share in the calibration set gets a warning: byte-level
/// tokenizers have none on any text, word-level ones a few on text of their language.
const UNKNOWN_WARNING_SHARE: f64 = 0.05;

/// A warning when the data gave fewer samples than asked for.
fn shortfall(set: &CalibrationSet, requested: usize, why: &str) -> Option<String> {
    (set.len() < requested).then(|| {
        format!(
            "calibrating on {} of the {requested} samples asked for (--calib-samples), {} tokens in all: there are \
             no more {why}",
            set.len(),
            set.tokens()
        )
    })
}

/// An error with what was being done when it happened ([`Error::root`] is the error itself).
fn in_context(error: Error, doing: String) -> Error {
    Error::Context { doing, source: Box::new(error) }
}

/// The files the model was read from: the .onnx file first, then its external data files.
fn model_files(model: &Model, input: &Path) -> Vec<PathBuf> {
    match &model.source {
        Some(source) => std::iter::once(source.path.clone())
            .chain(source.external_files.iter().cloned())
            .collect(),
        None => vec![input.to_path_buf()],
    }
}

/// The SHA-256 of every file, read in 1 MiB pieces (a model's files may be larger than memory).
fn hash_inputs(files: &[PathBuf]) -> Result<Vec<InputFile>> {
    let mut buffer = vec![0u8; 1 << 20];
    files
        .iter()
        .map(|path| {
            let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let mut hasher = sha2::Sha256::new();
            let mut bytes = 0u64;
            loop {
                let n = file.read(&mut buffer).map_err(|e| Error::io(path, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buffer[..n]);
                bytes += n as u64;
            }
            let sha256 = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
            Ok(InputFile { path: path.display().to_string(), bytes, sha256 })
        })
        .collect()
}
