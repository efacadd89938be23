//! Calibration token batches: the token ids that are run through the model to compute the PCA bases.
//!
//! Two sources:
//! - text ([`CalibrationSet::from_texts`]), tokenized with the model's `tokenizer.json`
//!   ([`find_tokenizer`], [`load_tokenizer`]); [`default_calibration_text`] is built in;
//! - token ids saved with NumPy ([`CalibrationSet::from_npy`]), `[N, L]` int64 or int32.
//!
//! How text becomes samples follows the SliceGPT reference (TransformerCompression,
//! `data_utils.prepare_dataloader` with `varied_seqlen=False`): documents are joined with
//! `"\n\n"` — the reference tokenizes `"\n\n" + document` for every document after the first and
//! concatenates the tokens, and so does this module — and cut into samples of exactly `seqlen`
//! tokens. The differences, all deliberate:
//! - the reference starts each sample at a random document and drops the rest of the last document
//!   it reads; here the token stream is cut into consecutive non-overlapping windows and `samples`
//!   of them are drawn at random (seeded). No text is wasted, which matters for the built-in text
//!   (about 1.2 × what 128 × 2048 needs), and a text without blank lines still gives many samples;
//! - the reference decodes each sample back to a string and tokenizes it again; here the ids are
//!   used directly (the round trip can only re-merge a few tokens at the cut).
//! - special tokens: the reference's second tokenization adds whatever the tokenizer adds by
//!   default (LLaMA-2's `<s>`, OPT's `</s>`; none for GPT-2, Qwen2, SmolLM2) and truncates to
//!   `seqlen`. Here every sample gets exactly the special tokens that the tokenizer's
//!   post-processor adds to a single sequence by default (found by encoding a probe), around
//!   `seqlen − specials` text tokens, so samples are `seqlen` long either way. Nothing is added
//!   when the tokenizer has no post-processor.
//!
//! Paragraphs separated by blank lines are the documents ([`documents`]); text samples never need
//! padding, so their mask is all ones. The mask exists for sources that pad.
use std::fmt::Write as _;
use std::path::Path;

use ndarray::{Array2, ArrayD};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use crate::interface::plain_tokenizer;
use crate::runtime::npy::{read_npy, NpyArray};
use crate::{Error, Result};

/// The reference's default number of calibration samples (`--cal-nsamples`).
pub const DEFAULT_SAMPLES: usize = 128;
/// The reference's default calibration sample length (`--cal-max-seqlen`).
pub const DEFAULT_SEQLEN: usize = 2048;
/// The reference's default seed.
pub const DEFAULT_SEED: u64 = 42;

/// Text read beyond this many times what the samples need is not tokenized: the samples are drawn
/// from the beginning of a very large text.
const TEXT_READ_FACTOR: usize = 8;
/// Documents tokenized per call (in parallel inside the tokenizer).
const TOKENIZE_CHUNK: usize = 256;

static DEFAULT_TEXT: &str = include_str!("../../data/calibration-default.txt");

/// The built-in calibration text: the lead sections of about 3,000 English Wikipedia articles
/// (~1.5 MB; CC BY-SA 4.0, Wikipedia contributors; see `data/README.md`).
pub fn default_calibration_text() -> &'static str {
    DEFAULT_TEXT
}

/// Token samples for calibration: `N` rows of `L` token ids, all of the same length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalibrationSet {
    /// N samples × L tokens.
    pub ids: Vec<Vec<i64>>,
    /// 1 = real token, 0 = padding; same shape as `ids`.
    pub mask: Vec<Vec<i64>>,
    /// Where the samples come from, for reports.
    pub source: String,
}

impl CalibrationSet {
    /// Number of samples (N).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Sample length (L); 0 for an empty set.
    pub fn seqlen(&self) -> usize {
        self.ids.first().map_or(0, Vec::len)
    }

    /// Real (unpadded) tokens in all samples.
    pub fn tokens(&self) -> usize {
        self.mask.iter().flatten().filter(|&&m| m != 0).count()
    }

