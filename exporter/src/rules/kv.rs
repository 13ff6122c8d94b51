//! K/V plumbing shared by the rules: HF `repeat_kv` (G1) and the cache `Concat` (K1, K2).

use crate::graph::{attr_i, attr_ints, input, Graph};

#[derive(Default)]
pub struct CacheSide {
    /// The graph input holding the past (the root of a stacked past when K2).
    pub past: Option<String>,
    /// The graph output exposing past + new.
    pub present: Option<String>,
}

/// Undoes `Reshape(Expand(Unsqueeze(x, 2)))`; returns `x` and whether it was there.
pub fn peel_repeat(g: &Graph, t: &str) -> (String, bool) {
    let t = g.skip_passthrough(t);
    let found = g
        .producer_op(t, "Reshape")
        .and_then(|r| g.producer_op(input(r, 0), "Expand"))
        .and_then(|e| g.producer_op(input(e, 0), "Unsqueeze"))
        .filter(|u| unsqueeze_axes(g, u).as_deref() == Some(&[2]));
    match found {
        Some(u) => (input(u, 0).to_string(), true),
        None => (t.to_string(), false),
    }
}

fn unsqueeze_axes(g: &Graph, u: &onnx_protobuf::NodeProto) -> Option<Vec<i64>> {
    if let Some(a) = attr_ints(u, "axes") {
        return Some(a.to_vec());
    }
    let v = g.constant_values(u.input.get(1)?)?;
    Some(v.into_iter().map(|x| x as i64).collect())
}

/// Undoes `Concat(past, new, axis=-2)`; returns `new` and the cache wiring.
pub fn peel_cache(g: &Graph, t: &str) -> (String, CacheSide) {
    let t = g.skip_passthrough(t);
    let Some(c) = g.producer_op(t, "Concat") else {
        return (t.to_string(), CacheSide::default());
    };
    let axis = attr_i(c, "axis");
    if c.input.len() != 2 || !matches!(axis, Some(-2) | Some(2)) {
        return (t.to_string(), CacheSide::default());
    }
    let present = if g.is_graph_output(t) {
        Some(t.to_string())
    } else {
        g.consumers(t)
            .into_iter()
            .filter(|n| n.op_type == "Cast")
            .flat_map(|n| n.output.iter())
            .find(|o| g.is_graph_output(o))
            .cloned()
    };
    (
        input(c, 1).to_string(),
        CacheSide {
            past: past_root(g, input(c, 0)),
            present,
        },
    )
}

/// The graph input a past tensor comes from, through a one-input `Concat` or a stacked
/// `Split`/`Squeeze`/`Gather`.
fn past_root(g: &Graph, t: &str) -> Option<String> {
    let mut t = g.skip_passthrough(t).to_string();
    for _ in 0..4 {
        if g.is_graph_input(&t) {
            return Some(t);
        }
        let n = g.producer(&t)?;
        match n.op_type.as_str() {
            "Concat" if n.input.len() == 1 => t = input(n, 0).to_string(),
            "Squeeze" | "Split" | "Gather" => t = input(n, 0).to_string(),
            _ => return None,
        }
    }
    None
}
