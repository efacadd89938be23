//! Unit tests of the weight algebra, the chunked tensor access and the random orthogonal matrices.
use bytes::Bytes;
use half::{bf16, f16};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::chunked::CHUNK;
use super::random::{gaussian_pair, haar_orthogonal, portable_ln, random_orthogonal};
use super::*;
use crate::graph::{TensorData, TypedValues};

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
    let differ =
        rows_of(a.as_ref()).iter().zip(rows_of(c.as_ref())).filter(|(x, y)| **x != *y).count();
    assert!(differ > 70 * 70 / 2, "different seeds should give different matrices");
    // The thread count does not change a bit.
    for d in [3, 130, 260] {
        let one = haar_orthogonal(d, 5, 1);
        for threads in [2, 3, 8] {
            let many = haar_orthogonal(d, 5, threads);
            assert!(
                one.iter().zip(&many).all(|(x, y)| x.to_bits() == y.to_bits()),
                "d={d} threads={threads}"
            );
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
    for v in [
        1e-300,
        1e-10,
        0.1,
        0.5,
        0.5 * r * (1.0 - 1e-9),
        0.5 * r * (1.0 + 1e-9),
        0.9999999,
        1.0,
        r,
        123.456,
    ] {
        assert!(
            (portable_ln(v) - v.ln()).abs()
                <= 4.0 * f64::EPSILON * v.ln().abs().max(1e-300) + 1e-300,
            "ln {v}"
        );
    }
}

#[test]
fn shortcut_matches_naive() {
    let d = 12;
    let qa = random_orthogonal(d, 1);
    let qb = random_orthogonal(d, 2);
    let (ka, kb) = (8, 5);
    let a = qa.subcols(0, ka);
    let s = shortcut(a, qb.subcols(0, kb));
    let want = naive_matmul(&transpose(&rows_of(a), d, ka), ka, d, &rows_of(qb.subcols(0, kb)), kb);
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
    let err =
        fold_norm_scale(&stored(&w, din, dout, WeightLayout::InOut), WeightLayout::OutIn, &gamma);
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
        assert_eq!(
            (created.name.as_str(), created.dims.clone()),
            ("w.folded_bias", vec![dout as i64])
        );
        assert_close(&values(&created), &shift, TOL, "βW");
        let bias = f32_tensor("b", &[dout], &b);
        let updated = fold_norm_shift(&weight, layout, &beta, Some(&bias)).unwrap();
        assert_eq!(updated.name, "b");
        let want: Vec<f64> = b.iter().zip(&shift).map(|(x, y)| x + y).collect();
        assert_close(&values(&updated), &want, TOL, "b + βW");
        // The layer's output on x + β equals the folded layer's output on x.
        let x = randn(&mut g, din);
        let xb: Vec<f64> = x.iter().zip(&beta64).map(|(a, c)| a + c).collect();
        let y0: Vec<f64> =
            naive_matmul(&xb, 1, din, &w, dout).iter().zip(&b).map(|(y, c)| y + c).collect();
        let y1: Vec<f64> = naive_matmul(&x, 1, din, &w, dout)
            .iter()
            .zip(values(&updated))
            .map(|(y, c)| y + c)
            .collect();
        assert_close(&y1, &y0, 1e-4, "shift invariance");
    }
    let wrong = f32_tensor("b", &[dout + 1], &randn(&mut g, dout + 1));
    assert!(fold_norm_shift(
        &stored(&w, din, dout, WeightLayout::InOut),
        WeightLayout::InOut,
        &beta,
        Some(&wrong)
    )
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
        let m: Vec<f64> = (0..dout * dout)
            .map(|n| if n / dout == n % dout { 1.0 } else { 0.0 } - 1.0 / dout as f64)
            .collect();
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
    // A head [D, V] read by Qᵀ, column slices.
    let head = f32_tensor("head", &[d, v], &transpose(&e, v, d));
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
fn float_types_are_kept() {
    let (din, d) = (3, 4);
    let w: Vec<f64> = randn(&mut rng(12), din * d);
    let q = random_orthogonal(d, 1);
    let want = naive_matmul(&w, din, d, &rows_of(q.as_ref()), d);
    let half: Vec<u8> = w.iter().flat_map(|&x| f16::from_f64(x).to_le_bytes()).collect();
    let brain: Vec<u8> = w.iter().flat_map(|&x| bf16::from_f64(x).to_le_bytes()).collect();
    let double: Vec<u8> = w.iter().flat_map(|&x| x.to_le_bytes()).collect();
    let dims = vec![din as i64, d as i64];
    for (dtype, bytes, tol) in [
        (DataType::Float16, half, 5e-3),
        (DataType::Bfloat16, brain, 4e-2),
        (DataType::Double, double, 1e-14),
    ] {
        let t = Tensor::from_raw("w", dtype, dims.clone(), Bytes::from(bytes));
        let r = rotate_writer(&t, WeightLayout::InOut, q.as_ref()).unwrap();
        assert_eq!(r.dtype, dtype);
        assert_eq!(r.byte_len(), t.byte_len());
        assert_close(&values(&r), &want, tol, dtype.name().as_str());
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

/// A float16/bfloat16 element's bits as an integer that counts units in the last place.
fn ulp_index(bits: u16) -> i32 {
    let magnitude = (bits & 0x7fff) as i32;
    if bits & 0x8000 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

#[test]
fn half_weights_rotate_in_f32_within_one_ulp_of_f64() {
    assert_eq!(Precision::for_weights(DataType::Float16), Precision::F32);
    assert_eq!(Precision::for_weights(DataType::Bfloat16), Precision::F32);
    assert_eq!(Precision::for_weights(DataType::Float), Precision::F64);
    assert_eq!(Precision::for_weights(DataType::Double), Precision::F64);
    // A realistic sum length: D = 512 terms per element, of unit scale.
    let (rows, d, k) = (96, 512, 384);
    let w = randn(&mut rng(13), rows * d);
    let q = random_orthogonal(d, 3);
    let q = q.subcols(0, k);
    for dtype in [DataType::Float16, DataType::Bfloat16] {
        let encode = |x| match dtype {
            DataType::Float16 => f16::from_f64(x).to_le_bytes(),
            _ => bf16::from_f64(x).to_le_bytes(),
        };
        let bytes: Vec<u8> = w.iter().flat_map(|&x| encode(x)).collect();
        let t = Tensor::from_raw("w", dtype, vec![rows as i64, d as i64], Bytes::from(bytes));
        // The independent reference: the stored weight times Q in naive f64, rounded once.
        let exact = naive_matmul(&values(&t), rows, d, &rows_of(q), k);
        let exact_bits: Vec<u16> = exact.iter().map(|&x| u16::from_le_bytes(encode(x))).collect();
        let rounded = |bits: u16| match dtype {
            DataType::Float16 => f16::from_bits(bits).to_f64(),
            _ => bf16::from_bits(bits).to_f64(),
        };
        let (mut differing, mut total) = (0, 0);
        for layout in LAYOUTS {
            // [rows, D] is a writer [in, out] or a reader [out, in]: either way the result is
            // the stored matrix times Q.
            let side = match layout {
                WeightLayout::InOut => Side::Writer,
                WeightLayout::OutIn => Side::Reader,
            };
            let rotate = |precision| rotate_in(precision, side, &t, layout, q).unwrap();
            let (fast, slow) = (rotate(Precision::F32), rotate(Precision::F64));
            assert_eq!((fast.dtype, &fast.dims), (dtype, &vec![rows as i64, k as i64]));
            let bits = |t: &Tensor| -> Vec<u16> {
                let raw = t.raw_bytes().unwrap();
                raw.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect()
            };
            assert_eq!(
                bits(&slow),
                exact_bits,
                "{}: the f64 path rounds the exact product",
                dtype.name()
            );
            for (&x, &y) in bits(&fast).iter().zip(&exact_bits) {
                let apart = (ulp_index(x) - ulp_index(y)).abs();
                let (got, want) = (rounded(x), rounded(y));
                // More than one ulp only for results near zero, where a ulp is smaller than
                // f32's error on unit-scale terms.
                let close = (got - want).abs() <= 1e-6;
                assert!(apart <= 1 || close, "{}: {got} vs {want}", dtype.name());
                differing += (apart > 0) as usize;
                total += 1;
            }
        }
        // Apart only where the exact product lies within f32's error of a rounding boundary.
        assert!(differing * 100 < total, "{}: {differing} of {total} differ", dtype.name());
    }
}

#[test]
fn complete_basis_keeps_the_columns_and_makes_the_skip_a_zero_extension() {
    for (d, k) in [(8, 3), (16, 16), (12, 1), (24, 20)] {
        let q = random_orthogonal(d, 11).as_ref().subcols(0, k).to_owned();
        let full = complete_basis(q.as_ref());
        assert_eq!((full.nrows(), full.ncols()), (d, d));
        for i in 0..d {
            for j in 0..k {
                assert_eq!(full[(i, j)], q[(i, j)], "column {j} of q is not kept as it is");
            }
        }
        let gram = shortcut(full.as_ref(), full.as_ref());
        let s = shortcut(q.as_ref(), full.as_ref());
        for i in 0..d {
            for j in 0..d {
                let identity = if i == j { 1.0 } else { 0.0 };
                assert!((gram[(i, j)] - identity).abs() < 1e-12, "d {d}, k {k}: not orthogonal");
                if i < k {
                    assert!((s[(i, j)] - identity).abs() < 1e-12, "d {d}, k {k}: skip not [I 0]");
                }
            }
        }
    }
}
