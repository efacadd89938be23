//! Protobuf ⇄ own IR. Each message's modelled fields are moved out into the IR; the rest of the
//! message stays behind in `Opaque` and is put back on the way out, so unmodelled fields (and
//! whether an optional field was present at all) survive a round trip exactly.
use bytes::Bytes;

use super::proto::{self, tensor_proto::DataLocation};
use super::Opaque;
use crate::error::Result;
use crate::graph::{
    AttrValue, Attribute, DataType, ExternalSource, Graph, Model, Node, OpsetImport, Tensor,
    TensorData, TypedValues, ValueInfo,
};

/// Supplies the bytes of an externally stored tensor: (tensor name, source, expected byte length).
pub(crate) type ExternalResolver<'a> =
    dyn FnMut(&str, &ExternalSource, Option<u64>) -> Result<Bytes> + 'a;

/// Decides where a top-level initializer goes when writing: `None` inline, `Some(entries)` external.
pub(crate) type Placement<'a> = dyn FnMut(&Tensor) -> Result<Option<Vec<(String, String)>>> + 'a;

/// Moves an optional field's value out, leaving a default value behind as a presence marker.
fn take_opt<T: Default>(field: &mut Option<T>) -> T {
    field.as_mut().map(std::mem::take).unwrap_or_default()
}

/// Puts a value back: a default value restores what was there (present-but-default, or absent).
fn put_opt<T: Default + PartialEq>(marker: &Option<T>, value: T) -> Option<T> {
    if value == T::default() && marker.is_none() {
        None
    } else {
        Some(value)
    }
}

fn entries_from_proto(entries: Vec<proto::StringStringEntryProto>) -> Vec<(String, String)> {
    entries.into_iter().map(|e| (e.key.unwrap_or_default(), e.value.unwrap_or_default())).collect()
}

fn entries_to_proto(entries: &[(String, String)]) -> Vec<proto::StringStringEntryProto> {
    entries
        .iter()
        .map(|(k, v)| proto::StringStringEntryProto {
            key: Some(k.clone()),
            value: Some(v.clone()),
        })
        .collect()
}

// ---- protobuf → IR ----

pub(crate) fn model_from_proto(
    mut m: proto::ModelProto,
    resolve: &mut ExternalResolver,
) -> Result<Model> {
    let graph = graph_from_proto(m.graph.take().unwrap_or_default(), resolve)?;
    Ok(Model {
        ir_version: take_opt(&mut m.ir_version),
        opset_imports: std::mem::take(&mut m.opset_import)
            .into_iter()
            .map(opset_from_proto)
            .collect(),
        producer_name: take_opt(&mut m.producer_name),
        producer_version: take_opt(&mut m.producer_version),
        metadata: entries_from_proto(std::mem::take(&mut m.metadata_props)),
        graph,
        source: None,
        rest: Opaque(m),
    })
}

fn opset_from_proto(mut o: proto::OperatorSetIdProto) -> OpsetImport {
    OpsetImport {
        domain: take_opt(&mut o.domain),
        version: take_opt(&mut o.version),
        rest: Opaque(o),
    }
}

fn graph_from_proto(mut g: proto::GraphProto, resolve: &mut ExternalResolver) -> Result<Graph> {
    Ok(Graph {
        name: take_opt(&mut g.name),
        nodes: std::mem::take(&mut g.node)
            .into_iter()
            .map(|n| node_from_proto(n, resolve))
            .collect::<Result<_>>()?,
        initializers: std::mem::take(&mut g.initializer)
            .into_iter()
            .map(|t| tensor_from_proto(t, resolve))
            .collect::<Result<_>>()?,
        inputs: std::mem::take(&mut g.input).into_iter().map(value_info_from_proto).collect(),
        outputs: std::mem::take(&mut g.output).into_iter().map(value_info_from_proto).collect(),
        value_info: std::mem::take(&mut g.value_info)
            .into_iter()
            .map(value_info_from_proto)
            .collect(),
        rest: Opaque(g),
    })
}

