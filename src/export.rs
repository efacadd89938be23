//! Export folders, as optimum and onnxruntime-genai write them: one model file (with its external
//! data), the configuration and the tokenizer files. A folder given as the input is resolved to its
//! model; a folder given as the output is written so that the same client loads it as it is: every
//! side file copied byte for byte (the model's inputs and outputs do not change, so neither does
//! any configuration: `config.json` keeps the original hidden size), the model under the input's
//! file name, its external data named as the family's loader expects. The output folder appears
//! complete or not at all: it is built in a temporary sibling folder that is renamed into place.
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::files::{parent_folder, RemoveOnInterrupt};
use crate::graph::{Model, Tensor, TensorSink};
use crate::onnx::{DataStream, SaveOptions, Saved, Storage};

/// Which exporter wrote a folder, told by its configuration files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// optimum (`optimum-cli export onnx`): `config.json`, no `genai_config.json`; loaded by
    /// `ORTModelForCausalLM.from_pretrained(folder)`.
    Optimum,
    /// onnxruntime-genai's model builder: `genai_config.json` names the model file; loaded by
    /// `onnxruntime_genai.Model(folder)`.
    Genai,
}

impl Family {
    /// The external data file's name for the model file `model`, as the family's exporter writes
    /// it (and its loader, when it fetches or copies a model, expects it).
    pub fn data_file_name(self, model: &str) -> String {
        match self {
            Family::Optimum => format!("{model}_data"),
            Family::Genai => format!("{model}.data"),
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Optimum => "optimum",
            Family::Genai => "onnxruntime-genai",
        })
    }
}

/// An export folder and the model file in it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportFolder {
    pub dir: PathBuf,
    pub family: Family,
    /// The model's file name inside `dir`.
    pub model_file: String,
}

impl ExportFolder {
    pub fn model_path(&self) -> PathBuf {
        self.dir.join(&self.model_file)
    }

    /// Reads what the folder is: its family and its model file. Refuses a folder that is neither
    /// family's, and one that holds other models than the one its client loads (the output could
    /// not say which one was sliced).
    pub fn open(dir: &Path) -> Result<Self> {
        let refuse = |message: String| Err(folder_error(dir, message));
        let models = onnx_files(dir)?;
        let (family, model_file) = if dir.join("genai_config.json").is_file() {
            (Family::Genai, genai_model_file(dir)?)
        } else if dir.join("config.json").is_file() {
            match models.as_slice() {
                [one] => (Family::Optimum, one.clone()),
                [] => return refuse("an optimum export folder (config.json) without a .onnx model file".into()),
                _ => return refuse(format!(
                    "holds {} models ({}); optimum's loader would have to be told which: slice the file itself, \
                     onnx-slice {} -o OUT.onnx",
                    models.len(),
                    models.join(", "),
                    dir.join(&models[0]).display()
                )),
            }
        } else {
            return refuse(
                "not an export folder onnx-slice knows: no genai_config.json (onnxruntime-genai) and no config.json \
                 (optimum); give the .onnx file instead"
                    .into(),
            );
        };
        if let Some(other) = models.iter().find(|m| **m != model_file) {
            return refuse(format!(
                "holds the model {other} besides {model_file}, the one {family}'s configuration names; an output folder \
                 with both would carry an unsliced model: slice the file itself, onnx-slice {} -o OUT.onnx",
                dir.join(&model_file).display()
            ));
        }
        Ok(ExportFolder { dir: dir.to_path_buf(), family, model_file })
    }
}

fn folder_error(dir: &Path, message: String) -> Error {
    Error::Folder { path: dir.to_path_buf(), message }
}

/// The `.onnx` files directly in `dir`, sorted by name.
fn onnx_files(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = entries(dir)?
        .into_iter()
        .filter(|(name, path)| name.ends_with(".onnx") && path.is_file())
        .map(|(name, _)| name)
        .collect();
    names.sort();
    Ok(names)
}

/// Every entry directly in `dir` with its path (names that are not UTF-8 are refused: no client
/// file has one).
fn entries(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let read = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    read.map(|entry| {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().into_string().map_err(|name| {
            folder_error(
                dir,
                format!("holds a file whose name is not UTF-8: {}", name.to_string_lossy()),
            )
        })?;
        Ok((name, entry.path()))
    })
    .collect()
}

