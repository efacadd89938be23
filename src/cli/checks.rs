//! Checks on the paths and values of a command line, all made before the long work (loading a large
//! model, calibrating): a wrong path costs a second, not an hour of calibration. Each failure says
//! which flag, which path, and what is wrong with it, and exits with [`EXIT_USAGE`].
use std::path::{Path, PathBuf};

use onnx_slice::pipeline::MethodOptions;

use super::{MethodArg, SliceArgs};

/// The method of a slicing command (`--method`, `method=`), or the default: SliceGPT for a ratio
/// or when any of its own flags is given (earlier command lines do what they did), else the
/// library's method for size targets ([`MethodOptions::for_target`]).
pub fn chosen_method(args: &SliceArgs) -> MethodArg {
    let slicegpt = args.ratio.is_some()
        || args.slicegpt_flags_given
        || args.slice_head
        || args.center_embeddings
        || args.save_rotations.is_some();
    match args.method {
        Some(method) => method,
        None if slicegpt => MethodArg::Slicegpt,
        None => match MethodOptions::for_target() {
            MethodOptions::SliceGpt(_) => MethodArg::Slicegpt,
            MethodOptions::Neurons(_) => MethodArg::Neurons,
            MethodOptions::Combined(_) => MethodArg::Combined,
        },
    }
}

/// The command line cannot work as given (a flag's value, a path); nothing was read or written.
/// The same code as clap's own usage errors.
pub const EXIT_USAGE: u8 = 2;
/// The model is not one onnx-slice can rewrite: no transformer found, quantized, or already sliced.
pub const EXIT_UNSUPPORTED_MODEL: u8 = 3;
/// A size target (--target-size, --target-params) that no slicing meets; nothing was written.
pub const EXIT_TARGET_NOT_MET: u8 = 4;
/// A signal ended the run (the shells' 128 + SIGINT, for SIGTERM and SIGHUP too); the staged
/// outputs were removed.
pub const EXIT_INTERRUPTED: u8 = 130;

/// A mistake on the command line, found before any work: exit code [`EXIT_USAGE`].
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub type Checked<T = ()> = Result<T, UsageError>;

pub fn usage(message: impl Into<String>) -> UsageError {
    UsageError(message.into())
}

/// The exit code for an error: [`EXIT_USAGE`] for a command-line mistake (an unusable input or
/// output folder is one), [`EXIT_UNSUPPORTED_MODEL`]
/// when the model's structure is not one onnx-slice knows, [`EXIT_TARGET_NOT_MET`] for a size target
/// out of reach, else 1.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    let unsupported = |cause: &(dyn std::error::Error + 'static)| {
        cause.downcast_ref::<onnx_slice::structure::DetectError>().is_some()
            || cause.downcast_ref::<onnx_slice::structure::QuantizedModel>().is_some()
            || cause.downcast_ref::<onnx_slice::Error>().is_some_and(|e| {
                matches!(
                    e.root(),
                    onnx_slice::Error::Detect(_)
                        | onnx_slice::Error::AlreadySliced { .. }
                        | onnx_slice::Error::Quantized(_)
                )
            })
    };
    let unreachable_target = |cause: &(dyn std::error::Error + 'static)| {
        cause
            .downcast_ref::<onnx_slice::Error>()
            .is_some_and(|e| matches!(e.root(), onnx_slice::Error::Budget { .. }))
    };
    let invalid_option = |cause: &(dyn std::error::Error + 'static)| {
        cause.downcast_ref::<UsageError>().is_some()
            || cause.downcast_ref::<onnx_slice::Error>().is_some_and(|e| {
                matches!(
                    e.root(),
                    onnx_slice::Error::Invalid { .. } | onnx_slice::Error::Folder { .. }
                )
            })
    };
    if error.chain().any(invalid_option) {
        EXIT_USAGE
    } else if error.chain().any(unsupported) {
        EXIT_UNSUPPORTED_MODEL
    } else if error.chain().any(unreachable_target) {
        EXIT_TARGET_NOT_MET
    } else {
        1
    }
}

