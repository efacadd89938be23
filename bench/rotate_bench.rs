//! The rotation of float16 weights, f32 products against f64 ones, in one process: one decoder
//! layer's weights of a LLaMA shape (default LLaMA-2-7B: D = 4096, MLP 11008, sliced to k = 3072),
//! rotated the way `rotate` does (readers `Qᵀ W`, writers `W Q`), with each precision in turn.
//!
//! `cargo run --release --example rotate_bench -- [D MLP K]`
//!
//! Prints seconds per precision, their ratio, and how many float16 results differ (by how much:
//! `algebra::Precision`).
use std::time::Instant;

use bytes::Bytes;
use half::f16;
use onnx_slice::algebra::{random_orthogonal, rotate_in, Precision, Side};
use onnx_slice::graph::{DataType, Tensor};
use onnx_slice::structure::WeightLayout;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn float16_weight(name: &str, rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Tensor {
    let bytes: Vec<u8> = (0..rows * cols)
        .flat_map(|_| f16::from_f32((rng.random::<f32>() - 0.5) * 0.04).to_le_bytes())
        .collect();
    Tensor::from_raw(name, DataType::Float16, vec![rows as i64, cols as i64], Bytes::from(bytes))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let [d, mlp, k] = match args[..] {
        [] => [4096, 11008, 3072],
        [d, mlp, k] => [d, mlp, k],
        _ => anyhow::bail!("usage: rotate_bench [D MLP K]"),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // MatMul weights as exporters store them: [in, out].
    let readers: Vec<Tensor> = [("q", d), ("k", d), ("v", d), ("gate", mlp), ("up", mlp)]
        .iter()
        .map(|&(name, out)| float16_weight(name, d, out, &mut rng))
        .collect();
    let writers = [float16_weight("o", d, d, &mut rng), float16_weight("down", mlp, d, &mut rng)];
    let q = random_orthogonal(d, 7);
    let q = q.subcols(0, k);
    println!(
        "one layer: D = {d}, MLP = {mlp}, k = {k}, float16 weights, faer {:?}",
        faer::get_global_parallelism()
    );

    let rotate_layer = |precision: Precision| -> anyhow::Result<(f64, Vec<Tensor>)> {
        let start = Instant::now();
        let mut out = Vec::new();
        for w in &readers {
            out.push(rotate_in(precision, Side::Reader, w, WeightLayout::InOut, q)?);
        }
        for w in &writers {
            out.push(rotate_in(precision, Side::Writer, w, WeightLayout::InOut, q)?);
        }
        Ok((start.elapsed().as_secs_f64(), out))
    };
    let (f64_s, exact) = rotate_layer(Precision::F64)?;
    let (f32_s, fast) = rotate_layer(Precision::F32)?;
    let (mut differ, mut total) = (0usize, 0usize);
    for (a, b) in fast.iter().zip(&exact) {
        let (a, b) = (a.raw_bytes().expect("raw"), b.raw_bytes().expect("raw"));
        differ += a.chunks_exact(2).zip(b.chunks_exact(2)).filter(|(x, y)| x != y).count();
        total += a.len() / 2;
    }
    println!("f64 products: {f64_s:.2} s");
    println!("f32 products: {f32_s:.2} s");
    println!("f64 / f32: {:.2}x", f64_s / f32_s);
    println!(
        "float16 results that differ: {differ} of {total} ({:.4} %)",
        100.0 * differ as f64 / total as f64
    );
    Ok(())
}
