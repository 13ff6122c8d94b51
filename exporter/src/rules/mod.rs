//! The rewrite engine's matching half: one rule per pattern family, all read-only.
//!
//! Every anchor (a `Softmax`, a fused attention op, a control-flow node holding attention) is
//! offered to the rule of its family. A rule returns either a [`Block`] (what to rewrite and the
//! facts the report shows) or a [`Rejection`] naming the node, the pattern it expected and what
//! it found. Family ids follow `onnx-attention-patterns.md`.

mod causal;
mod control_flow;
mod gqa;
mod heads;
mod kv;
mod ms_attention;
mod onnx_attention;
mod softmax_chain;

use crate::graph::{is_default_domain, Graph};

/// Where a tap tensor's axes are: PowerRetention wants `(b, s, h, d)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Bhsd,
    Bshd,
}

/// Where the rewrite takes q, k or v from.
#[derive(Clone, Debug)]
pub enum Tap {
    /// An existing tensor.
    Tensor { tensor: String, layout: Layout },
    /// A slice of a packed projection `input · weight (+ bias)` inside a fused op: the rewrite
    /// computes it, `(b, s, width)` at `offset` on the last axis, split into `heads` heads.
    Packed {
        input: String,
        /// `None`: `input` is the projection output already.
        weight: Option<String>,
        bias: Option<String>,
        offset: i64,
        width: i64,
        heads: i64,
        /// In-op rotary embedding to apply after the head split.
        rotary: Option<Rotary>,
    },
}

/// Non-interleaved rotary embedding from `(max_pos, rot/2)` caches, for the positions
/// `total - s .. total` (GroupQueryAttention's convention without `position_ids`).
#[derive(Clone, Debug)]
pub struct Rotary {
    pub cos: String,
    pub sin: String,
    pub total_len: String,
    /// Rotated leading dims of each head (`2 * cos_cache.dims[1]`).
    pub rot: i64,
}

impl Tap {
    pub fn tensor(tensor: impl Into<String>, layout: Layout) -> Tap {
        Tap::Tensor {
            tensor: tensor.into(),
            layout,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Tap::Tensor { tensor, .. } => tensor.clone(),
            Tap::Packed {
                input,
                weight,
                offset,
                width,
                rotary,
                ..
            } => {
                let w = weight.as_deref().map_or(String::new(), |w| format!("·{w}"));
                let r = if rotary.is_some() { " + rotary" } else { "" };
                format!("({input}{w})[{offset}..{}]{r}", offset + width)
            }
        }
    }
}

/// The layout of a block's output tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutLayout {
    /// `(b, Hq, s, Dv)`, before the model's own head merge.
    Bhsd,
    /// `(b, s, Hq·Dv)`: a fused op's output.
    Merged,
}

/// Static sizes of one attention block, where the graph fixes them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Heads {
    pub hq: Option<i64>,
    pub hkv: Option<i64>,
    pub dk: Option<i64>,
    pub dv: Option<i64>,
}

/// The KV-cache wiring of one layer in the original graph.
#[derive(Clone, Debug, Default)]
pub struct Cache {
    pub past_key: Option<String>,
    pub past_value: Option<String>,
    pub present_key: Option<String>,
    pub present_value: Option<String>,
}

/// One matched attention block.
#[derive(Clone, Debug)]
pub struct Block {
    pub anchor: String,
    pub family: String,
    pub q: Tap,
    pub k: Tap,
    pub v: Tap,
    /// The tensor the block produces; the rewrite makes it from the new op.
    pub out: String,
    pub out_layout: OutLayout,
    /// Multiplies q·k before the softmax.
    pub scale: f64,
    pub causal: String,
    pub rope: String,
    /// K/V were repeated to the query head count (HF `repeat_kv`) before the scores.
    pub kv_repeat: bool,
    pub cache: Cache,
    pub heads: Heads,
    /// `TensorProto.DataType` of q/k/v.
    pub dtype: i32,
}

#[derive(Clone, Debug)]
pub struct Rejection {
    pub node: String,
    pub family: &'static str,
    pub expected: String,
    pub found: String,
}

impl Rejection {
    pub fn new(
        node: &str,
        family: &'static str,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Rejection {
        Rejection {
            node: node.to_string(),
            family,
            expected: expected.into(),
            found: found.into(),
        }
    }
}

pub type RuleResult = Result<Block, Rejection>;

/// What the matcher found in a model.
pub struct Analysis {
    pub blocks: Vec<Block>,
    pub rejections: Vec<Rejection>,
}

/// Model-level facts the rules need.
pub struct Context {
    /// Version of the default ONNX domain.
    pub opset: i64,
}

pub fn analyse(g: &Graph, ctx: &Context) -> Analysis {
    let mut blocks = Vec::new();
    let mut rejections = Vec::new();
    for n in &g.proto.node {
        let result = match (n.domain.as_str(), n.op_type.as_str()) {
            (d, "Softmax") if is_default_domain(d) => softmax_chain::match_softmax(g, ctx, n),
            (d, "Attention") if is_default_domain(d) => onnx_attention::match_onnx_attention(g, n),
            ("com.microsoft", "Attention") => ms_attention::match_ms_attention(g, n),
            ("com.microsoft", "GroupQueryAttention") => gqa::match_gqa(g, n),
            ("com.microsoft", "MultiHeadAttention" | "PackedAttention" | "SparseAttention") => {
                Err(ms_attention::refuse_ms_other(n))
            }
            (d, "If" | "Loop" | "Scan") if is_default_domain(d) => {
                match control_flow::refuse_control_flow(n) {
                    Some(r) => Err(r),
                    None => continue,
                }
            }
            _ => continue,
        };
        match result {
            Ok(b) => blocks.push(b),
            Err(r) => rejections.push(r),
        }
    }
    Analysis { blocks, rejections }
}

/// Display name of a node: its name, or its op and first output when unnamed.
pub fn node_label(n: &onnx_protobuf::NodeProto) -> String {
    if n.name.is_empty() {
        format!(
            "{}→{}",
            n.op_type,
            n.output.first().map_or("", |s| s.as_str())
        )
    } else {
        n.name.clone()
    }
}
