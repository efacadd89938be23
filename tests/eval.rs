//! Perplexity: the library function against an independent computation, on models with and
//! without a KV cache; text windows; the command's flags.
mod common;

use std::path::Path;

use common::reference::{cpu, open};
use common::{fixture, scratch};
use ndarray::{Array2, ArrayD};
use onnx_slice::eval::{perplexity, text_windows, window_nll};
use onnx_slice::interface::load_tokenizer;
use onnx_slice::interface::InputPlan;
use onnx_slice::runtime::{Dim, ModelSession, TensorValue};

const VOCAB: usize = 1000;

/// Deterministic pseudo-random token ids in 3..VOCAB (an LCG; no special tokens).
fn windows(count: usize, length: usize, seed: u64) -> Vec<Vec<i64>> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..count)
        .map(|_| {
            (0..length)
                .map(|_| {
                    state =
                        state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    3 + ((state >> 33) % (VOCAB as u64 - 3)) as i64
                })
                .collect()
        })
        .collect()
}

/// Logits of one window, fed by hand: every input the model declares, an empty KV cache of the
/// fixture's head size (16 for llama) for past inputs.
fn logits_by_hand(session: &mut ModelSession, window: &[i64]) -> ArrayD<f32> {
    let length = window.len();
    let ids = Array2::from_shape_vec((1, length), window.to_vec()).unwrap().into_dyn();
    let inputs: Vec<(String, TensorValue)> = session
        .inputs()
        .iter()
        .map(|input| {
            let value = match input.name.as_str() {
                "input_ids" => TensorValue::I64(ids.clone()),
                "attention_mask" => TensorValue::I64(ArrayD::ones(vec![1, length])),
                "position_ids" => TensorValue::I64(
                    Array2::from_shape_fn((1, length), |(_, t)| t as i64).into_dyn(),
                ),
                name if name.starts_with("past_key_values.") => {
                    let heads = match input.dims[1] {
                        Dim::Fixed(heads) => heads as usize,
                        ref other => panic!("{name}: heads {other:?}"),
                    };
                    TensorValue::F32(ArrayD::zeros(vec![1, heads, 0, 16]))
                }
                other => panic!("unexpected input {other}"),
            };
            (input.name.clone(), value)
        })
        .collect();
    let named: Vec<(&str, &TensorValue)> =
        inputs.iter().map(|(name, value)| (name.as_str(), value)).collect();
    session.run_for(&named, &["logits"]).unwrap().remove("logits").unwrap().into_f32().unwrap()
}

