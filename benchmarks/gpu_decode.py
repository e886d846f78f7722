"""GPU decode benchmark: one decode step of `random:llama3-8b` (bf16) against the memory
roofline measured in the same run.

For each batch size B, B requests with 512-token prompts are prefilled, then `--steps`
decode steps are timed with all B sequences decoding (context 513..513+steps):

  engine ms/step   LLMEngine.step() wall time with overlapped scheduling (the default on a
                   GPU): the host schedules and stages step n+1 while the GPU runs step n
  sync ms/step     the same with overlap off (async_scheduling=False): scheduling, input
                   building, the CUDA-graph replay, sampling and the one host sync in a row
  graph ms         the replay alone (CUDA events), i.e. the GPU time of the step
  graph b2b ms     10 replays back to back between two events, per replay: the GPU time of
                   a step when the GPU never waits; host ms = engine ms - graph b2b ms
  eager ms/step    the same steps with CUDA graphs switched off
  matmul ms        a CUDA graph of only the step's matrix products (the weights' share)
  roofline ms      (weight bytes + KV bytes read) / device copy bandwidth

Weight bytes: every parameter except the input embedding table (a step reads B rows of
it); KV bytes: K and V of every context token of every layer. The copy bandwidth is a
device-to-device copy counting bytes read + written. Ratios are roofline / measured.

With --kernels it also times the per-layer small kernels at batch 1 (graph-replayed), the
decode attention under a few split-K settings, and the batch-1 projections three ways
(F.linear on [N, K] weights, cuBLASLt preferred, x @ W on [K, N] copies), to show where
the gap goes.

    python benchmarks/gpu_decode.py [--batches 1,8,32,128] [--ctx 512] [--steps 32]
                                    [--overlap both|on|off] [--kernels] [--no-fused-products] [--max-num-seqs N]
                                    [--graph-kernels] [--graph-pools] [--temperature T] [--top-p P]
                                    [--json out.json]

--overlap picks which of the two engine timings run (both by default; the one left out
is reported as None).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import gpu_common as gc_

from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.model_runner import kv_bytes_per_token  # noqa: E402


def linear_only_ms(model, B: int) -> float:
    """GPU time of the step's matrix products alone at batch B, graph-replayed."""
    cfg = model.cfg
    dev, dt = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    x = torch.randn(B, cfg.hidden_size, device=dev, dtype=dt)
    a = torch.randn(B, cfg.num_heads * cfg.head_dim, device=dev, dtype=dt)
    h = torch.randn(B, cfg.intermediate_size, device=dev, dtype=dt)
    head = model.lm_head.weight if model.lm_head is not None else model.embed_tokens.weight

    def step():
        for layer in model.layers:
            F.linear(x, layer.self_attn.qkv_proj.weight)
            F.linear(a, layer.self_attn.o_proj.weight)
            F.linear(x, layer.mlp.gate_up_proj.weight)
            F.linear(h, layer.mlp.down_proj.weight)
        F.linear(x, head)

    step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    return gc_.cuda_time_ms(g.replay, iters=20)


