"""KV transfer on one host over the "cuda_ipc" backend (kv_transfer/ipc_backend.py) and over
ZeroMQ (host-staged), against a plain device-to-device copy of the same bytes measured in
the same run; then TTFT of prompts disaggregated over each backend against prefilled in
place on the decode side.

    python benchmarks/gpu_kv_ipc.py --json                 # one GPU, two processes: random:llama3-8b
    python benchmarks/gpu_kv_ipc.py --two-gpus --json      # prefill on cuda:0, decode on cuda:1
    python benchmarks/gpu_kv_ipc.py --cpu-smoke --json     # same code on CPU (shared memory, random:tiny)

Two processes (torch.multiprocessing spawn; the harness board of gpu_kv_transfer.py, JSON
over a TCPStore, no pickle): rank 0 the prefill side, rank 1 the decode side (the receivers).
Timestamps cross processes as time.monotonic() values (one system-wide clock on one host).

1. plain copy: the decode rank copies `prompt_tokens` worth of KV (every layer) from one
   buffer to another on its device (`Tensor.copy_`), and the same blocks scattered through
   the block-copy kernel the backend uses; median of `repeat`.
2. transfer: the prompt's KV, already in the prefill rank's cache, handed to the sender
   as the prefill worker hands it over (kv_transfer.layers_due: cuda_ipc a group of
   `layers_per_launch` layers per send_layers_blocks call, block to block; zmq each layer
   gathered and host-staged), into scattered reserved blocks of the decode rank's cache;
   time from the first send call to the receiver's Completed. cuda_ipc also one layer per
   call and every layer in one call, to show what the grouping buys. Checked byte-exact
   once per variant.
3. TTFT: both ranks load the model (prefix caching off). In place: the decode rank
   prefills and samples the first token. Disaggregated: the decode rank reserves blocks and
   announces them; the prefill rank computes the prompt, shipping layers from on_layer_done
   as the prefill worker does (layers_due); TTFT ends when remote_kv_landed returns the
   first token. Both then decode `--decode-tokens` greedy tokens; the JSON says whether
   they are equal. The router and the token plane are left out on both sides.
"""
from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from gpu_kv_transfer import TIMEOUT, Board, kv_layout, prompt_ids, sync  # noqa: E402

PREFILL, DECODE = 0, 1
BACKENDS = ("cuda_ipc", "zmq")


def make_rx(backend: str, layout, cache, write):
    import kv_transfer as kt
    if backend == "cuda_ipc":
        return kt.make_receiver("cuda_ipc", layout, write, cache=cache, default_timeout_s=300)
    return kt.make_receiver("zmq", layout, write, bind="ipc", default_timeout_s=300)


def make_tx(backend: str, endpoint: str, dev: torch.device):
    import kv_transfer as kt
    if backend == "cuda_ipc":
        return kt.make_sender("cuda_ipc", endpoint, send_timeout_s=300, device=dev)
    return kt.make_sender("zmq", endpoint, send_timeout_s=300)


_T0 = time.monotonic()


def progress(rank: int, what: str) -> None:
    """One line per stage on stderr (seconds from the rank's start), so a run cut short by
    its time limit shows how far it got; a rank with no progress for 60 s dumps its stacks
    (re-armed here, so a run that keeps moving never dumps)."""
    print(f"[{time.monotonic() - _T0:7.1f}s rank {rank}] {what}", file=sys.stderr, flush=True)
    faulthandler.dump_traceback_later(60, repeat=True, file=sys.stderr)


def wait_completed(rx) -> list:
    while True:
        r = rx.poll(1)
        assert not r.failed, r.failed
        if r.completed:
            return r.completed