/// The reference method written out plainly: per window, the mean over t of
/// `log Σ_v exp(z[t][v]) − z[t][ids[t+1]]` in f64; the mean of those; exp.
fn perplexity_by_hand(
    session: &mut ModelSession,
    windows: &[Vec<i64>],
    ignore: Option<i64>,
) -> (f64, usize) {
    let mut means = Vec::new();
    let mut tokens = 0;
    for window in windows {
        let logits = logits_by_hand(session, window);
        let mut sum = 0.0f64;
        let mut count = 0;
        for t in 0..window.len() - 1 {
            let target = window[t + 1];
            if Some(target) == ignore {
                continue;
            }
            let row: Vec<f64> = (0..VOCAB).map(|v| f64::from(logits[[0, t, v]])).collect();
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let log_z = max + row.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
            sum += log_z - row[target as usize];
            count += 1;
        }
        if count > 0 {
            means.push(sum / count as f64);
            tokens += count;
        }
    }
    ((means.iter().sum::<f64>() / means.len() as f64).exp(), tokens)
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

#[test]
fn perplexity_matches_an_independent_computation() {
    let model = fixture("llama/optimum/model.onnx");
    let mut session = open(&model, &cpu());
    let data = windows(5, 24, 1);
    let (expected, expected_tokens) = perplexity_by_hand(&mut session, &data, None);

    let mut calls = Vec::new();
    let result =
        perplexity(&mut session, &data, None, 2, &mut |done, total| calls.push((done, total)))
            .unwrap();
    assert!(result.value.is_finite() && result.value >= 1.0, "{result:?}");
    assert!(relative(result.value, expected) < 1e-5, "{} vs {expected}", result.value);
    assert!((result.mean_nll.exp() - result.value).abs() < 1e-12);
    assert_eq!(result.windows, 5);
    assert_eq!(result.tokens, expected_tokens);
    assert_eq!(result.tokens, 5 * 23);
    assert_eq!(calls, [(2, 5), (4, 5), (5, 5)], "progress after every run");

    let one_by_one = perplexity(&mut session, &data, None, 1, &mut |_, _| {}).unwrap();
    assert!(relative(one_by_one.value, expected) < 1e-9, "batch 1 is exactly the hand computation");
    // A random tiny model predicts close to uniformly: perplexity near the vocabulary size.
    assert!(
        result.value > 0.5 * VOCAB as f64 && result.value < 2.0 * VOCAB as f64,
        "{}",
        result.value
    );
}

#[test]
fn ignored_targets_leave_the_mean() {
    let model = fixture("llama/optimum/model.onnx");
    let mut session = open(&model, &cpu());
    let mut data = windows(3, 20, 2);
    for window in &mut data {
        for t in (1..20).step_by(3) {
            window[t] = 2;
        }
    }
    data[2] = vec![2; 20]; // every target ignored: this window does not count
    data[2][0] = 5;
    let (expected, expected_tokens) = perplexity_by_hand(&mut session, &data, Some(2));
    let result = perplexity(&mut session, &data, Some(2), 1, &mut |_, _| {}).unwrap();
    assert!(relative(result.value, expected) < 1e-9, "{} vs {expected}", result.value);
    assert_eq!(result.tokens, expected_tokens);
    assert_eq!(result.tokens, 2 * (19 - 7));
    assert_eq!(result.windows, 2);
    let all = perplexity(&mut session, &data, None, 1, &mut |_, _| {}).unwrap();
    assert_ne!(all.value, result.value);
}

#[test]
fn kv_cache_exports_get_an_empty_past_and_agree_with_the_plain_export() {
    let data = windows(3, 16, 3);
    let mut plain = open(&fixture("llama/optimum/model.onnx"), &cpu());
    let baseline = perplexity(&mut plain, &data, None, 3, &mut |_, _| {}).unwrap();

    let mut past = open(&fixture("llama/optimum_past/model.onnx"), &cpu());
    let plan = InputPlan::for_session(&past, None).unwrap();
    assert!(plan.has_past());
    let (expected, _) = perplexity_by_hand(&mut past, &data, None);
    let result = perplexity(&mut past, &data, None, 2, &mut |_, _| {}).unwrap();
    assert!(relative(result.value, expected) < 1e-5, "{} vs {expected}", result.value);
    assert!(
        relative(result.value, baseline.value) < 1e-5,
        "{} vs {}",
        result.value,
        baseline.value
    );

    // onnxruntime-genai: head size symbolic in the graph, read from genai_config.json.
    let genai_path = fixture("llama/genai/model.onnx");
    let mut genai = open(&genai_path, &cpu());
    assert!(genai.inputs().iter().any(|input| matches!(input.dims.get(3), Some(Dim::Symbolic(_)))));
    let result = perplexity(&mut genai, &data, None, 2, &mut |_, _| {}).unwrap();
    assert!(
        relative(result.value, baseline.value) < 1e-4,
        "{} vs {}",
        result.value,
        baseline.value
    );
}

#[test]
fn every_exporter_of_an_architecture_gives_the_same_perplexity() {
    let data = windows(2, 12, 4);
    for arch in ["gpt2", "opt", "qwen2", "phi", "gpt_neox"] {
        let mut values = Vec::new();
        for exporter in ["ts17", "dynamo", "optimum", "optimum_past", "ortopt_l1", "genai"] {
            let path = common::fixtures_dir().join(arch).join(exporter).join("model.onnx");
            if !path.exists() {
                continue;
            }
            let mut session = open(&path, &cpu());
            let result = perplexity(&mut session, &data, None, 2, &mut |_, _| {})
                .unwrap_or_else(|error| panic!("{arch} {exporter}: {error}"));
            values.push((exporter, result.value));
        }
        let first = values[0].1;
        for (exporter, value) in &values {
            // phi genai uses exact Gelu where the model uses gelu_new (fixtures/README.md).
            let tolerance = if *exporter == "genai" { 1e-3 } else { 1e-5 };
            assert!(relative(*value, first) < tolerance, "{arch}: {values:?}");
        }
    }
}

#[test]
fn uniform_logits_give_the_vocabulary_size() {
    let logits = Array2::<f32>::zeros((6, 50));
    let ids = [0, 7, 49, 3, 3, 12];
    let (sum, count) = window_nll(logits.view(), &ids, None).unwrap();
    assert_eq!(count, 5);
    assert!(((sum / count as f64).exp() - 50.0).abs() < 1e-9);
    let (_, count) = window_nll(logits.view(), &ids, Some(3)).unwrap();
    assert_eq!(count, 3);
    // A sure prediction costs nothing.
    let mut sure = Array2::<f32>::from_elem((2, 4), -1e4);
    sure[[0, 2]] = 0.0;
    let (sum, count) = window_nll(sure.view(), &[1, 2], None).unwrap();
    assert_eq!(count, 1);
    assert!(sum.abs() < 1e-12);
    let error = window_nll(logits.view(), &[0, 50], None).unwrap_err();
    assert!(error.to_string().contains("vocabulary"), "{error}");
}

#[test]
fn text_is_joined_tokenized_and_cut_into_whole_windows() {
    let tokenizer = load_tokenizer(&fixture("_hf/llama/tokenizer.json")).unwrap();
    let words =
        |range: std::ops::Range<u32>| range.map(|i| format!("t{i}")).collect::<Vec<_>>().join(" ");
    let texts = vec![format!("{}\n\n\n{}", words(3..40), words(40..50)), words(50..60)];
    let windows = text_windows(&tokenizer, &texts, 10).unwrap();
    assert_eq!(windows.len(), 5, "57 tokens: 5 whole windows, the rest dropped");
    for (w, window) in windows.iter().enumerate() {
        let start = 3 + 10 * w as i64;
        assert_eq!(window, &(start..start + 10).collect::<Vec<i64>>());
    }
    let error = text_windows(&tokenizer, &texts, 100).unwrap_err().to_string();
    assert!(error.contains("57 tokens"), "{error}");
}

/// `onnx-slice eval ARGS…`, which must exit with `code`; returns what it printed.
fn eval_command(args: &[&str], code: i32) -> common::cli::Outcome {
    let run = common::cli::onnx_slice(std::iter::once("eval").chain(args.iter().copied()));
    assert_eq!(run.code, Some(code), "eval {args:?}: {}", run.stderr);
    run
}

fn write_ids(path: &Path, rows: &[Vec<i64>]) {
    let data: Vec<u8> = rows.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
    common::write_npy(path, "<i8", &[rows.len(), rows[0].len()], &data);
}

#[test]
fn the_command_reads_ids_or_text() {
    common::reference::runtime();
    let dir = scratch();
    let ids = dir.path().join("ids.npy");
    write_ids(&ids, &windows(3, 16, 5));
    let model = fixture("llama/optimum_past/model.onnx");
    let model = model.to_str().unwrap();

    let run = eval_command(
        &[
            model,
            "--ids",
            ids.to_str().unwrap(),
            "--ignore-id",
            "2",
            "--batch",
            "2",
            "--json",
            "--max-windows",
            "2",
        ],
        0,
    );
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json["windows"], 2);
    assert_eq!(json["ignore_id"], 2);

    let text = dir.path().join("text.txt");
    std::fs::write(&text, (3..200).map(|i| format!("t{i}")).collect::<Vec<_>>().join(" ")).unwrap();
    let tokenizer = fixture("_hf/llama/tokenizer.json");
    let text = text.to_str().unwrap();
    let run = eval_command(
        &[
            model,
            "--text",
            text,
            "--text",
            text,
            "--seqlen",
            "64",
            "--tokenizer",
            tokenizer.to_str().unwrap(),
            "--ep",
            "cpu",
        ],
        0,
    );
    assert!(run.stdout.contains("× 64 tokens"), "{}", run.stdout);

    // The tokenizer is looked for beside the model.
    let alone = dir.path().join("model.onnx");
    std::fs::copy(model, &alone).unwrap();
    let args = [alone.to_str().unwrap(), "--text", text, "--seqlen", "64"];
    let error = eval_command(&args, 2).stderr;
    assert!(error.contains("tokenizer.json") && error.contains("--tokenizer"), "{error}");
    std::fs::copy(&tokenizer, dir.path().join("tokenizer.json")).unwrap();
    eval_command(&args, 0);

    // --text or --ids is required, not both; the execution provider is one onnx-slice knows.
    eval_command(&[model], 2);
    eval_command(&[model, "--ids", "a.npy", "--text", "b.txt"], 2);
    eval_command(&[model, "--ids", "a.npy", "--ep", "tpu"], 2);
}

