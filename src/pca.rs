//! PCA of SliceGPT (docs/design.md §2): the basis at a stream point is the eigenvector matrix of
//! `H = Σ xᵀx` over the calibration tokens seen there.
//!
//! Conventions follow the reference implementation (TransformerCompression, `pca_calc`):
//! - activations are converted to f64 and `H` is accumulated in f64, uncentred;
//! - padding rows (mask false) contribute nothing;
//! - damping is relative: `H_ii += damping · mean(diag H)` (the reference uses 0.01);
//! - symmetric eigendecomposition in f64 (ascending), then reversed: eigenvectors sorted by
//!   decreasing eigenvalue; the eigenvalues returned are those of the damped `H`.
//!
//! In addition, every eigenvector gets a fixed sign (its largest-magnitude entry positive) so
//! that a basis does not flip between runs.
//!
//! Accumulation is the hot loop of calibration: rows are copied (f32 → f64) into a column-major
//! chunk `X` (c × d) and `H += Xᵀ X` runs as one lower-triangular rank-c update (faer's
//! parallel SYRK-like kernel: half the flops of a full GEMM); only the lower triangle of `H` is
//! kept up to date and mirrored when the full matrix is needed.
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use faer::linalg::matmul::triangular::{matmul as triangular_matmul, BlockStructure};
use faer::{Accum, Mat, MatRef, Side};
use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::error::{Error, Result};

/// The damping of the reference implementation: `H_ii += 0.01 · mean(diag H)`.
pub const DEFAULT_DAMPING: f64 = 0.01;

/// Elements (f64) of one accumulation chunk: 8 MiB. A chunk is `d × rows` with
/// `MIN_CHUNK_ROWS ≤ rows ≤ MAX_CHUNK_ROWS`.
const CHUNK_ELEMENTS: usize = 1 << 20;
const MIN_CHUNK_ROWS: usize = 256;
const MAX_CHUNK_ROWS: usize = 4096;

fn chunk_rows_for(d: usize) -> usize {
    (CHUNK_ELEMENTS / d.max(1)).clamp(MIN_CHUNK_ROWS, MAX_CHUNK_ROWS)
}

/// `H = Σ xᵀx` over the (unmasked) rows seen so far, in f64.
#[derive(Clone)]
pub struct Covariance {
    d: usize,
    /// d × d; only the lower triangle (diagonal included) is meaningful.
    h: Mat<f64>,
    tokens: u64,
    /// Scratch: the current chunk of rows (chunk_rows × d, column-major: one column per feature).
    chunk: Mat<f64>,
    filled: usize,
}

