"""Reading safetensors checkpoints row by row, and writing them as a stream.

Reading goes through the ``safetensors`` package (memory-mapped; never
unpickles anything): :class:`Checkpoint` opens a ``.safetensors`` file or a
model directory (one file, or shards listed in ``model.safetensors.index.json``)
and hands out :class:`TensorSource` objects that read rows on demand, so a
tensor is never copied whole.

Writing uses :func:`write_safetensors`, which lays out the header first from
the planned names, dtypes and shapes, then writes each tensor's bytes as it
is produced: memory stays at one tensor, whatever the file size. The format
(8-byte little-endian header length, JSON header, raw little-endian data)
is the one ``safetensors`` reads; the tests read our files back with it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import NpquantError

__all__ = [
    "Checkpoint",
    "TensorSource",
    "TensorPlan",
    "write_safetensors",
    "numpy_dtype",
    "PICKLE_SUFFIXES",
    "INDEX_NAME",
    "MAX_JSON_BYTES",
    "read_json",
    "check_regular_file",
    "json_kind",
]

INDEX_NAME = "model.safetensors.index.json"
#: The largest JSON file (``config.json``, the index) npquant reads; a larger one is refused before reading.
MAX_JSON_BYTES = 64 << 20
#: File types that hold pickles: refused, never opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def numpy_dtype(code: str) -> np.dtype:
    """The numpy dtype of a safetensors dtype code (``"BF16"`` -> ml_dtypes.bfloat16)."""
    if code in _ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, _ML_DTYPES[code]))
    try:
        return np.dtype(_NUMPY_DTYPES[code])
    except KeyError:
        raise NpquantError(f"safetensors dtype {code!r} is not supported") from None


def dtype_code(dtype) -> str:
    """The safetensors code of a numpy dtype."""
    name = np.dtype(dtype).name
    for code, np_name in {**_NUMPY_DTYPES, **_ML_DTYPES}.items():
        if np_name == name:
            return code
    raise NpquantError(f"dtype {name} has no safetensors code")


class TensorSource:
    """One tensor of a checkpoint, read in row slices from the memory-mapped file.

    Has ``name``, ``file``, ``shape``, ``dtype`` (numpy), ``nbytes``, ``ndim``;
    ``source[r0:r1]`` reads rows ``[r0, r1)`` into a new array, ``read()`` all.
    """

    def __init__(self, name: str, file: Path, code: str, shape: tuple[int, ...], handle, offset: int):
        self.name = name
        self.file = file
        self.code = code
        self.shape = tuple(int(d) for d in shape)
        self.offset = offset  # of the tensor's first byte in the file
        self._handle = handle

    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(self.code)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _ITEMSIZE[self.code]

    def __getitem__(self, rows) -> np.ndarray:
        if not isinstance(rows, slice):
            raise TypeError("a TensorSource takes a row slice")
        if self.ndim == 0:
            return self.read()
        start, stop, step = rows.indices(self.shape[0])  # safetensors does not clamp
        stop = max(start, stop)
        if self.code.startswith("F8"):
            return self._raw()[start:stop:step].copy()
        return np.asarray(self._handle.get_slice(self.name)[start:stop:step])

    def read(self) -> np.ndarray:
        """The whole tensor as a new array."""
        if self.code.startswith("F8"):
            return self._raw().copy()
        return np.asarray(self._handle.get_tensor(self.name))

    def _raw(self) -> np.ndarray:
        """A read-only memory map of the tensor's bytes, for dtypes the package cannot hand to numpy (fp8)."""
        flat = np.memmap(self.file, dtype=np.uint8, mode="r", offset=self.offset, shape=(self.nbytes,))
        return flat.view(self.dtype).reshape(self.shape)

    def __repr__(self) -> str:
        return f"TensorSource({self.name!r}, {self.code} {self.shape}, {self.file.name})"


