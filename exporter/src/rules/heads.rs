//! Head layout facts: the head-split boundary, head counts and dims, RoPE placement, and the
//! folding of shape-derived scalar scales.

use onnx_protobuf::NodeProto;

use super::{Layout, Tap};
use crate::graph::{attr, attr_i, attr_ints, input, tensor_values, Graph};

/// The tensor just before a head-split `Transpose(0,2,1,3)` is already `(b, s, h, d)`.
pub fn prefer_bshd(g: &Graph, t: &str) -> Tap {
    let t = g.skip_passthrough(t);
    match g.producer_op(t, "Transpose") {
        Some(n) if attr_ints(n, "perm") == Some(&[0, 2, 1, 3]) => {
            Tap::tensor(input(n, 0), Layout::Bshd)
        }
        _ => Tap::tensor(t, Layout::Bhsd),
    }
}

pub fn describe_rope(g: &Graph, q: &str) -> String {
    let q = g.skip_passthrough(q);
    let Some(n) = g.producer(q) else {
        return "none".into();
    };
    let is_mul = |t: &str| g.producer_op(t, "Mul").is_some();
    match n.op_type.as_str() {
        "Add" if n.input.len() == 2 && n.input.iter().all(|i| is_mul(i)) => {
            "R1 rotate_half, after the head transpose".into()
        }
        "Concat" => "R3 partial rotate_half, after the head transpose".into(),
        "RotaryEmbedding" => "R4 RotaryEmbedding op, after the head transpose".into(),
        "Transpose" => match g.producer(input(n, 0)).map(|p| p.op_type.as_str()) {
            Some("Concat") | Some("Add") => "R2 interleaved, before the head transpose".into(),
            _ => "none".into(),
        },
        op => format!("none recognised (Q comes from {op})"),
    }
}

#[derive(Default, Clone, Copy)]
pub struct HeadInfo {
    pub heads: Option<i64>,
    pub dim: Option<i64>,
    pub dtype: Option<i32>,
}

/// Head count, head dim and dtype read off the head-split `Reshape` above `t` and the projection
/// feeding it.
pub fn head_info(g: &Graph, t: &str) -> HeadInfo {
    let Some(r) = find_head_split(g, t) else {
        return HeadInfo::default();
    };
    let target = reshape_target(g, r);
    let known = |v: Option<i64>| v.filter(|&x| x > 0);
    let mut heads = known(target.get(2).copied().flatten());
    let mut dim = known(target.get(3).copied().flatten());
    let (width, dtype) = projection_width(g, input(r, 0));
    // One of heads/head dim may be computed at run time (`-1`, or C / H); the projection width
    // fixes it.
    match (width, heads, dim) {
        (Some(w), None, Some(d)) if w % d == 0 => heads = Some(w / d),
        (Some(w), Some(h), None) if w % h == 0 => dim = Some(w / h),
        _ => {}
    }
    HeadInfo { heads, dim, dtype }
}

fn find_head_split<'a>(g: &Graph<'a>, t: &str) -> Option<&'a NodeProto> {
    let mut frontier = vec![t.to_string()];
    for _ in 0..12 {
        let mut next = Vec::new();
        for t in &frontier {
            let Some(n) = g.producer(t) else { continue };
            if n.op_type == "Reshape"
                && reshape_target(g, n).len() == 4
                && projection_width(g, input(n, 0)).1.is_some()
            {
                return Some(n);
            }
            let data_inputs: &[String] = match n.op_type.as_str() {
                "Add" | "Mul" | "Concat" => &n.input,
                _ => &n.input[..n.input.len().min(1)],
            };
            next.extend(data_inputs.iter().cloned());
        }
        frontier = next;
    }
    None
}

/// The Reshape target entries, `None` where computed at run time.
fn reshape_target(g: &Graph, r: &NodeProto) -> Vec<Option<i64>> {
    let Some(shape) = r.input.get(1) else {
        return vec![];
    };
    if let Some(v) = g.constant_values(shape) {
        return v.into_iter().map(|x| Some(x as i64)).collect();
    }
    match g.producer_op(shape, "Concat") {
        Some(c) => c
            .input
            .iter()
            .flat_map(|i| match g.constant_values(i) {
                Some(v) => v.into_iter().map(|x| Some(x as i64)).collect(),
                None => vec![None],
            })
            .collect(),
        None => vec![],
    }
}