impl fmt::Debug for Covariance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Covariance")
            .field("d", &self.d)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl Covariance {
    /// An empty accumulator for rows of width `d`.
    ///
    /// # Panics
    /// If `d` is 0.
    pub fn new(d: usize) -> Self {
        assert!(d > 0, "Covariance::new: width d must be positive");
        Covariance { d, h: Mat::zeros(d, d), tokens: 0, chunk: Mat::zeros(0, 0), filled: 0 }
    }

    /// Row width.
    pub fn d(&self) -> usize {
        self.d
    }

    /// Rows accumulated so far (masked rows excluded).
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Adds `Σ xᵀx` over the rows of `rows` (row-major `[n, d]`) whose mask entry is true
    /// (all rows when `mask` is None). Padding positions get `false`.
    ///
    /// # Panics
    /// If `rows.len()` is not a multiple of `d`, or `mask` does not have one entry per row.
    pub fn add_rows(&mut self, rows: &[f32], mask: Option<&[bool]>) {
        let d = self.d;
        assert!(
            rows.len() % d == 0,
            "Covariance::add_rows: {} values are not rows of width {d}",
            rows.len()
        );
        let n = rows.len() / d;
        if let Some(mask) = mask {
            assert_eq!(
                mask.len(),
                n,
                "Covariance::add_rows: mask has {} entries for {n} rows",
                mask.len()
            );
        }
        let capacity = chunk_rows_for(d);
        if self.chunk.nrows() != capacity {
            self.chunk = Mat::zeros(capacity, d);
        }
        // Kept rows, gathered in groups of up to BLOCK so that the transposing copy into the
        // column-major chunk writes whole cache lines.
        const BLOCK: usize = 8;
        let mut group: [&[f32]; BLOCK] = [&[]; BLOCK];
        let mut grouped = 0;
        for (r, row) in rows.chunks_exact(d).enumerate() {
            if mask.is_some_and(|mask| !mask[r]) {
                continue;
            }
            group[grouped] = row;
            grouped += 1;
            if grouped == BLOCK || self.filled + grouped == capacity {
                self.stage(&group[..grouped]);
                grouped = 0;
            }
        }
        self.stage(&group[..grouped]);
        // Rows of one call are never carried into the next: the result of a call sequence
        // depends only on the calls themselves, and `H` is complete between calls.
        self.flush();
    }

    /// Copies rows (f32 → f64) into the chunk, flushing it when full.
    fn stage(&mut self, group: &[&[f32]]) {
        if group.is_empty() {
            return;
        }
        let at = self.filled;
        for j in 0..self.d {
            let column = &mut self.chunk.col_as_slice_mut(j)[at..at + group.len()];
            for (dst, row) in column.iter_mut().zip(group) {
                *dst = f64::from(row[j]);
            }
        }
        self.filled += group.len();
        self.tokens += group.len() as u64;
        if self.filled == self.chunk.nrows() {
            self.flush();
        }
    }

    /// `H += X_cᵀ X_c` for the buffered chunk, lower triangle only.
    fn flush(&mut self) {
        if self.filled == 0 {
            return;
        }
        // X_c (c × d, column-major): the reduction dimension is contiguous in both operands,
        // which is the fastest layout for faer's kernel here (~1.4× over Xᵀ stored d × c).
        let x = self.chunk.as_ref().subrows(0, self.filled);
        triangular_matmul(
            self.h.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Add,
            x.transpose(),
            BlockStructure::Rectangular,
            x,
            BlockStructure::Rectangular,
            1.0,
            faer::get_global_parallelism(),
        );
        self.filled = 0;
    }

    /// Adds `G = Σ xᵀx` of `tokens` rows computed elsewhere (row-major `d × d`, float32 or f64,
    /// symmetric up to rounding: its lower triangle is taken), in f64.
    ///
    /// # Panics
    /// If `gram` does not have `d × d` values.
    pub fn add_gram<T: Copy + Into<f64>>(&mut self, gram: &[T], tokens: u64) {
        let d = self.d;
        assert_eq!(gram.len(), d * d, "Covariance::add_gram: {} values for width {d}", gram.len());
        for j in 0..d {
            // Row j of G from column j on is column j of its lower triangle (G is symmetric).
            let src = &gram[j * d + j..(j + 1) * d];
            let dst = &mut self.h.col_as_slice_mut(j)[j..];
            for (a, &b) in dst.iter_mut().zip(src) {
                *a += b.into();
            }
        }
        self.tokens += tokens;
    }

    /// Adds another accumulator's sums (e.g. one filled on another thread).
    ///
    /// # Panics
    /// If the widths differ.
    pub fn merge(&mut self, other: &Covariance) {
        assert_eq!(self.d, other.d, "Covariance::merge: widths differ");
        for j in 0..self.d {
            let dst = &mut self.h.col_as_slice_mut(j)[j..];
            let src = &other.h.col_as_slice(j)[j..];
            for (a, b) in dst.iter_mut().zip(src) {
                *a += *b;
            }
        }
        self.tokens += other.tokens;
    }

    /// Adds another accumulator's sums divided by their trace: every point that shares a basis
    /// weighs the same, whatever the norm of the stream there (it grows with depth).
    ///
    /// # Panics
    /// If the widths differ.
    pub fn merge_normalized(&mut self, other: &Covariance) {
        assert_eq!(self.d, other.d, "Covariance::merge_normalized: widths differ");
        let trace = other.trace();
        let scale = if trace > 0.0 { 1.0 / trace } else { 0.0 };
        for j in 0..self.d {
            let dst = &mut self.h.col_as_slice_mut(j)[j..];
            let src = &other.h.col_as_slice(j)[j..];
            for (a, b) in dst.iter_mut().zip(src) {
                *a += scale * *b;
            }
        }
        self.tokens += other.tokens;
    }

    /// `tr H`: the sum of the rows' squared norms.
    pub fn trace(&self) -> f64 {
        (0..self.d).map(|i| self.h[(i, i)]).sum()
    }

    /// The full symmetric `H` (d × d).
    pub fn matrix(&self) -> Mat<f64> {
        let h = self.h.as_ref();
        Mat::from_fn(self.d, self.d, |i, j| if i >= j { h[(i, j)] } else { h[(j, i)] })
    }

    /// [`Covariance::matrix`] without a copy: the lower triangle mirrored in place (a `d × d`
    /// f64 matrix is 0.97 GB at d = 11008, an MLP's width in LLaMA-2-7B).
    pub fn into_matrix(self) -> Mat<f64> {
        let mut h = self.h;
        for j in 0..self.d {
            for i in 0..j {
                h[(i, j)] = h[(j, i)];
            }
        }
        h
    }
}

