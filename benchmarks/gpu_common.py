"""Shared pieces of the GPU benchmarks: the two ceilings measured in the same run (device
copy bandwidth, bf16 matmul rate), timing helpers and the model's byte/FLOP counts.

Machines are shared and noisy, so every benchmark measures its ceilings itself and reports
ratios against them rather than absolute numbers alone.
"""
from __future__ import annotations

import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def triton_variants() -> dict[str, set]:
    """The compiled variants (their cache keys: the argument specialization) held by each
    of the engine's Triton kernels, all devices: the ones new after a timed run are the
    compiles that stalled it, and their keys say which argument asked for them."""
    import importlib
    out = {}
    for mod in ("engine.kernels.triton_ops", "engine.quant.triton_kernels", "kv_transfer.block_copy"):
        try:
            m = importlib.import_module(mod)
        except Exception:
            continue
        for name, obj in vars(m).items():
            caches = getattr(obj, "device_caches", None)
            if caches is None:
                continue
            try:
                keys = {str(k) for entry in caches.values() for k in entry[0]}
            except Exception:   # another Triton's layout: not counted
                continue
            if keys:
                out[f"{mod.rsplit('.', 1)[-1]}.{name}"] = keys
    return out


def cuda_time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median of `iters` event-timed calls of fn() (after warm-up), in ms."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s). Random data."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), iters=20)
    del src, dst
    return 2 * nbytes / ms / 1e6


def matmul_tflops(n: int = 8192) -> float:
    """bf16 n^3 matrix product on random data, TFLOP/s (median of 10 after 3 warm-ups)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time_ms(lambda: a @ b, iters=10)
    del a, b
    return 2 * n ** 3 / ms / 1e9


def weight_bytes_per_decode_step(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step must read: every parameter except the embedding
    table, of which a step reads only its batch's rows (the lm_head is read whole; with
    tied embeddings it *is* the table, which is then counted)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if getattr(model, "lm_head", None) is not None:
        e = model.embed_tokens.weight
        total -= e.numel() * e.element_size()
    return total


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters in the decoder layers' matrices, parameters of the logits projection)."""
    layer = sum(p.numel() for n, p in model.layers.named_parameters() if p.dim() == 2)
    head = (model.lm_head.weight if model.lm_head is not None else model.embed_tokens.weight).numel()
    return layer, head


def device_info() -> dict:
    p = torch.cuda.get_device_properties(0)
    import triton
    import transformers
    return dict(gpu=p.name, sms=p.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, transformers=transformers.__version__)


def dump(path: str | None, record: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(record, f, indent=2)


def timeline(ranges: list[tuple[float, float, str]]) -> tuple[float, float, list[dict]]:
    """(start, end, name) of the device work of one call -> (span from the first start to
    the last end, the time inside it when nothing ran, and each such gap: its length `us`,
    `at_us` from the span's start, the work that ended last before it (`after`) and the
    work that starts it (`before`)). Overlapping work (several streams) counts once."""
    ranges = sorted(ranges)
    first = ranges[0][0]
    gaps, idle = [], 0.0
    cur_e, cur_name = ranges[0][1], ranges[0][2]
    for s_, e_, name in ranges[1:]:
        if s_ > cur_e:
            idle += s_ - cur_e
            gaps.append(dict(us=s_ - cur_e, at_us=cur_e - first, after=cur_name[:80], before=name[:80]))
        if e_ >= cur_e:
            cur_e, cur_name = e_, name
    return cur_e - first, idle, gaps


def kernel_profile(fn, iters: int = 5, top: int = 40, top_gaps: int = 12) -> dict:
    """GPU work run by fn() (a graph replay's kernels included; memcpy and memset entries
    too), from torch.profiler: per name, device us per call of fn and launches per call
    of fn, the slowest first, plus the sum of them all. Where a step's device time goes,
    which the event timings above cannot say. Each call is profiled on its own, so its
    timeline splits too: `span_us` from its first kernel's start to its last one's end,
    `idle_us` the gaps inside that span where nothing ran, and `wall_us` the call's time
    up to a sync after it: wall - span is host time before the first kernel and after the
    last, inflated by the profiler's own cost per launch (large for an eager step of many
    launches), so read it as an upper bound. `widest_gaps`: the widest idle gaps over all
    the calls, each with the kernel that ran before it and the one after, and how far into
    its call's span it opened: where in a step the device waited, hence on what."""
    import time as _time
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    per_name: dict[str, list[float]] = {}
    spans, idles, walls, gaps = [], [], [], []
    for _ in range(iters):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t = _time.perf_counter()
            fn()
            torch.cuda.synchronize()
            walls.append((_time.perf_counter() - t) * 1e6)
        ranges = []
        for e in prof.events():
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            per_name.setdefault(e.name, []).append(e.device_time_total)
            ranges.append((e.time_range.start, e.time_range.end, e.name))
        if ranges:
            span, idle, call_gaps = timeline(ranges)
            gaps += [dict(g, call=len(spans)) for g in call_gaps]
            spans.append(span)
            idles.append(idle)
    rows = sorted(({"kernel": n[:120], "us": sum(t) / iters, "launches": len(t) / iters}
                   for n, t in per_name.items()), key=lambda r: -r["us"])
    med = statistics.median
    return dict(total_us=sum(r["us"] for r in rows), kernels=rows[:top],
                span_us=med(spans) if spans else None, idle_us=med(idles) if idles else None,
                wall_us=med(walls), widest_gaps=sorted(gaps, key=lambda g: -g["us"])[:top_gaps])


def print_kernel_profile(title: str, prof: dict) -> None:
    print(f"{title}: {prof['total_us']:.1f} us of kernels per call; wall {prof['wall_us']:.1f} us, "
          f"first kernel to last {prof['span_us']:.1f} us, of it idle {prof['idle_us']:.1f} us", flush=True)
    for r in prof["kernels"]:
        print(f"  {r['us']:9.1f} us  x{r['launches']:6.1f}  {r['kernel']}", flush=True)
    for g in prof.get("widest_gaps", []):
        print(f"  gap {g['us']:8.1f} us at {g['at_us']:9.1f} us of call {g['call']}: after {g['after']} "
              f"| before {g['before']}", flush=True)
