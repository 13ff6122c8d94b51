//! The rewrite: matched blocks become `PowerRetention` (prefill) / `PowerRetentionStep` (decode),
//! or, for `--target softmax-reference`, plain causal softmax attention at the same taps.
//!
//! Every new node, port and graph I/O name is derived from the op table in
//! `power-retention-schema`. The old attention output tensor is produced by the new nodes, so the
//! model's own merge (`Transpose` → `Reshape` → projection) is untouched; dead nodes (softmax,
//! masks, `repeat_kv`, cache plumbing) are then removed by reachability from the outputs.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Context, Result};
use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use power_retention_schema::{
    self as schema, decode as dport, prefill as pport, OpSchema, POWER_RETENTION,
    POWER_RETENTION_STEP,
};
use serde_json::{json, Value};

use crate::graph::dtype;
use crate::manifest::{Manifest, ModelIo, StateTensor};
use crate::rules::{Block, Layout, OutLayout, Rotary, Tap};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// `PowerRetention` / `PowerRetentionStep` (needs the plugin library).
    PowerRetention,
    /// Causal softmax attention from standard ops at the same taps (validation: reproduces the
    /// original model's logits).
    SoftmaxReference,
}

/// The default of an integer attribute in the op table.
pub fn default_int(op: &OpSchema, name: &str) -> Result<i64> {
    match op.attribute(name).map(|a| a.default) {
        Some(schema::AttrValue::Int(v)) => Ok(v),
        _ => bail!(
            "the op table has no integer attribute '{name}' on {}",
            op.name
        ),
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub target: Target,
    pub deg: i64,
    pub chunk_size: i64,
    pub cache_capacity: i64,
}

pub struct Emitted {
    pub prefill: ModelProto,
    pub decode: ModelProto,
    pub manifest: Value,
}

/// A graph input or output the rewrite adds.
#[derive(Clone)]
struct Io {
    name: String,
    elem: i32,
    shape: Vec<DimSpec>,
}

#[derive(Clone)]
enum DimSpec {
    Fixed(i64),
    Named(String),
}

impl DimSpec {
    fn of(v: Option<i64>, name: &str) -> DimSpec {
        v.map_or_else(|| DimSpec::Named(name.into()), DimSpec::Fixed)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prefill,
    Decode,
}

pub fn emit(model: &ModelProto, blocks: &[Block], opts: &Options) -> Result<Emitted> {
    if blocks.is_empty() {
        bail!("no attention block to rewrite");
    }
    if opts.target == Target::PowerRetention {
        let dk = blocks.iter().find_map(|b| b.heads.dk);
        if opts.deg <= 0 || opts.deg % 2 != 0 {
            bail!("--deg must be a positive even number, got {}", opts.deg);
        }
        // The decode model carries states, which the ops keep for their default degree only
        // (the expanded state of deg 4 is ~770k rows at Dk 64).
        let stateful = default_int(&POWER_RETENTION, "deg")?;
        if stateful != opts.deg {
            bail!(
                "--deg {}: the decode model needs a state, and the ops keep one for deg {stateful} only",
                opts.deg
            );
        }
        if let Some(dk) = dk {
            schema::expanded_dim(dk as usize, opts.deg as usize)
                .context("expanded state dimension overflows")?;
        }
    }
    if opts.target == Target::PowerRetention {
        if let Some(b) = blocks
            .iter()
            .find(|b| b.heads.hkv.is_none() || b.heads.dk.is_none())
        {
            bail!(
                "cannot size the state of {}: its kv head count or head dim is not static in the graph",
                b.anchor
            );
        }
    }
    if opts.chunk_size < 1 || opts.cache_capacity < 1 {
        bail!("--chunk-size and --cache-capacity must be at least 1");
    }
    let (prefill, _) = build(model, blocks, opts, Phase::Prefill)?;
    let (decode, wiring) = build(model, blocks, opts, Phase::Decode)?;
    let manifest = manifest(&prefill, &decode, blocks, opts, wiring.state)?;
    Ok(Emitted {
        prefill,
        decode,
        manifest,
    })
}

/// `past_state.3`-style graph I/O names from the op table's port names.
fn io_name(port: &str, layer: usize) -> String {
    format!("{port}.{layer}")
}

fn build(
    model: &ModelProto,
    blocks: &[Block],
    opts: &Options,
    phase: Phase,
) -> Result<(ModelProto, Wiring)> {
    let mut m = model.clone();
    let g = m.graph.as_mut().context("model has no graph")?;
    let originals: HashMap<String, ValueInfoProto> = g
        .input
        .iter()
        .map(|v| (v.name.clone(), v.clone()))
        .collect();
    let removed_inputs: HashSet<String> = blocks
        .iter()
        .flat_map(|b| [b.cache.past_key.clone(), b.cache.past_value.clone()])
        .flatten()
        .collect();
    let removed_outputs: HashSet<String> = blocks
        .iter()
        .flat_map(|b| [b.cache.present_key.clone(), b.cache.present_value.clone()])
        .flatten()
        .collect();
    let outs: HashSet<&str> = blocks.iter().map(|b| b.out.as_str()).collect();
    g.node
        .retain(|n| !n.output.iter().any(|o| outs.contains(o.as_str())));

    let mut b = Builder::new("/power_retention");
    let mut w = Wiring::default();
    for (i, blk) in blocks.iter().enumerate() {
        let q = b.bshd(&blk.q, i, "q");
        let k = b.bshd(&blk.k, i, "k");
        let v = b.bshd(&blk.v, i, "v");
        let dims = LayerDims::of(blk, opts);
        match opts.target {
            Target::PowerRetention => {
                power_retention_layer(&mut b, blk, i, phase, opts, &dims, [&q, &k, &v], &mut w)
            }
            Target::SoftmaxReference => {
                reference_layer(&mut b, blk, i, phase, &dims, [&q, &k, &v], &mut w)
            }
        }
    }
    g.node.extend(b.nodes);
    g.initializer.extend(b.inits);

    g.input.retain(|v| !removed_inputs.contains(&v.name));
    g.output.retain(|v| !removed_outputs.contains(&v.name));
    g.input.extend(w.inputs.iter().map(value_info));
    g.output.extend(w.outputs.iter().map(value_info));

    dead_code_elimination(g);
    if removed_inputs.is_empty() {
        reread_mask_shapes(g);
    }
    let still_read: Vec<String> = removed_inputs
        .iter()
        .filter(|name| g.node.iter().any(|n| reads(n, name)))
        .cloned()
        .collect();
    if !still_read.is_empty() {
        let mut vb = Builder::new("/power_retention/past");
        for name in &still_read {
            virtual_past(&mut vb, g, &originals, name, phase)?;
        }
        g.node.extend(vb.nodes);
        g.initializer.extend(vb.inits);
        dead_code_elimination(g);
    }
    if phase == Phase::Decode && opts.target == Target::PowerRetention {
        drop_unread_mask(g);
    }
    topological_sort(g)?;
    if opts.target == Target::PowerRetention {
        m.opset_import.retain(|o| o.domain != schema::DOMAIN);
        let mut op = OperatorSetIdProto::new();
        op.domain = schema::DOMAIN.into();
        op.version = schema::OPSET_VERSION;
        m.opset_import.push(op);
    }
    Ok((m, w))
}

struct LayerDims {
    hkv: DimSpec,
    dk: DimSpec,
    dv: DimSpec,
    d: DimSpec,
}

impl LayerDims {
    fn of(blk: &Block, opts: &Options) -> LayerDims {
        let d = blk
            .heads
            .dk
            .and_then(|dk| schema::expanded_dim(dk as usize, opts.deg as usize))
            .map(|d| d as i64);
        LayerDims {
            hkv: DimSpec::of(blk.heads.hkv, "Hkv"),
            dk: DimSpec::of(blk.heads.dk, "Dk"),
            dv: DimSpec::of(blk.heads.dv.or(blk.heads.dk), "Dv"),
            d: DimSpec::of(d, "D"),
        }
    }
}

/// The graph I/O a rewrite adds, and the tensors a decode loop carries between steps.
#[derive(Default)]
struct Wiring {
    inputs: Vec<Io>,
    outputs: Vec<Io>,
    state: Vec<StateTensor>,
}

/// Decode-model input name of a state port: ports without a `past_` prefix (`cache_length`) get
/// one, so every input pairs with its `present_` output by name.
fn past_name(port: &str) -> String {
    if port.starts_with("past_") {
        port.to_string()
    } else {
        format!("past_{port}")
    }
}

#[allow(clippy::too_many_arguments)]
fn power_retention_layer(
    b: &mut Builder,
    blk: &Block,
    i: usize,
    phase: Phase,
    opts: &Options,
    dims: &LayerDims,
    [q, k, v]: [&str; 3],
    w: &mut Wiring,
) {
    let batch = || DimSpec::Named("batch".into());
    let op = match phase {
        Phase::Prefill => &POWER_RETENTION,
        Phase::Decode => &POWER_RETENTION_STEP,
    };
    let cap = DimSpec::Fixed(opts.cache_capacity);
    // Shapes and dtypes of the state ports, keyed by the op table's symbolic dims.
    let resolve = |dim: &schema::Dim| match dim {
        schema::Dim::B => batch(),
        schema::Dim::Hkv => dims.hkv.clone(),
        schema::Dim::Dk => dims.dk.clone(),
        schema::Dim::Dv => dims.dv.clone(),
        schema::Dim::D => dims.d.clone(),
        schema::Dim::C => cap.clone(),
        other => DimSpec::Named(other.symbol().into()),
    };
    let elem_of = |p: &schema::Port| match p.ty {
        schema::PortType::T => blk.dtype,
        schema::PortType::F32 => dtype::FLOAT,
        schema::PortType::I64 => dtype::INT64,
    };
    let mut attrs = vec![
        attr_int(op, "deg", opts.deg),
        attr_float(op, "scale", blk.scale as f32),
    ];
    let out_bshd = b.fresh(i, "retention_out");
    let mut inputs = vec![String::new(); op.inputs.len()];
    let mut outputs = vec![String::new(); op.outputs.len()];
    inputs[pport::QUERY] = q.into();
    inputs[pport::KEY] = k.into();
    inputs[pport::VALUE] = v.into();
    outputs[pport::OUTPUT] = out_bshd.clone();
    match phase {
        Phase::Prefill => {
            attrs.push(attr_int(op, "chunk_size", opts.chunk_size));
            for port in [pport::PRESENT_STATE, pport::PRESENT_SUM_OF_KEYS] {
                let p = &op.outputs[port];
                let name = io_name(p.name, i);
                outputs[port] = name.clone();
                w.outputs.push(Io {
                    name,
                    elem: elem_of(p),
                    shape: p.shape.iter().map(resolve).collect(),
                });
            }
        }
        Phase::Decode => {
            // Every in-place pair of the op is carried by the decode loop; the gate cache only
            // when the model is gated (never, for the softmax models rewritten here).
            for &(pi, po) in op.aliases {
                if pi == dport::PAST_LOG_GATE_CACHE {
                    continue;
                }
                let (pin, pout) = (&op.inputs[pi], &op.outputs[po]);
                let input = io_name(&past_name(pin.name), i);
                let output = io_name(pout.name, i);
                let shape: Vec<DimSpec> = pin.shape.iter().map(resolve).collect();
                let elem = elem_of(pin);
                inputs[pi] = input.clone();
                outputs[po] = output.clone();
                // The prefill op's output of the same name initialises it; the rest start at 0.
                let prefill_output = POWER_RETENTION
                    .output_index(pout.name)
                    .map(|_| io_name(pout.name, i));
                w.state.push(StateTensor {
                    layer: i,
                    role: pin.name.trim_start_matches("past_").into(),
                    prefill_output,
                    decode_input: input.clone(),
                    decode_output: output.clone(),
                    shape: manifest_shape(&shape),
                    dtype: manifest_dtype(elem).into(),
                });
                w.inputs.push(Io {
                    name: input,
                    elem,
                    shape: shape.clone(),
                });
                w.outputs.push(Io {
                    name: output,
                    elem,
                    shape,
                });
            }
        }
    }
    trim_optional(&mut inputs);
    trim_optional(&mut outputs);
    b.push(op.name, schema::DOMAIN, inputs, outputs, attrs);
    match blk.out_layout {
        OutLayout::Bhsd => b.push(
            "Transpose",
            "",
            vec![out_bshd],
            vec![blk.out.clone()],
            vec![attr_ints("perm", &[0, 2, 1, 3])],
        ),
        OutLayout::Merged => {
            let merged = b.const_i64(&[0, 0, -1], true);
            b.push(
                "Reshape",
                "",
                vec![out_bshd, merged],
                vec![blk.out.clone()],
                vec![],
            );
        }
    }
}

/// Manifest dims: batch and other run-time dims as -1.
fn manifest_shape(shape: &[DimSpec]) -> Vec<i64> {
    shape
        .iter()
        .map(|d| match d {
            DimSpec::Fixed(v) => *v,
            DimSpec::Named(_) => -1,
        })
        .collect()
}

/// The dtype spelling of `retention.json` (numpy's).
fn manifest_dtype(elem: i32) -> &'static str {
    match elem {
        dtype::FLOAT => "float32",
        dtype::FLOAT16 => "float16",
        dtype::BFLOAT16 => "bfloat16",
        dtype::INT64 => "int64",
        _ => "unsupported",
    }
}

/// Trailing empty optional ports are dropped; inner ones stay empty strings.
fn trim_optional(v: &mut Vec<String>) {
    while v.last().is_some_and(|s| s.is_empty()) {
        v.pop();
    }
}

#[allow(clippy::too_many_arguments)]
fn reference_layer(
    b: &mut Builder,
    blk: &Block,
    i: usize,
    phase: Phase,
    dims: &LayerDims,
    [q, k, v]: [&str; 3],
    w: &mut Wiring,
) {
    let batch = || DimSpec::Named("batch".into());
    let kv_shape = |seq: &str, d: &DimSpec| {
        vec![
            batch(),
            DimSpec::Named(seq.into()),
            dims.hkv.clone(),
            d.clone(),
        ]
    };
    let (k_all, v_all) = match phase {
        Phase::Prefill => (k.to_string(), v.to_string()),
        Phase::Decode => {
            let pk = io_name("past_key", i);
            let pv = io_name("past_value", i);
            for (name, d) in [(&pk, &dims.dk), (&pv, &dims.dv)] {
                w.inputs.push(Io {
                    name: name.clone(),
                    elem: blk.dtype,
                    shape: kv_shape("past_seq", d),
                });
                let present = name.replacen("past_", "present_", 1);
                w.state.push(StateTensor {
                    layer: i,
                    role: name
                        .trim_start_matches("past_")
                        .split('.')
                        .next()
                        .unwrap_or("")
                        .into(),
                    prefill_output: Some(present.clone()),
                    decode_input: name.clone(),
                    decode_output: present,
                    shape: manifest_shape(&kv_shape("past_seq", d)),
                    dtype: manifest_dtype(blk.dtype).into(),
                });
            }
            let ka = b.node(
                "Concat",
                vec![pk, k.into()],
                vec![attr_int_plain("axis", 1)],
                i,
            );
            let va = b.node(
                "Concat",
                vec![pv, v.into()],
                vec![attr_int_plain("axis", 1)],
                i,
            );
            (ka, va)
        }
    };
    for (name, t, d) in [
        ("present_key", &k_all, &dims.dk),
        ("present_value", &v_all, &dims.dv),
    ] {
        let out = io_name(name, i);
        b.push("Identity", "", vec![t.clone()], vec![out.clone()], vec![]);
        w.outputs.push(Io {
            name: out,
            elem: blk.dtype,
            shape: kv_shape("total_seq", d),
        });
    }
    let f32 = |b: &mut Builder, t: &str| {
        if blk.dtype == dtype::FLOAT {
            t.to_string()
        } else {
            b.node(
                "Cast",
                vec![t.into()],
                vec![attr_int_plain("to", dtype::FLOAT as i64)],
                i,
            )
        }
    };
    let (qf, kf, vf) = (f32(b, q), f32(b, &k_all), f32(b, &v_all));
    let perm = |b: &mut Builder, t: &str, p: &[i64]| {
        b.node("Transpose", vec![t.into()], vec![attr_ints("perm", p)], i)
    };
    let qh = perm(b, &qf, &[0, 2, 1, 3]);
    let kh = perm(b, &kf, &[0, 2, 1, 3]);
    let vh = perm(b, &vf, &[0, 2, 1, 3]);
    let sq = b.node("Shape", vec![qh.clone()], vec![], i);
    let sk = b.node("Shape", vec![kh.clone()], vec![], i);
    let sv = b.node("Shape", vec![vh.clone()], vec![], i);
    let pick = |b: &mut Builder, s: &str, idx: i64| {
        let c = b.const_i64(&[idx], true);
        b.node(
            "Gather",
            vec![s.into(), c],
            vec![attr_int_plain("axis", 0)],
            i,
        )
    };
    let hq = pick(b, &sq, 1);
    let hkv = pick(b, &sk, 1);
    let dq = pick(b, &sq, 3);
    let dv = pick(b, &sv, 3);
    let rep = b.node("Div", vec![hq.clone(), hkv.clone()], vec![], i);
    // Group query heads by kv head: (b, Hkv, Hq/Hkv, s, d) against (b, Hkv, 1, kv, d).
    let z = b.const_i64(&[0], true);
    let m1 = b.const_i64(&[-1], true);
    let one = b.const_i64(&[1], true);
    let q_shape = b.node(
        "Concat",
        vec![z.clone(), hkv, rep, m1.clone(), dq.clone()],
        vec![attr_int_plain("axis", 0)],
        i,
    );
    let k_shape = b.node(
        "Concat",
        vec![z.clone(), z.clone(), one.clone(), m1.clone(), dq],
        vec![attr_int_plain("axis", 0)],
        i,
    );
    let v_shape = b.node(
        "Concat",
        vec![z.clone(), z.clone(), one, m1.clone(), dv.clone()],
        vec![attr_int_plain("axis", 0)],
        i,
    );
    let q5 = b.node("Reshape", vec![qh, q_shape], vec![], i);
    let k5 = b.node("Reshape", vec![kh, k_shape], vec![], i);
    let v5 = b.node("Reshape", vec![vh, v_shape], vec![], i);
    let kt = perm(b, &k5, &[0, 1, 2, 4, 3]);
    let scores = b.node("MatMul", vec![q5, kt], vec![], i);
    let scale = b.const_f32(blk.scale as f32);
    let scores = b.node("Mul", vec![scores, scale], vec![], i);
    // Causal over the whole past: key j is visible to query t iff j ≤ past + t.
    let s_q = b.node("Shape", vec![qf.clone()], vec![], i);
    let s_k = b.node("Shape", vec![kf.clone()], vec![], i);
    let s1 = b.const_i64(&[1], false);
    let new_len = b.node(
        "Gather",
        vec![s_q, s1.clone()],
        vec![attr_int_plain("axis", 0)],
        i,
    );
    let total = b.node("Gather", vec![s_k, s1], vec![attr_int_plain("axis", 0)], i);
    let past = b.node("Sub", vec![total.clone(), new_len], vec![], i);
    let zero = b.const_i64(&[0], false);
    let step = b.const_i64(&[1], false);
    let rows = b.node("Range", vec![past, total.clone(), step.clone()], vec![], i);
    let cols = b.node("Range", vec![zero, total, step], vec![], i);
    let col_shape = b.const_i64(&[-1, 1], true);
    let rows = b.node("Reshape", vec![rows, col_shape], vec![], i);
    let hidden = b.node("Greater", vec![cols, rows], vec![], i);
    let fill = b.const_f32(f32::MIN);
    let scores = b.node("Where", vec![hidden, fill, scores], vec![], i);
    let probs = b.node("Softmax", vec![scores], vec![attr_int_plain("axis", -1)], i);
    let o5 = b.node("MatMul", vec![probs, v5], vec![], i);
    let o_shape = b.node(
        "Concat",
        vec![z, hq, m1, dv],
        vec![attr_int_plain("axis", 0)],
        i,
    );
    let o = b.node("Reshape", vec![o5, o_shape], vec![], i);
    let o = match blk.out_layout {
        OutLayout::Bhsd => o,
        OutLayout::Merged => {
            let t = b.node(
                "Transpose",
                vec![o],
                vec![attr_ints("perm", &[0, 2, 1, 3])],
                i,
            );
            let merged = b.const_i64(&[0, 0, -1], true);
            b.node("Reshape", vec![t, merged], vec![], i)
        }
    };
    if blk.dtype == dtype::FLOAT {
        b.push("Identity", "", vec![o], vec![blk.out.clone()], vec![]);
    } else {
        b.push(
            "Cast",
            "",
            vec![o],
            vec![blk.out.clone()],
            vec![attr_int_plain("to", blk.dtype as i64)],
        );
    }
}

/// Serves the readers of a removed `past_key_values` input other than attention (the dynamo
/// exporter reads batch and past length off it) from its shape `(b, h, past, d)`: batch from the
/// token input, past = `attention_mask` length − new tokens (0 in prefill). `Shape` readers get
/// that vector directly; any other reader gets zeros of that shape.
fn virtual_past(
    b: &mut Builder,
    g: &mut GraphProto,
    originals: &HashMap<String, ValueInfoProto>,
    name: &str,
    phase: Phase,
) -> Result<()> {
    let vi = originals
        .get(name)
        .context("removed input has no declaration")?;
    let (elem, dims) = tensor_type(vi);
    let static_dim = |i: usize| dims.get(i).copied().flatten();
    let (Some(h), Some(d)) = (static_dim(1), static_dim(3)) else {
        bail!("'{name}' is still read after the rewrite and its heads/head dim are not static");
    };
    let tokens = g
        .input
        .iter()
        .find(|v| v.name == "input_ids")
        .or_else(|| g.input.first())
        .context("no graph input to take the batch size from")?
        .name
        .clone();
    let shape_tok = b.node("Shape", vec![tokens], vec![], 0);
    let first = b.const_i64(&[0], true);
    let batch = b.node(
        "Gather",
        vec![shape_tok.clone(), first],
        vec![attr_int_plain("axis", 0)],
        0,
    );
    // Readers that slice the shape without its past-length entry (the dynamo exporter takes the
    // batch as `Shape(past)[0:1]`) get a placeholder there, so the decode model need not read
    // `attention_mask` for them.
    let needs_past = g.node.iter().any(|n| {
        if n.op_type == "Shape" && n.input.first().is_some_and(|i| i == name) {
            let (start, end) = shape_slice(n, dims.len() as i64);
            start <= 2 && 2 < end
        } else {
            reads(n, name)
        }
    });
    let past = match phase {
        Phase::Prefill => b.const_i64(&[0], true),
        Phase::Decode if !needs_past => b.const_i64(&[0], true),
        Phase::Decode => {
            if !g.input.iter().any(|v| v.name == "attention_mask") {
                bail!("'{name}' is still read after the rewrite and the model has no attention_mask to derive the past length from");
            }
            let sm = b.node("Shape", vec!["attention_mask".into()], vec![], 0);
            let second = b.const_i64(&[1], true);
            let total = b.node(
                "Gather",
                vec![sm, second.clone()],
                vec![attr_int_plain("axis", 0)],
                0,
            );
            let new = b.node(
                "Gather",
                vec![shape_tok, second],
                vec![attr_int_plain("axis", 0)],
                0,
            );
            b.node("Sub", vec![total, new], vec![], 0)
        }
    };
    let hc = b.const_i64(&[h], true);
    let dc = b.const_i64(&[d], true);
    let shape = b.node(
        "Concat",
        vec![batch, hc, past, dc],
        vec![attr_int_plain("axis", 0)],
        0,
    );
    for n in g
        .node
        .iter_mut()
        .filter(|n| n.op_type == "Shape" && n.input.first().is_some_and(|i| i == name))
    {
        let (start, end) = shape_slice(n, dims.len() as i64);
        let starts = b.const_i64(&[start], true);
        let ends = b.const_i64(&[end], true);
        n.op_type = "Slice".into();
        n.input = vec![shape.clone(), starts, ends];
        n.attribute.clear();
    }
    if !g.node.iter().any(|n| reads(n, name)) {
        return Ok(());
    }
    let mut zero = TensorProto::new();
    zero.data_type = elem;
    zero.dims = vec![1];
    zero.raw_data = vec![0; elem_size(elem)];
    let mut value = AttributeProto::new();
    value.name = "value".into();
    value.type_ = AttributeType::TENSOR.into();
    value.t = Some(zero).into();
    b.push(
        "ConstantOfShape",
        "",
        vec![shape],
        vec![name.into()],
        vec![value],
    );
    Ok(())
}

/// The `[start, end)` a `Shape` node takes of a rank-`rank` input, as ONNX normalises it.
fn shape_slice(n: &NodeProto, rank: i64) -> (i64, i64) {
    let norm = |v: i64| if v < 0 { v + rank } else { v }.clamp(0, rank);
    let start = crate::graph::attr_i(n, "start").unwrap_or(0);
    let end = crate::graph::attr_i(n, "end").unwrap_or(rank);
    (norm(start), norm(end))
}

/// A cache-less export has `attention_mask` as long as `input_ids`, and the dynamo exporter reads
/// the sequence length off whichever of them it unified the symbol with. Once attention is
/// rewritten, a mask still read only by `Shape` nodes stands for the token count, which in the
/// decode model is `input_ids`' (the mask there spans the whole history).
fn reread_mask_shapes(g: &mut GraphProto) {
    let has = |n: &str| g.input.iter().any(|i| i.name == n);
    if !has("attention_mask") || !has("input_ids") {
        return;
    }
    let readers = || {
        g.node
            .iter()
            .filter(|n| n.input.iter().any(|i| i == "attention_mask"))
    };
    if readers().count() == 0 || !readers().all(|n| n.op_type == "Shape") {
        return;
    }
    for n in g.node.iter_mut().filter(|n| n.op_type == "Shape") {
        if n.input.first().is_some_and(|i| i == "attention_mask") {
            n.input[0] = "input_ids".into();
        }
    }
}

/// The decode model's `attention_mask` spans the whole history, so its shape grows every step,
/// which rules out CUDA-graph replay. Once attention is rewritten nothing may read it any more (the
/// ops have no padding mask); then the input goes. The prefill model keeps it, so callers that feed
/// the original inputs still can.
fn drop_unread_mask(g: &mut GraphProto) {
    let read = g.node.iter().any(|n| reads(n, "attention_mask"))
        || g.output.iter().any(|o| o.name == "attention_mask");
    if !read {
        g.input.retain(|v| v.name != "attention_mask");
    }
}

fn elem_size(elem: i32) -> usize {
    match elem {
        dtype::FLOAT | dtype::INT32 => 4,
        dtype::FLOAT16 | dtype::BFLOAT16 => 2,
        dtype::DOUBLE | dtype::INT64 => 8,
        _ => 1,
    }
}

fn tensor_type(vi: &ValueInfoProto) -> (i32, Vec<Option<i64>>) {
    match vi.type_.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => {
            let dims = t
                .shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match d.value {
                            Some(tensor_shape_proto::dimension::Value::DimValue(v)) => Some(v),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            (t.elem_type, dims)
        }
        _ => (dtype::FLOAT, vec![]),
    }
}

fn value_info(io: &Io) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    for d in &io.shape {
        let mut dim = tensor_shape_proto::Dimension::new();
        dim.value = Some(match d {
            DimSpec::Fixed(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
            DimSpec::Named(s) => tensor_shape_proto::dimension::Value::DimParam(s.clone()),
        });
        shape.dim.push(dim);
    }
    let mut tt = type_proto::Tensor::new();
    tt.elem_type = io.elem;
    tt.shape = Some(shape).into();
    let mut ty = TypeProto::new();
    ty.value = Some(type_proto::Value::TensorType(tt));
    let mut vi = ValueInfoProto::new();
    vi.name = io.name.clone();
    vi.type_ = Some(ty).into();
    vi
}

fn reads(n: &NodeProto, name: &str) -> bool {
    n.input.iter().any(|i| i == name)
        || n.attribute.iter().any(|a| {
            a.g.as_ref()
                .into_iter()
                .chain(a.graphs.iter())
                .any(|sg| sg.node.iter().any(|sn| reads(sn, name)))
        })
}

/// Inputs of a node including outer-scope names its subgraphs read.
fn all_inputs(n: &NodeProto, out: &mut Vec<String>) {
    out.extend(n.input.iter().filter(|i| !i.is_empty()).cloned());
    for a in &n.attribute {
        for sg in a.g.as_ref().into_iter().chain(a.graphs.iter()) {
            for sn in &sg.node {
                all_inputs(sn, out);
            }
        }
    }
}

/// Keeps the nodes the graph outputs depend on, and the initializers and value_info they use.
fn dead_code_elimination(g: &mut GraphProto) {
    let producer: HashMap<&str, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let mut live = vec![false; g.node.len()];
    let mut stack: Vec<String> = g.output.iter().map(|o| o.name.clone()).collect();
    let mut used: HashSet<String> = HashSet::new();
    while let Some(t) = stack.pop() {
        if !used.insert(t.clone()) {
            continue;
        }
        if let Some(&i) = producer.get(t.as_str()) {
            if !live[i] {
                live[i] = true;
                all_inputs(&g.node[i], &mut stack);
            }
        }
    }
    let mut i = 0;
    g.node.retain(|_| {
        i += 1;
        live[i - 1]
    });
    g.initializer.retain(|t| used.contains(&t.name));
    g.value_info.retain(|v| used.contains(&v.name));
}

/// Kahn's algorithm, stable with respect to the existing order.
fn topological_sort(g: &mut GraphProto) -> Result<()> {
    let producer: HashMap<String, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            n.output
                .iter()
                .filter(|o| !o.is_empty())
                .map(move |o| (o.clone(), i))
        })
        .collect();
    let n = g.node.len();
    let mut indeg = vec![0usize; n];
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in g.node.iter().enumerate() {
        let mut ins = Vec::new();
        all_inputs(node, &mut ins);
        ins.sort();
        ins.dedup();
        for inp in ins {
            if let Some(&p) = producer.get(&inp) {
                if p != i {
                    indeg[i] += 1;
                    users[p].push(i);
                }
            }
        }
    }
    let mut ready: std::collections::BTreeSet<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &u in &users[i] {
            indeg[u] -= 1;
            if indeg[u] == 0 {
                ready.insert(u);
            }
        }
    }
    if order.len() != n {
        bail!("the rewritten graph has a cycle");
    }
    let mut old: Vec<Option<NodeProto>> =
        std::mem::take(&mut g.node).into_iter().map(Some).collect();
    g.node = order.into_iter().filter_map(|i| old[i].take()).collect();
    Ok(())
}

