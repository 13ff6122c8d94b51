//! The plugin's one error type. Every message names the op, the input or attribute, what was
//! expected and what arrived; the FFI guard prefixes the node name and hands it to ORT as a status.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum Error {
    #[error("{op}: attribute '{name}': expected {expected}, got {got}")]
    Attribute {
        op: &'static str,
        name: &'static str,
        expected: String,
        got: String,
    },

    #[error("{op}: input '{input}' is required{because}")]
    MissingInput {
        op: &'static str,
        input: &'static str,
        because: String,
    },

    #[error("{op}: {what}")]
    InputCombination { op: &'static str, what: String },

    #[error("{op}: input '{input}': expected element type {expected}, got {got}")]
    ElementType {
        op: &'static str,
        input: &'static str,
        expected: &'static str,
        got: String,
    },

    #[error("{op}: input '{input}': expected rank {expected} {shape}, got rank {got} with shape {dims:?}")]
    Rank {
        op: &'static str,
        input: &'static str,
        expected: usize,
        shape: String,
        got: usize,
        dims: Vec<i64>,
    },

    #[error("{0}")]
    Dim(Box<DimMismatch>),

    #[error("{op}: {what}")]
    Constraint { op: &'static str, what: String },

    #[error("{op}: input 'cache_length': entry {batch} is {value}, expected a value in [0, {capacity}] (C)")]
    CacheLength {
        op: &'static str,
        batch: usize,
        value: i64,
        capacity: usize,
    },

    #[error("{op}: output '{output}' overlaps input '{input}' in memory; only the documented in-place pairs may share a buffer, and only exactly")]
    Overlap {
        op: &'static str,
        output: &'static str,
        input: &'static str,
    },

    #[error("{op}: {what} is not supported{why}")]
    Unsupported {
        op: &'static str,
        what: String,
        why: String,
    },

    #[error("{op}: ONNX Runtime call failed: {message}")]
    Runtime { op: &'static str, message: String },

    #[error("{op}: CUDA error: {message}")]
    Cuda { op: &'static str, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A dimension that disagrees with the op table or with another input (boxed: it is large).
#[derive(Debug, Error, Clone, PartialEq)]
#[error("{op}: input '{input}': expected shape {shape} = {expected_dims}, got {dims:?} (dim {axis}, {symbol}, is {got}{why})")]
pub struct DimMismatch {
    pub op: &'static str,
    pub input: &'static str,
    pub shape: String,
    pub expected_dims: String,
    pub dims: Vec<i64>,
    pub axis: usize,
    pub symbol: &'static str,
    pub got: i64,
    pub why: String,
}
