//! Proof that a score chain's masks make it causal over the whole past (M1–M5). Never assumed:
//! a constant buffer is read and compared with `tril`; a computed mask must contain exactly one
//! position comparison (or a `Trilu`), so extra window comparisons are refused.

use std::collections::HashSet;

use super::node_label;
use super::softmax_chain::Side;
use crate::graph::{attr, attr_i, dtype, input, tensor_values, Graph};

pub type Failure = (String, String, String);

const CONE_LIMIT: usize = 600;
const COMPARISONS: [&str; 4] = ["LessOrEqual", "Less", "Greater", "GreaterOrEqual"];

pub fn prove(g: &Graph, sides: &[Side]) -> Result<String, Failure> {
    let mut evidence = Vec::new();
    for side in sides {
        match side {
            Side::Condition {
                cond,
                keep_when_true,
            } => match buffer_of(g, cond) {
                Some((buf, negated)) => {
                    evidence.push(check_buffer(g, &buf, negated == *keep_when_true)?)
                }
                None => evidence.extend(cone(g, cond, false)?),
            },
            Side::Additive(m) => evidence.extend(cone(g, m, true)?),
        }
    }
    if evidence.is_empty() {
        return Err((
            "-".into(),
            "a causal mask on the scores (M1–M5)".into(),
            "no causal mask found (bidirectional encoder? decode-only graph?)".into(),
        ));
    }
    evidence.dedup();
    Ok(evidence.join(" + "))
}

/// Follows a `Where` condition back through `Slice`/`Cast`/`Not`/`Equal(·, 0)` to a constant.
fn buffer_of(g: &Graph, cond: &str) -> Option<(String, bool)> {
    let mut t = cond.to_string();
    let mut negated = false;
    for _ in 0..12 {
        if g.constant(&t).is_some() {
            return Some((t, negated));
        }
        let n = g.producer(&t)?;
        match n.op_type.as_str() {
            "Slice" | "Cast" | "Identity" => t = n.input.first()?.clone(),
            "Not" => {
                negated = !negated;
                t = n.input.first()?.clone();
            }
            "Equal" if n.input.len() == 2 => {
                let zero = |i: &str| g.scalar(i) == Some(0.0);
                t = match (zero(input(n, 0)), zero(input(n, 1))) {
                    (false, true) => input(n, 0).to_string(),
                    (true, false) => input(n, 1).to_string(),
                    _ => return None,
                };
                negated = !negated;
            }
            _ => return None,
        }
    }
    None
}

/// `mask_is_masked`: true when a true/nonzero entry means "masked out".
fn check_buffer(g: &Graph, name: &str, mask_is_masked: bool) -> Result<String, Failure> {
    let fail = |found: String| {
        (
            name.to_string(),
            "a lower-triangular causal buffer".to_string(),
            found,
        )
    };
    let t = g
        .constant(name)
        .ok_or_else(|| fail("not a constant".into()))?;
    let dims = &t.dims;
    let (Some(&rows), Some(&cols)) = (dims.iter().rev().nth(1), dims.last()) else {
        return Err(fail(format!("shape {dims:?}")));
    };
    let leading = dims[..dims.len() - 2]
        .iter()
        .try_fold(1i64, |acc, &d| acc.checked_mul(d));
    if leading != Some(1) || rows != cols || rows <= 0 {
        return Err(fail(format!("shape {dims:?}")));
    }
    let v = crate::graph::tensor_values(t).ok_or_else(|| {
        fail("a buffer that cannot be read (external or unsupported dtype)".into())
    })?;
    let n = rows as usize;
    let allowed = |i: usize, j: usize| (v[i * n + j] != 0.0) != mask_is_masked;
    let mut lower = true;
    let mut width: Option<usize> = None;
    for i in 0..n {
        for j in 0..n {
            let a = allowed(i, j);
            if a != (j <= i) {
                lower = false;
            }
            if a && j <= i {
                width = Some(width.map_or(i - j + 1, |w: usize| w.max(i - j + 1)));
            }
        }
    }
    if lower {
        let kind = if t.data_type == dtype::BOOL {
            "M1"
        } else {
            "M5"
        };
        return Ok(format!("{kind} causal buffer {n}x{n}"));
    }
    let band = width
        .is_some_and(|w| (0..n).all(|i| (0..n).all(|j| allowed(i, j) == (j <= i && i - j < w))));
    Err(fail(if band {
        format!(
            "a band of width {} (local/sliding-window attention, e.g. a GPT-Neo local layer) is not causal-global",
            width.unwrap_or(0)
        )
    } else {
        "a buffer that is not lower-triangular".into()
    }))
}

