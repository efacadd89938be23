//! `onnx-slice inspect`: what a model file holds, for people (Display) and machines (JSON).
use std::collections::BTreeMap;

use serde::Serialize;

use crate::graph::{Model, ValueInfo};
use crate::pattern::norm::{NormKind, NormMatch};
use crate::structure::{Layout, Linear};

#[derive(Debug, Serialize)]
pub struct ModelSummary {
    pub path: Option<String>,
    pub producer: String,
    pub ir_version: i64,
    pub opsets: BTreeMap<String, i64>,
    pub inputs: Vec<ValueSummary>,
    pub outputs: Vec<ValueSummary>,
    pub node_count: usize,
    /// domain ("ai.onnx" for the default one) → op type → count.
    pub ops: BTreeMap<String, BTreeMap<String, usize>>,
    pub initializer_count: usize,
    pub parameter_count: u64,
    /// dtype → (elements, bytes).
    pub parameters_by_dtype: BTreeMap<String, DtypeTotals>,
    /// The floating-point initializers: what slicing shrinks and size targets count.
    pub weights: crate::size::Totals,
    pub external_files: Vec<String>,
    /// The `onnx_slice.*` metadata (keys without the prefix) of a model onnx-slice wrote.
    pub sliced_by: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Serialize)]
pub struct ValueSummary {
    pub name: String,
    /// "float32[batch_size, sequence_length, 1000]"
    pub r#type: String,
}

#[derive(Debug, Default, Serialize)]
pub struct DtypeTotals {
    pub elements: u64,
    pub bytes: u64,
}

fn display_domain(domain: &str) -> String {
    if domain.is_empty() {
        "ai.onnx".into()
    } else {
        domain.into()
    }
}

