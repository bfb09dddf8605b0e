"""A GGUF file opened safely: its layout walked and checked against its size before the ``gguf`` package's reader
runs, and its metadata read with one-line errors.

Below :mod:`npquant.checkpoints.gguf`, which maps what this opens to a Hugging Face model. ``gguf``'s own reader
trusts every length in the header (a corrupt array count of ``2**60`` kept it looping for seconds on a tiny
file), so every length is checked here first.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
from pathlib import Path

import numpy as np

from ..errors import NpquantError

def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise NpquantError("reading GGUF files needs the gguf package: pip install 'npquant[models]'") from None
    return gguf


def _check_regular(path: Path) -> int:
    """The file's size; a one-line error for a missing path, a directory, a FIFO or a device."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NpquantError(f"{path} does not exist") from None
    except OSError as exc:
        raise NpquantError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise NpquantError(f"{path} is {kind}; give a .gguf file")
    return st.st_size


# The GGUF value types: fixed sizes of the scalars, then string (8) and array (9).
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_ARRAY_DEPTH = 4
_MAX_DIMS = 4  # GGML_MAX_DIMS


class _Walk:
    """A cursor over the header of a GGUF file that refuses to step past its end."""

    def __init__(self, path: Path, buf):
        self.path = path
        self.buf = buf
        self.pos = 0

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if start + n > len(self.buf):
            raise NpquantError(f"{self.path} ends at byte {len(self.buf)}, inside its header ({what} at byte {start} "
                               f"needs {n} bytes): the file is truncated or corrupt")
        self.pos = start + n
        return start

    def u32(self, what: str) -> int:
        s = self.take(4, what)
        return int.from_bytes(self.buf[s:s + 4], "little")

    def u64(self, what: str) -> int:
        s = self.take(8, what)
        return int.from_bytes(self.buf[s:s + 8], "little")

    def string(self, what: str) -> bytes:
        n = self.u64(f"the length of {what}")
        s = self.take(n, what)
        return self.buf[s:s + n]

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[vtype], what)
        elif vtype == _STRING:
            self.string(what)
        elif vtype == _ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                raise NpquantError(f"{self.path}: {what} nests arrays more than {_MAX_ARRAY_DEPTH} deep: corrupt")
            etype = self.u32(f"the item type of {what}")
            count = self.u64(f"the length of {what}")
            if etype in _SCALAR_SIZES:
                self.take(count * _SCALAR_SIZES[etype], what)
                return
            if etype not in (_STRING, _ARRAY):
                raise NpquantError(f"{self.path}: {what} has unknown item type {etype}: the file is corrupt")
            smallest = 8 if etype == _STRING else 12  # a length, or an item type and a length
            if count * smallest > len(self.buf) - self.pos:
                raise NpquantError(f"{self.path}: {what} claims {count} items, more than the "
                                   f"{len(self.buf) - self.pos} bytes left hold: the file is truncated or corrupt")
            for _ in range(count):
                self.value(etype, what, depth + 1)
        else:
            raise NpquantError(f"{self.path}: {what} has unknown value type {vtype}: the file is corrupt")


