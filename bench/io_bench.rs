//! Load and save throughput against `cp` of the same files, in one process on one machine.
//!
//! `cargo run --release --example io_bench -- MODEL.onnx [REPEATS]` (see bench/README.md).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use onnx_slice::onnx::{self, SaveOptions, Storage};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model_path = PathBuf::from(
        args.first().ok_or_else(|| anyhow::anyhow!("usage: io_bench MODEL.onnx [REPEATS]"))?,
    );
    let repeats: usize = args.get(1).map(|r| r.parse()).transpose()?.unwrap_or(3);
    let scratch = tempfile::tempdir()?;
    let inputs = input_files(&model_path)?;
    let total: u64 =
        inputs.iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
    println!(
        "model: {} ({:.1} MB in {} file(s)), {repeats} repeats, median",
        model_path.display(),
        mb(total),
        inputs.len()
    );

    let cp = median(repeats, || {
        for p in &inputs {
            let status = Command::new("cp")
                .arg(p)
                .arg(scratch.path().join(p.file_name().unwrap()))
                .status()?;
            anyhow::ensure!(status.success(), "cp failed");
        }
        Ok(())
    })?;
    let load = median(repeats, || {
        let model = onnx::load(&model_path)?;
        std::hint::black_box(touch_all_tensor_bytes(&model));
        Ok(())
    })?;
    let model = onnx::load(&model_path)?;
    let inline_fits = onnx::to_bytes(&model).is_ok();
    let save_inline = if inline_fits {
        Some(median(repeats, || {
            save(&model, &scratch.path().join("inline.onnx"), Storage::Inline)
        })?)
    } else {
        None
    };
    let save_external =
        median(repeats, || save(&model, &scratch.path().join("external.onnx"), Storage::External))?;

    println!("{:<34} {:>9} {:>9} {:>12}", "operation", "seconds", "MB/s", "time vs cp");
    row("cp (baseline)", cp, total, cp);
    row("load (mmap + read every tensor)", load, total, cp);
    if let Some(t) = save_inline {
        row("save inline", t, total, cp);
    }
    row("save external data", save_external, total, cp);
    Ok(())
}

fn save(model: &onnx_slice::graph::Model, path: &Path, storage: Storage) -> anyhow::Result<()> {
    onnx::save(model, path, &SaveOptions { storage, ..Default::default() })?;
    Ok(())
}

/// The model file and its external data files.
fn input_files(model_path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let model = onnx::load(model_path)?;
    let mut files = vec![model_path.to_path_buf()];
    files.extend(model.source.map(|s| s.external_files).unwrap_or_default());
    Ok(files)
}

fn touch_all_tensor_bytes(model: &onnx_slice::graph::Model) -> u64 {
    let mut acc = 0u64;
    for t in &model.graph.initializers {
        if let Some(bytes) = t.raw_bytes() {
            acc = bytes.chunks(8).fold(acc, |a, c| a.wrapping_add(c[0] as u64));
        }
    }
    acc
}

fn median(repeats: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn row(name: &str, seconds: f64, bytes: u64, baseline: f64) {
    println!(
        "{name:<34} {seconds:>9.3} {:>9.0} {:>11.2}x",
        mb(bytes) / seconds,
        seconds / baseline
    );
}
