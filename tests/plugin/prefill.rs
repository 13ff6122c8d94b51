//! `PowerRetention` against the f64 recurrence (deg 2) and the dense formula (deg 4).

use crate::common::*;
use ort::value::DynValue;
use power_retention_ort::reference;
use power_retention_ort::schema::{prefill as p, ElemType, POWER_RETENTION};
use power_retention_ort::shapes::Dims;

#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    s: usize,
    hq: usize,
    hkv: usize,
    dk: usize,
    dv: usize,
    gate_mean: Option<f64>,
    past: usize,
    chunk: i64,
    scale: f32,
    deg: i64,
    t: ElemType,
}

struct Inputs {
    q: Data,
    k: Data,
    v: Data,
    lg: Option<Data>,
    state: Option<(Vec<f64>, Vec<f64>)>,
}

fn make_inputs(c: &Case, seed: u64) -> Inputs {
    let mut r = rng(seed);
    let sd = 1.0 / (c.dk as f64).sqrt().sqrt();
    let q = Data::new(
        &[c.b, c.s, c.hq, c.dk],
        normal(&mut r, c.b * c.s * c.hq * c.dk, sd),
    );
    let k = Data::new(
        &[c.b, c.s, c.hkv, c.dk],
        normal(&mut r, c.b * c.s * c.hkv * c.dk, sd),
    );
    let v = Data::new(
        &[c.b, c.s, c.hkv, c.dv],
        normal(&mut r, c.b * c.s * c.hkv * c.dv, 1.0),
    );
    let lg = c.gate_mean.map(|m| {
        Data::new(
            &[c.b, c.s, c.hkv],
            log_gates(&mut r, c.b * c.s * c.hkv, m)
                .iter()
                .map(|&x| x as f32 as f64)
                .collect(),
        )
    });
    let state = (c.past > 0).then(|| {
        let dims = Dims {
            b: c.b,
            s: c.past,
            hq: c.hkv,
            hkv: c.hkv,
            dk: c.dk,
            dv: c.dv,
            d: 0,
            c: 0,
        };
        let pk = normal(&mut r, c.b * c.past * c.hkv * c.dk, sd);
        let pv = normal(&mut r, c.b * c.past * c.hkv * c.dv, 1.0);
        let out = reference::recurrent(dims, &pk, &pk, &pv, None, None, None);
        (
            out.state.iter().map(|&x| x as f32 as f64).collect(),
            out.sum_of_keys.iter().map(|&x| x as f32 as f64).collect(),
        )
    });
    Inputs { q, k, v, lg, state }
}

/// Runs the op; returns (output, present_state, present_sum_of_keys) as f64.
fn run(c: &Case, x: &Inputs) -> (Vec<f64>, Option<Vec<f64>>, Option<Vec<f64>>) {
    let d = c.dk * (c.dk + 1) / 2;
    let mut ins = vec![Some(c.t), Some(c.t), Some(c.t), None, None, None];
    let mut feeds: Vec<(&str, DynValue)> = vec![
        ("query", x.q.tensor(c.t)),
        ("key", x.k.tensor(c.t)),
        ("value", x.v.tensor(c.t)),
    ];
    if let Some(lg) = &x.lg {
        ins[p::LOG_GATE] = Some(ElemType::F32);
        feeds.push(("log_gate", lg.tensor(ElemType::F32)));
    }
    if let Some((st, sk)) = &x.state {
        ins[p::PAST_STATE] = Some(ElemType::F32);
        ins[p::PAST_SUM_OF_KEYS] = Some(ElemType::F32);
        feeds.push((
            "past_state",
            Data::new(&[c.b, c.hkv, d, c.dv], st.clone()).tensor(ElemType::F32),
        ));
        feeds.push((
            "past_sum_of_keys",
            Data::new(&[c.b, c.hkv, d], sk.clone()).tensor(ElemType::F32),
        ));
    }
    let with_state = c.deg == 2;
    let outs = if with_state {
        vec![Some(c.t), Some(ElemType::F32), Some(ElemType::F32)]
    } else {
        vec![Some(c.t)]
    };
    let attrs = [
        ("deg", Attr::Int(c.deg)),
        ("chunk_size", Attr::Int(c.chunk)),
        ("scale", Attr::Float(c.scale)),
    ];
    let model = one_node_model(&POWER_RETENTION, &ins, &outs, &attrs);
    let mut s = session(&model).expect("session");
    let out = s.run(feeds).expect("run");
    let y = values_of(&out["output"]);
    if with_state {
        (
            y,
            Some(values_of(&out["present_state"])),
            Some(values_of(&out["present_sum_of_keys"])),
        )
    } else {
        (y, None, None)
    }
}

fn check(c: Case, seed: u64) {
    let x = make_inputs(&c, seed);
    let (y, st, sk) = run(&c, &x);
    let dims = Dims {
        b: c.b,
        s: c.s,
        hq: c.hq,
        hkv: c.hkv,
        dk: c.dk,
        dv: c.dv,
        d: 0,
        c: 0,
    };
    let (q, k, v) = (x.q.rounded(c.t), x.k.rounded(c.t), x.v.rounded(c.t));
    let lg = x.lg.as_ref().map(|l| l.values.clone());
    let tol = tolerance(c.t);
    if c.deg == 2 {
        let want = reference::recurrent(
            dims,
            &q,
            &k,
            &v,
            lg.as_deref(),
            x.state.as_ref().map(|s| &s.0[..]),
            x.state.as_ref().map(|s| &s.1[..]),
        );
        let e = rel_err(&y, &want.output);
        assert!(e <= tol, "{c:?}: output rel err {e:.2e} > {tol:.1e}");
        // States are f32 and never rounded to T: f32 accuracy regardless of the model dtype.
        let (es, ek) = (
            rel_err(&st.unwrap(), &want.state),
            rel_err(&sk.unwrap(), &want.sum_of_keys),
        );
        assert!(
            es <= 2e-5 && ek <= 2e-5,
            "{c:?}: state rel err {es:.2e}, sum {ek:.2e}"
        );
    } else {
        let scale = if c.scale == 0.0 {
            1.0 / (c.dk as f64).sqrt()
        } else {
            c.scale as f64
        };
        let want = reference::dense(dims, c.deg as usize, scale, &q, &k, &v, lg.as_deref());
        let e = rel_err(&y, &want);
        assert!(e <= tol, "{c:?}: output rel err {e:.2e} > {tol:.1e}");
    }
}

