//! Rotating and slicing the residual stream. Given a basis Q_p (D×k_p, orthonormal columns) at
//! every stream point: readers get `Q_aᵀ W`, writers `W Q_b`, embeddings `E Q_0`, the head
//! `Q_Lᵀ W`, and each skip path a MatMul by `Q_aᵀ Q_b` before its residual Add. Shape constants
//! applied to stream tensors get the new widths.

use std::collections::HashMap;

use faer::{Mat, MatRef};

use crate::algebra;
use crate::error::{Error, Result};
use crate::fuse;
use crate::graph::{cleanup, toposort, DataType, Graph, Model, Namer, Node, Tensor, TensorSink};
use crate::pattern::GraphIndex;
use crate::structure::{Bias, Branch, Layout, StreamReshape};

const PASS: &str = "rotate";

/// Rotates (and, where a basis has fewer than D columns, slices) a fused model. `groups[p]` names
/// the basis of point p: consecutive points of one group have the same basis, and the skip between
/// them stays a plain Add. Every rotated tensor and shortcut matrix goes to `finished` as it is made.
/// Returns the basis the last point got instead of `bases`' last when it extends the one before
/// ([`extends_last_basis`]).
pub fn rotate_and_slice(
    graph: &mut Graph,
    layout: &Layout,
    bases: &[MatRef<'_, f64>],
    groups: &[usize],
    skips: SkipForm,
    finished: &mut dyn TensorSink,
) -> Result<Option<Mat<f64>>> {
    let points = layout.stream_points().len();
    if groups.len() != points
        || bases.len() != points
        || bases
            .iter()
            .any(|q| q.nrows() != layout.width || q.ncols() == 0 || q.ncols() > layout.width)
    {
        return Err(Error::Pass {
            pass: PASS,
            node: "(graph)".into(),
            message: format!(
                "expected {points} bases of {} rows and at most as many columns",
                layout.width
            ),
        });
    }
    let extended = extends_last_basis(layout.width, groups, &bases_widths(bases))
        .then(|| algebra::complete_basis(bases[points - 2]));
    let mut bases = bases.to_vec();
    if let Some(last) = &extended {
        bases[points - 1] = last.as_ref();
    }
    let mut editor = StreamEditor::new(graph, layout).with_skips(skips).streaming_to(finished);
    editor.rotate_embeddings(bases[0])?;
    for (i, pair) in bases.windows(2).enumerate() {
        editor.rotate_readers(i, pair[0])?;
        editor.rotate_writers(i, pair[1])?;
        if extended.is_some() && i + 2 == points {
            editor.set_final_extension(i, pair[0].ncols())?;
        } else if groups[i] != groups[i + 1] {
            let s = algebra::shortcut(pair[0], pair[1]);
            editor.set_final_shortcut(i, s.as_ref())?;
        }
    }
    editor.rotate_readers(points - 1, bases[points - 1])?;
    if bases.iter().any(|q| q.ncols() != layout.width) {
        for (point, q) in bases.iter().enumerate() {
            editor.set_point_width(point, q.ncols())?;
        }
    }
    editor.finish()?;
    Ok(extended)
}

fn bases_widths(bases: &[MatRef<'_, f64>]) -> Vec<usize> {
    bases.iter().map(|q| q.ncols()).collect()
}

/// Whether the last point (the head's input) gets the basis that extends the point before it
/// ([`algebra::complete_basis`]) instead of one of its own: when it keeps the full width D and
/// has a basis of its own. It is free there (a full-width basis is exact whatever it is), and
/// makes the last skip `[I 0]`, a zero extension ([`SkipForm`]) instead of a `k × D` product that
/// puts the residual stream through a quantized MatMul.
pub fn extends_last_basis(d: usize, groups: &[usize], widths: &[usize]) -> bool {
    let points = widths.len();
    points >= 2 && widths[points - 1] == d && groups[points - 1] != groups[points - 2]
}

/// How a skip that only widens the stream with zeros (`[I 0]`) is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipForm {
    /// A Pad of the last axis (`axes` needs opset 18): no product, no weight.
    Pad,
    /// The `k × D` matrix `[I 0]` in a MatMul (older opsets).
    MatMul,
}

impl SkipForm {
    /// The form `model`'s default-domain opset can hold.
    pub fn for_model(model: &Model) -> SkipForm {
        if model.opset_version("").is_some_and(|v| v >= 18) {
            SkipForm::Pad
        } else {
            SkipForm::MatMul
        }
    }

    /// Parameters of the zero-extending skip from width `k_from` into `d` written in this form
    /// ([`StreamEditor::set_final_extension`]): none as a Pad, or when nothing was sliced.
    pub fn extension_parameters(self, k_from: usize, d: usize) -> u64 {
        match self {
            SkipForm::MatMul if k_from < d => (k_from * d) as u64,
            _ => 0,
        }
    }
}

/// Rotation and slicing one step at a time (calibration decides each point's basis only after
/// running the segment before it). Segment `i` goes from point `i` to point `i + 1`; "segment"
/// `segments.len()` is the head. Rotated weights are final when made: the editor hands them to its
/// [`TensorSink`] (see [`StreamEditor::streaming_to`]), and shortcut matrices when set with
/// [`StreamEditor::set_final_shortcut`].
pub struct StreamEditor<'a> {
    graph: &'a mut Graph,
    layout: &'a Layout,
    namer: Namer,
    widths: Vec<usize>,
    /// The element type of the matrices the editor creates ([`algebra::created_dtype`]).
    dtype: DataType,
    /// The norms' gain vector for each stream width ([`fuse::gain_tensor`]).
    gains: HashMap<usize, String>,
    finished: Option<&'a mut dyn TensorSink>,
    skips: SkipForm,
}

