//! Detection: start at the token embedding, walk the residual stream from norm to residual Add to
//! norm, and collect each segment's readers (linears after a norm) and writers (linears feeding a
//! residual Add).
use std::collections::HashSet;

use super::{
    Bias, Branch, Embedding, EmbeddingRole, Layout, Linear, ResidualAdd, Segment, StreamReshape,
    WeightLayout,
};
use crate::error::DetectError;
use crate::graph::{DataType, Graph, Node};
use crate::pattern::norm::{find_norms, NormMatch};
use crate::pattern::{is_matrix_transpose, is_stream_transparent, GraphIndex};

type Found<T> = Result<T, DetectError>;

fn stop(node: &Node, expected: impl Into<String>) -> DetectError {
    DetectError {
        node: node.label().to_string(),
        op: node.op_type.clone(),
        expected: expected.into(),
    }
}

/// Finds the transformer in a graph whose Skip*Normalization ops have been decomposed.
pub fn detect(graph: &Graph) -> Found<Layout> {
    if let Some((node, why)) = graph.malformed_node() {
        return Err(stop(node, format!("a valid ONNX node ({why})")));
    }
    let index = GraphIndex::new(graph);
    let norms = find_norms(&index);
    Walker { index: &index, norms, reshapes: Vec::new(), point: 0 }.walk()
}

struct Walker<'a, 'g> {
    index: &'a GraphIndex<'g>,
    norms: Vec<NormMatch>,
    reshapes: Vec<StreamReshape>,
    /// The stream point whose width the tensors being visited carry.
    point: usize,
}

/// Shape ops read only a tensor's shape, never its values.
fn reads_values(node: &Node) -> bool {
    !matches!(node.op_type.as_str(), "Shape" | "Size")
}