    /// The samples in batches of `batch_size` rows (at least 1): `(ids [b, L], mask [b, L])`; the
    /// last batch may be smaller.
    pub fn batches(
        &self,
        batch_size: usize,
    ) -> impl Iterator<Item = (ArrayD<i64>, ArrayD<i64>)> + '_ {
        let batch_size = batch_size.max(1);
        (0..self.ids.len()).step_by(batch_size).map(move |start| {
            let end = (start + batch_size).min(self.ids.len());
            (rows_to_array(&self.ids[start..end]), rows_to_array(&self.mask[start..end]))
        })
    }

    /// Keeps the first `seqlen` tokens of every sample (for ids longer than the model accepts).
    pub fn truncated(mut self, seqlen: usize) -> Self {
        if self.seqlen() > seqlen {
            let before = self.seqlen();
            self.ids.iter_mut().for_each(|row| row.truncate(seqlen));
            self.mask.iter_mut().for_each(|row| row.truncate(seqlen));
            let _ = write!(self.source, "; cut from {before} to {seqlen} tokens");
        }
        self
    }

    /// `samples` samples of `seqlen` tokens from text (see the module documentation for how).
    ///
    /// `texts` are whole texts (files); each is split into documents at blank lines. Deterministic
    /// for a given `seed`. When the text has fewer than `samples` windows, all of them are taken
    /// and `source` says so; when it has not even one, this is an error.
    pub fn from_texts(
        texts: &[String],
        tokenizer: &Tokenizer,
        samples: usize,
        seqlen: usize,
        seed: u64,
    ) -> Result<Self> {
        if samples == 0 {
            return Err(calibration("the number of calibration samples must be at least 1"));
        }
        let tokenizer = plain_tokenizer(tokenizer)?;
        let (prefix, suffix) = special_tokens(&tokenizer)?;
        let specials = prefix.len() + suffix.len();
        if seqlen <= specials {
            return Err(calibration(format!(
                "a calibration sample of {seqlen} tokens has no room for text: the tokenizer adds {specials} special \
                 token(s) to every sequence"
            )));
        }
        let window = seqlen - specials;
        let budget = samples.saturating_mul(window).saturating_mul(TEXT_READ_FACTOR);
        let stream = tokenize_documents(&tokenizer, texts, budget)?;
        let available = stream.ids.len() / window;
        if available == 0 {
            return Err(calibration(format!(
                "the calibration text is too short: it has {} tokens ({} documents) with this tokenizer, and one \
                 sample needs {window}; give more text or a smaller sample length",
                stream.ids.len(),
                stream.documents
            )));
        }
        let chosen = choose_windows(available, samples, seed);
        let ids: Vec<Vec<i64>> = chosen
            .iter()
            .map(|&w| {
                let text = &stream.ids[w * window..(w + 1) * window];
                prefix.iter().chain(text).chain(&suffix).map(|&id| i64::from(id)).collect()
            })
            .collect();
        let mask = vec![vec![1; seqlen]; ids.len()];
        let mut source = format!(
            "{} samples × {seqlen} tokens from text ({} documents, {} tokens{}; {available} windows, seed {seed})",
            ids.len(),
            stream.documents,
            stream.ids.len(),
            if stream.complete { "" } else { " read, the rest of the text unused" },
        );
        if ids.len() < samples {
            let _ = write!(
                source,
                "; only {} of the {samples} requested samples: the text is too short for more",
                ids.len()
            );
        }
        Ok(Self { ids, mask, source })
    }

    /// Samples from a NumPy `.npy` file of token ids, `[N, L]` int64 or int32 (as `np.save`
    /// writes); every token is real. `samples` keeps the first rows only.
    pub fn from_npy(path: &Path, samples: Option<usize>) -> Result<Self> {
        let array =
            read_npy(path).map_err(|error| calibration(format!("calibration ids: {error}")))?;
        let mut ids = token_rows(array, path)?;
        let total = ids.len();
        let keep = match samples {
            Some(0) => {
                return Err(calibration("the number of calibration samples must be at least 1"))
            }
            Some(n) => n.min(total),
            None => total,
        };
        ids.truncate(keep);
        let seqlen = ids.first().map_or(0, Vec::len);
        let mut source = format!("{keep} samples × {seqlen} tokens from {}", path.display());
        match samples {
            _ if keep < total => {
                let _ = write!(source, " (the first {keep} of {total} rows)");
            }
            Some(requested) if requested > total => {
                let _ = write!(source, " (only {total} rows, {requested} requested)");
            }
            _ => {}
        }
        let mask = vec![vec![1; seqlen]; ids.len()];
        Ok(Self { ids, mask, source })
    }
}

