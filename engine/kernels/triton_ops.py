"""Triton implementations of the ops in reference.py (same names, signatures and semantics).

Each op is a @triton.jit kernel plus a thin wrapper that allocates the output, picks the
launch configuration and launches it. Everything accumulates in fp32 whatever the input
dtype. Shapes and conventions are those documented in reference.py:

  k_cache, v_cache : [NB, BS, KH, D]   block_tables : [S, max_blocks] int32
  slot_mapping     : [T] (-1 = skip)   context_lens : [S] int32

The kernels also run under TRITON_INTERPRET=1 on CPU tensors, which is how CI tests them;
the wrappers then pick small tiles so the tests exercise several tiles and partitions.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
try:   # programmatic dependent launch (the batch-1 products); a Triton without it never takes that path
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

from engine.kernels import reference

_LOG2E = 1.4426950408889634

# Decode split-K: contexts up to this length are never split (a single pass is about as
# fast as partials plus a reduce launch), and a partition never gets fewer tokens than
# _DECODE_MIN_PARTITION_TOKENS. On an H100 (bf16, KH=8, D=128, 512-token context,
# graph-replayed) batch 1 took 7.0 us with 64-token partitions against 10.5 us with 256.
_DECODE_MIN_SPLIT_CONTEXT = 256
_DECODE_MIN_PARTITION_TOKENS = 64
# Split-K aims at this many (sequence, KV head, partition) programs per SM: a decode program
# streams K/V with little else to hide memory latency behind, so it needs company. On an
# H100 (bf16, KH=8, D=128, CUDA-graph timing) 2 was within ~5% of the best of 1/2/4/8 for
# batch 1..256 and contexts 1k..32k, reaching 2.4-3.0 TB/s.
_DECODE_PROGRAMS_PER_SM = 2


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # Kernels take strides for the outer dims but assume unit stride on the innermost one.
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(device: torch.device) -> int:
    if device.type != "cuda":
        # Interpreter on CPU: pretend to be a tiny GPU so the heuristic still behaves sensibly.
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _pdl_supported_on(device_index: int) -> bool:
    # Programmatic dependent launch: Hopper and later, and a Triton whose launcher sets it.
    if torch.version.hip is not None or gdc_wait is None:
        return False
    from triton.backends.nvidia.compiler import CUDAOptions
    return (torch.cuda.get_device_capability(device_index) >= (9, 0)
            and "launch_pdl" in CUDAOptions.__dataclass_fields__)


def _pdl_supported(device: torch.device) -> bool:
    if device.type != "cuda":
        return False   # the interpreter has no grid dependencies
    return _pdl_supported_on(device.index if device.index is not None else torch.cuda.current_device())


# The small kernels (norms, activation, rotary + KV write, decode attention) as programmatic
# dependent launches too, where the GPU has them: each starts while the kernel ahead drains,
# waits for it before touching memory, and lets the next one launch once it has started.
PDL_KERNELS = False


def _pdl(device: torch.device) -> dict:
    """The launch arguments of a kernel that takes PDL: whether to wait, and the launch flag."""
    on = PDL_KERNELS and _pdl_supported(device)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def _grid_dependency(PDL: tl.constexpr):
    # Under a programmatic dependent launch: let the next kernel launch (once every program of
    # this one has got here), then wait until the kernel ahead has finished and its writes are
    # visible. Every program runs this before its first memory access, early exits included,
    # so that this kernel never finishes before the one ahead (the chain stays ordered).
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through tf32 on tensor cores (~1e-3 relative error),
    # which is not what someone asking for fp32 expects.
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_upcast(device: torch.device) -> bool:
    # Kernels only see CPU tensors under TRITON_INTERPRET, whose tl.dot multiplies the raw
    # uint16 bit patterns of bf16 operands (triton-lang/triton#11584); see _mma.
    return device.type != "cuda"


@triton.jit
def _mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation, working around the interpreter's bf16 dot."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


# --------------------------------------------------------------------------------------
# RMSNorm (optionally fused with the residual add)
# --------------------------------------------------------------------------------------

@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
                     stride_x, stride_res, stride_out, stride_res_out,
                     N, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    _grid_dependency(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        # The reference materialises x + residual in the residual's dtype and normalises
        # that rounded value, so round here too before using it.
        h = (h.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + offs, h, mask=mask)
    hf = h.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(hf * hf, axis=0) / N + eps)
    # HF casts the normalised activations back to the input dtype before the weight
    # multiply; doing the same keeps bf16 results bit-compatible with the reference.
    normed = (hf * inv_rms).to(h.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = (w * normed).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + offs, out, mask=mask)


def _norm_launch_config(n: int) -> tuple[int, int]:
    block = _next_pow2(n)
    return block, min(max(block // 512, 1), 16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    shape, n = x.shape, x.shape[-1]
    x2 = _last_dim_contiguous(x.reshape(-1, n))
    weight = weight.contiguous()
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    if x2.shape[0] == 0:
        return out.view(shape)
    block, warps = _norm_launch_config(n)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, x2, weight, out, out,
        x2.stride(0), 0, out.stride(0), 0,
        n, eps, HAS_RESIDUAL=False, BLOCK_N=block, num_warps=warps, **_pdl(x.device))
    return out.view(shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """residual += x; return (rms_norm(residual), residual). The fused pre-norm of a block.

    Like the reference, the updated residual is a new tensor (inputs are not modified).
    """
    shape, n = x.shape, x.shape[-1]
    x2 = _last_dim_contiguous(x.reshape(-1, n))
    r2 = _last_dim_contiguous(residual.reshape(-1, n))
    weight = weight.contiguous()
    res_dtype = torch.result_type(x, residual)
    res_out = torch.empty(x2.shape, dtype=res_dtype, device=x.device)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, res_dtype), device=x.device)
    if x2.shape[0] > 0:
        block, warps = _norm_launch_config(n)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, res_out,
            x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
            n, eps, HAS_RESIDUAL=True, BLOCK_N=block, num_warps=warps, **_pdl(x.device))
    return out.view(shape), res_out.view(shape)


# --------------------------------------------------------------------------------------
# SiLU(gate) * up
# --------------------------------------------------------------------------------------

@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, I, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _grid_dependency(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2*I] holding [gate | up] -> silu(gate) * up, [T, I]."""
    shape, two_i = x.shape, x.shape[-1]
    inter = two_i // 2
    x2 = _last_dim_contiguous(x.reshape(-1, two_i))
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        block = min(_next_pow2(inter), 1024)
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, out, x2.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4, **_pdl(x.device))
    return out.view(*shape[:-1], inter)


