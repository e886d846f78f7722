"""Copy KV blocks from one paged cache into another, block id to block id.

``src`` and ``dst`` are planes of two caches, ``[planes, num_blocks, block_size, heads,
head_dim]`` of one dtype: one layer's K and V (2 planes), or several consecutive layers'
(``cache[first:last].flatten(0, 1)``, 2 per layer), so one launch serves many layers; block
``src_ids[i]`` of every plane of ``src`` goes to block ``dst_ids[i]`` of the same plane of
``dst``. On one CUDA device this is one Triton kernel that reads each
source block once and writes it once (a torch gather + scatter would move every byte
twice and allocate the gathered copy); anywhere else it is the torch reference.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:   # the reference path needs no Triton
    triton = None

log = logging.getLogger(__name__)

# Elements (words) of a block one program copies, and its warps; benchmarks/gpu_kv_ipc.py
# times the alternatives (`tile=` below) on the device.
_CHUNK = 4096
_WARPS = 4


def copy_blocks_reference(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    dst[:, dst_ids.to(dst.device)] = src[:, src_ids.to(src.device)].to(dst.device)


if triton is not None:
    # first_plane changes from call to call (a group of layers after another): not
    # specialized, so every group reuses one compiled kernel.
    @triton.jit(do_not_specialize=["first_plane"])
    def _copy_blocks_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, first_plane, src_plane_stride,
                            dst_plane_stride, block_numel, CHUNK: tl.constexpr):
        i = tl.program_id(0)
        plane = first_plane.to(tl.int64) + tl.program_id(1)
        part = tl.program_id(2)
        s = tl.load(src_ids_ptr + i).to(tl.int64)
        d = tl.load(dst_ids_ptr + i).to(tl.int64)
        offs = part * CHUNK + tl.arange(0, CHUNK)
        mask = offs < block_numel
        x = tl.load(src_ptr + plane * src_plane_stride + s * block_numel + offs, mask=mask)
        tl.store(dst_ptr + plane * dst_plane_stride + d * block_numel + offs, x, mask=mask)

    @triton.jit(do_not_specialize=["slot", "value"])
    def _ring_kernel(bells_ptr, slot, value):
        tl.store(bells_ptr + slot, value)


def _int_kind(v: int) -> tuple:
    # What Triton specializes an int argument on: its type (i32 / i64), divisibility by 16, == 1.
    return (-2 ** 31 <= v < 2 ** 31, v % 16 == 0, v == 1)


# (kernel, device, dtypes, tile, each argument's specialization) -> the compiled kernel. Triton's
# own launcher binds and specializes every argument in Python on every call, a large part
# of a launch's host time; the compiled kernel for one specialization is launched directly.
_compiled: dict[tuple, object] = {}
_fast_launch = True   # off for good if this Triton's compiled-kernel launch does not take our arguments


def _launch(grid: tuple[int, int, int], s: torch.Tensor, d: torch.Tensor, src_ids: torch.Tensor,
            dst_ids: torch.Tensor, first_plane: int, chunk: int, warps: int, stream) -> None:
    args = (s, d, src_ids, dst_ids, first_plane, s.stride(0), d.stride(0), s.shape[2], chunk)
    _run(_copy_blocks_kernel, grid, args,
         lambda: ("copy", s.device.index, s.dtype, src_ids.dtype, dst_ids.dtype, chunk, warps,
                  s.data_ptr() % 16, d.data_ptr() % 16, src_ids.data_ptr() % 16, dst_ids.data_ptr() % 16,
                  -2 ** 31 <= first_plane < 2 ** 31, _int_kind(args[5]), _int_kind(args[6]), _int_kind(args[7])),
         s.device, stream, num_warps=warps)


def _run(jit_fn, grid: tuple, args: tuple, key_of, device: torch.device, stream, **options) -> None:
    """``jit_fn[grid](*args, **options)`` on ``stream`` of ``device``; once a
    specialization (the tuple ``key_of()`` returns) has compiled, its kernel is launched
    directly."""
    global _fast_launch
    # Triton compiles and loads for the current device: a kernel is kept only where that is
    # the tensors' own.
    on_gpu = device.type == "cuda"
    key = key_of() if on_gpu and _fast_launch and torch.cuda.current_device() == device.index else None
    kernel = _compiled.get(key) if key is not None else None
    if kernel is not None:
        try:
            on = stream if stream is not None else torch.cuda.current_stream(device)
            kernel[grid](*args, stream=on.cuda_stream)
            return
        except (TypeError, ValueError, AttributeError):   # this Triton launches differently
            _fast_launch = False
            log.warning("block copy: direct launch of the compiled kernel failed; using Triton's launcher",
                        exc_info=True)
    with _on(stream, on_gpu):
        kernel = jit_fn[grid](*args, **options)
    if key is not None and callable(getattr(kernel, "__getitem__", None)) and hasattr(kernel, "function"):
        _compiled[key] = kernel


class _HostArray:
    """A host array registered with CUDA (mapped), as a pointer argument of a Triton kernel:
    Triton takes anything with ``data_ptr`` and ``dtype``, and translates the address."""

    def __init__(self, t: torch.Tensor):
        self._ptr, self.dtype = t.data_ptr(), t.dtype

    def data_ptr(self) -> int:
        return self._ptr


def ring(bells: torch.Tensor, slot: int, value: int, stream=None, device: torch.device | None = None) -> None:
    """``bells[slot] = value`` (``bells``: int64 in host memory) once the work queued
    before it has finished. On a GPU (``device``) a one-thread kernel on ``stream``
    (default: the current stream) writes it through the mapping of ``bells`` (registered
    with ``cudaHostRegister`` by the caller), so a process reading ``bells`` learns that
    the copies queued before are complete without anyone waiting for them. Without a
    device (a CPU sender, whose copies are synchronous) a plain store."""
    if device is None or device.type != "cuda":
        bells[slot] = value
        return
    if triton is None:
        raise RuntimeError("ringing a doorbell from a GPU needs Triton")
    # value is kept >= 2**32 by the caller, so it is always an int64 argument: one compile.
    _run(_ring_kernel, (1, 1, 1), (_HostArray(bells), slot, value),
         lambda: ("ring", device.index, bells.data_ptr() % 16), device, stream, num_warps=1)


def _on(stream, on_gpu: bool):
    """Work on ``stream`` when given (and the work is on a GPU), else on the current stream."""
    return torch.cuda.stream(stream) if stream is not None and on_gpu else contextlib.nullcontext()


def _words(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as the widest integer type that divides a block (the kernel copies
    bits, so fp8 and bf16 need no Triton dtype of their own)."""
    flat = t.reshape(t.shape[0], t.shape[1], -1).view(torch.uint8)   # [planes, blocks, bytes of a block]
    for dt, size in ((torch.int32, 4), (torch.int16, 2)):
        if flat.shape[2] % size == 0:
            return flat.view(dt)
    return flat


