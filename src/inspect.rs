//! `onnx-slice inspect`: what a model file holds, for people (Display) and machines (JSON).
use std::collections::BTreeMap;

use serde::Serialize;

use crate::graph::{Model, ValueInfo};

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
    pub external_files: Vec<String>,
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
        *ops.entry(display_domain(&node.domain)).or_default().entry(node.op_type.clone()).or_default() += 1;
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
        opsets: model.opset_imports.iter().map(|o| (display_domain(&o.domain), o.version)).collect(),
        inputs: graph.inputs.iter().filter(|v| graph.initializer(&v.name).is_none()).map(value_summary).collect(),
        outputs: graph.outputs.iter().map(value_summary).collect(),
        node_count: graph.nodes.len(),
        ops,
        initializer_count: graph.initializers.len(),
        parameter_count: model.parameter_count(),
        parameters_by_dtype: by_dtype,
        external_files: model
            .source
            .iter()
            .flat_map(|s| s.external_files.iter().map(|p| p.display().to_string()))
            .collect(),
    }
}

impl std::fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(path) = &self.path {
            writeln!(f, "model:        {path}")?;
        }
        writeln!(f, "producer:     {}", if self.producer.is_empty() { "(none)" } else { &self.producer })?;
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
            writeln!(f, "  {dtype:<10} {:>15} elements {:>15} bytes", group_thousands(t.elements), group_thousands(t.bytes))?;
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