/// An orthogonal basis of a stream point: principal directions by decreasing eigenvalue.
#[derive(Debug, Clone, PartialEq)]
pub struct Basis {
    /// d × d orthogonal; column j is the j-th principal direction.
    pub q: Mat<f64>,
    /// Eigenvalues of the damped `H`, decreasing; `eigenvalues[j]` belongs to column j of `q`.
    pub eigenvalues: Vec<f64>,
}

impl Basis {
    pub fn d(&self) -> usize {
        self.q.nrows()
    }

    /// The first `k` columns of `q` (d × k).
    ///
    /// # Panics
    /// If `k > d`.
    pub fn columns(&self, k: usize) -> Mat<f64> {
        assert!(k <= self.d(), "Basis::columns: k = {k} > d = {}", self.d());
        self.q.as_ref().subcols(0, k).to_owned()
    }
}

fn pca_error(message: String) -> Error {
    Error::Tensor { tensor: "PCA covariance H".to_string(), message }
}

/// Eigendecomposition of `H + damping · mean(diag H) · I`, eigenvectors by decreasing eigenvalue,
/// each with its largest-magnitude entry positive.
pub fn principal_basis(cov: &Covariance, damping: f64) -> Result<Basis> {
    let d = cov.d;
    if cov.tokens == 0 {
        return Err(pca_error(format!("no calibration tokens were accumulated (d = {d})")));
    }
    if !(damping.is_finite() && damping >= 0.0) {
        return Err(pca_error(format!("damping must be finite and non-negative, got {damping}")));
    }
    let mut h = cov.matrix();
    if let Some((i, j)) = first_non_finite(h.as_ref()) {
        return Err(pca_error(format!(
            "non-finite value H[{i},{j}] = {} after {} tokens: the activations contain NaN or Inf, or overflow f64",
            h[(i, j)],
            cov.tokens
        )));
    }
    let mean_diag = (0..d).map(|i| h[(i, i)]).sum::<f64>() / d as f64;
    let damp = damping * mean_diag;
    for i in 0..d {
        h[(i, i)] += damp;
    }
    let evd = h
        .as_ref()
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| pca_error(format!("eigendecomposition failed ({e:?}), d = {d}")))?;
    let (u, s) = (evd.U(), evd.S().column_vector());

    // faer returns ascending eigenvalues; order by decreasing value, ties by decreasing original
    // index (= plain reversal of an ascending list, as the reference does).
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(b.cmp(&a)));
    let eigenvalues: Vec<f64> = order.iter().map(|&j| s[j]).collect();
    let mut q = Mat::from_fn(d, d, |i, j| u[(i, order[j])]);
    for j in 0..d {
        let column = q.col_as_slice_mut(j);
        let mut pivot = 0;
        for (i, v) in column.iter().enumerate() {
            if v.abs() > column[pivot].abs() {
                pivot = i;
            }
        }
        if column[pivot] < 0.0 {
            column.iter_mut().for_each(|v| *v = -*v);
        }
    }
    if eigenvalues.iter().any(|v| !v.is_finite()) || first_non_finite(q.as_ref()).is_some() {
        return Err(pca_error(format!("eigendecomposition produced non-finite values, d = {d}")));
    }
    Ok(Basis { q, eigenvalues })
}