def matmul_path_check(model, n_layers: int = 8) -> dict:
    """Batch-1 GPU time per layer (us) of the four projections of `n_layers` layers, graph-
    replayed, three ways: F.linear on the [N, K] weights (what the model runs), the same
    with cuBLASLt preferred over cuBLAS, and x @ W with the weights copied to [K, N].
    8 layers hold 3.5 GB of weights, far more than L2, so every product streams from HBM."""
    cfg = model.cfg
    dev, dt = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    x = torch.randn(1, cfg.hidden_size, device=dev, dtype=dt)
    a = torch.randn(1, cfg.num_heads * cfg.head_dim, device=dev, dtype=dt)
    h = torch.randn(1, cfg.intermediate_size, device=dev, dtype=dt)
    layers = list(model.layers)[:n_layers]
    mats = [(x, l.self_attn.qkv_proj.weight) for l in layers] + [(a, l.self_attn.o_proj.weight) for l in layers] \
        + [(x, l.mlp.gate_up_proj.weight) for l in layers] + [(h, l.mlp.down_proj.weight) for l in layers]

    def graph_us(fn) -> float:
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return gc_.cuda_time_ms(g.replay, iters=20) * 1000 / n_layers

    out = {"linear_nk_us_per_layer": graph_us(lambda: [F.linear(i, w) for i, w in mats])}
    try:
        prev = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            out["linear_nk_cublaslt_us_per_layer"] = graph_us(lambda: [F.linear(i, w) for i, w in mats])
        finally:
            torch.backends.cuda.preferred_blas_library(prev)
    except Exception as e:  # noqa: BLE001 - report, do not fail the benchmark
        out["cublaslt_error"] = repr(e)
    kn = [(i, w.t().contiguous()) for i, w in mats]
    out["matmul_kn_us_per_layer"] = graph_us(lambda: [torch.mm(i, w) for i, w in kn])
    wbytes = sum(w.numel() * w.element_size() for _, w in mats) / n_layers
    out["bytes_per_layer"] = wbytes
    del kn
    torch.cuda.empty_cache()
    return out


