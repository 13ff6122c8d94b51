//! P7: `com.microsoft.GroupQueryAttention`, as onnxruntime-genai's model builder writes it.

use onnx_protobuf::NodeProto;

use super::{
    heads, node_label, Block, Cache, Heads, OutLayout, Rejection, Rotary, RuleResult, Tap,
};
use crate::graph::{attr_f, attr_i, dtype, input, output, Graph};

/// P7: `com.microsoft.GroupQueryAttention` (onnxruntime-genai): packed or separate q/k/v, in-op
/// GQA and RoPE, causal by construction. RoPE is materialised from its cos/sin caches.
pub fn match_gqa(g: &Graph, n: &NodeProto) -> RuleResult {
    const FAMILY: &str = "P7 GroupQueryAttention";
    let name = node_label(n);
    let reject = |e: &str, f: String| Rejection::new(&name, FAMILY, e, f);
    let window = attr_i(n, "local_window_size").unwrap_or(-1);
    if window >= 0 {
        return Err(reject(
            "local_window_size=-1",
            format!("local_window_size={window}: sliding-window attention is not causal-global"),
        ));
    }
    if attr_f(n, "softcap").is_some_and(|c| c != 0.0) {
        return Err(reject(
            "softcap=0",
            "softcap set: capped scores have no power-retention equivalent".into(),
        ));
    }
    for (attr, what) in [
        ("rotary_interleaved", "interleaved rotary"),
        ("smooth_softmax", "smooth softmax"),
    ] {
        if attr_i(n, attr).unwrap_or(0) != 0 {
            return Err(reject(&format!("{attr}=0"), what.into()));
        }
    }
    if n.input.iter().skip(9).any(|i| !i.is_empty()) {
        return Err(reject(
            "no position_ids/attention_bias/head_sink inputs",
            "some given".into(),
        ));
    }
    let hq = attr_i(n, "num_heads")
        .filter(|&h| h > 0)
        .ok_or_else(|| reject("num_heads", "missing".into()))?;
    let hkv = attr_i(n, "kv_num_heads")
        .filter(|&h| h > 0 && hq % h == 0)
        .ok_or_else(|| {
            reject(
                "kv_num_heads dividing num_heads",
                "missing or not a divisor".into(),
            )
        })?;
    let packed = input(n, 1).is_empty() && input(n, 2).is_empty();
    let (qw, dtype) = heads::projection_width(g, input(n, 0));
    let width = qw.ok_or_else(|| {
        reject(
            "a query from a MatMul by a weight",
            format!("{} of unknown width", input(n, 0)),
        )
    })?;
    let d = if packed {
        width / (hq + 2 * hkv)
    } else {
        width / hq
    };
    if d <= 0 || (packed && width % (hq + 2 * hkv) != 0) || (!packed && width % hq != 0) {
        return Err(reject(
            "a query width that splits into heads",
            format!("width {width}"),
        ));
    }
    let rotary = if attr_i(n, "do_rotary").unwrap_or(0) == 1 {
        let cache = g
            .initializer(input(n, 7))
            .filter(|c| c.dims.len() == 2 && g.initializer(input(n, 8)).is_some())
            .ok_or_else(|| {
                reject(
                    "cos_cache/sin_cache initializers (max_pos, rot/2)",
                    "missing".into(),
                )
            })?;
        let rot = 2 * cache.dims[1];
        if rot <= 0 || rot > d {
            return Err(reject(
                "a rotary dim within the head dim",
                format!("rotary dim {rot}, head dim {d}"),
            ));
        }
        Some(Rotary {
            cos: input(n, 7).into(),
            sin: input(n, 8).into(),
            total_len: input(n, 6).into(),
            rot,
        })
    } else {
        None
    };
    let part = |src: &str, offset: i64, heads: i64, rope: bool| Tap::Packed {
        input: src.to_string(),
        weight: None,
        bias: None,
        offset,
        width: heads * d,
        heads,
        rotary: if rope { rotary.clone() } else { None },
    };
    let (q, k, v) = if packed {
        let qkv = input(n, 0);
        (
            part(qkv, 0, hq, true),
            part(qkv, hq * d, hkv, true),
            part(qkv, (hq + hkv) * d, hkv, false),
        )
    } else {
        (
            part(input(n, 0), 0, hq, true),
            part(input(n, 1), 0, hkv, true),
            part(input(n, 2), 0, hkv, false),
        )
    };
    let graph_input = |i: usize| {
        Some(input(n, i))
            .filter(|p| g.is_graph_input(p))
            .map(str::to_string)
    };
    let graph_output = |i: usize| n.output.get(i).filter(|p| g.is_graph_output(p)).cloned();
    let scale = attr_f(n, "scale")
        .filter(|s| *s != 0.0)
        .map_or(1.0 / (d as f64).sqrt(), f64::from);
    Ok(Block {
        anchor: name.clone(),
        family: format!(
            "{FAMILY} ({})",
            if packed {
                "packed QKV"
            } else {
                "separate Q/K/V"
            }
        ),
        q,
        k,
        v,
        out: output(n, 0).to_string(),
        out_layout: OutLayout::Merged,
        scale,
        causal: "M6 GroupQueryAttention (always causal, no window)".into(),
        rope: if rotary.is_some() {
            "R5 in-op rotary (materialised)".into()
        } else {
            "none".into()
        },
        kv_repeat: false,
        cache: Cache {
            past_key: graph_input(3),
            past_value: graph_input(4),
            present_key: graph_output(1),
            present_value: graph_output(2),
        },
        heads: Heads {
            hq: Some(hq),
            hkv: Some(hkv),
            dk: Some(d),
            dv: Some(d),
        },
        dtype: dtype.unwrap_or(dtype::FLOAT),
    })
}
