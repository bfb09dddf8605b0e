"""LLVM-level helpers of the kernels: bit casts, stack arrays and an atomic work counter."""

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def _f16_bits_to_f32(typingctx, h):
    """The float32 value of the float16 whose bit pattern is the int16 ``h``.

    An LLVM bitcast to half and an fpext, which x86 vectorises to
    vcvtph2ps: exact for every float16, subnormals included.
    """
    if h != types.int16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _stack_empty(typingctx, n0, n1, dtype):
    """An uninitialised C-contiguous ``(n0, n1)`` array on the calling thread's stack.

    ``n0`` and ``n1`` are compile-time constants. LLVM, seeing memory that
    nothing else can reach, keeps the lane accumulators of
    :func:`gemv_int4_blocks` in registers instead of storing them after
    every column, as it does for ``np.empty`` (whose memory could alias the
    codes). Measured with codes in cache (2048 x 4096, medians of 30
    interleaved rounds): 0.210 -> 0.202 ms. The small-M kernels measured no
    faster this way and keep ``np.empty``. The array lives until the
    function returns: it must not escape it.
    """
    if not (isinstance(n0, types.IntegerLiteral) and isinstance(n1, types.IntegerLiteral)):
        return None
    dt = dtype.dtype if isinstance(dtype, types.DTypeSpec) else dtype.instance_type
    arrty = types.Array(dt, 2, "C")
    dims = (n0.literal_value, n1.literal_value)

    def codegen(context, builder, signature, args):
        ety = context.get_data_type(dt)
        itemsize = context.get_abi_sizeof(ety)
        ptr = cgutils.alloca_once(builder, ety, size=dims[0] * dims[1])  # in the entry block: once per call

        def intp(v):
            return context.get_constant(types.intp, v)

        ary = context.make_array(arrty)(context, builder)
        context.populate_array(ary, data=ptr, shape=[intp(dims[0]), intp(dims[1])],
                               strides=[intp(dims[1] * itemsize), intp(itemsize)],
                               itemsize=intp(itemsize), meminfo=None)
        return ary._getvalue()

    return arrty(n0, n1, dtype), codegen


@intrinsic
def _i32_bits_to_f32(typingctx, v):
    """The float32 whose bit pattern is the int32 ``v`` (an LLVM bitcast: no instruction)."""
    if v != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen



@intrinsic
def _fetch_add(typingctx, counter):
    """``counter[0] += 1`` as one atomic read-modify-write; returns the value before (int64).

    ``counter`` is an int64 array shared by the threads of one call: each
    takes the next chunk of work from it (see :func:`_claim`).
    """
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [context.get_constant(types.intp, 0)])
        return builder.atomic_rmw("add", ptr, context.get_constant(types.int64, 1), "monotonic")

    return types.int64(counter), codegen


@njit(inline="always")
def _claim(work, per, n):
    """``(lo, hi)``: the next chunk of ``per`` units of ``[0, n)`` for this thread; ``lo >= hi`` when none is left.

    Every thread of a call (:mod:`npquant.kernels._pool`) runs the same
    kernel and takes chunks from the shared counter ``work`` until none is
    left, so a thread the OS runs slower takes fewer. A ``work`` of three
    entries is one thread's own: its counter, then the units ``[first,
    end)`` it takes alone (:func:`npquant.kernels._jobs._own_units`).
    """
    if work.shape[0] == 3:
        lo = work[1] + _fetch_add(work) * per
        return lo, min(lo + per, work[2], n)
    lo = _fetch_add(work) * per
    return lo, min(lo + per, n)


@intrinsic
def _address_as(typingctx, address, dtype):
    """The int64 ``address`` as a pointer to ``dtype`` (an LLVM inttoptr), for ``numba.carray``."""
    if address != types.int64:
        return None
    target = dtype.dtype if isinstance(dtype, types.DTypeSpec) else dtype.instance_type
    ptrty = types.CPointer(target)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptrty))

    return ptrty(address, dtype), codegen


@intrinsic
def _i64_bits_to_f64(typingctx, v):
    """The float64 whose bit pattern is the int64 ``v`` (an LLVM bitcast)."""
    if v != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


#: Bytes ahead of the line a batch-1 kernel over the checkpoint layout reads at which it asks for the codes it will
#: read next (:func:`_prefetch_l2`): one pass of eight 4 KiB rows (see :func:`npquant.kernels._gemv.gemv_bytes`).
PREFETCH_AHEAD = 32 * 1024
#: Byte positions of a block of rows (the prepared layout: 64 rows a position, 4 KiB for one-byte codes) ahead of
#: the one a kernel reads at which it asks for the line it will read then.
AHEAD_COLUMNS = 64
#: Codes from this many bytes on are prefetched by the checkpoint-layout kernels; smaller ones are likely in cache,
#: where prefetching only costs.
PREFETCH_FROM = 8 << 20


def prefetch_call(builder, address, locality: int) -> None:
    """Emit ``llvm.prefetch`` (a read) of the line holding the ``i8*`` ``address``: ``locality`` 3 into L1, 2 into L2."""
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0i8")
    builder.call(fn, [builder.bitcast(address, i8p), ir.Constant(i32, 0), ir.Constant(i32, locality),
                      ir.Constant(i32, 1)])


