"""KV transfer between two GPUs over the "nccl" backend (kv_transfer/p2p_backend.py), next
to raw NCCL send/recv measured in the same run, and TTFT of one prompt disaggregated vs
prefilled in place.

    python benchmarks/gpu_kv_transfer.py                       # 2 GPUs: random:llama3-8b, 4096 tokens
    python benchmarks/gpu_kv_transfer.py --json                # one JSON object on stdout
    python benchmarks/gpu_kv_transfer.py --cpu-smoke --json    # same code on CPU (gloo, random:tiny):
                                                               # checks the pieces, numbers meaningless

Two processes (torch.multiprocessing spawn): rank 0 is the prefill side (cuda:0), rank 1
the decode side (cuda:1, the KV receiver). They coordinate through a harness TCPStore
(strings only, no pickle). Timestamps cross processes as time.monotonic() values, which
Linux takes from one system-wide clock, so both ranks must run on one host (they do).

1. raw NCCL: a two-rank pair group (the backend's own make_pair_group), `iters` sends of
   one layer's bytes and of the whole prompt's bytes, timed on the receiver after a
   handshake: GB/s = bytes / seconds.
2. transfer: the prompt's KV (layers x [2, blocks, block_size, kv_heads, head_dim], random
   data on cuda:0) through P2PKVSender.send_layer per layer -> P2PKVReceiver, written into
   a paged cache on cuda:1 with index copies; time from the first send_layer call to the
   receiver's Completed; GB/s = KV bytes / seconds.
3. TTFT: both ranks load the model. In place: the decode rank prefills the prompt and
   samples the first token. Disaggregated: the decode rank reserves blocks
   (add_remote_prefill) and announces them; the prefill rank computes the prompt, shipping
   each layer from on_layer_done while the next layer computes, then `done`; TTFT ends when
   the decode rank's remote_kv_landed returns the first token. The router and the token
   plane are left out on both sides. Both runs then decode `--decode-tokens` greedy tokens
   and the JSON says whether they are equal (the disaggregated KV is the in-place KV).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PREFILL, DECODE = 0, 1
TIMEOUT = datetime.timedelta(seconds=600)


def device_of(rank: int, cpu: bool) -> torch.device:
    return torch.device("cpu") if cpu else torch.device("cuda", rank)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---- coordination (harness only) ------------------------------------------------------------------------
class Board:
    """Strings through the harness TCPStore: put(key, obj) / get(key) -> obj (JSON)."""

    def __init__(self, port: int, master: bool):
        import torch.distributed as dist
        self.store = dist.TCPStore("127.0.0.1", port, is_master=master, timeout=TIMEOUT, wait_for_workers=False)

    def put(self, key: str, obj) -> None:
        self.store.set(key, json.dumps(obj))

    def get(self, key: str):
        return json.loads(self.store.get(key).decode())


# ---- 1. raw NCCL ---------------------------------------------------------------------------------------
def raw_p2p(rank: int, board: Board, args, dev: torch.device, sizes: list[int]) -> dict:
    from kv_transfer.p2p_backend import make_pair_group, wait_work
    pg_name = "gloo" if dev.type == "cpu" else "nccl"
    port = board.get("store_port")
    group = make_pair_group(pg_name, "127.0.0.1", port, "raw", rank, connect_timeout_s=300, op_timeout_s=300)
    out = {}
    for nbytes in sizes:
        buf = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
        if rank == PREFILL:
            buf.normal_()
        times = []
        for rep in range(args.warmup + args.repeat):
            hs = torch.zeros(1, device=dev)
            if rank == PREFILL:
                wait_work(group.send([hs], DECODE, 0), pg_name, 300)
                works = [group.send([buf], DECODE, 1 + i) for i in range(args.iters)]
                for w in works:
                    wait_work(w, pg_name, 300)
            else:
                wait_work(group.recv([hs], PREFILL, 0), pg_name, 300)
                sync(dev)
                t0 = time.perf_counter()
                works = [group.recv([buf], PREFILL, 1 + i) for i in range(args.iters)]
                for w in works:
                    wait_work(w, pg_name, 300)
                sync(dev)
                if rep >= args.warmup:
                    times.append(time.perf_counter() - t0)
        if rank == DECODE:
            out[str(nbytes)] = nbytes * args.iters / statistics.median(times) / 1e9
        del buf
    from kv_transfer.p2p_backend import abort_group
    abort_group(group)
    return out


# ---- 2. transfer through the backend -------------------------------------------------------------------
def kv_layout(mcfg, num_blocks: int, block_size: int, dtype: torch.dtype):
    from kv_transfer.wire import KVLayout, dtype_name
    return KVLayout(num_layers=mcfg.num_layers, num_blocks=num_blocks, block_size=block_size,
                    num_kv_heads=mcfg.num_kv_heads, head_dim=mcfg.head_dim, dtype=dtype_name(dtype))


def transfer(rank: int, board: Board, args, dev: torch.device, layout) -> dict:
    """Ship `args.prompt_tokens` worth of KV `args.repeat` times (after warm-up)."""
    import kv_transfer as kt
    n = -(-args.prompt_tokens // layout.block_size)
    shape = layout.block_shape(n)
    out = {}
    if rank == DECODE:
        cache = torch.zeros(layout.num_layers, *layout.block_shape(layout.num_blocks), dtype=layout.torch_dtype,
                            device=dev)

        def write(rid, layer, block_ids, t):
            cache[layer][:, torch.tensor(block_ids, device=dev)] = t

        rx = kt.make_receiver("nccl", layout, write, device=dev, op_timeout_s=300, connect_timeout_s=300)
        board.put("endpoint/xfer", rx.endpoint)
        secs = []
        for rep in range(args.warmup + args.repeat):
            dst = list(range(layout.num_blocks - 1, layout.num_blocks - 1 - n, -1))   # scattered order
            rid = f"x{rep}"
            rx.expect(rid, dst, layout.num_layers, time.monotonic() + 300)
            board.put(f"xfer/{rep}", dst)
            done = []
            while not done:
                r = rx.poll(1)
                assert not r.failed, r.failed
                done = r.completed
            sync(dev)
            t_end = time.monotonic()
            t_start = board.get(f"xfer/{rep}/start")
            if rep >= args.warmup:
                secs.append(t_end - t_start)
            if rep == 0:   # correctness: the sender's data is seeded per layer
                for layer in range(layout.num_layers):
                    g = torch.Generator().manual_seed(layer)
                    want = torch.randn(shape, generator=g).to(layout.torch_dtype)
                    assert torch.equal(cache[layer][:, dst].cpu(), want), f"layer {layer} differs"
        nbytes = layout.bytes_per_block * n * layout.num_layers
        out = dict(bytes=nbytes, seconds=statistics.median(secs), gbs=nbytes / statistics.median(secs) / 1e9,
                   pairs_formed=rx.stats["pairs_formed"])
        board.get("xfer/closed")   # the sender's bye has been sent: close after it
        rx.close()
    else:
        data = []
        for layer in range(layout.num_layers):
            g = torch.Generator().manual_seed(layer)
            data.append(torch.randn(shape, generator=g).to(layout.torch_dtype).to(dev))
        tx = kt.make_sender("nccl", board.get("endpoint/xfer"), send_timeout_s=300, connect_timeout_s=300,
                            device=dev if dev.type == "cuda" else None)
        for rep in range(args.warmup + args.repeat):
            dst = board.get(f"xfer/{rep}")
            sync(dev)
            t_start = time.monotonic()
            for layer in range(layout.num_layers):
                tx.send_layer(f"x{rep}", layer, dst, data[layer])
            tx.send_done(f"x{rep}", 1, layout.num_layers)
            board.put(f"xfer/{rep}/start", t_start)
            assert tx.flush(300) and not tx.failed_requests()
        tx.close()
        board.put("xfer/closed", True)
    return out


# ---- 3. TTFT --------------------------------------------------------------------------------------------
def prompt_ids(n: int, vocab: int) -> list[int]:
    return [(i * 7919 + 13) % (vocab - 10) + 5 for i in range(n)]


def ttft(rank: int, board: Board, args, dev: torch.device, engine) -> dict:
    import kv_transfer as kt
    from engine import SamplingParams
    params = SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    out = {}
    rx = tx = None
    if rank == DECODE:   # the engine's paged cache is the destination
        rx = kt.make_receiver("nccl", kt.KVLayout.from_engine(engine), kt.engine_writer(engine), device=dev,
                              op_timeout_s=300, connect_timeout_s=300)
        board.put("endpoint/ttft", rx.endpoint)
    else:
        tx = kt.make_sender("nccl", board.get("endpoint/ttft"), send_timeout_s=300, connect_timeout_s=300,
                            device=dev if dev.type == "cuda" else None)
    for rep in range(args.warmup + args.repeat):
        # A different prompt each time (prefix caching must not help either side).
        prompt = prompt_ids(args.prompt_tokens, vocab)
        prompt[0] = 5 + rep
        if rank == DECODE:
            # In place.
            sync(dev)
            t0 = time.monotonic()
            engine.add_request(f"in{rep}", prompt, params)
            first_at, toks_in = None, []
            while engine.has_unfinished():
                for o in engine.step():
                    if o.new_token_ids and first_at is None:
                        first_at = time.monotonic()
                    toks_in += o.new_token_ids
            t_in = first_at - t0
            # Disaggregated, same prompt (prefix caching is off: nothing is reused).
            rid = f"dis{rep}"
            sync(dev)
            t0 = time.monotonic()
            seq = engine.add_remote_prefill(rid, prompt, params)
            first = seq.num_computed_tokens // engine.cfg.block_size
            dst = list(seq.block_table[first:])
            rx.expect(rid, dst, engine.model_config.num_layers, time.monotonic() + 300)
            board.put(f"ttft/{rep}", dict(prompt=prompt, dst=dst, first=first))
            done = []
            while not done:
                r = rx.poll(1)
                assert not r.failed, r.failed
                done = r.completed
            o = engine.remote_kv_landed(rid, done[0].first_token)
            t_dis = time.monotonic() - t0
            toks_dis = list(o.new_token_ids)
            while engine.has_unfinished():
                for o in engine.step():
                    toks_dis += o.new_token_ids
            board.get(f"ttft/{rep}/released")
            if rep >= args.warmup:
                out.setdefault("in_place_s", []).append(t_in)
                out.setdefault("disagg_s", []).append(t_dis)
            out.setdefault("tokens_equal", []).append(toks_in == toks_dis)
        else:
            job = board.get(f"ttft/{rep}")
            rid = f"dis{rep}"
            engine.add_request(rid, job["prompt"], params, prefill_only=True)
            first, dst = job["first"], job["dst"]

            def on_layer_done(layer):
                # As the prefill worker does: ship from the step that completes the prompt.
                for s in engine.current_step:
                    if s.samples and s.seq.seq_id == rid:
                        src = s.seq.block_table[first:first + len(dst)]
                        tx.send_layer(rid, layer, dst, engine.runner.read_kv_blocks(layer, src))

            token = None
            while engine.has_unfinished():
                for o in engine.step(on_layer_done=on_layer_done):
                    if o.request_id == rid and o.new_token_ids:
                        token = o.new_token_ids[0]
            tx.send_done(rid, token, engine.model_config.num_layers)
            assert tx.flush(300) and not tx.failed_requests()
            engine.release(rid)
            board.put(f"ttft/{rep}/released", True)
    if rank == DECODE:
        out = dict(in_place_ms=1e3 * statistics.median(out["in_place_s"]),
                   disagg_ms=1e3 * statistics.median(out["disagg_s"]), tokens_equal=all(out["tokens_equal"]))
        board.get("ttft/closed")
        rx.close()
    else:
        tx.close()
        board.put("ttft/closed", True)
    return out


# ---- the two ranks --------------------------------------------------------------------------------------
def rank_main(rank: int, args) -> None:
    import torch.distributed as dist

    from engine import LLMEngine
    from engine.model.loader import random_config
    cpu = args.cpu_smoke
    dev = device_of(rank, cpu)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    board = Board(args.board_port, master=False)
    dtype = torch.float32 if cpu else torch.bfloat16
    mcfg = random_config(args.model.split(":", 1)[1])
    block_size = 16
    n_blocks = -(-args.prompt_tokens // block_size)
    layer_bytes = 2 * n_blocks * block_size * mcfg.num_kv_heads * mcfg.head_dim * dtype.itemsize
    result = {}

    if rank == DECODE:
        # The pair-group store for the raw phase lives with the decode rank, like the receiver's.
        raw_store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
        board.put("store_port", raw_store.port)
    result["raw_gbs"] = raw_p2p(rank, board, args, dev, [layer_bytes, layer_bytes * mcfg.num_layers])

    result["transfer"] = transfer(rank, board, args, dev, kv_layout(mcfg, n_blocks + 8, block_size, dtype))

    engine = LLMEngine(args.model, device=dev, dtype=dtype, enable_prefix_caching=False,
                       max_num_batched_tokens=max(8192, args.prompt_tokens), num_kv_blocks=2 * n_blocks + 64)
    result["ttft"] = ttft(rank, board, args, dev, engine)
    if rank == DECODE:
        board.put("result", result)
    # Tear down in a fixed order while the interpreter is whole: left to interpreter exit,
    # the TCPStore server (and the engine's pair groups) could be destroyed in an order
    # that ends the process in std::terminate (SIGABRT) after the work had succeeded.
    del engine
    gc.collect()
    if rank == DECODE:
        del raw_store
    del board
    gc.collect()
    # Leave without running C++ static destructors: with the gloo/NCCL groups' and the
    # TCPStore's threads torn down in an arbitrary order at exit, a rank could still end in
    # std::terminate (SIGABRT) after its work and results were complete.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="random:<shape> (default random:llama3-8b; tiny with --cpu-smoke)")
    ap.add_argument("--prompt-tokens", type=int, default=None)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--iters", type=int, default=10, help="raw sends per timed round")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cpu-smoke", action="store_true", help="run the same code on CPU with gloo (tiny sizes)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.model = args.model or "random:tiny"
        args.prompt_tokens = args.prompt_tokens or 64
    else:
        args.model = args.model or "random:llama3-8b"
        args.prompt_tokens = args.prompt_tokens or 4096
        if torch.cuda.device_count() < 2:
            sys.exit("needs 2 CUDA GPUs (or --cpu-smoke)")
    if not args.model.startswith("random:"):
        sys.exit("--model must be random:<shape> (both ranks build the same weights from the engine's seed)")
    import torch.distributed as dist
    import torch.multiprocessing as mp
    board_store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
    args.board_port = board_store.port
    mp.spawn(rank_main, args=(args,), nprocs=2, join=True)
    result = json.loads(board_store.get("result").decode())
    result.update(model=args.model, prompt_tokens=args.prompt_tokens, device="cpu (gloo)" if args.cpu_smoke else
                  f"{torch.cuda.get_device_name(0)} x2 (nccl)", repeat=args.repeat)
    t, raw = result["transfer"], result["raw_gbs"]
    result["transfer_vs_raw_whole_prompt"] = t["gbs"] / raw[str(t["bytes"])] if str(t["bytes"]) in raw else None
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['device']}  {args.model}  {args.prompt_tokens} tokens")
        for k, v in raw.items():
            print(f"  raw p2p send/recv {int(k) / 2**20:9.1f} MiB: {v:8.2f} GB/s")
        print(f"  KV transfer {t['bytes'] / 2**20:.1f} MiB: {t['gbs']:.2f} GB/s ({1e3 * t['seconds']:.2f} ms)")
        tt = result["ttft"]
        print(f"  TTFT in place {tt['in_place_ms']:.1f} ms, disaggregated {tt['disagg_ms']:.1f} ms; "
              f"decoded tokens equal: {tt['tokens_equal']}")
    return result


if __name__ == "__main__":
    main()
