//! CPU benchmark through ONNX Runtime (2 intra-op threads): prefill tokens/s and the FLOP rate it
//! implies, and decode-step latency. Each shape's output is checked against the f64 recurrence
//! on a causal prefix before it is timed. Run: `cargo bench --bench cpu`.

#[path = "../tests/plugin/common.rs"]
#[allow(dead_code, clippy::needless_range_loop)]
mod common;

use std::time::Instant;

use common::*;
use ort::memory::Allocator;
use ort::value::{DynValue, Tensor};
use power_retention_ort::reference;
use power_retention_ort::schema::{ElemType, POWER_RETENTION, POWER_RETENTION_STEP};
use power_retention_ort::shapes::Dims;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn prefill(s: usize, h: usize, d: usize, chunk: i64, t: ElemType) {
    let mut r = rng(1);
    let sd = 1.0 / (d as f64).sqrt().sqrt();
    let q = Data::new(&[1, s, h, d], normal(&mut r, s * h * d, sd));
    let k = Data::new(&[1, s, h, d], normal(&mut r, s * h * d, sd));
    let v = Data::new(&[1, s, h, d], normal(&mut r, s * h * d, 1.0));
    let lg = Data::new(
        &[1, s, h],
        log_gates(&mut r, s * h, 3.0)
            .iter()
            .map(|&x| x as f32 as f64)
            .collect(),
    );
    let model = one_node_model(
        &POWER_RETENTION,
        &[Some(t), Some(t), Some(t), Some(ElemType::F32)],
        &[Some(t)],
        &[("chunk_size", Attr::Int(chunk))],
    );
    let mut sess = session(&model).expect("session");
    let feeds = || -> Vec<(&str, DynValue)> {
        vec![
            ("query", q.tensor(t)),
            ("key", k.tensor(t)),
            ("value", v.tensor(t)),
            ("log_gate", lg.tensor(ElemType::F32)),
        ]
    };
    let y = values_of(&sess.run(feeds()).expect("run")["output"]);
    // Correctness gate: the first 256 tokens of head 0 against the f64 recurrence.
    let n = 256.min(s);
    let pick = |x: &Data, w: usize| -> Vec<f64> {
        (0..n)
            .flat_map(|i| x.rounded(t)[(i * h) * w..(i * h) * w + w].to_vec())
            .collect()
    };
    let gates: Vec<f64> = (0..n).map(|i| lg.values[i * h]).collect();
    let dims = Dims {
        b: 1,
        s: n,
        hq: 1,
        hkv: 1,
        dk: d,
        dv: d,
        d: 0,
        c: 0,
    };
    let want = reference::recurrent(
        dims,
        &pick(&q, d),
        &pick(&k, d),
        &pick(&v, d),
        Some(&gates),
        None,
        None,
    );
    let got: Vec<f64> = (0..n)
        .flat_map(|i| y[(i * h) * d..(i * h) * d + d].to_vec())
        .collect();
    let e = rel_err(&got, &want.output);
    assert!(
        e <= tolerance(t),
        "prefill B1_T{s}_H{h}_D{d} {t:?}: rel err {e:.2e}: not timing a wrong result"
    );
    let inputs: Vec<Vec<(&str, DynValue)>> = (0..4).map(|_| feeds()).collect();
    let mut times = Vec::new();
    for f in inputs {
        let t0 = Instant::now();
        sess.run(f).expect("run");
        times.push(t0.elapsed().as_secs_f64());
    }
    let dt = median(times);
    let dx = d * (d + 1) / 2;
    // Cost model (power-retention.md §6.1): intra-chunk attention + update_state + query_state.
    let flops = 2.0 * s as f64 * d as f64 * (h as f64 * chunk as f64 + 2.0 * h as f64 * dx as f64);
    println!(
        "| prefill B1_T{s}_H{h}_D{d} {:<4} chunk {chunk:>3} | {:>8.1} ms | {:>9.0} tokens/s | {:>6.1} GFLOP/s | check {e:.1e} |",
        t.name(),
        dt * 1e3,
        s as f64 / dt,
        flops / dt / 1e9
    );
}

