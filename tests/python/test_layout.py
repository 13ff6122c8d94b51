"""The state-layout utility we ship and test against (power_retention_gold in ../shared/spec):
our compact deg-2 layout (power-retention.md §4.4) and the exact conversion to and from the
`retention` package's 16x16-tiled layout (§2.2). Cases from §8 case 1."""
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "golden"))
import cases as C  # noqa: E402

G = C.gold_module()
DIMS = (16, 32, 64, 128)


def onehot(d, *idx):
    x = np.zeros(d)
    for i in idx:
        x[i] += 1.0
    return x


@pytest.mark.parametrize("d", DIMS)
def test_compact_rows_weights_and_sizes(d):
    d1, d2, mult = G.compact_layout(d)
    assert len(d1) == d * (d + 1) // 2 == math.comb(d + 1, 2)
    assert len(G.layout(d)[0]) == 256 * math.comb(d // 16 + 1, 2)
    a, b = np.triu_indices(d)  # row-major upper triangle: (0,0), (0,1), ..., (1,1), ...
    assert np.array_equal(d1, a) and np.array_equal(d2, b)
    assert np.array_equal(np.arange(len(d1)), a * (2 * d - a + 1) // 2 + (b - a))  # row(a, b) of §4.4
    assert np.array_equal(mult, np.where(a < b, 2.0, 1.0))


@pytest.mark.parametrize("d", (16, 32))
def test_one_hot_weights(d):
    """k = e_a + e_b puts key weight 2 on the single compact row (a, b) and 1 on (a,a), (b,b);
    in the tiled layout a pair inside a diagonal tile is stored twice with weight 1, a pair across
    tiles once with weight 2. For every pair: phi_q(e_a + e_b) . phi_k(e_a + e_b) = (2)^2."""
    comp, til = G.compact_layout(d), G.layout(d)
    row = {(int(x), int(y)): i for i, (x, y) in enumerate(zip(comp[0], comp[1]))}
    for a, b in itertools.combinations(range(d), 2):
        k = onehot(d, a, b)
        pk = G.phi_key(k, comp)
        assert pk[row[(a, a)]] == 1 and pk[row[(b, b)]] == 1 and pk[row[(a, b)]] == 2
        assert np.count_nonzero(pk) == 3
        tk = G.phi_key(k, til)
        off = tk[((til[0] == a) & (til[1] == b)) | ((til[0] == b) & (til[1] == a))]
        assert sorted(off) == ([1.0, 1.0] if a // 16 == b // 16 else [2.0])
        for lay, p in ((comp, pk), (til, tk)):
            assert G.phi_query(onehot(d, a), lay) @ p == 1.0       # (e_a . k)^2
            assert G.phi_query(k, lay) @ p == 4.0                   # (k . k)^2
            assert G.phi_query(onehot(d, a, a), lay) @ p == 4.0     # (2 e_a . k)^2


@pytest.mark.parametrize("d", DIMS)
def test_phi_dot_is_squared_dot_product(d):
    rng = np.random.default_rng(d)
    q, k = rng.standard_normal((2, 5, d))
    for lay in (G.compact_layout(d), G.layout(d)):
        np.testing.assert_allclose(G.phi_query(q, lay) @ G.phi_key(k, lay).T, (q @ k.T) ** 2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d", DIMS)
def test_conversions_are_exact(d):
    rng = np.random.default_rng(100 + d)
    K, V = rng.standard_normal((2, 1, 9, 2, d))
    lg = -np.abs(rng.standard_normal((1, 9, 2)))
    St, st = G.final_state(K, V, lg)                         # package (tiled) layout
    Sc, sc = G.final_state(K, V, lg, lay=G.compact_layout(d))
    np.testing.assert_allclose(G.tiled_to_compact(St, d), Sc, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(G.tiled_to_compact(st[..., None], d)[..., 0], sc, rtol=1e-12, atol=1e-12)
    assert np.array_equal(G.compact_to_tiled(G.tiled_to_compact(St, d), d), St)      # tiled round trip
    for dt in (np.float32, np.float64):                                             # compact round trip
        X = rng.standard_normal((2, len(Sc[0, 0]), 3)).astype(dt)
        Y = G.tiled_to_compact(G.compact_to_tiled(X, d), d)
        assert Y.dtype == dt and np.array_equal(Y, X)


def test_package_fixture_states_round_trip_bit_exact():
    """The committed package states (converted to compact) survive compact -> tiled -> compact."""
    n = 0
    for case in C.CASES:
        path = C.fixture_path(case)
        if not path.exists():
            pytest.fail(f"missing fixture {path}")
        with np.load(path) as z:
            for key in (k for k in z.files if k.startswith(("state_", "sum_of_keys_"))):
                X = z[key] if key.startswith("state_") else z[key][..., None]
                assert np.array_equal(G.tiled_to_compact(G.compact_to_tiled(X, case.D), case.D), X), (case.name, key)
                n += 1
    assert n >= 10