fn value_info_from_proto(mut v: proto::ValueInfoProto) -> ValueInfo {
    ValueInfo { name: take_opt(&mut v.name), rest: Opaque(v) }
}

fn node_from_proto(mut n: proto::NodeProto, resolve: &mut ExternalResolver) -> Result<Node> {
    Ok(Node {
        name: take_opt(&mut n.name),
        op_type: take_opt(&mut n.op_type),
        domain: take_opt(&mut n.domain),
        inputs: std::mem::take(&mut n.input),
        outputs: std::mem::take(&mut n.output),
        attributes: std::mem::take(&mut n.attribute)
            .into_iter()
            .map(|a| attribute_from_proto(a, resolve))
            .collect::<Result<_>>()?,
        rest: Opaque(n),
    })
}

fn attribute_from_proto(
    mut a: proto::AttributeProto,
    resolve: &mut ExternalResolver,
) -> Result<Attribute> {
    use proto::attribute_proto::AttributeType as T;
    let kind =
        a.r#type.and_then(|t| T::try_from(t).ok()).unwrap_or_else(|| infer_attribute_type(&a));
    let value = match kind {
        T::Float if a.f.is_some() => AttrValue::Float(take_opt(&mut a.f)),
        T::Int if a.i.is_some() => AttrValue::Int(take_opt(&mut a.i)),
        T::String if a.s.is_some() => AttrValue::String(take_opt(&mut a.s).to_vec()),
        T::Tensor if a.t.is_some() => {
            AttrValue::Tensor(Box::new(tensor_from_proto(a.t.take().unwrap_or_default(), resolve)?))
        }
        T::Graph if a.g.is_some() => {
            AttrValue::Graph(Box::new(graph_from_proto(a.g.take().unwrap_or_default(), resolve)?))
        }
        T::Floats => AttrValue::Floats(std::mem::take(&mut a.floats)),
        T::Ints => AttrValue::Ints(std::mem::take(&mut a.ints)),
        T::Strings => AttrValue::Strings(
            std::mem::take(&mut a.strings).into_iter().map(|s| s.to_vec()).collect(),
        ),
        T::Tensors => AttrValue::Tensors(
            std::mem::take(&mut a.tensors)
                .into_iter()
                .map(|t| tensor_from_proto(t, resolve))
                .collect::<Result<_>>()?,
        ),
        T::Graphs => AttrValue::Graphs(
            std::mem::take(&mut a.graphs)
                .into_iter()
                .map(|g| graph_from_proto(g, resolve))
                .collect::<Result<_>>()?,
        ),
        _ => AttrValue::Other,
    };
    Ok(Attribute { name: take_opt(&mut a.name), value, rest: Opaque(a) })
}

/// IR versions before 2 did not record the attribute type; infer it from the field that is set.
fn infer_attribute_type(a: &proto::AttributeProto) -> proto::attribute_proto::AttributeType {
    use proto::attribute_proto::AttributeType as T;
    match () {
        _ if a.f.is_some() => T::Float,
        _ if a.i.is_some() => T::Int,
        _ if a.s.is_some() => T::String,
        _ if a.t.is_some() => T::Tensor,
        _ if a.g.is_some() => T::Graph,
        _ if !a.floats.is_empty() => T::Floats,
        _ if !a.ints.is_empty() => T::Ints,
        _ if !a.strings.is_empty() => T::Strings,
        _ if !a.tensors.is_empty() => T::Tensors,
        _ if !a.graphs.is_empty() => T::Graphs,
        _ => T::Undefined,
    }
}

