//! The power-retention target: one `PowerRetention` / `PowerRetentionStep` per attention layer,
//! nothing of softmax attention left, and (with the plugin) prefill over S1+S2 tokens equal to
//! prefill over S1 followed by S2 decode steps.

mod common;

use common::{
    fixture, load_model, prefill_vs_decode, rel_err, rewritable, rewrite, scratch, session,
    token_feeds, values_of,
};
use power_retention_schema::{DOMAIN, POWER_RETENTION, POWER_RETENTION_STEP};

fn count(m: &onnx_protobuf::ModelProto, op: &str) -> usize {
    m.graph.node.iter().filter(|n| n.op_type == op).count()
}

#[test]
fn one_op_per_layer_and_no_softmax_mask_or_cache_plumbing() {
    for f in rewritable() {
        let dir = scratch("pr_structure", &f.name);
        rewrite(&f, &dir, &[]);
        let layers = f.expected_blocks();
        for (file, op) in [
            ("prefill.onnx", &POWER_RETENTION),
            ("decode.onnx", &POWER_RETENTION_STEP),
        ] {
            let m = load_model(&dir.join(file));
            let ours: Vec<_> = m.graph.node.iter().filter(|n| n.domain == DOMAIN).collect();
            assert_eq!(ours.len(), layers, "{}/{file}: ops of {DOMAIN}", f.name);
            assert!(
                ours.iter().all(|n| n.op_type == op.name),
                "{}/{file}",
                f.name
            );
            for gone in ["Softmax", "Trilu", "LessOrEqual", "IsNaN"] {
                assert_eq!(count(&m, gone), 0, "{}/{file}: {gone} left", f.name);
            }
            assert!(
                m.opset_import.iter().any(|o| o.domain == DOMAIN),
                "{}/{file}: no opset import",
                f.name
            );
            let io: Vec<&str> = m
                .graph
                .input
                .iter()
                .chain(m.graph.output.iter())
                .map(|v| v.name.as_str())
                .collect();
            assert!(
                !io.iter()
                    .any(|n| n.starts_with("past_key_values") || n.starts_with("present.")),
                "{}/{file}: {io:?}",
                f.name
            );
            // Nothing may still read the old cache inputs, not even for their shapes.
            let original = load_model(&f.model());
            for cache in original
                .graph
                .input
                .iter()
                .map(|i| i.name.as_str())
                .filter(|n| !["input_ids", "attention_mask", "position_ids"].contains(n))
            {
                assert!(
                    !m.graph
                        .node
                        .iter()
                        .any(|n| n.input.iter().any(|i| i == cache)),
                    "{}/{file}: {cache} is still read",
                    f.name
                );
            }
            for i in 0..layers {
                assert!(
                    io.contains(&format!("present_state.{i}").as_str()),
                    "{}/{file}: {io:?}",
                    f.name
                );
            }
        }
    }
}

#[test]
fn models_load_with_the_plugin_and_decode_continues_prefill() {
    for f in rewritable() {
        let dir = scratch("pr_decode", &f.name);
        rewrite(&f, &dir, &["--cache-capacity", "2"]);
        // A capacity of 2 makes the four decode steps fold the window into the state twice.
        let (full, inc) = prefill_vs_decode(&dir, &f, true, 3, 1);
        let err = rel_err(&inc, &full);
        assert!(
            err <= f.tolerance(),
            "{}: prefill 3 + 4 steps vs prefill 7: rel err {err:.2e}",
            f.name
        );
    }
}

#[test]
fn prefill_chunk_size_does_not_change_logits() {
    let f = fixture("llama_ts17_eager_kv");
    let ids = f.input_ids();
    let mut outs = Vec::new();
    for chunk in ["2", "64"] {
        let dir = scratch("pr_chunk", &format!("{}_{chunk}", f.name));
        rewrite(&f, &dir, &["--chunk-size", chunk]);
        let mut s = session(&dir.join("prefill.onnx"), true);
        outs.push(values_of(
            &s.run(token_feeds(&s, &ids, 0, ids[0].len())).expect("run")["logits"],
        ));
    }
    let err = rel_err(&outs[0], &outs[1]);
    assert!(err <= 1e-4, "chunk 2 vs 64: rel err {err:.2e}");
}

#[test]
fn a_multi_token_decode_step_matches_prefill() {
    for f in rewritable() {
        let dir = scratch("pr_multi_step", &f.name);
        rewrite(&f, &dir, &["--cache-capacity", "8"]);
        // Prefill 2 tokens, then steps of 3 and 2 new tokens.
        let (full, inc) = prefill_vs_decode(&dir, &f, true, 2, 3);
        let err = rel_err(&inc, &full);
        assert!(err <= f.tolerance(), "{}: rel err {err:.2e}", f.name);
    }
}

/// The decode model's history-long `attention_mask` would change shape every step (no CUDA-graph
/// replay); nothing reads it once attention is rewritten, so it goes from the decode model (and the
/// manifest), while the prefill model keeps the original inputs.
#[test]
fn decode_models_drop_the_unread_attention_mask_and_prefill_keeps_it() {
    let mut dropped = Vec::new();
    for f in rewritable() {
        let original = load_model(&f.model());
        if !original
            .graph
            .input
            .iter()
            .any(|i| i.name == "attention_mask")
        {
            continue;
        }
        let dir = scratch("pr_mask", &f.name);
        rewrite(&f, &dir, &[]);
        let names = |file: &str| -> Vec<String> {
            load_model(&dir.join(file))
                .graph
                .input
                .iter()
                .map(|i| i.name.clone())
                .collect()
        };
        let decode = load_model(&dir.join("decode.onnx"));
        let read = decode
            .graph
            .node
            .iter()
            .any(|n| n.input.iter().any(|i| i == "attention_mask"));
        let manifest: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("retention.json")).expect("manifest"),
        )
        .expect("manifest json");
        assert!(
            names("prefill.onnx").iter().any(|n| n == "attention_mask"),
            "{}: prefill lost attention_mask",
            f.name
        );
        assert_eq!(
            names("decode.onnx").iter().any(|n| n == "attention_mask"),
            read,
            "{}: decode keeps attention_mask iff a node reads it",
            f.name
        );
        assert_eq!(
            manifest["decode"]["attention_mask"].is_null(),
            !read,
            "{}: manifest {}",
            f.name,
            manifest["decode"]
        );
        if !read {
            dropped.push(f.name.clone());
        }
    }
    assert!(dropped.len() >= 5, "only {dropped:?} had an unread mask");
    // The dynamo export reads its batch size off the old cache's shape: served without the mask.
    assert!(
        dropped.iter().any(|n| n == "llama_dynamo20_sdpa_kv"),
        "{dropped:?}"
    );
    // GroupQueryAttention's RoPE positions come from the mask length: it stays.
    assert!(
        !dropped.iter().any(|n| n == "llama_genai_gqa_kv"),
        "{dropped:?}"
    );
}