# --------------------------------------------------------------------------------------
# Matrix-vector products that read their input through the op before them
# --------------------------------------------------------------------------------------
# At decode-sized batches a projection streams its weights once per step and the norm or
# activation before it is a separate kernel of a few microseconds plus a launch gap. These
# kernels fold that op into the product: every program recomputes the (cheap, cache-resident)
# input vector it needs, so the separate kernel and its round trip through memory go away.
# cuBLAS stays the path for larger batches, where the product reuses each weight tile.

_PRO_NONE, _PRO_NORM, _PRO_ADD_NORM, _PRO_SILU_MUL = 0, 1, 2, 3   # the op before the product
# Rows up to which the fused products are used (0: never; the A/B switch of the decode bench).
FUSED_GEMV_MAX_ROWS = 1


@triton.jit
def _gemv_norm_input(x_row, r_row, res_out_row, offs_k, k_mask, PROLOGUE: tl.constexpr):
    # One chunk of the norm's input: x, or x + residual rounded to the residual's dtype.
    h = tl.load(x_row + offs_k, mask=k_mask, other=0.0)
    if PROLOGUE == 2:
        r = tl.load(r_row + offs_k, mask=k_mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(res_out_row.dtype.element_ty)
    return h


@triton.jit
def _gemv_input(x_row, r_row, res_out_row, nw_ptr, offs_k, k_mask, K, inv_rms, write_res,
                PROLOGUE: tl.constexpr):
    # One chunk of the product's input, as the separate op would have produced it (the same
    # roundings as _rms_norm_kernel / _silu_and_mul_kernel), in fp32.
    if PROLOGUE == 0:
        a = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    elif PROLOGUE == 3:
        gate = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + K + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        a = (gate * tl.sigmoid(gate) * up).to(x_row.dtype.element_ty).to(tl.float32)
    else:
        h = _gemv_norm_input(x_row, r_row, res_out_row, offs_k, k_mask, PROLOGUE)
        if PROLOGUE == 2:
            if write_res:
                tl.store(res_out_row + offs_k, h, mask=k_mask)
        normed = (h.to(tl.float32) * inv_rms).to(h.dtype).to(tl.float32)
        w = tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        a = (w * normed).to(x_row.dtype.element_ty).to(tl.float32)
    return a


@triton.jit
def _gemv_kernel(x_ptr, res_ptr, nw_ptr, w_ptr, out_ptr, res_out_ptr,
                 stride_x, stride_res, stride_w, stride_out, stride_res_out,
                 N, K, eps,
                 PROLOGUE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NORM_BLOCK: tl.constexpr, PREFETCH: tl.constexpr, ROW_ACC: tl.constexpr,
                 PDL: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    x_row = x_ptr + row * stride_x
    r_row = res_ptr + row * stride_res
    res_out_row = res_out_ptr + row * stride_res_out
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k0 = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w
    if PREFETCH:
        # The next weight tile is always in flight while this one is summed; the first is
        # issued before the norm's pass, whose loads would otherwise leave HBM idle.
        w_next = tl.load(w_rows + offs_k0[None, :], mask=n_mask[:, None] & (offs_k0 < K)[None, :], other=0.0)
    # Launched before the kernel ahead of it has finished (programmatic dependent launch): the
    # first weight tile (prefetch), which nothing writes, is already on its way; the input and
    # every write wait for that kernel (its output buffers may be reused as this one's).
    _grid_dependency(PDL)
    inv_rms = 1.0
    if PROLOGUE == 1 or PROLOGUE == 2:
        # The norm needs the whole row's sum of squares before any chunk can be scaled: a
        # first pass over the input (K values, against BLOCK_N * K weights in the second),
        # in chunks of NORM_BLOCK (wide_norm: blocks wider than BLOCK_K, so fewer round trips).
        offs_s0 = tl.arange(0, NORM_BLOCK)
        sq = tl.zeros([NORM_BLOCK], dtype=tl.float32)
        for k0 in range(0, K, NORM_BLOCK):
            offs_s = k0 + offs_s0
            s_mask = offs_s < K
            hf = _gemv_norm_input(x_row, r_row, res_out_row, offs_s, s_mask, PROLOGUE).to(tl.float32)
            sq += hf * hf
        inv_rms = tl.rsqrt(tl.sum(sq, axis=0) / K + eps)
    if ROW_ACC:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)   # fewer registers: a reduction per tile
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        k_mask = offs_k < K
        # The first program also writes the new residual (every program reads the old one,
        # so it goes to a fresh tensor, never in place).
        a = _gemv_input(x_row, r_row, res_out_row, nw_ptr, offs_k, k_mask, K, inv_rms, pid == 0, PROLOGUE)
        if PREFETCH:
            w = w_next
            offs_next = offs_k + BLOCK_K
            w_next = tl.load(w_rows + offs_next[None, :], mask=n_mask[:, None] & (offs_next < K)[None, :],
                             other=0.0)
        else:
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if ROW_ACC:
            acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
        else:
            acc += w.to(tl.float32) * a[None, :]
    if ROW_ACC:
        y = acc
    else:
        y = tl.sum(acc, axis=1)
    tl.store(out_ptr + row * stride_out + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


class GemvTile(NamedTuple):
    """A launch of _gemv_kernel: its tile (block_n outputs x block_k inputs), warps and the
    variant flags. prefetch: the next weight tile is loaded while this one is summed (the first
    before the norm's pass). row_acc: each tile is reduced to its rows at once (a BLOCK_N
    accumulator, not BLOCK_N x BLOCK_K). wide_norm: the norm's pass reads the input row in
    blocks of up to _NORM_BLOCK_MAX, not BLOCK_K. pdl: launched as a programmatic dependent
    launch where the GPU has it (_pdl_supported), else ignored."""
    block_n: int
    block_k: int
    warps: int
    prefetch: bool = False
    row_acc: bool = False
    wide_norm: bool = False
    pdl: bool = False


# The tile for each op before the product: the best of benchmarks/gpu_gemv.py's sweep
# (RESULTS.md, issue 14) at Llama-3-8B's batch-1 shapes. An op missing here is not fused (the
# separate op then cuBLAS). GEMV_CONFIG, when set (the sweep sets each tile it times),
# overrides the table for every op.
GEMV_CONFIG: GemvTile | None = None
GEMV_CONFIGS: dict[int, GemvTile] = {_PRO_NORM: GemvTile(32, 512, 4), _PRO_ADD_NORM: GemvTile(32, 512, 4),
                                     _PRO_SILU_MUL: GemvTile(8, 1024, 4)}
# Weights up to this size only: the Triton product reads them a few per cent slower than
# cuBLAS, which past this size costs more than the separate kernel it saves (measured: the
# 50 and 117 MB projections of a Llama-3-8B layer gain, the 235 MB gate/up loses).
FUSED_GEMV_MAX_WEIGHT_BYTES = 160 << 20
# The wide norm pass's block, at most: its fp32 values sit in the program's registers, so
# the block is bounded; below the bound a hidden row is read in one round trip
# (benchmarks/gemv_registers.py shows what the block costs a tile in registers).
_NORM_BLOCK_MAX = 8192


def _norm_block(tile: GemvTile, K: int) -> int:
    return min(_next_pow2(K), _NORM_BLOCK_MAX) if tile.wide_norm else tile.block_k


def _gemv(prologue: int, x2: torch.Tensor, weight: torch.Tensor, *, residual=None, norm_weight=None,
          eps: float = 0.0, res_out=None) -> torch.Tensor:
    rows, N, K = x2.shape[0], weight.shape[0], weight.shape[1]
    out = torch.empty((rows, N), dtype=x2.dtype, device=x2.device)
    if GEMV_CONFIG is not None:
        tile = GEMV_CONFIG
    elif x2.device.type == "cpu":   # the interpreter (tests): tiles small enough to cross their edges
        tile = GemvTile(16, 64, 1)
    else:
        tile = GEMV_CONFIGS[prologue]
    norm_block = _norm_block(tile, K)
    r = residual if residual is not None else x2
    ro = res_out if res_out is not None else out
    nw = norm_weight if norm_weight is not None else weight
    pdl = tile.pdl and _pdl_supported(x2.device)
    _gemv_kernel[(triton.cdiv(N, tile.block_n), rows)](
        x2, r, nw, weight, out, ro,
        x2.stride(0), r.stride(0), weight.stride(0), out.stride(0), ro.stride(0),
        N, K, eps, PROLOGUE=prologue, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, NORM_BLOCK=norm_block,
        PREFETCH=tile.prefetch, ROW_ACC=tile.row_acc, PDL=pdl, num_warps=tile.warps,
        **({"launch_pdl": True} if pdl else {}))
    return out


def _gemv_fits(prologue: int, x2: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor) -> bool:
    # Plain 2-D weights of the activations' dtype, at the batch sizes where a product streams
    # its weights once (a larger batch reuses each weight tile: cuBLAS's job), for an op the
    # table (or an override) has a tile for. Under the interpreter (CPU tensors: tests) the
    # fused ops always run, and the plain product only as on a GPU, where the table says.
    cpu_fused = x2.device.type == "cpu" and prologue != _PRO_NONE
    return ((GEMV_CONFIG is not None or prologue in GEMV_CONFIGS or cpu_fused)
            and 0 < x2.shape[0] <= FUSED_GEMV_MAX_ROWS and weight.dim() == 2 and weight.stride(1) == 1
            and weight.numel() * weight.element_size() <= FUSED_GEMV_MAX_WEIGHT_BYTES
            and weight.dtype == x2.dtype and all(t.dtype == x2.dtype for t in others))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as reference.linear. A batch-1 product with nothing to fold in (o_proj)
    goes through the same Triton product where the table has a tile for it; everything else
    is cuBLAS's (torch's F.linear)."""
    if bias is not None or x.shape[-1] != weight.shape[-1]:
        return reference.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if not _gemv_fits(_PRO_NONE, x2, weight):
        return reference.linear(x, weight, bias)
    return _gemv(_PRO_NONE, _last_dim_contiguous(x2), weight).view(*x.shape[:-1], -1)


def rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as reference.rms_norm_linear."""
    n = x.shape[-1]
    x2 = _last_dim_contiguous(x.reshape(-1, n))
    norm_weight = norm_weight.contiguous()
    if residual is None:
        if weight.shape[-1] != n or norm_weight.shape != (n,) or not _gemv_fits(_PRO_NORM, x2, weight, norm_weight):
            return reference.linear(rms_norm(x, norm_weight, eps), weight), x
        out = _gemv(_PRO_NORM, x2, weight, norm_weight=norm_weight, eps=eps)
        return out.view(*x.shape[:-1], -1), x
    r2 = _last_dim_contiguous(residual.reshape(-1, n))
    if (weight.shape[-1] != n or norm_weight.shape != (n,) or r2.shape != x2.shape
            or not _gemv_fits(_PRO_ADD_NORM, x2, weight, r2, norm_weight)):   # (the composition says what is wrong)
        h, residual = add_rms_norm(x, residual, norm_weight, eps)
        return reference.linear(h, weight), residual
    res_out = torch.empty_like(x2)
    out = _gemv(_PRO_ADD_NORM, x2, weight, residual=r2, norm_weight=norm_weight, eps=eps, res_out=res_out)
    return out.view(*x.shape[:-1], -1), res_out.view(x.shape)


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Same contract as reference.silu_and_mul_linear."""
    x2 = _last_dim_contiguous(x.reshape(-1, x.shape[-1]))
    if not _gemv_fits(_PRO_SILU_MUL, x2, weight) or x2.shape[1] != 2 * weight.shape[1]:
        return reference.linear(silu_and_mul(x), weight)
    return _gemv(_PRO_SILU_MUL, x2, weight).view(*x.shape[:-1], -1)


# --------------------------------------------------------------------------------------
# Rotary embedding (neox / rotate-half)
# --------------------------------------------------------------------------------------

@triton.jit
def _rope_heads(x_ptr, out_ptr, stride_xh, stride_oh, n_heads, cos, sin,
                HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    # Heads are walked in chunks so huge head counts do not blow up register use; cos/sin
    # were loaded once per token by the caller and are shared by every head.
    for h0 in range(0, n_heads, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = (offs_h < n_heads)[:, None] & d_mask[None, :]
        x_lo_ptrs = x_ptr + offs_h[:, None] * stride_xh + offs_d[None, :]
        x1 = tl.load(x_lo_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_lo_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * cos[None, :] - x2 * sin[None, :]
        o2 = x2 * cos[None, :] + x1 * sin[None, :]
        o_lo_ptrs = out_ptr + offs_h[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_lo_ptrs, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_lo_ptrs + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cos_sin_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
                   H, KH,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    cs_row = cos_sin_ptr + pos * stride_cs
    cos = tl.load(cs_row + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    sin = tl.load(cs_row + HALF + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    _rope_heads(q_ptr + t * stride_qt, q_out_ptr + t * stride_qot, stride_qh, stride_qoh, H,
                cos, sin, HALF, BLOCK_HALF, BLOCK_H)
    _rope_heads(k_ptr + t * stride_kt, k_out_ptr + t * stride_kot, stride_kh, stride_koh, KH,
                cos, sin, HALF, BLOCK_HALF, BLOCK_H)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding; q: [T, H, D], k: [T, KH, D]. Returns new tensors."""
    T, H, D = q.shape
    KH = k.shape[1]
    assert D % 2 == 0 and k.shape[2] == D and cos_sin_cache.shape[-1] == D
    # q/k are usually strided views into the fused qkv projection; strides are passed
    # through so no copy is made for them.
    q = _last_dim_contiguous(q)
    k = _last_dim_contiguous(k)
    cos_sin_cache = _last_dim_contiguous(cos_sin_cache)
    positions = positions.contiguous()
    q_out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((T, KH, D), dtype=k.dtype, device=k.device)
    if T > 0:
        half = D // 2
        _rotary_kernel[(T,)](
            q, k, q_out, k_out, positions, cos_sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cos_sin_cache.stride(0), H, KH,
            HALF=half, BLOCK_HALF=_next_pow2(half), BLOCK_H=min(_next_pow2(max(H, KH)), 16),
            num_warps=4)
    return q_out, k_out


# --------------------------------------------------------------------------------------
# KV cache write
# --------------------------------------------------------------------------------------

@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcb, stride_kco, stride_kch,
                     stride_vcb, stride_vco, stride_vch,
                     KH, D,
                     BLOCK_SIZE: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token: nothing to cache
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_KH)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < KH)[:, None] & (offs_d < D)[None, :]
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    kc = (k_cache_ptr + blk * stride_kcb + off * stride_kco
          + offs_h[:, None] * stride_kch + offs_d[None, :])
    vc = (v_cache_ptr + blk * stride_vcb + off * stride_vco
          + offs_h[:, None] * stride_vch + offs_d[None, :])
    tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V ([T, KH, D]) into the paged cache at slot_mapping (in place)."""
    T, KH, D = k.shape
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache must be contiguous in D"
    if T == 0:
        return
    k = _last_dim_contiguous(k)
    v = _last_dim_contiguous(v)
    slot_mapping = slot_mapping.contiguous()
    _write_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        KH, D,
        BLOCK_SIZE=k_cache.shape[1], BLOCK_KH=_next_pow2(KH), BLOCK_D=_next_pow2(D),
        num_warps=4)


# --------------------------------------------------------------------------------------
# Rotary embedding fused with the KV cache write
# --------------------------------------------------------------------------------------

@triton.jit
def _rotary_write_kv_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                            pos_ptr, slot_ptr, cos_sin_ptr,
                            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                            stride_qot, stride_qoh, stride_cs,
                            stride_kcb, stride_kco, stride_kch,
                            stride_vcb, stride_vco, stride_vch,
                            H, KH,
                            HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_SIZE: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr,
                            PDL: tl.constexpr):
    _grid_dependency(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_half = tl.arange(0, BLOCK_HALF)
    half_mask = offs_half < HALF
    cs_row = cos_sin_ptr + pos * stride_cs
    cos = tl.load(cs_row + offs_half, mask=half_mask, other=0.0).to(tl.float32)
    sin = tl.load(cs_row + HALF + offs_half, mask=half_mask, other=0.0).to(tl.float32)
    _rope_heads(q_ptr + t * stride_qt, q_out_ptr + t * stride_qot, stride_qh, stride_qoh, H,
                cos, sin, HALF, BLOCK_HALF, BLOCK_H)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # slot -1 (padding): the query is still rotated, nothing is cached
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        # The rotated K goes straight to its cache slot: it is never needed anywhere else
        # (attention reads K back from the cache), so it is not materialised.
        _rope_heads(k_ptr + t * stride_kt, k_cache_ptr + blk * stride_kcb + off * stride_kco,
                    stride_kh, stride_kch, KH, cos, sin, HALF, BLOCK_HALF, BLOCK_H)
        offs_h = tl.arange(0, BLOCK_KH)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h < KH)[:, None] & (offs_d < 2 * HALF)[None, :]
        v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        vc = (v_cache_ptr + blk * stride_vcb + off * stride_vco
              + offs_h[:, None] * stride_vch + offs_d[None, :])
        tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_embedding_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                              cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor) -> torch.Tensor:
    """rotary_embedding then write_kv in one launch; returns the rotated q (a new tensor).

    Why fused: in a decode step both ops touch a few KB per token, so each is almost all
    launch latency; one kernel saves a launch and the round trip of the rotated K.
    """
    T, H, D = q.shape
    KH = k.shape[1]
    assert D % 2 == 0 and k.shape[2] == D and v.shape == k.shape and cos_sin_cache.shape[-1] == D
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache must be contiguous in D"
    q = _last_dim_contiguous(q)
    k = _last_dim_contiguous(k)
    v = _last_dim_contiguous(v)
    cos_sin_cache = _last_dim_contiguous(cos_sin_cache)
    positions = positions.contiguous()
    slot_mapping = slot_mapping.contiguous()
    q_out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    if T > 0:
        half = D // 2
        _rotary_write_kv_kernel[(T,)](
            q, k, v, q_out, k_cache, v_cache, positions, slot_mapping, cos_sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            q_out.stride(0), q_out.stride(1), cos_sin_cache.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            H, KH,
            HALF=half, BLOCK_HALF=_next_pow2(half), BLOCK_H=min(_next_pow2(max(H, KH)), 16),
            BLOCK_SIZE=k_cache.shape[1], BLOCK_KH=_next_pow2(KH), BLOCK_D=_next_pow2(D),
            num_warps=4, **_pdl(q.device))
    return q_out


# --------------------------------------------------------------------------------------
# Paged attention: shared tile loader
# --------------------------------------------------------------------------------------

@triton.jit
def _load_kv_tile(cache_ptr, block_table_row, offs_n, n_valid, kv_head, offs_d,
                  stride_b, stride_o, stride_h, BLOCK_SIZE: tl.constexpr):
    """[BLOCK_N, D] of one KV head for token positions offs_n of a sequence.

    Block ids are looked up per token, so a tile may span several cache blocks or part of
    one, and the tile width is independent of the cache block size.
    """
    valid = offs_n < n_valid
    blk = tl.load(block_table_row + offs_n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    ptrs = (cache_ptr + blk[:, None] * stride_b + (offs_n % BLOCK_SIZE)[:, None] * stride_o
            + kv_head * stride_h + offs_d[None, :])
    return tl.load(ptrs, mask=valid[:, None], other=0.0)


# --------------------------------------------------------------------------------------
# Paged decode attention (split-K / flash-decoding)
# --------------------------------------------------------------------------------------

# Integer arguments whose value moves with the batch (partition sizes and counts, the
# sequence count, the block table's width) are not specialized: Triton would otherwise
# compile a new variant, mid-serving, the first time one of them is 1 or a multiple of 16,
# a stall of about a second for every request in the step. The same goes for constexpr
# paddings sized from them.
@triton.jit(do_not_specialize=["partition_tokens", "num_partitions", "stride_bt"])
def _decode_partition_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
        out_ptr, part_max_ptr, part_sum_ptr, part_out_ptr, arrivals_ptr,
        scale_log2, partition_tokens, num_partitions,
        stride_qs, stride_qh, stride_os, stride_oh, stride_bt,
        stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        SINGLE_PASS: tl.constexpr, FOLD_REDUCE: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, PDL: tl.constexpr):
    _grid_dependency(PDL)
    s = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    ctx = tl.load(context_lens_ptr + s)

    if SINGLE_PASS:
        start, end = 0, ctx
    else:
        start = part * partition_tokens
        if start >= ctx:
            # Shorter sequences in the batch need fewer partitions; the reduce only reads
            # the ones that exist, so there is nothing to write. An empty context (a
            # padded CUDA-graph row) has no partition to reduce it: its output is zeros.
            if FOLD_REDUCE and part == 0:
                zero_rows = kv_head * GROUP + tl.arange(0, GROUP_PAD)
                d = tl.arange(0, HEAD_DIM)
                tl.store(out_ptr + s.to(tl.int64) * stride_os + zero_rows[:, None] * stride_oh + d[None, :],
                         tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32).to(out_ptr.dtype.element_ty),
                         mask=(tl.arange(0, GROUP_PAD) < GROUP)[:, None])
            return
        end = tl.minimum(start + partition_tokens, ctx)

    # All query heads sharing this KV head are stacked as rows of one tile, so every K/V
    # element is read once per group and the score/PV products become matmuls. tl.dot
    # needs >= 16 rows, hence the padding (padded rows are zero queries, never stored).
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + s.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)

    bt_row = block_tables_ptr + s.to(tl.int64) * stride_bt
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_kv_tile(k_cache_ptr, bt_row, offs_n, end, kv_head, offs_d,
                          stride_kb, stride_ko, stride_kh, BLOCK_SIZE).to(q.dtype)
        v = _load_kv_tile(v_cache_ptr, bt_row, offs_n, end, kv_head, offs_d,
                          stride_vb, stride_vo, stride_vh, BLOCK_SIZE).to(q.dtype)
        # Scores live in the log2 domain (scale folded with log2(e)) so exp2 can be used.
        scores = _mma(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * scale_log2
        scores = tl.where((offs_n < end)[None, :], scores, float("-inf"))
        # The first tile of a partition always holds a valid key, so m_new is finite from
        # the first iteration on and exp2(m_i - m_new) never sees -inf - -inf.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new

    if SINGLE_PASS:
        # An empty context (l_i == 0) yields zeros rather than NaNs.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + s.to(tl.int64) * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        # Partials are [S, H, P] (max, sum) and [S, H, P, D] (normalised output), fp32.
        row = (s * num_kv_heads * GROUP + heads).to(tl.int64) * num_partitions + part
        tl.store(part_max_ptr + row, m_i, mask=g_mask)
        tl.store(part_sum_ptr + row, l_i, mask=g_mask)
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_i[:, None],
                 mask=g_mask[:, None])
        if FOLD_REDUCE:
            # The last of this (sequence, KV head)'s partitions to finish reduces them all,
            # instead of a second kernel (a launch and a graph node per layer). The barrier
            # orders this program's partial stores before its arrival; the acq_rel atomic
            # publishes them to, and makes the others' visible in, the last arriver.
            tl.debug_barrier()
            # The launch's partitions that exist for this context (bounded by the grid: a
            # context past the table's width must not leave a count that never resets).
            n_parts = tl.minimum(tl.cdiv(ctx, partition_tokens), num_partitions)
            slot = arrivals_ptr + s * num_kv_heads + kv_head
            if tl.atomic_add(slot, 1, sem="acq_rel") == n_parts - 1:
                tl.atomic_xchg(slot, 0)   # ready for the next launch (graph replays reuse it)
                first_rows = (s * num_kv_heads * GROUP + heads).to(tl.int64) * num_partitions
                _decode_reduce_group(out_ptr, part_max_ptr, part_sum_ptr, part_out_ptr, s, heads, g_mask,
                                     first_rows, n_parts, stride_os, stride_oh, HEAD_DIM, GROUP_PAD)


@triton.jit
def _decode_reduce_group(out_ptr, part_max_ptr, part_sum_ptr, part_out_ptr, s, heads, g_mask, rows,
                         n_parts, stride_os, stride_oh, HEAD_DIM: tl.constexpr, GROUP_PAD: tl.constexpr):
    """_decode_reduce_kernel's sum for the query heads ``heads`` of one KV head, inside the
    partition kernel; ``rows`` are their first partials. The partials are read past L1
    (.cg): other programs wrote them. A decode split has a few dozen partitions at most
    (_decode_partition_tokens), so one partition per iteration keeps registers small."""
    g_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    for p in range(0, n_parts):
        g_max = tl.maximum(g_max, tl.load(part_max_ptr + rows + p, mask=g_mask, other=float("-inf"),
                                          cache_modifier=".cg"))
    g_max = tl.where(g_mask, g_max, 0.0)   # padded heads: no -inf - -inf below
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    for p in range(0, n_parts):
        m = tl.load(part_max_ptr + rows + p, mask=g_mask, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(part_sum_ptr + rows + p, mask=g_mask, other=0.0, cache_modifier=".cg")
        # Each partial output is normalised by its own sum: re-weight it by that sum at the
        # global max.
        w = tl.where(g_mask, l * tl.exp2(m - g_max), 0.0)
        o = tl.load(part_out_ptr + (rows + p)[:, None] * HEAD_DIM + offs_d[None, :], mask=g_mask[:, None],
                    other=0.0, cache_modifier=".cg")
        acc += w[:, None] * o
        denom += w
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(out_ptr + s.to(tl.int64) * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


@triton.jit(do_not_specialize=["partition_tokens", "num_partitions"])
def _decode_reduce_kernel(out_ptr, part_max_ptr, part_sum_ptr, part_out_ptr, context_lens_ptr,
                          partition_tokens, num_partitions, stride_os, stride_oh,
                          HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
    _grid_dependency(PDL)
    s = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(context_lens_ptr + s)
    n_parts = tl.minimum(tl.cdiv(ctx, partition_tokens), num_partitions)
    base = (s * tl.num_programs(1) + h).to(tl.int64) * num_partitions

    # The global max only needs the (small) per-partition maxima, read in chunks (a width
    # padded to the partition count would be a compile per power of two); the D-wide
    # partial outputs are then streamed in chunks so registers stay bounded.
    g_max = tl.full([], float("-inf"), tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        g_max = tl.maximum(g_max, tl.max(tl.load(part_max_ptr + base + offs, mask=offs < n_parts,
                                                 other=float("-inf")), axis=0))
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    denom = tl.zeros([], tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pm = offs < n_parts
        m = tl.load(part_max_ptr + base + offs, mask=pm, other=float("-inf"))
        l = tl.load(part_sum_ptr + base + offs, mask=pm, other=0.0)
        # Each partial output is already normalised by its own sum, so re-weight it by
        # that sum rescaled to the global max.
        w = tl.where(pm, l * tl.exp2(m - g_max), 0.0)
        o = tl.load(part_out_ptr + (base + offs)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=pm[:, None], other=0.0)
        acc += tl.sum(w[:, None] * o, axis=0)
        denom += tl.sum(w, axis=0)
    out = acc / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + s.to(tl.int64) * stride_os + h * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty))


def _decode_config(device: torch.device) -> dict:
    if device.type != "cuda":
        # Interpreter: small tiles so CI shapes still span several tiles per partition.
        return dict(BLOCK_N=16, num_warps=4, num_stages=1)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


def _decode_partition_tokens(max_len: int, num_seqs: int, num_kv_heads: int, num_sms: int,
                             block_n: int) -> int:
    """Tokens per split-K partition, or 0 for a single pass over the whole context.

    Splitting pays only when (sequence, KV head) programs alone would leave SMs idle; the
    partition count then aims at _DECODE_PROGRAMS_PER_SM programs per SM, never going below
    a minimum partition length. The result is rounded to the tile width, which the
    kernel's loop assumes.
    """
    base = num_seqs * num_kv_heads
    target = _DECODE_PROGRAMS_PER_SM * num_sms
    if base >= target or max_len <= _DECODE_MIN_SPLIT_CONTEXT:
        return 0
    want = triton.cdiv(target, base)
    tokens = max(_DECODE_MIN_PARTITION_TOKENS, triton.cdiv(max_len, want))
    tokens = triton.cdiv(tokens, block_n) * block_n
    return 0 if tokens >= max_len else tokens


# (device) -> int32 arrival counters of the folded split-K reduce, one per (sequence, KV
# head), all zero between launches (the last arriver resets its own). Shared by every
# decode-attention launch on the device, which the engine issues on one stream, one layer
# after another. Made outside CUDA-graph capture only: a capture records work without
# running it, so a buffer made there would not be zero when first used.
_ARRIVALS: dict[torch.device, torch.Tensor] = {}
_ARRIVALS_SIZE = 1 << 16


def _arrivals(device: torch.device, needed: int) -> torch.Tensor | None:
    buf = _ARRIVALS.get(device)
    if buf is None and needed <= _ARRIVALS_SIZE and not (
            device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        # setdefault: two threads making it at once keep one buffer
        buf = _ARRIVALS.setdefault(device, torch.zeros(_ARRIVALS_SIZE, dtype=torch.int32, device=device))
    return buf if buf is not None and needed <= buf.numel() else None


def _paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                            partition_tokens: int | None = None, config: dict | None = None,
                            fold_reduce: bool = False):
    """paged_decode_attention with the split and tiling overridable (tests, tuning).

    partition_tokens: None = heuristic, 0 = single pass, otherwise a multiple of BLOCK_N.
    fold_reduce: a split context is reduced by its last partition (one kernel) where the
    arrival counters are available, else by a second kernel. Off by default: on an H100
    the last partition's reduce, alone on its SM, took longer than the second kernel's
    launch saves (benchmarks/RESULTS.md, issue 14).
    """
    S, H, D = q.shape
    _, BS, KH, Dk = k_cache.shape
    assert Dk == D and H % KH == 0, "query heads must be a multiple of KV heads"
    assert _is_pow2(D) and D >= 16, "head_dim must be a power of two >= 16"
    assert _is_pow2(BS), "block_size must be a power of two"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    out = torch.empty((S, H, D), dtype=q.dtype, device=q.device)
    if S == 0:
        return out
    q = _last_dim_contiguous(q)
    block_tables = block_tables.contiguous()
    context_lens = context_lens.contiguous()
    cfg = {**_decode_config(q.device), **(config or {})}
    block_n = cfg.pop("BLOCK_N")
    # The grid is sized from the block table's width rather than context_lens.max(): that
    # bound needs no device->host sync (this runs once per layer per step), and partitions
    # past a sequence's real length exit at once. Tables are padded to the batch's widest.
    max_len = block_tables.shape[1] * BS
    if partition_tokens is None:
        partition_tokens = _decode_partition_tokens(max_len, S, KH, _device_sms(q.device), block_n)
    assert partition_tokens % block_n == 0, "partition_tokens must be a multiple of BLOCK_N"
    num_partitions = triton.cdiv(max_len, partition_tokens) if partition_tokens else 1
    single = num_partitions <= 1

    arrivals = None
    if single:
        part_max = part_sum = part_out = out  # unused
    else:
        part_max = torch.empty((S, H, num_partitions), dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_out = torch.empty((S, H, num_partitions, D), dtype=torch.float32, device=q.device)
        if fold_reduce:
            arrivals = _arrivals(q.device, S * KH)
    fold = arrivals is not None

    _decode_partition_kernel[(S, KH, num_partitions)](
        q, k_cache, v_cache, block_tables, context_lens,
        out, part_max, part_sum, part_out, arrivals if fold else context_lens,
        scale * _LOG2E, partition_tokens, num_partitions,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        GROUP=H // KH, GROUP_PAD=max(16, _next_pow2(H // KH)), HEAD_DIM=D,
        BLOCK_SIZE=BS, BLOCK_N=block_n, SINGLE_PASS=single, FOLD_REDUCE=fold,
        DOT_PRECISION=_dot_precision(q.dtype), DOT_UPCAST=_dot_upcast(q.device), **cfg, **_pdl(q.device))
    if not single and not fold:
        _decode_reduce_kernel[(S, H)](
            out, part_max, part_sum, part_out, context_lens,
            partition_tokens, num_partitions, out.stride(0), out.stride(1),
            HEAD_DIM=D, BLOCK_P=16, num_warps=4, **_pdl(q.device))
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """One query token per sequence. q: [S, H, D] -> [S, H, D].

    The query is the last of each sequence's context_lens[s] tokens and sees all of them.
    """
    return _paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


# --------------------------------------------------------------------------------------
# Paged prefill attention (flash-attention over the paged context)
# --------------------------------------------------------------------------------------

@triton.jit
def _prefill_inner(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, ctx, kv_head,
                   lo, hi, scale_log2,
                   stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
                   HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_kv_tile(k_cache_ptr, bt_row, offs_n, ctx, kv_head, offs_d,
                          stride_kb, stride_ko, stride_kh, BLOCK_SIZE).to(q.dtype)
        v = _load_kv_tile(v_cache_ptr, bt_row, offs_n, ctx, kv_head, offs_d,
                          stride_vb, stride_vo, stride_vh, BLOCK_SIZE).to(q.dtype)
        scores = _mma(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * scale_log2
        if CAUSAL:
            visible = (offs_n[None, :] <= q_pos[:, None]) & (offs_n < ctx)[None, :]
            scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _prefill_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_start_loc_ptr,
        context_lens_ptr, num_seqs, scale_log2,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
        stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEQ_CHUNK: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    # Map this program's global query-tile index to (sequence, tile) from query_start_loc
    # on the device: sizing the grid by max q_len instead would need a device->host sync
    # on every layer. Every program redoes this scan; it is S integers, negligible next to
    # one attention tile. The grid holds an upper bound of tiles and the surplus exits.
    # The scan goes SEQ_CHUNK sequences at a time (a width padded to the sequence count
    # would be a compile per power of two): s counts the sequences whose tiles all end at
    # or before pid, and tiles_before is where sequence s's tiles begin (the cumulative
    # tile counts only grow, so that is the largest of them not past pid).
    s = tl.zeros([], tl.int32)
    tiles_before = tl.zeros([], tl.int32)
    carried = tl.zeros([], tl.int32)
    for s0 in range(0, num_seqs, SEQ_CHUNK):
        offs_s = s0 + tl.arange(0, SEQ_CHUNK)
        s_mask = offs_s < num_seqs
        starts = tl.load(query_start_loc_ptr + offs_s, mask=s_mask, other=0).to(tl.int32)
        ends = tl.load(query_start_loc_ptr + offs_s + 1, mask=s_mask, other=0).to(tl.int32)
        tiles_end = carried + tl.cumsum(tl.cdiv(ends - starts, BLOCK_M), axis=0)
        done = (tiles_end <= pid) & s_mask
        s += tl.sum(done.to(tl.int32), axis=0)
        tiles_before = tl.maximum(tiles_before, tl.max(tl.where(done, tiles_end, 0), axis=0))
        carried = tl.max(tiles_end, axis=0)
    if s >= num_seqs:
        return
    q_start = tl.load(query_start_loc_ptr + s).to(tl.int32)
    q_len = tl.load(query_start_loc_ptr + s + 1).to(tl.int32) - q_start
    n_tiles = tl.cdiv(q_len, BLOCK_M)
    tile_in_seq = pid - tiles_before
    # Later tiles see more keys (causal), so give them the lower program ids: the longest
    # programs of a sequence start first and its short ones fill in behind them.
    tile = n_tiles - 1 - tile_in_seq
    ctx = tl.load(context_lens_ptr + s)
    kv_head = head // GROUP

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m < q_len
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_mask[:, None], other=0.0)
    # Query row i of this chunk is token ctx - q_len + i of the sequence (the chunk comes
    # after an already-cached prefix) and sees keys 0..that position.
    first_pos = ctx - q_len + tile * BLOCK_M
    q_pos = first_pos + tl.arange(0, BLOCK_M)

    bt_row = block_tables_ptr + s.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Key tiles entirely at or before the tile's first query position are visible to all
    # rows and need no mask (that is the whole cached prefix, usually most of the work);
    # only the remaining tiles up to the tile's last position need the causal mask.
    # Every row sees key 0 of the first tile it processes, so m_i is finite afterwards.
    full_hi = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    causal_hi = tl.minimum(first_pos + BLOCK_M, ctx)
    acc, m_i, l_i = _prefill_inner(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row,
                                   ctx, kv_head, 0, full_hi, scale_log2,
                                   stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
                                   HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION, DOT_UPCAST)
    acc, m_i, l_i = _prefill_inner(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row,
                                   ctx, kv_head, full_hi, causal_hi, scale_log2,
                                   stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
                                   HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION, DOT_UPCAST)
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def _prefill_config(device: torch.device, dtype: torch.dtype, head_dim: int) -> dict:
    if device.type != "cuda":
        # Interpreter: small tiles keep the numpy emulation fast and exercise tiling.
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    # Best of a small sweep on H100 (bf16, D=128, 2k-token chunks and 32-token chunks after
    # a 512-token prefix): 128-row tiles or 8 warps did no better, BLOCK_N=128 worse.
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)


def _paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens,
                             scale, config: dict | None = None):
    T, H, D = q.shape
    _, BS, KH, Dk = k_cache.shape
    S = context_lens.shape[0]
    assert Dk == D and H % KH == 0, "query heads must be a multiple of KV heads"
    assert _is_pow2(D) and D >= 16, "head_dim must be a power of two >= 16"
    assert _is_pow2(BS), "block_size must be a power of two"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    if T == 0 or S == 0:
        return out
    q = _last_dim_contiguous(q)
    block_tables = block_tables.contiguous()
    query_start_loc = query_start_loc.contiguous()
    context_lens = context_lens.contiguous()
    cfg = dict(config or _prefill_config(q.device, q.dtype, D))
    # sum_s cdiv(q_len_s, BLOCK_M) <= cdiv(T, BLOCK_M) + S: an upper bound on query tiles
    # that needs nothing from the device.
    grid = (triton.cdiv(T, cfg["BLOCK_M"]) + S, H)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, context_lens, S,
        scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        GROUP=H // KH, HEAD_DIM=D, BLOCK_SIZE=BS, SEQ_CHUNK=16,
        DOT_PRECISION=_dot_precision(q.dtype), DOT_UPCAST=_dot_upcast(q.device), **cfg)
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new query tokens over its whole paged context.

    q: [T, H, D] with sequence s owning rows query_start_loc[s]:query_start_loc[s+1]; those
    rows are the *last* q_len of its context_lens[s] tokens. The cache must already hold
    this step's K/V.
    """
    return _paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc,
                                    context_lens, scale)


