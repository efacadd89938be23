//! SliceGPT's weight arithmetic (docs/design.md §1): folding norm parameters, centring the stream,
//! rotating and slicing readers and writers, shortcuts, untying a tied head.
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
//! All arithmetic is done in f64. Results are written back in the input's float type: float32,
//! float16, bfloat16 and float64 tensors keep their type (a float16/bfloat16 result is rounded once,
//! from f64); any other type is an error. Tensors the rewrite creates ([`mat_to_tensor`],
//! [`scalar_to_tensor`]) get the element type [`created_dtype`] decides: the stream's.
//! A transformed tensor keeps its input's name (it replaces it); inputs are never modified.
//!
//! Large tensors (a `[V, D]` embedding table, an untied `[D, V]` head) are processed in slices of
//! rows or columns, read straight from the tensor's (possibly memory-mapped) bytes, so that besides
//! the output at most ~128 MiB of f64 scratch are alive; the matrix products use faer with the
//! global parallelism ([`faer::get_global_parallelism`]).
use std::borrow::Cow;

use bytes::Bytes;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef};
use half::{bf16, f16};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::graph::{DataType, Graph, Tensor, TensorData, TypedValues};
use crate::structure::{Layout, WeightLayout};

// ---------------------------------------------------------------------------------------------
// Orthogonal matrices

/// A Haar-distributed (uniformly random) `d × d` orthogonal matrix: `Q` of the QR factorisation of
/// a standard Gaussian matrix, with the signs fixed so that `R` has a positive diagonal.
///
/// Bit-identical for a given seed on every machine and thread count: the Gaussian entries come
/// from ChaCha8 (`seed_from_u64`) through the Marsaglia polar method with a portable logarithm,
/// and the Householder QR is this module's own, with a fixed order of operations per column (no
/// FMA, no platform libm; faer's QR is documented as non-portable across platforms).
/// Cost ≈ (8/3)·d³ flops on all cores: about a second at d = 1024, tens of seconds at d = 4096.
pub fn random_orthogonal(d: usize, seed: u64) -> Mat<f64> {
    let q = haar_orthogonal(d, seed, worker_threads());
    MatRef::from_column_major_slice(&q, d, d).to_owned()
}

/// The first `k` columns of `q` (an owned copy; `q.subcols(0, k)` is the same without copying).
///
/// # Panics
/// If `k` exceeds the number of columns.
pub fn orthonormal_columns(q: MatRef<'_, f64>, k: usize) -> Mat<f64> {
    assert!(k <= q.ncols(), "orthonormal_columns: k = {k} exceeds the {} columns of Q", q.ncols());
    q.subcols(0, k).to_owned()
}

/// The residual-path rotation `S = Q_fromᵀ Q_to` (`k_from × k_to`): it maps the stream in basis
/// `Q_from` to basis `Q_to` (`(x Q_from) S = x Q_to` when `Q_from` is square).
///
/// # Panics
/// If the two bases do not have the same number of rows (stream width D).
pub fn shortcut(q_from: MatRef<'_, f64>, q_to: MatRef<'_, f64>) -> Mat<f64> {
    assert_eq!(q_from.nrows(), q_to.nrows(), "shortcut: the two bases have different stream widths");
    let mut s = Mat::<f64>::zeros(q_from.ncols(), q_to.ncols());
    matmul(s.as_mut(), Accum::Replace, q_from.transpose(), q_to, 1.0, faer::get_global_parallelism());
    s
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
    layout.embeddings.first().and_then(|e| graph.initializer(&e.table)).map_or(DataType::Float, |t| t.dtype)
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
    Ok(out.replace(weight, weight.dims.clone()))
}

