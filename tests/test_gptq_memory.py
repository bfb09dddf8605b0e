"""GPTQ's memory-lean pieces: the in-place linear algebra, the Hessian's blocked sums, the loss without H.

References are numpy's whole-matrix routines and plain float64 products,
written here; the memory bound itself is measured by
benchmarks/bench_gptq_decoder.py (tests never measure time or memory).
"""

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npquant import NpquantError
from npquant.calibrate import Hessian, gptq, hessian_loss
from npquant.calibrate import _linalg
from npquant.calibrate import hessian as hessian_module
from npquant.calibrate.gptq import gptq_with_loss

gptq_module = importlib.import_module("npquant.calibrate.gptq")  # the module (the package's name is the function)


def spd(n: int, seed: int, tokens: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens or 2 * n + 3, n)) @ rng.standard_normal((n, n))
    return x.T @ x + 1e-3 * np.eye(n)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 150), block=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_in_place_cholesky_and_inverse_match_numpy(n, block, seed):
    a = spd(n, seed)
    ref = np.linalg.cholesky(a)
    got = a.copy()
    _linalg.cholesky_lower(got, block=block)
    # Backward-stable Cholesky, either order of sums: |dL| <= c n u |L|-ish; relative to max |L|, with
    # kappa(a) <= ~1e6 here (the 1e-3 ridge), 1e-9 is far above n u * kappa**0.5 = 150 * 1.1e-16 * 1e3.
    assert np.abs(got - ref).max() <= 1e-9 * np.abs(ref).max()
    assert not np.triu(got, 1).any()  # the upper triangle zeroed
    inv_ref = np.linalg.inv(ref)
    _linalg.invert_lower(got, block=block)
    assert np.abs(got - inv_ref).max() <= 1e-9 * np.abs(inv_ref).max() * np.abs(ref).max() * np.abs(inv_ref).max()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 90), seed=st.integers(0, 2**16))