def kernel_breakdown(engine, ctx: int) -> dict:
    """Batch-1 graph-replayed times (us) of one layer's non-matmul kernels, and the decode
    attention under several split-K settings at batch 1 and 8."""
    import triton.testing as tt

    from engine.kernels import triton_ops as tri
    r = engine.runner
    cfg = r.mcfg
    dev, dt = r.device, r.dtype
    H, KH, D, BS = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, r.block_size
    k_cache, v_cache = r.kv_caches[0]
    # The table width the decode graphs use at this context.
    width = r.decode_graphs.width_for(-(-(ctx + 64) // BS))
    out = {}

    def bench(fn):
        return round(tt.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1000, 2)

    x = torch.randn(1, cfg.hidden_size, device=dev, dtype=dt)
    w = torch.ones(cfg.hidden_size, device=dev, dtype=dt)
    q = torch.randn(1, H, D, device=dev, dtype=dt)
    k = torch.randn(1, KH, D, device=dev, dtype=dt)
    pos = torch.tensor([ctx], device=dev)
    gu = torch.randn(1, 2 * cfg.intermediate_size, device=dev, dtype=dt)
    slots = torch.tensor([-1], device=dev)
    out["add_rms_norm_us"] = bench(lambda: tri.add_rms_norm(x, x, w, 1e-5))
    out["rotary_us"] = bench(lambda: tri.rotary_embedding(q, k, pos, r.model.cos_sin_cache))
    out["write_kv_us"] = bench(lambda: tri.write_kv(k, k, k_cache, v_cache, slots))
    out["rotary_write_kv_us"] = bench(lambda: tri.rotary_embedding_write_kv(
        q, k, k, pos, r.model.cos_sin_cache, k_cache, v_cache, slots))
    out["silu_and_mul_us"] = bench(lambda: tri.silu_and_mul(gu))
    n_blocks = r.num_blocks
    for B in (1, 8):
        qb = torch.randn(B, H, D, device=dev, dtype=dt)
        tables = torch.randint(0, n_blocks, (B, width), device=dev, dtype=torch.int32)
        lens = torch.full((B,), ctx, device=dev, dtype=torch.int32)
        for part in (None, 0, 64, 128, 256):
            for bn in (32, 64):
                if part and part % bn:
                    continue
                # The split-K reduce folded into the partition kernel and as its own
                # kernel (the default); a single pass has no reduce.
                for fold in ((True, False) if part != 0 else (True,)):
                    key = (f"decode_attn_b{B}_part{'auto' if part is None else part}_bn{bn}"
                           f"{'' if fold else '_reduce_kernel'}_us")
                    out[key] = bench(lambda: tri._paged_decode_attention(
                        qb, k_cache, v_cache, tables, lens, D ** -0.5, partition_tokens=part,
                        config={"BLOCK_N": bn}, fold_reduce=fold))
    return out


def graph_pool_diagnostic(graphs, key) -> dict:
    """Back-to-back replay ms of the graph `key`: as captured, recaptured in a private
    pool, recaptured in the shared pool, and the original once every other graph is
    dropped (so run it after the row's timings). Separates where its activations sit
    from how many graphs the engine holds."""
    b, w = key

    def b2b(g):
        return gc_.cuda_time_ms(lambda: [g.replay() for _ in range(10)], iters=5) / 10

    @torch.inference_mode()   # as DecodeGraphs.capture: no autograd state kept by the graph
    def recapture(pool):
        for _ in range(2):
            graphs._forward(b, w)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            graphs._forward(b, w)
        return g

    out = dict(original=b2b(graphs.graphs[key]))
    out["private_pool"] = b2b(recapture(None))
    out["shared_pool"] = b2b(recapture(graphs.graphs[key].pool()))
    for k in [k for k in graphs.graphs if k != key]:
        del graphs.graphs[k]
    torch.cuda.synchronize()
    out["alone"] = b2b(graphs.graphs[key])
    print(f"graph {key} back to back, ms: {out}", flush=True)
    return out


def use_gemv_tiles(path: str) -> None:
    """The engine's Triton products take gpu_gemv.py's choice (read when the graphs are
    captured: call before the engine starts). An op the sweep did not keep goes to cuBLAS."""
    from engine.kernels import triton_ops as tri
    with open(path) as f:
        rec = json.load(f)
    assert rec["tile_fields"] == list(tri.GemvTile._fields), "the sweep's file is of another GemvTile"
    ops = {"none": [tri._PRO_NONE], "add_norm": [tri._PRO_NORM, tri._PRO_ADD_NORM], "silu": [tri._PRO_SILU_MUL]}
    from gpu_gemv import from_key
    tiles = {prologue: from_key(key) for op, key in rec["engine_tiles"].items() for prologue in ops[op]}
    tri.GEMV_CONFIGS = tiles
    tri.FUSED_GEMV_MAX_WEIGHT_BYTES = max(rec["fuse_max_weight_bytes"], 1)
    print("Triton products:", tiles, "up to", tri.FUSED_GEMV_MAX_WEIGHT_BYTES / 1e6, "MB", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--overlap", choices=("both", "on", "off"), default="both",
                    help="time steps with overlapped scheduling on, off, or both (one engine, switched)")
    ap.add_argument("--no-fused-products", action="store_true",
                    help="the norms and the activation as their own kernels before cuBLAS, at every batch "
                         "(by default batch 1 folds them into Triton products: triton_ops.FUSED_GEMV_MAX_ROWS)")
    ap.add_argument("--gemv-tiles", metavar="GEMV_JSON",
                    help="run the batch-1 Triton products with the tiles gpu_gemv.py chose (its engine_tiles "
                         "and fuse_max_weight_bytes) instead of the engine's table")
    ap.add_argument("--pdl-kernels", action="store_true",
                    help="the small Triton kernels (norms, activation, rotary + KV write, decode attention) as programmatic "
                         "dependent launches too (triton_ops.PDL_KERNELS)")
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="the engine's max_num_seqs (default: the largest batch timed)")
    ap.add_argument("--graph-kernels", action="store_true",
                    help="per batch, the kernels of its graph replay and their device time (torch.profiler)")
    ap.add_argument("--graph-pools", action="store_true",
                    help="diagnostic, last batch only: its graph's back-to-back replay recaptured in a "
                         "private memory pool, recaptured in the shared one, and alone (every other graph "
                         "dropped); destroys the engine's other graphs")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="the requests sample (0: greedy): what the sampler adds to a step, and whether the "
                         "overlap still hides the host")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.no_fused_products:
        from engine.kernels import triton_ops
        triton_ops.FUSED_GEMV_MAX_ROWS = 0   # read when the graphs are captured: before the engine
    if args.gemv_tiles:
        use_gemv_tiles(args.gemv_tiles)
    if args.pdl_kernels:
        from engine.kernels import triton_ops
        triton_ops.PDL_KERNELS = True
    batches = [int(b) for b in args.batches.split(",")]

    bw = gc_.copy_bandwidth_gbs()
    print(f"device copy bandwidth (read+write): {bw:.0f} GB/s", flush=True)
    t0 = time.time()
    engine = LLMEngine(args.model, device="cuda", dtype="bfloat16", enable_prefix_caching=False,
                       max_num_seqs=args.max_num_seqs or max(batches), max_num_batched_tokens=8192)
    print(f"engine up in {time.time() - t0:.1f}s ({engine.runner.num_blocks} KV blocks)", flush=True)
    model = engine.runner.model
    wbytes = gc_.weight_bytes_per_decode_step(model)
    kv_tok = kv_bytes_per_token(engine.model_config, engine.dtype)
    rows = []
    for B in batches:
        n_steps = args.steps
        sp = SamplingParams(max_tokens=4 * n_steps + 40, ignore_eos=True, temperature=args.temperature,
                            top_p=args.top_p)
        g = torch.Generator().manual_seed(B)
        for i in range(B):
            engine.add_request(f"b{B}-{i}", torch.randint(100, 120000, (args.ctx,), generator=g).tolist(), sp)
        # Prefill everyone (some early ones decode a few tokens meanwhile).
        first = set()
        while len(first) < B:
            first.update(o.request_id for o in engine.step())
        seqs = list(engine._seqs.values())
        ctx0 = sum(s.num_tokens for s in seqs) / B

        def timed_steps(overlap: bool = False, steps: int = n_steps):
            # Switching drains (off) or primes (on) the pipeline: a few untimed steps first,
            # so every timed step returns one token per sequence.
            engine.overlap = overlap
            for _ in range(3):
                engine.step()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                outs = engine.step()
                assert len(outs) == B, f"expected {B} decodes per step, got {len(outs)}"
            # With overlap the GPU work timed is the `steps` launches made in the loop (the one
            # in flight at the start finished before t): wait for the last one too.
            torch.cuda.synchronize()
            return (time.perf_counter() - t) / steps * 1000

        graphs = engine.runner.decode_graphs
        replays = graphs.num_replays
        timed_steps()  # warm-up of this batch's path
        # Overlap on and off alternate A-B-B-A (half the steps each), so a drift of the GPU's
        # speed over the run (clocks, heat) weighs on both alike; the graph replay is timed
        # in the middle.
        # (Off in the middle: no launched step is pending while the graph is replayed alone.)
        modes = {"both": (True, False), "on": (True,), "off": (False,)}[args.overlap]
        half = max(1, n_steps // 2)
        times: dict[bool, list[float]] = {m: [] for m in modes}
        for m in modes:
            times[m].append(timed_steps(m, half))
        key = (graphs.bucket_for(B), graphs.width_for(max(len(s.block_table) for s in seqs)))
        graph_ms = gc_.cuda_time_ms(graphs.graphs[key].replay, iters=20)
        # Replays back to back between two events (the GPU never waits for the host), as in
        # a pipelined engine: what engine ms/step is compared with for the host's share.
        replay = graphs.graphs[key].replay
        graph_b2b_ms = gc_.cuda_time_ms(lambda: [replay() for _ in range(10)], iters=5) / 10
        graph_kernels = None
        if args.graph_kernels:
            graph_kernels = gc_.kernel_profile(replay)
            gc_.print_kernel_profile(f"batch {B} graph {key}", graph_kernels)
        for m in reversed(modes):
            times[m].append(timed_steps(m, half))
        engine_ms = sum(times[True]) / 2 if True in times else None
        sync_ms = sum(times[False]) / 2 if False in times else None
        assert graphs.num_replays - replays == (n_steps + 3) + 2 * len(modes) * (half + 3), \
            "decode steps did not replay graphs"
        engine.runner.decode_graphs = None
        try:
            # The eager path's first steps compile Triton specialisations of its own.
            for _ in range(4):
                engine.step()
            eager_ms = timed_steps()
        finally:
            engine.runner.decode_graphs = graphs
        # After every timing of the row: it drops the engine's other graphs.
        pools = graph_pool_diagnostic(graphs, key) if args.graph_pools and B == batches[-1] else None
        ctx_avg = ctx0 + n_steps + 3 + len(modes) * (half + 3)  # middle of the timed steps
        for s in seqs:
            engine.abort(s.seq_id)
        mm_ms = linear_only_ms(model, B)
        nbytes = wbytes + B * ctx_avg * kv_tok
        roof_ms = nbytes / bw / 1e6
        best = engine_ms if engine_ms is not None else sync_ms
        row = dict(batch=B, ctx=round(ctx_avg), engine_ms=engine_ms, sync_ms=sync_ms, graph_ms=graph_ms,
                   eager_ms=eager_ms, matmul_ms=mm_ms, roofline_ms=roof_ms, bytes=nbytes,
                   engine_ratio=roof_ms / best, graph_ratio=roof_ms / graph_ms,
                   graph_b2b_ms=graph_b2b_ms, graph_kernels=graph_kernels, graph_pools=pools,
                   host_ms=None if engine_ms is None else engine_ms - graph_b2b_ms,
                   sync_host_ms=None if sync_ms is None else sync_ms - graph_b2b_ms,
                   overlap_speedup=None if None in (engine_ms, sync_ms) else sync_ms / engine_ms,
                   tokens_per_s=B / best * 1000)
        rows.append(row)
        print(row, flush=True)
    from engine.kernels import triton_ops
    rec = dict(device=gc_.device_info(), copy_gbs=bw, weight_bytes=wbytes, kv_bytes_per_token=kv_tok,
               fused_products_max_rows=triton_ops.FUSED_GEMV_MAX_ROWS, max_num_seqs=engine.cfg.max_num_seqs,
               gemv_tiles={k: list(v) for k, v in triton_ops.GEMV_CONFIGS.items()},
               fused_max_weight_bytes=triton_ops.FUSED_GEMV_MAX_WEIGHT_BYTES, pdl_kernels=triton_ops.PDL_KERNELS,
               pdl_supported=triton_ops._pdl_supported(torch.device("cuda")),
               temperature=args.temperature, top_p=args.top_p, rows=rows)
    if args.kernels:
        rec["kernels"] = kernel_breakdown(engine, args.ctx)
        print(rec["kernels"], flush=True)
        mp = matmul_path_check(model)
        mp["roofline_us_per_layer"] = mp["bytes_per_layer"] / bw / 1e3
        rec["matmul_path"] = mp
        print(mp, flush=True)
    gc_.dump(args.json, rec)
    print(f"\n{rec['device']['gpu']}: copy {bw:.0f} GB/s, weights {wbytes / 1e9:.2f} GB")
    def ms(x):
        return "-" if x is None else f"{x:.2f}"

    print("| batch | ctx | engine ms/step (overlap) | sync ms/step | overlap speed-up | tok/s | graph ms "
          "| graph b2b ms | host ms overlap / sync | eager ms/step | matmul-only ms | roofline ms | roofline/engine | roofline/graph |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gain = "-" if r["overlap_speedup"] is None else f"{r['overlap_speedup']:.2f}x"
        print(f"| {r['batch']} | {r['ctx']} | {ms(r['engine_ms'])} | {ms(r['sync_ms'])} | {gain} "
              f"| {r['tokens_per_s']:.0f} | {r['graph_ms']:.2f} | {r['graph_b2b_ms']:.2f} "
              f"| {ms(r['host_ms'])} / {ms(r['sync_host_ms'])} "
              f"| {r['eager_ms']:.2f} | {r['matmul_ms']:.2f} | {r['roofline_ms']:.2f} | {r['engine_ratio']:.1%} "
              f"| {r['graph_ratio']:.1%} |")


if __name__ == "__main__":
    main()