def _kernel_ok(src: torch.Tensor, dst: torch.Tensor) -> bool:
    if triton is None or not (src.is_contiguous() and dst.is_contiguous()):
        return False
    if src.device.type == "cuda":
        return dst.device == src.device
    return os.environ.get("TRITON_INTERPRET") == "1" and dst.device.type == "cpu"


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor, *,
                tile: tuple[int, int] | None = None, stream=None) -> None:
    """``dst[:, dst_ids[i]] = src[:, src_ids[i]]`` for every i, on ``stream`` (default:
    the current stream). ``src_ids``/``dst_ids`` are int64 tensors on the caches' device
    (the caller checks that they are in range: the kernel does not). ``tile`` overrides
    (words per program, warps) for tuning."""
    if src.dtype != dst.dtype or src.shape[0] != dst.shape[0] or src.shape[2:] != dst.shape[2:]:
        raise ValueError(f"copy_blocks: {tuple(src.shape)} {src.dtype} -> {tuple(dst.shape)} {dst.dtype}")
    if src.dim() < 2 or not 0 < src.shape[0] <= 65535:   # planes are the grid's second axis
        raise ValueError(f"copy_blocks: {src.shape[0] if src.dim() else 0} planes outside [1, 65535]")
    n = src_ids.numel()
    if n != dst_ids.numel():
        raise ValueError("copy_blocks: src_ids and dst_ids differ in length")
    if n == 0:
        return
    if not _kernel_ok(src, dst):
        with _on(stream, src.is_cuda):
            copy_blocks_reference(src, dst, src_ids, dst_ids)
        return
    s, d = _words(src), _words(dst)
    chunk, warps = tile or (_CHUNK, _WARPS)
    _launch((n, s.shape[0], triton.cdiv(s.shape[2], chunk)), s, d, src_ids, dst_ids, 0, chunk, warps, stream)


