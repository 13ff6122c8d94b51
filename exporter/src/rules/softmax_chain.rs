//! P1–P4: unfused softmax attention (GPT-2/GPT-Neo bias buffer, HF eager, lowered SDPA, nanoGPT
//! masked_fill). One walk covers them; the family name records which scale and mask forms it saw.

use onnx_protobuf::NodeProto;

use super::{causal, heads, kv, node_label, Block, Context, Layout, Rejection, RuleResult, Tap};
use crate::graph::{attr_i, attr_ints, input, is_default_domain, output, Graph};

const FAMILY: &str = "softmax";

/// Side inputs of the score chain, collected for the causality proof.
pub enum Side {
    /// An additive mask tensor.
    Additive(String),
    /// `Where(cond, …)`: `keep_when_true` says which branch holds the scores.
    Condition { cond: String, keep_when_true: bool },
}

pub fn match_softmax(g: &Graph, ctx: &Context, sm: &NodeProto) -> RuleResult {
    let name = node_label(sm);
    let reject = |expected: &str, found: String| Rejection::new(&name, FAMILY, expected, found);
    let axis = attr_i(sm, "axis").unwrap_or(if ctx.opset < 13 { 1 } else { -1 });
    if axis != -1 && axis != 3 {
        return Err(reject(
            "Softmax over the last axis of 4-D scores",
            format!("axis={axis}"),
        ));
    }
    let probs = sm
        .output
        .first()
        .ok_or_else(|| reject("an output", "none".into()))?;
    let pv = forward_to_pv(g, probs)
        .map_err(|f| reject("Softmax → [Cast|IsNaN guard]* → MatMul(probs, V)", f))?;

    // Backward: the score chain down to the Q·Kᵀ MatMul.
    let mut sides = Vec::new();
    let mut scale = 1.0f64;
    let mut scale_on_scores = false;
    let mut t = sm.input.first().cloned().unwrap_or_default();
    let scores = loop {
        let n = g.producer(&t).ok_or_else(|| {
            reject(
                "a score chain ending in MatMul(Q, Kᵀ)",
                format!("{t} has no producer"),
            )
        })?;
        if !is_default_domain(&n.domain) || n.input.is_empty() {
            return Err(reject(
                "Add/Mul/Div/Where/Cast on the scores",
                format!("{} {}", n.op_type, node_label(n)),
            ));
        }
        match n.op_type.as_str() {
            "Cast" | "Identity" => t = input(n, 0).to_string(),
            "MatMul" => break n,
            "Add" | "Mul" | "Div" if n.input.len() == 2 => {
                let data = data_operand(g, n, &[0, 1]).ok_or_else(|| {
                    reject(
                        "exactly one operand carrying the scores",
                        format!("{} {}", n.op_type, node_label(n)),
                    )
                })?;
                let other = &n.input[1 - data];
                match n.op_type.as_str() {
                    "Add" => sides.push(Side::Additive(other.clone())),
                    op => {
                        let c = scalar_of(g, other).ok_or_else(|| {
                            reject(
                                "a scalar scale on the scores",
                                format!(
                                    "{op} {} by non-scalar {other} (ALiBi or a relative bias?)",
                                    node_label(n)
                                ),
                            )
                        })?;
                        if op == "Div" && data == 1 {
                            return Err(reject(
                                "scores divided by a scale",
                                format!("{} divides a constant by the scores", node_label(n)),
                            ));
                        }
                        scale *= if op == "Mul" { c } else { 1.0 / c };
                        scale_on_scores = true;
                    }
                }
                t = n.input[data].clone();
            }
            "Where" if n.input.len() == 3 => {
                let data = data_operand(g, n, &[1, 2]).ok_or_else(|| {
                    reject(
                        "a Where with the scores on one branch",
                        format!("Where {}", node_label(n)),
                    )
                })?;
                let fill = &n.input[3 - data];
                match scalar_of(g, fill) {
                    Some(f) if f <= -1e4 => {}
                    other => {
                        return Err(reject(
                            "a Where filling masked scores with a large negative value",
                            format!("Where {} fills with {other:?}", node_label(n)),
                        ))
                    }
                }
                sides.push(Side::Condition {
                    cond: input(n, 0).to_string(),
                    keep_when_true: data == 1,
                });
                t = n.input[data].clone();
            }
            op => {
                return Err(reject(
                    "only Add/Mul/Div/Where/Cast between Q·Kᵀ and Softmax",
                    format!("{op} {}", node_label(n)),
                ))
            }
        }
    };
    if scores.input.len() != 2 {
        return Err(reject(
            "MatMul(Q, Kᵀ)",
            format!(
                "MatMul {} with {} inputs",
                node_label(scores),
                scores.input.len()
            ),
        ));
    }

    // Q: strip a scalar scale (lowered SDPA splits √scale over Q and Kᵀ).
    let (q_t, q_scale) = strip_scale(g, input(scores, 0));
    let (kt, k_scale) = strip_scale(g, input(scores, 1));
    let split_scale = q_scale.is_some() || k_scale.is_some();
    scale *= q_scale.unwrap_or(1.0) * k_scale.unwrap_or(1.0);
    if g.constant(&q_t).is_some() || g.constant(&kt).is_some() {
        return Err(reject(
            "Q·Kᵀ of two activations",
            format!("a constant operand on {}", node_label(scores)),
        ));
    }

    // Kᵀ: Transpose(0,1,3,2) of K (b,h,kv,d), Transpose(0,2,3,1) of K (b,s,h,d), or the dynamo
    // decomposition Reshape(Transpose(Reshape(K, [-1, kv, d]), [0,2,1]), 4-D).
    let (k_total, perm) = match g.producer_op(&kt, "Transpose") {
        Some(t) => (
            input(t, 0).to_string(),
            attr_ints(t, "perm").unwrap_or(&[]).to_vec(),
        ),
        None => match dynamo_kt(g, &kt) {
            Some(k) => (k, vec![0, 1, 3, 2]),
            None => {
                return Err(reject(
                    "Kᵀ = Transpose(K) or Reshape(Transpose(Reshape(K), [0,2,1]))",
                    format!("{kt} from {}", producer_text(g, &kt)),
                ))
            }
        },
    };
    let (k_new, k_layout, k_cache, k_rep) = match perm.as_slice() {
        [0, 1, 3, 2] => {
            let (x, rep) = kv::peel_repeat(g, &k_total);
            let (new, cache) = kv::peel_cache(g, &x);
            (new, Layout::Bhsd, cache, rep)
        }
        [0, 2, 3, 1] => (
            k_total.clone(),
            Layout::Bshd,
            kv::CacheSide::default(),
            false,
        ),
        p => {
            return Err(reject(
                "Kᵀ as Transpose perm [0,1,3,2] or [0,2,3,1]",
                format!("perm {p:?} producing {kt}"),
            ))
        }
    };
    let (v_x, v_rep) = kv::peel_repeat(g, input(pv, 1));
    let (v_new, v_cache) = kv::peel_cache(g, &v_x);
    if k_rep != v_rep {
        return Err(reject(
            "the same head repetition on K and V",
            format!("K repeated: {k_rep}, V repeated: {v_rep}"),
        ));
    }

    let causal = causal::prove(g, &sides).map_err(|(node, expected, found)| {
        Rejection::new(&name, FAMILY, expected, format!("{found} (at {node})"))
    })?;
    let rope = heads::describe_rope(g, &q_t);
    let q_tap = heads::prefer_bshd(g, &q_t);
    let k_tap = match k_layout {
        Layout::Bhsd => heads::prefer_bshd(g, &k_new),
        Layout::Bshd => Tap::tensor(k_new.clone(), Layout::Bshd),
    };
    let v_tap = heads::prefer_bshd(g, &v_new);
    let hq = heads::head_info(g, &q_t);
    let hk = heads::head_info(g, &k_new);
    let hv = heads::head_info(g, &v_new);
    let dtype = hq.dtype.or(hk.dtype).unwrap_or(crate::graph::dtype::FLOAT);

    let scale_form = match (scale_on_scores, split_scale) {
        (true, false) => "scale on scores",
        (false, true) => "scale split over Q and Kᵀ",
        (false, false) => "unscaled",
        (true, true) => "scale on Q/Kᵀ and scores",
    };
    let family_id = if split_scale {
        "P3 lowered SDPA"
    } else if causal.contains("M1") && !scale_on_scores {
        "P1b GPT-Neo bias buffer"
    } else if causal.contains("M1") {
        "P1a bias buffer"
    } else if causal.contains("M5") {
        "P4 masked_fill"
    } else {
        "P2 eager"
    };
    Ok(Block {
        anchor: name.clone(),
        family: format!("{family_id} ({scale_form})"),
        q: q_tap,
        k: k_tap,
        v: v_tap,
        out: block_output(g, pv),
        out_layout: super::OutLayout::Bhsd,
        scale,
        causal,
        rope,
        kv_repeat: k_rep,
        cache: super::Cache {
            past_key: k_cache.past,
            past_value: v_cache.past,
            present_key: k_cache.present,
            present_value: v_cache.present,
        },
        heads: super::Heads {
            hq: hq.heads,
            hkv: hk.heads.or(hv.heads),
            dk: hq.dim.or(hk.dim),
            dv: hv.dim,
        },
        dtype,
    })
}

