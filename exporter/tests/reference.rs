//! `--target softmax-reference`: causal softmax rebuilt at the taps must reproduce every
//! fixture's PyTorch logits, keep the original input names, and decode step by step.

mod common;

use common::{
    fixtures, load_model, prefill_vs_decode, rel_err, rewritable, rewrite, scratch, session,
    token_feeds, values_of,
};

#[test]
fn prefill_reproduces_reference_logits() {
    for f in rewritable() {
        let dir = scratch("reference_prefill", &f.name);
        rewrite(&f, &dir, &["--target", "softmax-reference"]);
        let ids = f.input_ids();
        let mut s = session(&dir.join("prefill.onnx"), false);
        let got = values_of(&s.run(token_feeds(&s, &ids, 0, ids[0].len())).expect("run")["logits"]);
        let err = rel_err(&got, &f.reference_logits());
        assert!(
            err <= f.tolerance(),
            "{}: rel err {err:.2e} > {:.0e}",
            f.name,
            f.tolerance()
        );
    }
}

#[test]
fn original_input_names_are_kept() {
    const TOKEN_INPUTS: [&str; 3] = ["input_ids", "attention_mask", "position_ids"];
    for f in rewritable() {
        let dir = scratch("reference_names", &f.name);
        rewrite(&f, &dir, &["--target", "softmax-reference"]);
        let original = load_model(&f.model());
        let (kept, cache): (Vec<&str>, Vec<&str>) = original
            .graph
            .input
            .iter()
            .map(|i| i.name.as_str())
            .partition(|n| TOKEN_INPUTS.contains(n));
        assert!(kept.contains(&"input_ids"), "{}", f.name);
        for file in ["prefill.onnx", "decode.onnx"] {
            let m = load_model(&dir.join(file));
            let has = |n: &str| m.graph.input.iter().any(|i| i.name == n);
            for name in &kept {
                assert!(has(name), "{}/{file} lost input {name}", f.name);
            }
            // Everything else the export took was its KV cache, replaced by the new state.
            for name in &cache {
                assert!(!has(name), "{}/{file} still has cache input {name}", f.name);
            }
            let original_outputs: Vec<&str> = original
                .graph
                .output
                .iter()
                .map(|o| o.name.as_str())
                .collect();
            for o in &m.graph.output {
                assert!(
                    o.name == "logits" || !original_outputs.contains(&o.name.as_str()),
                    "{}/{file} still has cache output {}",
                    f.name,
                    o.name
                );
            }
        }
    }
}

#[test]
fn decode_steps_continue_the_prefill() {
    for f in rewritable() {
        let dir = scratch("reference_decode", &f.name);
        rewrite(&f, &dir, &["--target", "softmax-reference"]);
        // Single-token steps, then steps of 3 new tokens (causal within the step, over the past).
        for (s1, step) in [(3, 1), (2, 3)] {
            let (full, inc) = prefill_vs_decode(&dir, &f, false, s1, step);
            let err = rel_err(&inc, &full);
            assert!(
                err <= f.tolerance(),
                "{}: prefill {s1} + decode steps of {step} vs prefill: rel err {err:.2e}",
                f.name
            );
        }
        let (full, _) = prefill_vs_decode(&dir, &f, false, 3, 1);
        let err = rel_err(&full, &f.reference_logits());
        assert!(
            err <= f.tolerance(),
            "{}: rel err {err:.2e} against PyTorch",
            f.name
        );
    }
}

#[test]
fn refused_layers_block_the_rewrite_unless_partial_is_allowed() {
    for f in fixtures().into_iter().filter(|f| f.expected_rejected() > 0) {
        let dir = scratch("reference_partial", &f.name);
        let model = f.model();
        let o = common::cli(&[
            "rewrite",
            model.to_str().unwrap(),
            "-o",
            dir.to_str().unwrap(),
            "--target",
            "softmax-reference",
        ]);
        assert!(
            !o.status.success(),
            "{}: a partial rewrite was written",
            f.name
        );
        let msg = common::text(&o);
        let why = if f.expected_blocks() == 0 {
            "no attention block could be rewritten"
        } else {
            "refusing to write a partially rewritten model"
        };
        assert!(msg.contains(why), "{msg}");
        assert!(
            !dir.join("prefill.onnx").exists(),
            "{}: a model was written",
            f.name
        );

        if f.expected_blocks() == 0 {
            continue;
        }
        // The refused layers stay softmax, the others are rebuilt: the logits must not move.
        rewrite(
            &f,
            &dir,
            &["--target", "softmax-reference", "--allow-partial"],
        );
        let ids = f.input_ids();
        let mut s = session(&dir.join("prefill.onnx"), false);
        let got = values_of(&s.run(token_feeds(&s, &ids, 0, ids[0].len())).expect("run")["logits"]);
        let err = rel_err(&got, &f.reference_logits());
        assert!(err <= f.tolerance(), "{}: rel err {err:.2e}", f.name);
    }
}
