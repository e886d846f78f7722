"""`pdserve profile`: measure an engine's cost model on the machine at hand and write the
profile (planner/profile_format.py) with the fit's coefficients and errors (costmodel.py).

What runs, in order: the engine is built as a worker would build it; one warm-up pass;
the step grid (step_probe.py): pure prefill (new tokens on a log scale up to the token
budget x cached prefix), pure decode (batch on a log scale up to max_num_seqs x context),
mixed (a prefill chunk beside a decode batch); the KV transfer rate (transfer_probe.py);
the router path's overheads (overhead_probe.py). Grids are bounded by the token budget,
the model's context and the KV pool, so every point is a step the engine would run.
"""
from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass, field

from planner.profile_format import VERSION, save_profile, validate_profile

@dataclass
class ProfileOptions:
    model: str = "smollm2"
    device: str | None = None
    dtype: str | None = None
    engine: dict = field(default_factory=dict)   # EngineConfig overrides (block_size, ...)
    quick: bool = False
    warmup: int | None = None      # per point; default 2 (quick: 1)
    repeats: int | None = None     # per point, median taken; default 5 (quick: 3)
    max_point_s: float | None = None  # timed seconds per point before repeats stop early (default 2; quick 0.5)
    max_step_s: float | None = None   # skip points whose step is predicted longer (default 3; quick 1)
    max_setup_s: float | None = None  # skip points whose set-up is predicted longer (default 30; quick 5)
    transfer_backend: str = "auto"  # "zmq" | "device_copy" | "auto" (device_copy on CUDA, zmq on CPU)
    overheads: bool = True
    overhead_samples: int | None = None
    deployed_probe: bool = True    # time the deployed path (deploy/deployed_probe.py) when a runner is given
    threads: int | None = None     # torch threads for the step grid; None: a CPU deployment's (1), else torch's
    seed: int = 0
    progress: bool | None = None   # None: a bar on a terminal only


# ---- the grid -------------------------------------------------------------------------------------------
def log_grid(lo: int, hi: int, factor: int = 2) -> list[int]:
    """lo, lo*factor, ... below hi, then hi itself."""
    out, v = [], lo
    while v < hi:
        out.append(v)
        v *= factor
    return out + [hi] if hi >= 1 else out


@dataclass
class DecodePlan:
    context: int               # prompt length of the decoding requests
    batches: list[int]         # measured largest first
    mixed_batches: list[int]   # batches that also get mixed steps
    mixed_new: list[int]       # prefill chunk sizes beside them
    max_tokens: int            # enough for every step the plan runs


@dataclass
class Grid:
    prefill: list[tuple[int, int]]   # (new, cached)
    decode: list[DecodePlan]

    def num_points(self) -> int:
        return len(self.prefill) + sum(len(p.batches) + len(p.mixed_batches) * len(p.mixed_new) for p in self.decode)