class Checkpoint:
    """A safetensors model: a ``.safetensors`` file or a model directory.

    Use as a context manager, or call :meth:`close`. ``tensors`` maps each
    tensor name to its :class:`TensorSource`, in file order; ``files`` lists
    the shard files; ``root`` is the directory (or the file's directory);
    ``index`` is the parsed index JSON or None; ``metadata`` maps each file
    to its ``__metadata__``.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path
        self.index = None
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise NpquantError(f"MODEL {path} does not exist") from None
        except OSError as exc:
            raise NpquantError(f"MODEL {path} cannot be read: {exc.strerror or exc}") from None
        if stat.S_ISREG(mode):
            _refuse_pickle(path)
            _refuse_gguf(path)
            if path.suffix != ".safetensors":
                raise NpquantError(f"MODEL {path} is not a .safetensors file or a model directory")
            self.root = path.parent
            self.files = [path]
            shard_of = None
        elif stat.S_ISDIR(mode):
            self.root = path
            index_path = path / INDEX_NAME
            try:
                if os.path.lexists(index_path):
                    self.index = _read_index(index_path)
                    shard_of = self.index["weight_map"]
                    names = list(dict.fromkeys(shard_of.values()))
                    for shard in names:
                        if not os.path.lexists(path / shard):
                            raise NpquantError(f"{index_path} names shard {shard!r}, which is missing from {path}")
                    self.files = [path / shard for shard in names]
                else:
                    self.files = sorted(path.glob("*.safetensors"))
                    shard_of = None
                    if not self.files:
                        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
                        if pickles:
                            _refuse_pickle(path / pickles[0])
                        for gguf in sorted(path.glob("*.gguf")):
                            _refuse_gguf(gguf)
                        raise NpquantError(f"MODEL {path} holds no .safetensors files")
                for file in self.files:  # before safe_open opens them: a FIFO would block it forever
                    check_regular_file(file)
            except OSError as exc:
                raise NpquantError(f"MODEL {path} cannot be read: {exc.strerror or exc} ({exc.filename})") from None
        else:
            raise NpquantError(f"MODEL {path} is {_file_kind(mode)}, not a .safetensors file or a model directory")
        # Imported only now: a wrong path is refused without waiting for them (ml_dtypes takes ~0.5 s).
        import ml_dtypes  # noqa: F401  (registers bfloat16 and fp8 with numpy: safetensors looks them up by name)
        from safetensors import SafetensorError, safe_open

        self._handles = []
        self.tensors: dict[str, TensorSource] = {}
        self.metadata: dict[Path, dict] = {}
        try:
            for file in self.files:
                try:
                    handle = safe_open(str(file), framework="numpy")
                except SafetensorError as exc:
                    raise NpquantError(f"{file} is not a readable safetensors file: {exc}") from None
                except OSError as exc:
                    raise NpquantError(f"{file} cannot be read: {exc}") from None
                self._handles.append(handle)
                self.metadata[file] = handle.metadata() or {}
                offsets = _data_offsets(file, handle.keys())
                for name in handle.keys():
                    if name in self.tensors:
                        raise NpquantError(f"tensor {name!r} appears in both {self.tensors[name].file} and {file}")
                    if shard_of is not None and shard_of.get(name) != file.name:
                        raise NpquantError(
                            f"tensor {name!r} is in {file.name} but the index maps it to {shard_of.get(name)!r}"
                        )
                    piece = handle.get_slice(name)
                    code = piece.get_dtype()
                    if code not in _ITEMSIZE:
                        raise NpquantError(f"tensor {name!r} in {file.name} has unsupported dtype {code}")
                    self.tensors[name] = TensorSource(name, file, code, piece.get_shape(), handle, offsets[name])
            if shard_of is not None:
                missing = sorted(set(shard_of) - set(self.tensors))
                if missing:
                    raise NpquantError(f"the index lists tensor {missing[0]!r}, found in no shard")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the memory maps."""
        for handle in self._handles:
            exit_ = getattr(handle, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
        self._handles = []

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def config(self) -> dict | None:
        """``config.json`` beside the weights (a JSON object, read by :func:`read_json`), or None."""
        path = self.root / "config.json"
        if not os.path.lexists(path):
            return None
        config = read_json(path)
        if not isinstance(config, dict):
            raise NpquantError(f"{path} must hold a JSON object, got {json_kind(config)}")
        return config

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _data_offsets(file: Path, names) -> dict[str, int]:
    """Absolute file offset of each tensor's data (the header was validated by safetensors)."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        return {k: 8 + n + int(header[k]["data_offsets"][0]) for k in names}
    except (OSError, ValueError, LookupError, TypeError, RecursionError) as exc:
        raise NpquantError(f"{file} has a safetensors header npquant cannot read: {exc!r}") from None


def _refuse_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise NpquantError(
            f"{path} is a pickle checkpoint ({path.suffix}): npquant never unpickles files. "
            f"Convert it to safetensors first (safetensors.torch.save_file in a trusted environment)"
        )


def check_regular_file(path: Path) -> os.stat_result:
    """``path``'s stat (symlinks followed), refusing anything but a regular file before it is opened.

    A FIFO would block the open forever and a device can be endless: both
    get a one-line NpquantError naming the path. OSError (a missing or
    unreadable file) is left to the caller.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NpquantError(f"{path} is {_file_kind(st.st_mode)}, not a regular file: npquant reads regular files only")
    return st


def read_json(path: Path, limit: int = MAX_JSON_BYTES):
    """The JSON value in the file ``path``, or a one-line NpquantError naming it.

    Refused: a path that is not a regular file (checked before opening, so
    a FIFO never blocks), a file over ``limit`` bytes (checked before
    reading), one that cannot be read (permissions), is not UTF-8, is not
    JSON or nests deeper than the parser follows. The caller checks the
    value's type.
    """
    try:
        check_regular_file(path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())  # the file opened, should a rename have swapped it since the check
            if not stat.S_ISREG(st.st_mode):
                raise NpquantError(f"{path} is {_file_kind(st.st_mode)}, not a regular file")
            if st.st_size > limit:
                raise NpquantError(f"{path} is {st.st_size} bytes; npquant reads JSON files of at most {limit} bytes")
            raw = f.read(limit + 1)  # bounded even if the file grows meanwhile
    except FileNotFoundError:
        raise NpquantError(f"{path} does not exist") from None
    except OSError as exc:
        raise NpquantError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > limit:
        raise NpquantError(f"{path} is over {limit} bytes; npquant reads JSON files of at most {limit} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise NpquantError(f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise NpquantError(f"{path} nests JSON arrays or objects too deeply to read") from None
    except ValueError as exc:  # json.JSONDecodeError, and integers too long to convert
        raise NpquantError(f"{path} is not valid JSON: {exc}") from None


def json_kind(value) -> str:
    """What a JSON value is, for messages: ``a list``, ``a string``, ``a number``..."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _refuse_gguf(path: Path) -> None:
    if path.suffix.lower() == ".gguf":
        raise NpquantError(f"{path} is a GGUF file (llama.cpp's format), not a safetensors checkpoint: convert it "
                           f"first with 'npquant convert {path} -o DIR' (or npquant.checkpoints.convert.convert_gguf) "
                           f"and give DIR")


def _read_index(path: Path) -> dict:
    """``model.safetensors.index.json``: a non-empty ``weight_map`` of tensor name -> shard file name."""
    index = read_json(path)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise NpquantError(f"{path} has no 'weight_map' object")
    weight_map = index["weight_map"]
    if not weight_map:
        raise NpquantError(f"{path}: weight_map is empty; an index maps every tensor to its shard file")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise NpquantError(f"{path}: weight_map[{name!r}] must be a shard file name (a string), "
                               f"got {json_kind(shard)}")
        if shard in ("", ".", "..") or "/" in shard or "\\" in shard:
            raise NpquantError(f"{path}: weight_map[{name!r}] = {shard!r} is not a file name in {path.parent}")
        _refuse_pickle(path.parent / shard)
        if not shard.endswith(".safetensors"):
            raise NpquantError(f"{path}: weight_map[{name!r}] = {shard!r} is not a .safetensors file")
    if not isinstance(index.get("metadata", {}), dict):
        raise NpquantError(f"{path}: metadata must be an object, got {json_kind(index['metadata'])}")
    return index


def _file_kind(mode: int) -> str:
    """What a file that is not a regular one is, for messages."""
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "not a regular file"


# --- writing -----------------------------------------------------------------------
@dataclass(frozen=True)
class TensorPlan:
    """A tensor to write: its name, numpy dtype and shape, known before its data."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_safetensors(
    path: Path, plans: list[TensorPlan], arrays: Iterable[dict], metadata: dict | None = None
) -> int:
    """Write a safetensors file whose tensors are planned first and produced later.

    Parameters
    ----------
    path : where to write (the caller makes it atomic)
    plans : every tensor, in file order, with its dtype and shape
    arrays : dicts ``{name: array or TensorSource}`` covering the plans in
        order; each dict is written and dropped before the next one is
        drawn, so memory stays at one dict (a TensorSource is copied in row
        chunks, never whole)
    metadata : str -> str ``__metadata__``

    Returns
    -------
    int : bytes of tensor data written

    A failed write (disk full, file size limit, permissions) raises
    :class:`NpquantError` naming ``path`` and the reason, from the OSError
    (whose ``filename`` is ``path``); the partial file is left for the
    caller, who writes into a temporary directory and removes it.
    """
    try:
        return _write_safetensors(path, plans, arrays, metadata)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise NpquantError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _write_safetensors(path: Path, plans: list[TensorPlan], arrays: Iterable[dict], metadata: dict | None) -> int:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for plan in plans:
        header[plan.name] = {
            "dtype": dtype_code(plan.dtype),
            "shape": list(plan.shape),
            "data_offsets": [offset, offset + plan.nbytes],
        }
        offset += plan.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes
    pending = list(reversed(plans))
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for group in arrays:
            while group:
                if not pending:
                    raise NpquantError(f"internal: {path.name} got more tensors than planned")
                plan = pending.pop()
                arr = group.pop(plan.name, None)
                if arr is None:
                    raise NpquantError(f"internal: {path.name} expected {plan.name} next")
                if np.dtype(arr.dtype) != plan.dtype or tuple(arr.shape) != tuple(plan.shape):
                    raise NpquantError(
                        f"internal: {plan.name} is {arr.dtype} {arr.shape}, planned {plan.dtype} {plan.shape}"
                    )
                _write_array(f, arr)
                del arr
    if pending:
        raise NpquantError(f"internal: {path.name} is missing {pending[-1].name}")
    return offset


def _write_array(f, arr) -> None:
    """Write an array's raw little-endian bytes; a TensorSource's straight from its file."""
    if isinstance(arr, TensorSource):
        f.flush()
        with open(arr.file, "rb") as src:
            _copy_range(src, f, arr.offset, arr.nbytes)
        return
    if arr.dtype.byteorder == ">":
        arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
    f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)


