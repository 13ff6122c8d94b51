//! P5: the standard ONNX `Attention` op (opset 23) as the dynamo exporter writes it for SDPA.

use onnx_protobuf::NodeProto;

use super::{causal, heads, kv, node_label, Block, Cache, Heads, Rejection, RuleResult};
use crate::graph::{attr_f, attr_i, dtype, Graph};

/// P5: ONNX `Attention` (opset 23) with 4-D Q/K/V and the cache concatenated outside the op.
pub fn match_onnx_attention(g: &Graph, n: &NodeProto) -> RuleResult {
    const FAMILY: &str = "P5 onnx-attention";
    let name = node_label(n);
    let reject = |e: &str, f: String| Rejection::new(&name, FAMILY, e, f);
    let used_extra = n
        .output
        .iter()
        .skip(1)
        .any(|o| !o.is_empty() && !g.consumers(o).is_empty() || g.is_graph_output(o));
    if n.input.len() > 4 && n.input[4..].iter().any(|i| !i.is_empty()) || used_extra {
        return Err(reject(
            "no in-op past/present slots (the exporter concatenates outside)",
            "in-op KV cache".into(),
        ));
    }
    if attr_f(n, "softcap").is_some_and(|c| c != 0.0) {
        return Err(reject("softcap = 0", "softcap set".into()));
    }
    let (q, k_all, v_all) = match n.input.as_slice() {
        [q, k, v, ..] => (q, k, v),
        _ => {
            return Err(reject(
                "Attention(Q, K, V, …)",
                format!("{} inputs", n.input.len()),
            ))
        }
    };
    let hq = heads::head_info(g, q);
    if hq.dim.is_none() {
        return Err(reject(
            "4-D Q from a head-split Reshape → Transpose",
            "no head split found above Q".into(),
        ));
    }
    let (k_x, k_rep) = kv::peel_repeat(g, k_all);
    let (k_new, k_cache) = kv::peel_cache(g, &k_x);
    let (v_x, v_rep) = kv::peel_repeat(g, v_all);
    let (v_new, v_cache) = kv::peel_cache(g, &v_x);
    let causal = if attr_i(n, "is_causal") == Some(1) {
        "M6 is_causal=1".to_string()
    } else {
        let mask = n.input.get(3).filter(|m| !m.is_empty()).ok_or_else(|| {
            reject(
                "is_causal=1 or a causal attn_mask",
                "no mask and is_causal=0".into(),
            )
        })?;
        // A boolean attn_mask keeps the true entries; a float one is added to the scores.
        let side = if g.elem_type(mask) == Some(dtype::BOOL) {
            super::softmax_chain::Side::Condition {
                cond: mask.clone(),
                keep_when_true: true,
            }
        } else {
            super::softmax_chain::Side::Additive(mask.clone())
        };
        causal::prove(g, &[side])
            .map_err(|(node, e, f)| Rejection::new(&name, FAMILY, e, format!("{f} (at {node})")))?
    };
    let dk = hq.dim.unwrap_or(1);
    let scale = attr_f(n, "scale").map_or(1.0 / (dk as f64).sqrt(), f64::from);
    let hk = heads::head_info(g, &k_new);
    let hv = heads::head_info(g, &v_new);
    Ok(Block {
        anchor: name.clone(),
        family: "P5 onnx Attention op".into(),
        q: heads::prefer_bshd(g, q),
        k: heads::prefer_bshd(g, &k_new),
        v: heads::prefer_bshd(g, &v_new),
        out: n.output.first().cloned().unwrap_or_default(),
        out_layout: super::OutLayout::Bhsd,
        scale,
        causal,
        rope: heads::describe_rope(g, q),
        kv_repeat: k_rep || v_rep,
        cache: Cache {
            past_key: k_cache.past,
            past_value: v_cache.past,
            present_key: k_cache.present,
            present_value: v_cache.present,
        },
        heads: Heads {
            hq: hq.heads,
            hkv: hk.heads,
            dk: hq.dim,
            dv: hv.dim,
        },
        dtype: hq.dtype.unwrap_or(dtype::FLOAT),
    })
}