def _prefetch_intrinsic(name: str, locality: int, doc: str):
    def prefetch(typingctx, ary, offset):
        if not (isinstance(ary, types.Array) and ary.layout == "C" and isinstance(offset, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            where = builder.gep(data, [context.cast(builder, args[1], signature.args[1], types.intp)])
            prefetch_call(builder, where, locality)
            return context.get_dummy_value()

        return types.void(ary, offset), codegen

    prefetch.__name__ = prefetch.__qualname__ = name
    prefetch.__doc__ = doc
    return intrinsic(prefetch)


_prefetch = _prefetch_intrinsic("_prefetch", 3, """Ask the CPU to fetch the cache line holding element ``offset`` of ``ary``'s data
    (C-contiguous, flat) into L1.

    A hint: no bounds check and no fault (an offset past the end fetches a
    line never read, or nothing). For streams the hardware prefetcher
    ramps up on too late: many short rows, or two threads sharing memory.
    """)

_prefetch_l2 = _prefetch_intrinsic("_prefetch_l2", 2, """As :func:`_prefetch`, into L2 (``prefetcht1``): for lines read a while later,
    which in L1 would push out what is read now (``x``).""")


@intrinsic
def _blas_level1_thread(typingctx, fn, mode, threads, n, alpha, block, job, parts, unit):
    """``blas_level1_thread(mode, threads, n, parts, alpha, block, 0, NULL, 1, NULL, unit, job, threads)`` of
    OpenBLAS.

    Every argument an int64: ``fn``, ``alpha``, ``block`` and ``job`` are
    addresses (see :mod:`npquant.kernels._blas_threads`). Each thread's
    routine gets ``k = parts`` and ``ldc = unit`` as given and, ``b`` being
    NULL with ``ldb`` 1, ``b = position * unit``, when ``unit`` is the
    stride the probe measured: how a job knows its place in OpenBLAS's order
    of threads (the caller's thread first, as in its GEMM). Called from
    compiled code, where a call through ctypes costs tens of microseconds
    when a model's work has left the interpreter out of cache.
    """
    if not all(isinstance(a, types.Integer) for a in (fn, mode, threads, n, alpha, block, job, parts, unit)):
        return None

    def codegen(context, builder, signature, args):
        i32, i64, ptr = ir.IntType(32), ir.IntType(64), ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(i32, [i32, i64, i64, i64, ptr, ptr, i64, ptr, i64, ptr, i64, ptr, i32])
        f_addr, mode_, n_threads, n_entries, alpha_addr, block_addr, job_addr, parts_, unit_ = (
            context.cast(builder, a, t, types.int64) for a, t in zip(args, signature.args))
        zero, one, null = ir.Constant(i64, 0), ir.Constant(i64, 1), ir.Constant(ptr, None)
        return builder.call(builder.inttoptr(f_addr, fnty.as_pointer()), [
            builder.trunc(mode_, i32), n_threads, n_entries, parts_, builder.inttoptr(alpha_addr, ptr),
            builder.inttoptr(block_addr, ptr), zero, null, one, null, unit_, builder.inttoptr(job_addr, ptr),
            builder.trunc(n_threads, i32)])

    return types.int32(fn, mode, threads, n, alpha, block, job, parts, unit), codegen


@intrinsic
def _call_int_function(typingctx, fn):
    """The ``int`` that the C function without arguments at address ``fn`` (an int64) returns, as an int64."""
    if not isinstance(fn, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        f = builder.inttoptr(context.cast(builder, args[0], signature.args[0], types.int64),
                             ir.FunctionType(i32, []).as_pointer())
        return builder.sext(builder.call(f, []), ir.IntType(64))

    return types.int64(fn), codegen


@intrinsic
def _getenv(typingctx, name):
    """The address of the C environment's value for the NUL-terminated uint8 ``name`` (C ``getenv``), 0 if unset.

    ``os.environ``'s changes reach the C environment (it calls ``putenv``
    and ``unsetenv``), so this reads what Python sees.
    """
    if not (isinstance(name, types.Array) and name.dtype == types.uint8):
        return None

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i8p, [i8p]), "getenv")
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(builder.call(fn, [builder.bitcast(data, i8p)]), ir.IntType(64))

    return types.int64(name), codegen


@intrinsic
def _sched_getaffinity(typingctx, mask):
    """Linux's ``sched_getaffinity(0, sizeof mask, mask)`` into the uint64 array ``mask``: 0 on success, else -1."""
    if not (isinstance(mask, types.Array) and mask.dtype == types.uint64 and mask.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        i8p, i32, i64 = ir.IntType(8).as_pointer(), ir.IntType(32), ir.IntType(64)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [i32, i64, i8p]),
                                            "sched_getaffinity")
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        n_bytes = builder.mul(ary.nitems, ir.Constant(i64, 8))
        return builder.sext(builder.call(fn, [ir.Constant(i32, 0), n_bytes, builder.bitcast(ary.data, i8p)]), i64)

    return types.int64(mask), codegen
