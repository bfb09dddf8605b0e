"""Bit packing against a big-integer reference, every code in every lane."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from npquant.packing import pack_codes, packed_row_bytes, unpack_codes
from reference import reference_pack


@pytest.mark.parametrize("bits", range(2, 9))
def test_every_code_in_every_position_matches_the_reference(bits):
    # Rows cycle through all 2**bits codes, each row shifted by one, so every
    # code lands on every bit offset within a byte; odd lengths included.
    n_codes = 1 << bits
    for n in (1, 7, n_codes + 3, 3 * n_codes + 1):
        u = np.array([[(r + i) % n_codes for i in range(n)] for r in range(8)], np.uint8)
        packed = pack_codes(u, bits)
        assert packed.shape == (8, packed_row_bytes(n, bits)) and packed.dtype == np.uint8
        for r in range(8):
            assert packed[r].tolist() == reference_pack(u[r].tolist(), bits)
        np.testing.assert_array_equal(unpack_codes(packed, bits, n), u)


def test_compressed_tensors_check_value():
    # int4 codes [1..7, 0] stored offset by 8 form the int32 word 0x8FEDCBA9.
    q = np.array([[1, 2, 3, 4, 5, 6, 7, 0]])
    word = pack_codes((q + 8).astype(np.uint8), 4).view("<u4")
    assert int(word[0, 0]) == 0x8FEDCBA9


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 8).flatmap(
    lambda bits: st.tuples(
        st.just(bits),
        hnp.arrays(np.uint8, st.tuples(st.integers(1, 5), st.integers(1, 70)),
                   elements=st.integers(0, (1 << bits) - 1)),
    )
))
def test_pack_then_unpack_is_the_identity(case):
    bits, u = case
    packed = pack_codes(u, bits)
    np.testing.assert_array_equal(unpack_codes(packed, bits, u.shape[1]), u)
    # Unused high bits of each row's last byte stay zero.
    spare = packed.shape[1] * 8 - u.shape[1] * bits
    if spare:
        assert not np.any(packed[:, -1] >> np.uint8(8 - spare))


def test_row_slices_unpack_on_their_own():
    u = np.random.default_rng(0).integers(0, 8, (10, 37), dtype=np.uint8)
    packed = pack_codes(u, 3)
    np.testing.assert_array_equal(unpack_codes(packed[4:7], 3, 37), u[4:7])