/// Manual check on SmolLM2-135M (not in the repository): `cargo test --release --test eval -- --ignored`.
/// The reference: 37.2852 (dense optimum export through ONNX Runtime, float64 log-softmax).
#[test]
#[ignore = "needs ~/.cache/onnx-slice-models/smollm2 and ../shared/tools/smollm2"]
fn smollm2_brown_perplexity() {
    let home = std::env::var("HOME").unwrap();
    let model = format!("{home}/.cache/onnx-slice-models/smollm2/smollm2-onnx/plain/model.onnx");
    let ids = std::env::var("SMOLLM2_EVAL_IDS").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/tools/smollm2/eval_ids_brown.npy").into()
    });
    let mut args = vec![model.as_str(), "--ids", ids.as_str(), "--ignore-id", "2", "--json"];
    let batch = std::env::var("SMOLLM2_BATCH").unwrap_or_default();
    if !batch.is_empty() {
        args.extend(["--batch", batch.as_str()]);
    }
    let start = std::time::Instant::now();
    let limit = onnx_slice::interface::position_limit(&onnx_slice::onnx::load(&model).unwrap());
    eprintln!(
        "position limit {limit:?} (model loaded and inspected in {:.1} s)",
        start.elapsed().as_secs_f64()
    );
    let run = eval_command(&args, 0);
    eprintln!("{}eval command: {:.1} s in all", run.stdout, run.seconds);
}