# ---- dense causal prefill ------------------------------------------------------------------------
def causal_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int],
                             scale: float) -> torch.Tensor:
    """reference.causal_prefill_attention through cuDNN's fused attention only: it takes
    grouped KV heads as they are, where torch's default choice for enable_gqa falls back to
    the unfused math kernel. Raises RuntimeError where cuDNN cannot serve the shape or
    dtype (dense_prefill_supported asks first)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return reference.causal_prefill_attention(q, k, v, seq_lens, scale)


def dense_prefill_supported(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                            device: torch.device) -> bool:
    """Can causal_prefill_attention run these heads on this device, and does it agree with
    the unfused reference there? Tried once at engine start on a small random input (two
    sequences), so a library that cannot serve the shape, or serves it wrongly, leaves the
    paged kernel in charge instead of failing or corrupting a request later."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return _dense_prefill_agrees(num_heads, num_kv_heads, head_dim, dtype, device)


def _dense_prefill_agrees(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                          device: torch.device) -> bool:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator(device=device).manual_seed(0)
    lens = [48, 80]
    T = sum(lens)
    # Laid out as Attention.forward hands them over: q and k fresh from rotary, v a view
    # into the fused qkv projection's rows.
    qkv = torch.randn(T, (num_heads + 2 * num_kv_heads) * head_dim, generator=g, device=device).to(dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.reshape(T, num_heads, head_dim).contiguous()
    k = k.reshape(T, num_kv_heads, head_dim).contiguous()
    v = v.view(T, num_kv_heads, head_dim)
    try:
        got = causal_prefill_attention(q, k, v, lens, head_dim ** -0.5)
    except RuntimeError:
        return False
    with sdpa_kernel([SDPBackend.MATH]):
        want = reference.causal_prefill_attention(q.float(), k.float(), v.float(), lens, head_dim ** -0.5)
    return bool(torch.allclose(got.float(), want, atol=3e-2, rtol=3e-2))
