"""Sampling a step's sampled rows one at a time against as one batch (engine/sampler.py).

For batches of rows that all sample (temperature, optionally top-k/top-p, optionally each
with its own seed) over a vocabulary, the time of the per-row form (the sampler before
sampled rows were batched, restated here) and of sample_on_device, median of --repeat
calls. On a GPU it also gives the host time of each (the call returns before the device
finishes: what an overlapped step's critical path pays) and the number of kernels each
launches (torch.profiler).

    python benchmarks/sampler_batch.py [--device cpu|cuda] [--batches 1,8,32,128]
                                       [--vocab 49152,128256] [--logits zipf|randn]
                                       [--repeat 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.sampler import sample_on_device  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

SETTINGS = {
    "temperature": dict(temperature=0.8),
    "top_k+top_p": dict(temperature=0.8, top_k=50, top_p=0.95),
    "top_p, seeded": dict(temperature=0.8, top_p=0.95, seed=True),
}


def filter_one_row(logits, top_k, top_p):
    # The one-row filter the sampler used before (a full sort for top-p).
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def per_row(logits, params, generators):
    tokens = logits.argmax(dim=-1).clone()
    for i, p in enumerate(params):
        if not p.greedy:
            row = filter_one_row(logits[i] / p.temperature, p.top_k, p.top_p)
            tokens[i] = torch.multinomial(row.softmax(-1), 1, generator=generators[i])[0]
    return tokens


def batched(logits, params, generators):
    return sample_on_device(logits, params, generators)[0]


def make_logits(kind: str, B: int, V: int, dev) -> torch.Tensor:
    g = torch.Generator().manual_seed(B)
    if kind == "randn":   # wide: at T=0.8 a top-p of 0.95 keeps hundreds to thousands of tokens
        x = torch.randn(B, V, generator=g) * 3
    else:   # "zipf": probabilities falling as 1/rank, as a language model's roughly do
        ranks = torch.stack([torch.randperm(V, generator=g) for _ in range(B)]) + 1
        x = -1.1 * ranks.double().log().float() + 0.3 * torch.randn(B, V, generator=g)
    return x.to(dev)


def timed(fn, dev, repeat):
    """(median wall ms to a sync after the call, median ms for the call to return)."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fn()
    sync()
    walls, hosts = [], []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        hosts.append(time.perf_counter() - t)
        sync()
        walls.append(time.perf_counter() - t)
    return statistics.median(walls) * 1e3, statistics.median(hosts) * 1e3


def launches(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--vocab", default="49152,128256")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--logits", choices=("zipf", "randn"), default="zipf")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    rows = []
    for V in (int(v) for v in args.vocab.split(",")):
        for B in (int(b) for b in args.batches.split(",")):
            logits = make_logits(args.logits, B, V, dev)
            for name, kw in SETTINGS.items():
                kw = dict(kw)
                seeded = kw.pop("seed", False)
                params = [SamplingParams(seed=i if seeded else None, **kw) for i in range(B)]
                gens = [torch.Generator(device=dev).manual_seed(i) if seeded else None for i in range(B)]
                row = dict(vocab=V, batch=B, setting=name)
                for tag, fn in (("per_row", per_row), ("batched", batched)):
                    wall, host = timed(lambda: fn(logits, params, gens), dev, args.repeat)
                    row[f"{tag}_ms"], row[f"{tag}_host_ms"] = wall, host
                    if dev.type == "cuda":
                        row[f"{tag}_kernels"] = launches(lambda: fn(logits, params, gens))
                rows.append(row)
                extra = (f"; host {row['per_row_host_ms']:.2f} / {row['batched_host_ms']:.2f} ms, kernels "
                         f"{row['per_row_kernels']} / {row['batched_kernels']}" if dev.type == "cuda" else "")
                print(f"V={V} B={B:4d} {name:14s} per-row {row['per_row_ms']:8.2f} ms  batched "
                      f"{row['batched_ms']:8.2f} ms  ({row['per_row_ms'] / row['batched_ms']:.1f}x){extra}",
                      flush=True)
    if args.json:
        rec = dict(device=str(dev), logits=args.logits, repeat=args.repeat, gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                   threads=torch.get_num_threads(), torch=torch.__version__, rows=rows)
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