# ---- 1. plain copy ---------------------------------------------------------------------------------------
def plain_copy(args, dev: torch.device, layout, n: int) -> dict:
    """The same bytes copied by ``Tensor.copy_`` (contiguous, one call: the reference) and
    by the block-copy kernel (scattered blocks, every layer in one launch), each timed on
    the device with events; then the kernel's device time at each tile."""
    from kv_transfer.block_copy import CacheCopier
    src = torch.randn(layout.num_layers, *layout.block_shape(layout.num_blocks), device=dev).to(layout.torch_dtype)
    dst = torch.empty_like(src)
    nbytes = layout.bytes_per_block * n * layout.num_layers
    flat_s, flat_d = src[:, :, :n].contiguous(), torch.empty(layout.num_layers, *layout.block_shape(n),
                                                              dtype=src.dtype, device=dev)
    s_ids = torch.arange(n, device=dev)
    d_ids = torch.arange(layout.num_blocks - 1, layout.num_blocks - 1 - n, -1, device=dev)
    every = range(layout.num_layers)

    def timed(fn) -> tuple[float, float]:
        """ms, medians: wall time around the call and a device sync (as the transfers are
        timed), and device time between events (the wall time again on the CPU)."""
        wall, device = [], []
        for rep in range(args.warmup + args.repeat):
            sync(dev)
            t0 = time.perf_counter()
            if dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                sync(dev)
            else:
                fn()
            t1 = time.perf_counter()
            if rep >= args.warmup:
                wall.append(1e3 * (t1 - t0))
                device.append(a.elapsed_time(b) if dev.type == "cuda" else wall[-1])
        return statistics.median(wall), statistics.median(device)

    copy_ms, copy_device_ms = timed(lambda: flat_d.copy_(flat_s))
    copier = CacheCopier(src, dst)
    kern_ms, kern_device_ms = timed(lambda: copier.copy(every, s_ids, d_ids))
    assert torch.equal(dst[:, :, d_ids.cpu()].cpu(), src[:, :, :n].cpu())
    tiles = {}
    if dev.type == "cuda":   # the kernel's tile: (words per program, warps), device ms
        for tile in TILES:
            c = CacheCopier(src, dst, tile=tile)
            tiles[f"{tile[0]}x{tile[1]}"] = timed(lambda: c.copy(every, s_ids, d_ids))[1]
    # copy_ms (wall, as the transfers are timed) is what their vs_plain_copy divides by
    return dict(bytes=nbytes, copy_ms=copy_ms, copy_device_ms=copy_device_ms, block_kernel_ms=kern_ms,
                block_kernel_device_ms=kern_device_ms, copy_gbs=nbytes / copy_ms / 1e6,
                block_kernel_device_tiles_ms=tiles)


TILES = [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)]


# ---- 2. transfer --------------------------------------------------------------------------------------------
class _Wrapped:
    """Methods of the backend's classes wrapped from here, by any thread, so the backend
    itself carries no timing code: record(label, entered, left) on CLOCK_MONOTONIC (shared
    by the two ranks on one host) around every call; remove() puts the methods back."""

    def __init__(self):
        self._undo = []

    def wrap(self, owner, name: str, label: str | None = None) -> None:
        fn, label = getattr(owner, name), label or name

        def wrapped(*a, **k):
            t0 = time.monotonic()
            try:
                return fn(*a, **k)
            finally:
                self.record(label, t0, time.monotonic())
        setattr(owner, name, wrapped)
        self._undo.append((owner, name, fn))

    def record(self, label: str, entered: float, left: float) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        for owner, name, fn in reversed(self._undo):
            setattr(owner, name, fn)


class HostTimer(_Wrapped):
    """Wall time spent in the cuda_ipc sender's parts (every call's seconds per name over a
    run): where a send call's host time goes."""

    PARTS = ("begin", "prepare_blocks", "send_layers_blocks", "_check", "_launch_group", "_device_indices",
             "_enqueue", "_wake", "send_done", "flush")

    def __init__(self):
        super().__init__()
        self.total: dict[str, list[float]] = {}   # label -> every call's seconds

    def record(self, label: str, entered: float, left: float) -> None:
        self.total.setdefault(label, []).append(left - entered)

    def install(self) -> "HostTimer":
        import kv_transfer.ipc_backend as ib
        for name in self.PARTS:
            self.wrap(ib.IpcKVSender, name)
        self.wrap(ib.CacheCopier, "copy", "copy_blocks")   # the launch itself
        return self

    def per_call_us(self) -> dict:
        # The median: the mean is dominated by first calls (a kernel compiled for a new
        # plane count, a stream's first allocation).
        return {k: dict(calls=len(v), us_per_call=1e6 * statistics.median(v), us_max=1e6 * max(v))
                for k, v in self.total.items()}


