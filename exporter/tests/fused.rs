//! Candidates the tool refuses with a reason, on small hand-built graphs: ORT's fused contrib ops
//! it cannot expand and attention inside an `If` (Optimum's merged decoder).

mod common;

use common::{cli, scratch, text};
use onnx_protobuf::{
    attribute_proto::AttributeType, type_proto, AttributeProto, GraphProto, Message, ModelProto,
    NodeProto, OperatorSetIdProto, TypeProto, ValueInfoProto,
};

fn value(name: &str, elem: i32) -> ValueInfoProto {
    let mut t = type_proto::Tensor::new();
    t.elem_type = elem;
    let mut ty = TypeProto::new();
    ty.value = Some(type_proto::Value::TensorType(t));
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    v.type_ = Some(ty).into();
    v
}

fn node(
    op: &str,
    domain: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    let mut n = NodeProto::new();
    n.name = format!("/layer0/{op}");
    n.op_type = op.into();
    n.domain = domain.into();
    n.input = inputs.iter().map(|s| s.to_string()).collect();
    n.output = outputs.iter().map(|s| s.to_string()).collect();
    n.attribute = attrs;
    n
}

fn int(name: &str, v: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INT.into();
    a.i = v;
    a
}

fn graph_attr(name: &str, g: GraphProto) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::GRAPH.into();
    a.g = Some(g).into();
    a
}

fn graph(nodes: Vec<NodeProto>, inputs: &[(&str, i32)], outputs: &[&str]) -> GraphProto {
    let mut g = GraphProto::new();
    g.name = "g".into();
    g.node = nodes;
    g.input = inputs.iter().map(|(n, t)| value(n, *t)).collect();
    g.output = outputs.iter().map(|n| value(n, 1)).collect();
    g
}

fn inspect(name: &str, g: GraphProto) -> String {
    let mut m = ModelProto::new();
    m.ir_version = 9;
    for (domain, version) in [("", 17), ("com.microsoft", 1)] {
        let mut o = OperatorSetIdProto::new();
        o.domain = domain.into();
        o.version = version;
        m.opset_import.push(o);
    }
    m.graph = Some(g).into();
    let dir = scratch("fused", name);
    let p = dir.join("model.onnx");
    std::fs::write(&p, m.write_to_bytes().unwrap()).unwrap();
    let o = cli(&["inspect", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let r = cli(&[
        "rewrite",
        p.to_str().unwrap(),
        "-o",
        dir.join("out").to_str().unwrap(),
    ]);
    assert_eq!(
        r.status.code(),
        Some(1),
        "a refused model was rewritten: {}",
        text(&r)
    );
    assert!(!dir.join("out/prefill.onnx").exists());
    text(&o)
}

#[test]
fn ort_packed_attention_is_refused_with_the_reason() {
    let n = node(
        "Attention",
        "com.microsoft",
        &["x", "w", "b"],
        &["y"],
        vec![int("num_heads", 4), int("unidirectional", 1)],
    );
    let report = inspect(
        "ms_attention",
        graph(vec![n], &[("x", 1), ("w", 1), ("b", 1)], &["y"]),
    );
    assert!(
        report.contains("/layer0/Attention [P6 com.microsoft.Attention]"),
        "{report}"
    );
    // The packed weights must be an initializer of shape (E, 3E) to be split.
    assert!(
        report.contains("expected a 2-D weight initializer; found w is not one"),
        "{report}"
    );

    let n = node(
        "Attention",
        "com.microsoft",
        &["x", "w", "b"],
        &["y"],
        vec![int("num_heads", 4)],
    );
    let report = inspect(
        "ms_attention_bidir",
        graph(vec![n], &[("x", 1), ("w", 1), ("b", 1)], &["y"]),
    );
    assert!(
        report.contains("unidirectional=0: bidirectional attention"),
        "{report}"
    );
}

#[test]
fn group_query_attention_with_a_window_or_unknown_dims_is_refused() {
    let ins = &["qkv", "", "", "pk", "pv", "seqlens", "total"];
    let inputs = [
        ("qkv", 1),
        ("pk", 1),
        ("pv", 1),
        ("seqlens", 6),
        ("total", 6),
    ];
    let n = node(
        "GroupQueryAttention",
        "com.microsoft",
        ins,
        &["y", "k", "v"],
        vec![
            int("num_heads", 4),
            int("kv_num_heads", 2),
            int("local_window_size", 16),
        ],
    );
    let report = inspect("gqa_local", graph(vec![n], &inputs, &["y"]));
    assert!(report.contains("[P7 GroupQueryAttention]"), "{report}");
    assert!(
        report.contains("local_window_size=16: sliding-window"),
        "{report}"
    );

    let n = node(
        "GroupQueryAttention",
        "com.microsoft",
        ins,
        &["y", "k", "v"],
        vec![
            int("num_heads", 4),
            int("kv_num_heads", 2),
            int("do_rotary", 1),
        ],
    );
    let report = inspect("gqa", graph(vec![n], &inputs, &["y"]));
    // Head dims come from the packed projection's weight; a bare graph input has none.
    assert!(
        report.contains("expected a query from a MatMul by a weight"),
        "{report}"
    );
}

#[test]
fn merged_decoder_if_is_refused() {
    let then_branch = graph(
        vec![node("Softmax", "", &["x"], &["p"], vec![int("axis", -1)])],
        &[],
        &["p"],
    );
    let else_branch = graph(
        vec![node("Identity", "", &["x"], &["q"], vec![])],
        &[],
        &["q"],
    );
    let n = node(
        "If",
        "",
        &["use_cache_branch"],
        &["y"],
        vec![
            graph_attr("then_branch", then_branch),
            graph_attr("else_branch", else_branch),
        ],
    );
    let report = inspect(
        "merged_if",
        graph(vec![n], &[("use_cache_branch", 9), ("x", 1)], &["y"]),
    );
    assert!(
        report.contains("/layer0/If [P8 merged decoder]"),
        "{report}"
    );
    assert!(report.contains("has no causal mask"), "{report}");
}
