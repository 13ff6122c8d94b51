//! The decode step on the CPU. Phase 1, parallel over (batch, kv head): the new tokens attend to
//! the window (cached + new tokens) and to the state; a full window is folded into that item's
//! state block. Phase 2, sequential: outputs are scattered, the window caches appended to and the
//! lengths updated. Caches are only read in phase 1, so in-place buffers are safe.

use std::sync::Mutex;

use super::{
    cumulative_gates, decay, decayed_key_features, expand, gather, rows_times_matrix, weight,
};
use crate::element::Element;
use crate::ffi::gemm::{gemm, MatMut, MatRef};
use crate::parallel::Parallel;
use crate::shapes::Dims;

/// Query rows (query heads per kv head × new tokens) up to which the state is streamed, not packed.
const STREAM_ROWS: usize = 8;

pub struct DecodeArgs<'a, T> {
    pub dims: Dims,
    pub scale: f32,
    pub query: &'a [T],
    pub key: &'a [T],
    pub value: &'a [T],
    pub log_gate: Option<&'a [f32]>,
}

/// The in/out buffers of a step, holding the past values on entry and the present on return.
pub struct DecodeBuffers<'a, T> {
    pub output: &'a mut [T],
    pub state: &'a mut [f32],
    pub sum_of_keys: &'a mut [f32],
    pub key_cache: &'a mut [T],
    pub value_cache: &'a mut [T],
    pub log_gate_cache: Option<&'a mut [f32]>,
    /// Checked to lie in [0, C] by the caller.
    pub cache_length: &'a mut [i64],
}