/// `model.decoder.filename` in the folder's `genai_config.json`: the model the client loads.
/// A configuration that names further model files (vision, speech or embedding models of
/// multimodal exports) is refused: only the decoder would be sliced.
fn genai_model_file(dir: &Path) -> Result<String> {
    let path = dir.join("genai_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| folder_error(dir, format!("genai_config.json is not valid JSON: {e}")))?;
    let decoder = config.pointer("/model/decoder/filename").and_then(serde_json::Value::as_str);
    let Some(file) = decoder else {
        return Err(folder_error(dir, "genai_config.json has no model.decoder.filename".into()));
    };
    if !is_plain_file_name(file) {
        return Err(folder_error(
            dir,
            format!("genai_config.json names the model '{file}', not a file in the folder"),
        ));
    }
    let mut others = Vec::new();
    collect_file_names(&config, &mut others);
    others.retain(|name| name != file);
    if !others.is_empty() {
        return Err(folder_error(
            dir,
            format!(
                "genai_config.json names more models than the decoder ({}): onnx-slice slices one decoder; slice \
                 the file itself, onnx-slice {} -o OUT.onnx",
                others.join(", "),
                dir.join(file).display()
            ),
        ));
    }
    Ok(file.to_string())
}

/// Every string under a `filename` key, at any depth.
fn collect_file_names(value: &serde_json::Value, into: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("filename", serde_json::Value::String(name)) => into.push(name.clone()),
                    _ => collect_file_names(value, into),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_file_names(v, into)),
        _ => {}
    }
}

fn is_plain_file_name(name: &str) -> bool {
    let mut components = Path::new(name).components();
    matches!((components.next(), components.next()), (Some(Component::Normal(_)), None))
}

/// What a command was given: a model file, or an export folder and the model file in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub model: PathBuf,
    pub folder: Option<ExportFolder>,
}

/// A folder is opened as an export folder; anything else is taken as the model file (whether it
/// exists and can be read is for the caller's checks to say).
pub fn resolve_input(path: &Path) -> Result<Input> {
    if path.is_dir() {
        let folder = ExportFolder::open(path)?;
        Ok(Input { model: folder.model_path(), folder: Some(folder) })
    } else {
        Ok(Input { model: path.to_path_buf(), folder: None })
    }
}

/// Where a command writes its model: a file (given a file), or a new export folder (given one).
#[derive(Debug)]
pub enum Destination {
    File(PathBuf),
    Folder(FolderPlan),
}

/// A checked output folder, not yet created.
#[derive(Debug)]
pub struct FolderPlan {
    source: ExportFolder,
    /// The output folder, absolute, its parent resolved (links, `..`).
    out: PathBuf,
    /// The side files to copy, by name.
    side_files: Vec<String>,
    /// Folders inside the input folder, not part of either family's layout: not copied.
    pub skipped_folders: Vec<String>,
}

