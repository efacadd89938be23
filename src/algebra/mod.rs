//! SliceGPT's weight arithmetic (docs/design.md §1): folding norm parameters, centring the stream,
//! rotating and slicing readers and writers, shortcuts, and the element type of created tensors.
//! Used by `fuse` and `rotate`; [`random_orthogonal`] serves `transform`'s random orientation.
//!
//! ONNX conventions: activations are row vectors, a linear layer is `y = x W + b` with the logical
//! weight `W` of shape `[in, out]`, stored either as is ([`WeightLayout::InOut`]: MatMul B, Gemm
//! transB=0) or transposed ([`WeightLayout::OutIn`]: Gemm transB=1). `Q` is `D × k` with
//! orthonormal columns (the first k columns of an orthogonal matrix); k = D rotates, k < D also
//! slices.
//!
//! | stream role | function | formula (logical `[in, out]`) | result |
//! |---|---|---|---|
//! | reader of the stream | [`rotate_reader`] | `W ← Qᵀ W` | in-width k |
//! | writer of the stream | [`rotate_writer`], [`rotate_bias`] | `W ← W Q`, `b ← b Q` | out-width k |
//! | embedding table `[V, D]` | [`rotate_table`] | `E ← E Q` | `[V, k]` |
//! | skip path from a to b | [`shortcut`] | `S = Q_aᵀ Q_b` | `k_a × k_b` |
//!
//! Arithmetic is done in f64, except the products that rotate float16 and bfloat16 weights, which
//! run in f32 ([`Precision`]: once rounded to the weight's type, within one unit in the last place
//! of the f64 result, and twice as fast). Results are written back in the input's float type:
//! float32, float16, bfloat16 and float64 tensors keep their type (each result is rounded once);
//! any other type is an error. Tensors the rewrite creates ([`mat_to_tensor`],
//! [`scalar_to_tensor`]) get the element type [`created_dtype`] decides: the stream's.
//! A transformed tensor keeps its input's name (it replaces it); inputs are never modified.
//!
//! Large tensors (a `[V, D]` embedding table, a `[D, V]` head) are processed in slices of rows or
//! columns (`chunked`); the matrix products use faer with the global parallelism
//! ([`faer::get_global_parallelism`]).
mod chunked;
mod random;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef};
pub use random::random_orthogonal;

use crate::error::Result;
use crate::graph::{DataType, Graph, Tensor};
use crate::structure::{Layout, WeightLayout};
use chunked::{
    check_width, left_multiply, map_rows, matrix_dims, right_multiply, subtract_mean, vector_len,
    Element, Out, Values,
};

// ---------------------------------------------------------------------------------------------
// Shortcuts and created tensors

/// The residual-path rotation `S = Q_fromᵀ Q_to` (`k_from × k_to`): it maps the stream in basis
/// `Q_from` to basis `Q_to` (`(x Q_from) S = x Q_to` when `Q_from` is square).
///
/// # Panics
/// If the two bases do not have the same number of rows (stream width D).
pub fn shortcut(q_from: MatRef<'_, f64>, q_to: MatRef<'_, f64>) -> Mat<f64> {
    assert_eq!(
        q_from.nrows(),
        q_to.nrows(),
        "shortcut: the two bases have different stream widths"
    );
    let mut s = Mat::<f64>::zeros(q_from.ncols(), q_to.ncols());
    matmul(
        s.as_mut(),
        Accum::Replace,
        q_from.transpose(),
        q_to,
        1.0,
        faer::get_global_parallelism(),
    );
    s
}

/// An orthogonal `D × D` basis whose first `k` columns are `q` (`D × k`, orthonormal columns)
/// exactly, and whose other columns span the complement of `q`'s columns. Used as the basis of an
/// unsliced point after a sliced one: the skip between them is then `qᵀ [q N] = [I 0]`, a zero
/// extension of the stream rather than a product.
pub fn complete_basis(q: MatRef<'_, f64>) -> Mat<f64> {
    let (d, k) = (q.nrows(), q.ncols());
    // The Householder QR of q: its full Q's last d - k columns are orthonormal and orthogonal to
    // q's column space (to rounding), whatever the signs of its first k columns.
    let full = q.qr().compute_Q();
    Mat::from_fn(d, d, |i, j| if j < k { q[(i, j)] } else { full[(i, j)] })
}