/// Accumulates the nodes and constants the rewrite adds, with collision-free names.
struct Builder {
    prefix: &'static str,
    /// Packed projections already computed, by `input·weight`.
    packed: HashMap<String, String>,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    count: usize,
}

impl Builder {
    fn new(prefix: &'static str) -> Builder {
        Builder {
            prefix,
            packed: HashMap::new(),
            nodes: Vec::new(),
            inits: Vec::new(),
            count: 0,
        }
    }

    fn fresh(&mut self, layer: usize, what: &str) -> String {
        self.count += 1;
        format!("{}/layer{layer}/{what}_{}", self.prefix, self.count)
    }

    /// A fresh name outside any layer (node names, shared constants).
    fn fresh_global(&mut self, what: &str) -> String {
        self.count += 1;
        format!("{}/{what}_{}", self.prefix, self.count)
    }

    fn push(
        &mut self,
        op: &str,
        domain: &str,
        inputs: Vec<String>,
        outputs: Vec<String>,
        attrs: Vec<AttributeProto>,
    ) {
        let mut n = NodeProto::new();
        n.name = self.fresh_global(op);
        n.op_type = op.into();
        n.domain = domain.into();
        n.input = inputs;
        n.output = outputs;
        n.attribute = attrs;
        self.nodes.push(n);
    }