fn rows_to_array(rows: &[Vec<i64>]) -> ArrayD<i64> {
    let width = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Array2::from_shape_vec((rows.len(), width), flat)
        .expect("calibration rows have equal lengths")
        .into_dyn()
}

/// Token id rows from an `.npy` array: `[N, L]`, integer, non-negative, N and L at least 1.
pub fn token_rows(array: NpyArray, path: &Path) -> Result<Vec<Vec<i64>>> {
    let dtype = array.dtype_name();
    let shape = array.shape().to_vec();
    let ids = array.into_i64().map_err(|_| {
        calibration(format!(
            "{}: token ids must be int64 or int32, this array is {dtype}",
            path.display()
        ))
    })?;
    let [rows, cols] = shape[..] else {
        return Err(calibration(format!(
            "{}: token ids must be a 2-D array [samples, tokens], this one has shape {shape:?}",
            path.display()
        )));
    };
    if rows == 0 || cols == 0 {
        return Err(calibration(format!(
            "{}: the token id array is empty (shape {shape:?})",
            path.display()
        )));
    }
    if let Some(bad) = ids.iter().find(|&&id| id < 0) {
        return Err(calibration(format!(
            "{}: token ids must be non-negative, found {bad}",
            path.display()
        )));
    }
    Ok(ids.rows().into_iter().map(|row| row.to_vec()).collect())
}

/// The documents of a text: paragraphs separated by blank (or whitespace-only) lines, trimmed,
/// empty ones skipped.
pub fn documents(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || loop {
        if rest.is_empty() {
            return None;
        }
        let (paragraph, after) = split_paragraph(rest);
        rest = after;
        let paragraph = paragraph.trim();
        if !paragraph.is_empty() {
            return Some(paragraph);
        }
    })
}

/// The first paragraph of `text` (up to a blank line) and what follows the blank line(s).
fn split_paragraph(text: &str) -> (&str, &str) {
    let mut line_start = 0;
    let mut seen_content = false;
    while line_start < text.len() {
        let line_end = text[line_start..].find('\n').map_or(text.len(), |i| line_start + i + 1);
        let blank = text[line_start..line_end].trim().is_empty();
        if blank && seen_content {
            return (&text[..line_start], &text[line_end..]);
        }
        seen_content |= !blank;
        line_start = line_end;
    }
    (text, "")
}

/// All documents of all texts joined with `"\n\n"`: the evaluation text of the reference method.
pub fn join_documents(texts: &[String]) -> String {
    let mut joined = String::with_capacity(texts.iter().map(String::len).sum());
    for document in texts.iter().flat_map(|text| documents(text)) {
        if !joined.is_empty() {
            joined.push_str("\n\n");
        }
        joined.push_str(document);
    }
    joined
}

/// How many of a calibration set's real tokens are the tokenizer's unknown token.
#[derive(Debug, Clone, PartialEq)]
pub struct UnknownTokens {
    /// The unknown token as the vocabulary writes it ("<unk>", "[UNK]").
    pub token: String,
    pub count: usize,
    pub of: usize,
}

impl UnknownTokens {
    pub fn share(&self) -> f64 {
        self.count as f64 / self.of.max(1) as f64
    }
}

