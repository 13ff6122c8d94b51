//! P6: ONNX Runtime's `com.microsoft.Attention` (GPT-2 converter + transformer optimizer), and
//! the other contrib attention ops, which are refused.

use onnx_protobuf::NodeProto;

use super::{node_label, Block, Cache, Heads, OutLayout, Rejection, RuleResult, Tap};
use crate::graph::{attr_f, attr_i, attr_ints, input, output, Graph};

/// P6: ORT's `com.microsoft.Attention`: packed QKV weights, causal by `unidirectional=1`, an
/// optional stacked `(2, b, H, past, d)` cache. Expanded into the projection and the new op.
pub fn match_ms_attention(g: &Graph, n: &NodeProto) -> RuleResult {
    const FAMILY: &str = "P6 com.microsoft.Attention";
    let name = node_label(n);
    let reject = |e: &str, f: String| Rejection::new(&name, FAMILY, e, f);
    if attr_i(n, "unidirectional") != Some(1) {
        return Err(reject(
            "unidirectional=1",
            "unidirectional=0: bidirectional attention".into(),
        ));
    }
    for (attr, what) in [
        ("do_rotary", "in-op rotary embedding"),
        ("past_present_share_buffer", "a shared past/present buffer"),
    ] {
        if attr_i(n, attr).unwrap_or(0) != 0 {
            return Err(reject(&format!("{attr}=0"), what.into()));
        }
    }
    if n.input.iter().skip(5).any(|i| !i.is_empty()) {
        return Err(reject(
            "no attention bias or past length inputs",
            "extra inputs (relative position bias?)".into(),
        ));
    }
    let heads = attr_i(n, "num_heads")
        .filter(|&h| h > 0)
        .ok_or_else(|| reject("num_heads", "missing".into()))?;
    let weight = input(n, 1);
    let w = g
        .initializer(weight)
        .filter(|w| w.dims.len() == 2)
        .ok_or_else(|| reject("a 2-D weight initializer", format!("{weight} is not one")))?;
    let sizes = match attr_ints(n, "qkv_hidden_sizes") {
        Some([q, k, v]) => [*q, *k, *v],
        Some(s) => return Err(reject("three qkv_hidden_sizes", format!("{s:?}"))),
        None => [w.dims[1] / 3; 3],
    };
    if sizes.iter().sum::<i64>() != w.dims[1] || sizes.iter().any(|s| *s <= 0 || s % heads != 0) {
        return Err(reject(
            "weight columns = q + k + v widths, each a multiple of num_heads",
            format!("weight {:?}, sizes {sizes:?}", w.dims),
        ));
    }
    let (dk, dv) = (sizes[0] / heads, sizes[2] / heads);
    let bias = Some(input(n, 2))
        .filter(|b| !b.is_empty())
        .map(str::to_string);
    let part = |offset: i64, width: i64| Tap::Packed {
        input: input(n, 0).to_string(),
        weight: Some(weight.to_string()),
        bias: bias.clone(),
        offset,
        width,
        heads,
        rotary: None,
    };
    let past = Some(input(n, 4))
        .filter(|p| !p.is_empty())
        .map(str::to_string);
    let present = n.output.get(1).filter(|p| g.is_graph_output(p)).cloned();
    if past.as_ref().is_some_and(|p| !g.is_graph_input(p)) {
        return Err(reject(
            "the past as a graph input",
            format!("{} is computed", past.unwrap_or_default()),
        ));
    }
    let scale = attr_f(n, "scale")
        .filter(|s| *s != 0.0)
        .map_or(1.0 / (dk as f64).sqrt(), f64::from);
    Ok(Block {
        anchor: name.clone(),
        family: FAMILY.into(),
        q: part(0, sizes[0]),
        k: part(sizes[0], sizes[1]),
        v: part(sizes[0] + sizes[1], sizes[2]),
        out: output(n, 0).to_string(),
        out_layout: OutLayout::Merged,
        scale,
        causal: "M6 unidirectional=1 (padding in mask_index is dropped)".into(),
        rope: "none".into(),
        kv_repeat: false,
        cache: Cache {
            past_key: past,
            past_value: None,
            present_key: present,
            present_value: None,
        },
        heads: Heads {
            hq: Some(heads),
            hkv: Some(heads),
            dk: Some(dk),
            dv: Some(dv),
        },
        dtype: w.data_type,
    })
}

/// Other ORT contrib attention ops.
pub fn refuse_ms_other(n: &NodeProto) -> Rejection {
    Rejection::new(
        &node_label(n),
        "fused",
        "a supported attention form",
        format!("com.microsoft.{} is not supported", n.op_type),
    )
}