/// Last-axis width and dtype of a projection output (MatMul/Gemm by a weight, bias Add, Split or
/// Slice of one).
pub fn projection_width(g: &Graph, t: &str) -> (Option<i64>, Option<i32>) {
    let t = g.skip_passthrough(t);
    let Some(n) = g.producer(t) else {
        return (None, None);
    };
    match n.op_type.as_str() {
        "MatMul" | "Gemm" => {
            let w = n
                .input
                .get(1)
                .and_then(|w| g.initializer(g.skip_passthrough(w)));
            match w {
                Some(w) if w.dims.len() == 2 => {
                    let trans = n.op_type == "Gemm" && attr_i(n, "transB") == Some(1);
                    (Some(w.dims[if trans { 0 } else { 1 }]), Some(w.data_type))
                }
                _ => (None, None),
            }
        }
        "Add" => n
            .input
            .iter()
            .map(|i| projection_width(g, i))
            .find(|r| r.1.is_some())
            .unwrap_or((None, None)),
        "Reshape" => projection_width(g, input(n, 0)),
        "Split" => {
            let (_, dtype) = projection_width(g, input(n, 0));
            let sizes = match n.input.get(1).and_then(|s| g.constant_values(s)) {
                Some(v) => Some(v.into_iter().map(|x| x as i64).collect::<Vec<_>>()),
                None => attr_ints(n, "split").map(|s| s.to_vec()).or_else(|| {
                    // Opset 18 `num_outputs`: equal parts of the projection.
                    let parts = attr_i(n, "num_outputs")?;
                    let total = projection_width(g, input(n, 0)).0?;
                    (parts > 0 && total % parts == 0).then(|| vec![total / parts; parts as usize])
                }),
            };
            let idx = n.output.iter().position(|o| o == t);
            (sizes.zip(idx).and_then(|(s, i)| s.get(i).copied()), dtype)
        }
        "Slice" => {
            let (total, dtype) = projection_width(g, input(n, 0));
            let get = |i: usize| n.input.get(i).and_then(|s| g.scalar(s)).map(|x| x as i64);
            let width = match (get(1), get(2), total) {
                (Some(s), Some(e), Some(tot)) if s >= 0 => e.min(tot).checked_sub(s),
                _ => None,
            };
            (width, dtype)
        }
        _ => (None, None),
    }
}

/// Folds a shape-derived scalar (e.g. `1/sqrt(Shape(q)[-1])`) given the static head dims.
pub fn fold_scalar(g: &Graph, t: &str) -> Option<f64> {
    match eval(g, t, 24)?.as_slice() {
        [Some(v)] => Some(*v),
        _ => None,
    }
}

type Vals = Vec<Option<f64>>;

fn eval(g: &Graph, t: &str, depth: usize) -> Option<Vals> {
    if let Some(v) = g.constant_values(t) {
        return Some(v.into_iter().map(Some).collect());
    }
    let n = g.producer(t)?;
    if depth == 0 {
        return None;
    }
    let arg = |i: usize| n.input.get(i).and_then(|x| eval(g, x, depth - 1));
    let unary = |f: fn(f64) -> f64| arg(0).map(|v| v.into_iter().map(|x| x.map(f)).collect());
    let binary = |f: fn(f64, f64) -> f64| -> Option<Vals> {
        let (a, b) = (arg(0)?, arg(1)?);
        let len = a.len().max(b.len());
        if !(a.len() == len || a.len() == 1) || !(b.len() == len || b.len() == 1) {
            return None;
        }
        Some(
            (0..len)
                .map(|i| {
                    let x = a[if a.len() == 1 { 0 } else { i }]?;
                    let y = b[if b.len() == 1 { 0 } else { i }]?;
                    Some(f(x, y))
                })
                .collect(),
        )
    };
    match n.op_type.as_str() {
        "Identity" | "Cast" | "Squeeze" | "Unsqueeze" | "Reshape" => arg(0),
        "Sqrt" => unary(f64::sqrt),
        "Reciprocal" => unary(|x| 1.0 / x),
        "Add" => binary(|x, y| x + y),
        "Sub" => binary(|x, y| x - y),
        "Mul" => binary(|x, y| x * y),
        "Div" => binary(|x, y| x / y),
        "Pow" => binary(f64::powf),
        "ConstantOfShape" => {
            let shape = arg(0)?;
            let fill = attr(n, "value")
                .and_then(|a| a.t.as_ref())
                .and_then(tensor_values)
                .and_then(|v| v.first().copied())
                .unwrap_or(0.0);
            let count = shape.iter().try_fold(1usize, |acc, d| {
                acc.checked_mul(usize::try_from(d.map(|x| x as i64)?).ok()?)
            })?;
            (count <= 16).then(|| vec![Some(fill); count])
        }
        "Shape" => {
            let info = head_info(g, input(n, 0));
            // The attention tensors are 4-D; only their last dim (the head dim) is static.
            let mut v: Vals = vec![None, None, None, info.dim.map(|d| d as f64)];
            let start = attr_i(n, "start").unwrap_or(0).rem_euclid(5) as usize;
            let end = attr_i(n, "end").map_or(4, |e| if e < 0 { (4 + e).max(0) } else { e.min(4) })
                as usize;
            v = v.get(start.min(end)..end)?.to_vec();
            Some(v)
        }
        "Slice" | "Gather" => {
            let data = arg(0)?;
            let len = data.len() as i64;
            let norm = |i: f64| {
                let i = i as i64;
                if i < 0 {
                    (i + len).max(0)
                } else {
                    i.min(len)
                }
            };
            if n.op_type == "Gather" {
                let idx = g.constant_values(n.input.get(1)?)?;
                return idx
                    .into_iter()
                    .map(|i| data.get(norm(i) as usize).copied())
                    .collect();
            }
            let s = norm(g.scalar(n.input.get(1)?)?) as usize;
            let e = norm(g.scalar(n.input.get(2)?)?) as usize;
            data.get(s..e.max(s)).map(|x| x.to_vec())
        }
        _ => None,
    }
}
