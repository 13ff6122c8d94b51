//! Chunked prefill on the CPU: per (batch, kv head), chunks of `c` tokens attend to each other
//! directly and to the running state through φ; the state then absorbs the chunk. Work items
//! are (batch, kv head) pairs spread over the session's threads; each item owns its state block
//! and writes its outputs to a private buffer that is scattered afterwards.

use std::sync::Mutex;

use super::{cumulative_gates, decay, decayed_key_features, expand, gather, weight};
use crate::element::Element;
use crate::ffi::gemm::{gemm, MatMut, MatRef};
use crate::parallel::Parallel;
use crate::shapes::Dims;

pub struct PrefillArgs<'a, T> {
    pub dims: Dims,
    pub deg: usize,
    pub scale: f32,
    pub chunk: usize,
    pub query: &'a [T],
    pub key: &'a [T],
    pub value: &'a [T],
    pub log_gate: Option<&'a [f32]>,
    pub past_state: Option<&'a [f32]>,
    pub past_sum_of_keys: Option<&'a [f32]>,
}

pub struct PrefillOutputs<'a, T> {
    pub output: &'a mut [T],
    pub present_state: Option<&'a mut [f32]>,
    pub present_sum_of_keys: Option<&'a mut [f32]>,
}

pub fn prefill<T: Element>(a: &PrefillArgs<'_, T>, out: PrefillOutputs<'_, T>, par: &dyn Parallel) {
    let Dims {
        b,
        s,
        hq,
        hkv,
        dv,
        d,
        ..
    } = a.dims;
    let r = a.dims.group();
    let items = b * hkv;
    let states: Vec<Mutex<Option<&mut [f32]>>> = match out.present_state {
        Some(st) if d > 0 => st.chunks_mut(d * dv).map(|c| Mutex::new(Some(c))).collect(),
        _ => (0..items).map(|_| Mutex::new(None)).collect(),
    };
    let sums: Vec<Mutex<Option<&mut [f32]>>> = match out.present_sum_of_keys {
        Some(sk) if d > 0 => sk.chunks_mut(d).map(|c| Mutex::new(Some(c))).collect(),
        _ => (0..items).map(|_| Mutex::new(None)).collect(),
    };
    let results: Vec<Mutex<Vec<f32>>> = (0..items).map(|_| Mutex::new(Vec::new())).collect();
    par.for_each(items, &|item| {
        let mut y = vec![0.0f32; s * r * dv];
        let mut st = states[item].lock().unwrap_or_else(|e| e.into_inner());
        let mut sk = sums[item].lock().unwrap_or_else(|e| e.into_inner());
        if a.deg == 2 {
            chunked_item(
                a,
                item / hkv,
                item % hkv,
                &mut y,
                st.as_deref_mut(),
                sk.as_deref_mut(),
            );
        } else {
            quadratic_item(a, item / hkv, item % hkv, &mut y);
        }
        *results[item].lock().unwrap_or_else(|e| e.into_inner()) = y;
    });
    // Scatter (token, group head, dv) item buffers into the (B, S, Hq, Dv) output.
    for (item, res) in results.into_iter().enumerate() {
        let y = res.into_inner().unwrap_or_else(|e| e.into_inner());
        let (bi, h) = (item / hkv, item % hkv);
        for t in 0..s {
            let dst = ((bi * s + t) * hq + h * r) * dv;
            for (o, &x) in out.output[dst..dst + r * dv]
                .iter_mut()
                .zip(&y[t * r * dv..(t + 1) * r * dv])
            {
                *o = T::from_f32(x);
            }
        }
    }
}