/// The one rule for the element type of every float tensor the rewrite creates (shortcut and
/// projection matrices, norm constants): the residual stream's, which is the token embedding
/// table's. A float16 or bfloat16 model stays so (half the bytes of float32, and a MatMul of a
/// float16 stream by a float32 matrix does not type-check); float64 stays float64; anything else
/// is float32.
///
/// Size predictions count created tensors with this rule too, so that they stay exact.
pub fn created_dtype(stream: DataType) -> DataType {
    Out::result_dtype(stream)
}

/// The residual stream's element type: the token embedding table's (float32 when there is none).
pub fn stream_dtype(graph: &Graph, layout: &Layout) -> DataType {
    layout
        .embeddings
        .first()
        .and_then(|e| graph.initializer(&e.table))
        .map_or(DataType::Float, |t| t.dtype)
}

/// The element type in which a norm sums squares over a stream of type `stream`: float16 and
/// bfloat16 become float32 (a float16 sum of D squares passes 65504 once the stream's RMS passes
/// 256/√D: 4 at D = 4096, far below what real models carry), the others stay.
pub fn accumulation_dtype(stream: DataType) -> DataType {
    match stream {
        DataType::Float16 | DataType::Bfloat16 => DataType::Float,
        other => Out::result_dtype(other),
    }
}

/// A matrix as a tensor `[rows, cols]` (row-major, as ONNX stores it) of the float type `dtype`
/// (rounded once from f64); see [`created_dtype`].
pub fn mat_to_tensor(name: impl Into<String>, m: MatRef<'_, f64>, dtype: DataType) -> Tensor {
    let mut out = Out::new(dtype, m.nrows() * m.ncols());
    let mut row = vec![0.0; m.ncols()];
    for i in 0..m.nrows() {
        row.iter_mut().zip(m.row(i).iter()).for_each(|(r, &v)| *r = v);
        out.write(i * m.ncols(), &row);
    }
    out.into_tensor(name, vec![m.nrows() as i64, m.ncols() as i64])
}

/// A scalar (dims `[]`) of the float type `dtype`.
pub fn scalar_to_tensor(name: impl Into<String>, value: f64, dtype: DataType) -> Tensor {
    let mut out = Out::new(dtype, 1);
    out.write(0, &[value]);
    out.into_tensor(name, vec![])
}

/// A 1-D tensor of `len` copies of `value` in the float type `dtype`.
pub fn filled_vector(name: impl Into<String>, value: f64, len: usize, dtype: DataType) -> Tensor {
    let mut out = Out::new(dtype, len);
    out.write(0, &vec![value; len]);
    out.into_tensor(name, vec![len as i64])
}

// ---------------------------------------------------------------------------------------------
// Folding norms, centring

/// Folds a norm's scale into a linear layer that reads the norm's output: `W ← diag(γ) W`
/// (row i of the logical `[in, out]` weight times `γ_i`).
pub fn fold_norm_scale(weight: &Tensor, layout: WeightLayout, gamma: &[f32]) -> Result<Tensor> {
    let (rows, cols) = matrix_dims(weight)?;
    let in_width = if layout == WeightLayout::InOut { rows } else { cols };
    check_width(weight, "in-width", in_width, "γ", gamma.len())?;
    let gamma: Vec<f64> = gamma.iter().map(|&g| g as f64).collect();
    let src = Values::of(weight)?;
    let mut out = Out::new(weight.dtype, rows * cols);
    map_rows(
        &src,
        rows,
        cols,
        |r, row| match layout {
            WeightLayout::InOut => row.iter_mut().for_each(|x| *x *= gamma[r]),
            WeightLayout::OutIn => row.iter_mut().zip(&gamma).for_each(|(x, g)| *x *= g),
        },
        |start, v| out.write(start, v),
    );
    out.replace(weight, weight.dims.clone())
}

