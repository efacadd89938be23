//! No panic on any input: seeded mutations of every fixture (flipped, truncated, inserted and
//! overwritten bytes; removed nodes, cycles, missing inputs, wrong dtypes and dims, changed
//! operators and attributes) go through the loader, `inspect`, structure detection and the exact
//! rewrite. Every case must end in `Ok` or a typed error.
//!
//! Bounded for CI: `ONNX_SLICE_MUTATIONS` cases (default 2,000), at most `ONNX_SLICE_MUTATION_SECONDS`
//! seconds (default 60). The long run in docs/testing.md sets both higher.
//! `ONNX_SLICE_MUTATION_SCOPE=detect` stops each case after the loader, `inspect` and structure
//! detection (about a quarter of the time per case), for runs of a million inputs; the default
//! (`rewrite`) also rewrites and encodes the model.
mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use onnx_slice::graph::{AttrValue, DataType, Model};
use onnx_slice::slicegpt::{self as transform, Dimensions, FixedBasis as Orientation};
use onnx_slice::{inspect, onnx};

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The fixtures as bytes and as loaded models (models with external data are loaded from their file
/// for IR mutations only: bytes in memory cannot refer to external data).
fn bases() -> Vec<(String, Bytes, Model)> {
    common::all_models()
        .into_iter()
        .map(|(arch, exporter, path)| {
            let model = onnx::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (format!("{arch}/{exporter}"), Bytes::from(common::read(&path)), model)
        })
        .collect()
}

/// Everything a user's model goes through before calibration. Errors are fine; panics are not.
fn exercise(model: &Model) {
    let _ = inspect::summarize(model);
    let _ = inspect::describe_layout(model, true);
    if detection_only() {
        return;
    }
    let mut rewritten = model.clone();
    let dims = Dimensions { ratio: 0.25, ..Dimensions::default() };
    if transform::rotate(&mut rewritten, Orientation::Random { seed: 1 }, &dims).is_ok() {
        let _ = onnx::to_bytes(&rewritten);
    }
}

fn detection_only() -> bool {
    static DETECT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DETECT.get_or_init(|| match std::env::var("ONNX_SLICE_MUTATION_SCOPE").as_deref() {
        Ok("detect") => true,
        Ok("rewrite") | Err(_) => false,
        Ok(other) => panic!("ONNX_SLICE_MUTATION_SCOPE must be detect or rewrite, got {other}"),
    })
}

fn exercise_bytes(bytes: Vec<u8>) {
    if let Ok(model) = onnx::load_from_bytes(Bytes::from(bytes)) {
        exercise(&model);
    }
}

/// A byte position, half of the time in the file's first 64 KiB or last 16 KiB, where the graph's
/// nodes and its inputs and outputs are encoded (the middle is mostly weight bytes).
fn position(rng: &mut ChaCha8Rng, len: usize) -> usize {
    match rng.random_range(0..4) {
        0 => rng.random_range(0..len.min(65536)),
        1 => len - 1 - rng.random_range(0..len.min(16384)),
        _ => rng.random_range(0..len),
    }
}

fn mutate_bytes(rng: &mut ChaCha8Rng, original: &[u8]) -> (String, Vec<u8>) {
    let mut bytes = original.to_vec();
    let len = bytes.len();
    match rng.random_range(0..4) {
        0 => {
            let flips = rng.random_range(1..=8);
            for _ in 0..flips {
                let at = position(rng, len);
                bytes[at] ^= 1 << rng.random_range(0..8);
            }
            (format!("{flips} bit flips"), bytes)
        }
        1 => {
            let at = position(rng, len);
            bytes.truncate(at);
            (format!("truncated at {at}"), bytes)
        }
        2 => {
            let at = position(rng, len);
            let field = random_field(rng);
            bytes.splice(at..at, field.iter().copied());
            (format!("{} bytes inserted at {at}", field.len()), bytes)
        }
        _ => {
            let at = position(rng, len);
            let span = rng.random_range(1..=32).min(len - at);
            rng.fill(&mut bytes[at..at + span]);
            (format!("{span} bytes overwritten at {at}"), bytes)
        }
    }
}

/// A protobuf field with a random number and wire type: a varint, a length-delimited payload
/// (possibly claiming more bytes than follow), or fixed 32/64-bit data.
fn random_field(rng: &mut ChaCha8Rng) -> Vec<u8> {
    let number: u64 = rng.random_range(1..40);
    let wire: u64 = [0, 1, 2, 5][rng.random_range(0..4)];
    let mut out = Vec::new();
    varint(&mut out, (number << 3) | wire);
    match wire {
        0 => varint(&mut out, rng.random::<u64>() >> rng.random_range(0..64)),
        1 => out.extend(rng.random::<u64>().to_le_bytes()),
        5 => out.extend(rng.random::<u32>().to_le_bytes()),
        _ => {
            let payload: Vec<u8> = (0..rng.random_range(0..24)).map(|_| rng.random()).collect();
            let claimed = if rng.random_bool(0.2) {
                payload.len() as u64 + rng.random_range(1..1000)
            } else {
                payload.len() as u64
            };
            varint(&mut out, claimed);
            out.extend(payload);
        }
    }
    out
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

const DTYPES: [DataType; 8] = [
    DataType::Int8,
    DataType::Int64,
    DataType::String,
    DataType::Bool,
    DataType::Float16,
    DataType::Double,
    DataType::Bfloat16,
    DataType::Other(99),
];

fn mutate_graph(rng: &mut ChaCha8Rng, model: &mut Model) -> String {
    let graph = &mut model.graph;
    let nodes = graph.nodes.len();
    let inits = graph.initializers.len();
    if nodes == 0 || inits == 0 {
        return "nothing to mutate".into();
    }
    let n = rng.random_range(0..nodes);
    match rng.random_range(0..10) {
        0 => {
            graph.nodes.remove(n);
            format!("node {n} removed")
        }
        1 => {
            let later = rng.random_range(n..nodes);
            let Some(output) = graph.nodes[later].outputs.first().cloned() else {
                return "no output".into();
            };
            let slots = graph.nodes[n].inputs.len();
            if slots == 0 {
                return "no input".into();
            }
            graph.nodes[n].inputs[rng.random_range(0..slots)] = output;
            format!("cycle: node {n} reads node {later}")
        }
        2 => {
            let slots = graph.nodes[n].inputs.len();
            if slots == 0 {
                return "no input".into();
            }
            graph.nodes[n].inputs[rng.random_range(0..slots)] = "onnx_slice_test_missing".into();
            format!("node {n} reads a missing value")
        }
        3 => {
            let i = rng.random_range(0..inits);
            graph.initializers[i].dtype = DTYPES[rng.random_range(0..DTYPES.len())];
            format!("initializer {i} dtype changed")
        }
        4 => {
            let i = rng.random_range(0..inits);
            let dims = &mut graph.initializers[i].dims;
            match rng.random_range(0..3) {
                0 => dims.reverse(),
                1 => {
                    dims.pop();
                }
                _ => dims.push(rng.random_range(-1..3)),
            }
            format!("initializer {i} dims changed")
        }
        5 => {
            let other = graph.nodes[rng.random_range(0..nodes)].op_type.clone();
            graph.nodes[n].op_type = other;
            format!("node {n} op changed")
        }
        6 => {
            let node = &mut graph.nodes[n];
            if node.attributes.is_empty() {
                node.inputs.clear();
                return format!("node {n} inputs cleared");
            }
            let a = rng.random_range(0..node.attributes.len());
            node.attributes[a].value = match rng.random_range(0..3) {
                0 => AttrValue::Int(rng.random_range(-5..5)),
                1 => AttrValue::Ints(vec![rng.random_range(-3..3); rng.random_range(0..4)]),
                _ => AttrValue::Float(f32::NAN),
            };
            format!("node {n} attribute {a} changed")
        }
        7 => {
            let i = rng.random_range(0..inits);
            graph.initializers.remove(i);
            format!("initializer {i} removed")
        }
        8 => {
            graph.inputs.clear();
            graph.outputs.truncate(rng.random_range(0..2));
            "graph inputs and outputs dropped".into()
        }
        _ => {
            graph.nodes[n].outputs.clear();
            format!("node {n} outputs cleared")
        }
    }
}

/// Where the last panic happened and what it said (the hook sees the location, the payload does not).
static LAST_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

#[test]
fn mutated_models_end_in_ok_or_a_typed_error() {
    let cases = setting("ONNX_SLICE_MUTATIONS", 2000);
    let budget = Duration::from_secs(setting("ONNX_SLICE_MUTATION_SECONDS", 60));
    let seed = setting("ONNX_SLICE_MUTATION_SEED", 7);
    let scope = if detection_only() { "detect" } else { "rewrite" };
    let bases = bases();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let started = Instant::now();
    let mut panics = Vec::new();
    let mut done = 0u64;
    std::panic::set_hook(Box::new(|info| {
        *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(info.to_string());
    }));
    while done < cases && started.elapsed() < budget {
        let (name, bytes, model) = &bases[rng.random_range(0..bases.len())];
        let in_ir = rng.random_bool(0.5);
        let (what, outcome) = if in_ir {
            let mut mutated = model.clone();
            let what = mutate_graph(&mut rng, &mut mutated);
            (what, catch_unwind(AssertUnwindSafe(|| exercise(&mutated))))
        } else if common::has_external_data(
            model.source.as_ref().map(|s| s.path.as_path()).unwrap_or(std::path::Path::new("")),
        ) {
            continue;
        } else {
            let (what, mutated) = mutate_bytes(&mut rng, bytes);
            (what, catch_unwind(AssertUnwindSafe(|| exercise_bytes(mutated))))
        };
        if outcome.is_err() {
            let message = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take();
            panics.push(format!("case {done} ({name}, {what}): {}", message.unwrap_or_default()));
        }
        done += 1;
    }
    let _ = std::panic::take_hook();
    eprintln!(
        "{done} mutated models in {:.1} s (seed {seed}, scope {scope}), {} panics",
        started.elapsed().as_secs_f64(),
        panics.len()
    );
    assert!(done >= cases.min(200), "only {done} cases ran in the time budget");
    assert!(
        panics.is_empty(),
        "{} of {done} cases panicked:\n{}",
        panics.len(),
        panics.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}
