//! The tokenizer of a model: `tokenizer.json` beside it or named by the user, loaded for plain
//! encoding (no truncation, no padding).
use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use super::unusable;
use crate::Result;

/// The tokenizer file to use: `explicit` when given (it must exist), else `tokenizer.json` beside
/// the model. `ids_flag` is the command's way to give token ids instead ("--calib-ids FILE.npy"),
/// suggested when there is no tokenizer.
pub fn find_tokenizer(
    model_path: &Path,
    explicit: Option<&Path>,
    ids_flag: &str,
) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(unusable(format!(
                "tokenizer {} not found (given with --tokenizer)",
                path.display()
            )))
        };
    }
    let beside = model_path.parent().unwrap_or(Path::new(".")).join("tokenizer.json");
    if beside.is_file() {
        return Ok(beside);
    }
    Err(unusable(format!(
        "no tokenizer for {}: tried {}. Pass --tokenizer PATH/tokenizer.json (the model's Hugging Face tokenizer), \
         or give token ids with {ids_flag}",
        model_path.display(),
        beside.display()
    )))
}

/// Loads a `tokenizer.json`, without the truncation and padding it may configure.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let tokenizer = Tokenizer::from_file(path).map_err(|error| {
        unusable(format!("{}: not a usable tokenizer.json: {error}", path.display()))
    })?;
    plain_tokenizer(&tokenizer)
}

/// A copy without truncation or padding (a tokenizer.json may set either; they would cut or pad
/// each document).
pub fn plain_tokenizer(tokenizer: &Tokenizer) -> Result<Tokenizer> {
    let mut plain = tokenizer.clone();
    plain.with_padding(None);
    plain.with_truncation(None).map_err(|error| {
        unusable(format!("cannot turn off the tokenizer's truncation: {error}"))
    })?;
    Ok(plain)
}