impl<'g> Walker<'_, 'g> {
    fn walk(mut self) -> Found<Layout> {
        let token = self.token_embedding()?;
        let width = self.token_width(&token)?;
        let mut embeddings = vec![token.clone()];
        let mut stream_values = Vec::new();
        let mut point =
            self.first_stream_point(&token, width, &mut embeddings, &mut stream_values)?;
        let mut segments = Vec::new();
        loop {
            let norms = self.norms_reading(&point);
            let continuations = self.residual_consumers(&point, &norms);
            if continuations.is_empty() {
                return self.finish(width, embeddings, segments, norms, point, stream_values);
            }
            self.point = segments.len();
            let segment = self.segment(&point, norms, width)?;
            point = segment.output.clone();
            segments.push(segment);
        }
    }

    fn finish(
        mut self,
        width: usize,
        embeddings: Vec<Embedding>,
        segments: Vec<Segment>,
        mut norms: Vec<NormMatch>,
        point: String,
        mut stream_values: Vec<String>,
    ) -> Found<Layout> {
        let at = |s: &Self| {
            s.index.producer(&point).map(|n| stop(n, "one final normalization before the head"))
        };
        if segments.is_empty() {
            return Err(
                at(&self).unwrap_or_else(|| no_node("a transformer block after the embeddings"))
            );
        }
        if norms.len() != 1 {
            return Err(at(&self).unwrap_or_else(|| no_node("one final normalization")));
        }
        let norm = norms.remove(0);
        self.point = segments.len();
        let readers = self.readers(&norm, width, &mut stream_values)?;
        let tied_head = readers.iter().any(|h| h.weight == embeddings[0].table);
        let norm_kind = norm.kind;
        stream_values.push(point);
        let mut layout = Layout {
            width,
            norm_kind,
            embeddings,
            segments,
            head: Branch { norm, readers },
            tied_head,
            stream_values,
            stream_reshapes: std::mem::take(&mut self.reshapes),
            blocks: Vec::new(),
        };
        layout.blocks = super::blocks::find_blocks(self.index.graph, &layout);
        Ok(layout)
    }

    // ---- embeddings ----

    /// The Gather from a `[V, D]` table (or the Transpose of a `[D, V]` one) indexed by the ids input.
    fn token_embedding(&self) -> Found<Embedding> {
        let graph = self.index.graph;
        let id_inputs: HashSet<&str> = graph
            .inputs
            .iter()
            .filter(|v| matches!(v.elem_type(), Some(DataType::Int64 | DataType::Int32)))
            .map(|v| v.name.as_str())
            .collect();
        let mut best: Option<(u64, Embedding)> = None;
        for node in
            graph.nodes.iter().filter(|n| n.is("Gather") && n.attr_int("axis").unwrap_or(0) == 0)
        {
            let Some(emb) = self.gather_embedding(node, EmbeddingRole::Token) else { continue };
            if !self.traces_to_input(&node.inputs[1], &id_inputs) {
                continue;
            }
            let rows = self.table_rows(&emb);
            if best.as_ref().is_none_or(|(r, _)| rows > *r) {
                best = Some((rows, emb));
            }
        }
        let expected = "a Gather from a [vocab, D] weight table indexed by the token ids input";
        best.map(|(_, e)| e).ok_or_else(|| {
            let reads_ids = graph.nodes.iter().find(|n| n.inputs.iter().any(|i| id_inputs.contains(i.as_str())));
            let reads_input = || graph.nodes.iter().find(|n| n.inputs.iter().any(|i| graph.inputs.iter().any(|v| v.name == *i)));
            match (reads_ids, reads_input()) {
                (Some(n), _) => stop(n, format!("{expected} (this node reads the integer inputs)")),
                (None, Some(n)) => stop(n, format!("{expected}; the graph has no integer (token ids) input, this node reads its inputs")),
                (None, None) => no_node(expected),
            }
        })
    }

    fn gather_embedding(&self, node: &Node, role: EmbeddingRole) -> Option<Embedding> {
        let data = node.inputs.first()?;
        let output = node.outputs.first()?.clone();
        if let Some(t) = self.index.initializer(data) {
            return (t.dims.len() == 2 && is_float(t.dtype)).then(|| Embedding {
                role,
                output,
                table: t.name.clone(),
                through_transpose: None,
                adapter: None,
            });
        }
        let transpose = self.index.producer(data)?;
        let table = self.index.initializer(transpose.inputs.first()?)?;
        (is_matrix_transpose(transpose) && table.dims.len() == 2).then(|| Embedding {
            role,
            output,
            table: table.name.clone(),
            through_transpose: Some(data.clone()),
            adapter: None,
        })
    }

    fn table_rows(&self, emb: &Embedding) -> u64 {
        let dims = &self.index.initializer(&emb.table).map(|t| t.dims.clone()).unwrap_or_default();
        let axis = if emb.through_transpose.is_some() { 1 } else { 0 };
        dims.get(axis).copied().unwrap_or(0) as u64
    }

    fn token_width(&self, token: &Embedding) -> Found<usize> {
        let dims = self.index.initializer(&token.table).map(|t| t.dims.clone()).unwrap_or_default();
        let axis = if token.through_transpose.is_some() { 0 } else { 1 };
        match dims.get(axis) {
            Some(&d) if d > 0 => Ok(d as usize),
            _ => Err(no_node("an embedding table with a positive width")),
        }
    }

    fn traces_to_input(&self, value: &str, inputs: &HashSet<&str>) -> bool {
        let mut value = value.to_string();
        for _ in 0..16 {
            if inputs.contains(value.as_str()) {
                return true;
            }
            match self.index.producer(&value) {
                Some(n)
                    if matches!(
                        n.op_type.as_str(),
                        "Reshape" | "Cast" | "Unsqueeze" | "Squeeze" | "Identity" | "Flatten"
                    ) =>
                {
                    let Some(input) = n.inputs.first() else { return false };
                    value = input.clone();
                }
                _ => return false,
            }
        }
        false
    }

    /// From the token embedding to the value the first norm reads: through position-embedding
    /// Adds and reshapes.
    fn first_stream_point(
        &mut self,
        token: &Embedding,
        width: usize,
        embeddings: &mut Vec<Embedding>,
        stream_values: &mut Vec<String>,
    ) -> Found<String> {
        let mut value = token.output.clone();
        loop {
            stream_values.push(value.clone());
            if !self.norms_reading(&value).is_empty() {
                return Ok(value);
            }
            let consumers: Vec<&Node> = self.value_consumers(&value);
            let [next] = consumers.as_slice() else {
                let at = consumers.first().copied().or_else(|| self.index.producer(&value));
                return Err(at.map_or_else(
                    || no_node("a normalization layer reading the embeddings"),
                    |n| stop(n, "a normalization layer or a position embedding reading the token embeddings"),
                ));
            };
            value = match self.embedding_step(next, &value, width, embeddings) {
                Some(v) => v,
                None => return Err(stop(
                    next,
                    "a normalization layer or a position embedding Add after the token embedding",
                )),
            };
        }
    }

    fn embedding_step(
        &mut self,
        node: &Node,
        from: &str,
        width: usize,
        embeddings: &mut Vec<Embedding>,
    ) -> Option<String> {
        if is_stream_transparent(node) {
            self.note_reshape(node);
            return node.outputs.first().cloned();
        }
        if !node.is("Add") || node.inputs.len() != 2 {
            return None;
        }
        let other = if self.index.source_of(&node.inputs[0]) == self.index.source_of(from) {
            &node.inputs[1]
        } else {
            &node.inputs[0]
        };
        let gather = self.index.producer(self.index.source_of(other)).filter(|n| n.is("Gather"))?;
        let emb = self.gather_embedding(gather, EmbeddingRole::Position)?;
        let table = self.index.initializer(&emb.table)?;
        (table.dims.get(1) == Some(&(width as i64))).then(|| {
            embeddings.push(emb);
            node.outputs[0].clone()
        })
    }

    // ---- the stream ----

    fn norms_reading(&self, value: &str) -> Vec<NormMatch> {
        let aliases = self.index.aliases(value);
        self.norms.iter().filter(|n| aliases.contains(&n.input)).cloned().collect()
    }

    /// Nodes reading the values of `value` (looking through Cast/Identity), Shape ops excluded.
    fn value_consumers(&self, value: &str) -> Vec<&'g Node> {
        self.index
            .consumers_through_aliases(value)
            .into_iter()
            .map(|i| self.index.node(i))
            .filter(|n| reads_values(n))
            .collect()
    }

    /// Consumers of a stream point other than the norms that read it: the way on to the next point.
    fn residual_consumers(&self, value: &str, norms: &[NormMatch]) -> Vec<&'g Node> {
        let norm_nodes: HashSet<usize> =
            norms.iter().flat_map(|n| n.nodes.iter().copied()).collect();
        self.index
            .consumers_through_aliases(value)
            .into_iter()
            .filter(|i| !norm_nodes.contains(i))
            .map(|i| self.index.node(i))
            .filter(|n| reads_values(n))
            .collect()
    }

    fn segment(&mut self, input: &str, norms: Vec<NormMatch>, width: usize) -> Found<Segment> {
        let start_point = self.point;
        let mut stream_values = Vec::new();
        let mut branches = Vec::new();
        for norm in &norms {
            let readers = self.readers(norm, width, &mut stream_values)?;
            branches.push(Branch { norm: norm.clone(), readers });
        }
        let mut writers = Vec::new();
        let mut residual_adds = Vec::new();
        let mut value = input.to_string();
        let mut skip_norms = norms.clone();
        loop {
            let consumers = self.residual_consumers(&value, &skip_norms);
            skip_norms.clear();
            let [next] = consumers.as_slice() else {
                let at = consumers
                    .get(1)
                    .or(consumers.first())
                    .copied()
                    .or_else(|| self.index.producer(&value));
                return Err(at.map_or_else(
                    || no_node("a residual Add"),
                    |n| stop(n, format!("one residual Add reading the stream value '{value}', found {} readers", consumers.len())),
                ));
            };
            if is_stream_transparent(next) {
                self.note_reshape(next);
            } else if next.is("Add") && next.inputs.len() == 2 {
                let skip_input = self
                    .skip_side(next, &value)
                    .ok_or_else(|| stop(next, "the stream on one side of the residual Add"))?;
                let branch = &next.inputs[1 - skip_input];
                // From the residual Add on, tensors carry the next point's width.
                self.point = start_point + 1;
                writers.extend(self.writers(branch, width, &mut stream_values)?);
                residual_adds.push(ResidualAdd { output: next.outputs[0].clone(), skip_input });
            } else {
                return Err(stop(
                    next,
                    format!("a residual Add reading the stream value '{value}'"),
                ));
            }
            value = next.outputs[0].clone();
            stream_values.push(value.clone());
            if !self.norms_reading(&value).is_empty()
                || self.residual_consumers(&value, &[]).is_empty()
            {
                break;
            }
        }
        if residual_adds.is_empty() || writers.is_empty() {
            let at = self.index.producer(&value);
            return Err(at.map_or_else(
                || no_node("a residual Add"),
                |n| stop(n, "a residual Add fed by linear layers"),
            ));
        }
        Ok(Segment {
            input: input.into(),
            branches,
            writers,
            residual_adds,
            output: value,
            stream_values,
        })
    }

    fn skip_side(&self, add: &Node, stream: &str) -> Option<usize> {
        let aliases = self.index.aliases(stream);
        add.inputs.iter().position(|i| aliases.contains(i))
    }

    fn note_reshape(&mut self, node: &Node) {
        if node.is("Reshape") && !self.reshapes.iter().any(|r| r.output == node.outputs[0]) {
            self.reshapes
                .push(StreamReshape { output: node.outputs[0].clone(), point: self.point });
        }
    }

    // ---- readers and writers ----

    /// The linear layers reading a norm's output (through reshapes and casts).
    fn readers(
        &mut self,
        norm: &NormMatch,
        width: usize,
        stream_values: &mut Vec<String>,
    ) -> Found<Vec<Linear>> {
        let mut found = Vec::new();
        let mut frontier = vec![norm.output.clone()];
        while let Some(value) = frontier.pop() {
            stream_values.push(value.clone());
            let consumers: Vec<&Node> =
                self.index.consumers(&value).filter(|n| reads_values(n)).collect();
            if consumers.is_empty() && !self.index.is_graph_output(&value) {
                let at = self.index.producer(&value);
                return Err(at.map_or_else(
                    || no_node("linear layers after a norm"),
                    |n| stop(n, "linear layers reading the normalized stream"),
                ));
            }
            for node in consumers {
                if is_stream_transparent(node) {
                    self.note_reshape(node);
                    frontier.push(node.outputs[0].clone());
                } else {
                    let linear = self
                        .linear(node, &value)
                        .filter(|l| l.in_features == width)
                        .ok_or_else(|| stop(node, format!("a linear layer (MatMul/Gemm with a constant [{width}, out] weight) reading the normalized stream")))?;
                    found.push(linear);
                }
            }
        }
        found.sort_by(|a, b| a.output.cmp(&b.output));
        Ok(found)
    }

    /// The linear layers whose outputs add up to a residual branch (through bias Adds, reshapes,
    /// and the sum of a parallel block's two branches).
    fn writers(
        &mut self,
        branch: &str,
        width: usize,
        stream_values: &mut Vec<String>,
    ) -> Found<Vec<Linear>> {
        stream_values.push(branch.to_string());
        let node = self
            .index
            .producer(branch)
            .ok_or_else(|| no_node(format!("a linear layer producing '{branch}'")))?;
        if is_stream_transparent(node) {
            self.note_reshape(node);
            return self.writers(&node.inputs[0], width, stream_values);
        }
        if node.is("Add") && node.inputs.len() == 2 {
            let constant = node.inputs.iter().position(|i| self.index.is_constant(i));
            return match constant {
                Some(c) => {
                    let mut linears = self.writers(&node.inputs[1 - c], width, stream_values)?;
                    let bias = Bias::AddNode {
                        output: node.outputs[0].clone(),
                        initializer: node.inputs[c].clone(),
                    };
                    match linears.as_mut_slice() {
                        [linear]
                            if self.index.initializer(&node.inputs[c]).is_some()
                                && linear.bias.as_ref().is_none_or(|b| *b == bias) =>
                        {
                            linear.bias = Some(bias);
                            Ok(linears)
                        }
                        _ => Err(stop(node, "a bias Add right after one linear layer")),
                    }
                }
                None => {
                    let mut linears = self.writers(&node.inputs[0], width, stream_values)?;
                    linears.extend(self.writers(&node.inputs[1], width, stream_values)?);
                    Ok(linears)
                }
            };
        }
        let input = node.inputs.first().cloned().unwrap_or_default();
        match self.linear(node, &input) {
            Some(linear) if linear.out_features == width => Ok(vec![linear]),
            _ => Err(stop(node, format!("a linear layer (MatMul/Gemm with a constant [in, {width}] weight) writing to the residual stream"))),
        }
    }

    /// `node` as a linear layer reading `input` with a constant weight.
    fn linear(&self, node: &Node, input: &str) -> Option<Linear> {
        if !node.in_default_domain() || node.inputs.first().map(String::as_str) != Some(input) {
            return None;
        }
        let (layout, bias) = match node.op_type.as_str() {
            "MatMul" => (WeightLayout::InOut, self.bias_add_after(node)),
            "Gemm" => {
                let plain = node.attr_int("transA").unwrap_or(0) == 0
                    && node.attr_float("alpha").unwrap_or(1.0) == 1.0
                    && node.attr_float("beta").unwrap_or(1.0) == 1.0;
                if !plain {
                    return None;
                }
                let layout = if node.attr_int("transB").unwrap_or(0) == 1 {
                    WeightLayout::OutIn
                } else {
                    WeightLayout::InOut
                };
                let bias = node
                    .inputs
                    .get(2)
                    .filter(|c| self.index.initializer(c).is_some())
                    .map(|c| Bias::GemmC(c.clone()));
                if node.inputs.get(2).is_some_and(|c| !c.is_empty()) && bias.is_none() {
                    return None;
                }
                (layout, bias)
            }
            _ => return None,
        };
        let (weight, through_transpose) = self.weight_of(node.inputs.get(1)?)?;
        let tensor = self.index.initializer(&weight)?;
        if tensor.dims.len() != 2 || !is_float(tensor.dtype) {
            return None;
        }
        let (rows, cols) = (tensor.dims[0] as usize, tensor.dims[1] as usize);
        let (in_features, out_features) = match (layout, through_transpose.is_some()) {
            (WeightLayout::InOut, false) | (WeightLayout::OutIn, true) => (rows, cols),
            _ => (cols, rows),
        };
        Some(Linear {
            node_name: node.name.clone(),
            output: node.outputs.first()?.clone(),
            weight,
            layout,
            through_transpose,
            bias,
            in_features,
            out_features,
        })
    }

    /// An initializer, or `Transpose(initializer, perm=[1,0])`.
    fn weight_of(&self, value: &str) -> Option<(String, Option<String>)> {
        if self.index.initializer(value).is_some() {
            return Some((value.to_string(), None));
        }
        let transpose = self.index.producer(value)?;
        let source = transpose.inputs.first()?;
        (is_matrix_transpose(transpose)
            && self.index.initializer(source).is_some_and(|t| t.dims.len() == 2))
        .then(|| (source.clone(), Some(value.to_string())))
    }

    /// A MatMul's bias: the single consumer is `Add(output, 1-D initializer)`.
    fn bias_add_after(&self, node: &Node) -> Option<Bias> {
        let output = node.outputs.first()?;
        let consumers: Vec<&Node> = self.index.consumers(output).collect();
        let [add] = consumers.as_slice() else { return None };
        if !add.is("Add") || add.inputs.len() != 2 {
            return None;
        }
        let other = add.inputs.iter().find(|i| *i != output)?;
        let t = self.index.initializer(other)?;
        (t.dims.len() == 1)
            .then(|| Bias::AddNode { output: add.outputs[0].clone(), initializer: other.clone() })
    }
}

fn is_float(dtype: DataType) -> bool {
    matches!(dtype, DataType::Float | DataType::Float16 | DataType::Bfloat16 | DataType::Double)
}

fn no_node(expected: impl Into<String>) -> DetectError {
    DetectError { node: "(graph)".into(), op: "-".into(), expected: expected.into() }
}
