//! Shared plumbing of the exporter's integration tests: the fixture corpus, the CLI, ONNX Runtime
//! (through `ORT_DYLIB_PATH`) and the plugin library.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};

use half::f16;
use onnx_protobuf::{Message, ModelProto};
use ort::environment::Environment;
use ort::session::Session;
use ort::value::{DynValue, Tensor};
use power_retention_exporter::manifest::{Manifest, StateTensor};
use serde_json::Value;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn fixtures_dir() -> PathBuf {
    repo_root().join("models/fixtures")
}

/// One fixture of `models/fixtures` (see `models/make_fixtures.py`).
pub struct Fixture {
    pub name: String,
    pub meta: Value,
}

impl Fixture {
    pub fn model(&self) -> PathBuf {
        fixtures_dir().join(format!("{}.onnx", self.name))
    }

    pub fn expected_blocks(&self) -> usize {
        self.meta["expected"]["blocks"]
            .as_u64()
            .expect("expected.blocks") as usize
    }

    pub fn expected_rejected(&self) -> usize {
        self.meta["expected"]["rejected"]
            .as_u64()
            .expect("expected.rejected") as usize
    }

    pub fn is_f16(&self) -> bool {
        self.meta["logits"]["dtype"] == "float16"
    }

    /// ≤ 1e-4 relative in float32, ≤ 5e-3 in float16.
    pub fn tolerance(&self) -> f64 {
        if self.is_f16() {
            5e-3
        } else {
            1e-4
        }
    }

    /// The fixed `input_ids` as rows.
    pub fn input_ids(&self) -> Vec<Vec<i64>> {
        self.meta["inputs"]["input_ids"]
            .as_array()
            .expect("input_ids")
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .collect()
            })
            .collect()
    }

    /// PyTorch's logits for the fixed inputs, as f64.
    pub fn reference_logits(&self) -> Vec<f64> {
        let bytes = std::fs::read(fixtures_dir().join(format!("{}.logits.bin", self.name)))
            .expect("reference logits");
        if self.is_f16() {
            bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f64())
                .collect()
        } else {
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect()
        }
    }
}

pub fn fixtures() -> Vec<Fixture> {
    named_fixtures(&fixtures_dir())
        .into_iter()
        .map(|(name, meta)| Fixture { name, meta })
        .collect()
}

/// The fixture called `name`; panics naming it when there is none.
pub fn fixture(name: &str) -> Fixture {
    fixtures()
        .into_iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no fixture {name}"))
}

/// Every `NAME.onnx` of `dir` with its `NAME.json`, sorted by name.
pub fn named_fixtures(dir: &Path) -> Vec<(String, Value)> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run the models/make_*.py script that builds it)",
                dir.display()
            )
        })
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_suffix(".onnx").map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no fixtures in {}", dir.display());
    names
        .into_iter()
        .map(|name| {
            let json = std::fs::read(dir.join(format!("{name}.json"))).expect("fixture json");
            let meta: Value = serde_json::from_slice(&json).expect("fixture json parses");
            (name, meta)
        })
        .collect()
}

/// Fixtures whose every attention layer must be rewritten.
pub fn rewritable() -> Vec<Fixture> {
    fixtures()
        .into_iter()
        .filter(|f| f.expected_rejected() == 0)
        .collect()
}