    /// A default-domain node with one fresh output.
    fn node(
        &mut self,
        op: &str,
        inputs: Vec<String>,
        attrs: Vec<AttributeProto>,
        layer: usize,
    ) -> String {
        let out = self.fresh(layer, op);
        self.push(op, "", inputs, vec![out.clone()], attrs);
        out
    }

    fn bshd(&mut self, tap: &Tap, layer: usize, what: &str) -> String {
        match tap {
            Tap::Tensor {
                tensor,
                layout: Layout::Bshd,
            } => tensor.clone(),
            Tap::Tensor {
                tensor,
                layout: Layout::Bhsd,
            } => self.node(
                "Transpose",
                vec![tensor.clone()],
                vec![attr_ints("perm", &[0, 2, 1, 3])],
                layer,
            ),
            Tap::Packed {
                input,
                weight,
                bias,
                offset,
                width,
                heads,
                rotary,
            } => {
                let qkv = match weight {
                    None => input.clone(),
                    Some(weight) => {
                        // One projection per fused op, shared by its q, k and v slices.
                        let key = format!("{input}·{weight}");
                        match self.packed.get(&key) {
                            Some(t) => t.clone(),
                            None => {
                                let mm = self.node(
                                    "MatMul",
                                    vec![input.clone(), weight.clone()],
                                    vec![],
                                    layer,
                                );
                                let t = match bias {
                                    Some(b) => self.node("Add", vec![mm, b.clone()], vec![], layer),
                                    None => mm,
                                };
                                self.packed.insert(key, t.clone());
                                t
                            }
                        }
                    }
                };
                let part = self.slice_last(&qkv, *offset, offset + width, layer);
                let shape = self.const_i64(&[0, 0, *heads, -1], true);
                let split = self.node("Reshape", vec![part, shape], vec![], layer);
                match rotary {
                    None => split,
                    Some(r) => self.rotary(&split, r, layer, what),
                }
            }
        }
    }