impl<'a> StreamEditor<'a> {
    pub fn new(graph: &'a mut Graph, layout: &'a Layout) -> Self {
        let namer = Namer::new(graph);
        let widths = vec![layout.width; layout.stream_points().len()];
        let dtype = algebra::created_dtype(algebra::stream_dtype(graph, layout));
        let gains = layout
            .branches()
            .filter_map(|b| fuse::norm_gain(graph, &b.norm.output))
            .map(|(name, k)| (k, name))
            .collect();
        StreamEditor {
            graph,
            layout,
            namer,
            widths,
            dtype,
            gains,
            finished: None,
            skips: SkipForm::MatMul,
        }
    }

    /// How [`Self::set_final_extension`] writes a zero-extending skip.
    pub fn with_skips(mut self, skips: SkipForm) -> Self {
        self.skips = skips;
        self
    }

    /// Hands every tensor the editor finishes to `sink` (docs/design.md §8).
    pub fn streaming_to(mut self, sink: &'a mut dyn TensorSink) -> Self {
        self.finished = Some(sink);
        self
    }

    /// Makes a final tensor. When the sink stores its bytes, it is not parked first: one write to
    /// disk instead of two.
    fn make_final(&self, make: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        let stores = self.finished.as_deref().is_some_and(|sink| sink.stores_bytes());
        let _unparked = stores.then(crate::files::ScratchScope::suspend);
        make()
    }

    /// Puts a final tensor in the graph, through the sink.
    fn set_final(&mut self, mut tensor: Tensor) -> Result<()> {
        if let Some(sink) = self.finished.as_deref_mut() {
            sink.finished(&mut tensor)?;
        }
        self.graph.set_initializer(tensor);
        Ok(())
    }

    pub fn graph(&self) -> &Graph {
        self.graph
    }

    /// `E ← E Q_0` for the token and position tables (`A ← A Q_0` for a tied table's adapter).
    pub fn rotate_embeddings(&mut self, q: MatRef<'_, f64>) -> Result<()> {
        for embedding in &self.layout.embeddings {
            let name = embedding.adapter.as_ref().unwrap_or(&embedding.table);
            let table = weight(self.graph, name, &embedding.output)?;
            let rotated = named(self.make_final(|| algebra::rotate_table(table, q))?, name);
            self.set_final(rotated)?;
        }
        Ok(())
    }

