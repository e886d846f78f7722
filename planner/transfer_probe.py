"""Timing a prompt's KV moving from one paged cache into another, for the profile.

Both ends live in this process and use the profiled engine's own cache (blocks [0, n) are
the source, [n, 2n) the destination; their contents are whatever the step probe left), so
no second cache has to fit beside it. What each backend measures:
  - "zmq": the real ZmqKVSender -> ZmqKVReceiver pair over TCP loopback, as the workers
    use it: each layer gathered from the cache (GPU: staged through pinned host memory),
    sent as header + bytes, written into the destination blocks by the receiver's
    write_layer (engine.write_kv_blocks). Time from the first send_layer to the
    receiver's Completed. Sender and receiver share one process (and its GIL), and every
    layer is queued at once, whereas a prefill worker ships each layer while computing the
    next: the simulator decides how much of it overlaps compute.
  - "device_copy": the data path of the cuda_ipc backend without its control messages:
    kv_transfer.block_copy.copy_blocks per layer, block id to block id, into the same
    device's cache (one GPU, as two workers sharing it), or into a buffer on cuda:1 when
    there are two GPUs (a peer copy). On CPU: the torch reference copy.

    On CUDA the copies are timed on the device: the host launches one copy per layer
    (tens of microseconds each), and the device moves even a GiB within one GPU in less time
    than those launches take, so a wall-clock time is the launches' and flat in bytes (a
    line through such points has a noise slope: an "impossible" bandwidth). The stream is
    held by a sleep kernel until every copy is queued, and CUDA events around the copies
    give the time the bytes took; the launch time is kept beside each point. Sizes go up to
    8 GiB (as the KV pool allows) so the largest copies are well past the fixed costs.
"""
from __future__ import annotations

import statistics
import time

import torch


def _sync(engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)