/// Checks the output for `input` before any long work: a folder input writes a new folder `out`,
/// which must not exist yet (or be an empty folder), whose parent must exist, and which must not be
/// the input folder or lie inside it (through links and `..` too). A file input writes the file
/// `out` (checked by [`crate::onnx::check_save_target`] once the model is loaded).
pub fn plan_output(input: &Input, out: &Path) -> Result<Destination> {
    let Some(source) = &input.folder else { return Ok(Destination::File(out.to_path_buf())) };
    let resolved = resolve_output(out)?;
    let input_dir = source.dir.canonicalize().map_err(|e| Error::io(&source.dir, e))?;
    let refuse = |message: String| Err(folder_error(out, message));
    if resolved.starts_with(&input_dir) {
        return refuse(format!(
            "is {} the input folder {}; write the output folder elsewhere",
            if resolved == input_dir { "the same folder as" } else { "inside" },
            source.dir.display()
        ));
    }
    // A new `-o out.onnx` is the file workflow typed with a folder input, not a folder name.
    let names_a_file = resolved.extension().is_some_and(|e| e == "onnx");
    match std::fs::metadata(&resolved) {
        Ok(m) if !m.is_dir() => {
            return refuse(format!(
                "is a file; the input {} is an export folder, so -o names the folder to create (to write one file, \
                 give the model file {} as the input)",
                source.dir.display(),
                source.model_path().display()
            ))
        }
        Err(_) if names_a_file => {
            return refuse(format!(
                "names a .onnx file, but the input {} is an export folder: -o names the folder to create (to write \
                 one file, give the model file {} as the input)",
                source.dir.display(),
                source.model_path().display()
            ))
        }
        Ok(_) if std::fs::read_dir(&resolved).map_err(|e| Error::io(&resolved, e))?.next().is_some() => {
            return refuse("is a folder that is not empty; onnx-slice creates the output folder: give a new name".into())
        }
        _ => {}
    }
    check_parent_takes_folders(out, &resolved)?;
    let mut side_files = Vec::new();
    let mut skipped_folders = Vec::new();
    for (name, path) in entries(&source.dir)? {
        // Either family's name for the model's external data (the model's own data files, whatever
        // their names, are left out when it is written).
        let is_model_data = name == format!("{}.data", source.model_file)
            || name == format!("{}_data", source.model_file);
        if path.is_dir() {
            skipped_folders.push(name);
        } else if name != source.model_file && !is_model_data && path.is_file() {
            side_files.push(name);
        }
    }
    side_files.sort();
    skipped_folders.sort();
    Ok(Destination::Folder(FolderPlan {
        source: source.clone(),
        out: resolved,
        side_files,
        skipped_folders,
    }))
}

/// The files a loaded model was read from.
fn model_files(model: &Model) -> Vec<PathBuf> {
    model
        .source
        .iter()
        .flat_map(|s| std::iter::once(s.path.clone()).chain(s.external_files.clone()))
        .collect()
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(ma), Ok(mb)) => ma.dev() == mb.dev() && ma.ino() == mb.ino(),
        _ => false,
    }
}

/// `out` as an absolute path with its parent's links and `..` resolved (the folder itself may not
/// exist yet).
fn resolve_output(out: &Path) -> Result<PathBuf> {
    if out.exists() {
        return out.canonicalize().map_err(|e| Error::io(out, e));
    }
    let name = match out.components().next_back() {
        Some(Component::Normal(name)) => name,
        _ => return Err(folder_error(out, "does not name a folder to create".into())),
    };
    let parent = parent_folder(out);
    let parent = parent.canonicalize().map_err(|e| {
        folder_error(
            out,
            format!("its parent folder {} cannot be used ({})", parent.display(), e.kind()),
        )
    })?;
    Ok(parent.join(name))
}

/// Creating (and at once removing) a temporary folder is the one sure test that the parent takes
/// new folders for this user.
fn check_parent_takes_folders(out: &Path, resolved: &Path) -> Result<()> {
    let parent = parent_folder(resolved);
    tempfile::Builder::new().prefix(".onnx-slice-check.").tempdir_in(&parent).map(drop).map_err(
        |e| {
            folder_error(
                out,
                format!("cannot create a folder in {} ({})", parent.display(), e.kind()),
            )
        },
    )
}

impl Destination {
    /// Writes `model`: to the file, or as the complete output folder.
    pub fn save(&self, model: &Model, options: &SaveOptions) -> Result<Saved> {
        self.open(model, options)?.finish(model)
    }

    /// Opens the output before the rewrite, so that finished tensors go straight to its data file
    /// (docs/design.md §8). A folder is staged in a temporary sibling from here on.
    pub fn open(&self, model: &Model, options: &SaveOptions) -> Result<OpenOutput<'_>> {
        match self {
            Destination::File(path) => Ok(OpenOutput {
                stream: DataStream::new(model, path, options)?,
                scratch: parent_folder(path),
                folder: None,
            }),
            Destination::Folder(plan) => plan.open(model, options),
        }
    }
}

