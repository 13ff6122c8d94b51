//! Input checks driven by the op table: every port's shape is a list of named dims, a name must
//! take one value per node, and the derived constraints (GQA ratio, expanded dim, S ≤ C) hold.
//! Shared by the CPU and CUDA kernels, and by shape inference.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::schema::{expanded_dim, Dim, ElemType, OpSchema, PortType};

/// What the validator needs to know about one present input.
#[derive(Clone, Copy, Debug)]
pub struct InputMeta<'a> {
    pub dims: &'a [i64],
    pub elem: ElemType,
}

/// Bound dimensions of one call. `c` is 0 for ops without a cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub s: usize,
    pub hq: usize,
    pub hkv: usize,
    pub dk: usize,
    pub dv: usize,
    pub d: usize,
    pub c: usize,
}

impl Dims {
    pub fn get(&self, d: Dim) -> usize {
        match d {
            Dim::B => self.b,
            Dim::S => self.s,
            Dim::Hq => self.hq,
            Dim::Hkv => self.hkv,
            Dim::Dk => self.dk,
            Dim::Dv => self.dv,
            Dim::D => self.d,
            Dim::C => self.c,
        }
    }

    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.hq / self.hkv
    }

    /// The concrete shape of a port.
    pub fn shape_of(&self, shape: &[Dim]) -> Vec<i64> {
        shape.iter().map(|&d| self.get(d) as i64).collect()
    }
}

/// True when the op must carry a state of expanded dim D (and therefore needs deg 2).
fn uses_state(op: &OpSchema, present: &[bool], outputs_requested: &[bool]) -> bool {
    let any_in = op
        .inputs
        .iter()
        .zip(present)
        .any(|(p, &on)| on && p.shape.contains(&Dim::D));
    let any_out = op
        .outputs
        .iter()
        .zip(outputs_requested)
        .any(|(p, &on)| on && p.shape.contains(&Dim::D));
    any_in || any_out
}

