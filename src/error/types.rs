//! The element-type check's error (`graph::check_types`), here so that the crate's `Error` wraps
//! it without depending on `graph`.

/// A node whose inputs break its operator's type constraint, or a declared type that disagrees
/// with the computed one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("node '{node}' ({op}): {message}")]
pub struct TypeError {
    pub node: String,
    pub op: String,
    pub message: String,
}
