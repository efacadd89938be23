//! Perplexity by the reference method (docs/design.md §7, TransformerCompression's `evaluate_ppl`):
//! windows of token ids, each run through the model on its own (no context carried over), the mean
//! negative log-likelihood of every next token per window, averaged over windows, exponentiated:
//!
//! ```text
//! ppl = exp( mean_w  mean_{t : ids[w][t+1] ≠ ignore}  −log softmax(logits[w][t])[ids[w][t+1]] )
//! ```
//!
//! The log-softmax is computed in f64 from the model's f32 (or f16) logits.
//! Windows come from text ([`text_windows`]: the documents joined with `"\n\n"`, tokenized with the
//! tokenizer's default special tokens, cut into non-overlapping windows, the last partial one
//! dropped) or from a `.npy` array of token ids, one window per row.
//!
//! Models are fed by [`InputPlan`]: `input_ids`, an all-ones `attention_mask`, `position_ids`
//! `0..L` when the model has that input, and an empty past (`[b, kv_heads, 0, head_dim]`) for
//! KV-cache exports (optimum `_past`, onnxruntime-genai).
use std::path::PathBuf;

use ndarray::{Array2, ArrayView2, Axis};

use crate::calibrate::data::join_documents;
use crate::interface::{plain_tokenizer, InputPlan};
use crate::runtime::ModelSession;
use crate::{Error, Result};

/// The result of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    /// exp(mean_nll).
    pub value: f64,
    /// Windows that counted (a window whose every target is ignored does not).
    pub windows: usize,
    /// Predicted tokens that counted (targets equal to the ignored id excluded).
    pub tokens: usize,
    /// The mean over windows of each window's mean NLL, in nats.
    pub mean_nll: f64,
}

/// Perplexity of `windows` (token id rows of equal length), `batch` windows per run.
/// `progress(done, total)` is called after every run. The model's configuration files are looked
/// for beside `session.label()` when that is a file (sessions built with
/// [`ModelSession::from_file`]).
pub fn perplexity(
    session: &mut ModelSession,
    windows: &[Vec<i64>],
    ignore: Option<i64>,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    let label = PathBuf::from(session.label());
    let plan =
        InputPlan::for_session(session, Some(label.as_path()).filter(|path| path.is_file()))?;
    perplexity_with_plan(session, &plan, windows, ignore, batch, progress)
}

/// [`perplexity`] with a given [`InputPlan`].
pub fn perplexity_with_plan(
    session: &mut ModelSession,
    plan: &InputPlan,
    windows: &[Vec<i64>],
    ignore: Option<i64>,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    let length = windows.first().map_or(0, Vec::len);
    if length < 2 {
        return Err(eval_error(format!(
            "perplexity needs windows of at least 2 tokens, got {length}"
        )));
    }
    if let Some(bad) = windows.iter().position(|window| window.len() != length) {
        return Err(eval_error(format!(
            "window {bad} has {} tokens, the first has {length}: all windows must have the same length",
            windows[bad].len()
        )));
    }
    let batch = batch.max(1).min(plan.fixed_batch.unwrap_or(usize::MAX));
    let mut window_means = Vec::with_capacity(windows.len());
    let mut tokens = 0;
    for (index, chunk) in windows.chunks(batch).enumerate() {
        let flat: Vec<i64> = chunk.iter().flatten().copied().collect();
        let ids = Array2::from_shape_vec((chunk.len(), length), flat)
            .expect("windows have equal lengths");
        let logits = plan.logits(session, &ids, None)?;
        for (row, window) in logits.axis_iter(Axis(0)).zip(chunk) {
            let row = row.into_dimensionality::<ndarray::Ix2>().expect("logits are [b, L, V]");
            let (sum, count) = window_nll(row, window, ignore)?;
            if count > 0 {
                window_means.push(sum / count as f64);
                tokens += count;
            }
        }
        progress((index * batch + chunk.len()).min(windows.len()), windows.len());
    }
    if window_means.is_empty() {
        return Err(eval_error("no window has a target token that is not ignored"));
    }
    let mean_nll = window_means.iter().sum::<f64>() / window_means.len() as f64;
    Ok(Perplexity { value: mean_nll.exp(), windows: window_means.len(), tokens, mean_nll })
}

/// Sum and count of `−log softmax(logits[t])[ids[t+1]]` over `t` whose target is not `ignore`,
/// in f64. `logits` is `[L, V]`, `ids` has L tokens.
pub fn window_nll(
    logits: ArrayView2<'_, f32>,
    ids: &[i64],
    ignore: Option<i64>,
) -> Result<(f64, usize)> {
    let (length, vocab) = logits.dim();
    let targets: Vec<(usize, usize)> =
        (0..length.saturating_sub(1).min(ids.len().saturating_sub(1)))
            .filter(|&t| Some(ids[t + 1]) != ignore)
            .map(|t| {
                usize::try_from(ids[t + 1])
                    .ok()
                    .filter(|&target| target < vocab)
                    .map(|target| (t, target))
                    .ok_or_else(|| {
                        eval_error(format!(
                            "token id {} is outside the model's vocabulary of {vocab}",
                            ids[t + 1]
                        ))
                    })
            })
            .collect::<Result<_>>()?;
    let mut nll = vec![0.0f64; targets.len()];
    let threads =
        std::thread::available_parallelism().map_or(1, |n| n.get()).min(targets.len().max(1));
    let per_thread = targets.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        for (out, jobs) in nll.chunks_mut(per_thread).zip(targets.chunks(per_thread)) {
            let logits = &logits;
            scope.spawn(move || {
                for (slot, &(t, target)) in out.iter_mut().zip(jobs) {
                    *slot = token_nll(logits.row(t), target);
                }
            });
        }
    });
    Ok((nll.iter().sum(), nll.len()))
}

/// `logsumexp(row) − row[target]` in f64.
fn token_nll(row: ndarray::ArrayView1<'_, f32>, target: usize) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let sum: f64 = row.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    max + sum.ln() - f64::from(row[target])
}

/// Evaluation windows from text: the documents of all texts joined with `"\n\n"`, tokenized once
/// with the tokenizer's default special tokens (as `tokenizer(text)` does in the reference), cut
/// into `seqlen`-token windows; the last partial window is dropped.
pub fn text_windows(
    tokenizer: &tokenizers::Tokenizer,
    texts: &[String],
    seqlen: usize,
) -> Result<Vec<Vec<i64>>> {
    if seqlen < 2 {
        return Err(eval_error(format!(
            "the evaluation window must be at least 2 tokens, got {seqlen}"
        )));
    }
    let tokenizer = plain_tokenizer(tokenizer)?;
    let joined = join_documents(texts);
    let encoding = tokenizer
        .encode_fast(joined.as_str(), true)
        .map_err(|error| eval_error(format!("tokenizing the evaluation text failed: {error}")))?;
    let ids = encoding.get_ids();
    if ids.len() < seqlen {
        return Err(eval_error(format!(
            "the evaluation text has {} tokens, fewer than one window of {seqlen}: give more text or a smaller --seqlen",
            ids.len()
        )));
    }
    Ok(ids
        .chunks_exact(seqlen)
        .map(|window| window.iter().map(|&id| i64::from(id)).collect())
        .collect())
}

fn eval_error(message: impl Into<String>) -> Error {
    Error::Calibration { message: message.into() }
}
