"""Golden-test cases for `PowerRetention` and their deterministic inputs.

Nothing here needs torch or the `retention` package: the tests regenerate every input from the case's
seed (only the package's *outputs* are committed, in data/<case>.npz, made by make_fixtures.py).

Input distribution (chosen so that outputs are well conditioned in every dtype):
  q, k ~ N(0, 1)         -> scale·q·k ~ N(0, 1) at the default scale 1/sqrt(Dk), far above the
                            package's 1e-7 epsilon (so the eps-free float64 gold applies)
  v    ~ N(0, 1/4)       -> |y| < 4 in practice, so one bf16 half-ulp of the output is < 1e-2
  log_gate = logsigmoid(N(gate_mean, 1)), float32, per token and kv head (None: no gating;
                            'zero': an all-zero gate tensor, which must equal no gating)
  past state: the float64 gold state of `past` extra prefix tokens (drawn from the same seed,
            rounded to the case dtype like the rest), stored as float32 in our compact layout.
Every tensor of q/k/v is rounded to the test dtype (float32/float16/bfloat16); the float64 gold is
computed from the rounded values. Gates and states are float32 in every dtype (the op contract).
"""
from dataclasses import dataclass
from pathlib import Path
import sys

import numpy as np

try:  # bfloat16 numpy dtype (shipped with onnx as a dependency)
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

SPEC = Path(__file__).resolve().parents[3] / "shared" / "spec"  # <clone>/../shared/spec
DATA = Path(__file__).resolve().parent / "data"

DTYPES = ("float32", "float16", "bfloat16")


def np_dtype(name):
    return {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BF16}[name]


def gold_module():
    """The float64 gold model `power_retention_gold` from ../shared/spec."""
    if str(SPEC) not in sys.path:
        sys.path.insert(0, str(SPEC))
    import power_retention_gold
    return power_retention_gold


@dataclass(frozen=True)
class Case:
    name: str
    B: int
    S: int
    Hq: int
    Hkv: int
    D: int              # Dk = Dv (the package's state path needs them equal)
    gate: object        # None (no log_gate input) | 'zero' | float mean of the normal under logsigmoid
    scale: object       # None: attribute absent (default 1/sqrt(Dk)); a float: the attribute value
    chunk: int          # chunk_size attribute of our op and chunk_size of the package
    past: int = 0       # prefix tokens folded into past_state/past_sum_of_keys (0: no past state)
    seed: int = 0

    @property
    def state_rows(self):
        return self.D * (self.D + 1) // 2  # compact layout, deg 2

    def store_state(self, dtype):
        """Whether the package's final state for `dtype` is committed (keeps data/ under ~8 MB; the
        state is checked against the float64 gold for every case and dtype regardless). float32
        package states are kept up to one Dk=64 head; float16/bfloat16 ones (rounded to the input
        dtype by the package, so a weaker check) up to two Dk=32 heads; none for S = 1000 with Dk = 64."""
        n = self.B * self.Hkv * self.state_rows * self.D
        if dtype == "float32":
            return 0 < self.S and n <= (140_000 if self.S <= 200 else 70_000)
        return 0 < self.S and n <= 34_000


# A covering design over B {1,3}, S {0,1,7,64,200,1000}, Hq/Hkv {1/1,4/4,8/2}, Dk=Dv {32,64},
# gating {off, zero, mild (+4), strong (0), very fast (-4)}, scale {default, 0 (= default), 0.5, 1.0},
# chunk {16,64,128}, past state {off, on}; S in {17, 63, 129} adds chunk-boundary neighbours
# (t = c + 1, t = c - 1, t not a multiple of c). S = 1000 only with small heads.
CASES = [
    Case("s0_b1_h1_d32",            1,    0, 1, 1, 32, None,  None, 64),
    Case("s0_b3_h8x2_d32_past",     3,    0, 8, 2, 32, 0.0,   0.5,  16, past=20),
    Case("s1_b1_h1_d32_g4",         1,    1, 1, 1, 32, 4.0,   None, 16),
    Case("s1_b3_h8x2_d64_sc05",     3,    1, 8, 2, 64, None,  0.5,  64),
    Case("s1_b1_h4_d64_g0_past",    1,    1, 4, 4, 64, 0.0,   None, 64, past=40),
    Case("s7_b1_h1_d64_g0_sc1",     1,    7, 1, 1, 64, 0.0,   1.0,  16),
    Case("s7_b3_h4_d32",            3,    7, 4, 4, 32, None,  None, 128),
    Case("s7_b1_h8x2_d32_g4_sc0_past", 1, 7, 8, 2, 32, 4.0,   0.0,  64, past=9),
    Case("s7_b3_h1_d64_g0_sc05_past", 3,  7, 1, 1, 64, 0.0,   0.5,  128, past=5),
    Case("s17_b3_h4_d32_g4",        3,   17, 4, 4, 32, 4.0,   None, 16),
    Case("s63_b1_h1_d32_g0_past",   1,   63, 1, 1, 32, 0.0,   None, 64, past=64),
    Case("s64_b1_h1_d64",           1,   64, 1, 1, 64, None,  None, 64),
    Case("s64_b3_h8x2_d32_g0_sc05", 3,   64, 8, 2, 32, 0.0,   0.5,  16),
    Case("s64_b1_h4_d32_gzero",     1,   64, 4, 4, 32, "zero", None, 128),
    Case("s64_b3_h1_d64_g4_past",   3,   64, 1, 1, 64, 4.0,   None, 16, past=30),
    Case("s129_b1_h8x2_d64",        1,  129, 8, 2, 64, None,  None, 128),
    Case("s200_b1_h4_d64_g4",       1,  200, 4, 4, 64, 4.0,   None, 64),
    Case("s200_b3_h1_d32_sc05",     3,  200, 1, 1, 32, None,  0.5,  128),
    Case("s200_b1_h1_d32_gm4",      1,  200, 1, 1, 32, -4.0,  None, 16),
    Case("s200_b1_h8x2_d32_g4_past", 1, 200, 8, 2, 32, 4.0,   None, 64, past=50),
    Case("s1000_b1_h1_d32_g4",      1, 1000, 1, 1, 32, 4.0,   None, 128),
    Case("s1000_b3_h1_d32",         3, 1000, 1, 1, 32, None,  None, 64),
    Case("s1000_b1_h1_d32_gm4_sc05", 1, 1000, 1, 1, 32, -4.0, 0.5,  16),
    Case("s1000_b1_h1_d32_past",   1, 1000, 1, 1, 32, None,  None, 64, past=100),
    Case("s1000_b1_h1_d64_g0",      1, 1000, 1, 1, 64, 0.0,   None, 128),
]
CASES = [Case(**{**c.__dict__, "seed": 1000 + i}) for i, c in enumerate(CASES)]
BY_NAME = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES)