    /// `x[..., start..end]`.
    fn slice_last(&mut self, x: &str, start: i64, end: i64, layer: usize) -> String {
        let starts = self.const_i64(&[start], true);
        let ends = self.const_i64(&[end], true);
        let axes = self.const_i64(&[-1], true);
        self.node("Slice", vec![x.into(), starts, ends, axes], vec![], layer)
    }

    /// Non-interleaved RoPE on `x (b, s, h, d)` at positions `total - s .. total`:
    /// `[x1·cos − x2·sin, x2·cos + x1·sin, x_pass]` over the leading `rot` dims.
    fn rotary(&mut self, x: &str, r: &Rotary, layer: usize, what: &str) -> String {
        let half = r.rot / 2;
        let shape = self.node("Shape", vec![x.into()], vec![], layer);
        let one = self.const_i64(&[1], false);
        let s = self.node(
            "Gather",
            vec![shape, one.clone()],
            vec![attr_int_plain("axis", 0)],
            layer,
        );
        let total = self.node(
            "Cast",
            vec![r.total_len.clone()],
            vec![attr_int_plain("to", dtype::INT64 as i64)],
            layer,
        );
        // total_sequence_length may be a scalar or a 1-element vector.
        let scalar = self.const_i64(&[], true);
        let total = self.node("Reshape", vec![total, scalar], vec![], layer);
        let start = self.node("Sub", vec![total.clone(), s], vec![], layer);
        let pos = self.node("Range", vec![start, total, one], vec![], layer);
        let table_shape = self.const_i64(&[1, -1, 1, half], true);
        let mut table = |cache: &str| {
            let rows = self.node(
                "Gather",
                vec![cache.into(), pos.clone()],
                vec![attr_int_plain("axis", 0)],
                layer,
            );
            self.node("Reshape", vec![rows, table_shape.clone()], vec![], layer)
        };
        let (cos, sin) = (table(&r.cos), table(&r.sin));
        let x1 = self.slice_last(x, 0, half, layer);
        let x2 = self.slice_last(x, half, r.rot, layer);
        let x1c = self.node("Mul", vec![x1.clone(), cos.clone()], vec![], layer);
        let x2s = self.node("Mul", vec![x2.clone(), sin.clone()], vec![], layer);
        let x2c = self.node("Mul", vec![x2, cos], vec![], layer);
        let x1s = self.node("Mul", vec![x1, sin], vec![], layer);
        let mut parts = vec![
            self.node("Sub", vec![x1c, x2s], vec![], layer),
            self.node("Add", vec![x2c, x1s], vec![], layer),
        ];
        // The unrotated tail (empty when the whole head rotates).
        parts.push(self.slice_last(x, r.rot, i64::MAX, layer));
        let out = self.fresh(layer, what);
        self.push(
            "Concat",
            "",
            parts,
            vec![out.clone()],
            vec![attr_int_plain("axis", -1)],
        );
        out
    }