def step_grid(budget: int, max_seqs: int, max_model_len: int, num_blocks: int, block_size: int, quick: bool,
              steps_per_point: int) -> Grid:
    """The points to measure, each one a step this engine would run."""
    blocks = lambda t: -(-t // block_size)   # noqa: E731
    lo = min(16, budget)
    cached_opts = [0, 512] if quick else [0, 1024, 4096]
    prefill = []
    for c in cached_opts:
        # The largest chunk a prompt with this prefix can have: the budget, the context
        # (one position is left for the sampled token) and the pool (two prompts in flight).
        top = min(budget, max_model_len - 1 - c, num_blocks // 2 * block_size - c)
        if c % block_size or top < lo:
            continue
        prefill += [(n, c) for n in log_grid(lo, top, 4 if quick else 2)]

    decode = []
    contexts = [64, 512] if quick else [128, 1024, 4096]
    ctx_cap = (4 if quick else 16) * budget    # decode tokens prefilled per context, at most
    all_batches = log_grid(1, max_seqs, 4 if quick else 2)
    for ctx in contexts:
        batches = [b for b in all_batches if b * ctx <= max(ctx_cap, ctx) and b <= budget]
        if quick:   # the smallest and the largest batch
            mixed_batches = sorted({batches[0], batches[-1]}) if batches else []
        else:
            mixed_batches = batches[::2]
        mixed_new = sorted({max(1, budget // 8), max(1, budget // 2)}) if not quick else [max(1, budget // 4)]
        mixed_count = sum(1 for b in mixed_batches for n in mixed_new if n + b <= budget)
        if not batches:
            continue
        largest = batches[-1]
        max_tokens = steps_per_point * (len(batches) + mixed_count) + 4 * (largest * ctx // budget + largest) + 64
        if ctx + max_tokens + 1 > max_model_len:
            continue
        # The decode batch, plus the mixed chunks in flight (two with overlapped scheduling:
        # a finished one's blocks come back a step later), must fit without preemption.
        spare = 2 * blocks(budget) + 2
        batches = [b for b in batches if b * blocks(ctx + max_tokens) + spare <= num_blocks]
        if not batches:
            continue
        decode.append(DecodePlan(ctx, sorted(batches, reverse=True), [b for b in mixed_batches if b in batches],
                                 mixed_new, max_tokens))
    return Grid(prefill, decode)


# ---- the profile's descriptive sections ---------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()[:200]
    except OSError:
        pass
    return (platform.processor() or platform.machine() or "unknown cpu")[:200]


def hardware_section(engine) -> dict:
    import torch
    cores = os.cpu_count() or 1
    if engine.device.type == "cuda":
        props = torch.cuda.get_device_properties(engine.device)
        return dict(device="cuda", name=props.name[:200], count=1, cpu_cores=cores,
                    memory_gb=round(props.total_memory / 2**30, 2), cpu_name=_cpu_name(),
                    visible_gpus=torch.cuda.device_count())
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = 1.0
    return dict(device="cpu", name=_cpu_name(), count=1, cpu_cores=cores, memory_gb=round(mem, 2),
                torch_threads=torch.get_num_threads())


def versions_section() -> dict:
    import importlib.metadata

    import torch
    try:
        pdserve = importlib.metadata.version("pdserve")
    except importlib.metadata.PackageNotFoundError:
        pdserve = "unknown"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(pdserve=pdserve, torch=torch.__version__, triton=triton_version, python=platform.python_version())


def model_section(engine) -> dict:
    from planner.transfer_probe import kv_bytes_per_token
    mc = engine.model_config
    return dict(name=engine.model_name[:200], dtype=str(engine.dtype).replace("torch.", ""),
                kv_dtype=str(engine.kv_cache.dtype).replace("torch.", ""), num_layers=mc.num_layers,
                kv_bytes_per_token=kv_bytes_per_token(engine), num_params=mc.num_params(),
                hidden_size=mc.hidden_size, num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads,
                head_dim=mc.head_dim, intermediate_size=mc.intermediate_size, vocab_size=mc.vocab_size)


def engine_section(engine) -> dict:
    from engine.kernels import default_backend
    cfg = engine.cfg
    return dict(block_size=cfg.block_size, max_num_batched_tokens=cfg.max_num_batched_tokens,
                max_num_seqs=cfg.max_num_seqs, num_kv_blocks=engine.num_blocks,
                kernel_backend=cfg.kernel_backend or default_backend(engine.device),
                async_scheduling=bool(engine.overlap), max_model_len=engine.max_model_len,
                enable_prefix_caching=cfg.enable_prefix_caching, quantization=cfg.quantization,
                # Fresh prefill chunks through dense attention (EngineConfig.dense_prefill, as
                # the engine resolved it): it changes what a prefill step costs.
                dense_prefill=bool(getattr(engine.runner, "dense_fresh_prefill", False)))


# ---- the run ---------------------------------------------------------------------------------------------------
def _progress(total: int, enabled: bool | None):
    from tqdm import tqdm
    return tqdm(total=total, desc="profile", unit="pt", dynamic_ncols=True, leave=False,
                disable=None if enabled is None else not enabled)


def profile_threads(opts: ProfileOptions) -> int | None:
    """The torch threads to time the engine's steps with: --threads, else on the CPU the one
    thread a worker gets under Ray (an actor asking <= 1 CPU, as pdserve's CPU workers do, gets
    OMP_NUM_THREADS=1: shared_device.threads_under_ray), else torch's own (None: unchanged).
    0 means torch's own too."""
    if opts.threads is not None:
        return opts.threads or None
    device = opts.device
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return 1 if str(device).startswith("cpu") else None


def build_engine(opts: ProfileOptions):
    # The engine's own defaults (the KV pool included: the simulator schedules with it), as a
    # worker given the same flags would have them.
    from engine import LLMEngine
    return LLMEngine(opts.model, device=opts.device, dtype=opts.dtype, **opts.engine)


def _warm_up(probe) -> None:
    """Compile and allocate before timing, twice over: the largest chunk, short prompts
    prefilled beside its decode (mixed steps), a prompt with a cached prefix."""
    from engine import SamplingParams
    eng = probe.engine
    n = min(eng.cfg.max_num_batched_tokens, eng.max_model_len - 8)
    short = min(64, n)
    for _ in range(2):
        eng.add_request(probe.rid("warmup"), probe.fresh(n), SamplingParams(max_tokens=4, ignore_eos=True))
        for _ in range(2):
            eng.add_request(probe.rid("warmup"), probe.fresh(short), SamplingParams(max_tokens=8, ignore_eos=True))
        probe.drain()
        cached = eng.cfg.block_size * max(1, min(4, (eng.max_model_len - short - 1) // eng.cfg.block_size))
        if cached + short < eng.max_model_len and 2 * eng.blocks_for(cached + short) <= eng.num_blocks:
            prefix = probe.warm_prefix(cached)
            eng.add_request(probe.rid("warmup"), prefix + probe.fresh(short),
                            SamplingParams(max_tokens=2, ignore_eos=True))
            probe.drain()


def run_profile(opts: ProfileOptions) -> dict:
    """Measure and return a validated profile (with the fit and its errors)."""
    from planner import overhead_probe, transfer_probe
    from planner.cost_guard import CostGuard
    from planner.costmodel import dense_prefill_of, fit_steps
    from planner.step_probe import StepProbe

    warmup = opts.warmup if opts.warmup is not None else (1 if opts.quick else 2)
    repeats = opts.repeats if opts.repeats is not None else (3 if opts.quick else 5)
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}")
    started = datetime.datetime.now(datetime.timezone.utc)
    threads = profile_threads(opts)
    if threads:
        import torch
        torch.set_num_threads(threads)
    engine = build_engine(opts)
    cfg = engine.cfg
    grid = step_grid(cfg.max_num_batched_tokens, cfg.max_num_seqs, engine.max_model_len, engine.num_blocks,
                     cfg.block_size, opts.quick, warmup + repeats)
    backend = opts.transfer_backend
    if backend == "auto":
        backend = "device_copy" if engine.device.type == "cuda" else "zmq"
    from planner.transfer_probe import transfer_sizes
    n_transfer = len(transfer_sizes(engine, opts.quick))
    bar = _progress(grid.num_points() + n_transfer + (1 if opts.overheads else 0), opts.progress)
    max_point_s = opts.max_point_s or (0.5 if opts.quick else 2.0)
    dense_prefill, _ = dense_prefill_of(dict(engine=engine_section(engine), model=model_section(engine)))
    guard = CostGuard(opts.max_step_s or (1.0 if opts.quick else 3.0),
                      opts.max_setup_s or (5.0 if opts.quick else 30.0), cfg.max_num_batched_tokens, dense_prefill)
    probe = StepProbe(engine, warmup, repeats, opts.seed, max_point_s=max_point_s)
    steps = []

    def measured(entry: dict) -> None:
        steps.append(entry)
        guard.add(entry)

    try:
        _warm_up(probe)
        for new, cached in grid.prefill:   # by cached prefix, then new tokens, ascending
            bar.set_postfix_str(f"prefill {new}+{cached}")
            what = f"prefill {new} new + {cached} cached"
            if guard.allows_step([(new, cached)], [], what) and \
                    (cached == 0 or probe.has_prefix(cached) or guard.allows_setup(1, cached + 1, what)):
                measured(probe.prefill(new, cached))
            bar.update()
        for plan in grid.decode:
            batches = guard.largest_batch(plan.batches, plan.context, f"decode at context {plan.context}")
            if batches:
                ds = probe.start_decodes(batches[0], plan.context, plan.max_tokens)
            for b in plan.batches:
                if b in batches:
                    probe.shrink(ds, b)
                    bar.set_postfix_str(f"decode {b}x{plan.context}")
                    if guard.allows_step([], [plan.context] * b, f"decode {b} x {plan.context}"):
                        measured(probe.decode(ds))
                bar.update()
                if b in plan.mixed_batches:
                    for n in plan.mixed_new:
                        what = f"mixed {b} x {plan.context} + {n}"
                        if b in batches and n + b <= cfg.max_num_batched_tokens and \
                                guard.allows_step([(n, 0)], [plan.context] * b, what):
                            bar.set_postfix_str(what)
                            measured(probe.mixed(ds, n))
                        bar.update()
            if batches:
                probe.finish(ds)
        bar.set_postfix_str(f"transfer ({backend})")
        transfer = transfer_probe.measure(engine, backend, opts.quick, warmup, repeats, progress=bar.update)
        profile = dict(version=VERSION, created=started.isoformat(timespec="seconds"),
                       hardware=hardware_section(engine), versions=versions_section(), model=model_section(engine),
                       engine=engine_section(engine), steps=steps, transfer=transfer)
        del probe, engine   # the overhead probe's own engines need the memory more than this one
        if opts.overheads:
            bar.set_postfix_str("router overheads")
            samples = opts.overhead_samples or (5 if opts.quick else 15)
            profile["overheads"] = overhead_probe.measure(samples, opts.seed)
            bar.update()
        else:
            profile["overheads"] = dict(router_direct_s=0.0, router_disaggregated_s=0.0, per_token_stream_s=0.0,
                                        notes="not measured (--no-overheads): zeros")
    finally:
        bar.close()
    dense_prefill, why = dense_prefill_of(profile)
    profile["fit"] = fit_steps(steps, dense_prefill=dense_prefill, paged_only_because=why)
    profile["measurement"] = dict(warmup=warmup, repeats=repeats, max_point_s=max_point_s,
                                  max_step_s=guard.max_step_s, max_setup_s=guard.max_setup_s, quick=opts.quick,
                                  statistic="median", skipped=guard.skipped[:1000],
                                  seconds=round((datetime.datetime.now(datetime.timezone.utc) - started)
                                                .total_seconds(), 1),
                                  step_timing="interval between back-to-back step() calls in a steady run "
                                              "of identical steps (planner/step_probe.py)")
    return validate_profile(profile)


# ---- the command ------------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    """`pdserve profile` flags (argparse only; the run's imports wait for the command)."""
    p.add_argument("--model", default="smollm2", help="smollm2 | HF folder | .gguf file | random:<shape> "
                                                      "(random:tiny for a quick CPU run, random:llama3-8b on a GPU)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--out", default="profile.json", metavar="FILE", help="where to write the profile")
    p.add_argument("--quick", action="store_true", help="a small grid and fewer repeats (CI-sized)")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="the engine's per-step token budget")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-gb", type=float, default=None)
    p.add_argument("--kernel-backend", default=None, choices=["torch", "triton", "cpu"])
    p.add_argument("--async-scheduling", default=None, choices=["on", "off"],
                   help="overlapped scheduling (default: on with CUDA); profile the mode you serve with")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per point (default 2; quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per point, median taken (default 5; quick 3)")
    p.add_argument("--max-point-seconds", type=float, default=None,
                   help="stop repeating a point after this many timed seconds, once 3 steps are in "
                        "(default 2; quick 0.5)")
    p.add_argument("--max-step-seconds", type=float, default=None,
                   help="skip grid points whose step the points so far predict longer than this (default 3; quick 1)")
    p.add_argument("--max-setup-seconds", type=float, default=None,
                   help="skip grid points whose set-up (prefilling a prefix or a decode batch's prompts) is "
                        "predicted longer than this (default 30; quick 5)")
    p.add_argument("--transfer-backend", default="auto", choices=["auto", "zmq", "device_copy"],
                   help="KV transfer to time (default: device_copy on CUDA, zmq on CPU)")
    p.add_argument("--no-overheads", action="store_true",
                   help="skip every overhead measurement: in-process router, gRPC front end, deployed path "
                        "(writes zeros)")
    p.add_argument("--no-deployed-probe", dest="deployed_probe", action="store_false",
                   help="skip the deployed-path probe (local Ray clusters as pdserve bench starts them, colocated "
                        "x1 and 1P1D, timed one request at a time over gRPC, then a few at once; "
                        "deploy/deployed_probe.py), whose numbers otherwise become the profile's router_direct_s / "
                        "router_disaggregated_s / per_token_stream_s / per_stream_s; without it those are the "
                        "in-process and front-end probes' (they leave out Ray worker processes, ZeroMQ and the "
                        "workers' loops: lower; per_stream_s 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads to time the engine's steps with (default: on the CPU 1, the one thread Ray "
                        "gives a worker asking <= 1 CPU, which is what pdserve's CPU workers get; on a GPU "
                        "torch's default; 0: torch's default). Profile with the threads your workers compute "
                        "with: `pdserve plan --validate` warns on a mismatch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the fit summary as JSON")


def options_from_args(args) -> ProfileOptions:
    engine = {}
    for flag, key in (("block_size", "block_size"), ("max_num_batched_tokens", "max_num_batched_tokens"),
                      ("max_num_seqs", "max_num_seqs"), ("num_kv_blocks", "num_kv_blocks"),
                      ("kv_cache_gb", "kv_cache_memory_gb"), ("kernel_backend", "kernel_backend")):
        v = getattr(args, flag)
        if v is not None:
            engine[key] = v
    if args.async_scheduling is not None:
        engine["async_scheduling"] = args.async_scheduling == "on"
    return ProfileOptions(model=args.model, device=args.device, dtype=args.dtype, engine=engine, quick=args.quick,
                          warmup=args.warmup, repeats=args.repeats, max_point_s=args.max_point_seconds,
                          max_step_s=args.max_step_seconds, max_setup_s=args.max_setup_seconds,
                          transfer_backend=args.transfer_backend,
                          overheads=not args.no_overheads, seed=args.seed,
                          deployed_probe=getattr(args, "deployed_probe", True), threads=getattr(args, "threads", None))


def summary(profile: dict) -> dict:
    from planner.costmodel import CostModel
    cm = CostModel.from_profile(profile)
    fit = profile["fit"]
    return dict(model=profile["model"]["name"], hardware=profile["hardware"]["name"], steps=len(profile["steps"]),
                coefficients=cm.coefficients, relative_error=fit["relative_error"],
                holdout_relative_error=fit.get("holdout_relative_error"), attention=cm.fit_report.get("attention"),
                transfer=dict(backend=profile["transfer"]["backend"], latency_s=cm.transfer_latency_s,
                              bytes_per_s=cm.transfer_bytes_per_s),
                overheads={k: profile["overheads"][k] for k in ("router_direct_s", "router_disaggregated_s",
                                                                "per_token_stream_s")},
                seconds=profile["measurement"]["seconds"])


def _on_cuda(device: str | None) -> bool:
    import torch
    return (device is None or str(device).startswith("cuda")) and torch.cuda.is_available()


def _child_main(opts_fields: dict, path: str) -> None:
    import json
    with open(path, "w") as f:
        json.dump(run_profile(ProfileOptions(**opts_fields)), f)


def run_profile_in_child(opts: ProfileOptions) -> dict:
    """run_profile in a child process, its profile back as JSON. On a GPU the deployed
    probe that follows starts workers (other processes) that need the memory the profiling
    engine held; dropped in this process, that memory would stay in torch's caching
    allocator, which other processes see as used. The child's exit gives it all back."""
    import dataclasses
    import json
    import multiprocessing
    import os
    import tempfile
    with tempfile.TemporaryDirectory(prefix="pdserve-profile-") as d:
        path = os.path.join(d, "profile.json")
        child = multiprocessing.get_context("spawn").Process(target=_child_main, name="pdserve-profile",
                                                             args=(dataclasses.asdict(opts), path))
        child.start()
        child.join()
        if child.exitcode != 0 or not os.path.exists(path):
            raise RuntimeError(f"the profiling process failed (exit code {child.exitcode}); its error is above")
        with open(path) as f:
            return json.load(f)


def run_command(args, front_end=None, deployed=None) -> int:
    """front_end(samples, seed): the request path's front-end overheads to add to the
    profile's `overheads` (deploy/frontend_probe.measure: planner/ does not import grpc).
    deployed(profile, opts, repeats): the profile's new `overheads` from the deployed path
    (deploy/deployed_probe.measure), run last, with the step fit in place."""
    import json
    opts = options_from_args(args)
    deploys = deployed is not None and opts.overheads and opts.deployed_probe
    profile = run_profile_in_child(opts) if deploys and _on_cuda(opts.device) else run_profile(opts)
    if front_end is not None and opts.overheads:
        profile["overheads"].update(front_end(samples=opts.overhead_samples or (5 if opts.quick else 12),
                                              seed=opts.seed))
    if deploys:
        print("timing the deployed path (local Ray clusters, one request at a time, then a few at once; "
              "--no-deployed-probe skips)",
              flush=True)
        profile["overheads"] = deployed(profile, opts, repeats=3 if opts.quick else 15)
        validate_profile(profile)
    save_profile(profile, args.out)
    s = summary(profile)
    if args.json:
        print(json.dumps(s))
        return 0
    err, held = s["relative_error"], s["holdout_relative_error"] or {}
    print(f"wrote {args.out}: {s['steps']} steps of {s['model']} on {s['hardware']} in {s['seconds']} s")
    print("step time = " + profile["fit"]["form"])
    print("  " + ", ".join(f"{k}={v:.3g}" for k, v in s["coefficients"].items()))
    if s["attention"]:
        print(f"  {s['attention']}")
    print(f"  fit |relative error|: median {err['median']:.1%}, p90 {err['p90']:.1%}, max {err['max']:.1%}"
          + (f"; held out: median {held['median']:.1%}, p90 {held['p90']:.1%}" if held else ""))
    t = s["transfer"]
    print(f"transfer ({t['backend']}): {t['latency_s'] * 1e3:.3f} ms + bytes / {t['bytes_per_s'] / 1e9:.2f} GB/s")
    o = s["overheads"]
    how = "deployed path" if profile["overheads"].get("method") == "deployed" else "in-process router"
    print(f"request-path overheads ({how}): direct {o['router_direct_s'] * 1e3:.2f} ms, disaggregated "
          f"{o['router_disaggregated_s'] * 1e3:.2f} ms, per streamed token {o['per_token_stream_s'] * 1e3:.3f} ms")
    fe = profile["overheads"]
    dep = fe.get("deployed") or {}
    if dep:
        print(f"  + {fe['per_prompt_token_s'] * 1e6:.2f} us per prompt token"
              + (f"; negative residuals clamped at 0: {dep['negative']}" if dep.get("negative") else ""))
        if "concurrent" in dep:
            c = dep["concurrent"]
            print(f"  {c['streams']} streams at once: TPOT {c['tpot_ms']:.2f} ms against {c['priced_tpot_ms']:.2f} "
                  f"priced: + {fe.get('per_stream_s', 0.0) * 1e3:.3f} ms a loop per further stream")
        if "bursts" in dep:
            b = dep["bursts"]
            print(f"  {b['streams']} disaggregated at once: mean TTFT {b['mean_ttft_ms']:.2f} ms against "
                  f"{b['priced_mean_ttft_ms']:.2f} priced with the path as latency: "
                  f"{fe.get('prefill_serial_s', 0.0) * 1e3:.3f} ms of it served one prompt at a time by the "
                  f"prefill loop" + (" (capped at the whole path)" if b.get("capped") else ""))
        for route, q in (fe.get("path_jitter_s") or {}).items():   # quantiles at 0, 5, ..., 100 %
            at = lambda p: q[round(p * (len(q) - 1))] * 1e3  # noqa: E731
            print(f"  {route} path scatter about it: p10 {at(0.1):+.2f} ms, p90 {at(0.9):+.2f} ms, "
                  f"max {at(1.0):+.2f} ms")
        ref = fe.get("reference", {})
        if "in_process" in ref:
            r = ref["in_process"]
            print(f"  (in-process probe, for reference: direct {r['router_direct_s'] * 1e3:.2f} ms, disaggregated "
                  f"{r['router_disaggregated_s'] * 1e3:.2f} ms, per token {r['per_token_stream_s'] * 1e3:.3f} ms)")
    if "frontend_direct_s" in fe:
        print(f"through the gRPC front end: direct {fe['frontend_direct_s'] * 1e3:.2f} ms + "
              f"{fe['per_prompt_token_s'] * 1e6:.2f} us per prompt token")
    return 0