fn value_summary(v: &ValueInfo) -> ValueSummary {
    ValueSummary { name: v.name.clone(), r#type: v.describe() }
}

pub fn summarize(model: &Model) -> ModelSummary {
    let graph = &model.graph;
    let mut ops: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for node in &graph.nodes {
        *ops.entry(display_domain(&node.domain))
            .or_default()
            .entry(node.op_type.clone())
            .or_default() += 1;
    }
    let mut by_dtype: BTreeMap<String, DtypeTotals> = BTreeMap::new();
    for t in &graph.initializers {
        let totals = by_dtype.entry(t.dtype.name()).or_default();
        totals.elements += t.numel();
        totals.bytes += t.byte_len();
    }
    let producer = format!("{} {}", model.producer_name, model.producer_version).trim().to_string();
    ModelSummary {
        path: model.source.as_ref().map(|s| s.path.display().to_string()),
        producer,
        ir_version: model.ir_version,
        opsets: model
            .opset_imports
            .iter()
            .map(|o| (display_domain(&o.domain), o.version))
            .collect(),
        inputs: graph
            .inputs
            .iter()
            .filter(|v| graph.initializer(&v.name).is_none())
            .map(value_summary)
            .collect(),
        outputs: graph.outputs.iter().map(value_summary).collect(),
        node_count: graph.nodes.len(),
        ops,
        initializer_count: graph.initializers.len(),
        parameter_count: model.parameter_count(),
        parameters_by_dtype: by_dtype,
        weights: crate::size::weight_totals(graph),
        external_files: model
            .source
            .iter()
            .flat_map(|s| s.external_files.iter().map(|p| p.display().to_string()))
            .collect(),
        sliced_by: crate::provenance::sliced_by(model),
    }
}

impl std::fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(path) = &self.path {
            writeln!(f, "model:        {path}")?;
        }
        writeln!(
            f,
            "producer:     {}",
            if self.producer.is_empty() { "(none)" } else { &self.producer }
        )?;
        if let Some(entries) = &self.sliced_by {
            writeln!(f, "sliced by:    {}", crate::provenance::describe_slicing(entries))?;
        }
        let opsets: Vec<String> = self.opsets.iter().map(|(d, v)| format!("{d} {v}")).collect();
        writeln!(f, "ir version:   {}    opsets: {}", self.ir_version, opsets.join(", "))?;
        writeln!(f, "inputs:")?;
        for v in &self.inputs {
            writeln!(f, "  {:<28} {}", v.name, v.r#type)?;
        }
        writeln!(f, "outputs:")?;
        for v in &self.outputs {
            writeln!(f, "  {:<28} {}", v.name, v.r#type)?;
        }
        writeln!(f, "nodes:        {}", self.node_count)?;
        for (domain, ops) in &self.ops {
            let mut ops: Vec<_> = ops.iter().collect();
            ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let list: Vec<String> = ops.iter().map(|(op, n)| format!("{op} {n}")).collect();
            writeln!(f, "  {domain}: {}", list.join(", "))?;
        }
        writeln!(f, "initializers: {}", self.initializer_count)?;
        writeln!(f, "parameters:   {}", group_thousands(self.parameter_count))?;
        for (dtype, t) in &self.parameters_by_dtype {
            writeln!(
                f,
                "  {dtype:<10} {:>15} elements {:>15} bytes",
                group_thousands(t.elements),
                group_thousands(t.bytes)
            )?;
        }
        if !self.external_files.is_empty() {
            writeln!(f, "external data:")?;
            for file in &self.external_files {
                writeln!(f, "  {file}")?;
            }
        }
        Ok(())
    }
}

pub fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The transformer as detection sees it, or why detection failed.
#[derive(Debug, Serialize)]
pub struct LayoutSummary {
    pub found: Option<LayoutView>,
    pub error: Option<String>,
    /// With `--explain`: every rejected normalization candidate and why.
    pub rejected_norm_candidates: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct LayoutView {
    pub width: usize,
    pub norm_kind: String,
    pub blocks: usize,
    pub embeddings: Vec<String>,
    pub segments: Vec<SegmentView>,
    pub final_norm: String,
    pub head: Vec<String>,
    pub tied_head: bool,
    pub skip_norms_decomposed: usize,
    /// Reshapes of stream tensors whose shape carries D (rewritten when slicing).
    pub stream_shape_constants: Vec<String>,
    /// Every block's attention and MLP, by their linear layers' outputs.
    pub roles: Vec<BlockView>,
}

/// A block's roles: what the `neurons` method shrinks (the MLP) and what it keeps.
#[derive(Debug, Serialize)]
pub struct BlockView {
    pub segments: Vec<usize>,
    pub attention_readers: Vec<String>,
    pub attention_writer: Option<String>,
    pub mlp_readers: Vec<String>,
    /// The down projection's input: the MLP activation.
    pub mlp_activation: Option<String>,
    pub mlp_writer: Option<String>,
    /// The MLP's intermediate width F.
    pub mlp_width: Option<usize>,
    /// Why no MLP was recognized in the block.
    pub mlp_not_found: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SegmentView {
    pub kind: &'static str,
    pub input: String,
    pub norms: Vec<String>,
    pub readers: Vec<String>,
    pub writers: Vec<String>,
    pub output: String,
}

/// Detects the transformer on a copy of the model (Skip*Normalization ops decomposed first).
pub fn describe_layout(model: &Model, explain: bool) -> LayoutSummary {
    let mut copy = model.clone();
    let decomposed = crate::fuse::skip::decompose_skip_norms_in_model(&mut copy);
    let rejected = if explain {
        crate::pattern::norm::explain_norms(&crate::pattern::GraphIndex::new(&copy.graph))
    } else {
        Vec::new()
    };
    let result = crate::structure::refuse_quantized(&copy.graph)
        .map_err(crate::error::Error::from)
        .and(decomposed)
        .and_then(|n| Ok((n, crate::structure::detect(&copy.graph)?)));
    match result {
        Ok((decomposed, layout)) => LayoutSummary {
            found: Some(layout_view(&copy, &layout, decomposed)),
            error: None,
            rejected_norm_candidates: rejected,
        },
        Err(e) => LayoutSummary {
            found: None,
            error: Some(why_not_found(model, &e)),
            rejected_norm_candidates: rejected,
        },
    }
}

/// Detection's stop, and for a model onnx-slice wrote, why that is expected.
fn why_not_found(model: &Model, error: &crate::Error) -> String {
    match crate::provenance::sliced_by(model) {
        Some(_) => format!(
            "this model is the output of onnx-slice (see 'sliced by'): its norms are folded into plain RMSNorm over the \
             original width and its skip paths carry shortcut matrices, so it is not detected, or sliced, again; slice the \
             original model instead ({error})"
        ),
        None => error.to_string(),
    }
}

fn layout_view(model: &Model, layout: &Layout, skip_norms_decomposed: usize) -> LayoutView {
    let graph = &model.graph;
    let linear = |l: &Linear| {
        let shape =
            graph.initializer(&l.weight).map(|t| format!("{:?}", t.dims)).unwrap_or_default();
        let bias = if l.bias.is_some() { " +bias" } else { "" };
        format!("{} {shape}{bias}", l.weight)
    };
    let norm = |n: &NormMatch| {
        let op = graph
            .nodes
            .iter()
            .find(|node| node.name == n.anchor || node.outputs.contains(&n.output))
            .map(|n| n.op_type.as_str());
        let form = match op {
            Some(
                op @ ("LayerNormalization" | "RMSNormalization" | "SimplifiedLayerNormalization"),
            ) => op.to_string(),
            _ => format!("decomposed {}", kind_name(n.kind)),
        };
        format!("{form} (eps {:e}) on {}", n.epsilon, n.input)
    };
    LayoutView {
        width: layout.width,
        norm_kind: kind_name(layout.norm_kind).into(),
        blocks: layout.block_count(),
        embeddings: layout
            .embeddings
            .iter()
            .map(|e| {
                format!(
                    "{:?} {}{}",
                    e.role,
                    e.table,
                    if e.through_transpose.is_some() { " (transposed)" } else { "" }
                )
            })
            .collect(),
        segments: layout
            .segments
            .iter()
            .map(|s| SegmentView {
                kind: if s.is_parallel() { "parallel block" } else { "sequential half-block" },
                input: s.input.clone(),
                norms: s.branches.iter().map(|b| norm(&b.norm)).collect(),
                readers: s.branches.iter().flat_map(|b| b.readers.iter()).map(linear).collect(),
                writers: s.writers.iter().map(linear).collect(),
                output: s.output.clone(),
            })
            .collect(),
        final_norm: norm(&layout.head.norm),
        head: layout.head.readers.iter().map(linear).collect(),
        tied_head: layout.tied_head,
        skip_norms_decomposed,
        stream_shape_constants: layout
            .stream_reshapes
            .iter()
            .map(|r| format!("{} (point {})", r.output, r.point))
            .collect(),
        roles: layout.blocks.iter().map(|b| block_view(layout, b)).collect(),
    }
}

fn block_view(layout: &Layout, block: &crate::structure::Block) -> BlockView {
    let output = |r: &crate::structure::LinearRef| layout.linear(*r).output.clone();
    let mlp = block.mlp.as_ref().ok();
    BlockView {
        segments: block.segments.clone().collect(),
        attention_readers: block
            .attention
            .as_ref()
            .map(|a| a.readers.iter().map(output).collect())
            .unwrap_or_default(),
        attention_writer: block.attention.as_ref().map(|a| output(&a.writer)),
        mlp_readers: mlp.map(|m| m.readers.iter().map(output).collect()).unwrap_or_default(),
        mlp_activation: mlp.map(|m| m.activation.clone()),
        mlp_writer: mlp.map(|m| output(&m.writer)),
        mlp_width: mlp.map(|m| m.width),
        mlp_not_found: block.mlp.as_ref().err().cloned(),
    }
}

fn kind_name(kind: NormKind) -> &'static str {
    match kind {
        NormKind::LayerNorm => "LayerNorm",
        NormKind::RmsNorm => "RMSNorm",
    }
}

impl std::fmt::Display for LayoutSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "transformer:")?;
        match (&self.found, &self.error) {
            (Some(l), _) => write!(f, "{l}")?,
            (None, Some(e)) => writeln!(f, "  not found: {e}")?,
            (None, None) => {}
        }
        if !self.rejected_norm_candidates.is_empty() {
            writeln!(f, "  rejected normalization candidates:")?;
            for line in &self.rejected_norm_candidates {
                writeln!(f, "    {line}")?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for LayoutView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "  stream width D: {}    norms: {}    blocks: {}    tied head: {}",
            self.width, self.norm_kind, self.blocks, self.tied_head
        )?;
        for e in &self.embeddings {
            writeln!(f, "  embedding {e}")?;
        }
        for (i, s) in self.segments.iter().enumerate() {
            writeln!(f, "  segment {i} ({}): {} → {}", s.kind, s.input, s.output)?;
            for n in &s.norms {
                writeln!(f, "    norm    {n}")?;
            }
            for r in &s.readers {
                writeln!(f, "    reader  {r}")?;
            }
            for w in &s.writers {
                writeln!(f, "    writer  {w}")?;
            }
        }
        for (b, block) in self.roles.iter().enumerate() {
            match (&block.mlp_width, &block.mlp_not_found) {
                (Some(width), _) => writeln!(
                    f,
                    "  block {b}: attention {} → {}; MLP {} → {} (width {width}) → {}",
                    block.attention_readers.join(", "),
                    block.attention_writer.as_deref().unwrap_or("?"),
                    block.mlp_readers.join(", "),
                    block.mlp_activation.as_deref().unwrap_or("?"),
                    block.mlp_writer.as_deref().unwrap_or("?"),
                )?,
                (None, why) => writeln!(
                    f,
                    "  block {b}: no MLP recognized: {}",
                    why.as_deref().unwrap_or("?")
                )?,
            }
        }
        writeln!(f, "  final norm {}", self.final_norm)?;
        for h in &self.head {
            writeln!(f, "  head      {h}")?;
        }
        if self.skip_norms_decomposed > 0 {
            writeln!(
                f,
                "  fused Skip*Normalization ops (decomposed before rewriting): {}",
                self.skip_norms_decomposed
            )?;
        }
        writeln!(
            f,
            "  stream shape constants: {}",
            if self.stream_shape_constants.is_empty() {
                "none".into()
            } else {
                self.stream_shape_constants.join(", ")
            }
        )
    }
}

/// Widths for people: "1536 ×30" when they are all the same, else the list.
pub fn width_list(widths: &[usize]) -> String {
    match widths {
        [first, rest @ ..] if rest.iter().all(|w| w == first) => {
            format!("{first} ×{}", widths.len())
        }
        _ => widths.iter().map(usize::to_string).collect::<Vec<_>>().join(","),
    }
}

/// Widths and weights before → after, for the slicing summary and `--dry-run`.
pub fn size_summary(
    width: usize,
    widths: &[usize],
    blocks: usize,
    before: crate::size::Totals,
    after: crate::size::Totals,
) -> String {
    let shown: Vec<String> = widths.iter().map(usize::to_string).collect();
    format!(
        "stream width {width} → [{}] at {} stream points ({blocks} blocks)\nparameters {} → {} ({:+.1} %), weight bytes {} → {} ({:.1} % of the input)\n",
        shown.join(", "),
        widths.len(),
        group_thousands(before.parameters),
        group_thousands(after.parameters),
        100.0 * (after.parameters as f64 / before.parameters.max(1) as f64 - 1.0),
        group_thousands(before.bytes),
        group_thousands(after.bytes),
        100.0 * after.bytes as f64 / before.bytes.max(1) as f64,
    )
}