    /// An int64 constant, 1-D when `vector` (else a scalar when it holds one value).
    fn const_i64(&mut self, v: &[i64], vector: bool) -> String {
        let mut t = TensorProto::new();
        t.name = self.fresh_global("const");
        t.data_type = dtype::INT64;
        if vector || v.len() != 1 {
            t.dims = vec![v.len() as i64];
        }
        t.int64_data = v.to_vec();
        let name = t.name.clone();
        self.inits.push(t);
        name
    }

    fn const_f32(&mut self, v: f32) -> String {
        let mut t = TensorProto::new();
        t.name = self.fresh_global("const");
        t.data_type = dtype::FLOAT;
        t.float_data = vec![v];
        let name = t.name.clone();
        self.inits.push(t);
        name
    }
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INTS.into();
    a.ints = v.to_vec();
    a
}

fn attr_int_plain(name: &str, v: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INT.into();
    a.i = v;
    a
}

/// An attribute of one of our ops; the name must exist in the op table.
fn attr_int(op: &OpSchema, name: &str, v: i64) -> AttributeProto {
    attr_int_plain(op.attribute(name).map_or(name, |a| a.name), v)
}

fn attr_float(op: &OpSchema, name: &str, v: f32) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = op.attribute(name).map_or(name, |a| a.name).into();
    a.type_ = AttributeType::FLOAT.into();
    a.f = v;
    a
}