class Stamps(_Wrapped):
    """When chosen methods of a class ran since the last take(): the first entry, the last
    entry and the last exit of each. Where a transfer's last milliseconds go (the I/O
    thread's reports, the receiver's handling of them and of the done, its doorbell
    reads); a wrapper costs about a microsecond per call, and these methods run a few
    times per transfer (the doorbell reads a few dozen)."""

    def __init__(self, owner, names: tuple[str, ...]):
        super().__init__()
        self.seen: dict[str, float] = {}
        for name in names:
            self.wrap(owner, name)

    def record(self, label: str, entered: float, left: float) -> None:
        self.seen.setdefault(f"{label}:first_in", entered)
        self.seen[f"{label}:last_in"] = entered
        self.seen[f"{label}:last_out"] = left

    def take(self) -> dict[str, float]:
        seen, self.seen = self.seen, {}
        return seen


def transfer_variants(num_layers: int) -> list[tuple[str, str, int, bool]]:
    """(result name, backend, layers per call, ids uploaded before the clock): the headline
    of each backend is what a prefill worker does (its sender's layers_per_launch; a
    cuda_ipc sender given the block ids by prepare_blocks after the first layer, while the
    rest of the first group computes)."""
    from kv_transfer.ipc_backend import IpcKVSender
    group = IpcKVSender.layers_per_launch
    return [("cuda_ipc", "cuda_ipc", group, True), ("cuda_ipc_ids_on_clock", "cuda_ipc", group, False),
            ("cuda_ipc_per_layer", "cuda_ipc", 1, True), ("cuda_ipc_one_launch", "cuda_ipc", num_layers, True),
            ("zmq", "zmq", 1, False)]