def _check_layout(path: Path, size: int, gguf) -> None:
    """Walk the header and check every length against the file, so the reader never runs past its end.

    ``gguf.GGUFReader`` reads lengths as it finds them: a corrupt count sends
    it on a very long loop, a truncated file gives it short arrays. This
    checks the magic, the version, every key, value and tensor record, and
    that every tensor's bytes lie inside the file.
    """
    if size < 24:
        raise NpquantError(f"{path} is {size} bytes, too short for a GGUF file (it starts with 24 header bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise NpquantError(f"{path} is not a GGUF file: it starts with {bytes(buf[:4])!r}, not b'GGUF'")
        walk = _Walk(path, buf)
        walk.pos = 4
        version = walk.u32("the version")
        if version & 0xFFFF == 0 and version:
            raise NpquantError(f"{path} is a big-endian GGUF file; npquant reads little-endian ones")
        if version not in (2, 3):
            raise NpquantError(f"{path} is GGUF version {version}; npquant reads versions 2 and 3")
        n_tensors = walk.u64("the tensor count")
        n_kv = walk.u64("the metadata count")
        if n_kv * 12 + n_tensors * 32 > size - walk.pos:  # the smallest key-value and tensor records
            raise NpquantError(f"{path} claims {n_kv} metadata entries and {n_tensors} tensors, more than its "
                               f"{size} bytes hold: the file is truncated or corrupt")
        alignment = 32
        keys = set()
        for i in range(n_kv):
            key = walk.string(f"metadata key {i}")
            label = f"metadata {key.decode('utf-8', 'replace')!r}"
            if key in keys:
                raise NpquantError(f"{path}: {label} appears twice: the file is corrupt")
            keys.add(key)
            vtype = walk.u32(f"the type of {label}")
            start = walk.pos
            walk.value(vtype, label)
            if key == b"general.alignment":
                alignment = int.from_bytes(buf[start:start + 4], "little") if vtype == 4 else 0
                if alignment <= 0 or alignment & (alignment - 1):
                    raise NpquantError(f"{path}: general.alignment must be a power of two (uint32): corrupt")
        records = []
        for i in range(n_tensors):
            name = walk.string(f"the name of tensor {i}").decode("utf-8", "replace")
            n_dims = walk.u32(f"the dimension count of tensor {name!r}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise NpquantError(f"{path}: tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {_MAX_DIMS})")
            dims = [walk.u64(f"a dimension of tensor {name!r}") for _ in range(n_dims)]
            code = walk.u32(f"the type of tensor {name!r}")
            offset = walk.u64(f"the data offset of tensor {name!r}")
            records.append((name, dims, code, offset))
        data_start = -(-walk.pos // alignment) * alignment
        for name, dims, code, offset in records:
            try:
                qtype = gguf.GGMLQuantizationType(code)
            except ValueError:
                raise NpquantError(f"{path}: tensor {name!r} has unknown GGML type code {code}: the file is corrupt "
                                   f"or newer than the gguf package") from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if dims[0] % block:
                raise NpquantError(f"{path}: tensor {name!r} has rows of {dims[0]} values, not a multiple of "
                                   f"{qtype.name}'s block of {block}: the file is corrupt")
            nbytes = math.prod(dims) // block * type_size
            end = data_start + offset + nbytes
            if end > size:
                raise NpquantError(f"{path}: tensor {name!r} ({qtype.name}, {nbytes} bytes) ends at byte {end}, "
                                   f"past the end of the file ({size} bytes): the file is truncated")


class _Metadata:
    """Typed access to a GGUFReader's metadata, with one-line errors naming the key."""

    def __init__(self, path: Path, reader):
        self.path = path
        self.fields = reader.fields

    def get(self, key: str):
        field = self.fields.get(key)
        if field is None:
            return None
        try:
            return field.contents()
        except (ValueError, IndexError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
            raise NpquantError(f"{self.path}: metadata {key} cannot be read: {_one_line(exc)}") from None

    def _typed(self, key: str, default, kinds: tuple, what: str, required: bool):
        value = self.get(key)
        if value is None:
            if required:
                raise NpquantError(f"{self.path}: the GGUF metadata has no {key}, which the config needs")
            return default
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise NpquantError(f"{self.path}: metadata {key} must be {what}, got {value!r}")
        return value

    def integer(self, key: str, default=None, required: bool = False) -> int | None:
        value = self._typed(key, default, (int,), "an integer", required)
        if value is not None and value < 0:
            raise NpquantError(f"{self.path}: metadata {key} must not be negative, got {value}")
        return value

    def number(self, key: str, default=None, required: bool = False) -> float | None:
        value = self._typed(key, default, (int, float), "a number", required)
        if value is not None and not math.isfinite(value):
            raise NpquantError(f"{self.path}: metadata {key} must be finite, got {value}")
        return None if value is None else float(str(np.float32(value)))  # GGUF stores float32: 1e-05, not 9.99e-06

    def text(self, key: str, default=None, required: bool = True) -> str | None:
        return self._typed(key, default, (str,), "a string", required)

    def flag(self, key: str, default=None) -> bool | None:
        return self._typed(key, default, (bool,), "true or false", False)

    def array(self, key: str, required: bool = True) -> list | None:
        return self._typed(key, None, (list,), "an array", required)

    def scalars(self) -> dict:
        """Every metadata value that is not an array (``GGUF.*`` bookkeeping left out)."""
        out = {}
        for key, field in self.fields.items():
            if key.startswith("GGUF.") or not field.types or field.types[0] == _ARRAY:
                continue
            out[key] = self.get(key)
        return out




def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