/// A session of one PowerRetentionStep node with every port wired, in element type `t`.
fn step_session(t: ElemType) -> ort::session::Session {
    let model = one_node_model(
        &POWER_RETENTION_STEP,
        &all_ports(POWER_RETENTION_STEP.inputs, t),
        &all_ports(POWER_RETENTION_STEP.outputs, t),
        &[],
    );
    session(&model).expect("session")
}

fn decode(b: usize, h: usize, d: usize, cap: usize) {
    let (t, dx) = (ElemType::F32, d * (d + 1) / 2);
    let mut sess = step_session(t);
    let mut r = rng(2);
    let st = Data::new(&[b, h, dx, d], normal(&mut r, b * h * dx * d, 0.1));
    let sk = Data::new(
        &[b, h, dx],
        normal(&mut r, b * h * dx, 0.1)
            .iter()
            .map(|x| x.abs() + 1.0)
            .collect(),
    );
    let kc = Data::new(&[b, cap, h, d], normal(&mut r, b * cap * h * d, 0.5));
    let gc = Data::new(&[b, cap, h], vec![-0.01; b * cap * h]);
    let mut times = Vec::new();
    for step in 0..60 {
        // A window half full on average, as in steady-state decoding; no step folds here.
        let len = Data::new(&[b], vec![(step % (cap - 1)) as f64; b]);
        let tok = |w: usize, r: &mut rand::rngs::StdRng| {
            Data::new(&[b, 1, w, d], normal(r, b * w * d, 0.5))
        };
        let feeds: Vec<(&str, DynValue)> = vec![
            ("query", tok(h, &mut r).tensor(t)),
            ("key", tok(h, &mut r).tensor(t)),
            ("value", tok(h, &mut r).tensor(t)),
            (
                "log_gate",
                Data::new(&[b, 1, h], vec![-0.01; b * h]).tensor(t),
            ),
            ("past_state", st.tensor(t)),
            ("past_sum_of_keys", sk.tensor(t)),
            ("past_key_cache", kc.tensor(t)),
            ("past_value_cache", kc.tensor(t)),
            ("past_log_gate_cache", gc.tensor(t)),
            ("cache_length", len.tensor(ElemType::I64)),
        ];
        let t0 = Instant::now();
        let out = sess.run(feeds).expect("run");
        times.push(t0.elapsed().as_secs_f64());
        assert!(values_of(&out["output"]).iter().all(|x| x.is_finite()));
    }
    let dt = median(times[10..].to_vec());
    let bytes = (b * h * dx * (d + 1) * 4) as f64;
    println!(
        "| decode  B{b}_H{h}_D{d}_C{cap} float (distinct buffers: state copied in and out) | {:>8.3} ms | {:>9.0} tokens/s | state read {:.1} GB/s |",
        dt * 1e3,
        b as f64 / dt,
        bytes / dt / 1e9
    );
}