/// Manual check of the text path on SmolLM2: `SMOLLM2_TEXT=FILE cargo test --release --test eval --
/// --ignored smollm2_text`. Uses the tokenizer.json beside the model.
#[test]
#[ignore = "needs ~/.cache/onnx-slice-models/smollm2 and SMOLLM2_TEXT"]
fn smollm2_text_perplexity() {
    let home = std::env::var("HOME").unwrap();
    let model = format!("{home}/.cache/onnx-slice-models/smollm2/smollm2-onnx/plain/model.onnx");
    let text = std::env::var("SMOLLM2_TEXT").expect("set SMOLLM2_TEXT to an evaluation text file");
    let windows = std::env::var("SMOLLM2_MAX_WINDOWS").unwrap_or_else(|_| "8".into());
    let args = [
        model.as_str(),
        "--text",
        text.as_str(),
        "--seqlen",
        "512",
        "--max-windows",
        windows.as_str(),
    ];
    print!("{}", eval_command(&args, 0).stdout);
}

#[test]
fn the_plan_from_the_graph_declarations_equals_the_plan_from_a_session_on_every_fixture() {
    for (arch, exporter, path) in common::all_models() {
        let model = onnx_slice::onnx::load(&path).unwrap();
        let session = open(&path, &cpu());
        let from_session = InputPlan::for_session(&session, Some(&path)).unwrap();
        let from_graph = InputPlan::for_graph(&model.graph, "model", Some(&path)).unwrap();
        assert_eq!(from_graph, from_session, "{arch}/{exporter}");
    }
}
