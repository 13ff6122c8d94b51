//! `PowerRetention` over S1 + S2 tokens == `PowerRetention` over S1, then S2 tokens through
//! `PowerRetentionStep`, with ragged windows whose sequences fold on different steps.

use crate::common::*;
use ort::value::DynValue;
use power_retention_ort::reference;
use power_retention_ort::schema::{decode as dcd, ElemType, POWER_RETENTION, POWER_RETENTION_STEP};
use power_retention_ort::shapes::Dims;

const B: usize = 3;
const HQ: usize = 4;
const HKV: usize = 2;
const DK: usize = 16;
const DV: usize = 12;

/// Tokens [a, b) of a token-major (B, T, ...) tensor.
fn tokens(x: &Data, a: usize, b: usize) -> Data {
    let (bs, t) = (x.dims[0] as usize, x.dims[1] as usize);
    let row: usize = x.dims[2..].iter().product::<i64>() as usize;
    let mut v = Vec::with_capacity(bs * (b - a) * row);
    for bi in 0..bs {
        v.extend_from_slice(&x.values[(bi * t + a) * row..(bi * t + b) * row]);
    }
    let mut dims: Vec<usize> = x.dims.iter().map(|&d| d as usize).collect();
    dims[1] = b - a;
    Data::new(&dims, v)
}

/// Sequence `bi` of a batch-major tensor.
fn sequence(x: &Data, bi: usize) -> Data {
    let per: usize = x.dims[1..].iter().product::<i64>() as usize;
    let mut dims: Vec<usize> = x.dims.iter().map(|&d| d as usize).collect();
    dims[0] = 1;
    Data::new(&dims, x.values[bi * per..(bi + 1) * per].to_vec())
}

fn stack(parts: &[Data]) -> Data {
    let mut dims: Vec<usize> = parts[0].dims.iter().map(|&d| d as usize).collect();
    dims[0] = parts.len();
    Data::new(
        &dims,
        parts
            .iter()
            .flat_map(|p| p.values.iter().copied())
            .collect(),
    )
}