/// Folds a norm's shift into a linear layer that reads the norm's output: `b ← b + β W`, with the
/// weight as it was BEFORE [`fold_norm_scale`] (`β W_orig`). Returns the new bias, of length out:
/// `bias` updated (keeping its name, dims and type), or, when the layer has none, a new 1-D bias
/// named `<weight>.folded_bias` in the weight's float type (rename it as the graph requires).
pub fn fold_norm_shift(
    weight: &Tensor,
    layout: WeightLayout,
    beta: &[f32],
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (rows, cols) = matrix_dims(weight)?;
    let (in_width, out_width) = match layout {
        WeightLayout::InOut => (rows, cols),
        WeightLayout::OutIn => (cols, rows),
    };
    check_width(weight, "in-width", in_width, "β", beta.len())?;
    let beta: Vec<f64> = beta.iter().map(|&b| b as f64).collect();
    let src = Values::of(weight)?;
    let mut shift = vec![0.0; out_width];
    let mut sink = |start: usize, v: &[f64]| shift[start..start + v.len()].copy_from_slice(v);
    match layout {
        // β (1 × in) · W (in × out)
        WeightLayout::InOut => left_multiply(
            MatRef::from_row_major_slice(&beta, 1, in_width),
            &src,
            rows,
            cols,
            &mut sink,
        ),
        // stored [out, in] · β (in × 1)
        WeightLayout::OutIn => right_multiply(
            &src,
            rows,
            cols,
            MatRef::from_column_major_slice(&beta, in_width, 1),
            &mut sink,
        ),
    }
    match bias {
        Some(bias) => {
            let n = vector_len(bias)?;
            check_width(bias, "length", n, "the weight's out-width", out_width)?;
            let mut b = vec![0.0f64; n];
            Values::of(bias)?.read(0, &mut b);
            b.iter_mut().zip(&shift).for_each(|(b, s)| *b += s);
            let mut out = Out::new(bias.dtype, n);
            out.write(0, &b);
            out.replace(bias, bias.dims.clone())
        }
        None => {
            let mut out = Out::new(weight.dtype, out_width);
            out.write(0, &shift);
            Ok(out.into_tensor(format!("{}.folded_bias", weight.name), vec![out_width as i64]))
        }
    }
}

/// Makes a writer's output zero-mean over the stream: `W ← W M`, `M = I − (1/D) 1 1ᵀ` on the out
/// axis (for `[in, out]`: each row minus its mean; for `[out, in]`: each column minus its mean).
pub fn center_out_axis(weight: &Tensor, layout: WeightLayout) -> Result<Tensor> {
    let (rows, cols) = matrix_dims(weight)?;
    let src = Values::of(weight)?;
    let mut out = Out::new(weight.dtype, rows * cols);
    match layout {
        WeightLayout::InOut => {
            map_rows(&src, rows, cols, |_, row| subtract_mean(row), |s, v| out.write(s, v))
        }
        WeightLayout::OutIn => {
            let mut mean = vec![0.0; cols];
            map_rows(
                &src,
                rows,
                cols,
                |_, row| mean.iter_mut().zip(row.iter()).for_each(|(m, x)| *m += x),
                |_, _| {},
            );
            mean.iter_mut().for_each(|m| *m /= rows as f64);
            map_rows(
                &src,
                rows,
                cols,
                |_, row| row.iter_mut().zip(&mean).for_each(|(x, m)| *x -= m),
                |s, v| out.write(s, v),
            );
        }
    }
    out.replace(weight, weight.dims.clone())
}

/// A writer's bias, made zero-mean: `b ← b − mean(b)` (= `b M`).
pub fn center_bias(bias: &Tensor) -> Result<Tensor> {
    let n = vector_len(bias)?;
    let mut b = vec![0.0f64; n];
    Values::of(bias)?.read(0, &mut b);
    subtract_mean(&mut b);
    let mut out = Out::new(bias.dtype, n);
    out.write(0, &b);
    out.replace(bias, bias.dims.clone())
}

/// An embedding table `[V, D]` made zero-mean over the stream: `E ← E M` (each row minus its mean).
pub fn center_rows(table: &Tensor) -> Result<Tensor> {
    center_out_axis(table, WeightLayout::InOut)
}

// ---------------------------------------------------------------------------------------------
// Rotating and slicing

/// The arithmetic a weight's rotation runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F64,
    F32,
}

impl Precision {
    /// The rule: float16 and bfloat16 weights are rotated in f32, all others in f64.
    ///
    /// Each element of a product sums D terms. In f32 its rounding error grows like √D · 2⁻²⁴ of
    /// the terms' scale (4 · 10⁻⁶ at D = 4096), a hundredth of float16's rounding step (2⁻¹¹) and
    /// less against bfloat16's (2⁻⁸), and the result is then rounded to that type: in rare
    /// elements it differs from the f64 product's rounding by one unit in the last place (more
    /// only for results near zero, by less than f32's error; tests).
    /// f32 products run about twice as fast (`bench/rotate_bench.rs`); on a float16 7B model
    /// the rotation is most of the run. float32 weights keep f64: f32 products would add error
    /// of their own size.
    pub fn for_weights(dtype: DataType) -> Self {
        match dtype {
            DataType::Float16 | DataType::Bfloat16 => Precision::F32,
            _ => Precision::F64,
        }
    }
}

/// `q` as f32, for [`Precision::F32`] products.
fn narrowed(q: MatRef<'_, f64>) -> Mat<f32> {
    Mat::from_fn(q.nrows(), q.ncols(), |i, j| q[(i, j)] as f32)
}

