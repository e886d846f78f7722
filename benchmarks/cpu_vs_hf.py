"""CPU benchmark: this engine vs Hugging Face transformers' `generate` on SmolLM2-135M (fp32).

Two scenarios, greedy decoding, the same weights (the GGUF file, de-quantised to fp32) on
both sides and the same number of output tokens per request:

  single  one ~128-token prompt, 128 output tokens.
  batch   32 prompts of mixed length (uniform 20..400 tokens) with mixed max_tokens
          (uniform 16..256), from a fixed seed.

Each side runs its natural way. transformers gets padded static batches (left padding,
attention mask, `--hf-batch-size` requests at a time in arrival order); each batch runs to
its largest max_tokens, but only each request's own max_tokens count as useful output
tokens. The engine gets all requests at once (continuous batching). EOS is ignored on both
sides (engine: ignore_eos=True; HF: no eos_token_id), so the token counts are identical.

Wall time is measured after a warm-up generate on each side. Reported: useful output
tokens/s per side, the engine/HF ratio, and how many requests' greedy token sequences match
exactly (padded fp32 batches can legitimately differ a little; reported, not asserted).

Each side also runs in its own process setting: the engine in this one, after `import
engine` (which, as in `pdserve`, sets the engine's OpenMP default, engine/__init__.py), and
transformers in a child process started with the environment this script was launched with,
so neither side runs under the other's threading settings. The child gets work and returns
tokens as JSON lines over its stdin/stdout.

    python benchmarks/cpu_vs_hf.py [--scenario single|batch|all] [--hf-batch-size 8]
                                   [--seed 0] [--json results.json] [--repeat N]

On a shared machine, each timed run also records the share of CPU time other processes used
while it ran, and flags runs above 10% as noisy; `--repeat N` alternates the sides N times
and keeps each side's best run. `--profile PREFIX` writes a cProfile of the engine's first
timed run per scenario (view with `python -m pstats PREFIX.batch.prof`).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import random
import subprocess
import sys
import time
import warnings

LAUNCH_ENV = dict(os.environ)    # before `import engine` adds its defaults: the HF side's environment
HF_WORKER = sys.argv[1:] == ["--hf-worker"]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not HF_WORKER:   # the transformers child must load torch (libgomp) with the launch environment
    import engine  # noqa: E402,F401  (first, before torch, as the pdserve CLI imports it)
import torch  # noqa: E402

# A long, varied English passage; prompts are token slices of it repeated.
PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when movable type changed how "
    "books were made and who could read them. Before that, scribes copied every page by hand, which made "
    "books rare and expensive. Within a few decades, presses had spread from Mainz to Venice, Paris and "
    "London, and the price of a book fell so far that merchants, students and craftsmen could own one. "
    "Printers competed on typefaces, paper and speed; some of them became scholars in their own right, "
    "editing classical texts and correcting the errors that generations of copyists had introduced. "
    "Governments and churches soon noticed that pamphlets travelled faster than any messenger, and they "
    "tried, with mixed success, to license presses and censor what they printed. Newspapers followed in "
    "the seventeenth century, first as weekly lists of shipping news and prices, later as the loud, "
    "argumentative sheets that fed coffee-house debates. By the time steam power arrived, a single "
    "rotary press could print thousands of pages an hour, and literacy had become an ordinary expectation "
    "rather than a privilege. Historians still argue about how much of the modern world the press made "
    "possible, but few doubt that it changed the speed at which ideas, rumours and discoveries moved. "
)


OPENMP_VARS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")
NOISY = 0.10  # other processes' CPU share above which a timed run is flagged as noisy


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class CpuContention:
    """Share of the machine's CPU time used by *other* processes while a block ran (Linux
    /proc/stat minus this process's own usage), so noisy runs on a shared box can be told
    apart. None where /proc/stat is unavailable."""

    def __enter__(self):
        self.a, self.r = self._stat(), os.times()
        return self

    def __exit__(self, *exc):
        b, r = self._stat(), os.times()
        self.other = None
        if self.a and b:
            hz = os.sysconf("SC_CLK_TCK")
            total = (b[0] - self.a[0]) / hz
            busy = total - (b[1] - self.a[1]) / hz
            mine = (r.user + r.system) - (self.r.user + self.r.system)
            self.other = max(0.0, busy - mine) / total if total > 0 else None
        return False

    @staticmethod
    def _stat():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
            return sum(v), v[3] + v[4]  # total, idle + iowait
        except (OSError, ValueError):
            return None


# ---- workload -------------------------------------------------------------------------------------
def token_stream(tokenizer, min_len: int) -> list[int]:
    ids = tokenizer.encode(PARAGRAPH, add_special_tokens=False)
    reps = -(-min_len // len(ids)) + 1
    return ids * reps


def make_workload(tokenizer, scenario: str, seed: int, num_prompts: int) -> list[tuple[list[int], int]]:
    """[(prompt token ids, max_tokens)] in arrival order."""
    rng = random.Random(seed)
    if scenario == "single":
        lens, maxes = [128], [128]
    else:
        lens = [rng.randint(20, 400) for _ in range(num_prompts)]
        maxes = [rng.randint(16, 256) for _ in range(num_prompts)]
    stream = token_stream(tokenizer, max(lens) + 1024)
    period = len(tokenizer.encode(PARAGRAPH, add_special_tokens=False))
    # Distinct start offsets into the passage, so no two prompts share a first KV block and
    # the engine's prefix cache gets no hits inside the workload (while there are enough).
    if len(lens) <= period:
        offsets = rng.sample(range(period), len(lens))
    else:
        offsets = [rng.randrange(period) for _ in lens]
    return [(stream[off:off + n], m) for off, n, m in zip(offsets, lens, maxes)]


# ---- the engine ---------------------------------------------------------------------------------
def load_engine(engine_kwargs: dict):
    from engine import LLM
    t = time.perf_counter()
    llm = LLM("smollm2", device="cpu", dtype="float32", **engine_kwargs)
    return llm, time.perf_counter() - t


def run_engine(llm, work, profile_path: str | None = None) -> tuple[float, list[list[int]], int]:
    """Returns (seconds, per-request tokens, prompt tokens served by the prefix cache)."""
    from engine import SamplingParams
    # Start cold: nothing from the warm-up or an earlier repeat may be reused.
    llm.engine.blocks.reset_prefix_cache()
    prompts = [p for p, _ in work]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in work]
    prof = None
    if profile_path:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile_path)
        log(f"engine cProfile written to {profile_path}")
    return dt, [list(o.token_ids) for o in outs], sum(o.num_cached_tokens for o in outs)


# ---- transformers --------------------------------------------------------------------------------
def load_tokenizer():
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from engine.model.loader import smollm2_gguf_path
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder, name = os.path.split(smollm2_gguf_path())
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def load_hf():
    from transformers import AutoModelForCausalLM

    from engine.model.loader import smollm2_gguf_path
    t = time.perf_counter()
    tok = load_tokenizer()
    folder, name = os.path.split(smollm2_gguf_path())   # the tokenizer's file, for the weights
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tok, model, time.perf_counter() - t


@torch.inference_mode()
def hf_generate_batch(model, pad_id: int, batch: list[tuple[list[int], int]]) -> list[list[int]]:
    """One static batch: left-padded, runs to the batch's largest max_tokens; each request's
    output is cut to its own max_tokens."""
    width = max(len(p) for p, _ in batch)
    new = max(m for _, m in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (p, _) in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    # eos_token_id=None given explicitly overrides the model's generation config: no EOS
    # stopping and no EOS suppression, the counterpart of the engine's ignore_eos.
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                         min_new_tokens=new, eos_token_id=None, pad_token_id=pad_id,
                         temperature=None, top_p=None, top_k=None)
    gen = out[:, width:]
    assert gen.shape[1] == new, f"HF generated {gen.shape[1]} tokens, expected {new}"
    return [gen[i, :m].tolist() for i, (_, m) in enumerate(batch)]


def run_hf(model, pad_id: int, work, batch_size: int) -> tuple[float, list[list[int]], int]:
    """Returns (seconds, per-request tokens, tokens computed including static-batch waste)."""
    outs: list[list[int]] = []
    computed = 0
    t = time.perf_counter()
    for i in range(0, len(work), batch_size):
        batch = work[i:i + batch_size]
        outs += hf_generate_batch(model, pad_id, batch)
        computed += len(batch) * max(m for _, m in batch)
    return time.perf_counter() - t, outs, computed


def hf_worker() -> int:
    """The child process's loop: one JSON line in (work, batch size), one out (seconds,
    tokens, tokens computed, other processes' CPU share)."""
    # Our JSON lines get a private copy of fd 1; fd 1 itself (any stray print, Python's or
    # a native library's) now goes to stderr, so nothing else can reach the parent's reader.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # As torch loaded libgomp here (load_hf imports engine later, which then no longer matters).
    env = {k: os.environ.get(k) for k in OPENMP_VARS}
    tok, model, load_s = load_hf()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    out.write(json.dumps(dict(load_seconds=load_s, torch_threads=torch.get_num_threads(), openmp_env=env)) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        work = [(list(p), int(m)) for p, m in req["work"]]
        gc.collect()
        with CpuContention() as cc:
            secs, outs, computed = run_hf(model, pad_id, work, int(req["batch_size"]))
        out.write(json.dumps(dict(seconds=secs, outs=outs, computed=computed, other_cpu_share=cc.other)) + "\n")
        out.flush()
    return 0


class HFProcess:
    """transformers' side, in a child process with the launch environment."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--hf-worker"], env=LAUNCH_ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self._read()
        self.load_s, self.torch_threads, self.openmp_env = (hello["load_seconds"], hello["torch_threads"],
                                                            hello["openmp_env"])

    def run(self, work, batch_size: int) -> tuple[float, list[list[int]], int, float | None]:
        self.proc.stdin.write(json.dumps(dict(work=work, batch_size=batch_size)) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        return r["seconds"], r["outs"], r["computed"], r["other_cpu_share"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the transformers process ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---- reporting ----------------------------------------------------------------------------------
def _git_state() -> dict:
    """Commit and locally modified engine files, so a result can be tied to the code it ran."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "engine"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.splitlines()
        return dict(commit=head or None, modified_engine_files=[d[3:] for d in dirty])
    except (OSError, subprocess.SubprocessError):
        return dict(commit=None, modified_engine_files=None)


def _noise(other: float | None) -> str:
    if other is None:
        return ""
    return f" [other processes used {other:.0%} of the CPU{' -- NOISY' if other > NOISY else ''}]"


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> int:
    if HF_WORKER:
        return hf_worker()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=["single", "batch", "all"], default="all")
    ap.add_argument("--hf-batch-size", type=int, default=8, help="static batch size for transformers (default 8)")
    ap.add_argument("--num-prompts", type=int, default=32, help="requests in the batch scenario (default 32)")
    ap.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    ap.add_argument("--json", metavar="PATH", help="write a JSON record of the results here")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="engine option (default: engine's)")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="engine option (default: engine's)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="timed runs per side, alternating; the shortest is reported (default 1)")
    ap.add_argument("--skip-hf", action="store_true", help="run the engine side only")
    ap.add_argument("--profile", metavar="PREFIX",
                    help="cProfile the timed engine runs into PREFIX.<scenario>.prof")
    args = ap.parse_args()
    if args.hf_batch_size < 1:
        ap.error("--hf-batch-size must be >= 1")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    scenarios = ["single", "batch"] if args.scenario == "all" else [args.scenario]
    engine_kwargs = {k: v for k, v in (("max_num_batched_tokens", args.max_num_batched_tokens),
                                       ("max_num_seqs", args.max_num_seqs)) if v is not None}

    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    tok = load_tokenizer()
    hf_proc = None
    if not args.skip_hf:
        hf_proc = HFProcess()
        log(f"transformers model loaded in {hf_proc.load_s:.1f}s (own process, {hf_proc.torch_threads} threads, "
            f"OpenMP env {hf_proc.openmp_env}; engine: { {k: os.environ.get(k) for k in OPENMP_VARS} })")
    llm, eng_load = load_engine(engine_kwargs)
    log(f"engine loaded in {eng_load:.1f}s ({llm.engine.runner.num_blocks} KV blocks)")

    # Warm-up: a short generate on each side (different tokens from the workload, so the
    # engine's prefix cache does not get a head start on the measured prompts).
    warm = [(tok.encode("Once upon a time, in a small village by the sea,", add_special_tokens=False), 8)]
    run_engine(llm, warm)
    if hf_proc is not None:
        hf_proc.run(warm, 1)

    results = []
    for sc in scenarios:
        work = make_workload(tok, sc, args.seed, args.num_prompts)
        useful = sum(m for _, m in work)
        prompt_tokens = sum(len(p) for p, _ in work)
        log(f"[{sc}] {len(work)} requests, {prompt_tokens} prompt tokens, {useful} output tokens")
        prof = f"{args.profile}.{sc}.prof" if args.profile else None
        bs = 1 if sc == "single" else args.hf_batch_size
        e_runs, h_runs = [], []
        e_out = h_out = None
        computed = 0
        # Repeats alternate the two sides, so a burst of load from elsewhere is less likely to
        # hit only one of them; the best (shortest) run of each side is reported.
        for rep in range(args.repeat):
            gc.collect()
            with CpuContention() as cc:
                e_s, e_out, cached = run_engine(llm, work, prof if rep == 0 else None)
            e_runs.append(dict(seconds=e_s, other_cpu_share=cc.other, prefix_cached_tokens=cached))
            e_count = sum(len(o) for o in e_out)
            assert e_count == useful, f"engine produced {e_count} tokens, expected {useful}"
            log(f"[{sc}] engine: {e_s:.2f}s, {useful / e_s:.1f} tok/s{_noise(cc.other)}")
            if hf_proc is not None:
                h_s, h_out, computed, other = hf_proc.run(work, bs)
                h_runs.append(dict(seconds=h_s, other_cpu_share=other))
                log(f"[{sc}] HF: {h_s:.2f}s, {useful / h_s:.1f} useful tok/s "
                    f"({computed} tokens computed){_noise(other)}")
        e_s = min(r["seconds"] for r in e_runs)
        rec = dict(scenario=sc, num_requests=len(work), prompt_tokens=prompt_tokens, output_tokens=useful,
                   prompt_lens=[len(p) for p, _ in work], max_tokens=[m for _, m in work],
                   engine=dict(seconds=e_s, tokens_per_s=useful / e_s, runs=e_runs))
        if not args.skip_hf:
            h_s = min(r["seconds"] for r in h_runs)
            div = [first_divergence(a, b) for a, b in zip(e_out, h_out)]
            matches = sum(d is None for d in div)
            rec["hf"] = dict(seconds=h_s, tokens_per_s=useful / h_s, batch_size=bs,
                             tokens_computed=computed, wasted_tokens=computed - useful, runs=h_runs)
            rec["ratio_engine_over_hf"] = (useful / e_s) / (useful / h_s)
            rec["greedy_match"] = dict(matching=matches, total=len(work), first_divergence=div)
        results.append(rec)

    if hf_proc is not None:
        hf_proc.close()

    # ---- table -----------------------------------------------------------------------------------
    print()
    print(f"SmolLM2-135M fp32, CPU ({os.cpu_count()} cores, torch {torch.get_num_threads()} threads), "
          f"greedy, seed {args.seed}, HF static batch {args.hf_batch_size}"
          + (f", best of {args.repeat} runs per side" if args.repeat > 1 else ""))
    print()
    print("| scenario | requests | prompt tok | output tok | engine s | engine tok/s | HF s | HF tok/s "
          "| engine/HF | greedy match |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        hf = r.get("hf")
        hf_cols = (f"{hf['seconds']:.2f} | {hf['tokens_per_s']:.1f} | {r['ratio_engine_over_hf']:.2f}x | "
                   f"{r['greedy_match']['matching']}/{r['greedy_match']['total']}") if hf else "- | - | - | -"
        print(f"| {r['scenario']} | {r['num_requests']} | {r['prompt_tokens']} | {r['output_tokens']} | "
              f"{r['engine']['seconds']:.2f} | {r['engine']['tokens_per_s']:.1f} | {hf_cols} |")
    noisy = [f"{r['scenario']}/{side}" for r in results for side in ("engine", "hf") if side in r
             and (min(r[side]["runs"], key=lambda x: x["seconds"])["other_cpu_share"] or 0) > NOISY]
    if noisy:
        print(f"\nWARNING: other processes used over {NOISY:.0%} of the CPU during the reported run of "
              f"{', '.join(noisy)}; re-run (--repeat N keeps the best of N).")
    for r in results:
        if "hf" in r and r["hf"]["wasted_tokens"]:
            print(f"\n{r['scenario']}: HF computed {r['hf']['tokens_computed']} output tokens for "
                  f"{r['output_tokens']} useful ({r['hf']['wasted_tokens']} wasted by static batching).")
        if "greedy_match" in r and r["greedy_match"]["matching"] != r["greedy_match"]["total"]:
            d = [(i, x) for i, x in enumerate(r["greedy_match"]["first_divergence"]) if x is not None]
            print(f"{r['scenario']}: differing requests (index, first differing output token): {d}")

    if args.json:
        record = dict(benchmark="cpu_vs_hf", model="SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised to fp32)",
                      time=time.strftime("%Y-%m-%dT%H:%M:%S"), platform=platform.platform(),
                      cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                      torch=torch.__version__, git=_git_state(), args=vars(args), engine_kwargs=engine_kwargs,
                      load_seconds=dict(engine=eng_load, hf=hf_proc.load_s if hf_proc else None),
                      openmp_env=dict(engine={k: os.environ.get(k) for k in OPENMP_VARS},
                                      hf=hf_proc.openmp_env if hf_proc else None),
                      results=results)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