/// Checks presence, element types and shapes of a node's inputs; returns the bound dims.
///
/// `t` is the model dtype the kernel was registered for; `outputs_requested[i]` says whether the
/// node wires optional output `i`.
pub fn validate(
    op: &'static OpSchema,
    cfg: &Config,
    t: ElemType,
    inputs: &[Option<InputMeta<'_>>],
    outputs_requested: &[bool],
) -> Result<Dims> {
    let present: Vec<bool> = (0..op.inputs.len())
        .map(|i| inputs.get(i).is_some_and(|x| x.is_some()))
        .collect();
    for (i, port) in op.inputs.iter().enumerate() {
        if !port.optional && !present[i] {
            return Err(Error::MissingInput {
                op: op.name,
                input: port.name,
                because: String::new(),
            });
        }
    }
    for &(a, b) in op.together {
        if present[a] != present[b] {
            let (given, missing) = if present[a] { (a, b) } else { (b, a) };
            return Err(Error::MissingInput {
                op: op.name,
                input: op.inputs[missing].name,
                because: format!(
                    " because '{}' is given (they go together)",
                    op.inputs[given].name
                ),
            });
        }
    }
    for &(o, i) in op.output_needs {
        if outputs_requested.get(o).copied().unwrap_or(false) && !present[i] {
            return Err(Error::InputCombination {
                op: op.name,
                what: format!(
                    "output '{}' can only be produced when input '{}' is given",
                    op.outputs[o].name, op.inputs[i].name
                ),
            });
        }
    }
    for (i, port) in op.inputs.iter().enumerate() {
        if let Some(Some(meta)) = inputs.get(i) {
            let want = port.ty.resolve(t);
            if meta.elem != want {
                return Err(Error::ElementType {
                    op: op.name,
                    input: port.name,
                    expected: if port.ty == PortType::T {
                        t.name()
                    } else {
                        want.name()
                    },
                    got: meta.elem.name().into(),
                });
            }
        }
    }

    let state = uses_state(op, &present, outputs_requested);
    if state && cfg.deg != 2 {
        return Err(Error::Unsupported {
            op: op.name,
            what: format!("deg {} with a state (past_state, present_state or a decode step)", cfg.deg),
            why: "; only deg 2 has a state form (the expanded dim of deg 4 is ~770k rows at Dk 64): use deg 2, or omit the state ports".into(),
        });
    }

    // Bind every named dim from the first input that carries it.
    let mut bound: [Option<(i64, &'static str)>; 8] = [None; 8];
    for (i, port) in op.inputs.iter().enumerate() {
        let Some(Some(meta)) = inputs.get(i) else {
            continue;
        };
        if meta.dims.len() != port.shape.len() {
            return Err(Error::Rank {
                op: op.name,
                input: port.name,
                expected: port.shape.len(),
                shape: OpSchema::shape_text(port.shape),
                got: meta.dims.len(),
                dims: meta.dims.to_vec(),
            });
        }
        for (axis, (&sym, &got)) in port.shape.iter().zip(meta.dims).enumerate() {
            if sym == Dim::D {
                continue;
            }
            match bound[sym.index()] {
                None => bound[sym.index()] = Some((got, port.name)),
                Some((want, from)) if want != got => {
                    return Err(dim_error(
                        op,
                        port.name,
                        port.shape,
                        meta.dims,
                        &bound,
                        axis,
                        sym,
                        got,
                        format!(", but '{from}' has {} = {want}", sym.symbol()),
                    ));
                }
                Some(_) => {}
            }
        }
    }
    let val = |d: Dim| bound[d.index()].map(|(v, _)| v);
    let (b, s, hq, hkv, dk, dv) = (
        val(Dim::B),
        val(Dim::S),
        val(Dim::Hq),
        val(Dim::Hkv),
        val(Dim::Dk),
        val(Dim::Dv),
    );
    let (Some(b), Some(s), Some(hq), Some(hkv), Some(dk), Some(dv)) = (b, s, hq, hkv, dk, dv)
    else {
        return Err(Error::Constraint {
            op: op.name,
            what: "query, key and value must all be given".into(),
        });
    };
    for (sym, v, from) in [
        (Dim::Hq, hq, "query"),
        (Dim::Hkv, hkv, "key"),
        (Dim::Dk, dk, "key"),
        (Dim::Dv, dv, "value"),
    ] {
        if v < 1 {
            return Err(Error::Constraint {
                op: op.name,
                what: format!("input '{from}': {} must be ≥ 1, got {v}", sym.symbol()),
            });
        }
    }
    if hq % hkv != 0 {
        return Err(Error::Constraint {
            op: op.name,
            what: format!("input 'query' has Hq = {hq} heads, which is not a multiple of Hkv = {hkv} (from 'key'): grouped-query attention needs Hq % Hkv == 0"),
        });
    }
    let c = val(Dim::C).unwrap_or(0);
    if op.inputs.iter().any(|p| p.shape.contains(&Dim::C)) {
        let cache = op
            .inputs
            .iter()
            .find(|p| p.shape.contains(&Dim::C))
            .map_or("cache", |p| p.name);
        if c < 1 {
            return Err(Error::Constraint {
                op: op.name,
                what: format!("input '{cache}': cache capacity C must be ≥ 1, got {c}"),
            });
        }
        if s < 1 || s > c {
            return Err(Error::Constraint {
                op: op.name,
                what: format!("input 'query': a step takes S new tokens with 1 ≤ S ≤ C = {c} (from '{cache}'), got S = {s}"),
            });
        }
    }
    // The chunked deg-2 algorithm always carries a state internally; other degrees never do.
    let d = if state || cfg.deg == 2 {
        expanded_dim(dk as usize, cfg.deg).ok_or_else(|| Error::Constraint {
            op: op.name,
            what: format!("expanded dim for Dk = {dk} overflows"),
        })?
    } else {
        0
    };
    // The expanded dim is derived from Dk; check every port that carries it.
    for (i, port) in op.inputs.iter().enumerate() {
        let Some(Some(meta)) = inputs.get(i) else {
            continue;
        };
        if let Some(axis) = port.shape.iter().position(|&x| x == Dim::D) {
            if meta.dims[axis] != d as i64 {
                bound[Dim::D.index()] = Some((d as i64, "Dk"));
                return Err(dim_error(
                    op,
                    port.name,
                    port.shape,
                    meta.dims,
                    &bound,
                    axis,
                    Dim::D,
                    meta.dims[axis],
                    format!(", but D = Dk(Dk+1)/2 = {d} for Dk = {dk} (compact deg-2 layout)"),
                ));
            }
        }
    }
    Ok(Dims {
        b: b as usize,
        s: s as usize,
        hq: hq as usize,
        hkv: hkv as usize,
        dk: dk as usize,
        dv: dv as usize,
        d,
        c: c as usize,
    })
}

#[allow(clippy::too_many_arguments)]
fn dim_error(
    op: &'static OpSchema,
    input: &'static str,
    shape: &'static [Dim],
    dims: &[i64],
    bound: &[Option<(i64, &'static str)>; 8],
    axis: usize,
    symbol: Dim,
    got: i64,
    why: String,
) -> Error {
    let expected: Vec<String> = shape
        .iter()
        .map(|d| bound[d.index()].map_or_else(|| "?".to_string(), |(v, _)| v.to_string()))
        .collect();
    Error::Dim(Box::new(crate::error::DimMismatch {
        op: op.name,
        input,
        shape: OpSchema::shape_text(shape),
        expected_dims: format!("({})", expected.join(", ")),
        dims: dims.to_vec(),
        axis,
        symbol: symbol.symbol(),
        got,
        why,
    }))
}

/// A dimension as shape inference sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DimExpr {
    Known(i64),
    Symbolic(String),
    Unknown,
}

/// Output shapes from (possibly symbolic) input shapes: each named dim is copied from the first
/// present input that carries it; `D` is computed from a known `Dk`.
pub fn infer_output_shapes(
    op: &OpSchema,
    deg: usize,
    inputs: &[Option<Vec<DimExpr>>],
) -> Vec<Vec<DimExpr>> {
    let find = |sym: Dim| -> DimExpr {
        if sym == Dim::D {
            return match find_dim(op, inputs, Dim::Dk) {
                DimExpr::Known(dk) if dk > 0 => expanded_dim(dk as usize, deg)
                    .map_or(DimExpr::Unknown, |d| DimExpr::Known(d as i64)),
                _ => find_dim(op, inputs, Dim::D),
            };
        }
        find_dim(op, inputs, sym)
    };
    op.outputs
        .iter()
        .map(|port| port.shape.iter().map(|&d| find(d)).collect())
        .collect()
}

fn find_dim(op: &OpSchema, inputs: &[Option<Vec<DimExpr>>], sym: Dim) -> DimExpr {
    for (port, dims) in op.inputs.iter().zip(inputs) {
        let Some(dims) = dims else { continue };
        if dims.len() != port.shape.len() {
            continue;
        }
        if let Some(axis) = port.shape.iter().position(|&d| d == sym) {
            if dims[axis] != DimExpr::Unknown {
                return dims[axis].clone();
            }
        }
    }
    DimExpr::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{decode, prefill, POWER_RETENTION, POWER_RETENTION_STEP};

    const CFG: Config = Config {
        deg: 2,
        scale: 0.0,
        chunk_size: 64,
    };

    fn meta(dims: &[i64], elem: ElemType) -> Option<InputMeta<'_>> {
        Some(InputMeta { dims, elem })
    }

    #[test]
    fn gqa_prefill_binds_all_dims() {
        let (q, k, v) = ([2, 7, 8, 32], [2, 7, 2, 32], [2, 7, 2, 16]);
        let ins = [
            meta(&q, ElemType::F16),
            meta(&k, ElemType::F16),
            meta(&v, ElemType::F16),
            None,
            None,
            None,
        ];
        let d = validate(
            &POWER_RETENTION,
            &CFG,
            ElemType::F16,
            &ins,
            &[true, true, false],
        )
        .unwrap();
        assert_eq!(
            d,
            Dims {
                b: 2,
                s: 7,
                hq: 8,
                hkv: 2,
                dk: 32,
                dv: 16,
                d: 528,
                c: 0
            }
        );
    }

    #[test]
    fn mismatched_sequence_length_names_both_inputs() {
        let (q, k, v) = ([2, 7, 4, 32], [2, 8, 4, 32], [2, 7, 4, 32]);
        let ins = [
            meta(&q, ElemType::F32),
            meta(&k, ElemType::F32),
            meta(&v, ElemType::F32),
            None,
            None,
            None,
        ];
        let e = validate(
            &POWER_RETENTION,
            &CFG,
            ElemType::F32,
            &ins,
            &[true, false, false],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("input 'key'") && e.contains("'query' has S = 7"),
            "{e}"
        );
    }

    #[test]
    fn state_with_wrong_expanded_dim_explains_the_layout() {
        let (q, st, sk) = ([1, 3, 2, 8], [1, 2, 64, 8], [1, 2, 36]);
        let ins = [
            meta(&q, ElemType::F32),
            meta(&q, ElemType::F32),
            meta(&q, ElemType::F32),
            None,
            meta(&st, ElemType::F32),
            meta(&sk, ElemType::F32),
        ];
        let e = validate(
            &POWER_RETENTION,
            &CFG,
            ElemType::F32,
            &ins,
            &[true, false, false],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("input 'past_state'") && e.contains("D = Dk(Dk+1)/2 = 36"),
            "{e}"
        );
    }

    #[test]
    fn step_shape_inference_copies_symbols() {
        let sym = |s: &str| DimExpr::Symbolic(s.into());
        let k = DimExpr::Known;
        let mut ins: Vec<Option<Vec<DimExpr>>> = vec![None; POWER_RETENTION_STEP.inputs.len()];
        ins[decode::QUERY] = Some(vec![sym("batch"), k(1), k(4), k(64)]);
        ins[decode::VALUE] = Some(vec![sym("batch"), k(1), k(4), k(32)]);
        ins[decode::PAST_KEY_CACHE] = Some(vec![sym("batch"), k(16), k(4), k(64)]);
        let out = infer_output_shapes(&POWER_RETENTION_STEP, 2, &ins);
        assert_eq!(out[decode::OUTPUT], vec![sym("batch"), k(1), k(4), k(32)]);
        assert_eq!(
            out[decode::PRESENT_STATE],
            vec![sym("batch"), k(4), k(2080), k(32)]
        );
        assert_eq!(out[decode::PRESENT_KEY_CACHE][1], k(16));
        let _ = prefill::OUTPUT;
    }

    #[test]
    fn validation_never_panics_on_arbitrary_shapes() {
        // A small xorshift keeps this test dependency-free and reproducible.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for op in [&POWER_RETENTION, &POWER_RETENTION_STEP] {
            for _ in 0..20_000 {
                let dims: Vec<Vec<i64>> = op
                    .inputs
                    .iter()
                    .map(|p| {
                        let rank = if next(8) == 0 {
                            next(6) as usize
                        } else {
                            p.shape.len()
                        };
                        (0..rank)
                            .map(|_| {
                                [0, 1, 2, 3, 4, 8, 36, 64][next(8) as usize]
                                    - i64::from(next(50) == 0)
                            })
                            .collect()
                    })
                    .collect();
                let ins: Vec<Option<InputMeta<'_>>> = dims
                    .iter()
                    .zip(op.inputs)
                    .map(|(d, p)| {
                        (!p.optional || next(2) == 0).then_some(InputMeta {
                            dims: d,
                            elem: p.ty.resolve(ElemType::F32),
                        })
                    })
                    .collect();
                let outs: Vec<bool> = op.outputs.iter().map(|_| next(2) == 0).collect();
                let cfg = Config {
                    deg: [2, 4][next(2) as usize],
                    scale: 0.0,
                    chunk_size: 64,
                };
                if let Ok(d) = validate(op, &cfg, ElemType::F32, &ins, &outs) {
                    assert!(
                        d.hkv >= 1 && d.hq % d.hkv == 0 && d.dk >= 1 && d.dv >= 1,
                        "{d:?}"
                    );
                    for (port, meta) in op.inputs.iter().zip(&ins) {
                        if let Some(m) = meta {
                            assert_eq!(
                                d.shape_of(port.shape),
                                m.dims,
                                "{}: {}",
                                op.name,
                                port.name
                            );
                        }
                    }
                }
            }
        }
    }
}
