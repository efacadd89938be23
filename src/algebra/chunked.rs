//! Chunked access to tensors of any float type: reading a (possibly memory-mapped) tensor's
//! values in slices of rows or columns as f64 or f32 ([`Element`]), multiplying them by a matrix
//! with faer, and writing results back in the input's float type, so that besides the output at
//! most ~128 MiB of scratch are alive whatever the tensor's size.
use std::borrow::Cow;

use bytes::Bytes;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef};
use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::graph::{DataType, Tensor, TensorData, TypedValues};

/// Elements of scratch per slice of a large tensor (64 MiB; wide slices keep faer's products
/// efficient: 512-column slices of a `[4096, 14336]` reader ran at half the speed of 2048-column
/// ones). Tests use small slices so that slicing is exercised on small tensors.
pub(super) const CHUNK: usize = if cfg!(test) { 1 << 12 } else { 1 << 23 };

pub(super) fn tensor_error(t: &Tensor, message: String) -> Error {
    Error::Tensor { tensor: t.name.clone(), message }
}

pub(super) fn matrix_dims(t: &Tensor) -> Result<(usize, usize)> {
    match t.dims[..] {
        [r, c] if r >= 0 && c >= 0 => Ok((r as usize, c as usize)),
        _ => Err(tensor_error(t, format!("expected a 2-D weight, got dims {:?}", t.dims))),
    }
}

/// The length of a vector (dims `[n]`, or `[1, .., 1, n]`).
pub(super) fn vector_len(t: &Tensor) -> Result<usize> {
    match t.dims.split_last() {
        Some((&n, lead)) if n >= 0 && lead.iter().all(|&d| d == 1) => Ok(n as usize),
        _ => Err(tensor_error(t, format!("expected a vector, got dims {:?}", t.dims))),
    }
}

pub(super) fn check_width(
    t: &Tensor,
    what: &str,
    got: usize,
    other: &str,
    want: usize,
) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(tensor_error(
            t,
            format!("{what} {got} (dims {:?}) does not match {other} ({want})", t.dims),
        ))
    }
}

/// The element type the chunked arithmetic runs in: f64, or f32 for the products of float16 and
/// bfloat16 weights (see [`super::Precision`]).
pub(super) trait Element: faer::traits::RealField + Copy {
    fn of_f64(v: f64) -> Self;
    fn of_f32(v: f32) -> Self;
    fn widen(self) -> f64;
}

impl Element for f64 {
    fn of_f64(v: f64) -> Self {
        v
    }
    fn of_f32(v: f32) -> Self {
        v as f64
    }
    fn widen(self) -> f64 {
        self
    }
}

impl Element for f32 {
    fn of_f64(v: f64) -> Self {
        v as f32
    }
    fn of_f32(v: f32) -> Self {
        v
    }
    fn widen(self) -> f64 {
        self as f64
    }
}

pub(super) fn subtract_mean(v: &mut [f64]) {
    if v.is_empty() {
        return;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    v.iter_mut().for_each(|x| *x -= mean);
}

/// A float tensor's values, decoded to an [`Element`] type a range at a time (straight from the
/// model's bytes when they are raw, so that a memory-mapped table is never copied whole).
pub(super) struct Values<'a> {
    source: Source<'a>,
}

