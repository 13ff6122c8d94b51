//! CPU kernels: the chunked prefill and the fused decode step, in f32 arithmetic for every `T`.
//!
//! Shared pieces live here: the compact deg-2 feature map φ, the attention weights of the
//! "window" part (tokens attended to directly), and row gathers from token-major tensors.

pub mod decode;
pub mod prefill;

use crate::element::Element;

/// The package's ε inside `|scale·q·k|` (`retention/_attention/*`): keeps every row's
/// denominator positive (the diagonal weight is at least ε^deg), e.g. for q = 0.
pub const EPS: f32 = 1e-7;

/// Writes φ(x) in the compact deg-2 layout: row(a, b) = x_a·x_b for a ≤ b, times `off_diag`
/// when a < b (2 on the key side, 1 on the query side), times `factor`.
#[inline]
pub fn expand(x: &[f32], off_diag: f32, factor: f32, out: &mut [f32]) {
    let mut idx = 0;
    for a in 0..x.len() {
        let xa = x[a] * factor;
        out[idx] = xa * x[a];
        idx += 1;
        let xa2 = xa * off_diag;
        for (o, &xb) in out[idx..idx + x.len() - a - 1].iter_mut().zip(&x[a + 1..]) {
            *o = xa2 * xb;
        }
        idx += x.len() - a - 1;
    }
}

/// `out[row] = x[row] · m` for a few rows of `x` (`rows × k`) against `m` (`k × n`, row-major),
/// streaming `m` once: the decode step's state query, where `m` is the state (MBs) and `x` one or
/// a few expanded queries. A packing GEMM would copy the state before reading it again.
/// `out` rows are `ld` apart; their first `n` entries are overwritten.
pub fn rows_times_matrix(
    x: &[f32],
    rows: usize,
    k: usize,
    m: &[f32],
    n: usize,
    out: &mut [f32],
    ld: usize,
) {
    debug_assert!(
        x.len() >= rows * k && m.len() >= k * n && out.len() >= (rows.max(1) - 1) * ld + n
    );
    for row in 0..rows {
        out[row * ld..row * ld + n].fill(0.0);
    }
    for (p, mrow) in m.chunks_exact(n).take(k).enumerate() {
        for row in 0..rows {
            let xp = x[row * k + p];
            for (o, &v) in out[row * ld..row * ld + n].iter_mut().zip(mrow) {
                *o += xp * v;
            }
        }
    }
}

/// Weight of a directly attended token: `(|x| + ε)^deg · decay`, x = scale·q·k.
#[inline(always)]
pub fn weight(x: f32, deg: usize, decay: f32) -> f32 {
    let a = x.abs() + EPS;
    let p = if deg == 2 { a * a } else { a.powi(deg as i32) };
    p * decay
}

/// Copies `rows` rows of `width` elements, `stride` apart starting at `start`, into `dst` as f32.
#[inline]
pub fn gather<T: Element>(
    src: &[T],
    start: usize,
    stride: usize,
    rows: usize,
    width: usize,
    dst: &mut [f32],
    dst_ld: usize,
) {
    for r in 0..rows {
        let s = &src[start + r * stride..start + r * stride + width];
        for (d, &x) in dst[r * dst_ld..r * dst_ld + width].iter_mut().zip(s) {
            *d = x.to_f32();
        }
    }
}

/// Writes φ_k of `n` keys (rows of `dk`) into `phi` (rows of `d`), each scaled by its decay to the
/// last of them, e^{Γ_end − Γ_j}; returns Γ_end. Folding is then `S ← e^{Γ_end}·S + φᵀ·V`.
pub fn decayed_key_features(
    keys: &[f32],
    dk: usize,
    gam: &[f64],
    n: usize,
    d: usize,
    phi: &mut [f32],
) -> f64 {
    let end = gam[n - 1];
    for j in 0..n {
        expand(
            &keys[j * dk..(j + 1) * dk],
            2.0,
            decay(end, gam[j]),
            &mut phi[j * d..(j + 1) * d],
        );
    }
    end
}

/// e^{Γ_i − Γ_j} from f64 cumulative gates: over long chunks or windows Γ reaches hundreds, and an
/// f32 difference of two such sums would lose |Γ|·2⁻²⁴ of relative accuracy.
#[inline(always)]
pub fn decay(gi: f64, gj: f64) -> f32 {
    ((gi - gj) as f32).exp()
}

/// Inclusive cumulative sum (in f64, see [`decay`]) of the gates of `rows` tokens (0 without gating).
pub fn cumulative_gates(
    gates: Option<&[f32]>,
    start: usize,
    stride: usize,
    rows: usize,
    out: &mut [f64],
) {
    let mut acc = 0.0f64;
    for (r, o) in out[..rows].iter_mut().enumerate() {
        if let Some(g) = gates {
            acc += f64::from(g[start + r * stride]);
        }
        *o = acc;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expanded_query_dot_expanded_key_is_the_squared_dot_product() {
        let q = [0.3f32, -1.2, 0.7, 2.0, -0.1];
        let k = [1.1f32, 0.4, -0.9, 0.25, 0.6];
        let d = 15;
        let (mut pq, mut pk) = (vec![0.0; d], vec![0.0; d]);
        expand(&q, 1.0, 1.0, &mut pq);
        expand(&k, 2.0, 1.0, &mut pk);
        let dot: f32 = q.iter().zip(&k).map(|(a, b)| a * b).sum();
        let feat: f32 = pq.iter().zip(&pk).map(|(a, b)| a * b).sum();
        approx::assert_relative_eq!(feat, dot * dot, max_relative = 1e-5);
        // Row order: (0,0), (0,1), ... (0,4), (1,1), ...
        assert_eq!(pk[1], 2.0 * k[0] * k[1]);
        assert_eq!(pk[5], k[1] * k[1]);
    }

    #[test]
    fn rows_times_matrix_is_the_matrix_product() {
        let (rows, k, n, ld) = (3, 7, 5, 6);
        let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let m: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.91).cos()).collect();
        let mut out = vec![f32::NAN; rows * ld];
        rows_times_matrix(&x, rows, k, &m, n, &mut out, ld);
        for r in 0..rows {
            for c in 0..n {
                let want: f32 = (0..k).map(|p| x[r * k + p] * m[p * n + c]).sum();
                approx::assert_relative_eq!(out[r * ld + c], want, max_relative = 1e-5);
            }
            assert!(out[r * ld + n].is_nan(), "the padding column is left alone");
        }
    }
}
