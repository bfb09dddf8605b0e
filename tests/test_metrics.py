"""Error metrics against direct float64 formulas."""

import math

import numpy as np
import pytest

from npquant import NpquantError
from npquant.metrics import (
    max_abs_error,
    output_relative_error,
    per_channel_relative_error,
    relative_error,
    sqnr_db,
)


def test_metrics_match_their_formulas():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 10))
    w_hat = w + 0.01 * rng.standard_normal((6, 10))
    e = w - w_hat
    rel = math.sqrt((e**2).sum() / (w**2).sum())
    assert relative_error(w, w_hat) == pytest.approx(rel, rel=1e-12)
    assert sqnr_db(w, w_hat) == pytest.approx(20 * math.log10(1 / rel), rel=1e-12)
    assert max_abs_error(w, w_hat) == np.abs(e).max()
    rows = [math.sqrt((e[o] ** 2).sum() / (w[o] ** 2).sum()) for o in range(6)]
    np.testing.assert_allclose(per_channel_relative_error(w, w_hat), rows, rtol=1e-12)
    x = rng.standard_normal((3, 10))
    y, y_hat = x @ w.T, x @ w_hat.T
    assert output_relative_error(x, w, w_hat) == pytest.approx(
        math.sqrt(((y - y_hat) ** 2).sum() / (y**2).sum()), rel=1e-12)


def test_exact_reconstruction_is_infinite_sqnr_without_warnings(recwarn):
    w = np.arange(12.0).reshape(3, 4)
    assert sqnr_db(w, w) == math.inf
    assert relative_error(w, w) == 0.0
    z = np.zeros((2, 3))
    assert relative_error(z, z) == 0.0 and sqnr_db(z, z) == math.inf
    assert relative_error(z, z + 1) == math.inf and sqnr_db(z, z + 1) == -math.inf
    np.testing.assert_array_equal(per_channel_relative_error(z, z), [0, 0])
    assert len(recwarn) == 0


def test_shapes_must_match():
    with pytest.raises(NpquantError, match=r"w_hat must have the shape of w \(2, 3\), got \(3, 2\)"):
        relative_error(np.ones((2, 3)), np.ones((3, 2)))
    with pytest.raises(NpquantError, match=r"x last dimension must be in_features=3"):
        output_relative_error(np.ones((4, 5)), np.ones((2, 3)), np.ones((2, 3)))