def transfer(rank: int, board: Board, args, dev: torch.device, layout, backend: str, name: str,
             per_call: int, prepare: bool) -> dict:
    import kv_transfer as kt
    n = -(-args.prompt_tokens // layout.block_size)
    cache = torch.zeros(layout.num_layers, *layout.block_shape(layout.num_blocks), dtype=layout.torch_dtype,
                        device=dev)
    g = torch.Generator().manual_seed(7)
    if rank == DECODE:
        def write(rid, layer, block_ids, t):   # the zmq path's host-staged copy into the cache
            cache[layer][:, torch.tensor(block_ids, device=dev)] = t.to(dev, non_blocking=True)

        rx = make_rx(backend, layout, cache, write)
        board.put(f"ep/{name}", rx.endpoint)
        stamps = Stamps(type(rx), ("_on_landed", "_on_wire", "_answer_bells")) if backend == "cuda_ipc" else None
        secs, parts = [], []
        for rep in range(args.warmup + args.repeat):
            dst = list(range(layout.num_blocks - 1, layout.num_blocks - 1 - n, -1))   # scattered order
            rid = f"{name}{rep}"
            rx.expect(rid, dst, layout.num_layers, time.monotonic() + 300)
            if stamps is not None:
                stamps.take()
            board.put(f"x/{name}/{rep}", dst)
            wait_completed(rx)
            sync(dev)
            t_end = time.monotonic()
            progress(rank, f"{name} rep {rep} landed")
            if rep >= args.warmup:
                t = board.get(f"x/{name}/{rep}/start")
                t.update({f"rx.{k}": v for k, v in (stamps.take() if stamps else {}).items()})
                t["rx_completed_seen"] = t_end
                secs.append(t_end - t["start"])
                parts.append({k: 1e3 * (v - t["start"]) for k, v in t.items() if k != "start"})
        src = torch.randn(layout.num_layers, *layout.block_shape(n), generator=g).to(layout.torch_dtype)
        assert torch.equal(cache[:, :, dst].cpu(), src), f"{name}: the landed KV differs"
        sender_stats = board.get(f"x/{name}/closed")
        if stamps is not None:
            stamps.remove()
        rx.close()
        nbytes = layout.bytes_per_block * n * layout.num_layers
        # Where the time goes, ms from the clock's start (one host, CLOCK_MONOTONIC): every
        # layer's copy queued, every report handed to the socket (flushed), the sender's
        # stream idle; with cuda_ipc the I/O thread's reports (tx_*) and the receiver's
        # handling of them and of the done (rx_*), each first entry / last entry / last exit.
        keys = set.intersection(*(set(p) for p in parts)) if parts else set()
        breakdown = {k: statistics.median(p[k] for p in parts) for k in sorted(keys, key=lambda k: parts[0][k])}
        return dict(bytes=nbytes, ms=1e3 * statistics.median(secs), gbs=nbytes / statistics.median(secs) / 1e9,
                    layers_per_call=per_call, ids_before_clock=prepare, sender_ms=breakdown,
                    sender_stats=sender_stats)
    src = torch.randn(layout.num_layers, *layout.block_shape(n), generator=g).to(layout.torch_dtype)
    cache[:, :, :n] = src.to(dev)
    tx = make_tx(backend, board.get(f"ep/{name}"), dev)
    timer = HostTimer().install() if backend == "cuda_ipc" and args.host_timer else None
    stamps = Stamps(type(tx), ("_report_landed", "_report")) if backend == "cuda_ipc" else None
    src_ids = list(range(n))
    for rep in range(args.warmup + args.repeat):
        dst = board.get(f"x/{name}/{rep}")
        rid = f"{name}{rep}"
        tx.begin(rid)
        if backend == "cuda_ipc":   # the prefill worker begins at admission, well before its last layer
            while rid not in tx._granted:
                time.sleep(1e-4)
            if prepare:
                tx.prepare_blocks(rid, dst, src_ids)
        sync(dev)
        if stamps is not None:
            stamps.take()
        t = dict(start=time.monotonic())
        for layer in range(layout.num_layers):
            due = kt.layers_due(layer, layout.num_layers, per_call)
            if due is not None:
                tx.send_layers_blocks(rid, due, dst, cache, src_ids)
        t["queued"] = time.monotonic()
        tx.send_done(rid, 1, layout.num_layers)
        assert tx.flush(300) and not tx.failed_requests()
        t["flushed"] = time.monotonic()
        sync(dev)
        t["device_idle"] = time.monotonic()
        t.update({f"tx.{k}": v for k, v in (stamps.take() if stamps else {}).items()})
        board.put(f"x/{name}/{rep}/start", t)
    if stamps is not None:
        stamps.remove()
    stats = dict(getattr(tx, "stats", {}))
    if timer is not None:
        timer.remove()
        stats["host_us"] = timer.per_call_us()   # every rep, warm-up included
    tx.close()
    board.put(f"x/{name}/closed", stats)
    return {}


# ---- 3. TTFT --------------------------------------------------------------------------------------------------
def ttft(rank: int, board: Board, args, dev: torch.device, engine, tokens: int) -> dict:
    import kv_transfer as kt
    from engine import SamplingParams
    params = SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    layers = engine.model_config.num_layers
    res: dict = {}
    rxs = {}
    if rank == DECODE:
        for b in BACKENDS:
            cache = engine.runner.kv_cache
            rxs[b] = make_rx(b, kt.KVLayout.from_engine(engine), cache, kt.engine_writer(engine))
            board.put(f"ttft-ep/{tokens}/{b}", rxs[b].endpoint)
    txs = {} if rank == DECODE else {b: make_tx(b, board.get(f"ttft-ep/{tokens}/{b}"), dev) for b in BACKENDS}
    for rep in range(args.warmup + args.repeat):
        for b in BACKENDS:
            prompt = prompt_ids(tokens, vocab)
            prompt[0] = 5 + rep + 100 * BACKENDS.index(b)   # a new prompt each time: no prefix reuse
            key = f"{tokens}/{b}/{rep}"
            rid = f"d{tokens}{b}{rep}"
            if rank == DECODE:
                sync(dev)
                t0 = time.monotonic()
                engine.add_request(f"in{key}", prompt, params)
                first_at, toks_in = None, []
                while engine.has_unfinished():
                    for o in engine.step():
                        if o.new_token_ids and first_at is None:
                            first_at = time.monotonic()
                        toks_in += o.new_token_ids
                t_in = first_at - t0
                sync(dev)
                t0 = time.monotonic()
                seq = engine.add_remote_prefill(rid, prompt, params)
                first = seq.num_computed_tokens // engine.cfg.block_size
                dst = list(seq.block_table[first:])
                rxs[b].expect(rid, dst, layers, time.monotonic() + 300)
                board.put(f"t/{key}", dict(prompt=prompt, dst=dst, first=first))
                done = wait_completed(rxs[b])
                o = engine.remote_kv_landed(rid, done[0].first_token)
                t_dis = time.monotonic() - t0
                toks = list(o.new_token_ids)
                while engine.has_unfinished():
                    for o in engine.step():
                        toks += o.new_token_ids
                marks = board.get(f"t/{key}/released")
                if rep >= args.warmup:
                    res.setdefault(f"{b}_s", []).append(t_dis)
                    res.setdefault(f"{b}_parts", []).append({k: 1e3 * (v - t0) for k, v in marks.items()})
                    res.setdefault("in_place_s", []).append(t_in)
                res.setdefault(f"{b}_equal", []).append(toks_in == toks)
                if toks_in != toks:   # where they part: the first token (prefill side) or a later one
                    res.setdefault(f"{b}_first_differs_at", []).append(
                        (rep, next((i for i, (a, c) in enumerate(zip(toks_in, toks)) if a != c),
                                   min(len(toks_in), len(toks)))))
                progress(rank, f"TTFT {key}: in place {1e3 * t_in:.1f} ms, {b} {1e3 * t_dis:.1f} ms")
            else:
                job = board.get(f"t/{key}")
                marks = dict(job_received=time.monotonic())
                tx = txs[b]
                engine.add_request(rid, job["prompt"], params, prefill_only=True)
                tx.begin(rid)
                first, dst = job["first"], job["dst"]

                def on_layer_done(layer):   # as prefill_worker.PrefillWorker._on_layer_done
                    due = kt.layers_due(layer, layers, tx.layers_per_launch)
                    if due is None and layer:
                        return
                    for sid, table in engine.step_finishing_prompts():
                        if sid == rid:
                            src = table[first:first + len(dst)]
                            if due is None:
                                tx.prepare_blocks(rid, dst, src)
                            else:
                                tx.send_layers_blocks(rid, due, dst, engine.kv_cache, src)

                token = None
                while engine.has_unfinished():
                    for o in engine.step(on_layer_done=on_layer_done):
                        if o.request_id == rid and o.new_token_ids:
                            token = o.new_token_ids[0]
                marks["prefilled"] = time.monotonic()
                tx.send_done(rid, token, layers)
                assert tx.flush(300) and not tx.failed_requests()
                marks["flushed"] = time.monotonic()
                engine.release(rid)
                board.put(f"t/{key}/released", marks)
    for x in list(rxs.values()) + list(txs.values()):
        x.close()
    return res


# ---- the two ranks ------------------------------------------------------------------------------------------
def rank_main(rank: int, args) -> None:
    from engine import LLMEngine
    from engine.model.loader import random_config
    cpu = args.cpu_smoke
    dev = torch.device("cpu") if cpu else torch.device("cuda", rank if args.two_gpus else 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    board = Board(args.board_port, master=False)
    progress(rank, "board joined")
    dtype = torch.float32 if cpu else torch.bfloat16
    mcfg = random_config(args.model.split(":", 1)[1])
    block_size = 16
    n = -(-args.prompt_tokens // block_size)
    layout = kv_layout(mcfg, 2 * n + 8, block_size, dtype)
    result = {}
    if rank == DECODE:
        result["plain_copy"] = pc = plain_copy(args, dev, layout, n)
        tiles = pc["block_kernel_device_tiles_ms"]
        board.put("tile", min(tiles, key=tiles.get) if args.best_tile and tiles else "")
    progress(rank, "plain copy done" if rank == DECODE else "started")
    tile = board.get("tile")
    if tile:   # --best-tile: the sender copies with the tile that was fastest on this device just now
        import kv_transfer.block_copy as bc
        bc._CHUNK, bc._WARPS = map(int, tile.split("x"))
        result["transfer_tile"] = tile
    for name, b, per_call, prepare in transfer_variants(layout.num_layers):
        progress(rank, f"transfer {name}")
        r = transfer(rank, board, args, dev, layout, b, name, per_call, prepare)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if rank == DECODE:
            result[f"transfer_{name}"] = r
    if not args.ttft_tokens:
        if rank == DECODE:
            board.put("result", result)
        _exit()
    max_tokens = max(args.ttft_tokens)
    engine = LLMEngine(args.model, device=dev, dtype=dtype, enable_prefix_caching=False, enable_cuda_graphs=False,
                       max_num_batched_tokens=max(8192, max_tokens),
                       num_kv_blocks=2 * (-(-max_tokens // block_size)) + 64,
                       dense_prefill=True if args.dense_prefill else None)
    result["dense_prefill"] = engine.runner.dense_fresh_prefill   # as the engine resolved it
    progress(rank, "engine loaded")
    for tokens in args.ttft_tokens:
        progress(rank, f"TTFT {tokens} tokens")
        r = ttft(rank, board, args, dev, engine, tokens)
        if rank == DECODE:
            row = dict(in_place_ms=1e3 * statistics.median(r["in_place_s"]))
            for b in BACKENDS:
                row[f"{b}_ms"] = 1e3 * statistics.median(r[f"{b}_s"])
                row[f"{b}_vs_in_place"] = row[f"{b}_ms"] / row["in_place_ms"]
                row[f"{b}_tokens_equal"] = all(r[f"{b}_equal"])
                if f"{b}_first_differs_at" in r:   # (repeat, token index) of each repeat that differed
                    row[f"{b}_first_differs_at"] = r[f"{b}_first_differs_at"]
                # the prefill side's marks on the decode side's clock (same host), from its start
                row[f"{b}_parts_ms"] = {k: statistics.median(p[k] for p in r[f"{b}_parts"])
                                        for k in r[f"{b}_parts"][0]}
            result[f"ttft_{tokens}"] = row
    if rank == DECODE:
        board.put("result", result)
    del engine
    gc.collect()
    _exit()


def _exit() -> None:
    """Leave without C++ static destructors (see gpu_kv_transfer.py's rank_main): a rank's
    teardown could end in std::terminate after its results were on the board."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="random:<shape> (default random:llama3-8b; tiny with --cpu-smoke)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="KV of this many tokens for the transfer phase")
    ap.add_argument("--ttft-tokens", type=int, nargs="*", default=None, help="prompt sizes (none: skip TTFT)")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--two-gpus", action="store_true", help="prefill on cuda:0, decode on cuda:1")
    ap.add_argument("--dense-prefill", action="store_true",
                    help="both engines prefill fresh prompts through dense attention (EngineConfig.dense_prefill)")
    ap.add_argument("--cpu-smoke", action="store_true", help="the same code on CPU (shared memory, tiny sizes)")
    ap.add_argument("--host-timer", action="store_true",
                    help="time the cuda_ipc sender's host parts per call (HostTimer; its wrappers add host time, "
                         "so the transfer figures of such a run are not the headline)")
    ap.add_argument("--best-tile", action="store_true",
                    help="transfers use the block-copy tile found fastest by this run's sweep (else the default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.model = args.model or "random:tiny"
        args.prompt_tokens = args.prompt_tokens or 64
        args.ttft_tokens = [48] if args.ttft_tokens is None else args.ttft_tokens
    else:
        args.model = args.model or "random:llama3-8b"
        args.prompt_tokens = args.prompt_tokens or 4096
        args.ttft_tokens = [1024, 4096, 8192] if args.ttft_tokens is None else args.ttft_tokens
        if args.two_gpus and torch.cuda.device_count() < 2:
            sys.exit("--two-gpus needs 2 CUDA GPUs")
    import torch.distributed as dist
    import torch.multiprocessing as mp
    board_store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
    args.board_port = board_store.port
    mp.spawn(rank_main, args=(args,), nprocs=2, join=True)
    result = json.loads(board_store.get("result").decode())
    dev = "cpu" if args.cpu_smoke else torch.cuda.get_device_name(0) + (" x2" if args.two_gpus else " (both ranks)")
    result.update(model=args.model, prompt_tokens=args.prompt_tokens, device=dev, repeat=args.repeat)
    pc = result["plain_copy"]
    names = [v[0] for v in transfer_variants(1)]
    for name in names:
        result[f"transfer_{name}"]["vs_plain_copy"] = result[f"transfer_{name}"]["ms"] / pc["copy_ms"]
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{dev}  {args.model}  KV of {args.prompt_tokens} tokens = {pc['bytes'] / 2**20:.0f} MiB")
        print(f"  plain copy {pc['copy_ms']:.3f} ms ({pc['copy_gbs']:.0f} GB/s; device {pc['copy_device_ms']:.3f}); "
              f"block-copy kernel, one launch {pc['block_kernel_ms']:.3f} ms (device {pc['block_kernel_device_ms']:.3f})")
        for name in names:
            t = result[f"transfer_{name}"]
            print(f"  {name:20s} ({t['layers_per_call']:2d} layers per call) lands in {t['ms']:.3f} ms = "
                  f"{t['vs_plain_copy']:.2f}x the plain copy")
        for tokens in args.ttft_tokens:
            r = result[f"ttft_{tokens}"]
            print(f"  TTFT {tokens:5d} tokens: in place {r['in_place_ms']:.1f} ms; " + "; ".join(
                f"{b} {r[f'{b}_ms']:.1f} ms ({r[f'{b}_vs_in_place']:.3f}x, tokens equal {r[f'{b}_tokens_equal']})"
                for b in BACKENDS))
    return result


if __name__ == "__main__":
    main()
