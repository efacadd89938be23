//! What onnx-slice records in the models it writes (`onnx_slice.*` metadata_props: the tool's
//! version, the method and what it chose) and reads back: `inspect` says what made a model, and a
//! model onnx-slice wrote is not compressed again.
use std::collections::BTreeMap;

use crate::graph::Model;

const PREFIX: &str = "onnx_slice.";

/// Replaces the model's `onnx_slice.*` entries by the tool's version and `entries` (keys without
/// the prefix), in that order.
pub fn record(model: &mut Model, entries: &[(String, String)]) {
    model.metadata.retain(|(k, _)| !k.starts_with(PREFIX));
    model.metadata.push((format!("{PREFIX}version"), env!("CARGO_PKG_VERSION").to_string()));
    for (key, value) in entries {
        model.metadata.push((format!("{PREFIX}{key}"), value.clone()));
    }
}

/// The `onnx_slice.*` metadata of a model onnx-slice wrote (what compressed it, and how), keys
/// without the prefix; `None` for any other model.
pub fn sliced_by(model: &Model) -> Option<BTreeMap<String, String>> {
    let entries: BTreeMap<String, String> = model
        .metadata
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(PREFIX).map(|key| (key.to_string(), v.clone())))
        .collect();
    (!entries.is_empty()).then_some(entries)
}

/// One line for people: "onnx-slice 0.1.0 (method slicegpt, orientation pca (…), ratio 0.25, …)":
/// the method first (models written before methods had no entry for it: SliceGPT's), then the
/// rest by name.
pub fn describe_slicing(entries: &BTreeMap<String, String>) -> String {
    let version = entries.get("version").map_or("?", String::as_str);
    let method = entries.get("method").map_or("slicegpt", String::as_str);
    let details: Vec<String> = std::iter::once(format!("method {method}"))
        .chain(
            entries
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "version" | "method"))
                .map(|(k, v)| format!("{} {v}", k.replace('_', " "))),
        )
        .collect();
    format!("onnx-slice {version} ({})", details.join(", "))
}