fn first_non_finite(m: MatRef<'_, f64>) -> Option<(usize, usize)> {
    for j in 0..m.ncols() {
        for i in 0..m.nrows() {
            if !m[(i, j)].is_finite() {
                return Some((i, j));
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Saved rotations: safetensors, per point p: `q.{p}` F64 [d, d] (row-major, q[i][j]),
// `eigenvalues.{p}` F64 [d]; metadata `k.{p}` = k kept, `points` = JSON list of the point names in
// order, `format` = FORMAT.

const FORMAT: &str = "onnx-slice rotations v1";

/// An f64 tensor serialized on demand (one tensor's bytes in memory at a time).
struct F64View<'a> {
    shape: Vec<usize>,
    source: F64Source<'a>,
}

enum F64Source<'a> {
    /// Written row-major.
    Matrix(MatRef<'a, f64>),
    Vector(&'a [f64]),
}

impl View for F64View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F64
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let mut bytes = Vec::with_capacity(self.data_len());
        match &self.source {
            F64Source::Matrix(m) => {
                for i in 0..m.nrows() {
                    for j in 0..m.ncols() {
                        bytes.extend_from_slice(&m[(i, j)].to_le_bytes());
                    }
                }
            }
            F64Source::Vector(v) => {
                v.iter().for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()))
            }
        }
        bytes.into()
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 8
    }
}

/// Writes the bases of several stream points (name, basis, k kept) to one safetensors file,
/// atomically (a temporary file in the same directory, then rename).
pub fn save_rotations(path: impl AsRef<Path>, points: &[(String, &Basis, usize)]) -> Result<()> {
    let path = path.as_ref();
    let refuse = |message: String| Error::Save { output: path.to_path_buf(), message };
    let mut seen = HashSet::new();
    let mut tensors = Vec::with_capacity(2 * points.len());
    let mut metadata = HashMap::new();
    for (name, basis, k) in points {
        let d = basis.d();
        if name.is_empty() || !seen.insert(name.as_str()) {
            return Err(refuse(format!("point name '{name}' is empty or repeated")));
        }
        if basis.q.ncols() != d || basis.eigenvalues.len() != d {
            return Err(refuse(format!("point '{name}': basis is not d × d with d eigenvalues")));
        }
        if *k > d {
            return Err(refuse(format!("point '{name}': k = {k} exceeds d = {d}")));
        }
        tensors.push((
            format!("q.{name}"),
            F64View { shape: vec![d, d], source: F64Source::Matrix(basis.q.as_ref()) },
        ));
        tensors.push((
            format!("eigenvalues.{name}"),
            F64View { shape: vec![d], source: F64Source::Vector(&basis.eigenvalues) },
        ));
        metadata.insert(format!("k.{name}"), k.to_string());
    }
    let names: Vec<&str> = points.iter().map(|(n, _, _)| n.as_str()).collect();
    metadata
        .insert("points".to_string(), serde_json::to_string(&names).expect("strings serialize"));
    metadata.insert("format".to_string(), FORMAT.to_string());

    let staged = crate::files::Staged::new(path)?;
    safetensors::serialize_to_file(tensors, Some(metadata), staged.temporary_path())
        .map_err(|e| refuse(e.to_string()))?;
    staged.commit()
}