pub fn dtype_name(elem: i32) -> &'static str {
    schema::ElemType::from_onnx_code(elem).map_or(
        match elem {
            dtype::BOOL => "bool",
            dtype::INT32 => "int32",
            dtype::DOUBLE => "double",
            _ => "other",
        },
        |t| t.name(),
    )
}

/// The token-level I/O names of a rewritten model (the rewrite keeps the original names).
fn model_io(model: &ModelProto, file: &str) -> Result<ModelIo> {
    let g = model.graph.as_ref().context("model has no graph")?;
    let has = |n: &str| g.input.iter().any(|i| i.name == n);
    let input_ids = ["input_ids", "input"]
        .into_iter()
        .find(|n| has(n))
        .context("the model has no input_ids input")?;
    let logits = ["logits", "output"]
        .into_iter()
        .find(|n| g.output.iter().any(|o| o.name == *n))
        .or_else(|| g.output.first().map(|o| o.name.as_str()))
        .context("the model has no outputs")?;
    Ok(ModelIo {
        file: file.into(),
        input_ids: input_ids.into(),
        position_ids: has("position_ids").then(|| "position_ids".into()),
        attention_mask: has("attention_mask").then(|| "attention_mask".into()),
        logits: logits.into(),
    })
}

/// `retention.json`: the harness's [`Manifest`] plus what was rewritten.
fn manifest(
    prefill: &ModelProto,
    decode: &ModelProto,
    blocks: &[Block],
    opts: &Options,
    state: Vec<StateTensor>,
) -> Result<Value> {
    let m = Manifest {
        format: 1,
        source: "power-retention rewrite".into(),
        deg: opts.deg,
        chunk_size: opts.chunk_size,
        cache_capacity: opts.cache_capacity,
        prefill: model_io(prefill, "prefill.onnx")?,
        decode: model_io(decode, "decode.onnx")?,
        state,
    };
    let layers: Vec<Value> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            json!({
                "layer": i, "anchor": b.anchor, "family": b.family, "hq": b.heads.hq, "hkv": b.heads.hkv,
                "dk": b.heads.dk, "dv": b.heads.dv.or(b.heads.dk), "scale": b.scale, "rope": b.rope,
                "causal": b.causal,
            })
        })
        .collect();
    let target = match opts.target {
        Target::PowerRetention => "power-retention",
        Target::SoftmaxReference => "softmax-reference",
    };
    let mut v = serde_json::to_value(m)?;
    if let Value::Object(o) = &mut v {
        o.insert("target".into(), json!(target));
        o.insert("domain".into(), json!(schema::DOMAIN));
        o.insert("opset_version".into(), json!(schema::OPSET_VERSION));
        o.insert("gated".into(), json!(false));
        o.insert(
            "dtype".into(),
            json!(manifest_dtype(
                blocks.first().map_or(dtype::FLOAT, |b| b.dtype)
            )),
        );
        o.insert("layers".into(), json!(layers));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_names_come_from_the_op_table() {
        assert_eq!(
            io_name(POWER_RETENTION_STEP.inputs[dport::PAST_STATE].name, 3),
            "past_state.3"
        );
        assert_eq!(
            io_name(POWER_RETENTION.outputs[pport::PRESENT_SUM_OF_KEYS].name, 0),
            "present_sum_of_keys.0"
        );
        assert_eq!(
            past_name(POWER_RETENTION_STEP.inputs[dport::CACHE_LENGTH].name),
            "past_cache_length"
        );
    }

    #[test]
    fn emitted_attributes_exist_in_the_op_table() {
        for (op, names) in [
            (&POWER_RETENTION, &["deg", "scale", "chunk_size"][..]),
            (&POWER_RETENTION_STEP, &["deg", "scale"][..]),
        ] {
            for name in names {
                assert!(op.attribute(name).is_some(), "{}.{name}", op.name);
            }
        }
        assert_eq!(default_int(&POWER_RETENTION, "deg").unwrap(), 2);
        assert!(default_int(&POWER_RETENTION, "scale").is_err());
    }

    #[test]
    fn trailing_optional_ports_are_dropped_inner_ones_kept() {
        let mut v = vec!["q".to_string(), String::new(), "s".into(), String::new()];
        trim_optional(&mut v);
        assert_eq!(v, vec!["q".to_string(), String::new(), "s".into()]);
    }
}
