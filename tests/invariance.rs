//! Computational invariance (docs/design.md §1, §7) on every fixture, checked against ONNX Runtime running
//! the ORIGINAL model, or against counts derived independently of the rewrite:
//!
//! 1. fusing the norms, and fusing + rotating by random orthogonal matrices (ratio 0, with every
//!    `--basis` grouping), leave the logits unchanged (max |Δ| ≤ 1e-4) on the reference input, on
//!    a left-padded batch, and, for
//!    KV-cache exports, on a second decoding step fed with each model's own `present.*` outputs
//!    (whose K/V must match too);
//! 2. slicing (random Q, ratio 0.25) gives a model that passes `onnx.checker` (full check), runs
//!    with the same interface (input/output names, element types, symbolic and fixed dims) and
//!    output shapes, and has exactly the parameter count the layout predicts, term by term; a
//!    tied head still reads the one table; the library's size prediction (`--dry-run`, size
//!    targets) equals what the rewrite writes, for every `--basis`;
//! 3. operator counts: no norm op left, one `onnx_slice/norm*/ReduceMean` per norm, one
//!    `onnx_slice/shortcut*` MatMul per segment (of the predicted k_a × k_b);
//! 4. graphs the library cannot handle give errors naming a node, never panics (library and binary).
//!
//! Failures are collected over all fixtures and reported together. Run with `--nocapture` to see
//! the largest differences measured per fixture.
mod common;

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::checker::{checker_python, onnx_checker_failures};
use common::reference::{cpu, feed, runtime, Cache, Reference};
use common::{all_models, fixture, scratch};
use ndarray::{ArrayD, Axis, IxDyn};
use onnx_slice::graph::{DataType, Dim, Graph, Model, Node, Tensor, ValueInfo};
use onnx_slice::onnx::{self, SaveOptions};
use onnx_slice::runtime::{ModelSession, TensorValue};
use onnx_slice::size;
use onnx_slice::slicegpt::{
    self as transform, BasisMode, Dimensions, FixedBasis as Orientation, Rewritten,
};
use onnx_slice::structure::Layout;

const TOLERANCE: f32 = 1e-4;
/// The id fed at padded positions: `</s>` of the fixtures' tokenizer (any valid id would do).
const PAD_ID: i64 = 2;
/// Left-padding positions in the padded row.
const PADDING: usize = 3;
/// The slicing ratio of check 2 and 3.
const RATIO: f64 = 0.25;

const NORM_OPS: [&str; 5] = [
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "RMSNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
];

// ---------------------------------------------------------------------------------------------
// Fixtures and the facts about them that do not come from the library.

struct Fixture {
    arch: String,
    exporter: String,
    path: PathBuf,
    model: Model,
    meta: Meta,
}

/// From the fixture's meta.json, written by the exporter script (not by onnx-slice).
struct Meta {
    layers: usize,
    hidden: usize,
    vocab: usize,
    head_dim: usize,
    /// The model ties its head to the token embedding (the exporter's word, not onnx-slice's).
    tied: bool,
}

impl Fixture {
    fn all() -> Vec<Fixture> {
        all_models()
            .into_iter()
            .map(|(arch, exporter, path)| {
                let model = onnx::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let meta = Meta::read(&path.with_file_name("meta.json"));
                Fixture { arch, exporter, path, model, meta }
            })
            .collect()
    }

    fn name(&self) -> String {
        format!("{}/{}", self.arch, self.exporter)
    }

    fn dir(&self) -> &Path {
        self.path.parent().unwrap()
    }

    /// Exports with a KV cache: optimum's `_past` variant and onnxruntime-genai's.
    fn has_cache(&self) -> bool {
        matches!(self.exporter.as_str(), "optimum_past" | "genai")
    }

    /// opset-23 dynamo exports run in ONNX Runtime at batch 1 only (an exporter/runtime bug with
    /// their RotaryEmbedding nodes, see fixtures/README.md): they get batch-1 variants of every
    /// input below.
    fn batch_one_only(&self) -> bool {
        self.exporter == "dynamo23"
    }

    /// Phi and GPT-NeoX have parallel blocks (one segment per block), the others two per block.
    fn parallel(&self) -> bool {
        matches!(self.arch.as_str(), "phi" | "gpt_neox")
    }

    /// Phi's parallel block has ONE norm feeding both branches; GPT-NeoX has two.
    fn norm_count(&self) -> usize {
        if self.arch == "phi" {
            self.meta.layers + 1
        } else {
            2 * self.meta.layers + 1
        }
    }

    fn segment_count(&self) -> usize {
        if self.parallel() {
            self.meta.layers
        } else {
            2 * self.meta.layers
        }
    }
}

impl Meta {
    fn read(path: &Path) -> Meta {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // dynamo23's meta.json records NaN logit differences (not JSON): they are not read here.
        let json: serde_json::Value = serde_json::from_str(&text.replace("NaN", "null")).unwrap();
        let number = |key: &str| {
            json[key].as_u64().unwrap_or_else(|| panic!("{}: no {key}", path.display())) as usize
        };
        let tied = json["tied_embeddings"]
            .as_bool()
            .unwrap_or_else(|| panic!("{}: no tied_embeddings", path.display()));
        Meta {
            layers: number("num_layers"),
            hidden: number("hidden_size"),
            vocab: number("vocab_size"),
            head_dim: number("head_dim"),
            tied,
        }
    }
}

/// Runs `check` on every fixture, turning panics into failures of that fixture, so that all
/// fixtures are checked before the test fails.
fn for_each_fixture(what: &str, check: impl FnMut(&Fixture, &mut Vec<String>)) {
    let failures = check_each_fixture(check);
    assert!(failures.is_empty(), "{what}: {} failure(s):\n{}", failures.len(), failures.join("\n"));
}