/// Folds a norm's shift into a linear layer that reads the norm's output: `b ← b + β W`, with the
/// weight as it was BEFORE [`fold_norm_scale`] (`β W_orig`). Returns the new bias, of length out:
/// `bias` updated (keeping its name, dims and type), or, when the layer has none, a new 1-D bias
/// named `<weight>.folded_bias` in the weight's float type (rename it as the graph requires).
pub fn fold_norm_shift(weight: &Tensor, layout: WeightLayout, beta: &[f32], bias: Option<&Tensor>) -> Result<Tensor> {
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
        WeightLayout::InOut => {
            left_multiply(MatRef::from_row_major_slice(&beta, 1, in_width), &src, rows, cols, &mut sink)
        }
        // stored [out, in] · β (in × 1)
        WeightLayout::OutIn => {
            right_multiply(&src, rows, cols, MatRef::from_column_major_slice(&beta, in_width, 1), &mut sink)
        }
    }
    match bias {
        Some(bias) => {
            let n = vector_len(bias)?;
            check_width(bias, "length", n, "the weight's out-width", out_width)?;
            let mut b = vec![0.0; n];
            Values::of(bias)?.read(0, &mut b);
            b.iter_mut().zip(&shift).for_each(|(b, s)| *b += s);
            let mut out = Out::new(bias.dtype, n);
            out.write(0, &b);
            Ok(out.replace(bias, bias.dims.clone()))
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
        WeightLayout::InOut => map_rows(&src, rows, cols, |_, row| subtract_mean(row), |s, v| out.write(s, v)),
        WeightLayout::OutIn => {
            let mut mean = vec![0.0; cols];
            map_rows(&src, rows, cols, |_, row| mean.iter_mut().zip(row.iter()).for_each(|(m, x)| *m += x), |_, _| {});
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
    Ok(out.replace(weight, weight.dims.clone()))
}

/// A writer's bias, made zero-mean: `b ← b − mean(b)` (= `b M`).
pub fn center_bias(bias: &Tensor) -> Result<Tensor> {
    let n = vector_len(bias)?;
    let mut b = vec![0.0; n];
    Values::of(bias)?.read(0, &mut b);
    subtract_mean(&mut b);
    let mut out = Out::new(bias.dtype, n);
    out.write(0, &b);
    Ok(out.replace(bias, bias.dims.clone()))
}

/// An embedding table `[V, D]` made zero-mean over the stream: `E ← E M` (each row minus its mean).
pub fn center_rows(table: &Tensor) -> Result<Tensor> {
    center_out_axis(table, WeightLayout::InOut)
}

// ---------------------------------------------------------------------------------------------
// Rotating and slicing

/// A reader of the stream in basis `Q` (`D × k`): `W ← Qᵀ W` over the in axis. `[in, out]` gives
/// `[k, out]`, `[out, in]` gives `[out, k]`. With `(x Q)` as input the output is unchanged when
/// k = D; with k < D this is the reader's share of slicing.
pub fn rotate_reader(weight: &Tensor, layout: WeightLayout, q: MatRef<'_, f64>) -> Result<Tensor> {
    let (rows, cols) = matrix_dims(weight)?;
    let src = Values::of(weight)?;
    let k = q.ncols();
    match layout {
        WeightLayout::InOut => {
            check_width(weight, "in-width", rows, "the rotation's rows", q.nrows())?;
            let mut out = Out::new(weight.dtype, k * cols);
            left_multiply(q.transpose(), &src, rows, cols, |s, v| out.write(s, v));
            Ok(out.replace(weight, vec![k as i64, cols as i64]))
        }
        WeightLayout::OutIn => {
            check_width(weight, "in-width", cols, "the rotation's rows", q.nrows())?;
            let mut out = Out::new(weight.dtype, rows * k);
            right_multiply(&src, rows, cols, q, |s, v| out.write(s, v));
            Ok(out.replace(weight, vec![rows as i64, k as i64]))
        }
    }
}

/// A writer of the stream in basis `Q` (`D × k`): `W ← W Q` over the out axis. `[in, out]` gives
/// `[in, k]`, `[out, in]` gives `[k, in]`. Pair with [`rotate_bias`] for its bias.
pub fn rotate_writer(weight: &Tensor, layout: WeightLayout, q: MatRef<'_, f64>) -> Result<Tensor> {
    let (rows, cols) = matrix_dims(weight)?;
    let src = Values::of(weight)?;
    let k = q.ncols();
    match layout {
        WeightLayout::InOut => {
            check_width(weight, "out-width", cols, "the rotation's rows", q.nrows())?;
            let mut out = Out::new(weight.dtype, rows * k);
            right_multiply(&src, rows, cols, q, |s, v| out.write(s, v));
            Ok(out.replace(weight, vec![rows as i64, k as i64]))
        }
        WeightLayout::OutIn => {
            check_width(weight, "out-width", rows, "the rotation's rows", q.nrows())?;
            let mut out = Out::new(weight.dtype, k * cols);
            left_multiply(q.transpose(), &src, rows, cols, |s, v| out.write(s, v));
            Ok(out.replace(weight, vec![k as i64, cols as i64]))
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
    Ok(out.replace(bias, dims))
}

/// An embedding table `[V, D]` in basis `Q`: `E ← E Q` (`[V, k]`); the table is a writer `[in, out]`.
pub fn rotate_table(table: &Tensor, q: MatRef<'_, f64>) -> Result<Tensor> {
    rotate_writer(table, WeightLayout::InOut, q)
}

/// The transposed copy `[D, V]` of an embedding table `[V, D]`, to serve as the MatMul weight of a
/// tied LM head once head and embedding must differ (untying). Same element type as the table.
pub fn untie_head(table: &Tensor, name: impl Into<String>) -> Result<Tensor> {
    let (rows, cols) = matrix_dims(table)?;
    let src = Values::of(table)?;
    let mut out = Out::new(table.dtype, rows * cols);
    let mut tile = vec![0.0; TILE * cols];
    let mut column = vec![0.0; TILE];
    for r0 in (0..rows).step_by(TILE) {
        let n = TILE.min(rows - r0);
        src.read(r0 * cols, &mut tile[..n * cols]);
        for j in 0..cols {
            for (i, c) in column[..n].iter_mut().enumerate() {
                *c = tile[i * cols + j];
            }
            out.write(j * rows + r0, &column[..n]);
        }
    }
    Ok(out.into_tensor(name, vec![cols as i64, rows as i64]))
}

// ---------------------------------------------------------------------------------------------
// Tensor plumbing

/// Elements of f64 scratch per slice of a large tensor (64 MiB; wide slices keep faer's products
/// efficient: 512-column slices of a `[4096, 14336]` reader ran at half the speed of 2048-column
/// ones). Tests use small slices so that slicing is exercised on small tensors.
const CHUNK: usize = if cfg!(test) { 1 << 12 } else { 1 << 23 };
/// Rows per tile when transposing.
const TILE: usize = 64;

fn tensor_error(t: &Tensor, message: String) -> Error {
    Error::Tensor { tensor: t.name.clone(), message }
}

fn matrix_dims(t: &Tensor) -> Result<(usize, usize)> {
    match t.dims[..] {
        [r, c] if r >= 0 && c >= 0 => Ok((r as usize, c as usize)),
        _ => Err(tensor_error(t, format!("expected a 2-D weight, got dims {:?}", t.dims))),
    }
}

/// The length of a vector (dims `[n]`, or `[1, .., 1, n]`).
fn vector_len(t: &Tensor) -> Result<usize> {
    match t.dims.split_last() {
        Some((&n, lead)) if n >= 0 && lead.iter().all(|&d| d == 1) => Ok(n as usize),
        _ => Err(tensor_error(t, format!("expected a vector, got dims {:?}", t.dims))),
    }
}

fn check_width(t: &Tensor, what: &str, got: usize, other: &str, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(tensor_error(t, format!("{what} {got} (dims {:?}) does not match {other} ({want})", t.dims)))
    }
}

fn subtract_mean(v: &mut [f64]) {
    if v.is_empty() {
        return;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    v.iter_mut().for_each(|x| *x -= mean);
}

/// A float tensor's values, decoded to f64 a range at a time (straight from the model's bytes
/// when they are raw, so that a memory-mapped table is never copied whole).
struct Values<'a> {
    source: Source<'a>,
}

enum Source<'a> {
    Le { raw: &'a [u8], dtype: DataType },
    F32(Cow<'a, [f32]>),
    F64(&'a [f64]),
}

impl<'a> Values<'a> {
    fn of(t: &'a Tensor) -> Result<Self> {
        let len = usize::try_from(t.numel()).map_err(|_| tensor_error(t, "too large".into()))?;
        let (source, got) = match (&t.data, t.dtype) {
            (TensorData::Typed(TypedValues::Floats(v)), DataType::Float) => (Source::F32(Cow::Borrowed(v)), v.len()),
            (TensorData::Typed(TypedValues::Doubles(v)), DataType::Double) => (Source::F64(v), v.len()),
            (
                TensorData::Raw(raw) | TensorData::External { bytes: raw, .. },
                dtype @ (DataType::Float | DataType::Double | DataType::Float16 | DataType::Bfloat16),
            ) => {
                let size = dtype.byte_size().expect("float types have a size");
                if raw.len() != len * size {
                    return Err(tensor_error(
                        t,
                        format!("holds {} bytes but its dims {:?} need {}", raw.len(), t.dims, len * size),
                    ));
                }
                (Source::Le { raw: &raw[..], dtype }, len)
            }
            _ => {
                let v = t.to_f32()?; // typed float16/bfloat16 storage; errors for non-float types
                let n = v.len();
                (Source::F32(Cow::Owned(v)), n)
            }
        };
        if got != len {
            return Err(tensor_error(t, format!("holds {got} values but its dims {:?} need {len}", t.dims)));
        }
        Ok(Values { source })
    }

    /// `out.len()` values starting at element `start`.
    fn read(&self, start: usize, out: &mut [f64]) {
        let n = out.len();
        match &self.source {
            Source::F32(v) => out.iter_mut().zip(&v[start..start + n]).for_each(|(o, &x)| *o = x as f64),
            Source::F64(v) => out.copy_from_slice(&v[start..start + n]),
            Source::Le { raw, dtype } => match dtype {
                DataType::Float => decode::<4>(raw, start, out, |b| f32::from_le_bytes(b) as f64),
                DataType::Double => decode::<8>(raw, start, out, f64::from_le_bytes),
                DataType::Float16 => decode::<2>(raw, start, out, |b| f16::from_le_bytes(b).to_f64()),
                _ => decode::<2>(raw, start, out, |b| bf16::from_le_bytes(b).to_f64()),
            },
        }
    }
}

fn decode<const N: usize>(raw: &[u8], start: usize, out: &mut [f64], f: impl Fn([u8; N]) -> f64) {
    let bytes = &raw[start * N..(start + out.len()) * N];
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(N)) {
        *o = f(c.try_into().expect("chunks_exact yields N bytes"));
    }
}

/// An output tensor's bytes, filled a range at a time from f64.
struct Out {
    dtype: DataType,
    bytes: Vec<u8>,
}

impl Out {
    /// For a result computed from an input of type `input`: float16, bfloat16 and float64 are kept,
    /// anything else (float32, the only other readable type) is float32.
    fn new(input: DataType, len: usize) -> Self {
        let dtype = Self::result_dtype(input);
        let size = dtype.byte_size().expect("float types have a size");
        Out { dtype, bytes: vec![0; len * size] }
    }

    fn result_dtype(input: DataType) -> DataType {
        match input {
            DataType::Float16 | DataType::Bfloat16 | DataType::Double => input,
            _ => DataType::Float,
        }
    }

    fn write(&mut self, start: usize, values: &[f64]) {
        fn encode<const N: usize>(bytes: &mut [u8], start: usize, values: &[f64], f: impl Fn(f64) -> [u8; N]) {
            let bytes = &mut bytes[start * N..(start + values.len()) * N];
            for (c, &v) in bytes.chunks_exact_mut(N).zip(values) {
                c.copy_from_slice(&f(v));
            }
        }
        match self.dtype {
            DataType::Double => encode::<8>(&mut self.bytes, start, values, f64::to_le_bytes),
            DataType::Float16 => encode::<2>(&mut self.bytes, start, values, |v| f16::from_f64(v).to_le_bytes()),
            DataType::Bfloat16 => encode::<2>(&mut self.bytes, start, values, |v| bf16::from_f64(v).to_le_bytes()),
            _ => encode::<4>(&mut self.bytes, start, values, |v| (v as f32).to_le_bytes()),
        }
    }

    fn into_tensor(self, name: impl Into<String>, dims: Vec<i64>) -> Tensor {
        Tensor::from_raw(name, self.dtype, dims, Bytes::from(self.bytes))
    }

    /// The replacement of `input`: same name and other proto fields, new dims and data.
    fn replace(self, input: &Tensor, dims: Vec<i64>) -> Tensor {
        let mut t = self.into_tensor(input.name.clone(), dims);
        t.rest = input.rest.clone();
        t
    }
}

/// `f(row index, row)` on every row of a stored `[rows, cols]` matrix, then `sink(start, values)`.
fn map_rows(
    src: &Values,
    rows: usize,
    cols: usize,
    mut f: impl FnMut(usize, &mut [f64]),
    mut sink: impl FnMut(usize, &[f64]),
) {
    if cols == 0 {
        return;
    }
    let step = (CHUNK / cols).clamp(1, rows.max(1));
    let mut buf = vec![0.0; step * cols];
    for r0 in (0..rows).step_by(step) {
        let n = step.min(rows - r0);
        let buf = &mut buf[..n * cols];
        src.read(r0 * cols, buf);
        for (i, row) in buf.chunks_exact_mut(cols).enumerate() {
            f(r0 + i, row);
        }
        sink(r0 * cols, buf);
    }
}

/// `S · M` for a stored row-major `S` (`rows × cols`) and `M` (`cols × p`), written row-major
/// (`rows × p`) to `sink(start, values)`, a slice of rows at a time.
fn right_multiply(src: &Values, rows: usize, cols: usize, m: MatRef<'_, f64>, mut sink: impl FnMut(usize, &[f64])) {
    let p = m.ncols();
    debug_assert_eq!(m.nrows(), cols);
    let step = (CHUNK / cols.max(p).max(1)).clamp(1, rows.max(1));
    let mut a = vec![0.0; step * cols];
    let mut c = vec![0.0; step * p];
    let par = faer::get_global_parallelism();
    for r0 in (0..rows).step_by(step) {
        let n = step.min(rows - r0);
        let (a, c) = (&mut a[..n * cols], &mut c[..n * p]);
        src.read(r0 * cols, a);
        let lhs = MatRef::from_row_major_slice(a, n, cols);
        matmul(MatMut::from_row_major_slice_mut(c, n, p), Accum::Replace, lhs, m, 1.0, par);
        sink(r0 * p, c);
    }
}

/// `M · S` for `M` (`p × rows`) and a stored row-major `S` (`rows × cols`), written row-major
/// (`p × cols`) to `sink(start, values)`, a slice of columns at a time.
fn left_multiply(m: MatRef<'_, f64>, src: &Values, rows: usize, cols: usize, mut sink: impl FnMut(usize, &[f64])) {
    let p = m.nrows();
    debug_assert_eq!(m.ncols(), rows);
    let step = (CHUNK / rows.max(p).max(1)).clamp(1, cols.max(1));
    let mut b = vec![0.0; rows * step];
    let mut c = vec![0.0; p * step];
    let par = faer::get_global_parallelism();
    for c0 in (0..cols).step_by(step) {
        let w = step.min(cols - c0);
        let (b, c) = (&mut b[..rows * w], &mut c[..p * w]);
        for (r, dst) in b.chunks_exact_mut(w).enumerate() {
            src.read(r * cols + c0, dst);
        }
        let rhs = MatRef::from_row_major_slice(b, rows, w);
        matmul(MatMut::from_row_major_slice_mut(c, p, w), Accum::Replace, m, rhs, 1.0, par);
        for (i, row) in c.chunks_exact(w).enumerate() {
            sink(i * cols + c0, row);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Portable Gaussian numbers and Householder QR (for `random_orthogonal`)

/// Columns per block of the QR: a block of columns stays in cache while the earlier reflectors
/// stream past it.
const QR_BLOCK: usize = 64;
/// Fewer elements than this in a block of columns: not worth a thread.
const PARALLEL_MIN: usize = 1 << 14;

fn worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `d × d` Haar orthogonal matrix, column-major. The result does not depend on `threads`.
fn haar_orthogonal(d: usize, seed: u64, threads: usize) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut a = Vec::with_capacity(d * d + 1);
    while a.len() < d * d {
        let (x, y) = gaussian_pair(&mut rng);
        a.push(x);
        a.push(y);
    }
    a.truncate(d * d);
    let (tau, r_diag) = householder_qr(&mut a, d, threads);
    let mut q = form_q(&a, &tau, d, threads);
    // Q diag(sign R_jj) goes with R' = diag(sign R_jj) R, whose diagonal is positive.
    for (col, &r) in q.chunks_exact_mut(d.max(1)).zip(&r_diag) {
        if r < 0.0 {
            col.iter_mut().for_each(|x| *x = -*x);
        }
    }
    q
}

/// A uniform number in (-1, 1), from the top 53 bits of one ChaCha word (exact arithmetic).
fn symmetric_unit(rng: &mut ChaCha8Rng) -> f64 {
    let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64); // [0, 1)
    2.0 * u - 1.0
}

/// Two independent standard normal numbers (Marsaglia's polar method: only +, ×, ÷, √ and
/// [`portable_ln`], all of which round the same way everywhere).
fn gaussian_pair(rng: &mut ChaCha8Rng) -> (f64, f64) {
    loop {
        let u = symmetric_unit(rng);
        let v = symmetric_unit(rng);
        let s = u * u + v * v;
        if s > 0.0 && s < 1.0 {
            let f = (-2.0 * portable_ln(s) / s).sqrt();
            return (u * f, v * f);
        }
    }
}

/// Natural logarithm of a positive normal number from basic arithmetic only (the platform's libm
/// `ln` may differ in the last bit between systems). Relative error ~1e-16.
fn portable_ln(x: f64) -> f64 {
    debug_assert!(x.is_normal() && x > 0.0);
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52)); // [1, 2)
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln m = 2 atanh t, t = (m − 1)/(m + 1), |t| ≤ 0.172: 2 (t + t³/3 + t⁵/5 + …)
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let mut series = 0.0;
    for n in (0..14).rev() {
        series = series * t2 + 1.0 / (2 * n + 1) as f64;
    }
    e as f64 * std::f64::consts::LN_2 + 2.0 * t * series
}

/// Σ a_i b_i with eight independent partial sums in a fixed order: vectorisable, and the same
/// bits whatever the vector width.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y ← H_r y`, `H_r = I − τ v vᵀ`, with `v` stored in `reflector[r + 1..]` below an implicit 1 at r.
fn apply_reflector(reflector: &[f64], r: usize, tau: f64, y: &mut [f64]) {
    if tau == 0.0 {
        return;
    }
    let v = &reflector[r + 1..];
    let w = tau * (y[r] + dot(v, &y[r + 1..]));
    y[r] -= w;
    for (y, v) in y[r + 1..].iter_mut().zip(v) {
        *y -= w * v;
    }
}

/// Turns column `col` (index j) into a Householder reflector (LAPACK dlarfg): afterwards `col[j]`
/// holds `R_jj` and `col[j + 1..]` the reflector's tail. Returns τ.
fn make_reflector(col: &mut [f64], j: usize) -> f64 {
    let alpha = col[j];
    let x = &mut col[j + 1..];
    let xnorm2 = dot(x, x);
    if xnorm2 == 0.0 {
        return 0.0;
    }
    let norm = (alpha * alpha + xnorm2).sqrt();
    let beta = if alpha >= 0.0 { -norm } else { norm };
    let scale = 1.0 / (alpha - beta);
    x.iter_mut().for_each(|v| *v *= scale);
    col[j] = beta;
    (beta - alpha) / beta
}

/// Runs `f(first column, columns)` on contiguous groups of the `n`-row columns in `cols`, one group
/// per thread. Each column is touched by one call only, so the result is the same for any split.
fn for_column_groups(cols: &mut [f64], n: usize, threads: usize, f: impl Fn(usize, &mut [f64]) + Sync) {
    let ncols = cols.len() / n.max(1);
    let threads = threads.clamp(1, ncols.max(1));
    if threads == 1 || n * ncols < PARALLEL_MIN {
        f(0, cols);
        return;
    }
    let per = ncols.div_ceil(threads);
    std::thread::scope(|scope| {
        for (g, group) in cols.chunks_mut(per * n).enumerate() {
            let f = &f;
            scope.spawn(move || f(g * per, group));
        }
    });
}

/// Householder QR in place of the column-major `n × n` matrix `a` (left-looking by blocks of
/// columns). Returns (τ, diag R); the reflectors stay in `a` below the diagonal.
fn householder_qr(a: &mut [f64], n: usize, threads: usize) -> (Vec<f64>, Vec<f64>) {
    let mut tau = vec![0.0; n];
    let mut r_diag = vec![0.0; n];
    for j0 in (0..n).step_by(QR_BLOCK) {
        let j1 = (j0 + QR_BLOCK).min(n);
        let (done, rest) = a.split_at_mut(j0 * n);
        let block = &mut rest[..(j1 - j0) * n];
        let done_tau = &tau[..j0];
        // The earlier reflectors H_0 … H_{j0−1}, in order, on the block's columns.
        for_column_groups(block, n, threads, |_, group| {
            for (r, reflector) in done.chunks_exact(n).enumerate() {
                for col in group.chunks_exact_mut(n) {
                    apply_reflector(reflector, r, done_tau[r], col);
                }
            }
        });
        // Factor the block itself.
        for j in j0..j1 {
            let (left, right) = block.split_at_mut((j - j0 + 1) * n);
            let col = &mut left[(j - j0) * n..];
            tau[j] = make_reflector(col, j);
            r_diag[j] = col[j];
            for later in right.chunks_exact_mut(n) {
                apply_reflector(col, j, tau[j], later);
            }
        }
    }
    (tau, r_diag)
}

/// `Q = H_0 H_1 ⋯ H_{n−1}` (column-major `n × n`) from the reflectors left in `a`.
fn form_q(a: &[f64], tau: &[f64], n: usize, threads: usize) -> Vec<f64> {
    let mut q = vec![0.0; n * n];
    for (b, block) in q.chunks_mut(QR_BLOCK * n.max(1)).enumerate() {
        let c0 = b * QR_BLOCK;
        let c1 = c0 + block.len() / n;
        for_column_groups(block, n, threads, |first, group| {
            let g0 = c0 + first;
            for (i, col) in group.chunks_exact_mut(n).enumerate() {
                col[g0 + i] = 1.0;
            }
            // Column c is H_0 ⋯ H_c e_c (H_r e_c = e_c for r > c): H_r for r = c down to 0.
            for r in (0..c1).rev() {
                let reflector = &a[r * n..(r + 1) * n];
                for (i, col) in group.chunks_exact_mut(n).enumerate() {
                    if g0 + i >= r {
                        apply_reflector(reflector, r, tau[r], col);
                    }
                }
            }
        });
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: f64 = 2e-5;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// `n` standard normal numbers rounded to f32 (so that f32 tensors hold them exactly).
    fn randn(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
        (0..n).map(|_| gaussian_pair(rng).0 as f32 as f64).collect()
    }

    /// Naive row-major `a (n × m) · b (m × p)`.
    fn naive_matmul(a: &[f64], n: usize, m: usize, b: &[f64], p: usize) -> Vec<f64> {
        let mut c = vec![0.0; n * p];
        for i in 0..n {
            for j in 0..p {
                let mut s = 0.0;
                for l in 0..m {
                    s += a[i * m + l] * b[l * p + j];
                }
                c[i * p + j] = s;
            }
        }
        c
    }

    fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
        let mut t = vec![0.0; a.len()];
        for i in 0..rows {
            for j in 0..cols {
                t[j * rows + i] = a[i * cols + j];
            }
        }
        t
    }

    /// Row-major values of a faer matrix.
    fn rows_of(m: MatRef<'_, f64>) -> Vec<f64> {
        (0..m.nrows()).flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)])).collect()
    }

    fn f32_tensor(name: &str, dims: &[usize], v: &[f64]) -> Tensor {
        let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        Tensor::from_f32(name, dims.iter().map(|&d| d as i64).collect(), &v)
    }

    /// A tensor's values in f64, exactly (float64 tensors too).
    fn values(t: &Tensor) -> Vec<f64> {
        let mut v = vec![0.0; t.numel() as usize];
        Values::of(t).unwrap().read(0, &mut v);
        v
    }

    /// The logical `[in, out]` weight stored in `layout`.
    fn stored(w: &[f64], din: usize, dout: usize, layout: WeightLayout) -> Tensor {
        match layout {
            WeightLayout::InOut => f32_tensor("w", &[din, dout], w),
            WeightLayout::OutIn => f32_tensor("w", &[dout, din], &transpose(w, din, dout)),
        }
    }

    /// The logical `[in, out]` weight of a stored tensor, with its (in, out) widths.
    fn logical(t: &Tensor, layout: WeightLayout) -> (Vec<f64>, usize, usize) {
        let (r, c) = (t.dims[0] as usize, t.dims[1] as usize);
        match layout {
            WeightLayout::InOut => (values(t), r, c),
            WeightLayout::OutIn => (transpose(&values(t), r, c), c, r),
        }
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}: element {i}: {g} vs {w}");
        }
    }

    const LAYOUTS: [WeightLayout; 2] = [WeightLayout::InOut, WeightLayout::OutIn];

    #[test]
    fn random_orthogonal_is_orthogonal() {
        for d in [0, 1, 2, 7, 64, 65, 130] {
            let q = random_orthogonal(d, 7);
            let qtq = q.transpose() * &q;
            for i in 0..d {
                for j in 0..d {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((qtq[(i, j)] - want).abs() < 1e-12, "d={d} QᵀQ[{i},{j}] = {}", qtq[(i, j)]);
                }
            }
        }
    }

    #[test]
    fn random_orthogonal_is_deterministic() {
        let a = random_orthogonal(70, 42);
        let b = random_orthogonal(70, 42);
        let c = random_orthogonal(70, 43);
        assert_eq!(
            rows_of(a.as_ref()).iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            rows_of(b.as_ref()).iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let differ = rows_of(a.as_ref()).iter().zip(rows_of(c.as_ref())).filter(|(x, y)| **x != *y).count();
        assert!(differ > 70 * 70 / 2, "different seeds should give different matrices");
        // The thread count does not change a bit.
        for d in [3, 130, 260] {
            let one = haar_orthogonal(d, 5, 1);
            for threads in [2, 3, 8] {
                let many = haar_orthogonal(d, 5, threads);
                assert!(one.iter().zip(&many).all(|(x, y)| x.to_bits() == y.to_bits()), "d={d} threads={threads}");
            }
        }
    }

    #[test]
    fn random_orthogonal_bits_are_pinned() {
        // Guards the "same Q on every machine" promise: a change here changes everyone's random Q.
        let q = haar_orthogonal(9, 2024, 1);
        // FNV-1a over the bytes (a word-wise FNV would miss an even number of sign flips).
        let hash = q
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
        assert_eq!(hash, PINNED_HASH, "random_orthogonal(9, 2024) changed: {q:?}");
        assert_eq!(q[0].to_bits(), 0.09693310326277538f64.to_bits());
    }
    const PINNED_HASH: u64 = 6804417757224823220;

    #[test]
    fn random_orthogonal_is_q_of_the_gaussian_with_positive_r() {
        // Same Gaussian matrix through faer's QR, signs fixed by diag R: the same Q.
        let d = 90;
        let mut g = rng(11);
        let mut a = Vec::new();
        while a.len() < d * d {
            let (x, y) = gaussian_pair(&mut g);
            a.extend([x, y]);
        }
        a.truncate(d * d);
        let a = MatRef::from_column_major_slice(&a, d, d).to_owned();
        let qr = a.qr();
        let mut q_ref = qr.compute_Q();
        for j in 0..d {
            if qr.R()[(j, j)] < 0.0 {
                for i in 0..d {
                    q_ref[(i, j)] = -q_ref[(i, j)];
                }
            }
        }
        let q = random_orthogonal(d, 11);
        assert_close(&rows_of(q.as_ref()), &rows_of(q_ref.as_ref()), 1e-10, "Q vs faer");
        // R = Qᵀ A is upper triangular with a positive diagonal.
        let r = q.transpose() * &a;
        for i in 0..d {
            assert!(r[(i, i)] > 0.0);
            for j in 0..i {
                assert!(r[(i, j)].abs() < 1e-10);
            }
        }
    }

    #[test]
    fn gaussian_numbers_look_gaussian() {
        let mut g = rng(3);
        let x: Vec<f64> = (0..20000)
            .flat_map(|_| {
                let (a, b) = gaussian_pair(&mut g);
                [a, b]
            })
            .collect();
        let n = x.len() as f64;
        let mean = x.iter().sum::<f64>() / n;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.03, "mean {mean} var {var}");
        let r = std::f64::consts::SQRT_2;
        for v in [1e-300, 1e-10, 0.1, 0.5, 0.5 * r * (1.0 - 1e-9), 0.5 * r * (1.0 + 1e-9), 0.9999999, 1.0, r, 123.456] {
            assert!(
                (portable_ln(v) - v.ln()).abs() <= 4.0 * f64::EPSILON * v.ln().abs().max(1e-300) + 1e-300,
                "ln {v}"
            );
        }
    }

    #[test]
    fn orthonormal_columns_and_shortcut_match_naive() {
        let d = 12;
        let qa = random_orthogonal(d, 1);
        let qb = random_orthogonal(d, 2);
        let (ka, kb) = (8, 5);
        let a = orthonormal_columns(qa.as_ref(), ka);
        assert_eq!((a.nrows(), a.ncols()), (d, ka));
        assert_eq!(rows_of(a.as_ref()), rows_of(qa.subcols(0, ka)));
        let s = shortcut(a.as_ref(), qb.subcols(0, kb));
        let want = naive_matmul(&transpose(&rows_of(a.as_ref()), d, ka), ka, d, &rows_of(qb.subcols(0, kb)), kb);
        assert_eq!((s.nrows(), s.ncols()), (ka, kb));
        assert_close(&rows_of(s.as_ref()), &want, 1e-13, "shortcut");
    }

    #[test]
    fn shortcut_maps_one_basis_to_the_other() {
        let d = 16;
        let (qa, qb) = (random_orthogonal(d, 10), random_orthogonal(d, 20));
        let x = randn(&mut rng(1), 3 * d);
        let s = shortcut(qa.as_ref(), qb.as_ref());
        let xa = naive_matmul(&x, 3, d, &rows_of(qa.as_ref()), d);
        let got = naive_matmul(&xa, 3, d, &rows_of(s.as_ref()), d);
        let want = naive_matmul(&x, 3, d, &rows_of(qb.as_ref()), d);
        assert_close(&got, &want, 1e-12, "x Q_a S = x Q_b");
    }

    #[test]
    fn mat_to_tensor_is_row_major_in_the_given_type() {
        let m = Mat::from_fn(2, 3, |i, j| (10 * i + j) as f64 + 0.5);
        for dtype in [DataType::Float, DataType::Float16, DataType::Bfloat16, DataType::Double] {
            let t = mat_to_tensor("s", m.as_ref(), dtype);
            assert_eq!((t.name.as_str(), t.dtype, t.dims.clone()), ("s", dtype, vec![2, 3]));
            assert_eq!(t.byte_len(), 6 * dtype.byte_size().unwrap() as u64);
            assert_eq!(t.to_f32().unwrap(), vec![0.5, 1.5, 2.5, 10.5, 11.5, 12.5]);
        }
        let s = scalar_to_tensor("eps", 1e-5, DataType::Float16);
        assert_eq!((s.dtype, s.dims.clone()), (DataType::Float16, vec![]));
        assert_eq!(s.to_f32().unwrap(), vec![f16::from_f64(1e-5).to_f32()]);
        assert_eq!(accumulation_dtype(DataType::Bfloat16), DataType::Float);
        assert_eq!(accumulation_dtype(DataType::Double), DataType::Double);
    }

    #[test]
    fn fold_norm_scale_matches_naive_and_is_invariant() {
        let (din, dout) = (6, 5);
        let mut g = rng(4);
        let w = randn(&mut g, din * dout);
        let gamma: Vec<f32> = randn(&mut g, din).iter().map(|&x| x as f32).collect();
        let x = randn(&mut g, 2 * din);
        for layout in LAYOUTS {
            let t = fold_norm_scale(&stored(&w, din, dout, layout), layout, &gamma).unwrap();
            assert_eq!(t.name, "w");
            let (got, i, o) = logical(&t, layout);
            assert_eq!((i, o), (din, dout));
            let mut want = w.clone();
            for r in 0..din {
                for c in 0..dout {
                    want[r * dout + c] *= gamma[r] as f64;
                }
            }
            assert_close(&got, &want, TOL, "diag(γ) W");
            // x · (diag γ W) == (x ∘ γ) · W
            let xg: Vec<f64> = x.iter().enumerate().map(|(n, v)| v * gamma[n % din] as f64).collect();
            assert_close(
                &naive_matmul(&x, 2, din, &got, dout),
                &naive_matmul(&xg, 2, din, &w, dout),
                1e-4,
                "invariance",
            );
        }
        let err = fold_norm_scale(&stored(&w, din, dout, WeightLayout::InOut), WeightLayout::OutIn, &gamma);
        assert!(err.is_err(), "γ of the wrong length must be refused");
    }

    #[test]
    fn fold_norm_shift_matches_naive() {
        let (din, dout) = (7, 4);
        let mut g = rng(5);
        let w = randn(&mut g, din * dout);
        let beta: Vec<f32> = randn(&mut g, din).iter().map(|&x| x as f32).collect();
        let b = randn(&mut g, dout);
        let beta64: Vec<f64> = beta.iter().map(|&x| x as f64).collect();
        let shift = naive_matmul(&beta64, 1, din, &w, dout);
        for layout in LAYOUTS {
            let weight = stored(&w, din, dout, layout);
            let created = fold_norm_shift(&weight, layout, &beta, None).unwrap();
            assert_eq!((created.name.as_str(), created.dims.clone()), ("w.folded_bias", vec![dout as i64]));
            assert_close(&values(&created), &shift, TOL, "βW");
            let bias = f32_tensor("b", &[dout], &b);
            let updated = fold_norm_shift(&weight, layout, &beta, Some(&bias)).unwrap();
            assert_eq!(updated.name, "b");
            let want: Vec<f64> = b.iter().zip(&shift).map(|(x, y)| x + y).collect();
            assert_close(&values(&updated), &want, TOL, "b + βW");
            // The layer's output on x + β equals the folded layer's output on x.
            let x = randn(&mut g, din);
            let xb: Vec<f64> = x.iter().zip(&beta64).map(|(a, c)| a + c).collect();
            let y0: Vec<f64> = naive_matmul(&xb, 1, din, &w, dout).iter().zip(&b).map(|(y, c)| y + c).collect();
            let y1: Vec<f64> =
                naive_matmul(&x, 1, din, &w, dout).iter().zip(values(&updated)).map(|(y, c)| y + c).collect();
            assert_close(&y1, &y0, 1e-4, "shift invariance");
        }
        let wrong = f32_tensor("b", &[dout + 1], &randn(&mut g, dout + 1));
        assert!(fold_norm_shift(&stored(&w, din, dout, WeightLayout::InOut), WeightLayout::InOut, &beta, Some(&wrong))
            .is_err());
    }

    #[test]
    fn centering_matches_naive_and_zeroes_output_means() {
        let (din, dout) = (5, 8);
        let mut g = rng(6);
        let w = randn(&mut g, din * dout);
        let b = randn(&mut g, dout);
        let x = randn(&mut g, 3 * din);
        let bias = center_bias(&f32_tensor("b", &[dout], &b)).unwrap();
        let mb = b.iter().sum::<f64>() / dout as f64;
        assert_close(&values(&bias), &b.iter().map(|v| v - mb).collect::<Vec<_>>(), TOL, "b − mean b");
        for layout in LAYOUTS {
            let t = center_out_axis(&stored(&w, din, dout, layout), layout).unwrap();
            let (got, _, _) = logical(&t, layout);
            // Naive: W M with M = I − 11ᵀ/D.
            let m: Vec<f64> =
                (0..dout * dout).map(|n| if n / dout == n % dout { 1.0 } else { 0.0 } - 1.0 / dout as f64).collect();
            assert_close(&got, &naive_matmul(&w, din, dout, &m, dout), TOL, "W M");
            let y = naive_matmul(&x, 3, din, &got, dout);
            for (r, row) in y.chunks(dout).enumerate() {
                let mean = row.iter().zip(values(&bias)).map(|(a, c)| a + c).sum::<f64>() / dout as f64;
                assert!(mean.abs() < 1e-5, "{layout:?}: row {r} of xW + b has mean {mean}");
            }
        }
        let table = randn(&mut g, 4 * 6);
        let centred = values(&center_rows(&f32_tensor("e", &[4, 6], &table)).unwrap());
        for (row, orig) in centred.chunks(6).zip(table.chunks(6)) {
            assert!(row.iter().sum::<f64>().abs() < 1e-5);
            assert!((row[0] - row[1] - (orig[0] - orig[1])).abs() < 1e-5);
        }
    }

    #[test]
    fn rotate_reader_matches_naive_and_is_invariant() {
        let (d, dout, k) = (10, 7, 6);
        let mut g = rng(7);
        let w = randn(&mut g, d * dout);
        let q = random_orthogonal(d, 99);
        let x = randn(&mut g, 2 * d);
        let qk = rows_of(q.subcols(0, k));
        for layout in LAYOUTS {
            let t = rotate_reader(&stored(&w, d, dout, layout), layout, q.subcols(0, k)).unwrap();
            let (got, i, o) = logical(&t, layout);
            assert_eq!((i, o), (k, dout), "{layout:?}");
            assert_close(&got, &naive_matmul(&transpose(&qk, d, k), k, d, &w, dout), TOL, "Qᵀ W");
            // (x Q)(Qᵀ W) = x W for k = D.
            let full = rotate_reader(&stored(&w, d, dout, layout), layout, q.as_ref()).unwrap();
            let (qw, _, _) = logical(&full, layout);
            let xq = naive_matmul(&x, 2, d, &rows_of(q.as_ref()), d);
            assert_close(
                &naive_matmul(&xq, 2, d, &qw, dout),
                &naive_matmul(&x, 2, d, &w, dout),
                1e-4,
                "reader invariance",
            );
        }
        let wrong = stored(&w, d, dout, WeightLayout::InOut);
        assert!(rotate_reader(&wrong, WeightLayout::OutIn, q.as_ref()).is_err());
    }

    #[test]
    fn rotate_writer_and_bias_match_naive_and_invert() {
        let (din, d, k) = (9, 10, 4);
        let mut g = rng(8);
        let w = randn(&mut g, din * d);
        let b = randn(&mut g, d);
        let q = random_orthogonal(d, 98);
        let qk = rows_of(q.subcols(0, k));
        let qfull = rows_of(q.as_ref());
        for layout in LAYOUTS {
            let t = rotate_writer(&stored(&w, din, d, layout), layout, q.subcols(0, k)).unwrap();
            let (got, i, o) = logical(&t, layout);
            assert_eq!((i, o), (din, k), "{layout:?}");
            assert_close(&got, &naive_matmul(&w, din, d, &qk, k), TOL, "W Q");
            // (W Q) Qᵀ = W for k = D.
            let full = rotate_writer(&stored(&w, din, d, layout), layout, q.as_ref()).unwrap();
            let (wq, _, _) = logical(&full, layout);
            assert_close(&naive_matmul(&wq, din, d, &transpose(&qfull, d, d), d), &w, 1e-5, "(WQ)Qᵀ");
        }
        let rb = rotate_bias(&f32_tensor("b", &[d], &b), q.subcols(0, k)).unwrap();
        assert_eq!(rb.dims, vec![k as i64]);
        assert_close(&values(&rb), &naive_matmul(&b, 1, d, &qk, k), TOL, "b Q");
        let rb2 = rotate_bias(&f32_tensor("b", &[1, d], &b), q.subcols(0, k)).unwrap();
        assert_eq!(rb2.dims, vec![1, k as i64]);
        let e = randn(&mut g, 13 * d);
        let rt = rotate_table(&f32_tensor("e", &[13, d], &e), q.subcols(0, k)).unwrap();
        assert_eq!(rt.dims, vec![13, k as i64]);
        assert_close(&values(&rt), &naive_matmul(&e, 13, d, &qk, k), TOL, "E Q");
    }

    #[test]
    fn large_tensors_are_processed_in_slices() {
        // More rows (and columns) than one slice holds: CHUNK / cols < rows.
        let (v, d, k) = (CHUNK / 8 + 37, 8, 3);
        let mut g = rng(9);
        let e = randn(&mut g, v * d);
        let q = random_orthogonal(d, 5);
        let qk = rows_of(q.subcols(0, k));
        let rt = rotate_table(&f32_tensor("e", &[v, d], &e), q.subcols(0, k)).unwrap();
        assert_close(&values(&rt), &naive_matmul(&e, v, d, &qk, k), TOL, "E Q in slices");
        // An untied head [D, V] read by Qᵀ, column slices.
        let head = untie_head(&f32_tensor("e", &[v, d], &e), "head").unwrap();
        assert_eq!((head.name.as_str(), head.dims.clone()), ("head", vec![d as i64, v as i64]));
        assert_eq!(values(&head), transpose(&e, v, d));
        let rh = rotate_reader(&head, WeightLayout::InOut, q.subcols(0, k)).unwrap();
        let want = transpose(&naive_matmul(&e, v, d, &qk, k), v, k);
        assert_close(&values(&rh), &want, TOL, "Qᵀ Eᵀ in slices");
        let centred = values(&center_out_axis(&head, WeightLayout::OutIn).unwrap());
        for j in [0, 1, v / 2, v - 1] {
            let s: f64 = (0..d).map(|i| centred[i * v + j]).sum();
            assert!(s.abs() < 1e-5, "column {j} sum {s}");
        }
    }

    #[test]
    fn untie_head_transposes() {
        let e: Vec<f64> = (0..15).map(|x| x as f64).collect();
        let t = untie_head(&f32_tensor("e", &[5, 3], &e), "lm_head.untied").unwrap();
        assert_eq!(t.dims, vec![3, 5]);
        assert_eq!(values(&t), transpose(&e, 5, 3));
    }

    #[test]
    fn float_types_are_kept() {
        let (din, d) = (3, 4);
        let w: Vec<f64> = randn(&mut rng(12), din * d);
        let q = random_orthogonal(d, 1);
        let want = naive_matmul(&w, din, d, &rows_of(q.as_ref()), d);
        let half: Vec<u8> = w.iter().flat_map(|&x| f16::from_f64(x).to_le_bytes()).collect();
        let brain: Vec<u8> = w.iter().flat_map(|&x| bf16::from_f64(x).to_le_bytes()).collect();
        let double: Vec<u8> = w.iter().flat_map(|&x| x.to_le_bytes()).collect();
        let dims = vec![din as i64, d as i64];
        for (dtype, bytes, tol) in
            [(DataType::Float16, half, 5e-3), (DataType::Bfloat16, brain, 4e-2), (DataType::Double, double, 1e-14)]
        {
            let t = Tensor::from_raw("w", dtype, dims.clone(), Bytes::from(bytes));
            let r = rotate_writer(&t, WeightLayout::InOut, q.as_ref()).unwrap();
            assert_eq!(r.dtype, dtype);
            assert_eq!(r.byte_len(), t.byte_len());
            assert_close(&values(&r), &want, tol, dtype.name().as_str());
            let u = untie_head(&t, "h").unwrap();
            assert_eq!(u.dtype, dtype);
        }
        // Typed float_data storage works too; integer tensors are refused.
        let mut typed = f32_tensor("w", &[din, d], &w);
        typed.data = TensorData::Typed(TypedValues::Floats(w.iter().map(|&x| x as f32).collect()));
        let r = rotate_writer(&typed, WeightLayout::InOut, q.as_ref()).unwrap();
        assert_close(&values(&r), &want, TOL, "typed");
        let ints = Tensor::from_i64("i", vec![din as i64, d as i64], &vec![1; din * d]);
        assert!(rotate_writer(&ints, WeightLayout::InOut, q.as_ref()).is_err());
        // A 3-D weight is refused, not misread.
        let cube = f32_tensor("c", &[1, din, d], &w);
        assert!(rotate_writer(&cube, WeightLayout::InOut, q.as_ref()).is_err());
    }
}
