"""Checkpoints that compressed-tensors itself wrote, read by npquant.load to its own decompression, bit for bit.

tests/data/make_ct_fixtures.py made them with compressed-tensors 0.20.1 on
torch 2.13.0 (scales from its calculate_qparams, codes from each format's
compressor, the reference from the same compressor's decompress), so these
tests need neither. compressed-tensors decompresses to the model's dtype;
npquant's float32 weight rounded to that dtype must equal it exactly.
"""

from pathlib import Path

import numpy as np
import pytest

import npquant
from npquant.safetensors_io import Checkpoint
from test_linear import sum_bound

FIXTURES = sorted((Path(__file__).parent / "data" / "ct_fixtures").iterdir())


def reference(path):
    with Checkpoint(path / "reference" / "dense.safetensors") as ckpt:
        return {name: src.read() for name, src in ckpt.tensors.items()}


def test_every_fixture_is_here():
    assert len(FIXTURES) == 16, [p.name for p in FIXTURES]


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_load_equals_compressed_tensors_decompression(path):
    loaded = npquant.load(path)
    want = reference(path)
    assert sorted(loaded) == sorted(want)
    for name, dense in want.items():
        qt = loaded[name]
        got = qt.dequantize().astype(dense.dtype)  # one rounding to the model dtype
        np.testing.assert_array_equal(got.view(np.uint8), dense.view(np.uint8), err_msg=name)
        if not qt.scheme.is_float and qt.scheme.symmetric:
            # compressed-tensors uses the full signed range: -8 for int4, -128 for int8 (its exact negative maximum)
            assert int(qt.int_codes().min()) == -(2 ** (qt.scheme.bits - 1)), name


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_loaded_tensors_run_on_every_backend(path):
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    for name, qt in npquant.load(path).items():
        xi = x[:, : qt.shape[1]]
        exact = xi.astype(np.float64) @ qt.dequantize().astype(np.float64).T
        bound = sum_bound(xi, qt.dequantize(), qt.shape[1] + 2) + 1e-30
        for backend in npquant.available_backends():
            for weights in (qt, npquant.prepare(qt)):
                y = npquant.linear(xi, weights, backend=backend)
                assert np.all(np.abs(y - exact) <= bound), (name, backend, type(weights).__name__)
