"""GPU: this engine vs Hugging Face transformers `generate` on the same Poisson request
stream, `random:llama3-8b` shape in bf16 on the same GPU.

The stream: --requests requests with exponential inter-arrival times at --rate requests/s,
prompt lengths uniform in [--prompt-min, --prompt-max] (random token ids) and output
lengths uniform in [--out-min, --out-max]; EOS ignored on both sides so every request gets
exactly its output length (the useful tokens). Greedy on both sides; random weights, so the
two sides' tokens are not compared (different random init; bf16 kernels differ anyway).

  engine  an offline LLMEngine fed at the arrival times in real time (requests are added
          as the clock passes their arrival; continuous batching, chunked prefill, CUDA
          graphs for decode steps)
  HF      LlamaForCausalLM from a LlamaConfig of the same shape, random init, bf16; static
          batches of --hf-batch requests in arrival order, left-padded; a batch starts when
          its last request has arrived and the previous batch is done, and runs to its
          longest output (only each request's own length counts as useful)

Output tokens/s = useful output tokens / (time from the stream's start to the last
completion). The engine runs first and is freed before the HF model is built.

--engines runs the engine once per named variant on the same stream, one after the other,
each in a child process of its own (an empty GPU for each): `overlap` (the default engine:
overlapped scheduling on, on CUDA), `sync` (async_scheduling off: the host schedules
between steps), `dense` (overlap on and dense_prefill on: a step of one fresh prompt through
cuDNN's fused attention; steps of several keep the paged kernel, so on a saturating stream it
rarely differs from `overlap`). The first variant is the one compared with transformers.

    python benchmarks/gpu_vs_hf.py [--requests 128] [--rate 32] [--hf-batch 32] [--json out.json]
    python benchmarks/gpu_vs_hf.py --requests 256 --engines overlap,sync,dense --json stream.json

--temperature / --top-p make the engine's timed requests sample instead (the sampler's cost
and whether overlap survives it, against `sync`); transformers is not run for them.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

import gpu_common as gc_

from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.model.loader import RANDOM_SHAPES  # noqa: E402


def make_stream(args) -> list[dict]:
    rng = random.Random(args.seed)
    t, out = 0.0, []
    for i in range(args.requests):
        t += rng.expovariate(args.rate)
        n = rng.randint(args.prompt_min, args.prompt_max)
        out.append(dict(arrival=t, prompt=[rng.randrange(100, 120000) for _ in range(n)],
                        max_tokens=rng.randint(args.out_min, args.out_max)))
    return out


ENGINE_VARIANTS = {"overlap": dict(), "sync": dict(async_scheduling=False), "dense": dict(dense_prefill=True)}


def run_engine(args, stream, variant: str = "overlap") -> dict:
    sizes = tuple(b for b in (1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 384, 512) if b <= args.max_num_seqs)
    engine = LLMEngine(args.model, device="cuda", dtype="bfloat16", enable_prefix_caching=False,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
                       cuda_graph_batch_sizes=sizes, **ENGINE_VARIANTS[variant])
    # Warm-up on a stream of another seed, all at once with short outputs: the eager
    # (mixed prefill) steps compile their Triton specialisations outside the timed run.
    rng = random.Random(args.seed + 1)
    for i in range(48):
        prompt = [rng.randrange(100, 120000) for _ in range(rng.randint(args.prompt_min, args.prompt_max))]
        engine.add_request(f"warm{i}", prompt, SamplingParams(max_tokens=rng.randint(2, 24), ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    n = len(stream)
    got = [0] * n
    finish = [0.0] * n
    first = [0.0] * n
    nxt, done, steps = 0, 0, 0
    graphs = engine.runner.decode_graphs
    phase = {"graph": [0, 0.0], "eager": [0, 0.0], "drain": [0, 0.0]}
    batch_sum, max_batch, last_eager = 0, 0, 0.0
    # Per step() call: its start and end (s from the stream's start), what it launched
    # (graph / eager / drain: nothing) and how many first tokens it handed out: where a
    # stream's TTFT goes. With overlapped scheduling a call's time covers the previous
    # launch's device work, so last_eager_step_end_s is when the last eager step was
    # launched and the call after it began, up to one step before that step ended.
    timeline = []
    variants_before = gc_.triton_variants()
    start = time.perf_counter()
    while done < n:
        now = time.perf_counter() - start
        while nxt < n and stream[nxt]["arrival"] <= now:
            r = stream[nxt]
            engine.add_request(str(nxt), r["prompt"], SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True,
                                                                     temperature=args.temperature, top_p=args.top_p))
            nxt += 1
        if engine.has_unfinished():
            replays = graphs.num_replays if graphs is not None else 0
            t_step = time.perf_counter()
            outs = engine.step()
            steps += 1
            t = time.perf_counter() - start
            # Where the time goes: pure-decode steps (graph replays) vs steps with a
            # prefill chunk (eager), and the decode batch sizes the stream reaches. With
            # overlapped scheduling the call after the last launch schedules nothing and only
            # collects that launch's tokens (a drain): neither kind.
            if graphs is not None and graphs.num_replays > replays:
                kind = "graph"
            else:
                kind = "eager" if engine.step_request_ids() else "drain"
            phase[kind][0] += 1
            phase[kind][1] += time.perf_counter() - t_step
            if kind == "graph":
                batch_sum += len(outs)
                max_batch = max(max_batch, len(outs))
            elif kind == "eager":
                last_eager = t
            timeline.append([round(t_step - start, 5), round(t, 5), kind,
                             sum(1 for o in outs if o.new_token_ids and got[int(o.request_id)] == 0)])
            for o in outs:
                i = int(o.request_id)
                if got[i] == 0:
                    first[i] = t
                got[i] += len(o.new_token_ids)
                if o.finished:
                    finish[i] = t
                    done += 1
        else:
            time.sleep(max(0.0, stream[nxt]["arrival"] - now))
    makespan = max(finish)
    assert got == [r["max_tokens"] for r in stream], "engine produced the wrong number of tokens"
    useful = sum(got)
    ttft = [first[i] - stream[i]["arrival"] for i in range(n)]
    res = dict(variant=variant, overlap=engine.overlap,
               dense_prefill=engine.runner.dense_fresh_prefill,
               seconds=makespan, output_tokens=useful, tokens_per_s=useful / makespan, steps=steps,
               graph_replays=engine.runner.decode_graphs.num_replays if engine.runner.decode_graphs else 0,
               ttft_median_s=statistics.median(ttft),
               e2e_median_s=statistics.median(finish[i] - stream[i]["arrival"] for i in range(n)),
               graph_steps=phase["graph"][0], graph_step_s=phase["graph"][1],
               eager_steps=phase["eager"][0], eager_step_s=phase["eager"][1],
               drain_steps=phase["drain"][0], drain_step_s=phase["drain"][1],
               graph_mean_batch=batch_sum / max(phase["graph"][0], 1), graph_max_batch=max_batch,
               last_eager_step_end_s=last_eager, last_arrival_s=stream[-1]["arrival"],
               timeline=timeline if args.timeline else None,
               # kernels compiled during the timed run (each a stall of the whole step)
               triton_compiles={k: sorted(v - variants_before.get(k, set()))
                                for k, v in gc_.triton_variants().items() if v - variants_before.get(k, set())})
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return res


def run_engine_process(variant: str) -> dict:
    """run_engine in a child process of this script (same arguments, so the same seeded
    stream): each variant starts on an empty GPU, which freeing an engine in this process
    does not guarantee (a second engine here once found its KV budget negative)."""
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--one-engine", variant]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("ENGINE_RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stdout.write(proc.stdout)   # its stderr went straight to ours
        raise SystemExit(f"engine variant {variant!r}: child exited {proc.returncode} "
                         f"{'without a result' if not lines else ''}".rstrip())
    return json.loads(lines[-1][len("ENGINE_RESULT "):])


def build_hf(shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                      intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                      num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                      rope_theta=shape.get("rope_theta", 10000.0),
                      max_position_embeddings=shape["max_position_embeddings"],
                      tie_word_embeddings=shape.get("tie_word_embeddings", False), rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        # Built (and randomly initialised) directly on the GPU: 8B parameters on the CPU
        # would take minutes to initialise.
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


@torch.inference_mode()
def hf_batch(model, batch: list[dict]) -> float:
    width = max(len(r["prompt"]) for r in batch)
    new = max(r["max_tokens"] for r in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, width - len(r["prompt"]):] = torch.tensor(r["prompt"])
        mask[i, width - len(r["prompt"]):] = 1
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), do_sample=False, max_new_tokens=new,
                         min_new_tokens=new, eos_token_id=None, pad_token_id=0,
                         temperature=None, top_p=None, top_k=None)
    torch.cuda.synchronize()
    assert out.shape[1] - width == new
    return time.perf_counter() - t


def run_hf(args, stream) -> dict:
    model = build_hf(RANDOM_SHAPES[args.model.removeprefix("random:")])
    # Warm-up with a full-size batch of short outputs: its first large batch otherwise pays
    # for allocator growth and kernel selection inside the timed run.
    hf_batch(model, [dict(prompt=r["prompt"], max_tokens=8) for r in stream[:args.hf_batch]])
    clock, computed, batches = 0.0, 0, []
    for i in range(0, len(stream), args.hf_batch):
        b = stream[i:i + args.hf_batch]
        clock = max(clock, b[-1]["arrival"])
        s = hf_batch(model, b)
        clock += s
        computed += len(b) * max(r["max_tokens"] for r in b)
        batches.append(s)
        print(f"  HF batch {len(batches)}: {len(b)} requests, {s:.1f}s", flush=True)
    useful = sum(r["max_tokens"] for r in stream)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return dict(seconds=clock, output_tokens=useful, computed_tokens=computed, tokens_per_s=useful / clock,
                batch_seconds=batches)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--rate", type=float, default=32.0, help="Poisson arrival rate, requests/s")
    ap.add_argument("--prompt-min", type=int, default=256)
    ap.add_argument("--prompt-max", type=int, default=768)
    ap.add_argument("--out-min", type=int, default=128)
    ap.add_argument("--out-max", type=int, default=384)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-batched-tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="the engine's requests sample (0: greedy); transformers stays greedy, so pair with --skip-hf")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--engines", default="overlap",
                    help=f"comma-separated engine variants, run in turn on the same stream: {','.join(ENGINE_VARIANTS)}")
    ap.add_argument("--timeline", action="store_true",
                    help="keep each step() call's start, end, kind and first tokens in the JSON")
    ap.add_argument("--json")
    ap.add_argument("--one-engine", help=argparse.SUPPRESS)   # internal: run this variant, print its JSON
    args = ap.parse_args()
    if args.one_engine:
        print("ENGINE_RESULT " + json.dumps(run_engine(args, make_stream(args), args.one_engine)), flush=True)
        return
    variants = args.engines.split(",")
    unknown = [v for v in variants if v not in ENGINE_VARIANTS]
    if unknown or not variants:
        ap.error(f"--engines: unknown {unknown}; choose from {list(ENGINE_VARIANTS)}")
    if args.temperature and not args.skip_hf:
        ap.error("--temperature: transformers runs greedy here; add --skip-hf")
    stream = make_stream(args)
    engines = {}
    for v in variants:
        engines[v] = run_engine_process(v)
        print(f"engine ({v}):", engines[v], flush=True)
    eng = engines[variants[0]]
    rec = dict(device=gc_.device_info(), args=vars(args), engine=eng, engines=engines)
    if not args.skip_hf:
        hf = run_hf(args, stream)
        print("hf:", hf, flush=True)
        rec["hf"] = hf
        rec["ratio"] = eng["tokens_per_s"] / hf["tokens_per_s"]
    gc_.dump(args.json, rec)
    print(f"\n{rec['device']['gpu']}: {args.requests} requests, Poisson {args.rate}/s, "
          f"prompts {args.prompt_min}-{args.prompt_max}, outputs {args.out_min}-{args.out_max}")
    print("| side | seconds | useful output tokens | output tok/s |")
    print("|---|---|---|---|")
    for v, e in engines.items():
        print(f"| engine ({v}) | {e['seconds']:.1f} | {e['output_tokens']} | {e['tokens_per_s']:.0f} |")
    if "hf" in rec:
        hf = rec["hf"]
        print(f"| transformers (static batch {args.hf_batch}) | {hf['seconds']:.1f} | {hf['output_tokens']} "
              f"| {hf['tokens_per_s']:.0f} |")
        print(f"engine ({variants[0]}) / transformers: {rec['ratio']:.1f}x")


if __name__ == "__main__":
    main()