def _logsigmoid(x):
    return np.minimum(x, 0.0) - np.log1p(np.exp(-np.abs(x)))


def _draw(rng, B, T, c):
    q = rng.standard_normal((B, T, c.Hq, c.D))
    k = rng.standard_normal((B, T, c.Hkv, c.D))
    v = rng.standard_normal((B, T, c.Hkv, c.D)) * 0.5
    if c.gate is None:
        g = None
    elif c.gate == "zero":
        g = np.zeros((B, T, c.Hkv), np.float32)
    else:
        g = _logsigmoid(rng.standard_normal((B, T, c.Hkv)) + float(c.gate)).astype(np.float32)
    return q, k, v, g


def round_to(x, dtype):
    """Round float64 data to `dtype`; returns (array in dtype, the same values in float64)."""
    xd = np.asarray(x).astype(np.float32).astype(np_dtype(dtype))
    return xd, xd.astype(np.float64)


def make_inputs(case, dtype):
    """Deterministic inputs of `case` in `dtype`.

    Returns a dict: q, k, v (arrays in dtype), q64/k64/v64 (the same rounded values in float64),
    log_gate (float32 or None), past_state / past_sum_of_keys (float32, compact layout, or None).
    The draw does not depend on dtype: every dtype rounds the same float64 sample.
    """
    rng = np.random.default_rng(case.seed)
    q, k, v, g = _draw(rng, case.B, case.S, case)
    out = {}
    for n, x in (("q", q), ("k", k), ("v", v)):
        out[n], out[n + "64"] = round_to(x, dtype)
    out["log_gate"] = g
    out["past_state"] = out["past_sum_of_keys"] = None
    if case.past:
        G = gold_module()
        _, pk, pv, pg = _draw(rng, case.B, case.past, case)
        pk64 = round_to(pk, dtype)[1]
        pv64 = round_to(pv, dtype)[1]
        S0, s0 = G.final_state(pk64, pv64, pg, lay=G.compact_layout(case.D))
        out["past_state"] = S0.astype(np.float32)
        out["past_sum_of_keys"] = s0.astype(np.float32)
    return out


def effective_scale(case):
    return 1.0 / np.sqrt(case.D) if not case.scale else float(case.scale)


def fixture_path(case):
    return DATA / f"{case.name}.npz"


# ----------------------------------------------------------------------------------------------
# PowerRetentionStep: prefill P tokens with PowerRetention, pre-fill each sequence's cache with
# L0[b] more tokens (ragged), then `steps` steps of `new` tokens each. Sequence b's history is its
# first P + L0[b] + steps·new tokens of one (B, T, ...) draw, so folds fall on different steps.
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeCase:
    name: str
    B: int
    P: int
    L0: tuple
    steps: int
    new: int
    Hq: int
    Hkv: int
    D: int
    gate: object
    scale: object
    C: int
    seed: int = 0

    @property
    def T(self):
        return self.P + max(self.L0) + self.steps * self.new

    @property
    def package_fixture(self):
        """The package's decode is exact for one new token only (spec §4.1: tq > 1 with gating and a
        state is wrong), so it is a reference only for new == 1."""
        return self.new == 1


DECODE_CASES = [
    DecodeCase("dec_c1_b1_h1_d32_g4", 1, 7, (0,), 24, 1, 1, 1, 32, 4.0, None, 1),
    DecodeCase("dec_c16_b3_h8x2_d32_g0", 3, 40, (0, 5, 15), 40, 1, 8, 2, 32, 0.0, None, 16),
    DecodeCase("dec_c64_b3_h2_d64_sc05", 3, 0, (0, 1, 63), 70, 1, 2, 2, 64, None, 0.5, 64),
    DecodeCase("dec_c16_b3_h4x2_d32_g4_new3", 3, 33, (0, 7, 13), 20, 3, 4, 2, 32, 4.0, None, 16),
]
DECODE_CASES = [DecodeCase(**{**c.__dict__, "seed": 2000 + i}) for i, c in enumerate(DECODE_CASES)]
DECODE_BY_NAME = {c.name: c for c in DECODE_CASES}


def make_decode_inputs(case, dtype):
    """q/k/v (B, T, heads, D) in dtype and float64, log_gate (B, T, Hkv) float32 or None."""
    rng = np.random.default_rng(case.seed)
    q, k, v, g = _draw(rng, case.B, case.T, case)
    out = {"log_gate": g}
    for n, x in (("q", q), ("k", k), ("v", v)):
        out[n], out[n + "64"] = round_to(x, dtype)
    return out


def decode_fixture_path(case):
    return DATA / f"{case.name}.npz"