/// The failures of `check` over all fixtures, each line prefixed by the fixture's name.
fn check_each_fixture(mut check: impl FnMut(&Fixture, &mut Vec<String>)) -> Vec<String> {
    runtime();
    let mut failures = Vec::new();
    for fixture in Fixture::all() {
        let mut found = Vec::new();
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&fixture, &mut found))) {
            found.push(format!("panicked: {}", panic_message(&panic)));
        }
        failures.extend(found.into_iter().map(|f| format!("{}: {f}", fixture.name())));
    }
    failures
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Inputs and runs.

/// Token inputs of one run (position_ids is fed only to models that declare it).
#[derive(Clone)]
struct Tokens {
    input_ids: ArrayD<i64>,
    attention_mask: ArrayD<i64>,
    position_ids: ArrayD<i64>,
}

impl Tokens {
    fn reference(fixture: &Fixture) -> Tokens {
        let r = Reference::for_exporter(&fixture.arch, &fixture.exporter);
        Tokens {
            input_ids: r.input_ids,
            attention_mask: r.attention_mask,
            position_ids: r.position_ids,
        }
    }

    /// Row 0: the reference's row 0. Row 1: `PADDING` left-padding positions (attention_mask 0,
    /// id `PAD_ID`) then the first tokens of the reference's row 1; position_ids =
    /// cumsum(mask) − 1 with padded positions set to 1, as Hugging Face computes them.
    /// Batch-1-only exports get row 1 alone.
    fn left_padded(fixture: &Fixture) -> Tokens {
        let r = Reference::load(&fixture.arch);
        let len = r.input_ids.shape()[1];
        let mut ids = r.input_ids.clone();
        let mut mask = ArrayD::<i64>::ones(IxDyn(&[2, len]));
        for j in 0..len {
            if j < PADDING {
                ids[[1, j]] = PAD_ID;
                mask[[1, j]] = 0;
            } else {
                ids[[1, j]] = r.input_ids[[1, j - PADDING]];
            }
        }
        let mut positions = ArrayD::<i64>::zeros(IxDyn(&[2, len]));
        for b in 0..2 {
            let mut seen = 0;
            for j in 0..len {
                seen += mask[[b, j]];
                positions[[b, j]] = if mask[[b, j]] == 0 { 1 } else { seen - 1 };
            }
        }
        let tokens = Tokens { input_ids: ids, attention_mask: mask, position_ids: positions };
        if fixture.batch_one_only() {
            tokens.row(1)
        } else {
            tokens
        }
    }

    fn row(&self, b: usize) -> Tokens {
        let row = |a: &ArrayD<i64>| a.slice_axis(Axis(0), (b..b + 1).into()).to_owned();
        Tokens {
            input_ids: row(&self.input_ids),
            attention_mask: row(&self.attention_mask),
            position_ids: row(&self.position_ids),
        }
    }

    /// One more token per row after these: ids `first_id + b`, mask extended by one 1, the next
    /// position.
    fn next_step(&self, first_id: i64) -> Tokens {
        let (batch, len) = (self.input_ids.shape()[0], self.attention_mask.shape()[1]);
        let ids = ArrayD::from_shape_fn(IxDyn(&[batch, 1]), |i| first_id + i[0] as i64);
        let mask = ArrayD::from_shape_fn(IxDyn(&[batch, len + 1]), |i| {
            if i[1] < len {
                self.attention_mask[[i[0], i[1]]]
            } else {
                1
            }
        });
        let last = self.position_ids.shape()[1] - 1;
        let positions =
            ArrayD::from_shape_fn(IxDyn(&[batch, 1]), |i| self.position_ids[[i[0], last]] + 1);
        Tokens { input_ids: ids, attention_mask: mask, position_ids: positions }
    }
}

/// Runs all outputs; returns the logits and the `present.*` outputs.
fn run(
    session: &mut ModelSession,
    tokens: &Tokens,
    past: Option<&Cache>,
    head_dim: usize,
) -> Result<(ArrayD<f32>, Cache), String> {
    let inputs = feed(
        session,
        &tokens.input_ids,
        &tokens.attention_mask,
        &tokens.position_ids,
        past,
        head_dim,
    )?;
    let named: Vec<(&str, &TensorValue)> = inputs.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let outputs = session.run(&named).map_err(|e| e.to_string())?;
    let mut logits = None;
    let mut cache = Cache::new();
    for (name, value) in outputs.into_vec() {
        let value = value.into_f32().map_err(|e| format!("output {name}: {e}"))?;
        if name == "logits" {
            logits = Some(value);
        } else if name.starts_with("present.") {
            cache.insert(name, value);
        }
    }
    Ok((logits.ok_or("no logits output")?, cache))
}

/// What check 1 compares: logits on the reference and the left-padded input, and for KV-cache
/// models the presents of a prompt step and the logits and presents of the next step.
struct Outputs {
    reference: ArrayD<f32>,
    padded: ArrayD<f32>,
    cached: Option<CachedSteps>,
}

struct CachedSteps {
    prompt_presents: Cache,
    step_logits: ArrayD<f32>,
    step_presents: Cache,
}

fn session_for(model: &Model, fixture: &Fixture) -> Result<ModelSession, String> {
    let bytes = onnx::to_bytes(model).map_err(|e| e.to_string())?;
    // The fixture's directory, for genai's external data (rewritten tensors are inline).
    ModelSession::from_bytes(&bytes, Some(fixture.dir()), &cpu()).map_err(|e| e.to_string())
}