/// K (b, h, kv, d) under the dynamo exporter's 3-D transpose of it.
fn dynamo_kt(g: &Graph, kt: &str) -> Option<String> {
    let outer = g.producer_op(kt, "Reshape")?;
    let t = g.producer_op(input(outer, 0), "Transpose")?;
    if attr_ints(t, "perm") != Some(&[0, 2, 1]) {
        return None;
    }
    let inner = g.producer_op(input(t, 0), "Reshape")?;
    Some(input(inner, 0).to_string())
}

/// The P·V output, or the same-shape `Reshape` TorchScript SDPA puts right after it (its target
/// is computed from Shape(V), which would keep the replaced V path alive).
fn block_output(g: &Graph, pv: &NodeProto) -> String {
    let out = pv.output.first().cloned().unwrap_or_default();
    let consumers = g.consumers(&out);
    let mut reshapes = consumers.iter().filter(|n| n.op_type == "Reshape");
    let others_are_shapes = consumers
        .iter()
        .all(|n| n.op_type == "Reshape" || n.op_type == "Shape");
    if let (Some(r), None, true) = (reshapes.next(), reshapes.next(), others_are_shapes) {
        if r.input.first() == Some(&out) {
            let merge = g.consumers(output(r, 0));
            if let [t] = merge.as_slice() {
                if t.op_type == "Transpose" && attr_ints(t, "perm") == Some(&[0, 2, 1, 3]) {
                    return output(r, 0).to_string();
                }
            }
        }
    }
    out
}