/// Structural evidence inside a computed mask cone. An `additive` side must also carry a large
/// negative fill somewhere, or it is a score bias rather than a mask.
fn cone(g: &Graph, root: &str, additive: bool) -> Result<Vec<String>, Failure> {
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_string()];
    let mut comparisons = Vec::new();
    let mut trilu = false;
    let mut buffers = Vec::new();
    let mut fill = false;
    while let Some(t) = stack.pop() {
        if seen.len() > CONE_LIMIT || !seen.insert(t.clone()) {
            continue;
        }
        let Some(n) = g.producer(&t) else { continue };
        let huge_negative = |v: f64| v <= -1e4;
        fill |= n
            .input
            .iter()
            .any(|i| g.scalar(i).is_some_and(huge_negative))
            || (n.op_type == "ConstantOfShape"
                && attr(n, "value")
                    .and_then(|a| a.t.as_ref())
                    .and_then(tensor_values)
                    .is_some_and(|v| v.iter().any(|&x| huge_negative(x))));
        match n.op_type.as_str() {
            op if COMPARISONS.contains(&op) => comparisons.push(node_label(n)),
            "Trilu" => {
                // Causal forms only: keep the lower triangle (upper=0, k=0) or mask strictly
                // above the diagonal (upper=1, k=1).
                let upper = attr_i(n, "upper").unwrap_or(1);
                let k = n
                    .input
                    .get(1)
                    .filter(|k| !k.is_empty())
                    .map_or(Some(0.0), |k| g.scalar(k));
                if !matches!((upper, k), (0, Some(0.0)) | (1, Some(1.0))) || trilu {
                    return Err((
                        node_label(n),
                        "one Trilu on the causal diagonal".into(),
                        format!(
                            "Trilu(upper={upper}, k={k:?}){}",
                            if trilu { ", a second Trilu" } else { "" }
                        ),
                    ));
                }
                trilu = true;
            }
            "Where" if n.input.len() == 3 => {
                // Which branch is the fill decides what a true condition means.
                let fill = |i: usize| g.scalar(&n.input[i]).is_some_and(|v| v <= -1e4);
                let keep_when_true = match (fill(1), fill(2)) {
                    (false, true) => Some(true),
                    (true, false) => Some(false),
                    _ => None,
                };
                if let (Some(keep), Some((buf, neg))) = (keep_when_true, buffer_of(g, input(n, 0)))
                {
                    buffers.push((buf, neg == keep));
                }
            }
            _ => {}
        }
        // A Shape reads only dims: going through it would wander into earlier layers' data path
        // and pick up their masks.
        if !matches!(n.op_type.as_str(), "Shape" | "Size") {
            stack.extend(n.input.iter().filter(|i| !i.is_empty()).cloned());
        }
    }
    if additive && !fill {
        return Err((
            root.to_string(),
            "an additive mask (0 or a large negative fill)".into(),
            "an added tensor with no large negative fill: a score bias (ALiBi or relative positions?) that power retention cannot express".into(),
        ));
    }
    let mut out = Vec::new();
    for (buf, masked) in buffers {
        if g.constant(&buf).is_some_and(|t| t.dims.len() >= 2) {
            out.push(check_buffer(g, &buf, masked)?);
        }
    }
    if comparisons.len() > 1 {
        return Err((
            root.to_string(),
            "one position comparison (key ≤ query + past) in the mask".into(),
            format!(
                "{} comparisons ({}): sliding window or chunked mask?",
                comparisons.len(),
                comparisons.join(", ")
            ),
        ));
    }
    if trilu {
        out.push("M2b/M4 Trilu mask".into());
    } else if let Some(c) = comparisons.first() {
        out.push(format!("M2a/M3 computed mask ({c})"));
    }
    Ok(out)
}