def _copy_range(src, dst, offset: int, count: int) -> None:
    """Copy ``count`` bytes of ``src`` from ``offset`` to ``dst``'s position, in the kernel where it can."""
    copy = getattr(os, "copy_file_range", None)
    if copy is not None:
        try:
            while count:
                n = copy(src.fileno(), dst.fileno(), count, offset)
                if n == 0:
                    raise NpquantError(f"{src.name} ended early: truncated while being read?")
                offset += n
                count -= n
            return
        except OSError as exc:
            if exc.errno not in _NO_COPY_FILE_RANGE:
                raise  # disk full, file too large, I/O error: the write failed, reading would not help
            # not on this filesystem (or between these two): fall back to reading
    src.seek(offset)
    while count:
        try:
            block = src.read(min(count, 16 << 20))
        except OSError as exc:
            raise NpquantError(f"cannot read {src.name}: {exc.strerror or exc}") from None
        if not block:
            raise NpquantError(f"{src.name} ended early: truncated while being read?")
        dst.write(block)
        count -= len(block)


# copy_file_range's errors that mean "not here", where reading and writing still work.
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EBADF,
                       errno.EPERM, errno.ETXTBSY}


_NUMPY_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_ITEMSIZE = {code: (2 if code == "BF16" else 1 if code.startswith("F8") else np.dtype(n).itemsize)
             for code, n in {**_NUMPY_DTYPES, **dict.fromkeys(_ML_DTYPES)}.items()}