pub(super) enum Source<'a> {
    Le { raw: &'a [u8], dtype: DataType },
    F32(Cow<'a, [f32]>),
    F64(&'a [f64]),
}

impl<'a> Values<'a> {
    pub(super) fn of(t: &'a Tensor) -> Result<Self> {
        let len = usize::try_from(t.numel()).map_err(|_| tensor_error(t, "too large".into()))?;
        let (source, got) = match (&t.data, t.dtype) {
            (TensorData::Typed(TypedValues::Floats(v)), DataType::Float) => {
                (Source::F32(Cow::Borrowed(v)), v.len())
            }
            (TensorData::Typed(TypedValues::Doubles(v)), DataType::Double) => {
                (Source::F64(v), v.len())
            }
            (
                TensorData::Raw(raw) | TensorData::External { bytes: raw, .. },
                dtype @ (DataType::Float
                | DataType::Double
                | DataType::Float16
                | DataType::Bfloat16),
            ) => {
                let size = dtype.byte_size().expect("float types have a size");
                if raw.len() != len * size {
                    return Err(tensor_error(
                        t,
                        format!(
                            "holds {} bytes but its dims {:?} need {}",
                            raw.len(),
                            t.dims,
                            len * size
                        ),
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
            return Err(tensor_error(
                t,
                format!("holds {got} values but its dims {:?} need {len}", t.dims),
            ));
        }
        Ok(Values { source })
    }

    /// `out.len()` values starting at element `start` (float16 and bfloat16 widen exactly to
    /// either type).
    pub(super) fn read<T: Element>(&self, start: usize, out: &mut [T]) {
        let n = out.len();
        match &self.source {
            Source::F32(v) => {
                out.iter_mut().zip(&v[start..start + n]).for_each(|(o, &x)| *o = T::of_f32(x))
            }
            Source::F64(v) => {
                out.iter_mut().zip(&v[start..start + n]).for_each(|(o, &x)| *o = T::of_f64(x))
            }
            Source::Le { raw, dtype } => match dtype {
                DataType::Float => {
                    decode::<4, T>(raw, start, out, |b| T::of_f32(f32::from_le_bytes(b)))
                }
                DataType::Double => {
                    decode::<8, T>(raw, start, out, |b| T::of_f64(f64::from_le_bytes(b)))
                }
                DataType::Float16 => {
                    decode::<2, T>(raw, start, out, |b| T::of_f32(f16::from_le_bytes(b).to_f32()))
                }
                _ => {
                    decode::<2, T>(raw, start, out, |b| T::of_f32(bf16::from_le_bytes(b).to_f32()))
                }
            },
        }
    }
}

pub(super) fn decode<const N: usize, T>(
    raw: &[u8],
    start: usize,
    out: &mut [T],
    f: impl Fn([u8; N]) -> T,
) {
    let bytes = &raw[start * N..(start + out.len()) * N];
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(N)) {
        *o = f(c.try_into().expect("chunks_exact yields N bytes"));
    }
}

/// An output tensor's bytes, filled a range at a time from f64 or f32 values (each rounded once
/// to the output's type).
pub(super) struct Out {
    dtype: DataType,
    bytes: Vec<u8>,
}

impl Out {
    /// For a result computed from an input of type `input`: float16, bfloat16 and float64 are kept,
    /// anything else (float32, the only other readable type) is float32.
    pub(super) fn new(input: DataType, len: usize) -> Self {
        let dtype = Self::result_dtype(input);
        let size = dtype.byte_size().expect("float types have a size");
        Out { dtype, bytes: vec![0; len * size] }
    }

    pub(super) fn result_dtype(input: DataType) -> DataType {
        match input {
            DataType::Float16 | DataType::Bfloat16 | DataType::Double => input,
            _ => DataType::Float,
        }
    }

    pub(super) fn write<T: Element>(&mut self, start: usize, values: &[T]) {
        fn encode<const N: usize, T: Element>(
            bytes: &mut [u8],
            start: usize,
            values: &[T],
            f: impl Fn(f64) -> [u8; N],
        ) {
            let bytes = &mut bytes[start * N..(start + values.len()) * N];
            for (c, &v) in bytes.chunks_exact_mut(N).zip(values) {
                c.copy_from_slice(&f(v.widen()));
            }
        }
        match self.dtype {
            DataType::Double => encode::<8, T>(&mut self.bytes, start, values, f64::to_le_bytes),
            DataType::Float16 => {
                encode::<2, T>(&mut self.bytes, start, values, |v| f16::from_f64(v).to_le_bytes())
            }
            DataType::Bfloat16 => {
                encode::<2, T>(&mut self.bytes, start, values, |v| bf16::from_f64(v).to_le_bytes())
            }
            _ => encode::<4, T>(&mut self.bytes, start, values, |v| (v as f32).to_le_bytes()),
        }
    }

    pub(super) fn into_tensor(self, name: impl Into<String>, dims: Vec<i64>) -> Tensor {
        Tensor::from_raw(name, self.dtype, dims, Bytes::from(self.bytes))
    }

    /// The replacement of `input`: same name and other proto fields, new dims and data. A weight's
    /// replacement is as large as the weight: it is parked ([`crate::files::park`]).
    pub(super) fn replace(self, input: &Tensor, dims: Vec<i64>) -> Result<Tensor> {
        let bytes = crate::files::park(self.bytes)?;
        let mut t = Tensor::from_raw(input.name.clone(), self.dtype, dims, bytes);
        t.rest = input.rest.clone();
        Ok(t)
    }
}

/// `f(row index, row)` on every row of a stored `[rows, cols]` matrix, then `sink(start, values)`.
pub(super) fn map_rows(
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
    let mut buf = vec![0.0f64; step * cols];
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

/// `dst = lhs · rhs` on faer's global parallelism.
fn product<T: Element>(dst: MatMut<'_, T>, lhs: MatRef<'_, T>, rhs: MatRef<'_, T>) {
    let par = faer::get_global_parallelism();
    matmul(dst, Accum::Replace, lhs, rhs, T::of_f64(1.0), par);
}

/// `S · M` for a stored row-major `S` (`rows × cols`) and `M` (`cols × p`), written row-major
/// (`rows × p`) to `sink(start, values)`, a slice of rows at a time.
pub(super) fn right_multiply<T: Element>(
    src: &Values,
    rows: usize,
    cols: usize,
    m: MatRef<'_, T>,
    mut sink: impl FnMut(usize, &[T]),
) {
    let p = m.ncols();
    debug_assert_eq!(m.nrows(), cols);
    let step = (CHUNK / cols.max(p).max(1)).clamp(1, rows.max(1));
    let mut a = vec![T::of_f64(0.0); step * cols];
    let mut c = vec![T::of_f64(0.0); step * p];
    for r0 in (0..rows).step_by(step) {
        let n = step.min(rows - r0);
        let (a, c) = (&mut a[..n * cols], &mut c[..n * p]);
        src.read(r0 * cols, a);
        let lhs = MatRef::from_row_major_slice(a, n, cols);
        product(MatMut::from_row_major_slice_mut(c, n, p), lhs, m);
        sink(r0 * p, c);
    }
}

/// `M · S` for `M` (`p × rows`) and a stored row-major `S` (`rows × cols`), written row-major
/// (`p × cols`) to `sink(start, values)`, a slice of columns at a time.
pub(super) fn left_multiply<T: Element>(
    m: MatRef<'_, T>,
    src: &Values,
    rows: usize,
    cols: usize,
    mut sink: impl FnMut(usize, &[T]),
) {
    let p = m.nrows();
    debug_assert_eq!(m.ncols(), rows);
    let step = (CHUNK / rows.max(p).max(1)).clamp(1, cols.max(1));
    let mut b = vec![T::of_f64(0.0); rows * step];
    let mut c = vec![T::of_f64(0.0); p * step];
    for c0 in (0..cols).step_by(step) {
        let w = step.min(cols - c0);
        let (b, c) = (&mut b[..rows * w], &mut c[..p * w]);
        for (r, dst) in b.chunks_exact_mut(w).enumerate() {
            src.read(r * cols + c0, dst);
        }
        let rhs = MatRef::from_row_major_slice(b, rows, w);
        product(MatMut::from_row_major_slice_mut(c, p, w), m, rhs);
        for (i, row) in c.chunks_exact(w).enumerate() {
            sink(i * cols + c0, row);
        }
    }
}
