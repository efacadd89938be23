//! The command line's own checks, compiled here from the binary's source (src/cli/checks.rs), so
//! that the Python API refuses exactly what `onnx-slice` refuses, with the same messages and the
//! same exit-code meaning ([`checks::exit_code`]).
//!
//! checks.rs reads its flags from the binary's `SliceArgs` and `EvalArgs` (clap structs in
//! src/cli.rs, which this crate cannot compile); [`SliceArgs`] and [`eval::EvalArgs`] below have
//! the fields it reads. A check that reads a new flag makes this crate fail to compile until the
//! field is added here, and filled in `options::slice_options`.
use std::path::PathBuf;

#[path = "../../src/cli/checks.rs"]
#[allow(dead_code)]
pub mod checks;

/// The flags of a slicing command that checks.rs reads: the method and its size, the paths.
#[derive(Default)]
pub struct SliceArgs {
    pub method: Option<MethodArg>,
    pub ratio: Option<f64>,
    pub target_size: Option<onnx_slice::Budget>,
    pub target_params: Option<u64>,
    pub allocate_widths: bool,
    pub uniform_widths: bool,
    pub slice_head: bool,
    pub center_embeddings: bool,
    pub dry_run: bool,
    pub calib: Vec<PathBuf>,
    pub calib_ids: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub ort_lib: Option<PathBuf>,
    pub report: Option<PathBuf>,
    pub save_rotations: Option<PathBuf>,
    /// SliceGPT's keywords with defaults (`basis`, `orientation`, `seed`) given by the caller.
    pub slicegpt_flags_given: bool,
}

/// `method=`: the command line's `--method` values.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MethodArg {
    Slicegpt,
    Neurons,
    Combined,
}

impl MethodArg {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "slicegpt" => Some(MethodArg::Slicegpt),
            "neurons" => Some(MethodArg::Neurons),
            "combined" => Some(MethodArg::Combined),
            _ => None,
        }
    }
}

impl SliceArgs {
    /// `--method`, or the default ([`checks::chosen_method`]).
    pub fn method(&self) -> MethodArg {
        checks::chosen_method(self)
    }
}

/// `eval` is not in the Python API; checks.rs's eval_command needs the type to compile.
#[allow(dead_code)]
pub mod eval {
    use std::path::PathBuf;

    pub struct EvalArgs {
        pub model: PathBuf,
        pub text: Vec<PathBuf>,
        pub ids: Option<PathBuf>,
        pub tokenizer: Option<PathBuf>,
        pub ort_lib: Option<PathBuf>,
        pub batch: usize,
        pub seqlen: usize,
        pub max_windows: Option<usize>,
    }
}

/// checks.rs's `method_flags`: a ratio or a target, and only the keywords of the method that runs.
pub fn method_flags(args: &SliceArgs) -> checks::Checked {
    checks::method_flags(args)
}

/// checks.rs's `slice_command` (visible to this module only, as to the binary's cli module).
pub fn slice_command(
    args: &SliceArgs,
    input: &std::path::Path,
    output: Option<&std::path::Path>,
) -> checks::Checked {
    checks::slice_command(args, input, output)
}

/// A library error as the command line says it (src/cli.rs `flag_error`): an invalid option names
/// its flag.
pub fn flag_error(error: onnx_slice::Error) -> anyhow::Error {
    match error {
        onnx_slice::Error::Invalid { option, message } => checks::usage(match option {
            "output" => format!("-o: {message}"),
            "tokenizer" => message,
            _ => format!("--{} {message}", option.replace('_', "-")),
        })
        .into(),
        other => other.into(),
    }
}

/// An export folder that cannot be used, naming its flag (src/cli.rs `flagged`).
pub fn flagged(flag: &str, error: onnx_slice::Error) -> checks::UsageError {
    checks::usage(format!("{flag} {error}"))
}

/// The error as `onnx-slice` prints it after "error: ": the error, then each cause on its own
/// line (src/cli.rs `main`).
pub fn message(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        text.push_str(&format!("\n  caused by: {cause}"));
    }
    text
}