    /// The norms (with their readers) of segment `segment`, which read stream point `segment`; the
    /// head's for the last point.
    fn branches_reading(&self, segment: usize) -> &'a [Branch] {
        let layout = self.layout;
        match layout.segments.get(segment) {
            Some(s) => s.branches.as_slice(),
            None => std::slice::from_ref(&layout.head),
        }
    }

    /// `W ← Q_aᵀ W` for every linear reading the norms of segment `segment` (or the head).
    pub fn rotate_readers(&mut self, segment: usize, q: MatRef<'_, f64>) -> Result<()> {
        for reader in self.branches_reading(segment).iter().flat_map(|b| b.readers.iter()) {
            let w = weight(self.graph, &reader.weight, &reader.node_name)?;
            let rotated = named(
                self.make_final(|| algebra::rotate_reader(w, reader.layout, q))?,
                &reader.weight,
            );
            self.set_final(rotated)?;
        }
        Ok(())
    }

    /// `W ← W Q_b`, `b ← b Q_b` for the linears writing the residual branch of `segment`.
    pub fn rotate_writers(&mut self, segment: usize, q: MatRef<'_, f64>) -> Result<()> {
        for writer in &self.layout.segments[segment].writers {
            let w = weight(self.graph, &writer.weight, &writer.node_name)?;
            let rotated = named(
                self.make_final(|| algebra::rotate_writer(w, writer.layout, q))?,
                &writer.weight,
            );
            self.set_final(rotated)?;
            if let Some(Bias::GemmC(b) | Bias::AddNode { initializer: b, .. }) = &writer.bias {
                let bias = weight(self.graph, b, &writer.node_name)?;
                let rotated = named(self.make_final(|| algebra::rotate_bias(bias, q))?, b);
                self.set_final(rotated)?;
            }
        }
        Ok(())
    }

    /// The skip of `segment` carries the stream in basis `q` (`k_from` columns) into a point whose
    /// basis is [`algebra::complete_basis`] of `q`: `S = [I 0]`. Written as a Pad with zeros
    /// ([`SkipForm::Pad`]), or as that matrix; removed when nothing is sliced (`S = I`).
    pub fn set_final_extension(&mut self, segment: usize, k_from: usize) -> Result<()> {
        let d = self.layout.width;
        if k_from == d {
            return self.clear_shortcut(segment);
        }
        if self.skips == SkipForm::MatMul {
            let s = Mat::<f64>::from_fn(k_from, d, |i, j| if i == j { 1.0 } else { 0.0 });
            return self.set_final_shortcut(segment, s.as_ref());
        }
        // A shortcut MatMul set while calibrating goes: the Pad reads the skip itself.
        self.clear_shortcut(segment)?;
        let (add_index, skip_input) = self.residual_add(segment)?;
        let skip = self.graph.nodes[add_index].inputs[skip_input].clone();
        let pads = self.namer.fresh(&format!("onnx_slice.shortcut{segment}.pads"));
        let axes = self.namer.fresh(&format!("onnx_slice.shortcut{segment}.axes"));
        let widened = self.namer.fresh(&format!("{SHORTCUT_NODE}{segment}/output"));
        self.graph.initializers.push(Tensor::from_i64(
            pads.clone(),
            vec![2],
            &[0, (d - k_from) as i64],
        ));
        self.graph.initializers.push(Tensor::from_i64(axes.clone(), vec![1], &[-1]));
        let name = self.namer.fresh(&format!("{SHORTCUT_NODE}{segment}"));
        self.graph.nodes.push(Node::new(
            "Pad",
            name,
            vec![skip, pads, String::new(), axes],
            vec![widened.clone()],
        ));
        self.graph.nodes[add_index].inputs[skip_input] = widened;
        Ok(())
    }

    /// The residual Add of `segment` (its node index) and which of its inputs is the skip.
    fn residual_add(&self, segment: usize) -> Result<(usize, usize)> {
        let add = &self.layout.segments[segment].residual_adds[0];
        let index = self.graph.node_index_producing(&add.output).ok_or_else(|| Error::Pass {
            pass: PASS,
            node: add.output.clone(),
            message: "the residual Add is gone".into(),
        })?;
        Ok((index, add.skip_input))
    }

    /// [`Self::set_shortcut`] with the matrix the output keeps: it goes to the sink.
    pub fn set_final_shortcut(&mut self, segment: usize, s: MatRef<'_, f64>) -> Result<()> {
        let matrix = self.set_shortcut(segment, s)?;
        let (Some(sink), Some(tensor)) =
            (self.finished.as_deref_mut(), self.graph.initializer_mut(&matrix))
        else {
            return Ok(());
        };
        sink.finished(tensor)
    }

    /// The skip path of `segment` gets `MatMul(skip, S)` before its residual Add (inserted once,
    /// then its matrix replaced). Returns the matrix's initializer.
    pub fn set_shortcut(&mut self, segment: usize, s: MatRef<'_, f64>) -> Result<String> {
        let (add_index, skip_input) = self.residual_add(segment)?;
        let skip = self.graph.nodes[add_index].inputs[skip_input].clone();
        let existing = self.graph.node_index_producing(&skip).filter(|&i| {
            let node = &self.graph.nodes[i];
            node.name.starts_with(SHORTCUT_NODE) && node.op_type == "MatMul"
        });
        match existing {
            Some(i) => {
                let matrix = self.graph.nodes[i].inputs[1].clone();
                self.graph.set_initializer(algebra::mat_to_tensor(matrix.clone(), s, self.dtype));
                Ok(matrix)
            }
            None => {
                let matrix = self.namer.fresh(&format!("onnx_slice.shortcut{segment}"));
                let rotated = self.namer.fresh(&format!("{SHORTCUT_NODE}{segment}/output"));
                self.graph.initializers.push(algebra::mat_to_tensor(matrix.clone(), s, self.dtype));
                let name = self.namer.fresh(&format!("{SHORTCUT_NODE}{segment}"));
                self.graph.nodes.push(Node::new(
                    "MatMul",
                    name,
                    vec![skip, matrix.clone()],
                    vec![rotated.clone()],
                ));
                self.graph.nodes[add_index].inputs[skip_input] = rotated;
                Ok(matrix)
            }
        }
    }

    /// Takes the MatMul of [`Self::set_shortcut`] off the skip path of `segment` again (both ends
    /// share one basis): the residual Add reads the skip directly.
    pub fn clear_shortcut(&mut self, segment: usize) -> Result<()> {
        let add = &self.layout.segments[segment].residual_adds[0];
        let Some(add_index) = self.graph.node_index_producing(&add.output) else { return Ok(()) };
        let skip = &self.graph.nodes[add_index].inputs[add.skip_input];
        if let Some(i) = self
            .graph
            .node_index_producing(skip)
            .filter(|&i| self.graph.nodes[i].name.starts_with(SHORTCUT_NODE))
        {
            self.graph.nodes[add_index].inputs[add.skip_input] =
                self.graph.nodes[i].inputs[0].clone();
        }
        Ok(())
    }

    /// Gives every stream Reshape at `point` the width `k` (explicitly, also when k = D: a shape
    /// computed from another point's tensor would carry that point's width), and the norms reading
    /// it the gain and ε of that width.
    pub fn set_point_width(&mut self, point: usize, k: usize) -> Result<()> {
        self.widths[point] = k;
        let layout = self.layout;
        for reshape in layout.stream_reshapes.iter().filter(|r| r.point == point) {
            set_stream_width(self.graph, &mut self.namer, reshape, layout.width, k)?;
        }
        let gain = self.gain(k);
        for branch in self.branches_reading(point) {
            fuse::set_norm_width(self.graph, &branch.norm, layout.width, k, &gain)?;
        }
        Ok(())
    }

    /// The name of the norms' gain for width `k`, created on first use.
    fn gain(&mut self, k: usize) -> String {
        if let Some(name) = self.gains.get(&k) {
            return name.clone();
        }
        let name = self.namer.fresh(&format!("onnx_slice.norm.gain{k}"));
        self.graph.initializers.push(fuse::gain_tensor(&name, k, self.layout.width, self.dtype));
        self.gains.insert(k, name.clone());
        name
    }

    /// Drops declared shapes that slicing made wrong, removes dead nodes, sorts.
    pub fn finish(self) -> Result<()> {
        if self.widths.iter().any(|&k| k != self.layout.width) {
            forget_stream_shapes(self.graph, self.layout);
        }
        self.graph.forget_constant_shapes();
        cleanup(self.graph);
        toposort(self.graph)
    }
}

