"""Fused RGP update mask: CURE's per-tensor percentile mask in a constant number of launches.

Motivation
----------
CURE (Algorithm 1, line 20) zeroes, in every masked tensor, the gradient entries whose RGP score
(Eq. 6) lies below the tensor's p-th percentile. The official code does this with a device-to-host
copy and `np.percentile` per tensor; eager PyTorch (`robust_ft.rgp_mask_`) stays on the device but
makes about a dozen launches per tensor and selects with `torch.kthvalue`, which walks each slice
with one thread block in 16 passes of 2-bit digits. Here every masked tensor of the model is handled at once:

    memset(hist) -> 4 x _rgp_hist_kernel (one 8-bit digit each) -> _rgp_mask_kernel

Six launches per call however many tensors there are, no sort, no host synchronisation (so the
call can be captured in a CUDA graph). Each pass recomputes the score from g_nat and g_score (no
scratch buffer), histograms one 8-bit digit of its int32 order key per tensor (a segmented MSD
radix select; NaN canonicalised to the largest key), and the last pass zeroes the gradient. The
score is computed as the plain path computes it (float32, each product and the sum rounded
separately: `enable_fp_fusion=False`, no FMA), so the mask is bit-identical to
`robust_ft.rgp_mask_`.

Each program covers one chunk of up to CHUNK_SIZE = 16,384 elements of one tensor, in 8 blocks of
BLOCK_SIZE = 2,048, and skips the blocks that lie wholly past the tensor's end: a tensor smaller
than a block costs one block per pass, not eight (this saves masked-out lanes only; the bytes below
are unchanged).

Launches and traffic per step
-----------------------------
Masked tensors: every weight with ndim >= 2 (ResNet-18: 21 tensors, 11.2M entries; WRN-34-10: 35
tensors, 46.1M).

    path                          launches per step             bytes/elem (fp32)   host syncs
    official (np.percentile)      ~6 per tensor + a copy of     44 + 4 to the host  2 per tensor
                                  every score to the host       + the mask back
    plain rgp_mask_ (device)      ~12 per tensor (score 5,      ~145 (kthvalue:     0
                                  key 3, kthvalue, compare,     16 passes of
                                  fill): ~250 for ResNet-18     2-bit digits)
    fused_rgp_mask_               6 in all (memset, 4 histogram 44; floor 12        0
                                  passes, 1 mask pass)

Traffic model (estimates from the design, NOT measurements): each of the 5 data passes reads g_nat
and g_score (8 B); the mask pass writes a zero into the gradient where the mask holds (at most 4 B;
counted in full, since a scattered 30% store still touches nearly every 32-byte sector):

    bytes/elem = 5 * 8 + 4 = 44        (the floor, read g_nat and g_score once, write once: 12)

The histograms (4 x segments x 256 int32) and the tables stay in L2 and are not counted.
Ideal time at an H100's 3.35 TB/s of HBM bandwidth:

    model       params        fused (44 B/elem)        floor (12 B/elem)
    ResNet-18   11,173,962    491.7 MB -> 0.147 ms     134.1 MB -> 0.040 ms
    WRN-34-10   46,160,474    2031.1 MB -> 0.606 ms    553.9 MB -> 0.165 ms

Writing the key once in the first pass and reading 4 B in the later ones would bring this to about
32 B/elem; recomputing keeps the kernels free of scratch memory and is within 1.4x of that.
`python run.py bench mask` and `bench report` measure the real times, GB/s and fraction of peak on
the device they are given.

Compiled kernels (`compile_report()`, Triton 3.9.0, 8 warps; registers per thread and static shared
memory from `cuobjdump -res-usage`, dynamic shared memory from Triton's metadata; the 1,024 static
bytes on sm_90 are what ptxas reserves there):

    kernel                      registers      shared static / dynamic       fp32 FMA
                                sm_80 / sm_90  sm_80          | sm_90
    _rgp_hist_kernel, PASS 0    40 / 48        0 / 1,024 B    | 1,024 / 1,024 B    none
    _rgp_hist_kernel, PASS 1-3  54-55 / 58-59  0 / 1,024 B    | 1,024 / 1,024 B    none
    _rgp_mask_kernel            74 / 73        0 / 32 B       | 1,024 / 32 B       none

What is verified without a GPU (in the test suite)
--------------------------------------------------
- Bit-exactness against `robust_ft.rgp_mask_` under Triton's interpreter (which runs programs one
  after another: no real concurrency, no hardware atomics) on awkward sizes (around the block and
  the chunk), ties, constants, NaN and inf, alpha 0 and 1, fp16/bf16 and mixed dtypes and
  non-contiguous views, with every Triton from 3.2 to 3.9; 3 and 40 tensors both take 6 launches.
- Compilation of the five launched kernels for sm_80 and sm_90 with Triton's own ptxas, in a child
  process without the interpreter; their PTX holds no `fma.rn.f32` (the same kernel compiled with
  FP fusion on does, so the check can fail).
- channels_last gradients (any dense layout whose three tensors share strides) go through as flat
  buffers, without copies: 6 launches, bit-identical.
- The runtime self-check: `CheckedFusedMask` (what `run.py` uses on CUDA) checks the first fused
  call for each tensor layout against `rgp_mask_` on copies of its inputs; a mismatch prints one
  line (tensor, entries that differ), keeps the plain result and switches the run to the plain
  path. `metrics.json` records `mask_path` (tested with a deliberately broken kernel).
What is only estimated until `python run.py bench gpu` runs on a card: every GPU time above.

Dispatch: on CUDA tensors the Triton kernels run compiled; on CPU tensors they run under the Triton
interpreter when `TRITON_INTERPRET=1` (Triton reads it when a kernel is decorated, so set it before
importing this module; that is how the tests exercise the kernels without a GPU). Everything else
(no Triton, other dtypes, tensors of 2**31 elements or more) goes to `robust_ft.rgp_mask_`, so
`import kernels` works without Triton.
"""
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
import torch