def test_permutation_and_reversal_in_place_are_exact(n, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    perm = rng.permutation(n)
    got = a.copy()
    _linalg.permute_symmetric(got, perm)
    np.testing.assert_array_equal(got, a[np.ix_(perm, perm)])
    got = a.copy()
    _linalg.reverse_both_axes(got)
    np.testing.assert_array_equal(got, a[::-1, ::-1])


def test_chunked_pieces_cross_their_chunk_boundaries(monkeypatch):
    # Tiny chunks: every loop above runs many times (the hypothesis test mostly runs one chunk).
    monkeypatch.setattr(_linalg, "_CHUNK", 7)
    rng = np.random.default_rng(3)
    a = rng.standard_normal((23, 23))
    perm = rng.permutation(23)
    got = a.copy()
    _linalg.permute_symmetric(got, perm)
    np.testing.assert_array_equal(got, a[np.ix_(perm, perm)])
    got = a.copy()
    _linalg.reverse_both_axes(got)
    np.testing.assert_array_equal(got, a[::-1, ::-1])


def test_overwrite_gives_the_same_codes_and_only_then_touches_the_hessian(monkeypatch):
    # Small row chunks too: several blocks of output rows, each against the same U.
    monkeypatch.setattr(gptq_module, "ROW_CHUNK_BYTES", 8 * 96 * 5)
    rng = np.random.default_rng(4)
    h = spd(96, 5)
    w = rng.standard_normal((23, 96)).astype(np.float32)
    kept = h.copy()
    qt = gptq(w, h, "w4-g32")
    np.testing.assert_array_equal(h, kept)  # no overwrite: untouched
    h32 = h.astype(np.float32)
    kept32 = h32.copy()
    gptq(w, h32, "w4-g32", overwrite_hessian=True)
    np.testing.assert_array_equal(h32, kept32)  # not float64: copied, untouched
    work = h.copy()
    qt2 = gptq(w, work, "w4-g32", overwrite_hessian=True)
    assert not np.array_equal(work, kept)  # used as the workspace
    np.testing.assert_array_equal(qt2.int_codes(), qt.int_codes())
    monkeypatch.setattr(gptq_module, "ROW_CHUNK_BYTES", 1 << 30)  # one chunk: the same codes
    np.testing.assert_array_equal(gptq(w, h, "w4-g32").int_codes(), qt.int_codes())


@pytest.mark.parametrize("scheme, act_order, dead", [("w4-g32", True, False), ("w4-g128-asym", False, True),
                                                     ("w8-channel", True, True), ("w3-g128", True, False)])
def test_loss_from_gptqs_errors_equals_the_hessians(scheme, act_order, dead):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((100, 128)) @ rng.standard_normal((128, 128))  # fewer tokens than inputs: singular
    if dead:
        x[:, [3, 70]] = 0
    h = x.T @ x / 100
    w = rng.standard_normal((40, 128)).astype(np.float32)
    qt, loss = gptq_with_loss(w, h.copy(), scheme, act_order=act_order, overwrite_hessian=True)
    direct = hessian_loss(w, qt, h)
    # Both float64: the identity's sum is ||E||^2 - lam ||dW||^2 with lam ||dW||^2 at most ~ the size of
    # ||E||^2 here, the rounding of U (kappa(H') <= 100 I) ~ 1e4 u relative: 1e-9 leaves room, a wrong sign
    # or a missing dead term is off by percents.
    assert abs(loss - direct) <= 1e-9 * max(direct, 1e-300) + 1e-12
    assert loss < hessian_loss(w, npquant_rtn(w, scheme), h)


def npquant_rtn(w, scheme):
    from npquant import quantize

    return quantize(w, scheme)


def test_hessian_sums_in_blocks_equal_one_product(monkeypatch):
    monkeypatch.setattr(hessian_module, "CHUNK_BYTES", 8 * 5 * 7)  # blocks of 5 tokens and 5 rows of H
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((2, 9, 17)).astype(np.float32) for _ in range(3)]
    masks = [rng.integers(0, 2, (2, 9)) for _ in range(3)]
    h = Hessian(17)
    ref = np.zeros((17, 17))
    for x, m in zip(xs, masks):
        h.add(x, m)
        rows = x.reshape(-1, 17)[m.reshape(-1) != 0].astype(np.float64)
        ref += rows.T @ rows
    n = sum(int(m.sum()) for m in masks)
    # float64 sums of float32 products (exact in float64): only the order of additions differs, <= 18 terms of
    # |x|^2 <= 30 each: |error| <= 2 * 18 u * sum |x_i x_j|, below 1e-13 of the diagonal.
    np.testing.assert_allclose(h.matrix(), ref / n, rtol=0, atol=1e-13 * np.abs(ref / n).max())
    assert h.tokens == n
    w = rng.standard_normal((11, 17))
    w_hat = w + 0.01 * rng.standard_normal((11, 17))
    monkeypatch.setattr(hessian_module, "CHUNK_BYTES", 8 * 17 * 3)  # hessian_loss in blocks of 3 rows
    d = w - w_hat
    assert hessian_loss(w, w_hat, ref) == pytest.approx(float(np.trace(d @ ref @ d.T)), rel=1e-12)
    assert hessian_loss(w, None, ref) == pytest.approx(float(np.trace(w @ ref @ w.T)), rel=1e-12)
    taken = h.take()
    np.testing.assert_allclose(taken, ref / n, rtol=0, atol=1e-13 * np.abs(ref / n).max())
    for call in (lambda: h.add(xs[0]), h.matrix, h.take):
        with pytest.raises(NpquantError, match=r"handed over by take\(\)"):
            call()


def test_nonfinite_batches_leave_the_hessian_unchanged():
    h = Hessian(4)
    h.add(np.ones((3, 4), np.float32))
    bad = np.ones((300, 4), np.float16)
    bad[-1, 2] = np.inf
    with pytest.raises(NpquantError, match="NaN or Inf"):
        h.add(bad)
    assert h.tokens == 3 and h.matrix()[0, 0] == 1.0
