//! Models whose weights live in an external-data file: the references are kept as they are, the
//! file travels with the written models, and the rewrite still reproduces the logits.

mod common;

use common::{
    fixture, load_model, prefill_vs_decode, rel_err, scratch, session, text, token_feeds, values_of,
};
use onnx_protobuf::{tensor_proto::DataLocation, Message, StringStringEntryProto};

const DATA: &str = "weights.data";

fn entry(key: &str, value: String) -> StringStringEntryProto {
    let mut e = StringStringEntryProto::new();
    e.key = key.into();
    e.value = value;
    e
}

/// The fixture with every initializer over 1 KiB moved to `DATA` (onnx's default threshold).
fn externalise(name: &str) -> (common::Fixture, std::path::PathBuf) {
    let f = fixture(name);
    let dir = scratch("external_data", &format!("{name}_in"));
    let mut m = load_model(&f.model());
    let mut blob = Vec::new();
    let g = m.graph.mut_or_insert_default();
    for t in g.initializer.iter_mut().filter(|t| t.raw_data.len() > 1024) {
        let offset = blob.len();
        blob.extend_from_slice(&t.raw_data);
        t.external_data = vec![
            entry("location", DATA.into()),
            entry("offset", offset.to_string()),
            entry("length", t.raw_data.len().to_string()),
        ];
        t.raw_data.clear();
        t.data_location = DataLocation::EXTERNAL.into();
    }
    assert!(!blob.is_empty());
    std::fs::write(dir.join(DATA), &blob).unwrap();
    let model = dir.join("model.onnx");
    std::fs::write(&model, m.write_to_bytes().unwrap()).unwrap();
    (f, model)
}

#[test]
fn external_weights_stay_external_and_reproduce_the_logits() {
    let (f, model) = externalise("llama_ts17_eager_kv");
    for (target, plugin) in [("softmax-reference", false), ("power-retention", true)] {
        let out = scratch("external_data", &format!("{}_{target}", f.name));
        let o = common::cli(&[
            "rewrite",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--target",
            target,
        ]);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(
            std::fs::read(out.join(DATA)).unwrap(),
            std::fs::read(model.with_file_name(DATA)).unwrap(),
            "external data not copied beside the models"
        );
        for file in ["prefill.onnx", "decode.onnx"] {
            let m = load_model(&out.join(file));
            let external = m
                .graph
                .initializer
                .iter()
                .filter(|t| t.data_location.enum_value() == Ok(DataLocation::EXTERNAL))
                .count();
            assert!(external > 0, "{file}: weights were inlined");
            assert!(m
                .graph
                .initializer
                .iter()
                .all(
                    |t| t.data_location.enum_value() != Ok(DataLocation::EXTERNAL)
                        || t.raw_data.is_empty()
                ));
        }
        if plugin {
            let (full, inc) = prefill_vs_decode(&out, &f, true, 3, 1);
            let err = rel_err(&inc, &full);
            assert!(
                err <= f.tolerance(),
                "prefill 3 + steps vs prefill: rel err {err:.2e}"
            );
        } else {
            let ids = f.input_ids();
            let mut s = session(&out.join("prefill.onnx"), false);
            let got =
                values_of(&s.run(token_feeds(&s, &ids, 0, ids[0].len())).expect("run")["logits"]);
            let err = rel_err(&got, &f.reference_logits());
            assert!(err <= f.tolerance(), "rel err {err:.2e}");
        }
    }
}

#[test]
fn a_missing_external_file_is_an_error() {
    let (_, model) = externalise("gpt2_ts17_eager");
    std::fs::remove_file(model.with_file_name(DATA)).unwrap();
    let out = scratch("external_data", "missing_out");
    let o = common::cli(&[
        "rewrite",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("copying external data"), "{}", text(&o));
}
