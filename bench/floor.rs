//! How fast SliceGPT on SmolLM2-135M could possibly be on this machine: the arithmetic that one
//! calibration pass, the f64 PCA and the rotations cannot avoid, timed at this machine's own
//! matrix-product throughput, against half the reference's time (the 2× target).
//!
//! `cargo run --release --example floor`
//!
//! Every term is a lower bound: each product is charged at the throughput of a large, well-shaped
//! product on all cores (faer; ONNX Runtime's MatMuls reach the same, about 140 GFLOP/s, on the
//! 2-core development machine), and everything that is not a matrix product (the softmax and
//! mask, norms, rotary, loading, sessions, saving) is left out.
use std::time::Instant;

use faer::{Accum, Mat};
use onnx_slice::pca::{principal_basis, Covariance, DEFAULT_DAMPING};
use onnx_slice::slicegpt::Dimensions;

/// SmolLM2-135M (LLaMA): width, layers, attention width, key/value width, MLP width, vocabulary.
const D: usize = 576;
const LAYERS: usize = 30;
const ATTENTION: usize = 576;
const KEY_VALUE: usize = 192;
const MLP: usize = 1536;
const VOCABULARY: usize = 49152;
const HEAD_DIM: usize = 64;
/// The reference's calibration: 32 samples × 512 tokens.
const SAMPLES: usize = 32;
const SEQLEN: usize = 512;
/// ../shared/tools/smollm2/REFERENCE.md: rotate_and_slice seconds per ratio (TransformerCompression, 2 threads).
const REFERENCE: [(f64, f64); 5] =
    [(0.0, 92.6), (0.1, 94.0), (0.2, 88.8), (0.25, 89.7), (0.3, 84.1)];

fn main() {
    let f32_rate = gemm_rate::<f32>();
    let f64_rate = gemm_rate::<f64>();
    let eigh = eigh_seconds();
    println!("this machine: f32 products {:.0} GFLOP/s, f64 products {:.0} GFLOP/s, one {D}×{D} eigendecomposition {:.3} s", f32_rate / 1e9, f64_rate / 1e9, eigh);
    println!();
    println!("| ratio | k | forward (f32) | covariance (f64) | eigh | projection (f32) | rotation (f64) | floor s | reference s / 2 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (ratio, reference) in REFERENCE {
        let k = width(ratio);
        let tokens = (SAMPLES * SEQLEN) as f64;
        let points = (2 * LAYERS + 1) as f64;
        let (dk, df) = (k as f64, D as f64);
        // Readers take the sliced width k, writers give the full width D (the PCA needs it).
        let readers = dk * (ATTENTION + 2 * KEY_VALUE + 2 * MLP) as f64;
        let writers = (ATTENTION + MLP) as f64 * df;
        let attention = 2.0
            * 2.0
            * (SAMPLES * (ATTENTION / HEAD_DIM)) as f64
            * (SEQLEN * SEQLEN * HEAD_DIM) as f64;
        let forward = LAYERS as f64 * (2.0 * tokens * (readers + writers) + attention) / f32_rate;
        let covariance = points * tokens * df * (df + 1.0) / f64_rate;
        let eigens = points * eigh;
        let projection = (points - 1.0) * 2.0 * tokens * df * dk / f32_rate;
        let weights = LAYERS as f64 * (readers * df + writers * dk) * 2.0
            + 2.0 * VOCABULARY as f64 * df * (dk + df);
        let rotation = weights / f64_rate;
        let floor = forward + covariance + eigens + projection + rotation;
        println!(
            "| {ratio} | {k} | {forward:.1} | {covariance:.1} | {eigens:.1} | {projection:.1} | {rotation:.1} | {floor:.1} | {:.1} |",
            reference / 2.0
        );
    }
}

/// k as the CLI chooses it (rounded down to a multiple of 8).
fn width(ratio: f64) -> usize {
    Dimensions { ratio, ..Dimensions::default() }.sliced_width(D)
}

/// Floating-point operations per second of a calibration-shaped product (4096 tokens × D by D × D),
/// the best of 5 rounds (a peak: other load on the machine only lowers it).
fn gemm_rate<T: faer::traits::ComplexField + From<f32>>() -> f64 {
    let (m, k, n) = (4096, D, D);
    let a = Mat::<T>::from_fn(m, k, |i, j| T::from(((i * 7 + j * 3) % 11) as f32 * 0.1));
    let b = Mat::<T>::from_fn(k, n, |i, j| T::from(((i * 5 + j) % 13) as f32 * 0.1));
    let mut c = Mat::<T>::zeros(m, n);
    let mut product = || {
        faer::linalg::matmul::matmul(
            c.as_mut(),
            Accum::Replace,
            a.as_ref(),
            b.as_ref(),
            T::from(1.0),
            faer::get_global_parallelism(),
        )
    };
    product();
    let repeats = 20;
    (0..5)
        .map(|_| {
            let started = Instant::now();
            (0..repeats).for_each(|_| product());
            2.0 * (m * k * n * repeats) as f64 / started.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// The library's own PCA of a D×D covariance (best of 3).
fn eigh_seconds() -> f64 {
    let rows: Vec<f32> =
        (0..4096 * D).map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut cov = Covariance::new(D);
    cov.add_rows(&rows, None);
    (0..3)
        .map(|_| {
            let started = Instant::now();
            principal_basis(&cov, DEFAULT_DAMPING).expect("PCA of finite rows");
            started.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