const BASE: Case = Case {
    b: 1,
    s: 7,
    hq: 1,
    hkv: 1,
    dk: 16,
    dv: 16,
    gate_mean: None,
    past: 0,
    chunk: 64,
    scale: 0.0,
    deg: 2,
    t: ElemType::F32,
};

#[test]
fn prefill_matches_f64_recurrence_on_odd_shapes_in_every_dtype() {
    let shapes = [
        Case {
            b: 2,
            s: 65,
            hq: 4,
            hkv: 2,
            dk: 8,
            dv: 12,
            gate_mean: Some(2.0),
            chunk: 16,
            ..BASE
        },
        Case {
            b: 3,
            s: 1,
            hq: 3,
            hkv: 3,
            dk: 16,
            dv: 16,
            gate_mean: None,
            chunk: 64,
            ..BASE
        },
        Case {
            b: 1,
            s: 130,
            hq: 6,
            hkv: 1,
            dk: 32,
            dv: 8,
            gate_mean: Some(0.0),
            chunk: 32,
            scale: 0.5,
            ..BASE
        },
        Case {
            b: 2,
            s: 33,
            hq: 2,
            hkv: 2,
            dk: 24,
            dv: 40,
            gate_mean: Some(4.0),
            past: 9,
            chunk: 8,
            ..BASE
        },
        Case {
            b: 1,
            s: 17,
            hq: 4,
            hkv: 4,
            dk: 16,
            dv: 16,
            gate_mean: None,
            past: 5,
            chunk: 128,
            ..BASE
        },
    ];
    for (i, c) in shapes.iter().enumerate() {
        for t in [ElemType::F32, ElemType::F16, ElemType::BF16] {
            check(Case { t, ..*c }, 100 + i as u64);
        }
    }
}

#[test]
fn prefill_of_zero_tokens_returns_the_past_state_unchanged() {
    let c = Case {
        s: 0,
        past: 6,
        gate_mean: Some(1.0),
        hq: 2,
        hkv: 1,
        ..BASE
    };
    let x = make_inputs(&c, 7);
    let (y, st, sk) = run(&c, &x);
    assert!(y.is_empty());
    assert_eq!(st.unwrap(), x.state.as_ref().unwrap().0);
    assert_eq!(sk.unwrap(), x.state.as_ref().unwrap().1);
}

#[test]
fn chunk_size_does_not_change_the_result() {
    let c = Case {
        b: 1,
        s: 100,
        hq: 2,
        hkv: 1,
        dk: 16,
        dv: 16,
        gate_mean: Some(1.0),
        ..BASE
    };
    let x = make_inputs(&c, 11);
    let base = run(&Case { chunk: 1, ..c }, &x).0;
    for chunk in [7, 16, 64, 100, 1000] {
        let y = run(&Case { chunk, ..c }, &x).0;
        let e = rel_err(&y, &base);
        assert!(e < 2e-6, "chunk {chunk}: rel diff {e:.2e}");
    }
}

#[test]
fn deg_four_matches_the_dense_formula_without_states() {
    for (i, t) in [ElemType::F32, ElemType::BF16].into_iter().enumerate() {
        let c = Case {
            b: 2,
            s: 45,
            hq: 4,
            hkv: 2,
            dk: 8,
            dv: 8,
            gate_mean: Some(3.0),
            deg: 4,
            chunk: 16,
            t,
            ..BASE
        };
        check(c, 300 + i as u64);
    }
}

#[test]
fn gqa_equals_the_same_op_with_repeated_kv_heads() {
    let c = Case {
        b: 1,
        s: 40,
        hq: 6,
        hkv: 2,
        dk: 16,
        dv: 16,
        gate_mean: Some(1.0),
        chunk: 16,
        ..BASE
    };
    let x = make_inputs(&c, 21);
    let y = run(&c, &x).0;
    let r = c.hq / c.hkv;
    let rep = |d: &Data, w: usize| -> Data {
        let mut v = Vec::new();
        for t in 0..c.s {
            for h in 0..c.hkv {
                for _ in 0..r {
                    v.extend_from_slice(&d.values[(t * c.hkv + h) * w..(t * c.hkv + h + 1) * w]);
                }
            }
        }
        Data::new(&[c.b, c.s, c.hq, w], v)
    };
    let full = Inputs {
        q: x.q.clone(),
        k: rep(&x.k, c.dk),
        v: rep(&x.v, c.dv),
        lg: x
            .lg
            .as_ref()
            .map(|l| rep(l, 1))
            .map(|l| Data::new(&[c.b, c.s, c.hq], l.values)),
        state: None,
    };
    let y_full = run(&Case { hkv: c.hq, ..c }, &full).0;
    let e = rel_err(&y, &y_full);
    assert!(e < 1e-6, "GQA vs repeated heads: {e:.2e}");
}
