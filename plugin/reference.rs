//! Float64 oracles for tests: the token-by-token state recurrence (deg 2) and the dense O(S²)
//! formula (any even deg). Written for clarity, independent of the kernels' chunking, window
//! and ε handling. Shapes as in the op table, row-major, compact state layout.

use crate::shapes::Dims;

/// `φ(x)` in the compact layout; `key` puts weight 2 on the off-diagonal pairs.
pub fn phi(x: &[f64], key: bool) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len() * (x.len() + 1) / 2);
    for a in 0..x.len() {
        for b in a..x.len() {
            out.push(x[a] * x[b] * if key && a < b { 2.0 } else { 1.0 });
        }
    }
    out
}

pub struct RecurrentOut {
    /// (B, S, Hq, Dv)
    pub output: Vec<f64>,
    /// (B, Hkv, D, Dv)
    pub state: Vec<f64>,
    /// (B, Hkv, D)
    pub sum_of_keys: Vec<f64>,
}

/// `S_t = g_t·S_{t−1} + φ_k(k_t) v_tᵀ`, `y_t = φ_q(q_t)·S_t / φ_q(q_t)·s_t` (deg 2; scale cancels).
#[allow(clippy::too_many_arguments)]
pub fn recurrent(
    dims: Dims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    log_gate: Option<&[f64]>,
    past_state: Option<&[f64]>,
    past_sum: Option<&[f64]>,
) -> RecurrentOut {
    let Dims {
        b,
        s,
        hq,
        hkv,
        dk,
        dv,
        ..
    } = dims;
    let d = dk * (dk + 1) / 2;
    let r = hq / hkv;
    let mut output = vec![0.0; b * s * hq * dv];
    let mut state = past_state.map_or_else(|| vec![0.0; b * hkv * d * dv], <[f64]>::to_vec);
    let mut sum = past_sum.map_or_else(|| vec![0.0; b * hkv * d], <[f64]>::to_vec);
    for bi in 0..b {
        for h in 0..hkv {
            let st = &mut state[(bi * hkv + h) * d * dv..(bi * hkv + h + 1) * d * dv];
            let sk = &mut sum[(bi * hkv + h) * d..(bi * hkv + h + 1) * d];
            for t in 0..s {
                let g = log_gate.map_or(1.0, |lg| lg[(bi * s + t) * hkv + h].exp());
                let kv = ((bi * s + t) * hkv + h) * dk;
                let pk = phi(&k[kv..kv + dk], true);
                let vt = &v[((bi * s + t) * hkv + h) * dv..((bi * s + t) * hkv + h + 1) * dv];
                for row in 0..d {
                    for e in 0..dv {
                        st[row * dv + e] = g * st[row * dv + e] + pk[row] * vt[e];
                    }
                    sk[row] = g * sk[row] + pk[row];
                }
                for gi in 0..r {
                    let qh = h * r + gi;
                    let qo = ((bi * s + t) * hq + qh) * dk;
                    let pq = phi(&q[qo..qo + dk], false);
                    let den: f64 = pq.iter().zip(sk.iter()).map(|(a, b)| a * b).sum();
                    let yo = ((bi * s + t) * hq + qh) * dv;
                    for e in 0..dv {
                        let num: f64 = (0..d).map(|row| pq[row] * st[row * dv + e]).sum();
                        output[yo + e] = num / den;
                    }
                }
            }
        }
    }
    RecurrentOut {
        output,
        state,
        sum_of_keys: sum,
    }
}

/// The dense contract for any even `deg` (no state): `y_i = Σ_j w_ij v_j / Σ_j w_ij`,
/// `w_ij = (scale·q_i·k_j)^deg · exp(G_i − G_j)`.
#[allow(clippy::too_many_arguments)]
pub fn dense(
    dims: Dims,
    deg: usize,
    scale: f64,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    log_gate: Option<&[f64]>,
) -> Vec<f64> {
    let Dims {
        b,
        s,
        hq,
        hkv,
        dk,
        dv,
        ..
    } = dims;
    let r = hq / hkv;
    let mut out = vec![0.0; b * s * hq * dv];
    for bi in 0..b {
        for h in 0..hkv {
            let mut g = vec![0.0; s];
            let mut acc = 0.0;
            for (t, gt) in g.iter_mut().enumerate() {
                acc += log_gate.map_or(0.0, |lg| lg[(bi * s + t) * hkv + h]);
                *gt = acc;
            }
            for gi in 0..r {
                let qh = h * r + gi;
                for i in 0..s {
                    let qi = &q[((bi * s + i) * hq + qh) * dk..][..dk];
                    let (mut num, mut den) = (vec![0.0; dv], 0.0);
                    for j in 0..=i {
                        let kj = &k[((bi * s + j) * hkv + h) * dk..][..dk];
                        let x: f64 = scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>();
                        let w = x.powi(deg as i32) * (g[i] - g[j]).exp();
                        let vj = &v[((bi * s + j) * hkv + h) * dv..][..dv];
                        for (n, &ve) in num.iter_mut().zip(vj) {
                            *n += w * ve;
                        }
                        den += w;
                    }
                    for (e, n) in num.iter().enumerate() {
                        out[((bi * s + i) * hq + qh) * dv + e] = n / den;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recurrence_equals_dense_for_deg_two() {
        let dims = Dims {
            b: 2,
            s: 9,
            hq: 4,
            hkv: 2,
            dk: 5,
            dv: 3,
            d: 15,
            c: 0,
        };
        let mut x = 0.37f64;
        let mut rnd = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|_| {
                    x = (x * 9301.0 + 49297.0) % 233280.0;
                    x / 233280.0 - 0.5
                })
                .collect()
        };
        let q = rnd(2 * 9 * 4 * 5);
        let k = rnd(2 * 9 * 2 * 5);
        let v = rnd(2 * 9 * 2 * 3);
        let lg: Vec<f64> = rnd(2 * 9 * 2).iter().map(|g| -g.abs()).collect();
        let rec = recurrent(dims, &q, &k, &v, Some(&lg), None, None);
        let den = dense(dims, 2, 0.7, &q, &k, &v, Some(&lg));
        for (a, b) in rec.output.iter().zip(&den) {
            assert!((a - b).abs() < 1e-10, "{a} vs {b}");
        }
    }
}