pub fn decode<T: Element>(
    a: &DecodeArgs<'_, T>,
    mut buf: DecodeBuffers<'_, T>,
    par: &dyn Parallel,
) {
    let Dims {
        b,
        s,
        hq,
        hkv,
        dk,
        dv,
        d,
        c,
    } = a.dims;
    let r = a.dims.group();
    let items = b * hkv;
    let lengths: Vec<usize> = buf.cache_length.iter().map(|&l| l as usize).collect();
    let states: Vec<Mutex<(&mut [f32], &mut [f32])>> = buf
        .state
        .chunks_mut(d * dv)
        .zip(buf.sum_of_keys.chunks_mut(d))
        .map(Mutex::new)
        .collect();
    let results: Vec<Mutex<Vec<f32>>> = (0..items).map(|_| Mutex::new(Vec::new())).collect();
    {
        let key_cache: &[T] = buf.key_cache;
        let value_cache: &[T] = buf.value_cache;
        let gate_cache: Option<&[f32]> = buf.log_gate_cache.as_deref();
        par.for_each(items, &|item| {
            let (bi, h) = (item / hkv, item % hkv);
            let l = lengths[bi];
            let n = l + s;
            let w = dv + 1;
            // Window rows: cached tokens 0..l, then the new tokens.
            let mut wk = vec![0.0f32; n * dk];
            let mut wv = vec![0.0f32; n * w];
            let mut gam = vec![0.0f64; n];
            gather(
                key_cache,
                bi * c * hkv * dk + h * dk,
                hkv * dk,
                l,
                dk,
                &mut wk,
                dk,
            );
            gather(
                a.key,
                bi * s * hkv * dk + h * dk,
                hkv * dk,
                s,
                dk,
                &mut wk[l * dk..],
                dk,
            );
            gather(
                value_cache,
                bi * c * hkv * dv + h * dv,
                hkv * dv,
                l,
                dv,
                &mut wv,
                w,
            );
            gather(
                a.value,
                bi * s * hkv * dv + h * dv,
                hkv * dv,
                s,
                dv,
                &mut wv[l * w..],
                w,
            );
            for j in 0..n {
                wv[j * w + dv] = 1.0;
            }
            let mut raw = vec![0.0f32; n];
            if let (Some(gc), Some(g)) = (gate_cache, a.log_gate) {
                for j in 0..l {
                    raw[j] = gc[(bi * c + j) * hkv + h];
                }
                for i in 0..s {
                    raw[l + i] = g[(bi * s + i) * hkv + h];
                }
            }
            cumulative_gates(Some(&raw), 0, 1, n, &mut gam);

            let rows = r * s;
            let mut qs = vec![0.0f32; rows * dk];
            for g in 0..r {
                gather(
                    a.query,
                    bi * s * hq * dk + (h * r + g) * dk,
                    hq * dk,
                    s,
                    dk,
                    &mut qs[g * s * dk..],
                    dk,
                );
            }
            let mut scores = vec![0.0f32; rows * n];
            gemm(
                1.0,
                MatRef::new(&qs, rows, dk, dk),
                MatRef::new(&wk, n, dk, dk).t(),
                0.0,
                MatMut::new(&mut scores, rows, n, n),
            );
            for row in 0..rows {
                let pos = l + row % s;
                for (j, x) in scores[row * n..(row + 1) * n].iter_mut().enumerate() {
                    *x = if j <= pos {
                        weight(a.scale * *x, 2, decay(gam[pos], gam[j]))
                    } else {
                        0.0
                    };
                }
            }
            let mut nd = vec![0.0f32; rows * w];
            gemm(
                1.0,
                MatRef::new(&scores, rows, n, n),
                MatRef::new(&wv, n, w, w),
                0.0,
                MatMut::new(&mut nd, rows, w, w),
            );

            let mut guard = states[item].lock().unwrap_or_else(|e| e.into_inner());
            let (state, sum) = &mut *guard;
            let sp = a.scale * a.scale;
            let mut phi = vec![0.0f32; rows * d];
            for row in 0..rows {
                let pos = l + row % s;
                expand(
                    &qs[row * dk..(row + 1) * dk],
                    1.0,
                    sp * gam[pos].exp() as f32,
                    &mut phi[row * d..(row + 1) * d],
                );
            }
            // A packing GEMM copies the whole state before reading it again, which tripled the
            // step's time in a 12-layer model (the state of a layer is MBs, read once per step):
            // stream it for the few query rows of a usual step; many rows (long multi-token steps,
            // wide query groups) amortise the packing.
            let mut sn = vec![0.0f32; rows * w];
            if rows <= STREAM_ROWS {
                rows_times_matrix(&phi, rows, d, state, dv, &mut sn, w);
                rows_times_matrix(&phi, rows, d, sum, 1, &mut sn[dv..], w);
            } else {
                gemm(
                    1.0,
                    MatRef::new(&phi, rows, d, d),
                    MatRef::new(state, d, dv, dv),
                    0.0,
                    MatMut::new(&mut sn, rows, dv, w),
                );
                gemm(
                    1.0,
                    MatRef::new(&phi, rows, d, d),
                    MatRef::new(sum, d, 1, 1),
                    0.0,
                    MatMut::new(&mut sn[dv..], rows, 1, w),
                );
            }
            let mut y = vec![0.0f32; rows * dv];
            for row in 0..rows {
                let (g, i) = (row / s, row % s);
                let inv = 1.0 / (nd[row * w + dv] + sn[row * w + dv]);
                for e in 0..dv {
                    y[(i * r + g) * dv + e] = (nd[row * w + e] + sn[row * w + e]) * inv;
                }
            }
            if n >= c {
                // Fold the whole window; the window gate sum restarts at zero afterwards.
                let mut phi = vec![0.0f32; n * d];
                let end = decayed_key_features(&wk, dk, &gam, n, d, &mut phi);
                gemm(
                    1.0,
                    MatRef::new(&phi, n, d, d).t(),
                    MatRef::new(&wv, n, dv, w),
                    end.exp() as f32,
                    MatMut::new(state, d, dv, dv),
                );
                gemm(
                    1.0,
                    MatRef::new(&phi, n, d, d).t(),
                    MatRef::strided(&wv[dv..], n, 1, w, 1),
                    end.exp() as f32,
                    MatMut::new(sum, d, 1, 1),
                );
            }
            *results[item].lock().unwrap_or_else(|e| e.into_inner()) = y;
        });
    }
    for (item, res) in results.into_iter().enumerate() {
        let y = res.into_inner().unwrap_or_else(|e| e.into_inner());
        let (bi, h) = (item / hkv, item % hkv);
        for i in 0..s {
            let dst = ((bi * s + i) * hq + h * r) * dv;
            for (o, &x) in buf.output[dst..dst + r * dv]
                .iter_mut()
                .zip(&y[i * r * dv..(i + 1) * r * dv])
            {
                *o = T::from_f32(x);
            }
        }
    }
    for (bi, &l) in lengths.iter().enumerate().take(b) {
        let n = l + s;
        if n >= c {
            buf.cache_length[bi] = 0;
            continue;
        }
        for i in 0..s {
            let (src, dst) = ((bi * s + i) * hkv, (bi * c + l + i) * hkv);
            buf.key_cache[dst * dk..(dst + hkv) * dk]
                .copy_from_slice(&a.key[src * dk..(src + hkv) * dk]);
            buf.value_cache[dst * dv..(dst + hkv) * dv]
                .copy_from_slice(&a.value[src * dv..(src + hkv) * dv]);
            if let (Some(gc), Some(g)) = (buf.log_gate_cache.as_deref_mut(), a.log_gate) {
                gc[dst..dst + hkv].copy_from_slice(&g[src..src + hkv]);
            }
        }
        buf.cache_length[bi] = n as i64;
    }
}
