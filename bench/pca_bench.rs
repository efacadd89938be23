//! PCA cost per stream point: `H = Σ xᵀx` accumulation throughput and eigendecomposition time.
//!
//! `cargo run --release --example pca_bench -- [WIDTHS...]` (default 576 1024 2048 4096).
//! Threads: faer's global parallelism (rayon's global pool; `RAYON_NUM_THREADS` sizes it).
use std::time::{Duration, Instant};

use onnx_slice::pca::{principal_basis, Covariance, DEFAULT_DAMPING};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Stop timing accumulation after about this long per width.
const ACCUMULATE_BUDGET: Duration = Duration::from_secs(6);
/// Rows per `add_rows` call (one calibration sequence of 2048 tokens).
const ROWS_PER_CALL: usize = 2048;
const EIGEN_LIMIT_S: f64 = 60.0;

fn main() -> anyhow::Result<()> {
    let widths: Vec<usize> = {
        let args: Vec<usize> =
            std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
        if args.is_empty() {
            vec![576, 1024, 2048, 4096]
        } else {
            args
        }
    };
    println!(
        "faer parallelism: {:?}, cores: {}",
        faer::get_global_parallelism(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:>6} {:>12} {:>10} {:>12} {:>10} {:>16}",
        "d", "rows/s", "GFLOP/s", "s/262144 rows", "eigh s", "same bits twice"
    );
    let mut last_eigen: Option<(usize, f64)> = None;
    for d in widths {
        let mut rng = ChaCha8Rng::seed_from_u64(d as u64);
        // A few distinct sequences, reused, so generating data is not what we time.
        let sequences: Vec<Vec<f32>> = (0..4)
            .map(|_| {
                (0..ROWS_PER_CALL * d)
                    .map(|i| (rng.random::<f32>() - 0.5) * (1 + i % 7) as f32)
                    .collect()
            })
            .collect();
        let mask: Vec<bool> = (0..ROWS_PER_CALL).map(|i| i % 16 != 15).collect();
        let kept = mask.iter().filter(|&&m| m).count();

        let mut cov = Covariance::new(d);
        cov.add_rows(&sequences[0], Some(&mask)); // warm-up (allocations, thread pool)
        let mut cov = Covariance::new(d);
        let start = Instant::now();
        let mut calls = 0;
        while start.elapsed() < ACCUMULATE_BUDGET || calls < 2 {
            cov.add_rows(&sequences[calls % sequences.len()], Some(&mask));
            calls += 1;
        }
        let seconds = start.elapsed().as_secs_f64();
        let rows = (calls * kept) as f64;
        assert_eq!(cov.tokens(), rows as u64);
        let rows_per_s = rows / seconds;
        // Lower triangle: d(d+1)/2 multiply-adds per row.
        let gflops = rows * (d * (d + 1)) as f64 / seconds / 1e9;

        // Eigendecomposition: skip when the cubic extrapolation from a smaller width exceeds the limit.
        let predicted = last_eigen.map(|(d0, s0)| s0 * (d as f64 / d0 as f64).powi(3));
        let (eigen, same) = if predicted.is_some_and(|p| p > EIGEN_LIMIT_S) {
            (format!("skip (~{:.0})", predicted.unwrap()), "-".to_string())
        } else {
            let t = Instant::now();
            let a = principal_basis(&cov, DEFAULT_DAMPING)?;
            let s = t.elapsed().as_secs_f64();
            last_eigen = Some((d, s));
            let same = if s < 20.0 {
                let b = principal_basis(&cov, DEFAULT_DAMPING)?;
                let identical = a
                    .eigenvalues
                    .iter()
                    .zip(&b.eigenvalues)
                    .all(|(x, y)| x.to_bits() == y.to_bits())
                    && (0..d).all(|j| {
                        a.q.col_as_slice(j)
                            .iter()
                            .zip(b.q.col_as_slice(j))
                            .all(|(x, y)| x.to_bits() == y.to_bits())
                    });
                identical.to_string()
            } else {
                "-".to_string()
            };
            (format!("{s:.3}"), same)
        };
        println!(
            "{:>6} {:>12.0} {:>10.1} {:>12.2} {:>10} {:>16}",
            d,
            rows_per_s,
            gflops,
            (128 * 2048) as f64 / rows_per_s,
            eigen,
            same
        );
    }
    Ok(())
}