/// A reader of the stream in basis `Q` (`D × k`): `W ← Qᵀ W` over the in axis. `[in, out]` gives
/// `[k, out]`, `[out, in]` gives `[out, k]`. With `(x Q)` as input the output is unchanged when
/// k = D; with k < D this is the reader's share of slicing. Computed in
/// [`Precision::for_weights`].
pub fn rotate_reader(weight: &Tensor, layout: WeightLayout, q: MatRef<'_, f64>) -> Result<Tensor> {
    rotate_in(Precision::for_weights(weight.dtype), Side::Reader, weight, layout, q)
}

/// A writer of the stream in basis `Q` (`D × k`): `W ← W Q` over the out axis. `[in, out]` gives
/// `[in, k]`, `[out, in]` gives `[k, in]`. Pair with [`rotate_bias`] for its bias. Computed in
/// [`Precision::for_weights`].
pub fn rotate_writer(weight: &Tensor, layout: WeightLayout, q: MatRef<'_, f64>) -> Result<Tensor> {
    rotate_in(Precision::for_weights(weight.dtype), Side::Writer, weight, layout, q)
}

/// Which side of the stream a weight is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Reader,
    Writer,
}

/// [`rotate_reader`] or [`rotate_writer`] in a given precision.
pub fn rotate_in(
    precision: Precision,
    side: Side,
    weight: &Tensor,
    layout: WeightLayout,
    q: MatRef<'_, f64>,
) -> Result<Tensor> {
    let axis = match (side, layout) {
        (Side::Reader, WeightLayout::InOut) | (Side::Writer, WeightLayout::OutIn) => {
            StoredAxis::Rows
        }
        (Side::Reader, WeightLayout::OutIn) | (Side::Writer, WeightLayout::InOut) => {
            StoredAxis::Cols
        }
    };
    let width = match side {
        Side::Reader => "in-width",
        Side::Writer => "out-width",
    };
    match precision {
        Precision::F64 => stored_axis_product(weight, axis, width, q),
        Precision::F32 => stored_axis_product(weight, axis, width, narrowed(q).as_ref()),
    }
}

/// The axis of a stored `[rows, cols]` matrix that runs along the stream.
#[derive(Clone, Copy)]
enum StoredAxis {
    Rows,
    Cols,
}

/// The stored matrix with its stream axis in basis `Q`: `Qᵀ S` (rows) or `S Q` (columns), that
/// axis becoming k wide. A reader's in axis and a writer's out axis are both this.
fn stored_axis_product<T: Element>(
    weight: &Tensor,
    axis: StoredAxis,
    width: &str,
    q: MatRef<'_, T>,
) -> Result<Tensor> {
    let (rows, cols) = matrix_dims(weight)?;
    let src = Values::of(weight)?;
    let k = q.ncols();
    match axis {
        StoredAxis::Rows => {
            check_width(weight, width, rows, "the rotation's rows", q.nrows())?;
            let mut out = Out::new(weight.dtype, k * cols);
            left_multiply(q.transpose(), &src, rows, cols, |s, v| out.write(s, v));
            out.replace(weight, vec![k as i64, cols as i64])
        }
        StoredAxis::Cols => {
            check_width(weight, width, cols, "the rotation's rows", q.nrows())?;
            let mut out = Out::new(weight.dtype, rows * k);
            right_multiply(&src, rows, cols, q, |s, v| out.write(s, v));
            out.replace(weight, vec![rows as i64, k as i64])
        }
    }
}

/// A writer's bias in basis `Q`: `b ← b Q` (length D → k; a `[1, D]` bias becomes `[1, k]`).
pub fn rotate_bias(bias: &Tensor, q: MatRef<'_, f64>) -> Result<Tensor> {
    let n = vector_len(bias)?;
    check_width(bias, "length", n, "the rotation's rows", q.nrows())?;
    let src = Values::of(bias)?;
    let k = q.ncols();
    let mut out = Out::new(bias.dtype, k);
    right_multiply(&src, 1, n, q, |s, v| out.write(s, v));
    let mut dims = bias.dims.clone();
    *dims.last_mut().expect("vector_len checked the rank") = k as i64;
    out.replace(bias, dims)
}

/// An embedding table `[V, D]` in basis `Q`: `E ← E Q` (`[V, k]`); the table is a writer `[in, out]`.
pub fn rotate_table(table: &Tensor, q: MatRef<'_, f64>) -> Result<Tensor> {
    rotate_writer(table, WeightLayout::InOut, q)
}

#[cfg(test)]
mod tests;