/// One (batch, kv head) with deg 2: chunks over the sequence with an augmented state
/// `[S | s]` (D × (Dv+1)), so one product serves numerator and denominator.
fn chunked_item<T: Element>(
    a: &PrefillArgs<'_, T>,
    bi: usize,
    h: usize,
    y: &mut [f32],
    present_state: Option<&mut [f32]>,
    present_sum: Option<&mut [f32]>,
) {
    let Dims {
        s,
        hq,
        hkv,
        dk,
        dv,
        d,
        ..
    } = a.dims;
    let r = a.dims.group();
    let c = a.chunk.min(s.max(1));
    let w = dv + 1;
    let sp = a.scale * a.scale;
    let mut state = vec![0.0f32; d * w];
    let mut has_state = false;
    if let (Some(ps), Some(psk)) = (a.past_state, a.past_sum_of_keys) {
        let base = (bi * hkv + h) * d;
        for row in 0..d {
            state[row * w..row * w + dv]
                .copy_from_slice(&ps[(base + row) * dv..(base + row + 1) * dv]);
            state[row * w + dv] = psk[base + row];
        }
        has_state = true;
    }
    let mut kc = vec![0.0f32; c * dk];
    let mut vc = vec![0.0f32; c * w];
    let mut qc = vec![0.0f32; r * c * dk];
    let mut gam = vec![0.0f64; c];
    let mut scores = vec![0.0f32; c * c];
    let mut nd = vec![0.0f32; r * c * w];
    let mut phi = vec![0.0f32; r.max(1) * c * d];
    let tok_q = hq * dk;
    let tok_kv = hkv * dk;
    let tok_v = hkv * dv;
    let mut t0 = 0;
    while t0 < s {
        let n = c.min(s - t0);
        gather(
            a.key,
            (bi * s + t0) * tok_kv + h * dk,
            tok_kv,
            n,
            dk,
            &mut kc,
            dk,
        );
        gather(
            a.value,
            (bi * s + t0) * tok_v + h * dv,
            tok_v,
            n,
            dv,
            &mut vc,
            w,
        );
        for j in 0..n {
            vc[j * w + dv] = 1.0;
        }
        for g in 0..r {
            gather(
                a.query,
                (bi * s + t0) * tok_q + (h * r + g) * dk,
                tok_q,
                n,
                dk,
                &mut qc[g * n * dk..],
                dk,
            );
        }
        cumulative_gates(a.log_gate, (bi * s + t0) * hkv + h, hkv, n, &mut gam);

        // Direct part: W = weights(Q Kᵀ) causal within the chunk; [num | den] = W · [V | 1].
        for g in 0..r {
            gemm(
                1.0,
                MatRef::new(&qc[g * n * dk..], n, dk, dk),
                MatRef::new(&kc, n, dk, dk).t(),
                0.0,
                MatMut::new(&mut scores, n, n, n),
            );
            for i in 0..n {
                let row = &mut scores[i * n..(i + 1) * n];
                for (j, x) in row.iter_mut().enumerate() {
                    *x = if j <= i {
                        weight(a.scale * *x, 2, decay(gam[i], gam[j]))
                    } else {
                        0.0
                    };
                }
            }
            gemm(
                1.0,
                MatRef::new(&scores, n, n, n),
                MatRef::new(&vc, n, w, w),
                0.0,
                MatMut::new(&mut nd[g * n * w..], n, w, w),
            );
        }
        // State part: scale²·e^{Γ_i}·φ(q_i)·[S | s] for all r·n query rows at once.
        if has_state {
            for row in 0..r * n {
                let i = row % n;
                expand(
                    &qc[row * dk..(row + 1) * dk],
                    1.0,
                    sp * gam[i].exp() as f32,
                    &mut phi[row * d..(row + 1) * d],
                );
            }
            gemm(
                1.0,
                MatRef::new(&phi, r * n, d, d),
                MatRef::new(&state, d, w, w),
                1.0,
                MatMut::new(&mut nd, r * n, w, w),
            );
        }
        for g in 0..r {
            for i in 0..n {
                let row = &nd[(g * n + i) * w..(g * n + i + 1) * w];
                let inv = 1.0 / row[dv];
                let dst = ((t0 + i) * r + g) * dv;
                for (o, &x) in y[dst..dst + dv].iter_mut().zip(&row[..dv]) {
                    *o = x * inv;
                }
            }
        }
        // State update: [S | s] ← e^{Γ_end}·[S | s] + Σ_j e^{Γ_end − Γ_j} φ_k(k_j) [v_j | 1].
        let end = decayed_key_features(&kc, dk, &gam, n, d, &mut phi);
        gemm(
            1.0,
            MatRef::new(&phi, n, d, d).t(),
            MatRef::new(&vc, n, w, w),
            end.exp() as f32,
            MatMut::new(&mut state, d, w, w),
        );
        has_state = true;
        t0 += n;
    }
    if let Some(ps) = present_state {
        for row in 0..d {
            ps[row * dv..(row + 1) * dv].copy_from_slice(&state[row * w..row * w + dv]);
        }
    }
    if let Some(psk) = present_sum {
        for row in 0..d {
            psk[row] = state[row * w + dv];
        }
    }
}