/// Name prefix of the MatMul nodes on the residual skip paths.
pub const SHORTCUT_NODE: &str = "onnx_slice/shortcut";

fn weight<'g>(graph: &'g Graph, name: &str, node: &str) -> Result<&'g Tensor> {
    graph.initializer(name).ok_or_else(|| Error::Pass {
        pass: PASS,
        node: node.into(),
        message: format!("'{name}' is not an initializer"),
    })
}

fn named(mut t: Tensor, name: &str) -> Tensor {
    t.name = name.into();
    t
}

/// Points a Reshape of a stream tensor at a shape whose last entry is its point's width. The shape
/// is often computed at run time from the shape of ANOTHER stream tensor (an earlier point, of
/// another width), so the last entry is always set to the constant width. The shape constant (or
/// the Concat building it) may be shared with other Reshapes, even ones inside attention whose D
/// must stay: it is copied, never edited in place.
fn set_stream_width(
    graph: &mut Graph,
    namer: &mut Namer,
    reshape: &StreamReshape,
    width: usize,
    k: usize,
) -> Result<()> {
    set_reshape_width(graph, namer, &reshape.output, width, k)
}

/// Points the Reshape producing `output` at a shape whose last entry is `k` instead of `width`
/// (a constant shape, the constant last piece of a Concat building it, or a shape computed at run
/// time), copying any shape constant or Concat it edits: they may be shared with Reshapes that
/// must keep `width`.
pub fn set_reshape_width(
    graph: &mut Graph,
    namer: &mut Namer,
    output: &str,
    width: usize,
    k: usize,
) -> Result<()> {
    let Some(i) = graph.node_index_producing(output) else { return Ok(()) };
    let shape = graph.nodes[i].inputs.get(1).cloned().unwrap_or_default();
    let fail = |why: &str| Error::Pass {
        pass: PASS,
        node: graph.nodes[i].name.clone(),
        message: format!("cannot give this Reshape the width {k} instead of {width}: {why}"),
    };
    let index = GraphIndex::new(graph);
    if let Some(values) = index.constant_i64(&shape) {
        return match resized_last(&values, width, k) {
            Some(values) => {
                let name = namer.fresh(&format!("{shape}_width{k}"));
                graph.initializers.push(Tensor::from_i64(
                    name.clone(),
                    vec![values.len() as i64],
                    &values,
                ));
                graph.nodes[i].inputs[1] = name;
                Ok(())
            }
            None => Err(fail("its constant shape does not end with that width")),
        };
    }
    let Some(c) = index.producer_index(&shape).filter(|&c| graph.nodes[c].is("Concat")) else {
        replace_last_dim(graph, namer, i, &shape, k);
        return Ok(());
    };
    let last = graph.nodes[c].inputs.last().cloned().unwrap_or_default();
    let last_values = match index.constant_i64(&last) {
        Some(values) => resized_last(&values, width, k)
            .ok_or_else(|| fail("the last piece of its shape is not that width"))?,
        None if index.producer(&last).is_some_and(|n| n.is("Unsqueeze")) => vec![k as i64],
        None => {
            return Err(fail(
                "the last piece of its shape is computed in a way onnx-slice does not follow",
            ))
        }
    };
    let new_last = namer.fresh(&format!("{last}_width{k}"));
    graph.initializers.push(Tensor::from_i64(
        new_last.clone(),
        vec![last_values.len() as i64],
        &last_values,
    ));
    let mut copy = graph.nodes[c].clone();
    copy.name = namer.fresh(&format!("{}_width{k}", copy.name));
    copy.outputs = vec![namer.fresh(&format!("{shape}_width{k}"))];
    if let Some(slot) = copy.inputs.last_mut() {
        *slot = new_last;
    }
    graph.nodes[i].inputs[1] = copy.outputs[0].clone();
    graph.nodes.push(copy);
    Ok(())
}

