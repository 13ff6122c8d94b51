//! Options, exit codes and `retention.json`.

mod common;

use common::{cli, fixture, rewrite, scratch, text};
use power_retention_exporter::manifest::Manifest;

#[test]
fn bad_options_are_refused_before_anything_is_written() {
    let f = fixture("gpt2_ts17_eager");
    let model = f.model();
    for (args, needle) in [
        (vec!["--deg", "3"], "positive even"),
        (vec!["--deg", "4"], "deg 2 only"),
        (vec!["--cache-capacity", "0"], "at least 1"),
        (vec!["--chunk-size", "0"], "at least 1"),
        (vec!["--target", "softmax"], "invalid value"),
    ] {
        let dir = scratch("cli_options", &args.join("_"));
        let mut all = vec![
            "rewrite",
            model.to_str().unwrap(),
            "-o",
            dir.to_str().unwrap(),
        ];
        all.extend(args.iter().copied());
        let o = cli(&all);
        assert!(!o.status.success(), "{args:?} accepted");
        assert!(text(&o).contains(needle), "{args:?}: {}", text(&o));
        assert!(
            !dir.join("prefill.onnx").exists(),
            "{args:?}: a model was written"
        );
    }
}

#[test]
fn manifest_pairs_every_state_tensor_and_records_the_options() {
    let f = fixture("llama_ts17_eager_kv");
    let dir = scratch("cli_manifest", &f.name);
    rewrite(&f, &dir, &["--cache-capacity", "8", "--chunk-size", "16"]);
    let m = Manifest::read(&dir).expect("retention.json parses as the harness's manifest");
    assert_eq!((m.deg, m.chunk_size, m.cache_capacity), (2, 16, 8));
    assert_eq!(
        (m.prefill.file.as_str(), m.decode.file.as_str()),
        ("prefill.onnx", "decode.onnx")
    );
    assert_eq!(m.prefill.input_ids, "input_ids");
    assert_eq!(m.decode.position_ids.as_deref(), Some("position_ids"));
    let layers = f.expected_blocks();
    let roles = [
        "state",
        "sum_of_keys",
        "key_cache",
        "value_cache",
        "cache_length",
    ];
    assert_eq!(m.state.len(), layers * roles.len());
    for layer in 0..layers {
        for role in roles {
            let s = m
                .state
                .iter()
                .find(|s| s.layer == layer && s.role == role)
                .unwrap_or_else(|| panic!("no {role} for layer {layer}"));
            assert_eq!(s.decode_input, format!("past_{role}.{layer}"));
            assert_eq!(s.decode_output, format!("present_{role}.{layer}"));
            let from_prefill = matches!(role, "state" | "sum_of_keys");
            assert_eq!(s.prefill_output.is_some(), from_prefill, "{role}");
            let want: Vec<i64> = match role {
                // Hkv 2, Dk 16: D = 16·17/2 = 136.
                "state" => vec![-1, 2, 136, 16],
                "sum_of_keys" => vec![-1, 2, 136],
                "key_cache" | "value_cache" => vec![-1, 8, 2, 16],
                _ => vec![-1],
            };
            assert_eq!(s.shape, want, "{role}");
            assert_eq!(
                s.dtype,
                if role == "cache_length" {
                    "int64"
                } else {
                    "float32"
                }
            );
        }
    }
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("retention.json")).unwrap()).unwrap();
    assert_eq!(raw["target"], "power-retention");
    assert_eq!(raw["layers"].as_array().unwrap().len(), layers);
}

#[test]
fn fp16_models_keep_fp16_caches_and_fp32_states() {
    let f = fixture("llama_ts17_eager_fp16");
    let dir = scratch("cli_manifest", &f.name);
    rewrite(&f, &dir, &[]);
    let m = Manifest::read(&dir).unwrap();
    for s in &m.state {
        let want = match s.role.as_str() {
            "key_cache" | "value_cache" => "float16",
            "cache_length" => "int64",
            _ => "float32",
        };
        assert_eq!(s.dtype, want, "{}", s.role);
    }
}
