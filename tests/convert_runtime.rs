//! Converted models compute exactly what the originals compute, measured through ONNX Runtime; a
//! model over protobuf's 2 GiB limit is written with external data and runs.
mod common;

use bytes::Bytes;
use common::reference::*;
use common::*;
use ndarray::ArrayD;
use onnx_slice::graph::{DataType, Dim, Graph, Model, Node, Tensor, ValueInfo};
use onnx_slice::onnx::{self, SaveOptions, Storage};
use onnx_slice::runtime::TensorValue;

#[test]
fn converted_models_give_identical_outputs_in_onnx_runtime() {
    let dir = scratch();
    for (arch, exporter, path) in all_models() {
        let reference = Reference::for_exporter(&arch, &exporter);
        let expected = run_all(&path, &reference);
        let model = onnx::load(&path).unwrap();
        for storage in [Storage::External, Storage::Inline] {
            let out = dir.path().join(format!("{arch}_{exporter}_{storage:?}.onnx"));
            onnx::save(&model, &out, &SaveOptions { storage, ..Default::default() }).unwrap();
            let got = run_all(&out, &reference);
            assert!(
                got == expected,
                "{arch}/{exporter}: outputs of the {storage:?} copy differ from the original's"
            );
        }
    }
}

/// float32 elements in a tensor just over 2 GiB.
const HUGE: usize = (1 << 29) + (1 << 16);

#[test]
fn a_model_over_two_gib_is_written_with_external_data_and_runs() {
    let dir = scratch();
    let probes: [(usize, f32); 3] = [(0, 1.5), (HUGE / 2 + 3, -2.25), (HUGE - 1, 7.0)];
    let mut bytes = vec![0u8; HUGE * 4];
    for (i, v) in probes {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    let mut graph = Graph::new("huge");
    graph.initializers.push(Tensor::from_raw(
        "table",
        DataType::Float,
        vec![HUGE as i64],
        Bytes::from(bytes),
    ));
    graph.inputs.push(ValueInfo::tensor("index", DataType::Int64, &[Dim::Symbolic("n".into())]));
    graph.outputs.push(ValueInfo::tensor("value", DataType::Float, &[Dim::Symbolic("n".into())]));
    graph.nodes.push(Node::new(
        "Gather",
        "lookup",
        vec!["table".into(), "index".into()],
        vec!["value".into()],
    ));
    let model = Model::new(&[("", 17)], graph);
    assert!(onnx::to_bytes(&model).is_err(), "an inline encoding over 2 GiB must be refused");

    let path = dir.path().join("huge.onnx");
    let saved = onnx::save(&model, &path, &SaveOptions::default()).unwrap();
    drop(model);
    let (data_file, data_len) = saved.data_file.expect("automatic external data over 2 GiB");
    assert_eq!(data_len, HUGE as u64 * 4);
    assert!(
        saved.model_bytes < 4096,
        "the model file holds the graph only: {} bytes",
        saved.model_bytes
    );
    assert_eq!(data_file, dir.path().join("huge.onnx.data"));

    let mut session = open(&path, &cpu());
    let index = TensorValue::I64(
        ArrayD::from_shape_vec(vec![3], probes.iter().map(|&(i, _)| i as i64).collect()).unwrap(),
    );
    let mut outputs = session.run(&[("index", &index)]).unwrap();
    let value = outputs.remove("value").unwrap().into_f32().unwrap();
    assert_eq!(
        value.iter().copied().collect::<Vec<_>>(),
        probes.iter().map(|&(_, v)| v).collect::<Vec<_>>()
    );
}

#[test]
fn an_intermediate_tensor_can_be_read_as_an_extra_output() {
    let path = fixture("llama/optimum/model.onnx");
    let reference = Reference::for_exporter("llama", "optimum");
    let mut model = onnx::load(&path).unwrap();
    // The first block's input: the token embeddings, which reference.npz holds as hidden_states_0.
    let embeddings = model
        .graph
        .nodes
        .iter()
        .find(|n| n.is("Gather") && n.inputs[0].contains("embed_tokens"))
        .unwrap()
        .outputs[0]
        .clone();
    model.graph.expose_output(&embeddings);
    runtime();
    let bytes = onnx::to_bytes(&model).unwrap();
    let mut session = onnx_slice::runtime::ModelSession::from_bytes(&bytes, None, &cpu()).unwrap();
    let inputs = reference.inputs_for(&session);
    let mut outputs =
        session.run_for(&as_named(&inputs), &[embeddings.as_str(), "logits"]).unwrap();
    let hidden = outputs.remove(&embeddings).unwrap().into_f32().unwrap();
    let npz = onnx_slice::runtime::npy::Npz::read(&fixture("llama/reference.npz")).unwrap();
    let expected = npz.array("hidden_states_0").cloned().and_then(|a| a.into_f32()).unwrap();
    assert!(
        max_abs_diff(&hidden, &expected) <= 1e-5,
        "embeddings differ from torch's hidden_states_0"
    );
}