/// `Reshape(x, shape)` → `Reshape(x, Concat(shape[:-1], [k]))` for a shape computed at run time.
fn replace_last_dim(graph: &mut Graph, namer: &mut Namer, reshape: usize, shape: &str, k: usize) {
    let base = format!("{shape}_width{k}");
    let constants =
        [("starts", 0), ("ends", -1), ("axes", 0), ("last", k as i64)].map(|(what, v)| {
            let name = namer.fresh(&format!("{base}/{what}"));
            graph.initializers.push(Tensor::from_i64(name.clone(), vec![1], &[v]));
            name
        });
    let [starts, ends, axes, last] = constants;
    let leading = namer.fresh(&format!("{base}/leading"));
    let resized = namer.fresh(&base);
    let mut concat = Node::new(
        "Concat",
        namer.fresh(&format!("{base}/Concat")),
        vec![leading.clone(), last],
        vec![resized.clone()],
    );
    concat.set_attr("axis", crate::graph::AttrValue::Int(0));
    graph.nodes.push(Node::new(
        "Slice",
        namer.fresh(&format!("{base}/Slice")),
        vec![shape.into(), starts, ends, axes],
        vec![leading],
    ));
    graph.nodes.push(concat);
    graph.nodes[reshape].inputs[1] = resized;
}

/// A shape whose last entry, the stream width D (or already k), becomes k.
fn resized_last(values: &[i64], width: usize, k: usize) -> Option<Vec<i64>> {
    let last = *values.last()?;
    if last != width as i64 && last != k as i64 {
        return None;
    }
    let mut values = values.to_vec();
    *values.last_mut()? = k as i64;
    Some(values)
}

/// Declared shapes of stream tensors are wrong once the stream is sliced: drop them (ONNX
/// Runtime infers them again).
fn forget_stream_shapes(graph: &mut Graph, layout: &Layout) {
    let mut values: std::collections::HashSet<&str> =
        layout.stream_values.iter().map(String::as_str).collect();
    for segment in &layout.segments {
        values.extend(segment.stream_values.iter().map(String::as_str));
        values.insert(&segment.input);
        values.insert(&segment.output);
    }
    values.extend(layout.stream_reshapes.iter().map(|r| r.output.as_str()));
    values.extend(layout.embeddings.iter().map(|e| e.output.as_str()));
    graph.value_info.retain(|v| !values.contains(v.name.as_str()));
}