pub(crate) fn tensor_from_proto(
    mut t: proto::TensorProto,
    resolve: &mut ExternalResolver,
) -> Result<Tensor> {
    let name = take_opt(&mut t.name);
    let dtype = DataType::from_code(take_opt(&mut t.data_type));
    let dims = std::mem::take(&mut t.dims);
    let data = if t.data_location == Some(DataLocation::External as i32) {
        t.data_location = None;
        let source = external_source(std::mem::take(&mut t.external_data));
        let expected = dtype
            .byte_size()
            .map(|s| s as u64 * dims.iter().map(|&d| d.max(0) as u64).product::<u64>());
        let bytes = resolve(&name, &source, expected)?;
        TensorData::External { bytes, source }
    } else if let Some(raw) = t.raw_data.take() {
        TensorData::Raw(raw)
    } else {
        take_typed_values(&mut t)
    };
    Ok(Tensor { name, dtype, dims, data, rest: Opaque(t) })
}

fn external_source(entries: Vec<proto::StringStringEntryProto>) -> ExternalSource {
    let entries = entries_from_proto(entries);
    let get = |key: &str| entries.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let number = |key: &str| get(key).and_then(|v| v.parse::<u64>().ok());
    ExternalSource {
        location: get("location").unwrap_or_default(),
        offset: number("offset").unwrap_or(0),
        length: number("length").unwrap_or(u64::MAX),
        entries,
    }
}

fn take_typed_values(t: &mut proto::TensorProto) -> TensorData {
    use std::mem::take;
    let typed = match () {
        _ if !t.float_data.is_empty() => TypedValues::Floats(take(&mut t.float_data)),
        _ if !t.int32_data.is_empty() => TypedValues::Int32s(take(&mut t.int32_data)),
        _ if !t.int64_data.is_empty() => TypedValues::Int64s(take(&mut t.int64_data)),
        _ if !t.double_data.is_empty() => TypedValues::Doubles(take(&mut t.double_data)),
        _ if !t.uint64_data.is_empty() => TypedValues::Uint64s(take(&mut t.uint64_data)),
        _ if !t.string_data.is_empty() => TypedValues::Strings(take(&mut t.string_data)),
        _ => return TensorData::Empty,
    };
    TensorData::Typed(typed)
}

// ---- IR → protobuf ----

pub(crate) fn model_to_proto(m: &Model, place: &mut Placement) -> Result<proto::ModelProto> {
    let mut p = m.rest.0.clone();
    p.ir_version = put_opt(&p.ir_version, m.ir_version);
    p.opset_import = m.opset_imports.iter().map(opset_to_proto).collect();
    p.producer_name = put_opt(&p.producer_name, m.producer_name.clone());
    p.producer_version = put_opt(&p.producer_version, m.producer_version.clone());
    p.metadata_props = entries_to_proto(&m.metadata);
    p.graph = Some(graph_to_proto(&m.graph, Some(place))?);
    Ok(p)
}

fn opset_to_proto(o: &OpsetImport) -> proto::OperatorSetIdProto {
    let mut p = o.rest.0.clone();
    p.domain = put_opt(&p.domain, o.domain.clone());
    p.version = put_opt(&p.version, o.version);
    p
}

/// `place` is given for the top-level graph only: subgraph and attribute tensors stay inline.
fn graph_to_proto(g: &Graph, mut place: Option<&mut Placement>) -> Result<proto::GraphProto> {
    let mut p = g.rest.0.clone();
    p.name = put_opt(&p.name, g.name.clone());
    p.node = g.nodes.iter().map(node_to_proto).collect::<Result<_>>()?;
    p.initializer = g
        .initializers
        .iter()
        .map(|t| {
            let external = match place.as_mut() {
                Some(place) => place(t)?,
                None => None,
            };
            Ok(tensor_to_proto(t, external))
        })
        .collect::<Result<_>>()?;
    p.input = g.inputs.iter().map(value_info_to_proto).collect();
    p.output = g.outputs.iter().map(value_info_to_proto).collect();
    p.value_info = g.value_info.iter().map(value_info_to_proto).collect();
    Ok(p)
}