fn producer_text(g: &Graph, t: &str) -> String {
    match g.producer(t) {
        Some(n) => format!("{} {}", n.op_type, node_label(n)),
        None if g.is_graph_input(t) => "a graph input".into(),
        None => "no producer".into(),
    }
}

/// The MatMul that consumes the probabilities as its A operand.
fn forward_to_pv<'a>(g: &Graph<'a>, probs: &str) -> Result<&'a NodeProto, String> {
    let mut t = probs.to_string();
    for _ in 0..8 {
        let cons = g.consumers(&t);
        // The IsNaN guard of a boolean-masked SDPA: Where(IsNaN(p), 0, p).
        if cons.len() == 2 {
            let guard = cons
                .iter()
                .find(|n| n.op_type == "Where" && n.input.len() == 3 && n.input[2] == t);
            let isnan = cons.iter().any(|n| n.op_type == "IsNaN");
            if let (Some(w), true) = (guard, isnan) {
                t = output(w, 0).to_string();
                continue;
            }
        }
        let [n] = cons.as_slice() else {
            return Err(format!("{} consumers of {t}", cons.len()));
        };
        match n.op_type.as_str() {
            "Cast" | "Identity" | "Dropout" => t = output(n, 0).to_string(),
            "MatMul" if n.input.first() == Some(&t) && n.input.len() == 2 => return Ok(n),
            op => return Err(format!("{op} {}", node_label(n))),
        }
    }
    Err(format!("no MatMul after {probs}"))
}

/// Which of `candidates` (input indices) carries the scores: the only one whose cone reaches a
/// MatMul of two activations through score-chain ops.
fn data_operand(g: &Graph, n: &NodeProto, candidates: &[usize]) -> Option<usize> {
    let hits: Vec<usize> = candidates
        .iter()
        .copied()
        .filter(|&i| n.input.get(i).is_some_and(|t| reaches_scores(g, t, 10)))
        .collect();
    match hits.as_slice() {
        [i] => Some(*i),
        _ => None,
    }
}

fn reaches_scores(g: &Graph, t: &str, depth: usize) -> bool {
    let Some(n) = g.producer(t) else { return false };
    if !is_default_domain(&n.domain) || depth == 0 {
        return false;
    }
    match n.op_type.as_str() {
        "MatMul" => n.input.len() == 2 && n.input.iter().all(|i| g.constant(i).is_none()),
        "Add" | "Mul" | "Div" | "Where" | "Cast" | "Identity" => {
            n.input.iter().any(|i| reaches_scores(g, i, depth - 1))
        }
        _ => false,
    }
}

/// A scalar side operand: a constant, or a shape-derived scalar folded by [`heads::fold_scalar`].
fn scalar_of(g: &Graph, t: &str) -> Option<f64> {
    g.scalar(g.skip_passthrough(t))
        .or_else(|| heads::fold_scalar(g, t))
}

/// Strips `Cast`s and one scalar `Mul`/`Div`; returns the data tensor and the scale it carried.
fn strip_scale(g: &Graph, t: &str) -> (String, Option<f64>) {
    let t = g.skip_passthrough(t);
    if let Some(n) = g.producer(t) {
        if is_default_domain(&n.domain)
            && n.input.len() == 2
            && matches!(n.op_type.as_str(), "Mul" | "Div")
        {
            let c1 = scalar_of(g, input(n, 1));
            let c0 = scalar_of(g, input(n, 0));
            match (n.op_type.as_str(), c0, c1) {
                ("Mul", None, Some(c)) => {
                    return (g.skip_passthrough(input(n, 0)).to_string(), Some(c))
                }
                ("Mul", Some(c), None) => {
                    return (g.skip_passthrough(input(n, 1)).to_string(), Some(c))
                }
                ("Div", None, Some(c)) if c != 0.0 => {
                    return (g.skip_passthrough(input(n, 0)).to_string(), Some(1.0 / c))
                }
                _ => {}
            }
        }
    }
    (t.to_string(), None)
}
