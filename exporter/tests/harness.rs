//! The decoding harness (`generate`, `bench`) on the CPU, on the bundled tiny model
//! (`models/tiny_retention`, built by `models/make_lm.py --stock-fused`): the per-step time
//! breakdown, stock attention with ONNX Runtime's fused op against stock attention as built, and
//! the bench report with both.

mod common;

use std::sync::{Mutex, MutexGuard, OnceLock};

use common::{fixture, ort_path, plugin_path, repo_root, rewrite, scratch};
use power_retention_exporter::harness::bench::{bench, Baseline, BenchOptions};
use power_retention_exporter::harness::decoder::PowerModel;
use power_retention_exporter::harness::generate::{generate, GenerateOptions};
use power_retention_exporter::harness::runtime::{Device, Runtime};
use power_retention_exporter::harness::sampling::Sampling;
use power_retention_exporter::harness::stock::StockModel;

/// One ONNX Runtime environment for the binary; sessions are created one at a time (ORT's custom
/// domain registration races otherwise).
fn runtime() -> MutexGuard<'static, Runtime> {
    static RT: OnceLock<Mutex<Runtime>> = OnceLock::new();
    RT.get_or_init(|| {
        Mutex::new(Runtime::new(Some(&ort_path()), Some(&plugin_path()), 1).expect("ONNX Runtime"))
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

fn tiny() -> std::path::PathBuf {
    repo_root().join("models/tiny_retention")
}

/// The markdown report `bench` wrote into `out`: its path and text.
fn report_in(out: &std::path::Path) -> (std::path::PathBuf, String) {
    let path = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "md"))
        .expect("a markdown report");
    let md = std::fs::read_to_string(&path).unwrap();
    (path, md)
}

#[test]
fn fused_stock_attention_gives_the_stock_logits() {
    let rt = runtime();
    let mut stock = StockModel::load(&rt, &tiny().join("stock.onnx"), Device::Cpu).unwrap();
    let mut fused = StockModel::load(&rt, &tiny().join("stock_fused.onnx"), Device::Cpu).unwrap();
    assert_eq!(stock.cache_bytes_per_token(), fused.cache_bytes_per_token());
    let prompt = [3, 17, 200, 5, 9, 1, 44, 128, 7];
    let (want_tokens, want) = stock.greedy(&prompt, 12).unwrap();
    let (got_tokens, got) = fused.greedy(&prompt, 12).unwrap();
    assert_eq!(got_tokens, want_tokens);
    assert_eq!(got.len(), 13);
    let scale = want.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst / scale < 1e-5,
        "max |fused − stock| / max |stock| = {}",
        worst / scale
    );
}

#[test]
fn a_stock_model_decodes_the_same_after_releasing_its_memory() {
    let rt = runtime();
    let mut stock = StockModel::load(&rt, &tiny().join("stock.onnx"), Device::Cpu).unwrap();
    let prompt = [5, 90, 13, 2, 77];
    let before = stock.greedy(&prompt, 6).unwrap();
    stock.release_memory().unwrap();
    assert_eq!(stock.greedy(&prompt, 6).unwrap(), before);
    assert_eq!(stock.time_steps(2, 30, 3, 1).unwrap().len(), 3);
}

#[test]
fn the_step_breakdown_accounts_for_each_step() {
    let rt = runtime();
    let mut model = PowerModel::load(&rt, &tiny(), Device::Cpu).unwrap();
    let report = generate(
        &mut model,
        &GenerateOptions {
            prompts: vec![vec![1, 2, 3, 4, 5], vec![9; 17]],
            new_tokens: 9,
            sampling: Sampling::Greedy,
            seed: 0,
            check: true,
            progress: false,
        },
    )
    .unwrap();
    assert!(report.check_error.unwrap() < 1e-4);
    let (wall, parts) = (report.step.unwrap(), report.breakdown.unwrap());
    assert_eq!((wall.n, parts.step.n, parts.sampling.n), (8, 8, 8));
    // Each step's parts are timed inside its wall time, so every order statistic is below.
    assert!(parts.step.median <= wall.median && parts.step.p90 <= wall.p90);
    assert!(parts.run.median > 0.0 && parts.run.median <= parts.step.median);
    for s in [parts.inputs, parts.logits, parts.sampling] {
        assert!(s.median >= 0.0 && s.median < parts.step.median + parts.sampling.median);
    }

    let times = model.time_steps(2, 40, 6, 0).unwrap();
    assert_eq!(times.len(), 6);
    for t in &times {
        assert!(t.run > 0.0 && t.inputs >= 0.0 && t.logits >= 0.0 && t.sampling >= 0.0);
        assert_eq!(t.step(), t.inputs + t.run + t.logits);
    }
}