fn value_info_to_proto(v: &ValueInfo) -> proto::ValueInfoProto {
    let mut p = v.rest.0.clone();
    p.name = put_opt(&p.name, v.name.clone());
    p
}

fn node_to_proto(n: &Node) -> Result<proto::NodeProto> {
    let mut p = n.rest.0.clone();
    p.name = put_opt(&p.name, n.name.clone());
    p.op_type = put_opt(&p.op_type, n.op_type.clone());
    p.domain = put_opt(&p.domain, n.domain.clone());
    p.input = n.inputs.clone();
    p.output = n.outputs.clone();
    p.attribute = n.attributes.iter().map(attribute_to_proto).collect::<Result<_>>()?;
    Ok(p)
}

fn attribute_to_proto(a: &Attribute) -> Result<proto::AttributeProto> {
    use proto::attribute_proto::AttributeType as T;
    let mut p = a.rest.0.clone();
    p.name = put_opt(&p.name, a.name.clone());
    let kind = match &a.value {
        AttrValue::Float(v) => {
            p.f = Some(*v);
            T::Float
        }
        AttrValue::Int(v) => {
            p.i = Some(*v);
            T::Int
        }
        AttrValue::String(v) => {
            p.s = Some(Bytes::from(v.clone()));
            T::String
        }
        AttrValue::Tensor(t) => {
            p.t = Some(tensor_to_proto(t, None));
            T::Tensor
        }
        AttrValue::Graph(g) => {
            p.g = Some(graph_to_proto(g, None)?);
            T::Graph
        }
        AttrValue::Floats(v) => {
            p.floats = v.clone();
            T::Floats
        }
        AttrValue::Ints(v) => {
            p.ints = v.clone();
            T::Ints
        }
        AttrValue::Strings(v) => {
            p.strings = v.iter().map(|s| Bytes::from(s.clone())).collect();
            T::Strings
        }
        AttrValue::Tensors(v) => {
            p.tensors = v.iter().map(|t| tensor_to_proto(t, None)).collect();
            T::Tensors
        }
        AttrValue::Graphs(v) => {
            p.graphs = v.iter().map(|g| graph_to_proto(g, None)).collect::<Result<_>>()?;
            T::Graphs
        }
        AttrValue::Other => return Ok(p),
    };
    // A loaded attribute without a type (IR < 2) stays without one; every other records it.
    if p.r#type.is_some() || a.rest.0 == proto::AttributeProto::default() {
        p.r#type = Some(kind as i32);
    }
    Ok(p)
}

/// `external`: the external-data entries to write instead of the data, or `None` to store inline.
pub(crate) fn tensor_to_proto(
    t: &Tensor,
    external: Option<Vec<(String, String)>>,
) -> proto::TensorProto {
    let mut p = t.rest.0.clone();
    p.name = put_opt(&p.name, t.name.clone());
    p.data_type = put_opt(&p.data_type, t.dtype.code());
    p.dims = t.dims.clone();
    if let Some(entries) = external {
        p.external_data = entries_to_proto(&entries);
        p.data_location = Some(DataLocation::External as i32);
        return p;
    }
    match &t.data {
        TensorData::Raw(b) | TensorData::External { bytes: b, .. } => p.raw_data = Some(b.clone()),
        TensorData::Typed(values) => put_typed_values(&mut p, values),
        TensorData::Empty => {}
    }
    p
}

fn put_typed_values(p: &mut proto::TensorProto, values: &TypedValues) {
    match values {
        TypedValues::Floats(v) => p.float_data = v.clone(),
        TypedValues::Int32s(v) => p.int32_data = v.clone(),
        TypedValues::Int64s(v) => p.int64_data = v.clone(),
        TypedValues::Doubles(v) => p.double_data = v.clone(),
        TypedValues::Uint64s(v) => p.uint64_data = v.clone(),
        TypedValues::Strings(v) => p.string_data = v.clone(),
    }
}