fn outputs_of(model: &Model, fixture: &Fixture) -> Result<Outputs, String> {
    let mut session = session_for(model, fixture)?;
    let head_dim = fixture.meta.head_dim;
    let reference_tokens = Tokens::reference(fixture);
    let (reference, prompt_presents) = run(&mut session, &reference_tokens, None, head_dim)
        .map_err(|e| format!("reference input: {e}"))?;
    let (padded, _) = run(&mut session, &Tokens::left_padded(fixture), None, head_dim)
        .map_err(|e| format!("left-padded input: {e}"))?;
    let cached = if fixture.has_cache() {
        // Each model is fed its OWN presents: the rewritten model's cache is checked by what the
        // next step computes from it, and compared with the original's.
        let step = reference_tokens.next_step(5);
        let (step_logits, step_presents) =
            run(&mut session, &step, Some(&prompt_presents), head_dim)
                .map_err(|e| format!("cached step: {e}"))?;
        // The step must really have used the cache: every present is one position longer.
        let prompt_len = reference_tokens.attention_mask.shape()[1];
        if let Some((name, p)) =
            step_presents.iter().find(|(_, p)| p.shape().get(2) != Some(&(prompt_len + 1)))
        {
            return Err(format!(
                "cached step: {name} has shape {:?}, expected {} positions",
                p.shape(),
                prompt_len + 1
            ));
        }
        Some(CachedSteps { prompt_presents, step_logits, step_presents })
    } else {
        None
    };
    Ok(Outputs { reference, padded, cached })
}

/// Largest |a − b|; a NaN anywhere counts as infinitely far, different shapes as an error.
fn diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> Result<f32, String> {
    if a.shape() != b.shape() {
        return Err(format!("shape {:?}, expected {:?}", a.shape(), b.shape()));
    }
    Ok(a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, |m, d| {
        if d.is_nan() {
            f32::INFINITY
        } else {
            m.max(d)
        }
    }))
}

fn cache_diff(got: &Cache, expected: &Cache) -> Result<f32, String> {
    if got.keys().ne(expected.keys()) {
        return Err(format!(
            "presents {:?}, expected {:?}",
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>()
        ));
    }
    got.iter().zip(expected.values()).try_fold(0.0f32, |m, ((name, g), e)| {
        Ok(m.max(diff(g, e).map_err(|why| format!("{name}: {why}"))?))
    })
}