/// A file the command reads: it exists, is a file (not a folder) and can be opened.
pub fn input_file(flag: &str, path: &Path) -> Checked {
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(usage(format!("{flag} {shown}: no such file")))
        }
        Err(e) => Err(usage(format!("{flag} {shown}: cannot be read ({e})"))),
        Ok(m) if m.is_dir() => Err(usage(format!("{flag} {shown} is a folder, not a file"))),
        Ok(_) => std::fs::File::open(path)
            .map(drop)
            .map_err(|e| usage(format!("{flag} {shown}: cannot be read ({e})"))),
    }
}

/// Every file the command reads, with the flag that names it ("MODEL" for the positional one).
pub fn input_files<'a>(files: impl IntoIterator<Item = (&'a str, &'a Path)>) -> Checked {
    files.into_iter().try_for_each(|(flag, path)| input_file(flag, path))
}

/// The files a command writes, each with its flag: every one can be created (its folder exists and
/// takes new files, it is not a folder itself), none is one of `inputs`, and no two are the same.
pub fn output_files(outputs: &[(&str, &Path)], inputs: &[&Path]) -> Checked {
    for (i, &(flag, path)) in outputs.iter().enumerate() {
        onnx_slice::onnx::check_destination(path).map_err(|e| usage(format!("{flag}: {e}")))?;
        check_folder_takes_files(flag, path)?;
        if let Some(input) = inputs.iter().find(|input| same_path(path, input)) {
            let which =
                if *input == path { String::new() } else { format!(" {}", input.display()) };
            return Err(usage(format!(
                "{flag} {} is the input file{which}; write to another path",
                path.display()
            )));
        }
        if let Some((other, _)) = outputs[..i].iter().find(|(_, earlier)| same_path(path, earlier))
        {
            return Err(usage(format!(
                "{flag} and {other} name the same file, {}",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Creating (and at once removing) a temporary file is the one sure test that the folder is
/// writable for this user.
fn check_folder_takes_files(flag: &str, path: &Path) -> Checked {
    let folder = onnx_slice::files::parent_folder(path);
    tempfile::Builder::new().prefix(".onnx-slice-check.").tempfile_in(&folder).map(drop).map_err(
        |e| {
            usage(format!(
                "{flag} {}: cannot write in the folder {} ({})",
                path.display(),
                folder.display(),
                e.kind()
            ))
        },
    )
}

/// Two paths name the same file: the same folder (after resolving links) and file name, or, for
/// existing files, the same inode (hard links).
fn same_path(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        return ma.dev() == mb.dev() && ma.ino() == mb.ino();
    }
    matches!((resolved(a), resolved(b)), (Some(ra), Some(rb)) if ra == rb)
}

fn resolved(path: &Path) -> Option<PathBuf> {
    let folder = onnx_slice::files::parent_folder(path);
    Some(folder.canonicalize().ok()?.join(path.file_name()?))
}

/// A count that must be at least 1.
pub fn at_least_one(flag: &str, value: usize) -> Checked {
    if value == 0 {
        return Err(usage(format!("{flag} must be at least 1")));
    }
    Ok(())
}

/// The method and its size: a ratio or a target, and only the flags of the method that runs;
/// checked first, before the options' values.
pub(super) fn method_flags(args: &SliceArgs) -> Checked {
    if args.allocate_widths && args.dry_run {
        return Err(usage("--allocate-widths needs calibration, which --dry-run does not do"));
    }
    if args.uniform_widths && args.method() == super::MethodArg::Slicegpt {
        return Err(usage("--uniform-widths is for --method neurons and combined; SliceGPT's widths are uniform unless --allocate-widths"));
    }
    let target = args.target_size.is_some() || args.target_params.is_some();
    if !target && args.ratio.is_none() && args.method.is_none() {
        return Err(usage("give --ratio R (SliceGPT: the share of the stream's width to remove) or a size target (--target-size, --target-params); see --help"));
    }
    match args.method() {
        super::MethodArg::Slicegpt if args.ratio.is_none() && !target => {
            return Err(usage("give --ratio R (the share of the stream's width to remove) or a size target (--target-size, --target-params); see --help"));
        }
        method @ (super::MethodArg::Neurons | super::MethodArg::Combined) => {
            let name = if method == super::MethodArg::Neurons { "neurons" } else { "combined" };
            slicegpt_only(args, name)?;
            if !target {
                return Err(usage(format!("--method {name} needs a size target: --target-size BYTES|N% or --target-params N")));
            }
        }
        super::MethodArg::Slicegpt => {}
    }
    Ok(())
}

/// SliceGPT's own flags are refused with another method: they would be silently ignored.
fn slicegpt_only(args: &SliceArgs, method: &str) -> Checked {
    let given = [
        ("--ratio", args.ratio.is_some()),
        ("--slice-head", args.slice_head),
        ("--center-embeddings", args.center_embeddings),
        ("--save-rotations", args.save_rotations.is_some()),
        ("--orientation, --basis or --seed", args.slicegpt_flags_given),
    ];
    match given.iter().find(|(_, given)| *given) {
        Some((flag, _)) => Err(usage(format!(
            "{flag} is SliceGPT's (--method slicegpt); --method {method} takes --target-size or --target-params"
        ))),
        None => Ok(()),
    }
}

/// Every flag and path of a slicing command, checked before the model is loaded: the inputs
/// exist and are files, the outputs can be written and overwrite no input (the tokenizer
/// included). Whether text calibration has a tokenizer at all is checked by the library, once the
/// model is known not to be refused anyway (an already sliced model).
/// The values themselves are [`onnx_slice::pipeline::Options::check`]'s.
pub(super) fn slice_command(args: &SliceArgs, input: &Path, output: Option<&Path>) -> Checked {
    let mut inputs: Vec<(&str, &Path)> = vec![("MODEL", input)];
    inputs.extend(args.calib.iter().map(|p| ("--calib", p.as_path())));
    inputs.extend(args.calib_ids.iter().map(|p| ("--calib-ids", p.as_path())));
    inputs.extend(args.tokenizer.iter().map(|p| ("--tokenizer", p.as_path())));
    inputs.extend(args.ort_lib.iter().map(|p| ("--ort-lib", p.as_path())));
    input_files(inputs.iter().copied())?;
    let tokenizer = onnx_slice::interface::find_tokenizer(
        input,
        args.tokenizer.as_deref(),
        "--calib-ids FILE.npy",
    )
    .ok();
    let mut outputs: Vec<(&str, &Path)> = output.map(|o| ("-o", o)).into_iter().collect();
    outputs.extend(args.report.iter().map(|p| ("--report", p.as_path())));
    outputs.extend(args.save_rotations.iter().map(|p| ("--save-rotations", p.as_path())));
    let read: Vec<&Path> = inputs.iter().map(|(_, p)| *p).chain(tokenizer.as_deref()).collect();
    output_files(&outputs, &read)?;
    output.map_or(Ok(()), new_output)
}

/// The one rule for an existing output: `-o` never replaces anything. A model file must not exist
/// yet; an output folder (for an export folder) must be new or empty (`export::plan_output`).
/// `--report` and `--save-rotations` files are replaced.
pub fn new_output(path: &Path) -> Checked {
    if std::fs::symlink_metadata(path).is_ok_and(|m| !m.is_dir()) {
        return Err(usage(format!(
            "-o {} exists; onnx-slice writes a new file and never replaces one: remove it first, or \
             give a new name",
            path.display()
        )));
    }
    Ok(())
}

/// The files and counts of `eval`, and a tokenizer for its text.
pub(super) fn eval_command(args: &super::eval::EvalArgs) -> Checked {
    at_least_one("--batch", args.batch)?;
    at_least_one("--seqlen", args.seqlen)?;
    args.max_windows.map_or(Ok(()), |n| at_least_one("--max-windows", n))?;
    let mut inputs: Vec<(&str, &Path)> = vec![("MODEL", args.model.as_path())];
    inputs.extend(args.text.iter().map(|p| ("--text", p.as_path())));
    inputs.extend(args.ids.iter().map(|p| ("--ids", p.as_path())));
    inputs.extend(args.tokenizer.iter().map(|p| ("--tokenizer", p.as_path())));
    inputs.extend(args.ort_lib.iter().map(|p| ("--ort-lib", p.as_path())));
    input_files(inputs)?;
    if args.ids.is_none() {
        onnx_slice::interface::find_tokenizer(
            &args.model,
            args.tokenizer.as_deref(),
            "--ids FILE.npy",
        )
        .map_err(|e| usage(e.to_string()))?;
    }
    Ok(())
}