import robust_ft

try:
    import triton
    import triton.language as tl
    _jit = triton.jit
except ImportError:  # the dispatcher then always takes the plain path and no kernel is ever called
    triton = None
    tl = types.SimpleNamespace(constexpr=None)   # only so that the kernel signatures below evaluate
    _jit = lambda fn: fn  # noqa: E731

# Elements one program covers (CHUNK_SIZE) and handles per loop step (BLOCK_SIZE). A chunk never
# spans two tensors, so small tensors get one masked program each. Chosen from the traffic model
# below, not tuned on a GPU.
BLOCK_SIZE = 2048
CHUNK_SIZE = 16384
# The select uses 8-bit digits: 4 passes over a 32-bit key, 256 bins (tl.histogram lowers to one
# warp ballot per bit of the bin index, so 256 is the practical size). The kernels write these
# numbers as literals because Triton only reads tl.constexpr globals; the host uses the names.
NUM_PASSES = 4
NUM_BINS = 256

# Segment table row, one per masked tensor (int64): n, k, data_ptr() of g, g_nat, g_score, and their
# dtype codes below, on which the kernels branch to load and store (columns 0..7).
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# Kernel launches made by the fused path since import (the memset counts as one). Tests compare the
# difference across a call: it is the same for 3 tensors as for 40.
LAUNCHES = 0


# =============================================================================
# Plain reference
# =============================================================================
# `robust_ft.rgp_mask_` is the specification in code. Its traffic per element and tensor (fp32):
# score: abs, mul_, abs, mul_, add_ -> read 24 B, write 20 B; key: isnan, full_like, where -> read
# 13 B, write 9 B; kthvalue: 16 radix passes of 2 bits -> read >= 64 B, in one thread block per
# tensor; mask: compare, masked_fill_ -> read 9 B, write 5 B. About 145 B/elem and a dozen launches
# per tensor, i.e. hundreds of launches per step.


# =============================================================================
# Kernels
# =============================================================================

