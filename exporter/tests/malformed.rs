//! Malformed input gives an error message and exit code 1, never a panic.

mod common;

use common::{cli, fixture, fixtures, load_model, scratch, text};
use onnx_protobuf::Message;

fn assert_clean_error(path: &std::path::Path, needle: &str) {
    for cmd in ["inspect", "rewrite"] {
        let out_dir = path.with_extension("out");
        let mut args = vec![cmd, path.to_str().unwrap()];
        if cmd == "rewrite" {
            args.extend(["-o", out_dir.to_str().unwrap()]);
        }
        let o = cli(&args);
        let msg = text(&o);
        assert_eq!(o.status.code(), Some(1), "{cmd} {}: {msg}", path.display());
        assert!(!msg.contains("panicked"), "{cmd} panicked: {msg}");
        assert!(
            msg.contains("error:") && msg.contains(needle),
            "{cmd}: expected '{needle}' in: {msg}"
        );
        assert!(!out_dir.join("prefill.onnx").exists());
    }
}

fn base() -> onnx_protobuf::ModelProto {
    let f = fixture("gpt2_ts17_eager");
    load_model(&f.model())
}

#[test]
fn garbage_and_truncated_bytes_are_errors() {
    let dir = scratch("malformed", "bytes");
    let garbage = dir.join("garbage.onnx");
    std::fs::write(&garbage, b"\xff\xff\xff\xff this is not a protobuf").unwrap();
    assert_clean_error(&garbage, "not a valid ONNX model");

    let bytes = base().write_to_bytes().unwrap();
    for cut in [1usize, 100, bytes.len() / 2] {
        let p = dir.join(format!("truncated_{cut}.onnx"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert_clean_error(&p, "error");
    }
    // Wherever the file ends, the tool exits cleanly (a cut on a field boundary can still parse).
    for cut in (0..bytes.len()).step_by(bytes.len() / 97) {
        let p = dir.join("truncated_any.onnx");
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let o = cli(&["inspect", p.to_str().unwrap()]);
        assert!(
            matches!(o.status.code(), Some(0) | Some(1)),
            "cut {cut}: {}",
            text(&o)
        );
        assert!(!text(&o).contains("panicked"), "cut {cut}: {}", text(&o));
    }
    let empty = dir.join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    assert_clean_error(&empty, "no graph");
    assert_clean_error(&dir.join("missing.onnx"), "reading");
}

#[test]
fn dangling_edges_and_missing_initializers_are_named() {
    let dir = scratch("malformed", "graph");
    let mut m = base();
    let g = m.graph.mut_or_insert_default();
    let victim = g.node.iter().position(|n| n.op_type == "Softmax").unwrap();
    let removed = g.node.remove(victim);
    let p = dir.join("dangling.onnx");
    std::fs::write(&p, m.write_to_bytes().unwrap()).unwrap();
    assert_clean_error(&p, &format!("input '{}'", removed.output[0]));

    let mut m = base();
    let init = m.graph.mut_or_insert_default().initializer.remove(0);
    let p = dir.join("no_init.onnx");
    std::fs::write(&p, m.write_to_bytes().unwrap()).unwrap();
    assert_clean_error(&p, &format!("'{}' is not produced", init.name));
}

#[test]
fn a_model_without_attention_is_refused() {
    let dir = scratch("malformed", "no_attention");
    let mut m = base();
    // One Relu over the first graph input: a valid graph without any attention.
    let g = m.graph.mut_or_insert_default();
    let x = g.input[0].clone();
    let mut relu = onnx_protobuf::NodeProto::new();
    relu.op_type = "Relu".into();
    relu.input = vec![x.name.clone()];
    relu.output = vec!["y".into()];
    g.node = vec![relu];
    g.initializer.clear();
    g.value_info.clear();
    g.input = vec![x.clone()];
    g.output = vec![x];
    g.output[0].name = "y".into();
    let p = dir.join("relu_only.onnx");
    std::fs::write(&p, m.write_to_bytes().unwrap()).unwrap();
    let o = cli(&[
        "rewrite",
        p.to_str().unwrap(),
        "-o",
        dir.join("out").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no attention block"), "{}", text(&o));
}

#[test]
fn a_bidirectional_attention_is_refused() {
    let dir = scratch("malformed", "bidirectional");
    let mut m = base();
    // Drop the mask Add in front of every Softmax: attention becomes bidirectional.
    let g = m.graph.mut_or_insert_default();
    let adds: Vec<(String, String)> = g
        .node
        .iter()
        .filter(|n| {
            n.op_type == "Add"
                && g.node
                    .iter()
                    .any(|s| s.op_type == "Softmax" && s.input[0] == n.output[0])
        })
        .map(|n| (n.output[0].clone(), n.input[0].clone()))
        .collect();
    assert_eq!(adds.len(), 2);
    for n in &mut g.node {
        for i in &mut n.input {
            if let Some((_, data)) = adds.iter().find(|(out, _)| out == i) {
                *i = data.clone();
            }
        }
    }
    let p = dir.join("bidirectional.onnx");
    std::fs::write(&p, m.write_to_bytes().unwrap()).unwrap();
    let o = cli(&["inspect", p.to_str().unwrap()]);
    let report = text(&o);
    assert!(report.contains("attention blocks: 0"), "{report}");
    assert_eq!(
        report.matches("no causal mask found").count(),
        2,
        "{report}"
    );
}

/// The fuzz target's body, run in-process on seeded byte mutations of every fixture: parsing,
/// matching, reporting and both rewrite targets may fail, never panic.
#[test]
fn mutated_fixtures_never_panic() {
    use power_retention_exporter::emit::{emit, Options, Target};
    use power_retention_exporter::{analyse, onnx_io, report};

    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut parsed = 0;
    for f in fixtures() {
        let original = std::fs::read(f.model()).unwrap();
        for _ in 0..40 {
            let mut bytes = original.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % bytes.len() as u64) as usize;
                bytes[i] = next() as u8;
            }
            let Ok(model) = onnx_io::parse(&bytes) else {
                continue;
            };
            parsed += 1;
            let Ok(a) = analyse(&model) else { continue };
            let _ = report::render(&a);
            for target in [Target::PowerRetention, Target::SoftmaxReference] {
                let opts = Options {
                    target,
                    deg: 2,
                    chunk_size: 64,
                    cache_capacity: 4,
                };
                let _ = emit(&model, &a.blocks, &opts);
            }
        }
    }
    // Most single-byte changes land in weights: the full pipeline must have run on many.
    assert!(parsed > 100, "only {parsed} mutated models parsed");
}

#[test]
fn an_added_score_bias_is_refused() {
    let dir = scratch("malformed", "score_bias");
    let mut m = base();
    let g = m.graph.mut_or_insert_default();
    // scores + per-head constant bias (an ALiBi-like term) in front of every Softmax.
    let mut bias = onnx_protobuf::TensorProto::new();
    bias.name = "head_bias".into();
    bias.data_type = 1;
    bias.dims = vec![1, 4, 1, 1];
    bias.float_data = vec![0.0, -0.5, -1.0, -1.5];
    g.initializer.push(bias);
    let softmaxes: Vec<usize> = (0..g.node.len())
        .filter(|&i| g.node[i].op_type == "Softmax")
        .collect();
    for (k, &i) in softmaxes.iter().enumerate().rev() {
        let scores = g.node[i].input[0].clone();
        let biased = format!("biased_scores_{k}");
        let mut add = onnx_protobuf::NodeProto::new();
        add.op_type = "Add".into();
        add.name = format!("/bias_{k}");
        add.input = vec![scores, "head_bias".into()];
        add.output = vec![biased.clone()];
        g.node[i].input[0] = biased;
        g.node.insert(i, add);
    }
    let p = dir.join("biased.onnx");
    std::fs::write(&p, m.write_to_bytes().unwrap()).unwrap();
    let o = cli(&["inspect", p.to_str().unwrap()]);
    let report = text(&o);
    assert!(report.contains("attention blocks: 0"), "{report}");
    assert_eq!(
        report
            .matches("a score bias (ALiBi or relative positions?)")
            .count(),
        2,
        "{report}"
    );
}