def transfer_sizes(engine, quick: bool, max_bytes: int | None = None) -> list[int]:
    """Token counts (whole blocks) to time: from one block up, while 2n blocks fit the pool
    and n tokens' KV stays under max_bytes (default 8 GiB on CUDA, 1 GiB elsewhere)."""
    bs = engine.cfg.block_size
    per_token = kv_bytes_per_token(engine)
    if max_bytes is None:
        max_bytes = 8 * 2**30 if engine.device.type == "cuda" else 2**30
    wanted = [bs, 256, 1024, 4096, 16384] if quick else [bs, 128, 512, 2048, 8192, 32768, 131072]
    out = []
    for t in wanted:
        n = -(-t // bs)
        if 2 * n <= engine.num_blocks and n * bs * per_token <= max_bytes and n * bs not in out:
            out.append(n * bs)
    return out


def kv_bytes_per_token(engine) -> int:
    """Bytes of KV one token holds in this engine's cache, every layer, K and V."""
    cache = engine.kv_cache   # [layer, k/v, block, slot, kv_head, head_dim]
    layers, kv, _, _, heads, head_dim = cache.shape
    return layers * kv * heads * head_dim * cache.element_size()


def measure_zmq(engine, sizes: list[int], warmup: int, repeats: int, progress=None) -> list[dict]:
    import kv_transfer as kt
    from kv_transfer.wire import KVLayout
    layout = KVLayout.from_engine(engine)
    rx = kt.make_receiver("zmq", layout, kt.engine_writer(engine), default_timeout_s=300)
    tx = kt.make_sender("zmq", rx.endpoint, send_timeout_s=300)
    bs, layers = layout.block_size, layout.num_layers
    points, k = [], 0
    try:
        for tokens in sizes:
            n = tokens // bs
            src = torch.arange(n, device=engine.device)
            dst = list(range(n, 2 * n))
            times = []
            for rep in range(warmup + repeats):
                k += 1
                rid = f"profile-xfer-{k}"
                rx.expect(rid, dst, layers, time.monotonic() + 300)
                _sync(engine)
                t0 = time.perf_counter()
                for layer in range(layers):
                    tx.send_layer(rid, layer, dst, engine.kv_cache[layer][:, src])
                tx.send_done(rid, 0, layers)
                while True:
                    res = rx.poll(100)
                    if any(f.request_id == rid for f in res.failed):
                        raise RuntimeError(f"zmq loopback transfer of {tokens} tokens failed: {res.failed}")
                    if any(c.request_id == rid for c in res.completed):
                        break
                _sync(engine)
                if rep >= warmup:
                    times.append(time.perf_counter() - t0)
            points.append(dict(bytes=tokens * kv_bytes_per_token(engine), seconds=statistics.median(times),
                               tokens=tokens))
            if progress is not None:
                progress()
    finally:
        tx.close(0)
        rx.close()
    return points


def measure_device_copy(engine, sizes: list[int], warmup: int, repeats: int, progress=None) -> list[dict]:
    from kv_transfer.block_copy import copy_blocks, copy_blocks_reference
    cache, dev = engine.kv_cache, engine.device
    bs, layers = cache.shape[3], cache.shape[0]
    peer = dev.type == "cuda" and torch.cuda.device_count() > 1
    points = []
    for tokens in sizes:
        n = tokens // bs
        src = torch.arange(n, device=dev)
        if peer:
            other = torch.device("cuda", ((dev.index or 0) + 1) % torch.cuda.device_count())
            dst_layer = torch.empty_like(cache[0][:, :n], device=other)
            dst = torch.arange(n, device=other)
        else:
            dst = torch.arange(n, 2 * n, device=dev)
        def copy_all():
            for layer in range(layers):
                if peer:
                    copy_blocks_reference(cache[layer], dst_layer, src, dst)
                elif dev.type == "cuda":
                    copy_blocks(cache[layer], cache[layer], src, dst)
                else:   # never the Triton interpreter on CPU: the reference is what CPU workers run
                    copy_blocks_reference(cache[layer], cache[layer], src, dst)
        times, launches = [], []
        for rep in range(warmup + repeats):
            _sync(engine)
            if dev.type == "cuda":
                seconds, launch_s = _device_timed(copy_all)
            else:
                t0 = time.perf_counter()
                copy_all()
                seconds = launch_s = time.perf_counter() - t0
            if rep >= warmup:
                times.append(seconds)
                launches.append(launch_s)
        point = dict(bytes=tokens * kv_bytes_per_token(engine), seconds=statistics.median(times), tokens=tokens)
        if dev.type == "cuda":
            point["launch_seconds"] = statistics.median(launches)
        points.append(point)
        if progress is not None:
            progress()
    return points


# Cycles the sleep kernel holds the stream while the copies are queued behind it (about
# 10 ms at the H100's clock: more than launching a few dozen copies takes).
_HOLD_CYCLES = 20_000_000


def _device_timed(launch) -> tuple[float, float]:
    """(device seconds, host launch seconds) of the kernels `launch()` queues: the stream
    is held by a sleep kernel until all are queued, so the events between them time the
    device's work alone, not the gaps between launches."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(_HOLD_CYCLES)
    start.record()
    t0 = time.perf_counter()
    launch()
    launch_s = time.perf_counter() - t0
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, launch_s


NOTES = {
    "zmq": "ZmqKVSender -> ZmqKVReceiver over TCP loopback in one process, the engine's own cache as "
           "source and destination; all layers queued at once (no overlap with compute)",
    "device_copy": "kv_transfer.block_copy per layer (the cuda_ipc data path, no control messages): "
                   "within one device's cache, or a peer copy to cuda:1 when present; on CUDA device time "
                   "between events with every copy queued behind a sleep kernel (launch_seconds: the host's "
                   "launches, beside it)",
}


def measure(engine, backend: str, quick: bool, warmup: int, repeats: int, progress=None) -> dict:
    sizes = transfer_sizes(engine, quick)
    if not sizes:
        raise ValueError("the KV pool is too small to time a transfer (need 2 blocks)")
    if backend == "zmq":
        points = measure_zmq(engine, sizes, warmup, repeats, progress)
    elif backend == "device_copy":
        points = measure_device_copy(engine, sizes, warmup, repeats, progress)
    else:
        raise ValueError(f"transfer backend: {backend!r}; one of 'zmq', 'device_copy'")
    note = NOTES[backend]
    if backend == "device_copy" and engine.device.type == "cuda":
        note += " (peer copy to a second GPU)" if torch.cuda.device_count() > 1 else " (within one GPU)"
    return dict(backend=backend, points=points, notes=note)