/// Compares every output of `got` with the original's; returns `(label, max diff)` pairs.
fn compare(got: &Outputs, expected: &Outputs) -> Vec<(&'static str, Result<f32, String>)> {
    let mut out = vec![
        ("reference logits", diff(&got.reference, &expected.reference)),
        ("left-padded logits", diff(&got.padded, &expected.padded)),
    ];
    if let (Some(g), Some(e)) = (&got.cached, &expected.cached) {
        out.push(("prompt presents", cache_diff(&g.prompt_presents, &e.prompt_presents)));
        out.push(("cached-step logits", diff(&g.step_logits, &e.step_logits)));
        out.push(("cached-step presents", cache_diff(&g.step_presents, &e.step_presents)));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 1. Fusion and rotation (ratio 0) keep the function.

type Rewrite = dyn Fn(&mut Model) -> onnx_slice::Result<Rewritten>;

#[test]
fn fusion_and_random_rotation_keep_logits_and_kv_cache_on_reference_padded_and_cached_inputs() {
    let mut report = Vec::new();
    for_each_fixture(
        "fused / rotated logits differ from the original model's",
        |fixture, failures| {
            let expected = match outputs_of(&fixture.model, fixture) {
                Ok(outputs) => outputs,
                Err(e) => return failures.push(format!("the ORIGINAL model does not run: {e}")),
            };
            // Left padding: the original's logits at padded positions are finite in every fixture, so
            // ALL positions are compared, padded ones included (a NaN counts as a failure).
            if !expected.padded.iter().all(|v| v.is_finite()) {
                failures.push("the original's left-padded logits are not all finite: this test compares every position".into());
            }
            let rotated = |basis: BasisMode| -> Box<Rewrite> {
                Box::new(move |m: &mut Model| {
                    transform::rotate(
                        m,
                        Orientation::Random { seed: 7 },
                        &Dimensions { basis, ..Dimensions::default() },
                    )
                })
            };
            let variants: [(&str, Box<Rewrite>); 4] = [
                ("fused", Box::new(|m: &mut Model| transform::fuse(m))),
                ("rotated (random Q, ratio 0, basis point)", rotated(BasisMode::Point)),
                ("basis block", rotated(BasisMode::Block)),
                ("basis global", rotated(BasisMode::Global)),
            ];
            let mut line = format!("{:<22}", fixture.name());
            for (variant, rewrite) in &variants {
                let mut model = fixture.model.clone();
                let got = rewrite(&mut model)
                    .map_err(|e| e.to_string())
                    .and_then(|_| outputs_of(&model, fixture));
                let got = match got {
                    Ok(got) => got,
                    Err(e) => {
                        failures.push(format!("{variant}: {e}"));
                        continue;
                    }
                };
                let mut worst = 0.0f32;
                for (what, result) in compare(&got, &expected) {
                    match result {
                        Ok(d) if d <= TOLERANCE => worst = worst.max(d),
                        Ok(d) => failures
                            .push(format!("{variant}: {what}: max |Δ| = {d:e} > {TOLERANCE:e}")),
                        Err(e) => failures.push(format!("{variant}: {what}: {e}")),
                    }
                }
                line += &format!("  {variant}: {worst:.2e}");
            }
            report.push(line);
        },
    );
    eprintln!(
        "max |Δ| over reference, left-padded and cached-step outputs:\n{}",
        report.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Sliced models: valid ONNX, same interface, predicted size.

/// Elements of floating-point initializers. Integer initializers are shape constants and indices,
/// not parameters (the rewrite adds some when it re-targets stream Reshapes to the new widths).
fn float_parameters(model: &Model) -> i64 {
    model.graph.initializers.iter().filter(|t| is_float(t.dtype)).map(|t| t.numel() as i64).sum()
}

fn is_float(dtype: DataType) -> bool {
    matches!(dtype, DataType::Float | DataType::Float16 | DataType::Bfloat16 | DataType::Double)
}

/// Whether the ORIGINAL graph reads one `[V, D]` (or `[D, V]`) initializer both as the token
/// embedding (Gather) and as the LM head (MatMul/Gemm), directly or through a Transpose: the
/// rewrite must then give the head its own copy (docs/design.md §1, "Tied embeddings").
fn shares_embedding_with_head(graph: &Graph, vocab: usize, width: usize) -> bool {
    let table_sized = |t: &&Tensor| t.dims.len() == 2 && t.numel() as usize == vocab * width;
    graph.initializers.iter().filter(table_sized).any(|table| {
        let mut names = vec![table.name.clone()];
        names.extend(
            graph
                .nodes
                .iter()
                .filter(|n| n.op_type == "Transpose" && n.inputs.first() == Some(&table.name))
                .map(|n| n.outputs[0].clone()),
        );
        let reads = |op: &[&str], slot: usize| {
            graph.nodes.iter().any(|n| {
                op.contains(&n.op_type.as_str())
                    && n.inputs.get(slot).is_some_and(|i| names.contains(i))
            })
        };
        reads(&["Gather"], 0) && reads(&["MatMul", "Gemm"], 1)
    })
}

/// The sliced model's float parameter count, predicted term by term from the ORIGINAL model, the
/// layout `fuse` finds in it, and the widths k_p at the stream points. Returns the terms.
fn predicted_parameters(
    fixture: &Fixture,
    fused: &Model,
    layout: &Layout,
    widths: &[usize],
    sliced: &Model,
) -> Result<Vec<(String, i64)>, String> {
    let original = &fixture.model.graph;
    let d = layout.width as i64;
    let k = |p: usize| widths[p] as i64;
    let mut terms =
        vec![("original float parameters".to_string(), float_parameters(&fixture.model))];
    let mut term = |name: &str, value: i64| terms.push((name.to_string(), value));

    // Fusion: every norm's γ and β are folded into its readers and disappear.
    let mut folded = HashSet::new();
    let mut norm_vectors = 0;
    for branch in layout.branches() {
        for name in [&branch.norm.gamma, &branch.norm.beta].into_iter().flatten() {
            if let Some(t) = original.initializer(name).filter(|t| is_float(t.dtype)) {
                if folded.insert(name.clone()) {
                    norm_vectors += t.numel() as i64;
                }
            }
        }
    }
    term("- norm scales and shifts (γ, β) folded into readers", -norm_vectors);
    // ... and the norms' scalar constants (eps, exponent) that were initializers go with them.
    // Only scalars are counted here, so no sliced weight can hide in this term.
    let sliced_names: HashSet<&str> =
        sliced.graph.initializers.iter().map(|t| t.name.as_str()).collect();
    let dropped_scalars: i64 = original
        .initializers
        .iter()
        .filter(|t| is_float(t.dtype) && t.numel() <= 1 && !sliced_names.contains(t.name.as_str()))
        .map(|t| t.numel() as i64)
        .sum();
    term("- scalar constants of the removed norm nodes", -dropped_scalars);
    // A tied head keeps reading the one table; an export's duplicate copy of it goes.
    let (vocab, hidden) = (fixture.meta.vocab, fixture.meta.hidden);
    let duplicate = if fixture.meta.tied && !shares_embedding_with_head(original, vocab, hidden) {
        (vocab * hidden) as i64
    } else {
        0
    };
    term("- the head's duplicate of the tied table", -duplicate);
    // A LayerNorm β folded into a reader without a bias creates that bias: `b = β W` (out).
    // (The fixtures' β are random, never all zero.)
    let new_biases: i64 = layout
        .branches()
        .filter(|b| b.norm.beta.is_some())
        .flat_map(|b| b.readers.iter())
        .filter(|r| r.bias.is_none())
        .map(|r| r.out_features as i64)
        .sum();
    term("+ biases created for bias-less readers of a norm with β", new_biases);
    // The rewrite's own scalars (the exponent 2, an ε per norm) and the norms' gain vectors (not
    // the shortcuts, counted below).
    let mut rewrite_constants = 0;
    let mut gains = Vec::new();
    let rewrite_matrix =
        |name: &str| name.starts_with("onnx_slice.shortcut") || name.contains("_adapter");
    for t in sliced
        .graph
        .initializers
        .iter()
        .filter(|t| t.name.starts_with("onnx_slice.") && !rewrite_matrix(&t.name))
    {
        if t.name.starts_with("onnx_slice.norm.gain") {
            gains.push(norm_gain_width(t, layout.width)?);
            continue;
        }
        if t.numel() > 1 {
            return Err(format!("initializer {} {:?} is not a scalar constant", t.name, t.dims));
        }
        if is_float(t.dtype) {
            rewrite_constants += t.numel() as i64;
        }
    }
    term("+ rewrite scalar constants (onnx_slice.*, not shortcuts)", rewrite_constants);
    // One gain vector per stream width, shared by the norms reading points of that width.
    let mut distinct = widths.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    gains.sort_unstable();
    if gains != distinct {
        return Err(format!(
            "norm gain vectors of widths {gains:?}, expected one per stream width {distinct:?}"
        ));
    }
    term("+ norm gains, one per stream width", distinct.iter().sum::<usize>() as i64);

    // Slicing. Embedding tables V×D → V×k_0 (token and learned positions).
    let table_rows = |name: &str| {
        fused
            .graph
            .initializer(name)
            .map(|t| t.numel() as i64 / d)
            .ok_or(format!("no table {name}"))
    };
    let mut embeddings = 0;
    for (i, e) in layout.embeddings.iter().enumerate() {
        if i > 0 || !fixture.meta.tied {
            embeddings -= table_rows(&e.table)? * (d - k(0));
        }
    }
    term("- embedding tables V×D → V×k_0 (not a tied one)", embeddings);
    let last = widths.len() - 1;
    let adapters = if fixture.meta.tied { d * k(0) + k(last) * d } else { 0 };
    term("+ a tied table's adapters D×k_0 (embedding) and k_L×D (head)", adapters);
    let (mut readers, mut writers, mut writer_biases, mut shortcuts) = (0, 0, 0, 0);
    for (i, segment) in layout.segments.iter().enumerate() {
        // Readers (q/k/v, fc1/gate/up) in×out → k_a×out (their bias, over out, stays).
        for r in segment.branches.iter().flat_map(|b| b.readers.iter()) {
            if r.in_features as i64 != d {
                return Err(format!(
                    "reader {} reads {} features, not D = {d}",
                    r.node_name, r.in_features
                ));
            }
            readers -= (d - k(i)) * r.out_features as i64;
        }
        // Writers (out-proj, down/fc2) in×D → in×k_b, bias D → k_b.
        for w in &segment.writers {
            if w.out_features as i64 != d {
                return Err(format!(
                    "writer {} writes {} features, not D = {d}",
                    w.node_name, w.out_features
                ));
            }
            writers -= w.in_features as i64 * (d - k(i + 1));
            if w.bias.is_some() {
                writer_biases -= d - k(i + 1);
            }
        }
        // One k_a × k_b residual-path rotation per segment; the last one, into the head's
        // unsliced input, is a zero Pad where the opset has Pad's `axes` (18), without weights.
        let pads = i == last - 1 && k(last) == d && pads_skips(sliced);
        if !pads {
            shortcuts += k(i) * k(i + 1);
        }
    }
    term("- readers in×out → k_a×out", readers);
    term("- writers in×D → in×k_b", writers);
    term("- writer biases D → k_b", writer_biases);
    term("+ shortcuts k_a×k_b, one per segment", shortcuts);
    let head: i64 = if fixture.meta.tied {
        0
    } else {
        layout.head.readers.iter().map(|r| -(d - k(last)) * r.out_features as i64).sum()
    };
    term("- head D×V → k_L×V (not a tied one)", head);
    Ok(terms)
}

/// The width k of a norm gain vector, which must hold k copies of √(D/k) (fuse::rms_norm).
fn norm_gain_width(gain: &Tensor, d: usize) -> Result<usize, String> {
    let values = gain.to_f32().map_err(|e| format!("{}: {e}", gain.name))?;
    let k = values.len();
    let expected = (d as f64 / k as f64).sqrt();
    let wrong = values.iter().find(|&&v| (v as f64 - expected).abs() > 1e-3 * expected);
    if gain.dims != [k as i64] || wrong.is_some() {
        return Err(format!(
            "norm gain {} {:?} is not {k} × √(D/k) = {expected}",
            gain.name, gain.dims
        ));
    }
    Ok(k)
}

#[test]
fn sliced_models_are_valid_onnx_with_the_same_interface_and_the_predicted_parameter_count() {
    // First, so that a missing checker fails the test at once.
    let python = checker_python();
    let dir = scratch();
    let mut saved: Vec<(String, PathBuf)> = Vec::new();
    let mut report = Vec::new();
    let dims = Dimensions { ratio: RATIO, ..Dimensions::default() };
    let mut failures = check_each_fixture(|fixture, failures| {
        // The layout and widths, from the ORIGINAL model (fuse on a clone).
        let mut fused = fixture.model.clone();
        let layout = match transform::fuse(&mut fused) {
            Ok(rewritten) => rewritten.layout,
            Err(e) => return failures.push(format!("fuse: {e}")),
        };
        let widths = dims.widths(&layout);
        let mut sliced = fixture.model.clone();
        if let Err(e) = transform::rotate(&mut sliced, Orientation::Random { seed: 3 }, &dims) {
            return failures.push(format!("rotate (ratio {RATIO}): {e}"));
        }

        // (e) a tied head reads the one table the embedding reads: one V×D initializer.
        if fixture.meta.tied {
            let tables = sliced
                .graph
                .initializers
                .iter()
                .filter(|t| t.numel() as usize == fixture.meta.vocab * fixture.meta.hidden)
                .count();
            if tables != 1 {
                failures.push(format!(
                    "tied head: {tables} initializers of V×D elements, expected the one table"
                ));
            }
        }
        // (f) what `--dry-run` and the size targets predict is what the rewrite writes, for every
        // basis grouping.
        let mut analysed = fixture.model.clone();
        match onnx_slice::analysis::analyze(&mut analysed)
            .and_then(|analysis| size::Plan::new(&analysed, &analysis))
        {
            Ok(plan) => {
                for basis in [BasisMode::Point, BasisMode::Block, BasisMode::Global] {
                    let dims = Dimensions { basis, ..dims };
                    let mut model = fixture.model.clone();
                    let rewritten =
                        match transform::rotate(&mut model, Orientation::Random { seed: 3 }, &dims)
                        {
                            Ok(r) => r,
                            Err(e) => return failures.push(format!("rotate (basis {basis}): {e}")),
                        };
                    let predicted = transform::widths::predict(&plan, &dims);
                    let written = size::weight_totals(&model.graph);
                    if predicted.widths != rewritten.widths
                        || predicted.after != written
                        || predicted.before != size::weight_totals(&fixture.model.graph)
                    {
                        failures.push(format!(
                            "basis {basis}: predicted widths {:?}, {:?}; written {:?}, {written:?}",
                            predicted.widths, predicted.after, rewritten.widths
                        ));
                    }
                }
            }
            Err(e) => failures.push(format!("size plan: {e}")),
        }

        // (d) parameter count.
        match predicted_parameters(fixture, &fused, &layout, &widths, &sliced) {
            Ok(terms) => {
                let predicted: i64 = terms.iter().map(|(_, v)| v).sum();
                let measured = float_parameters(&sliced);
                if measured != predicted {
                    let formula: Vec<String> =
                        terms.iter().map(|(name, v)| format!("    {v:>+9}  {name}")).collect();
                    failures.push(format!(
                        "float parameters {measured}, predicted {predicted} (off by {:+}); widths {widths:?}:\n{}",
                        measured - predicted,
                        formula.join("\n")
                    ));
                }
                report.push(format!(
                    "{:<22} {} → {} parameters, widths {widths:?}",
                    fixture.name(),
                    float_parameters(&fixture.model),
                    measured
                ));
            }
            Err(e) => failures.push(format!("parameter prediction: {e}")),
        }

        // (a, precisely) declared shapes of initializers (dynamo and genai exports declare their
        // weights in value_info) must be the sliced shapes: the checker's full check rejects a
        // stale one without naming it.
        let mut stale = Vec::new();
        for declared in sliced.graph.value_info.iter().chain(&sliced.graph.inputs) {
            let (Some(t), Some(shape)) =
                (sliced.graph.initializer(&declared.name), declared.shape())
            else {
                continue;
            };
            let dims: Vec<Dim> = t.dims.iter().map(|&d| Dim::Fixed(d)).collect();
            if shape != dims {
                let shown: Vec<String> = shape.iter().map(ToString::to_string).collect();
                stale.push(format!("{} declared [{}], is {:?}", t.name, shown.join(", "), t.dims));
            }
        }
        if !stale.is_empty() {
            failures.push(format!(
                "{} value_info entries give sliced initializers their old shapes, e.g. {}",
                stale.len(),
                stale[..stale.len().min(3)].join("; ")
            ));
        }

        // Written as the tool writes it (genai's external data: wherever `save` puts it), for the
        // checker and for ONNX Runtime.
        let file = dir.path().join(format!("{}-{}.onnx", fixture.arch, fixture.exporter));
        if let Err(e) = onnx::save(&sliced, &file, &SaveOptions::default()) {
            return failures.push(format!("save: {e}"));
        }
        saved.push((fixture.name(), file.clone()));

        // (b) interface and (c) output shapes, against the original in ONNX Runtime.
        let original = match ModelSession::from_file(&fixture.path, &cpu()) {
            Ok(s) => s,
            Err(e) => return failures.push(format!("the ORIGINAL model does not load: {e}")),
        };
        let mut sliced_session = match ModelSession::from_file(&file, &cpu()) {
            Ok(s) => s,
            Err(e) => {
                return failures
                    .push(format!("the sliced model does not load in ONNX Runtime: {e}"))
            }
        };
        if sliced_session.inputs() != original.inputs() {
            failures.push(format!(
                "inputs {:?}, the original has {:?}",
                sliced_session.inputs(),
                original.inputs()
            ));
        }
        if sliced_session.outputs() != original.outputs() {
            failures.push(format!(
                "outputs {:?}, the original has {:?}",
                sliced_session.outputs(),
                original.outputs()
            ));
        }
        let mut original = original;
        let tokens = Tokens::reference(fixture);
        let head_dim = fixture.meta.head_dim;
        let shapes = |session: &mut ModelSession| -> Result<Vec<(String, Vec<usize>)>, String> {
            let (logits, presents) = run(session, &tokens, None, head_dim)?;
            let mut shapes = vec![("logits".to_string(), logits.shape().to_vec())];
            shapes.extend(presents.iter().map(|(n, v)| (n.clone(), v.shape().to_vec())));
            if fixture.has_cache() {
                let (logits, presents) =
                    run(session, &tokens.next_step(5), Some(&presents), head_dim)?;
                shapes.push(("cached-step logits".into(), logits.shape().to_vec()));
                shapes.extend(
                    presents.iter().map(|(n, v)| (format!("cached-step {n}"), v.shape().to_vec())),
                );
            }
            Ok(shapes)
        };
        match (shapes(&mut sliced_session), shapes(&mut original)) {
            (Ok(got), Ok(expected)) if got == expected => {}
            (Ok(got), Ok(expected)) => {
                failures.push(format!("output shapes {got:?}, the original gives {expected:?}"))
            }
            (Err(e), _) => failures.push(format!("the sliced model does not run: {e}")),
            (_, Err(e)) => failures.push(format!("the ORIGINAL model does not run: {e}")),
        }
    });
    eprintln!("{}", report.join("\n"));

    // (a) the ONNX checker, full check, on every written model.
    // The originals are checked too, only to say in the message when a defect was already in the
    // export: the sliced model must pass regardless.
    let mut files: Vec<PathBuf> = saved.iter().map(|(_, f)| f.clone()).collect();
    files.extend(all_models().into_iter().map(|(_, _, path)| path));
    let verdicts = onnx_checker_failures(&python, &files);
    let original_verdict = |name: &str| {
        let path = fixture(&format!("{name}/model.onnx"));
        match verdicts.iter().find(|(f, _)| *f == path) {
            Some((_, why)) => format!("the original fails too: {why}"),
            None => "the original passes".to_string(),
        }
    };
    failures.extend(saved.iter().filter_map(|(name, file)| {
        verdicts.iter().find(|(f, _)| f == file).map(|(_, why)| {
            format!("{name}: onnx.checker full check: {why}\n    ({})", original_verdict(name))
        })
    }));
    assert!(
        failures.is_empty(),
        "sliced models: {} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Operator counts.

fn count(model: &Model, pred: impl Fn(&Node) -> bool) -> usize {
    model.graph.nodes.iter().filter(|n| pred(n)).count()
}

/// What check 3 expects of a rewritten model: no norm op, no decomposed norm (in these fixtures
/// every ReduceMean belongs to a norm: 2 per decomposed LayerNorm, 1 per decomposed RMSNorm), one
/// `onnx_slice/norm*/ReduceMean` per norm.
fn check_norms_replaced(model: &Model, fixture: &Fixture, what: &str, failures: &mut Vec<String>) {
    for op in NORM_OPS {
        let left = count(model, |n| n.op_type == op);
        if left > 0 {
            failures.push(format!("{what}: {left} {op} node(s) left"));
        }
    }
    let ours = |n: &Node| n.name.starts_with("onnx_slice/");
    let means = count(model, |n| n.op_type == "ReduceMean" && !ours(n));
    if means > 0 {
        failures.push(format!(
            "{what}: {means} ReduceMean node(s) left (a decomposed norm was not replaced)"
        ));
    }
    let rewritten = count(model, |n| n.op_type == "ReduceMean" && ours(n));
    if rewritten != fixture.norm_count() {
        failures.push(format!(
            "{what}: {rewritten} onnx_slice/* ReduceMean nodes, expected one per norm = {}",
            fixture.norm_count()
        ));
    }
}

/// Whether `model`'s opset lets the rewrite write a zero-extending skip as a Pad (`axes`: 18).
fn pads_skips(model: &Model) -> bool {
    model.opset_version("").is_some_and(|v| v >= 18)
}

#[test]
fn operator_counts_after_fusion_and_rotation() {
    let dims = Dimensions { ratio: RATIO, ..Dimensions::default() };
    for_each_fixture("operator counts", |fixture, failures| {
        let shortcut_nodes = |m: &Model| -> Vec<Node> {
            m.graph
                .nodes
                .iter()
                .filter(|n| n.name.starts_with("onnx_slice/shortcut"))
                .cloned()
                .collect()
        };

        let mut fused = fixture.model.clone();
        match transform::fuse(&mut fused) {
            Ok(_) => {
                check_norms_replaced(&fused, fixture, "fused", failures);
                let shortcuts = shortcut_nodes(&fused).len();
                if shortcuts > 0 {
                    failures.push(format!(
                        "fused: {shortcuts} onnx_slice/shortcut* nodes before any rotation"
                    ));
                }
            }
            Err(e) => failures.push(format!("fuse: {e}")),
        }

        let mut sliced = fixture.model.clone();
        let rewritten =
            match transform::rotate(&mut sliced, Orientation::Random { seed: 11 }, &dims) {
                Ok(r) => r,
                Err(e) => return failures.push(format!("rotate: {e}")),
            };
        check_norms_replaced(&sliced, fixture, "rotated", failures);
        // Widths, derived here: k = floor((1 − r)·D) rounded down to a multiple of 8 at every
        // point but the last, which keeps D (the head is not sliced by default).
        let d = fixture.meta.hidden;
        let k = ((1.0 - RATIO) * d as f64).floor() as usize / 8 * 8;
        let segments = fixture.segment_count();
        let widths: Vec<usize> =
            (0..=segments).map(|p| if p == segments { d } else { k }).collect();
        if rewritten.widths != widths {
            failures.push(format!("rotated: widths {:?}, expected {widths:?}", rewritten.widths));
        }
        // Exactly one shortcut per segment (2 per block, 1 per parallel block), named
        // onnx_slice/shortcut{i}: a MatMul by the k_i × k_{i+1} initializer onnx_slice.shortcut{i},
        // but for the last, into the unsliced head input: a Pad by D − k zeros on the last axis
        // (opset 18 and later).
        let nodes = shortcut_nodes(&sliced);
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        let expected_names: Vec<String> =
            (0..segments).map(|i| format!("onnx_slice/shortcut{i}")).collect();
        let mut sorted = names.clone();
        sorted.sort_by_key(|n| {
            n.trim_start_matches("onnx_slice/shortcut").parse::<usize>().unwrap_or(usize::MAX)
        });
        if sorted != expected_names {
            failures.push(format!(
                "rotated: shortcut nodes {names:?}, expected one per segment: {expected_names:?}"
            ));
        }
        for node in &nodes {
            let i: usize =
                node.name.trim_start_matches("onnx_slice/shortcut").parse().unwrap_or(usize::MAX);
            if i + 1 == segments && pads_skips(&sliced) {
                let constant = |j: usize| {
                    node.inputs
                        .get(j)
                        .and_then(|n| sliced.graph.initializer(n))
                        .and_then(|t| t.to_i64().ok())
                };
                let padded = node.op_type == "Pad"
                    && constant(1) == Some(vec![0, (d - k) as i64])
                    && node.inputs.get(2).is_some_and(String::is_empty)
                    && constant(3) == Some(vec![-1]);
                if !padded {
                    failures.push(format!(
                        "rotated: {} is {} of {:?}, expected Pad(skip, [0, D - k], , [-1])",
                        node.name, node.op_type, node.inputs
                    ));
                }
                continue;
            }
            let matrix = node.inputs.get(1).and_then(|m| sliced.graph.initializer(m));
            let ok = node.op_type == "MatMul"
                && matrix.is_some_and(|m| {
                    m.name == format!("onnx_slice.shortcut{i}")
                        && i < segments
                        && m.dims == [widths[i] as i64, widths[i + 1] as i64]
                });
            if !ok {
                failures.push(format!(
                    "rotated: {} is {} of {:?} ({:?}), expected MatMul by onnx_slice.shortcut{i} [k_{i}, k_{}] = {:?}",
                    node.name,
                    node.op_type,
                    node.inputs.get(1),
                    matrix.map(|m| m.dims.clone()),
                    i + 1,
                    widths.get(i..i + 2)
                ));
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 4. Errors, not panics.

/// `Err` message, or a failure description when the call succeeds or panics.
fn error_of(
    what: &str,
    call: impl FnOnce() -> onnx_slice::Result<Rewritten>,
) -> Result<String, String> {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Err(e)) => Ok(e.to_string()),
        Ok(Ok(_)) => Err(format!("{what}: transform::fuse succeeded, expected an error")),
        Err(panic) => Err(format!(
            "{what}: transform::fuse panicked instead of returning an error: {}",
            panic_message(&panic)
        )),
    }
}

/// The message must quote the name of one of `nodes` and say what was expected.
fn check_message(what: &str, message: &str, nodes: &[String]) -> Vec<String> {
    let mut failures = Vec::new();
    if !nodes.iter().any(|n| message.contains(&format!("'{n}'"))) {
        failures.push(format!("{what}: the error names none of the graph's nodes: {message}"));
    }
    if !message.contains("expected") {
        failures.push(format!("{what}: the error does not say what was expected: {message}"));
    }
    failures
}

/// Runs the binary's main command on `model`; it must fail with `error: ...` naming a node (no
/// panic) and write nothing.
fn check_binary(what: &str, model: &Path, nodes: &[String]) -> Vec<String> {
    let out_dir = scratch();
    let output = out_dir.path().join("out.onnx");
    let run = Command::new(env!("CARGO_BIN_EXE_onnx-slice"))
        .arg(model)
        .args([
            "-o",
            output.to_str().unwrap(),
            "--ratio",
            "0",
            "--orientation",
            "random-basis",
            "--seed",
            "1",
        ])
        .output()
        .expect("run onnx-slice");
    let stderr = String::from_utf8_lossy(&run.stderr);
    let mut failures = Vec::new();
    if run.status.success() {
        failures.push(format!("{what}: onnx-slice exited successfully"));
    }
    if run.status.code() == Some(101) || stderr.contains("panicked") {
        failures.push(format!("{what}: onnx-slice panicked: {stderr}"));
    }
    if !stderr.contains("error:") {
        failures.push(format!("{what}: no `error:` line on stderr: {stderr}"));
    }
    failures.extend(check_message(&format!("{what} (onnx-slice)"), &stderr, nodes));
    if std::fs::read_dir(out_dir.path()).map(|d| d.count()).unwrap_or(0) > 0 {
        failures.push(format!("{what}: onnx-slice wrote files although it failed"));
    }
    failures
}

fn node_names(model: &Model) -> Vec<String> {
    model.graph.nodes.iter().map(|n| n.name.clone()).filter(|n| !n.is_empty()).collect()
}

/// `input_ids → [Gather(E)] → MatMul → Relu → MatMul → logits`: no norm, no residual stream.
fn mlp(with_embedding: bool) -> Model {
    let mut g = Graph::new("mlp");
    let (batch, seq) = (Dim::Symbolic("batch".into()), Dim::Symbolic("sequence".into()));
    if with_embedding {
        g.inputs.push(ValueInfo::tensor(
            "input_ids",
            DataType::Int64,
            &[batch.clone(), seq.clone()],
        ));
        g.initializers.push(Tensor::from_f32("embedding", vec![16, 8], &[0.1; 128]));
        g.nodes.push(Node::new(
            "Gather",
            "embed",
            vec!["embedding".into(), "input_ids".into()],
            vec!["x".into()],
        ));
    } else {
        g.inputs.push(ValueInfo::tensor(
            "x",
            DataType::Float,
            &[batch.clone(), seq.clone(), Dim::Fixed(8)],
        ));
    }
    g.outputs.push(ValueInfo::tensor("logits", DataType::Float, &[batch, seq, Dim::Fixed(16)]));
    g.initializers.push(Tensor::from_f32("w1", vec![8, 32], &[0.1; 256]));
    g.initializers.push(Tensor::from_f32("w2", vec![32, 16], &[0.1; 512]));
    g.nodes.push(Node::new("MatMul", "fc1", vec!["x".into(), "w1".into()], vec!["h".into()]));
    g.nodes.push(Node::new("Relu", "relu", vec!["h".into()], vec!["a".into()]));
    g.nodes.push(Node::new("MatMul", "fc2", vec!["a".into(), "w2".into()], vec!["logits".into()]));
    Model::new(&[("", 17)], g)
}

#[test]
fn a_graph_that_is_not_a_transformer_is_an_error_naming_a_node() {
    let mut failures = Vec::new();
    for (what, with_embedding) in
        [("MatMul→Relu→MatMul", false), ("Gather→MatMul→Relu→MatMul", true)]
    {
        let model = mlp(with_embedding);
        let nodes = node_names(&model);
        match error_of(what, || transform::fuse(&mut model.clone())) {
            Ok(message) => failures.extend(check_message(what, &message, &nodes)),
            Err(failure) => failures.push(failure),
        }
        let dir = scratch();
        let file = dir.path().join("mlp.onnx");
        onnx::save(&model, &file, &SaveOptions::default()).unwrap();
        failures.extend(check_binary(what, &file, &nodes));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// llama/ts17 (decomposed RMSNorm `Cast>Pow(·,2)>ReduceMean>...`) with one norm's exponent 2
/// replaced by 3: that is no norm the matchers know.
fn llama_with_cubed_norm(which: usize) -> (Model, String) {
    let mut model = onnx::load(fixture("llama/ts17/model.onnx")).unwrap();
    let pows: Vec<usize> =
        (0..model.graph.nodes.len()).filter(|&i| model.graph.nodes[i].op_type == "Pow").collect();
    assert_eq!(pows.len(), 5, "llama/ts17 should have one Pow per norm");
    let i = pows[which];
    model.graph.initializers.push(Tensor::from_f32("exponent_three", vec![], &[3.0]));
    model.graph.nodes[i].inputs[1] = "exponent_three".into();
    let name = model.graph.nodes[i].name.clone();
    (model, name)
}

#[test]
fn an_unknown_norm_form_is_an_error_naming_a_node() {
    let mut failures = Vec::new();
    // The first block's input norm, and the final norm.
    for which in [0, 4] {
        let (model, pow) = llama_with_cubed_norm(which);
        let what = format!("llama/ts17 with {pow} cubing");
        let nodes = node_names(&model);
        match error_of(&what, || transform::fuse(&mut model.clone())) {
            Ok(message) => failures.extend(check_message(&what, &message, &nodes)),
            Err(failure) => failures.push(failure),
        }
        let dir = scratch();
        let file = dir.path().join("model.onnx");
        onnx::save(&model, &file, &SaveOptions::default()).unwrap();
        failures.extend(check_binary(&what, &file, &nodes));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
