//! `retention.json`: what a decoding loop needs to drive a rewritten prefill/decode pair.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Names of one model's token-level inputs and its logits output.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelIo {
    pub file: String,
    pub input_ids: String,
    pub position_ids: Option<String>,
    pub attention_mask: Option<String>,
    pub logits: String,
}

/// One tensor carried between decode steps (per layer: state, sum of keys, key/value caches,
/// optional log-gate cache, cache length).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StateTensor {
    pub layer: usize,
    /// state | sum_of_keys | key_cache | value_cache | log_gate_cache | cache_length
    pub role: String,
    /// The prefill model's output that initialises it (none: starts at zero).
    pub prefill_output: Option<String>,
    pub decode_input: String,
    pub decode_output: String,
    /// Dims with the batch written as -1.
    pub shape: Vec<i64>,
    pub dtype: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub source: String,
    pub deg: i64,
    pub chunk_size: i64,
    pub cache_capacity: i64,
    pub prefill: ModelIo,
    pub decode: ModelIo,
    pub state: Vec<StateTensor>,
}

impl Manifest {
    pub const FILE: &'static str = "retention.json";

    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(Self::FILE);
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
    }
}