class CacheCopier:
    """:func:`copy_blocks` between two whole paged caches, ``[num_layers, 2, num_blocks,
    ...]`` each (block and layer counts may differ), for any run of consecutive layers
    both have. What one call would redo (the checks, the caches' word views) is done once
    here, so a sender launching a copy per group of layers pays only the launch."""

    def __init__(self, src_cache: torch.Tensor, dst_cache: torch.Tensor, *, tile: tuple[int, int] | None = None):
        if (src_cache.dim() < 4 or dst_cache.dim() != src_cache.dim() or src_cache.shape[1] != 2
                or dst_cache.shape[1] != 2 or src_cache.shape[3:] != dst_cache.shape[3:]
                or src_cache.dtype != dst_cache.dtype):
            raise ValueError(f"CacheCopier: {tuple(src_cache.shape)} {src_cache.dtype} -> "
                             f"{tuple(dst_cache.shape)} {dst_cache.dtype}")
        self.src_cache, self.dst_cache = src_cache, dst_cache
        self.num_layers = min(src_cache.shape[0], dst_cache.shape[0])
        self._kernel = _kernel_ok(src_cache, dst_cache)
        if self._kernel:
            self._s = _words(src_cache.flatten(0, 1))   # [2 * num_layers, num_blocks, words of a block]
            self._d = _words(dst_cache.flatten(0, 1))
        self._chunk, self._warps = tile or (_CHUNK, _WARPS)

    def copy(self, layers: range, src_ids: torch.Tensor, dst_ids: torch.Tensor, stream=None) -> None:
        """Blocks ``src_ids`` of ``layers`` of the source cache to blocks ``dst_ids`` of the
        same layers of the destination, on ``stream`` (default: the current stream)."""
        n = src_ids.numel()
        if n != dst_ids.numel() or not 0 <= layers.start < layers.stop <= self.num_layers or layers.step != 1:
            raise ValueError(f"CacheCopier.copy: layers {layers!r} of {self.num_layers}, {n} -> "
                             f"{dst_ids.numel()} blocks")
        if n == 0:
            return
        if not self._kernel:
            src = self.src_cache[layers.start:layers.stop].flatten(0, 1)
            copy_blocks(src, self.dst_cache[layers.start:layers.stop].flatten(0, 1), src_ids, dst_ids, stream=stream)
            return
        planes = 2 * len(layers)
        _launch((n, planes, triton.cdiv(self._s.shape[2], self._chunk)), self._s, self._d, src_ids, dst_ids,
                2 * layers.start, self._chunk, self._warps, stream)


class IndexStager:
    """Block-id lists to int64 tensors on a CUDA device without waiting for the device.

    ``torch.tensor(ids, device=)`` copies from pageable memory, which waits for the
    current stream's earlier work (a layer's compute, when the caller ships layers as they
    finish). Copies from pinned memory do not; this keeps one pinned buffer of ``slots``
    rows and fills them round-robin, so a request's ids need no pinned allocation of their
    own. A row whose last copy may still be reading it is not waited for: that upload
    goes through a freshly pinned tensor instead (torch's pinned-memory cache keeps it, and
    a replaced buffer, alive until the copies that read them have run). Uploads are queued
    on the current stream; the returned tensors belong to it (the caching allocator's
    rule). Not thread-safe: callers serialise (the cuda_ipc sender holds its lock)."""

    def __init__(self, slots: int = 8):
        self._slots = slots
        self._host: torch.Tensor | None = None   # [slots, capacity] int64, pinned
        self._events: list = [None] * slots
        self._next = 0
        self.fresh_uploads = 0                    # uploads that found their row busy

    def upload(self, lists: list[list[int]], device: torch.device) -> list[torch.Tensor]:
        """One H2D copy for all of ``lists``; a device tensor per list (views of one, each
        starting 16 bytes aligned: Triton specializes a kernel on its pointers' alignment,
        and a list after one of odd length would otherwise compile a second copy kernel
        in the middle of a transfer)."""
        padded = [len(x) + (len(x) & 1) for x in lists]   # even: 16 bytes of int64
        flat = torch.tensor([v for x, n in zip(lists, padded) for v in (*x, *[0] * (n - len(x)))], dtype=torch.long)
        n = flat.numel()
        if self._host is None or n > self._host.shape[1]:
            cap = 1 << max(10, (n - 1).bit_length())
            self._host = torch.empty(self._slots, cap, dtype=torch.long).pin_memory()
            self._events = [None] * self._slots
        i = self._next
        self._next = (i + 1) % self._slots
        ev = self._events[i]
        if ev is None or ev.query():
            src = self._host[i, :n]
            src.copy_(flat)
        else:
            src = flat.pin_memory()
            self.fresh_uploads += 1
        out = torch.empty(n, dtype=torch.long, device=device)
        out.copy_(src, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(device))
        self._events[i] = ev
        parts, at = [], 0
        for x, n in zip(lists, padded):
            parts.append(out[at:at + len(x)])
            at += n
        return parts