/// The unknown tokens in `set`; `None` when the tokenizer has no unknown token (byte-level BPE
/// reads any text).
pub fn unknown_tokens(set: &CalibrationSet, tokenizer: &Tokenizer) -> Option<UnknownTokens> {
    let (token, id) = unknown_token(tokenizer)?;
    let id = i64::from(id);
    let real = set.ids.iter().flatten().zip(set.mask.iter().flatten()).filter(|&(_, &m)| m != 0);
    let (count, of) =
        real.fold((0, 0), |(count, of), (&t, _)| (count + usize::from(t == id), of + 1));
    Some(UnknownTokens { token, count, of })
}

/// The model's unknown token and its id. Every model kind names it in its serialized form
/// (`unk_token` for WordLevel, WordPiece and BPE, `unk_id` for Unigram), which is the one place
/// the tokenizers crate exposes it for all of them.
fn unknown_token(tokenizer: &Tokenizer) -> Option<(String, u32)> {
    let model = serde_json::to_value(tokenizer.get_model()).ok()?;
    if let Some(token) = model.get("unk_token").and_then(serde_json::Value::as_str) {
        return Some((token.to_string(), tokenizer.token_to_id(token)?));
    }
    let id = u32::try_from(model.get("unk_id")?.as_u64()?).ok()?;
    Some((tokenizer.id_to_token(id)?, id))
}

/// The special tokens the tokenizer's post-processor puts before and after a single sequence by
/// default (`<s>` before for LLaMA-2; nothing for byte-level BPE tokenizers).
pub fn special_tokens(tokenizer: &Tokenizer) -> Result<(Vec<u32>, Vec<u32>)> {
    let probe = tokenizer
        .encode_fast("a", true)
        .map_err(|error| calibration(format!("the tokenizer failed on a probe text: {error}")))?;
    let ids = probe.get_ids();
    let special = probe.get_special_tokens_mask();
    let leading = special.iter().take_while(|&&s| s != 0).count();
    let trailing = if leading == ids.len() {
        0
    } else {
        special.iter().rev().take_while(|&&s| s != 0).count()
    };
    Ok((ids[..leading].to_vec(), ids[ids.len() - trailing..].to_vec()))
}

struct TokenStream {
    ids: Vec<u32>,
    documents: usize,
    /// Every document was tokenized.
    complete: bool,
}

/// Tokens of all documents, `"\n\n"` before every document but the first, no special tokens;
/// stops once `budget` tokens are there.
fn tokenize_documents(
    tokenizer: &Tokenizer,
    texts: &[String],
    budget: usize,
) -> Result<TokenStream> {
    let all: Vec<&str> = texts.iter().flat_map(|text| documents(text)).collect();
    let mut stream = TokenStream { ids: Vec::new(), documents: 0, complete: true };
    for (chunk_index, chunk) in all.chunks(TOKENIZE_CHUNK).enumerate() {
        if stream.ids.len() >= budget {
            stream.complete = false;
            break;
        }
        let inputs: Vec<String> =
            chunk
                .iter()
                .enumerate()
                .map(|(i, doc)| {
                    if chunk_index == 0 && i == 0 {
                        (*doc).to_string()
                    } else {
                        format!("\n\n{doc}")
                    }
                })
                .collect();
        let encodings = tokenizer.encode_batch_fast(inputs, false).map_err(|error| {
            calibration(format!("tokenizing the calibration text failed: {error}"))
        })?;
        for encoding in &encodings {
            stream.ids.extend_from_slice(encoding.get_ids());
        }
        stream.documents += chunk.len();
    }
    Ok(stream)
}

/// `samples` window indices out of `available`, ascending; all of them when there are not more.
fn choose_windows(available: usize, samples: usize, seed: u64) -> Vec<usize> {
    if available <= samples {
        return (0..available).collect();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut chosen = rand::seq::index::sample(&mut rng, available, samples).into_vec();
    chosen.sort_unstable();
    chosen
}

fn calibration(message: impl Into<String>) -> Error {
    Error::Calibration { message: message.into() }
}