@_jit
def _rgp_load_f32(addr, code, offs, mask):
    """Load a block of a float32 (code 0), float16 (1) or bfloat16 (2) tensor as float32.

    `addr` is the tensor's data_ptr() read from the segment table; the widening is exact.
    """
    if code == 0:
        x = tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    elif code == 1:
        x = tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(addr.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@_jit
def _rgp_store_zero(addr, code, offs, mask):
    """Write +0 into a float32/float16/bfloat16 tensor where `mask` holds (masked_fill_(..., 0))."""
    if code == 0:
        tl.store(addr.to(tl.pointer_type(tl.float32)) + offs, 0.0, mask=mask)
    elif code == 1:
        tl.store(addr.to(tl.pointer_type(tl.float16)) + offs, 0.0, mask=mask)
    else:
        tl.store(addr.to(tl.pointer_type(tl.bfloat16)) + offs, 0.0, mask=mask)


@_jit
def _rgp_score_key(seg_ptr, seg, offs, mask, a, b):
    """int32 order key of the RGP score (Eq. 6), s = a * |g_nat| + b * |g_score| in float32.

    The launch passes enable_fp_fusion=False, so the two products and the sum are rounded
    separately, as in `robust_ft.rgp_score`. Non-negative floats order like their int32 bits; the
    sign bit is cleared (-0 -> +0) and NaN becomes 0x7FFFFFFF, above +inf, as in
    `robust_ft.score_key` (NaN bits come out with either sign).
    """
    # the interpreter types a Python float below 2**-126 as float64: pin the coefficients to fp32
    a = tl.full([], a, tl.float32)
    b = tl.full([], b, tl.float32)
    row = seg_ptr + seg * 8
    g_nat = _rgp_load_f32(tl.load(row + 3), tl.load(row + 6), offs, mask)
    g_score = _rgp_load_f32(tl.load(row + 4), tl.load(row + 7), offs, mask)
    s = a * tl.abs(g_nat) + b * tl.abs(g_score)
    bits = s.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.where(s != s, 0x7FFFFFFF, bits)


@_jit
def _rgp_descend(hist_ptr, seg, num_segs, k, DEPTH: tl.constexpr):
    """Follow ascending rank k down the first DEPTH digit histograms of segment `seg`.

    Returns (prefix, k_left): the top DEPTH digits of the rank-k key, and k_left, the rank that key
    still has among the keys sharing that prefix. With DEPTH = 4 the prefix is the threshold tau of `robust_ft.rgp_mask_`.
    Every program recomputes this from the (L2-resident) histograms instead of a separate select
    kernel, which is what keeps the launch count constant.
    """
    bins = tl.arange(0, 256)
    prefix = tl.full([], 0, tl.int32)
    k_left = k
    for d in tl.static_range(DEPTH):
        h = tl.load(hist_ptr + (d * num_segs + seg) * 256 + bins)  # (256,) int32 counts
        # the digit is the first bin whose inclusive count exceeds k_left; the clamp only matters
        # for k = n segments, whose histograms stay empty and whose threshold is never used
        digit = tl.minimum(tl.sum((tl.cumsum(h, 0) <= k_left).to(tl.int32), 0), 255)
        k_left = k_left - tl.sum(tl.where(bins < digit, h, 0), 0)
        # keys are non-negative, so for k < n the top digit is < 128 and the shift cannot overflow
        prefix = (prefix << 8) | digit
    return prefix, k_left


@_jit
def _rgp_hist_kernel(chunk_ptr,   # int64 (C, 2): per program its segment and first element
                     seg_ptr,     # int64 (S, 8): n, k, addresses of g, g_nat, g_score, dtype codes
                     hist_ptr,    # int32 (4, S, 256): digit histograms, zeroed before pass 0
                     num_segs,    # S, number of segments (tensors with 0 < k)
                     a, b,        # float32(alpha), float32(1 - alpha)
                     PASS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Pass PASS of the radix select: count digit PASS of the keys that share the rank-k prefix."""
    pid = tl.program_id(0)
    seg = tl.load(chunk_ptr + 2 * pid)
    start = tl.load(chunk_ptr + 2 * pid + 1)
    n = tl.load(seg_ptr + seg * 8)
    k = tl.load(seg_ptr + seg * 8 + 1)
    prefix, k_left = _rgp_descend(hist_ptr, seg, num_segs, k, PASS)
    # a k = n segment is zeroed whole by the mask pass and needs no threshold: read nothing
    end = tl.where(k < n, tl.minimum(start + CHUNK, n), start)
    acc = tl.zeros([256], dtype=tl.int32)
    unselected = tl.zeros([], dtype=tl.int32)
    # a fixed trip count (the lanes past `end` are masked): the interpreters of triton 3.2 and
    # older cannot take a tensor-valued range() under NumPy 2, and the compiled loop needs no bound
    # from memory. Blocks wholly past `end` add nothing and are skipped: the branch is uniform
    # across the program, and small tensors (one block of eight) then cost one block, not eight.
    for i in range(0, CHUNK, BLOCK):
        if start + i < end:
            offs = start + i + tl.arange(0, BLOCK)  # int64: tensors may exceed 2**31 bytes
            inb = offs < end
            key = _rgp_score_key(seg_ptr, seg, offs, inb, a, b)
            selected = inb
            if PASS > 0:
                selected = selected & ((key >> (32 - 8 * PASS)) == prefix)
            # digits masked to [0, 256): the interpreter's histogram drops out-of-range values
            digit = (key >> (24 - 8 * PASS)) & 255
            # tl.histogram takes no mask before Triton 3.2: count the unselected lanes in bin 0 and
            # take them out again below (exact, one reduction per block)
            acc += tl.histogram(tl.where(selected, digit, 0), 256)
            unselected += BLOCK - tl.sum(selected.to(tl.int32), 0)
    bins = tl.arange(0, 256)
    acc -= tl.where(bins == 0, unselected, 0)
    tl.atomic_add(hist_ptr + (PASS * num_segs + seg) * 256 + bins, acc, mask=acc > 0)


@_jit
def _rgp_mask_kernel(chunk_ptr,   # int64 (C, 2): per program its segment and first element
                     seg_ptr,     # int64 (S, 8): n, k, addresses of g, g_nat, g_score, dtype codes
                     hist_ptr,    # int32 (4, S, 256): the four filled digit histograms
                     num_segs,    # S, number of segments
                     a, b,        # float32(alpha), float32(1 - alpha)
                     CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """The rule of `robust_ft.rgp_mask_`: zero g where key < tau (strict, ties kept); zero all of g when k = n."""
    pid = tl.program_id(0)
    seg = tl.load(chunk_ptr + 2 * pid)
    start = tl.load(chunk_ptr + 2 * pid + 1)
    n = tl.load(seg_ptr + seg * 8)
    k = tl.load(seg_ptr + seg * 8 + 1)
    g_addr = tl.load(seg_ptr + seg * 8 + 2)
    g_code = tl.load(seg_ptr + seg * 8 + 5)
    threshold, _ = _rgp_descend(hist_ptr, seg, num_segs, k, 4)
    end = tl.minimum(start + CHUNK, n)
    # Every predicate is a block comparison of offsets against a scalar bound: a scalar boolean
    # mixed into a block mask gets no portable dtype (Triton 3.9's interpreter rejects it).
    score_end = tl.where(k < n, end, start)    # a k = n segment reads no score ...
    zero_end = tl.where(k == n, end, start)    # ... and is zeroed whole
    for i in range(0, CHUNK, BLOCK):    # fixed trip count, empty blocks skipped, as in the histogram pass
        if start + i < end:
            offs = start + i + tl.arange(0, BLOCK)
            key = _rgp_score_key(seg_ptr, seg, offs, offs < score_end, a, b)
            _rgp_store_zero(g_addr, g_code, offs, (offs < end) & ((key < threshold) | (offs < zero_end)))


# =============================================================================
# Launcher
# =============================================================================

_TABLE_CACHE = {}     # key -> (table, hist, num_segs, num_chunks); a pure function of its key
_TABLE_CACHE_SIZE = 8


def _rgp_tables(segments, percentile, device):
    """Segment and chunk tables of one call, built from shapes and pointers only, cached.

    segments: (g, g_nat, g_score) contiguous triples, each with 0 < k. Returns
    (table, hist, num_segs, num_chunks): `table` is one int64 device tensor holding the segment
    table (S, 8) followed by the chunk table (C, 2); `hist` is the int32 (4, S, 256) buffer.
    A cache miss costs one host-to-device copy, from pinned memory on CUDA so the host does not wait.
    """
    rows = []
    for g, g_nat, g_score in segments:
        n = g.numel()
        rows.append((n, robust_ft.rgp_k(n, percentile), g.data_ptr(), g_nat.data_ptr(),
                     g_score.data_ptr(), _DTYPE_CODES[g.dtype], _DTYPE_CODES[g_nat.dtype],
                     _DTYPE_CODES[g_score.dtype]))
    key = (str(device), CHUNK_SIZE, tuple(rows))
    if key in _TABLE_CACHE:
        return _TABLE_CACHE[key]
    chunks = [(seg, start) for seg, row in enumerate(rows) for start in range(0, row[0], CHUNK_SIZE)]
    host = torch.tensor([v for row in rows for v in row] + [v for c in chunks for v in c],
                        dtype=torch.int64)
    if device.type == "cuda":
        table = host.pin_memory().to(device, non_blocking=True)
    else:
        table = host
    hist = torch.empty((NUM_PASSES, len(rows), NUM_BINS), dtype=torch.int32, device=device)
    if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
        _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))   # the oldest entry
    _TABLE_CACHE[key] = (table, hist, len(rows), len(chunks))
    return _TABLE_CACHE[key]


@torch.no_grad()
def _launch_rgp_mask(grads, grads_nat, grads_score, alpha, percentile):
    """Run the six launches on tensors already checked by `robust_ft.check_rgp_args`.

    Tensors with k = 0 (this includes empty ones) are left out. A triple whose tensors share
    their strides and fill their memory densely (contiguous, channels_last, any dense permutation)
    is read as a flat buffer in memory order: a per-tensor percentile does not depend on the order
    of the elements, so no copy is needed. Any other triple is copied to contiguous tensors, and
    the gradient masked in its copy is copied back: those copies (counted in LAUNCHES) are the
    only launches that depend on the number of tensors.
    """
    global LAUNCHES
    a, b = robust_ft.rgp_coefficients(alpha)
    segments, copy_back = [], []
    for g, g_nat, g_score in zip(grads, grads_nat, grads_score):
        if robust_ft.rgp_k(g.numel(), percentile) == 0:
            continue
        if g.stride() == g_nat.stride() == g_score.stride() and dense_layout(g):
            segments.append((g, g_nat, g_score))          # the usual case: no copy
            continue
        triple = [t.contiguous() for t in (g, g_nat, g_score)]
        LAUNCHES += sum(not t.is_contiguous() for t in (g, g_nat, g_score))
        if not g.is_contiguous():
            copy_back.append((g, triple[0]))
        segments.append(tuple(triple))
    if not segments:
        return
    device = segments[0][0].device
    table, hist, num_segs, num_chunks = _rgp_tables(segments, percentile, device)
    seg_table, chunk_table = table[:8 * num_segs], table[8 * num_segs:]
    grid = (num_chunks,)

    hist.zero_()
    LAUNCHES += 1
    for pass_ in range(NUM_PASSES):
        _rgp_hist_kernel[grid](chunk_table, seg_table, hist, num_segs, a, b,
                               PASS=pass_, CHUNK=CHUNK_SIZE, BLOCK=BLOCK_SIZE,
                               num_warps=8, enable_fp_fusion=False)
        LAUNCHES += 1
    _rgp_mask_kernel[grid](chunk_table, seg_table, hist, num_segs, a, b,
                           CHUNK=CHUNK_SIZE, BLOCK=BLOCK_SIZE,
                           num_warps=8, enable_fp_fusion=False)
    LAUNCHES += 1
    for g, work in copy_back:
        g.copy_(work)
        LAUNCHES += 1


def dense_layout(t):
    """True when t's elements fill the memory from t.data_ptr() densely with no overlap, in some
    order of its dimensions (contiguous, channels_last, ...): then they are t.numel() consecutive
    elements, and a flat kernel can read them in memory order."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


# =============================================================================
# Dispatcher
# =============================================================================

def _fused_path_applies(tensors):
    """True when the Triton kernels can run on these tensors (else the plain path runs)."""
    if triton is None or not tensors:
        return False
    device = tensors[0].device
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    # compiled kernels need CUDA; the interpreter dereferences the data_ptr() table on the host
    if device.type != ("cpu" if interpreting else "cuda"):
        return False
    return all(t.device == device and t.dtype in _DTYPE_CODES
               and t.numel() < 2 ** 31              # histogram counts are int32
               for t in tensors)


def fused_rgp_mask_(grads, grads_nat, grads_score, alpha, percentile):
    """RGP update mask (Eq. 6, Alg. 1 line 20), in place, for all tensors of a model at once.

    Same arguments, errors and results (bit for bit) as `robust_ft.rgp_mask_`: per tensor
    k = floor(p * n / 100), and the gradient is zeroed where the score's key is strictly below
    the key at ascending rank k (NaN above everything); k = 0 masks nothing, k = n masks all.
    Runs the Triton kernels on CUDA (or on CPU under TRITON_INTERPRET=1), else the plain path.
    Returns None.
    """
    robust_ft.check_rgp_args(grads, grads_nat, grads_score, alpha, percentile)
    if _fused_path_applies([*grads, *grads_nat, *grads_score]):
        _launch_rgp_mask(grads, grads_nat, grads_score, alpha, percentile)
    else:
        robust_ft.rgp_mask_(grads, grads_nat, grads_score, alpha, percentile)


def entries_differing(a, b):
    """How many entries of a and b differ (NaN equals NaN: a kept NaN gradient is no mismatch)."""
    return int(((a != b) & ~(a.isnan() & b.isnan())).sum())


class CheckedFusedMask:
    """`fused_rgp_mask_` that proves itself on the device it runs on, never silently wrong.

    The first fused call for each tensor layout (device, shapes, strides, dtypes, alpha, p) is
    also computed by `robust_ft.rgp_mask_` on copies of its inputs. If the two differ, one line
    names the tensor and the number of entries, the plain result is used, and every later call
    takes the plain path. `path` says what ran: "fused", "plain" (the fused path does not apply
    to these tensors) or "plain after a fused mismatch"; `mismatch` holds the details.
    The check costs one plain mask and one host sync per layout, once per process.
    """

    def __init__(self, log=None):
        self.path, self.mismatch, self.checked = None, None, set()
        self.log = log if log is not None else (lambda line: print(line, file=sys.stderr))

    def __call__(self, grads, grads_nat, grads_score, alpha, percentile):
        robust_ft.check_rgp_args(grads, grads_nat, grads_score, alpha, percentile)
        if self.mismatch is not None or not _fused_path_applies([*grads, *grads_nat, *grads_score]):
            robust_ft.rgp_mask_(grads, grads_nat, grads_score, alpha, percentile)
            self.path = self.path if self.mismatch is not None else "plain"
            return
        layout = (alpha, percentile, *((g.device, g.shape, g.stride(), g.dtype, gn.dtype, ga.dtype)
                                       for g, gn, ga in zip(grads, grads_nat, grads_score)))
        if layout in self.checked:
            _launch_rgp_mask(grads, grads_nat, grads_score, alpha, percentile)
            self.path = "fused"
            return
        reference = [[t.clone() for t in ts] for ts in (grads, grads_nat, grads_score)]
        robust_ft.rgp_mask_(*reference, alpha, percentile)
        _launch_rgp_mask(grads, grads_nat, grads_score, alpha, percentile)
        for i, (g, ref) in enumerate(zip(grads, reference[0])):
            differ = entries_differing(g, ref)
            if differ:
                self.mismatch = dict(tensor=i, shape=list(g.shape), entries=differ, numel=g.numel())
                self.path = "plain after a fused mismatch"
                self.log(f"kernels: the fused RGP mask differs from rgp_mask_ in tensor {i} "
                         f"{tuple(g.shape)} in {differ} of {g.numel()} entries; using the plain path from now on")
                for g_out, r in zip(grads, reference[0]):
                    g_out.copy_(r)
                return
        self.checked.add(layout)
        self.path = "fused"


# =============================================================================
# Ahead-of-time compilation (no GPU needed: Triton ships ptxas and cuobjdump)
# =============================================================================

# Argument types of both kernels (the constexprs are given per kernel below).
KERNEL_SIGNATURE = {"chunk_ptr": "*i64", "seg_ptr": "*i64", "hist_ptr": "*i32", "num_segs": "i32",
                    "a": "fp32", "b": "fp32"}


def launched_kernels():
    """The five kernels a call launches, as (name, jit function, constexprs): 4 passes, the mask."""
    size = dict(CHUNK=CHUNK_SIZE, BLOCK=BLOCK_SIZE)
    return ([(f"_rgp_hist_kernel[PASS={p}]", _rgp_hist_kernel, dict(PASS=p, **size)) for p in range(NUM_PASSES)]
            + [("_rgp_mask_kernel", _rgp_mask_kernel, size)])


def compile_kernel(fn, constexprs, capability, num_warps=8, enable_fp_fusion=False):
    """triton.compile for CUDA sm_<capability>, launch options as `_launch_rgp_mask` uses them.

    Works with Triton before 3.3 (constexprs passed as `constants`) and after (as "constexpr"
    entries of the signature and `constexprs`). Needs the plain JIT function: under
    TRITON_INTERPRET=1 the kernels are interpreted functions that cannot be compiled.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if not hasattr(fn, "cache_key"):
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET=1): compile in a process without it")
    if "constexprs" in inspect.signature(ASTSource).parameters:
        source = ASTSource(fn, {**KERNEL_SIGNATURE, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    else:
        source = ASTSource(fn, dict(KERNEL_SIGNATURE), constants=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, enable_fp_fusion=enable_fp_fusion))


def resource_usage(cubin):
    """(registers per thread, static shared memory in bytes) of a cubin, read by Triton's cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(part.split(":") for part in out.split("Function", 1)[1].split() if ":" in part)
    return int(usage["REG"]), int(usage["SHARED"])


def compile_report(capabilities=(80, 90)):
    """Compile every launched kernel for each compute capability; per kernel and target: registers,
    static and dynamic shared memory, whether the PTX holds an fp32 FMA (it must not: the score is
    rounded after each operation), and the compile time."""
    report = {}
    for name, fn, constexprs in launched_kernels():
        for capability in capabilities:
            start = time.perf_counter()
            kernel = compile_kernel(fn, constexprs, capability)
            registers, shared_static = resource_usage(kernel.asm["cubin"])
            report[f"{name}@sm_{capability}"] = dict(
                registers=registers, shared_static_bytes=shared_static,
                shared_dynamic_bytes=kernel.metadata.shared, ptx_fma_f32="fma.rn.f32" in kernel.asm["ptx"],
                num_warps=kernel.metadata.num_warps, seconds=time.perf_counter() - start)
    return report


# =============================================================================
# Benchmark
# =============================================================================

def fused_traffic_bytes(grads, grads_nat, grads_score):
    """Bytes the fused path moves by the traffic model: 5 reads of g_nat and g_score, 1 write of g."""
    return sum(5 * (gn.numel() * gn.element_size() + ga.numel() * ga.element_size())
               + g.numel() * g.element_size() for g, gn, ga in zip(grads, grads_nat, grads_score))


@torch.no_grad()
def numpy_rgp_mask_(grads, grads_nat, grads_score, alpha, percentile):
    """The official CURE structure: per tensor the score to the host, `np.percentile`, mask back.

    For comparison only: np.percentile interpolates between ranks, so this mask can differ from
    the exact rank-k rule of `robust_ft.rgp_mask_` in a few entries per tensor.
    """
    for g, g_nat, g_score in zip(grads, grads_nat, grads_score):
        score = robust_ft.rgp_score(g_nat, g_score, alpha).cpu().numpy()   # host sync per tensor
        below = torch.from_numpy(score < np.percentile(score, percentile)).to(g.device)
        g.masked_fill_(below, 0)


def median_ms(fn, warmup, reps, sync):
    """Median wall time of fn() in milliseconds after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_mask_row(grads, grads_nat, grads_score, alpha=0.1, percentile=30.0, warmup=1, reps=3,
                   peak_bytes_per_s=3.35e12):
    """Time the plain, official-style (NumPy) and fused masks on one model's gradient lists.

    First checks on copies that the fused path (compiled on CUDA, interpreted on a CPU under
    TRITON_INTERPRET=1) gives the plain path's mask bit for bit ("bit_exact"; "fused_ran" says
    whether the kernels ran at all). Times are medians in ms of the mask in place on `grads`; the
    fused path is timed on CUDA only (the interpreter is no benchmark).
    """
    on_cuda = grads[0].device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    args = (grads, grads_nat, grads_score, alpha, percentile)
    plain, fused = [g.clone() for g in grads], [g.clone() for g in grads]
    robust_ft.rgp_mask_(plain, grads_nat, grads_score, alpha, percentile)
    fused_ran = _fused_path_applies([*fused, *grads_nat, *grads_score])
    fused_rgp_mask_(fused, grads_nat, grads_score, alpha, percentile)
    traffic = fused_traffic_bytes(grads, grads_nat, grads_score)
    row = {"n_tensors": len(grads), "n_elements": sum(g.numel() for g in grads), "fused_ran": fused_ran,
           "bit_exact": all(entries_differing(a, b) == 0 for a, b in zip(plain, fused)),
           "traffic_bytes": traffic, "ideal_ms": traffic / peak_bytes_per_s * 1e3,
           "plain_ms": median_ms(lambda: robust_ft.rgp_mask_(*args), warmup, reps, sync),
           "numpy_ms": median_ms(lambda: numpy_rgp_mask_(*args), warmup, reps, sync)}
    if on_cuda and fused_ran:
        fused_ms = median_ms(lambda: fused_rgp_mask_(*args), warmup, reps, sync)
        row.update(fused_ms=fused_ms, fused_gb_per_s=traffic / fused_ms / 1e6,
                   fused_fraction_of_peak=traffic / (fused_ms * 1e-3) / peak_bytes_per_s)
    else:
        row.update(fused_ms=None, fused_note="timed on a CUDA GPU only (with Triton)")
    return row


def bench_mask(shapes_by_model, percentile=30.0, alpha=0.1, warmup=1, reps=3, device=None,
               peak_bytes_per_s=3.35e12):
    """`bench_mask_row` on random gradients of the masked tensors' shapes of each model.

    shapes_by_model: {"resnet18": [(64, 3, 3, 3), ...], ...}, the shapes of the masked tensors.
    percentile, alpha: CURE's ResNet-18 CIFAR-10 setting (CURE, Table 9, row 1).
    peak_bytes_per_s: HBM bandwidth for the fraction of peak (H100 SXM: 3.35 TB/s).
    Returns {"device": name, "peak_bytes_per_s": ..., "models": {name: row}}, JSON-serialisable.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator(device=device).manual_seed(0)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "peak_bytes_per_s": peak_bytes_per_s, "models": {}}
    for name, shapes in shapes_by_model.items():
        grads, grads_nat, grads_score = ([torch.randn(s, generator=gen, device=device) for s in shapes]
                                       for _ in range(3))
        result["models"][name] = bench_mask_row(grads, grads_nat, grads_score, alpha, percentile, warmup, reps,
                                                peak_bytes_per_s)
        del grads, grads_nat, grads_score
    return result