/// Reads a file written by [`save_rotations`]: (name, basis, k) per point, in the saved order.
pub fn load_rotations(path: impl AsRef<Path>) -> Result<Vec<(String, Basis, usize)>> {
    let path = path.as_ref();
    let bad = |message: String| Error::Tensor { tensor: path.display().to_string(), message };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only map of a file we do not modify; tensors are copied out before returning.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (_, header) = SafeTensors::read_metadata(&map)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let tensors =
        SafeTensors::deserialize(&map).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    if metadata.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad(format!(
            "not an onnx-slice rotations file (format {:?})",
            metadata.get("format")
        )));
    }
    let names: Vec<String> =
        serde_json::from_str(metadata.get("points").map(String::as_str).unwrap_or(""))
            .map_err(|e| bad(format!("metadata 'points': {e}")))?;
    let read_f64 = |name: &str, shape: &[usize]| -> Result<Vec<f64>> {
        let view = tensors.tensor(name).map_err(|e| bad(format!("tensor '{name}': {e}")))?;
        if view.dtype() != Dtype::F64 || view.shape() != shape {
            return Err(bad(format!(
                "tensor '{name}': expected F64 {shape:?}, found {:?} {:?}",
                view.dtype(),
                view.shape()
            )));
        }
        Ok(view
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect())
    };
    let mut points = Vec::with_capacity(names.len());
    for name in names {
        let k: usize = metadata
            .get(&format!("k.{name}"))
            .and_then(|k| k.parse().ok())
            .ok_or_else(|| bad(format!("metadata 'k.{name}' missing or not a number")))?;
        let eigen_name = format!("eigenvalues.{name}");
        let d = tensors
            .tensor(&eigen_name)
            .map_err(|e| bad(format!("tensor '{eigen_name}': {e}")))?
            .shape()
            .first()
            .copied()
            .unwrap_or(0);
        let eigenvalues = read_f64(&eigen_name, &[d])?;
        let q = read_f64(&format!("q.{name}"), &[d, d])?;
        if k > d {
            return Err(bad(format!("point '{name}': k = {k} exceeds d = {d}")));
        }
        let q = Mat::from_fn(d, d, |i, j| q[i * d + j]);
        points.push((name, Basis { q, eigenvalues }, k));
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Anisotropic: column c scaled by (1 + c), plus a shared offset, like real activations.
        (0..n * d).map(|i| (rng.random::<f32>() * 2.0 - 1.0) * (1 + i % d) as f32 + 0.5).collect()
    }

    fn naive(rows: &[f32], d: usize, mask: Option<&[bool]>) -> (Mat<f64>, u64) {
        let mut h = Mat::<f64>::zeros(d, d);
        let mut tokens = 0;
        for (r, x) in rows.chunks_exact(d).enumerate() {
            if mask.is_some_and(|m| !m[r]) {
                continue;
            }
            tokens += 1;
            for i in 0..d {
                for j in 0..d {
                    h[(i, j)] += f64::from(x[i]) * f64::from(x[j]);
                }
            }
        }
        (h, tokens)
    }

    fn max_abs(m: MatRef<'_, f64>) -> f64 {
        let mut best = 0.0f64;
        for j in 0..m.ncols() {
            for i in 0..m.nrows() {
                best = best.max(m[(i, j)].abs());
            }
        }
        best
    }

    fn max_rel_diff(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> f64 {
        max_abs((a - b).as_ref()) / max_abs(b).max(f64::MIN_POSITIVE)
    }

    #[test]
    fn h_matches_naive_accumulation() {
        // n > one chunk at this d, so several flushes happen.
        let d = 24;
        let n = chunk_rows_for(d) + 777;
        let rows = random_rows(n, d, 1);
        let mut cov = Covariance::new(d);
        cov.add_rows(&rows, None);
        let (expected, tokens) = naive(&rows, d, None);
        assert_eq!(cov.tokens(), tokens);
        let rel = max_rel_diff(cov.matrix().as_ref(), expected.as_ref());
        assert!(rel < 1e-13, "relative difference {rel}");
        // Symmetric by construction.
        let h = cov.matrix();
        assert_eq!(max_abs((h.as_ref() - h.transpose()).as_ref()), 0.0);
    }

    #[test]
    fn h_matches_naive_accumulation_with_mask() {
        let d = 17;
        let n = 1500;
        let rows = random_rows(n, d, 2);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mask: Vec<bool> = (0..n).map(|_| rng.random::<f32>() < 0.7).collect();
        let mut cov = Covariance::new(d);
        cov.add_rows(&rows, Some(&mask));
        let (expected, tokens) = naive(&rows, d, Some(&mask));
        assert_eq!(cov.tokens(), tokens);
        assert!(tokens < n as u64 && tokens > 0);
        let rel = max_rel_diff(cov.matrix().as_ref(), expected.as_ref());
        assert!(rel < 1e-13, "relative difference {rel}");
        // Masked rows really are excluded: differs from the unmasked sum.
        let (all, _) = naive(&rows, d, None);
        assert!(max_rel_diff(cov.matrix().as_ref(), all.as_ref()) > 1e-3);
    }

    #[test]
    fn h_matches_naive_when_chunk_is_not_a_multiple_of_the_copy_block() {
        let d = 300;
        assert_ne!(chunk_rows_for(d) % 8, 0);
        let n = chunk_rows_for(d) * 3 / 2;
        let rows = random_rows(n, d, 11);
        let mask: Vec<bool> = (0..n).map(|r| r % 5 != 3).collect();
        let mut cov = Covariance::new(d);
        cov.add_rows(&rows, Some(&mask));
        let (expected, tokens) = naive(&rows, d, Some(&mask));
        assert_eq!(cov.tokens(), tokens);
        assert!(tokens > chunk_rows_for(d) as u64);
        let rel = max_rel_diff(cov.matrix().as_ref(), expected.as_ref());
        assert!(rel < 1e-13, "relative difference {rel}");
    }

    #[test]
    fn merge_equals_single_accumulation() {
        let d = 9;
        let rows = random_rows(600, d, 4);
        let (first, second) = rows.split_at(250 * d);
        let mut a = Covariance::new(d);
        a.add_rows(first, None);
        let mut b = Covariance::new(d);
        b.add_rows(second, None);
        a.merge(&b);
        let (expected, tokens) = naive(&rows, d, None);
        assert_eq!(a.tokens(), tokens);
        assert!(max_rel_diff(a.matrix().as_ref(), expected.as_ref()) < 1e-13);
    }

    /// Each merged accumulator counts as its H divided by its trace: a copy scaled by 1000
    /// weighs the same as the original.
    #[test]
    fn normalized_merge_weighs_each_accumulator_by_its_trace() {
        let d = 5;
        let rows = random_rows(200, d, 6);
        let loud: Vec<f32> = rows.iter().map(|x| x * 1000.0f32.sqrt()).collect();
        let (mut quiet_h, mut loud_h) = (Covariance::new(d), Covariance::new(d));
        quiet_h.add_rows(&rows, None);
        loud_h.add_rows(&loud, None);
        let mut sum = Covariance::new(d);
        sum.merge_normalized(&quiet_h);
        sum.merge_normalized(&loud_h);
        let (h, _) = naive(&rows, d, None);
        let trace: f64 = (0..d).map(|i| h[(i, i)]).sum();
        let expected = Mat::from_fn(d, d, |i, j| 2.0 * h[(i, j)] / trace);
        assert_eq!(sum.tokens(), 400);
        assert!(max_rel_diff(sum.matrix().as_ref(), expected.as_ref()) < 1e-6);
    }

    #[test]
    fn basis_is_orthogonal_and_diagonalizes_damped_h() {
        let d = 64;
        let rows = random_rows(3000, d, 5);
        let mut cov = Covariance::new(d);
        cov.add_rows(&rows, None);
        let basis = principal_basis(&cov, DEFAULT_DAMPING).unwrap();
        let q = basis.q.as_ref();
        assert_eq!((q.nrows(), q.ncols(), basis.eigenvalues.len()), (d, d, d));

        let qtq = q.transpose() * q;
        let err = max_abs((qtq.as_ref() - Mat::<f64>::identity(d, d)).as_ref());
        assert!(err < 1e-10, "QᵀQ − I = {err}");

        let mut h = cov.matrix();
        let mean = (0..d).map(|i| h[(i, i)]).sum::<f64>() / d as f64;
        for i in 0..d {
            h[(i, i)] += DEFAULT_DAMPING * mean;
        }
        let hq = &h * q;
        let ql = Mat::from_fn(d, d, |i, j| q[(i, j)] * basis.eigenvalues[j]);
        let rel = max_rel_diff(hq.as_ref(), ql.as_ref());
        assert!(rel < 1e-9, "H Q vs Q Λ relative {rel}");

        assert!(basis.eigenvalues.windows(2).all(|w| w[0] >= w[1]), "eigenvalues not decreasing");
        assert!(basis.eigenvalues[d - 1] > 0.0);
        // Sign convention.
        for j in 0..d {
            let col = basis.q.col_as_slice(j);
            let pivot =
                col.iter().copied().fold(0.0f64, |m, v| if v.abs() > m.abs() { v } else { m });
            assert!(pivot > 0.0, "column {j}: largest-magnitude entry is negative");
        }
        assert_eq!(basis.columns(5).ncols(), 5);
        assert_eq!(basis.columns(5).as_ref(), basis.q.as_ref().subcols(0, 5));
    }

    #[test]
    fn damping_shifts_eigenvalues_by_damping_times_mean_diagonal() {
        let d = 32;
        let rows = random_rows(500, d, 6);
        let mut cov = Covariance::new(d);
        cov.add_rows(&rows, None);
        let plain = principal_basis(&cov, 0.0).unwrap();
        let damped = principal_basis(&cov, 0.05).unwrap();
        let h = cov.matrix();
        let shift = 0.05 * (0..d).map(|i| h[(i, i)]).sum::<f64>() / d as f64;
        let scale = plain.eigenvalues[0];
        for (a, b) in plain.eigenvalues.iter().zip(&damped.eigenvalues) {
            assert!(((b - a) - shift).abs() <= 1e-12 * scale, "shift {} expected {shift}", b - a);
        }
    }

    #[test]
    fn low_rank_data_is_spanned_by_leading_columns() {
        let (d, r, n) = (16, 3, 400);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let generators: Vec<Vec<f32>> =
            (0..r).map(|_| (0..d).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()).collect();
        let mut rows = Vec::with_capacity(n * d);
        for _ in 0..n {
            let c: Vec<f32> = (0..r).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect();
            rows.extend((0..d).map(|i| (0..r).map(|g| c[g] * generators[g][i]).sum::<f32>()));
        }
        let mut cov = Covariance::new(d);
        cov.add_rows(&rows, None);
        let basis = principal_basis(&cov, DEFAULT_DAMPING).unwrap();
        let p = basis.columns(r);
        let mut worst = 0.0f64;
        for x in rows.chunks_exact(d) {
            let x = Mat::from_fn(d, 1, |i, _| f64::from(x[i]));
            let residual = &x - &p * (p.transpose() * &x);
            let norm = max_abs(x.as_ref());
            worst = worst.max(max_abs(residual.as_ref()) / norm);
        }
        // f32 data: the subspace holds to f32 rounding of the rows.
        assert!(worst < 1e-5, "projection residual {worst}");
        // The remaining eigenvalues are only the damping.
        let damp = basis.eigenvalues[d - 1];
        assert!(basis.eigenvalues[r] - damp < 1e-6 * basis.eigenvalues[0]);
        assert!(basis.eigenvalues[r - 1] > 10.0 * damp);
    }

    #[test]
    fn deterministic_bits_and_chunking_independent() {
        let d = 96;
        let n = 3 * chunk_rows_for(d) + 123;
        let rows = random_rows(n, d, 8);
        let run = || {
            let mut cov = Covariance::new(d);
            cov.add_rows(&rows, None);
            (cov.matrix(), principal_basis(&cov, DEFAULT_DAMPING).unwrap())
        };
        let (h1, b1) = run();
        let (h2, b2) = run();
        let bits = |m: &Mat<f64>| {
            m.col_iter()
                .flat_map(|c| c.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
                .collect::<Vec<u64>>()
        };
        assert_eq!(bits(&h1), bits(&h2));
        assert_eq!(bits(&b1.q), bits(&b2.q));
        assert_eq!(
            b1.eigenvalues.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b2.eigenvalues.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );

        // The same rows fed in irregular pieces.
        let mut cov = Covariance::new(d);
        let mut start = 0;
        for (i, piece) in [1usize, 7, 300, 5000, 2, 64].iter().cycle().enumerate() {
            if start == n {
                break;
            }
            let end = (start + piece + i).min(n);
            cov.add_rows(&rows[start * d..end * d], None);
            start = end;
        }
        assert_eq!(cov.tokens(), n as u64);
        let rel = max_rel_diff(cov.matrix().as_ref(), h1.as_ref());
        assert!(rel < 1e-12, "chunking changed H by {rel}");
    }

    #[test]
    fn errors_on_no_tokens_and_non_finite() {
        let mut cov = Covariance::new(4);
        assert!(principal_basis(&cov, DEFAULT_DAMPING).is_err());
        cov.add_rows(&[1.0, 2.0, 3.0, 4.0], Some(&[false]));
        assert_eq!(cov.tokens(), 0);
        assert!(principal_basis(&cov, DEFAULT_DAMPING).is_err());
        cov.add_rows(&[1.0, f32::NAN, 3.0, 4.0], None);
        let err = principal_basis(&cov, DEFAULT_DAMPING).unwrap_err().to_string();
        assert!(err.contains("non-finite"), "{err}");
        let mut cov = Covariance::new(2);
        cov.add_rows(&[f32::INFINITY, 0.0], None);
        assert!(principal_basis(&cov, DEFAULT_DAMPING).is_err());
        let mut cov = Covariance::new(2);
        cov.add_rows(&[1.0, 0.0], None);
        assert!(principal_basis(&cov, f64::NAN).is_err());
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rotations.safetensors");
        let make = |d: usize, seed: u64| {
            let mut cov = Covariance::new(d);
            cov.add_rows(&random_rows(200, d, seed), None);
            principal_basis(&cov, DEFAULT_DAMPING).unwrap()
        };
        let (a, b) = (make(12, 9), make(20, 10));
        let points =
            vec![("block.0.input".to_string(), &a, 8), ("block.0.mid".to_string(), &b, 16)];
        save_rotations(&path, &points).unwrap();
        // Overwrite atomically with the same content; no temporary left behind.
        save_rotations(&path, &points).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let loaded = load_rotations(&path).unwrap();
        assert_eq!(loaded.len(), 2);
        for ((name, basis, k), (lname, lbasis, lk)) in points.iter().zip(&loaded) {
            assert_eq!(name, lname);
            assert_eq!(k, lk);
            assert_eq!(*basis, lbasis); // exact: stored as f64
        }
        // Refusals.
        assert!(save_rotations(&path, &[("x".to_string(), &a, 13)]).is_err());
        assert!(
            save_rotations(&path, &[("x".to_string(), &a, 1), ("x".to_string(), &b, 1)]).is_err()
        );
        assert_eq!(
            load_rotations(&path).unwrap().len(),
            2,
            "a refused save must leave the file intact"
        );
    }
}