/// An output being written ([`Destination::open`]): a [`TensorSink`] for the finished tensors,
/// and a folder for scratch files on the output's file system. Dropped without
/// [`OpenOutput::finish`], it leaves nothing.
pub struct OpenOutput<'a> {
    stream: DataStream,
    scratch: PathBuf,
    /// For an export folder: its plan, and the temporary sibling it is staged in, registered for
    /// removal on a signal (a file output's registration is its [`crate::files::Staged`]'s).
    folder: Option<(&'a FolderPlan, tempfile::TempDir, RemoveOnInterrupt)>,
}

impl OpenOutput<'_> {
    /// Where large intermediate tensors may be parked ([`crate::files::ScratchScope`]).
    pub fn scratch_folder(&self) -> &Path {
        &self.scratch
    }

    /// Writes the model (and, for a folder, the side files), then renames it into place.
    pub fn finish(self, model: &Model) -> Result<Saved> {
        let saved = self.stream.save(model)?;
        match self.folder {
            None => Ok(saved),
            Some((plan, staging, _on_interrupt)) => plan.complete(model, staging, saved),
        }
    }
}

impl TensorSink for OpenOutput<'_> {
    fn finished(&mut self, tensor: &mut Tensor) -> Result<()> {
        self.stream.finished(tensor)
    }

    fn stores_bytes(&self) -> bool {
        self.stream.stores_bytes()
    }
}

impl FolderPlan {
    pub fn out(&self) -> &Path {
        &self.out
    }

    pub fn family(&self) -> Family {
        self.source.family
    }

    /// The side files that are copied, by name.
    pub fn side_files(&self) -> &[String] {
        &self.side_files
    }

    /// The storage the output gets: what was asked for, except that a model that came with external
    /// data keeps it external when nothing was asked (onnxruntime-genai's folders do).
    pub fn storage(asked: Storage, model: &Model) -> Storage {
        match asked {
            Storage::Auto
                if model.source.as_ref().is_some_and(|s| !s.external_files.is_empty()) =>
            {
                Storage::External
            }
            other => other,
        }
    }

    /// Starts the output folder in a temporary sibling, with the model's stream to its file names
    /// (the external data under the family's name). On failure the sibling is removed.
    fn open(&self, model: &Model, options: &SaveOptions) -> Result<OpenOutput<'_>> {
        let parent = parent_folder(&self.out);
        let name =
            self.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".part")
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        let model_path = staging.path().join(&self.source.model_file);
        let data_path =
            staging.path().join(self.source.family.data_file_name(&self.source.model_file));
        let options = SaveOptions { storage: Self::storage(options.storage, model), ..*options };
        let on_interrupt = RemoveOnInterrupt::register(staging.path());
        let stream = DataStream::with_data_file(model, &model_path, &data_path, &options)?;
        Ok(OpenOutput {
            stream,
            scratch: staging.path().to_path_buf(),
            folder: Some((self, staging, on_interrupt)),
        })
    }

    /// Completes the staged folder once the model is in it (every side file copied), then renames
    /// it into place.
    fn complete(&self, model: &Model, staging: tempfile::TempDir, saved: Saved) -> Result<Saved> {
        let sources = model_files(model);
        let side_files = self.side_files.iter().filter(|file| {
            let path = self.source.dir.join(file);
            !sources.iter().any(|source| same_file(source, &path))
        });
        for file in side_files {
            copy_synced(&self.source.dir.join(file), &staging.path().join(file))?;
        }
        set_folder_permissions(staging.path());
        std::fs::rename(staging.path(), &self.out).map_err(|e| Error::io(&self.out, e))?;
        let _ = staging.keep();
        let moved =
            |path: &Path| -> PathBuf { self.out.join(path.file_name().unwrap_or_default()) };
        let data_file = saved.data_file.as_ref().map(|(path, len)| (moved(path), *len));
        Ok(Saved { path: moved(&saved.path), model_bytes: saved.model_bytes, data_file })
    }
}

/// A byte-for-byte copy, on disk before the folder is renamed into place.
fn copy_synced(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).map_err(|e| Error::io(from, e))?;
    std::fs::File::open(to).and_then(|f| f.sync_all()).map_err(|e| Error::io(to, e))
}

/// Temporary folders are created 0700; the output folder gets the usual 0755.
fn set_folder_permissions(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
}
