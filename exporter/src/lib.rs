//! Rewrites softmax attention in exported GPT ONNX models into power retention.
//!
//! [`onnx_io`] reads and checks models, [`rules`] matches attention read-only (one rule per
//! pattern family), [`emit`] writes the prefill/decode models and their manifest, [`report`]
//! renders what was found. [`harness`] drives rewritten models (`generate`, `bench`).

pub mod emit;
pub mod graph;
pub mod harness;
pub mod manifest;
pub mod onnx_io;
pub mod report;
pub mod rules;

use anyhow::{Context, Result};
use onnx_protobuf::ModelProto;

use crate::graph::{is_default_domain, Graph};
use crate::rules::Analysis;

/// Matches every attention candidate of the model's main graph.
pub fn analyse(model: &ModelProto) -> Result<Analysis> {
    let g = model.graph.as_ref().context("the model has no graph")?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| is_default_domain(&o.domain))
        .map_or(1, |o| o.version);
    Ok(rules::analyse(&Graph::new(g), &rules::Context { opset }))
}