/// The decode step as a decoding loop runs it: every state, cache and length tensor bound through
/// IO binding as both input and output (updated in place, nothing copied), new tokens each step,
/// the window folding every `cap` steps, over `layers` layers with their own buffers (so that, as
/// in a model, the states come from memory rather than the last level cache). Per-layer times.
fn decode_in_place(b: usize, h: usize, d: usize, cap: usize, layers: usize) {
    // Buffers ORT may write into must come from an allocator (ort's `Tensor::new`).
    fn owned_f32(shape: &[usize], v: Vec<f64>) -> DynValue {
        let shape: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
        let mut t = Tensor::<f32>::new(&Allocator::default(), shape).expect("tensor");
        for (o, x) in t
            .try_extract_tensor_mut()
            .expect("view")
            .1
            .iter_mut()
            .zip(v)
        {
            *o = x as f32;
        }
        t.into_dyn()
    }
    let (t, dx) = (ElemType::F32, d * (d + 1) / 2);
    let mut sess = step_session(t);
    let mut r = rng(3);
    let mut layer_bufs: Vec<Vec<(&str, &str, DynValue)>> = (0..layers)
        .map(|_| {
            vec![
                (
                    "past_state",
                    "present_state",
                    owned_f32(&[b, h, dx, d], normal(&mut r, b * h * dx * d, 0.1)),
                ),
                (
                    "past_sum_of_keys",
                    "present_sum_of_keys",
                    owned_f32(&[b, h, dx], vec![1.0; b * h * dx]),
                ),
                (
                    "past_key_cache",
                    "present_key_cache",
                    owned_f32(&[b, cap, h, d], normal(&mut r, b * cap * h * d, 0.5)),
                ),
                (
                    "past_value_cache",
                    "present_value_cache",
                    owned_f32(&[b, cap, h, d], normal(&mut r, b * cap * h * d, 0.5)),
                ),
                (
                    "past_log_gate_cache",
                    "present_log_gate_cache",
                    owned_f32(&[b, cap, h], vec![-0.01; b * cap * h]),
                ),
                ("cache_length", "present_cache_length", {
                    let mut l =
                        Tensor::<i64>::new(&Allocator::default(), vec![b as i64]).expect("tensor");
                    l.try_extract_tensor_mut::<i64>().expect("view").1.fill(0);
                    l.into_dyn()
                }),
            ]
        })
        .collect();
    let mut out = owned_f32(&[b, 1, h, d], vec![0.0; b * h * d]);
    let mut times = Vec::new();
    for _ in 0..2 * cap {
        let tok = |r: &mut rand::rngs::StdRng| {
            Data::new(&[b, 1, h, d], normal(r, b * h * d, 0.5)).tensor(t)
        };
        let (q, k, v) = (tok(&mut r), tok(&mut r), tok(&mut r));
        let g = Data::new(&[b, 1, h], vec![-0.01; b * h]).tensor(t);
        let mut step = 0.0;
        for bufs in layer_bufs.iter_mut() {
            let mut binding = sess.create_binding().expect("binding");
            for (name, x) in [("query", &q), ("key", &k), ("value", &v), ("log_gate", &g)] {
                binding.bind_input(name, x).expect("bind");
            }
            for (past, _, x) in bufs.iter() {
                binding.bind_input(*past, x).expect("bind");
            }
            for (_, present, x) in bufs.iter_mut() {
                binding.bind_output(*present, x).expect("bind");
            }
            binding.bind_output("output", &mut out).expect("bind");
            let t0 = Instant::now();
            sess.run_binding(&binding).expect("run");
            step += t0.elapsed().as_secs_f64();
        }
        times.push(step / layers as f64);
    }
    assert!(values_of(&out).iter().all(|x| x.is_finite()));
    let dt = median(times[cap / 2..].to_vec());
    let bytes = (b * h * dx * (d + 1) * 4) as f64;
    println!(
        "| decode  B{b}_H{h}_D{d}_C{cap} float (in place, IO binding; per layer, {layers} layers) | {:>8.3} ms | {:>9.0} tokens/s | state read {:.1} GB/s |",
        dt * 1e3,
        b as f64 / dt,
        bytes / dt / 1e9
    );
}

fn main() {
    println!(
        "CPU: {} threads of {}; ONNX Runtime {}",
        2,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        ort_path().display()
    );
    prefill(4096, 16, 64, 64, ElemType::F32);
    prefill(4096, 16, 64, 128, ElemType::F32);
    prefill(4096, 16, 64, 64, ElemType::BF16);
    decode(1, 16, 64, 64);
    decode(8, 16, 64, 64);
    decode_in_place(1, 16, 64, 64, 12);
    decode_in_place(8, 16, 64, 64, 2);
}
