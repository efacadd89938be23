//! Every block of every fixture is found with its roles: attention's readers and writer, the MLP's
//! readers (gate and up for SwiGLU, fc1 otherwise), the activation its down projection reads, and
//! the per-neuron constants and reshapes on the way.
mod common;

use onnx_slice::structure::{LinearRef, Mlp};

fn mlp_readers(arch: &str) -> usize {
    match arch {
        "llama" | "qwen2" => 2,
        _ => 1,
    }
}

fn intermediate(arch: &str) -> usize {
    match arch {
        "llama" | "qwen2" => 176,
        _ => 256,
    }
}

#[test]
fn every_fixture_block_has_attention_and_an_mlp() {
    for (arch, exporter, path) in common::all_models() {
        let label = format!("{arch}/{exporter}");
        let mut model = onnx_slice::onnx::load(&path).unwrap();
        onnx_slice::fuse::skip::decompose_skip_norms_in_model(&mut model).unwrap();
        let layout = onnx_slice::structure::detect(&model.graph).unwrap();
        assert_eq!(layout.blocks.len(), 2, "{label}");
        for block in &layout.blocks {
            let mlp: &Mlp = block.mlp.as_ref().unwrap_or_else(|e| panic!("{label}: {e}"));
            let attention =
                block.attention.as_ref().unwrap_or_else(|| panic!("{label}: no attention"));
            assert_eq!(mlp.width, intermediate(&arch), "{label}");
            assert_eq!(mlp.readers.len(), mlp_readers(&arch), "{label}: {:?}", mlp.readers);
            assert!(!attention.readers.is_empty(), "{label}");
            assert!(attention.readers.iter().all(|r| !mlp.readers.contains(r)), "{label}");
            let down = layout.linear(mlp.writer);
            assert_eq!(down.out_features, 64, "{label}");
            let parallel = matches!(arch.as_str(), "phi" | "gpt_neox");
            assert_eq!(block.segments.len(), if parallel { 1 } else { 2 }, "{label}");
            if !parallel {
                assert_eq!(attention.segment, block.segments.start, "{label}");
                assert_eq!(mlp.segment, block.segments.start + 1, "{label}");
            }
            assert!(matches!(mlp.writer, LinearRef::Writer { .. }), "{label}");
            eprintln!(
                "{label}: mlp readers {:?} activation {} constants {:?} reshapes {:?}",
                mlp.readers.iter().map(|&r| layout.linear(r).output.as_str()).collect::<Vec<_>>(),
                mlp.activation,
                mlp.neuron_constants,
                mlp.reshapes
            );
        }
    }
}

/// After every weight got its own initializer, following the weights' new names gives the layout
/// that detecting again would: analysis runs once.
#[test]
fn following_privatized_weights_equals_detecting_again() {
    for (arch, exporter, path) in common::all_models() {
        let label = format!("{arch}/{exporter}");
        let mut model = onnx_slice::onnx::load(&path).unwrap();
        let analysis = onnx_slice::analysis::analyze(&mut model).unwrap();
        onnx_slice::fuse::privatize_weights(&mut model.graph).unwrap();
        let mut followed = analysis.layout.clone();
        followed.follow_weights(&model.graph);
        // Detection indexes the norms' nodes in the graph it sees: the same graph, dead nodes gone.
        let mut cleaned = model.graph.clone();
        onnx_slice::graph::cleanup(&mut cleaned);
        let mut detected = onnx_slice::structure::detect(&cleaned).unwrap();
        detected.tied_head = followed.tied_head;
        if cleaned.nodes.len() != model.graph.nodes.len() {
            // Node indices differ by the removed nodes; everything else must not.
            for layout in [&mut followed, &mut detected] {
                forget_norm_nodes(layout);
            }
        }
        assert_eq!(followed, detected, "{label}");
    }
}

fn forget_norm_nodes(layout: &mut onnx_slice::structure::Layout) {
    for branch in layout.segments.iter_mut().flat_map(|s| s.branches.iter_mut()) {
        branch.norm.nodes.clear();
    }
    layout.head.norm.nodes.clear();
}