#[test]
fn bench_reports_stock_fused_and_where_the_time_goes() {
    let rt = runtime();
    let mut ours = PowerModel::load(&rt, &tiny(), Device::Cpu).unwrap();
    let mut stock = StockModel::load(&rt, &tiny().join("stock.onnx"), Device::Cpu).unwrap();
    let mut fused = StockModel::load(&rt, &tiny().join("stock_fused.onnx"), Device::Cpu).unwrap();
    let out = scratch("harness", "bench");
    let o = BenchOptions {
        contexts: vec![16, 40],
        batches: vec![1, 2],
        steps: 5,
        // Batch 2 at context 40 exceeds this: that point is skipped for both stock models.
        max_cache_bytes: 512 * 2 * 44,
        out_dir: out.clone(),
        device_name: "cpu test".into(),
        command: "test".into(),
        stock_attention: None,
    };
    let rows = bench(
        &mut ours,
        vec![
            Baseline {
                label: "stock".into(),
                model: &mut stock,
            },
            Baseline {
                label: "stock fused".into(),
                model: &mut fused,
            },
        ],
        &o,
    )
    .unwrap();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        let skipped = r.batch == 2 && r.context == 40;
        assert_eq!(r.baselines.len(), 2);
        for b in &r.baselines {
            assert_eq!(b.is_none(), skipped, "{}x{}", r.batch, r.context);
        }
    }
    let (md_path, md) = report_in(&out);
    assert!(
        md.contains("| stock ms/token (p90) | stock tokens/s | speed-up vs stock | stock fused ms/token (p90) | stock fused tokens/s | speed-up vs stock fused |")
    );
    assert!(md.contains("## Where the time goes"));
    let lines = |needle: &str| md.lines().filter(|l| l.contains(needle)).count();
    // Breakdown rows: ours at 4 points, each stock model at the 3 it was not skipped at.
    assert_eq!(lines("| ours |"), 4);
    assert_eq!(lines("| stock |"), 3);
    assert_eq!(lines("| stock fused |"), 3);
    assert_eq!(lines("skipped (KV cache"), 1);
    assert!(md_path.with_extension("svg").exists());
}

/// What CUDA-graph replay runs, checked on the CPU: a decode session with every dim of a dynamo
/// export fixed for the batch (ORT folds its shape arithmetic then) decodes exactly as the
/// session with the exported dynamic dims, and passes the equal-work check.
#[test]
fn fixed_shape_decoding_of_a_dynamo_export_matches_dynamic_decoding() {
    let f = fixture("gpt2_dynamo20_sdpa_kv");
    let dir = scratch("harness", "fixed_dims");
    rewrite(&f, &dir, &["--cache-capacity", "4"]);
    let rt = runtime();
    let mut model = PowerModel::load(&rt, &dir, Device::Cpu).unwrap();
    let dims = model.fixed_dims(3).unwrap();
    assert!(dims.iter().any(|(_, v)| *v == 3), "{dims:?}");
    assert!(dims.iter().any(|(_, v)| *v == 1), "{dims:?}");
    let opts = GenerateOptions {
        prompts: vec![vec![1, 2, 3, 4, 5], vec![9; 11], vec![7, 3]],
        new_tokens: 10,
        sampling: Sampling::Greedy,
        seed: 0,
        check: true,
        progress: false,
    };
    let dynamic = generate(&mut model, &opts).unwrap();
    model.fixed_shapes = true;
    let fixed = generate(&mut model, &opts).unwrap();
    assert_eq!(fixed.tokens, dynamic.tokens);
    assert!(fixed.check_error.unwrap() < 1e-4, "{:?}", fixed.check_error);
}

#[test]
fn a_bench_sweep_that_fails_for_ours_still_writes_the_points_it_measured() {
    let rt = runtime();
    let mut ours = PowerModel::load(&rt, &tiny(), Device::Cpu).unwrap();
    let mut stock = StockModel::load(&rt, &tiny().join("stock.onnx"), Device::Cpu).unwrap();
    let out = scratch("harness", "bench-stopped");
    let o = BenchOptions {
        // The tiny model has 1024 position embeddings: ours fails at context 2000 (position ids
        // out of range in its Gather), after the first point was timed.
        contexts: vec![16, 2000, 32],
        batches: vec![1],
        steps: 5,
        max_cache_bytes: u64::MAX,
        out_dir: out.clone(),
        device_name: "cpu test".into(),
        command: "test".into(),
        stock_attention: None,
    };
    let err = bench(
        &mut ours,
        vec![Baseline {
            label: "stock".into(),
            model: &mut stock,
        }],
        &o,
    )
    .expect_err("context 2000 is past the model's positions");
    let msg = format!("{err:#}");
    assert!(msg.contains("stopped after 1 point"), "{msg}");
    assert!(msg.contains("batch 1, context 2000"), "{msg}");
    let (_, md) = report_in(&out);
    // The latency row, and the breakdown rows of ours and of stock.
    assert_eq!(
        md.lines().filter(|l| l.starts_with("| 1 | 16 |")).count(),
        3
    );
    assert!(!md.contains("| 1 | 32 |"), "no point after the failure");
    assert!(md.contains("**The sweep stopped here**: ours at batch 1, context 2000"));
}