/// One (batch, kv head) for deg > 2 (no state form): blocks of queries against every earlier
/// key, with gate differences taken from an f64 running sum (no cancellation for long inputs).
fn quadratic_item<T: Element>(a: &PrefillArgs<'_, T>, bi: usize, h: usize, y: &mut [f32]) {
    let Dims {
        s, hq, hkv, dk, dv, ..
    } = a.dims;
    let r = a.dims.group();
    let c = a.chunk.min(s.max(1));
    let w = dv + 1;
    let mut kall = vec![0.0f32; s * dk];
    let mut vall = vec![0.0f32; s * w];
    gather(
        a.key,
        bi * s * hkv * dk + h * dk,
        hkv * dk,
        s,
        dk,
        &mut kall,
        dk,
    );
    gather(
        a.value,
        bi * s * hkv * dv + h * dv,
        hkv * dv,
        s,
        dv,
        &mut vall,
        w,
    );
    for j in 0..s {
        vall[j * w + dv] = 1.0;
    }
    let mut g = vec![0.0f64; s];
    let mut acc = 0.0f64;
    for (t, gt) in g.iter_mut().enumerate() {
        if let Some(lg) = a.log_gate {
            acc += lg[(bi * s + t) * hkv + h] as f64;
        }
        *gt = acc;
    }
    let mut qb = vec![0.0f32; c * dk];
    let mut scores = vec![0.0f32; c * s];
    let mut nd = vec![0.0f32; c * w];
    for head in 0..r {
        let mut t0 = 0;
        while t0 < s {
            let n = c.min(s - t0);
            let kn = t0 + n;
            gather(
                a.query,
                (bi * s + t0) * hq * dk + (h * r + head) * dk,
                hq * dk,
                n,
                dk,
                &mut qb,
                dk,
            );
            gemm(
                1.0,
                MatRef::new(&qb, n, dk, dk),
                MatRef::new(&kall, kn, dk, dk).t(),
                0.0,
                MatMut::new(&mut scores, n, kn, kn),
            );
            for i in 0..n {
                for j in 0..kn {
                    let x = &mut scores[i * kn + j];
                    *x = if j <= t0 + i {
                        weight(a.scale * *x, a.deg, (g[t0 + i] - g[j]).exp() as f32)
                    } else {
                        0.0
                    };
                }
            }
            gemm(
                1.0,
                MatRef::new(&scores, n, kn, kn),
                MatRef::new(&vall, kn, w, w),
                0.0,
                MatMut::new(&mut nd, n, w, w),
            );
            for i in 0..n {
                let row = &nd[i * w..(i + 1) * w];
                let dst = ((t0 + i) * r + head) * dv;
                for (o, &x) in y[dst..dst + dv].iter_mut().zip(&row[..dv]) {
                    *o = x / row[dv];
                }
            }
            t0 += n;
        }
    }
}
