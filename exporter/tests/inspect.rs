//! `power-retention inspect` on every fixture: the expected layers, the refusals, and reports
//! that match their snapshots (`UPDATE_SNAPSHOTS=1` rewrites them).

mod common;

use std::path::PathBuf;

use common::{cli, fixture, fixtures, text};

fn inspect(model: &std::path::Path) -> String {
    let o = cli(&["inspect", model.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "inspect {} failed:\n{}",
        model.display(),
        text(&o)
    );
    String::from_utf8(o.stdout).expect("utf-8 report")
}

#[test]
fn inspect_finds_every_expected_layer() {
    for f in fixtures() {
        let report = inspect(&f.model());
        let blocks = report.lines().filter(|l| l.starts_with("layer ")).count();
        let rejected = report
            .lines()
            .filter(|l| l.contains("expected ") && l.contains("; found "))
            .count();
        assert_eq!(blocks, f.expected_blocks(), "{}: blocks\n{report}", f.name);
        assert_eq!(
            rejected,
            f.expected_rejected(),
            "{}: rejections\n{report}",
            f.name
        );
    }
}

#[test]
fn inspect_reports_match_snapshots() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
    let update = std::env::var_os("UPDATE_SNAPSHOTS").is_some();
    for f in fixtures() {
        let report = inspect(&f.model());
        let path = dir.join(format!("{}.inspect.txt", f.name));
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &report).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "missing snapshot {} (run with UPDATE_SNAPSHOTS=1)",
                path.display()
            )
        });
        assert_eq!(
            report,
            want,
            "{}: report differs from {}",
            f.name,
            path.display()
        );
    }
}

#[test]
fn gpt_neo_local_layer_is_refused_with_node_and_reason() {
    let f = fixtures()
        .into_iter()
        .find(|f| f.name.starts_with("gptneo"))
        .expect("a GPT-Neo fixture");
    let report = inspect(&f.model());
    let line = report
        .lines()
        .find(|l| l.contains("h.1/attn/attention/Softmax") && l.contains("found"))
        .unwrap_or_else(|| panic!("no rejection of layer h.1:\n{report}"));
    assert!(line.contains("band of width 4"), "{line}");
    assert!(line.contains("lower-triangular"), "{line}");
}

#[test]
fn llama_blocks_show_gqa_rope_and_cache_wiring() {
    let f = fixture("llama_ts17_eager_kv");
    let report = inspect(&f.model());
    assert!(
        report.contains("Hq=4 Hkv=2 (repeat_kv)  Dk=16 Dv=16"),
        "{report}"
    );
    assert!(report.contains("R1 rotate_half"), "{report}");
    assert!(report.contains("past past_key_values.1.key / past_key_values.1.value → present present.1.key / present.1.value"), "{report}");
    assert!(report.contains("scale:   0.250000"), "{report}");
}

#[test]
fn sliding_window_masks_are_refused_with_both_comparisons_named() {
    let f = fixture("mistral_ts17_sliding");
    let report = inspect(&f.model());
    assert!(report.contains("attention blocks: 0"), "{report}");
    assert_eq!(report.matches("found 2 comparisons").count(), 2, "{report}");
    assert!(
        report.contains("LessOrEqual") && report.contains("Greater"),
        "{report}"
    );
}