pub fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_power-retention"))
        .args(args)
        .output()
        .expect("run power-retention")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn scratch(test: &str, name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(test).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Rewrites a fixture; panics with the CLI's output when it fails.
pub fn rewrite(f: &Fixture, out: &Path, extra: &[&str]) {
    let model = f.model();
    let mut args = vec![
        "rewrite",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = cli(&args);
    assert!(
        o.status.success(),
        "rewrite of {} failed:\n{}",
        f.name,
        text(&o)
    );
}

pub fn load_model(p: &Path) -> ModelProto {
    ModelProto::parse_from_bytes(&std::fs::read(p).expect("read model")).expect("parse model")
}

pub fn ort_path() -> PathBuf {
    match std::env::var("ORT_DYLIB_PATH") {
        Ok(p) if Path::new(&p).exists() => PathBuf::from(p),
        Ok(p) => panic!("ORT_DYLIB_PATH={p} does not exist"),
        Err(_) => panic!(
            "ORT_DYLIB_PATH is not set: point it at ONNX Runtime's shared library, e.g. \
             {}/.venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1",
            repo_root().display()
        ),
    }
}

pub fn env() -> &'static Environment {
    static ENV: OnceLock<Environment> = OnceLock::new();
    ENV.get_or_init(|| {
        ort::init_from(ort_path())
            .expect("load ONNX Runtime from ORT_DYLIB_PATH")
            .with_name("power-retention-exporter-tests")
            .build()
            .expect("ORT environment")
    })
}

/// ORT registers a custom domain with a racy check-then-insert: create sessions one at a time.
fn creation_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `POWER_RETENTION_LIB`, else the plugin built in target/{debug,release}.
pub fn plugin_path() -> PathBuf {
    if let Ok(p) = std::env::var("POWER_RETENTION_LIB") {
        assert!(
            Path::new(&p).exists(),
            "POWER_RETENTION_LIB={p} does not exist"
        );
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"));
    ["debug", "release"]
        .iter()
        .map(|p| target.join(p).join("libpower_retention_ort.so"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "the plugin library libpower_retention_ort.so is not built: run \
                 `cargo build -p power-retention-ort` or set POWER_RETENTION_LIB"
            )
        })
}

pub fn session(model: &Path, plugin: bool) -> Session {
    let _one = creation_lock();
    let mut b = Session::builder(env())
        .expect("session builder")
        .with_intra_threads(1)
        .expect("threads");
    if plugin {
        b = b
            .with_operator_library(plugin_path())
            .expect("register the plugin");
    }
    b.commit_from_file(model)
        .unwrap_or_else(|e| panic!("ORT cannot load {}: {e}", model.display()))
}

pub fn i64_tensor(rows: usize, cols: usize, v: Vec<i64>) -> DynValue {
    Tensor::from_array((vec![rows as i64, cols as i64], v))
        .unwrap()
        .into_dyn()
}

/// Feeds for the model inputs the fixtures have: tokens `from..to` of every row, a full
/// attention mask over `0..to` and positions `from..to`.
pub fn token_feeds(
    s: &Session,
    ids: &[Vec<i64>],
    from: usize,
    to: usize,
) -> Vec<(String, DynValue)> {
    let b = ids.len();
    let mut feeds = Vec::new();
    for i in s.inputs() {
        let v = match i.name() {
            "input_ids" => i64_tensor(
                b,
                to - from,
                ids.iter().flat_map(|r| r[from..to].to_vec()).collect(),
            ),
            "attention_mask" => i64_tensor(b, to, vec![1; b * to]),
            "position_ids" => i64_tensor(
                b,
                to - from,
                (0..b).flat_map(|_| from as i64..to as i64).collect(),
            ),
            _ => continue,
        };
        feeds.push((i.name().to_string(), v));
    }
    feeds
}

pub fn values_of(v: &DynValue) -> Vec<f64> {
    if let Ok((_, x)) = v.try_extract_tensor::<f32>() {
        return x.iter().map(|&x| x as f64).collect();
    }
    if let Ok((_, x)) = v.try_extract_tensor::<f16>() {
        return x.iter().map(|&x| x.to_f64()).collect();
    }
    if let Ok((_, x)) = v.try_extract_tensor::<i64>() {
        return x.iter().map(|&x| x as f64).collect();
    }
    panic!("unexpected output type {:?}", v.dtype())
}

/// max |a − b| / max |b|.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-12);
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// Concatenates per-step logits `(b, s_i, V)` along the sequence axis.
pub fn concat_seq(parts: &[(Vec<f64>, usize)], batch: usize, vocab: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for bi in 0..batch {
        for (v, s) in parts {
            out.extend_from_slice(&v[bi * s * vocab..(bi + 1) * s * vocab]);
        }
    }
    out
}

fn owned(v: &DynValue) -> DynValue {
    if let Ok((shape, x)) = v.try_extract_tensor::<f32>() {
        return Tensor::from_array((shape.to_vec(), x.to_vec()))
            .unwrap()
            .into_dyn();
    }
    if let Ok((shape, x)) = v.try_extract_tensor::<f16>() {
        return Tensor::from_array((shape.to_vec(), x.to_vec()))
            .unwrap()
            .into_dyn();
    }
    if let Ok((shape, x)) = v.try_extract_tensor::<i64>() {
        return Tensor::from_array((shape.to_vec(), x.to_vec()))
            .unwrap()
            .into_dyn();
    }
    panic!("unexpected output type {:?}", v.dtype())
}

/// Zeros of a manifest state tensor, batch (-1) bound to `b`.
fn zeros(st: &StateTensor, b: usize) -> DynValue {
    let shape: Vec<i64> = st
        .shape
        .iter()
        .map(|&d| if d < 0 { b as i64 } else { d })
        .collect();
    let n = shape.iter().product::<i64>() as usize;
    match st.dtype.as_str() {
        "float32" => Tensor::from_array((shape, vec![0f32; n]))
            .unwrap()
            .into_dyn(),
        "float16" => Tensor::from_array((shape, vec![f16::ZERO; n]))
            .unwrap()
            .into_dyn(),
        "int64" => Tensor::from_array((shape, vec![0i64; n]))
            .unwrap()
            .into_dyn(),
        other => panic!("unexpected dtype {other} in retention.json"),
    }
}

/// Logits of prefill over all tokens, and of prefill over the first `s1` tokens followed by
/// decode steps of up to `step` tokens each, driven only by `retention.json`.
pub fn prefill_vs_decode(
    dir: &Path,
    f: &Fixture,
    plugin: bool,
    s1: usize,
    step: usize,
) -> (Vec<f64>, Vec<f64>) {
    let manifest = Manifest::read(dir).expect("retention.json");
    let ids = f.input_ids();
    let (b, s) = (ids.len(), ids[0].len());
    let mut pre = session(&dir.join(&manifest.prefill.file), plugin);
    let mut dec = session(&dir.join(&manifest.decode.file), plugin);
    let logits = manifest.prefill.logits.as_str();
    let full = values_of(&pre.run(token_feeds(&pre, &ids, 0, s)).expect("prefill run")[logits]);
    let vocab = full.len() / (b * s);

    let first = pre
        .run(token_feeds(&pre, &ids, 0, s1))
        .expect("prefill run");
    let mut parts = vec![(values_of(&first[logits]), s1)];
    let mut state: Vec<(String, DynValue)> = manifest
        .state
        .iter()
        .map(|st| {
            let v = match &st.prefill_output {
                Some(o) => owned(&first[o.as_str()]),
                None => zeros(st, b),
            };
            (st.decode_input.clone(), v)
        })
        .collect();
    drop(first);
    for t in (s1..s).step_by(step) {
        let end = (t + step).min(s);
        let mut feeds = token_feeds(&dec, &ids, t, end);
        feeds.append(&mut state);
        let out = dec.run(feeds).expect("decode run");
        parts.push((values_of(&out[manifest.decode.logits.as_str()]), end - t));
        state = manifest
            .state
            .iter()
            .map(|st| {
                (
                    st.decode_input.clone(),
                    owned(&out[st.decode_output.as_str()]),
                )
            })
            .collect();
    }
    (full, concat_seq(&parts, b, vocab))
}