fn run_steps(capacity: usize, step_tokens: usize, t: ElemType, gated: bool, seed: u64) {
    let (p, steps) = (40usize.max(capacity), 3 * capacity.max(8) + 5);
    let total = p + steps * step_tokens;
    let mut r = rng(seed);
    let sd = 1.0 / (DK as f64).sqrt().sqrt();
    let q = Data::new(&[B, total, HQ, DK], normal(&mut r, B * total * HQ * DK, sd));
    let k = Data::new(
        &[B, total, HKV, DK],
        normal(&mut r, B * total * HKV * DK, sd),
    );
    let v = Data::new(
        &[B, total, HKV, DV],
        normal(&mut r, B * total * HKV * DV, 1.0),
    );
    let lg = Data::new(
        &[B, total, HKV],
        if gated {
            log_gates(&mut r, B * total * HKV, 3.0)
                .iter()
                .map(|&x| x as f32 as f64)
                .collect()
        } else {
            vec![0.0; B * total * HKV]
        },
    );
    let dims = Dims {
        b: B,
        s: total,
        hq: HQ,
        hkv: HKV,
        dk: DK,
        dv: DV,
        d: 0,
        c: 0,
    };
    let lg_opt = gated.then_some(&lg.values[..]);
    let gold = reference::recurrent(
        dims,
        &q.rounded(t),
        &k.rounded(t),
        &v.rounded(t),
        lg_opt,
        None,
        None,
    );

    // Ragged start: sequence β keeps its last m_β prompt tokens in the window, unfolded.
    let m: Vec<usize> = (0..B)
        .map(|bi| (bi * capacity / 2).min(capacity - 1))
        .collect();
    let gate = if gated { Some(ElemType::F32) } else { None };
    let prefill_model = one_node_model(
        &POWER_RETENTION,
        &[Some(t), Some(t), Some(t), gate],
        &[Some(t), Some(ElemType::F32), Some(ElemType::F32)],
        &[],
    );
    let mut pre = session(&prefill_model).expect("prefill session");
    let (mut states, mut sums, mut kcs, mut vcs, mut gcs) =
        (vec![], vec![], vec![], vec![], vec![]);
    for bi in 0..B {
        let folded = p - m[bi];
        let mut feeds: Vec<(&str, DynValue)> = vec![
            ("query", tokens(&sequence(&q, bi), 0, folded).tensor(t)),
            ("key", tokens(&sequence(&k, bi), 0, folded).tensor(t)),
            ("value", tokens(&sequence(&v, bi), 0, folded).tensor(t)),
        ];
        if gated {
            feeds.push((
                "log_gate",
                tokens(&sequence(&lg, bi), 0, folded).tensor(ElemType::F32),
            ));
        }
        let out = pre.run(feeds).expect("prefill run");
        states.push(Data {
            dims: out["present_state"].shape().to_vec(),
            values: values_of(&out["present_state"]),
        });
        sums.push(Data {
            dims: out["present_sum_of_keys"].shape().to_vec(),
            values: values_of(&out["present_sum_of_keys"]),
        });
        let window = |x: &Data, w: usize| {
            let mut d = tokens(&sequence(x, bi), folded, p);
            d.values.resize(capacity * HKV * w, 0.0);
            d.dims[1] = capacity as i64;
            d
        };
        kcs.push(window(&k, DK));
        vcs.push(window(&v, DV));
        gcs.push(window(&lg, 1));
    }
    let mut state = stack(&states);
    let mut sum = stack(&sums);
    let mut kc = stack(&kcs);
    let mut vc = stack(&vcs);
    let mut gc = stack(&gcs);
    let mut len = Data::new(&[B], m.iter().map(|&x| x as f64).collect());

    let mut ins: Vec<Option<ElemType>> = all_ports(POWER_RETENTION_STEP.inputs, t);
    let mut outs: Vec<Option<ElemType>> = all_ports(POWER_RETENTION_STEP.outputs, t);
    if !gated {
        ins[dcd::LOG_GATE] = None;
        ins[dcd::PAST_LOG_GATE_CACHE] = None;
        outs[dcd::PRESENT_LOG_GATE_CACHE] = None;
    }
    let mut step =
        session(&one_node_model(&POWER_RETENTION_STEP, &ins, &outs, &[])).expect("step session");
    let tol = tolerance(t);
    let mut folds = vec![0usize; B];
    for i in (p..total).step_by(step_tokens) {
        let j = i + step_tokens;
        let mut feeds: Vec<(&str, DynValue)> = vec![
            ("query", tokens(&q, i, j).tensor(t)),
            ("key", tokens(&k, i, j).tensor(t)),
            ("value", tokens(&v, i, j).tensor(t)),
            ("past_state", state.tensor(ElemType::F32)),
            ("past_sum_of_keys", sum.tensor(ElemType::F32)),
            ("past_key_cache", kc.tensor(t)),
            ("past_value_cache", vc.tensor(t)),
            ("cache_length", len.tensor(ElemType::I64)),
        ];
        if gated {
            feeds.push(("log_gate", tokens(&lg, i, j).tensor(ElemType::F32)));
            feeds.push(("past_log_gate_cache", gc.tensor(ElemType::F32)));
        }
        let out = step.run(feeds).expect("step run");
        let y = values_of(&out["output"]);
        let want = tokens(
            &Data {
                dims: vec![B as i64, total as i64, HQ as i64, DV as i64],
                values: gold.output.clone(),
            },
            i,
            j,
        );
        let e = rel_err(&y, &want.values);
        assert!(e <= tol, "C={capacity} S={step_tokens} {t:?} gated={gated}: step at token {i}: rel err {e:.2e} > {tol:.1e}");
        let grab = |name: &str| Data {
            dims: out[name].shape().to_vec(),
            values: values_of(&out[name]),
        };
        state = grab("present_state");
        sum = grab("present_sum_of_keys");
        kc = grab("present_key_cache");
        vc = grab("present_value_cache");
        if gated {
            gc = grab("present_log_gate_cache");
        }
        let new_len = grab("present_cache_length");
        for bi in 0..B {
            let (before, after) = (len.values[bi] as usize, new_len.values[bi] as usize);
            if before + step_tokens >= capacity {
                assert_eq!(after, 0, "a full window folds");
                folds[bi] += 1;
            } else {
                assert_eq!(
                    after,
                    before + step_tokens,
                    "a window below capacity appends"
                );
            }
        }
        len = new_len;
    }
    assert!(
        folds.iter().all(|&f| f > 0),
        "every sequence folded at least once: {folds:?}"
    );
    // After the steps, the state holds every token but the cached ones: compare with the oracle.
    for bi in 0..B {
        let folded = total - len.values[bi] as usize;
        let one = Dims {
            b: 1,
            s: folded,
            ..dims
        };
        let sq = |x: &Data| tokens(&sequence(x, bi), 0, folded).rounded(t);
        let lgs = tokens(&sequence(&lg, bi), 0, folded).values;
        let want = reference::recurrent(
            one,
            &sq(&q),
            &sq(&k),
            &sq(&v),
            gated.then_some(&lgs[..]),
            None,
            None,
        );
        let got = sequence(&state, bi).values;
        let e = rel_err(&got, &want.state);
        assert!(
            e <= 2e-5,
            "C={capacity}: state of sequence {bi} after {folded} folded tokens: rel err {e:.2e}"
        );
    }
}

#[test]
fn prefill_then_single_token_steps_equals_prefill_of_everything() {
    for (i, capacity) in [1usize, 16, 64].into_iter().enumerate() {
        run_steps(capacity, 1, ElemType::F32, true, 500 + i as u64);
    }
}

#[test]
fn multi_token_steps_with_gating_are_exact_for_every_query() {
    run_steps(16, 3, ElemType::F32, true, 600);
    run_steps(8, 8, ElemType::F16, true, 601);
}

#[test]
fn ungated_steps_in_half_precision_match_the_recurrence() {
    run_steps(16, 1, ElemType::BF16, false, 700);
    run_steps(4, 2, ElemType::F16, false, 701);
}
