"""The engine's cost model: seconds per engine step and per KV transfer, fitted to a profile.

A step's time has one of two forms, both fitted to every profile; the one with the smaller
held-out error (k-fold, relative) is used (:func:`fit_steps`). All coefficients are
non-negative. P prefill tokens in S chunks, A their causal attention pairs
(profile_format.attention_pairs) through the paged kernel and A_dense through dense
attention, D decoded sequences and K the tokens they attend to.

"additive" (this module):

    t = step_s + prefill_seq_s * S + decode_seq_s * D    host: scheduling, launches, sampling
        + max(weights_s, per_token_s * (P + D))            linear layers: weight-read floor or compute
        + attention_s_per_pair * A                        prefill attention, paged kernel
        + dense_attention_s_per_pair * A_dense            prefill attention, dense (compute bound)
        + decode_s_per_context_token * K                  decode attention (KV reads)

Prefill attention takes one of two paths (profile_format.dense_attention_step): with the
engine's dense prefill on, a step whose chunks all start their sequence attends densely over
their own K/V (on the triton backend only a step of one such chunk: dense_several_prompts_of);
any other step gathers K/V back through the paged kernel. The two cost
differently per pair (a CPU's paged reference several times more), so each path has its own
coefficient, fitted to the steps that took it (:func:`attention_split`). Where the steps
cannot separate them (dense prefill off or not recorded, a path no step took, an entry whose
path its sums do not tell) both are the one fitted coefficient, and the fit report's
`attention` says so.

Host and device work add up, as on a CPU (one set of cores does both) or a synchronous
engine. On a GPU the linear layers read every weight once per step whatever the batch, so a
small step costs about the weight read, and past the ridge point (tokens where compute time
equals that read) they are compute bound and linear in tokens.

"overlapped" (planner/overlapped_fit.py): step_s + max(host, device), the host's launches
(a graph replay, an eager step, an eager step with decodes) against the device's work (the
larger of the weight + KV reads and the compute). With overlapped scheduling on a GPU the
host prepares and launches one step while the device runs the previous one, so the longer
of the two sets the pace; a small eager step is launch-bound and flat in its tokens.

KV transfer: t = latency + bytes / bandwidth, fitted to the profile's measured points the
same way; a transfer of n tokens moves whole blocks (n rounded up to block_size) of
kv_bytes_per_token each.
"""
from __future__ import annotations

import copy
import datetime
import itertools
import math

import numpy as np

from planner import overlapped_fit
from planner.profile_format import VERSION, entry_pairs_by_path, prefill_sums, validate_profile

# The additive form's coefficients (FORMS lists each form's).
COEFFICIENTS = ("step_s", "prefill_seq_s", "decode_seq_s", "weights_s", "per_token_s", "attention_s_per_pair",
                "dense_attention_s_per_pair", "decode_s_per_context_token")
FORM = ("step_s + prefill_seq_s*S + decode_seq_s*D + max(weights_s, per_token_s*(P+D)) + attention_s_per_pair*A "
        "+ dense_attention_s_per_pair*A_dense + decode_s_per_context_token*K")
# Prefill attention per pair: the paged kernel's and dense attention's. A fit written before
# there were two has the first only, which then prices both.
PAGED_ATTENTION, DENSE_ATTENTION = "attention_s_per_pair", "dense_attention_s_per_pair"
FORMS = {"additive": (COEFFICIENTS, FORM), overlapped_fit.NAME: (overlapped_fit.COEFFICIENTS, overlapped_fit.FORM)}
# How much smaller a form's held-out error must be to be chosen over a simpler one.
FORM_TOLERANCE = 0.10
# A transfer faster than this is not a measurement of bytes moving (device memory moves a few
# TB/s, links less): the points did not constrain the slope (see fit_transfer).
MAX_PLAUSIBLE_BYTES_PER_S = 1e13
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float64": 8,
                "int8": 1, "fp8": 1, "fp8_tensor": 1}


# ---- fitting ------------------------------------------------------------------------------------------
def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min ||a x - b|| subject to x >= 0 (Lawson and Hanson's active set method; numpy
    only, no scipy). Solved on unit-norm columns: the features span many orders of magnitude."""
    m, n = a.shape
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0
    an = a / norms
    tol = 10 * np.finfo(float).eps * max(m, n) * max(1.0, float(np.abs(an).max()))
    x = np.zeros(n)
    active = np.zeros(n, dtype=bool)   # the "passive" set P: coefficients free to be positive
    grad = an.T @ (b - an @ x)
    for _ in range(3 * n + 10):
        if active.all() or grad[~active].max(initial=-np.inf) <= tol:
            break
        j = int(np.argmax(np.where(active, -np.inf, grad)))
        active[j] = True
        while True:
            z = np.zeros(n)
            z[active] = np.linalg.lstsq(an[:, active], b, rcond=None)[0]
            if np.all(z[active] > 0):
                x = z
                break
            # Step from x toward z until the first coefficient reaches zero; drop it.
            neg = active & (z <= 0)
            alpha = float(np.min(x[neg] / (x[neg] - z[neg])))
            x = x + alpha * (z - x)
            active &= x > tol
            x[~active] = 0.0
            if not active.any():
                break
        grad = an.T @ (b - an @ x)
    return x / norms


def dense_prefill_of(profile: dict) -> tuple[bool, str]:
    """Whether the profiled engine sent prefill chunks that start their sequence through dense
    attention, and the reason in words. The engine does where its runner resolved
    EngineConfig.dense_prefill on (recorded as engine.dense_prefill) and its KV cache holds
    the activations' dtype (Attention.forward: a quantized cache keeps the paged kernel)."""
    recorded = profile["engine"].get("dense_prefill")
    if recorded is None:
        return False, "engine.dense_prefill not recorded (a profile from before it was), read as off"
    if not recorded:
        return False, "the profiled engine's dense prefill was off"
    model = profile["model"]
    kv_dtype = model.get("kv_dtype")
    if kv_dtype is not None and kv_dtype != model.get("dtype"):
        return False, f"its {kv_dtype} KV cache keeps every chunk on the paged kernel"
    return True, "the profiled engine's dense prefill was on"


def dense_several_prompts_of(profile: dict) -> bool:
    """Whether the profiled engine's dense prefill served steps of several prompts: not on
    the triton backend (engine/attention_path.dense_serves_several_prompts, restated: the
    planner does not load torch). A profile that names no backend the engine has (none, or
    a synthetic one's "n/a") is read as the device's default: triton on a GPU."""
    backend = profile["engine"].get("kernel_backend")
    if backend not in ("triton", "cpu", "torch"):
        backend = "cpu" if profile["hardware"]["device"] == "cpu" else "triton"
    return backend != "triton"


def attention_split(steps: list[dict], dense_prefill: bool,
                    paged_only_because: str = "dense prefill off") -> tuple[np.ndarray, np.ndarray, str]:
    """Each step's attention pairs by path, (paged, dense), and a line saying how the fit can
    price them. Every pair counts as paged when dense prefill was off, or when some entry's
    path cannot be told from its sums (profile_format.entry_pairs_by_path): one coefficient
    then prices all of them."""
    total = np.array([float(s["prefill_context"]) for s in steps])
    none = np.zeros_like(total)
    if not dense_prefill:
        return total, none, ("one attention coefficient: every prefill chunk took the paged kernel "
                             f"({paged_only_because})")
    by_path = [entry_pairs_by_path(s, True) for s in steps]
    unknown = [i for i, p in enumerate(by_path) if p is None]
    if unknown:
        return total, none, (f"one attention coefficient for both paths: {len(unknown)} step(s) (steps[{unknown[0]}] "
                             "first) have several prefill chunks, whose sums do not say which path they took")
    paged = np.array([float(p) for p, _ in by_path])
    dense = np.array([float(d) for _, d in by_path])
    if not dense.any():
        return paged, dense, "one attention coefficient for both paths: no measured step took dense attention"
    if not paged.any():
        return paged, dense, ("one attention coefficient for both paths: no measured step took the paged kernel "
                              "(no chunk after a prefix); it is priced at dense attention's cost")
    return paged, dense, (f"two attention coefficients: dense from {int(np.count_nonzero(dense))} steps whose chunks "
                          f"start their sequence, paged from {int(np.count_nonzero(paged))} steps with a prefix")


def _one_coefficient_for_an_unmeasured_path(coef: dict[str, float], paged_pairs: np.ndarray,
                                            dense_pairs: np.ndarray) -> dict[str, float]:
    """A path no fitted step took left its coefficient unconstrained (zero): it is priced as
    the other one, as a fit with one coefficient would."""
    if not dense_pairs.any():
        coef[DENSE_ATTENTION] = coef[PAGED_ATTENTION]
    elif not paged_pairs.any():
        coef[PAGED_ATTENTION] = coef[DENSE_ATTENTION]
    return coef


def _features(steps: list[dict], dense_prefill: bool = False) -> dict[str, np.ndarray]:
    paged_pairs, dense_pairs, _ = attention_split(steps, dense_prefill)
    return _columns(steps, paged_pairs, dense_pairs)


def _columns(steps: list[dict], paged_pairs: np.ndarray, dense_pairs: np.ndarray) -> dict[str, np.ndarray]:
    col = lambda k: np.array([float(s[k]) for s in steps])   # noqa: E731
    return dict(prefill_seqs=col("num_prefill_seqs"), decode_seqs=col("decode_seqs"),
                tokens=col("prefill_tokens") + col("decode_seqs"), paged_pairs=paged_pairs, dense_pairs=dense_pairs,
                context=col("decode_context"), y=col("seconds"))


def _fit_arrays(f: dict[str, np.ndarray]) -> dict[str, float]:
    y = f["y"]
    w = 1.0 / y   # relative residuals
    tokens = f["tokens"]

    def solve(ridge: float) -> tuple[float, np.ndarray]:
        a = np.column_stack([np.ones_like(y), f["prefill_seqs"], f["decode_seqs"], np.maximum(tokens, ridge),
                             f["paged_pairs"], f["dense_pairs"], f["context"]])
        x = nnls(a * w[:, None], np.ones_like(y))
        r = (a @ x) * w - 1.0
        return float(np.dot(r, r)), x

    # The ridge point (tokens where the weight floor meets compute) enters non-linearly:
    # try none and a geometric grid over the measured token counts, then narrow the best
    # bracket by golden-section search.
    lo, hi = max(1.0, float(tokens.min())), max(2.0, float(tokens.max()))
    ridges = [0.0] + list(np.geomspace(lo, hi, 48))
    errs = [solve(r)[0] for r in ridges]
    i = int(np.argmin(errs))
    a, b = ridges[max(0, i - 1)], ridges[min(len(ridges) - 1, i + 1)]
    best_err, best_ridge = errs[i], ridges[i]
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    ec, ed = solve(c)[0], solve(d)[0]
    for _ in range(40):
        if ec < ed:
            b, d, ed = d, c, ec
            c = b - g * (b - a)
            ec = solve(c)[0]
        else:
            a, c, ec = c, d, ed
            d = a + g * (b - a)
            ed = solve(d)[0]
    for r, e in ((c, ec), (d, ed)):
        if e < best_err:
            best_err, best_ridge = e, r
    _, x = solve(best_ridge)
    coef = dict(step_s=float(x[0]), prefill_seq_s=float(x[1]), decode_seq_s=float(x[2]),
                weights_s=float(x[3] * best_ridge), per_token_s=float(x[3]), attention_s_per_pair=float(x[4]),
                dense_attention_s_per_pair=float(x[5]), decode_s_per_context_token=float(x[6]))
    return _one_coefficient_for_an_unmeasured_path(coef, f["paged_pairs"], f["dense_pairs"])


def predict_entry_as(form: str, coef: dict[str, float], s: dict, dense_prefill: bool = False) -> float:
    """A profile entry's predicted seconds under the named form."""
    if form == overlapped_fit.NAME:
        return overlapped_fit.predict_entry(coef, s, dense_prefill)
    return predict_entry(coef, s, dense_prefill)


def _fit_form(form: str, steps: list[dict], paged_pairs: np.ndarray, dense_pairs: np.ndarray) -> dict[str, float]:
    if form == overlapped_fit.NAME:
        coef = overlapped_fit.fit(steps, nnls, paged_pairs, dense_pairs)
        return _one_coefficient_for_an_unmeasured_path(coef, paged_pairs, dense_pairs)
    return _fit_arrays(_columns(steps, paged_pairs, dense_pairs))


def _entry_seconds(form: str, coef: dict[str, float], s: dict, paged_pairs: float, dense_pairs: float) -> float:
    """A profile entry's predicted seconds, its attention pairs given by path."""
    if form == overlapped_fit.NAME:
        serial, host, device = overlapped_fit.parts(coef, s["prefill_tokens"], paged_pairs, dense_pairs,
                                                    s["num_prefill_seqs"], s["decode_seqs"], s["decode_context"])
        return serial + max(host, device)
    d = s["decode_seqs"]
    return (coef["step_s"] + coef["prefill_seq_s"] * s["num_prefill_seqs"] + coef["decode_seq_s"] * d
            + max(coef["weights_s"], coef["per_token_s"] * (s["prefill_tokens"] + d))
            + coef[PAGED_ATTENTION] * paged_pairs + coef[DENSE_ATTENTION] * dense_pairs
            + coef["decode_s_per_context_token"] * s["decode_context"])


def _relative_errors(coef: dict[str, float], steps: list[dict], form: str, paged_pairs: np.ndarray,
                     dense_pairs: np.ndarray) -> np.ndarray:
    return np.array([_entry_seconds(form, coef, s, p, d) / s["seconds"] - 1.0
                     for s, p, d in zip(steps, paged_pairs, dense_pairs)])


def _summary(rel: np.ndarray) -> dict:
    if rel.size == 0:
        return dict(n=0)
    a = np.abs(rel)
    return dict(n=int(a.size), median=float(np.median(a)), p90=float(np.quantile(a, 0.9)), max=float(a.max()),
                mean=float(a.mean()), mean_signed=float(rel.mean()))


def _fit_report(form: str, steps: list[dict], folds: int, paged_pairs: np.ndarray, dense_pairs: np.ndarray) -> dict:
    coef = _fit_form(form, steps, paged_pairs, dense_pairs)
    rel = _relative_errors(coef, steps, form, paged_pairs, dense_pairs)
    report = dict(model=form, form=FORMS[form][1], coefficients=coef, relative_error=_summary(rel),
                  relative_error_by_kind={k: _summary(rel[[s.get("kind") == k for s in steps]])
                                          for k in sorted({s.get("kind") for s in steps if s.get("kind")})})
    if len(steps) >= 2 * folds:
        held = np.empty(len(steps))
        idx = np.arange(len(steps))
        for k in range(folds):
            test = idx % folds == k
            train = [s for s, t in zip(steps, test) if not t]
            c = _fit_form(form, train, paged_pairs[~test], dense_pairs[~test])
            held[test] = _relative_errors(c, [s for s, t in zip(steps, test) if t], form, paged_pairs[test],
                                          dense_pairs[test])
        report["holdout_relative_error"] = _summary(held)
    return report


def fit_steps(steps: list[dict], folds: int = 5, forms: tuple[str, ...] = tuple(FORMS), *,
              dense_prefill: bool = False, paged_only_because: str = "dense prefill off") -> dict:
    """Fit each form to the measured steps; report relative errors in-sample, per kind, and
    on held-out points (k-fold: each fold predicted by a fit to the others), and keep the
    form with the smallest mean held-out error (in-sample when there are too few points to
    hold any out), unless a simpler form (earlier in FORMS) comes within FORM_TOLERANCE of it.
    dense_prefill: the profiled engine's (dense_prefill_of), which splits the attention
    pairs by path (attention_split; paged_only_because says why not, where it did not).
    The report is the chosen form's, with every form's under `candidates` and the split's
    line under `attention`."""
    if not steps:
        raise ValueError("fit_steps: no steps")
    paged_pairs, dense_pairs, attention = attention_split(steps, dense_prefill, paged_only_because)
    reports = {f: _fit_report(f, steps, folds, paged_pairs, dense_pairs) for f in forms}

    def score(f):
        r = reports[f]
        return (r.get("holdout_relative_error") or r["relative_error"])["mean"]
    # The simpler form (FORMS' order) unless another predicts clearly better: a difference
    # within timing noise is no reason to take on more coefficients.
    best = min(score(f) for f in forms)
    chosen = next(f for f in forms if score(f) <= best * (1 + FORM_TOLERANCE) + 1e-12)
    return dict(reports[chosen], attention=attention,
                candidates={f: {k: r[k] for k in ("coefficients", "relative_error", "holdout_relative_error") if k in r}
                            for f, r in reports.items()})


class ImplausibleTransferFit(UserWarning):
    """The transfer points give a bandwidth no memory or link has: they are flat in bytes
    (each point's time is fixed costs, e.g. kernel launches, and the slope is noise)."""


def fit_transfer(points: list[dict]) -> tuple[float, float]:
    """(latency_s, bytes_per_s) from measured (bytes, seconds) points, relative residuals.
    Warns (ImplausibleTransferFit) when the bandwidth exceeds MAX_PLAUSIBLE_BYTES_PER_S: the
    points did not measure bytes moving, and the line is kept only as a fit of their times."""
    b = np.array([float(p["bytes"]) for p in points])
    y = np.array([float(p["seconds"]) for p in points])
    if len(points) == 1 or np.all(b == b[0]):
        return 0.0, float(np.median(b / y))
    w = 1.0 / y
    lat, inv_bw = nnls(np.column_stack([np.ones_like(b), b]) * w[:, None], np.ones_like(y))
    bw = math.inf if inv_bw <= 0 else float(1.0 / inv_bw)   # flat in bytes: no bandwidth term measurable
    if bw > MAX_PLAUSIBLE_BYTES_PER_S:
        import warnings
        warnings.warn(ImplausibleTransferFit(
            f"KV transfer fit: {bw / 1e9:.0f} GB/s is not a bandwidth (the points, {b.min():.3g} to {b.max():.3g} "
            f"bytes in {y.min() * 1e3:.3f} to {y.max() * 1e3:.3f} ms, are flat in bytes: fixed costs such as "
            "launches dominate every point); measure larger transfers"), stacklevel=2)
    return float(lat), bw


def predict_entry(coef: dict[str, float], s: dict, dense_prefill: bool = False) -> float:
    """A step's time from its profile entry (the sums of profile_format.step_entry) under the
    additive form; dense_prefill: the profiled engine's. An entry whose path its sums do not
    tell is priced as paged."""
    paged_pairs, dense_pairs = entry_pairs_by_path(s, dense_prefill) or (s["prefill_context"], 0)
    return _entry_seconds("additive", coef, s, paged_pairs, dense_pairs)


# ---- the model ------------------------------------------------------------------------------------------
class CostModel:
    """Seconds per engine step and per KV transfer for one engine configuration.

    step_time(prefill_chunks, decode_contexts): one engine step that prefills each chunk
        (new_tokens, cached_tokens_before_chunk) and decodes one token for each sequence of
        the given current context length (tokens it attends to, the new one included). The
        cached tokens (a prefix-cache hit or earlier chunks) also say which attention path
        the step takes (profile_format.dense_attention_step), as num_computed_tokens does
        in the engine.
    transfer_time(num_tokens): the KV of num_tokens (whole blocks) landing in the decode
        worker, from latency + bytes / bandwidth.
    """

    def __init__(self, profile: dict, coefficients: dict[str, float], fit_report: dict | None = None,
                 form: str = "additive"):
        self.profile = profile
        self.form = form
        coefficients = dict(coefficients)
        coefficients.setdefault(DENSE_ATTENTION, coefficients[PAGED_ATTENTION])   # a fit from before there were two
        self.coefficients = {k: float(coefficients[k]) for k in FORMS[form][0]}
        self.fit_report = fit_report or {}
        # Which prefill steps attend densely (profile_format.dense_attention_step).
        self.dense_prefill, _ = dense_prefill_of(profile)
        self.dense_several_prompts = dense_several_prompts_of(profile)
        # Engines on a CPU do host and device work on the same cores: another engine there
        # slows all of it (planner/shared_device.py); on a GPU only the device part.
        self.host_is_device = profile["hardware"]["device"] == "cpu"
        # GPUs one engine of this model stands for: 1 as profiled, tp for a profile rescaled
        # to tensor parallelism (scaled()); the planner's per-GPU figures divide by it.
        self.gpus_per_engine = int((profile.get("fit") or {}).get("scaled", {}).get("gpus_per_engine", 1))
        # The profiled engine scheduled overlapped (engine/overlap.py): a decode worker's
        # tokens leave when the next step's launches are done (simulator.py).
        self.overlapped_scheduling = bool(profile["engine"].get("async_scheduling", False))
        e, m, o = profile["engine"], profile["model"], profile["overheads"]
        self.block_size = int(e["block_size"])
        self.max_num_batched_tokens = int(e["max_num_batched_tokens"])
        self.max_num_seqs = int(e["max_num_seqs"])
        self.num_kv_blocks = int(e["num_kv_blocks"])
        self.kv_bytes_per_token = int(m["kv_bytes_per_token"])
        self.router_direct_s = float(o["router_direct_s"])
        self.router_disaggregated_s = float(o["router_disaggregated_s"])
        self.per_token_stream_s = float(o["per_token_stream_s"])
        # Each further request streaming at once adds this to every loop iteration (the
        # deployed probe's concurrent streams); 0 for profiles without it.
        self.per_stream_s = float(o.get("per_stream_s", 0.0))
        # ... for the requests up to this many in a batch (what the probe measured; 0: all)
        self.per_stream_upto = int(o.get("per_stream_upto", 0))
        # The part of router_disaggregated_s that the prefill worker's loop serves one request
        # at a time after the step that computed the prompt (the deployed probe's bursts of
        # disaggregated requests): the simulator keeps the loop busy that long per prompt
        # instead of letting requests overlap it. 0 for profiles without it.
        self.prefill_serial_s = min(float(o.get("prefill_serial_s", 0.0)), self.router_disaggregated_s)
        # Through the gRPC front end (deploy/frontend_probe.py), when the profile measured it:
        # the whole path of a direct request at zero prompt length, and each prompt token's
        # share. A profile without them prices the router path alone (router_*_s).
        # A profile whose overheads come from the deployed path (deploy/deployed_probe.py,
        # method "deployed") has the front end inside router_*_s already: nothing extra.
        fe = o.get("frontend_direct_s")
        self.frontend_extra_s = (max(0.0, float(fe) - self.router_direct_s)
                                 if fe is not None and o.get("method") != "deployed" else 0.0)
        self.per_prompt_token_s = float(o.get("per_prompt_token_s", 0.0))
        # The deployed probe's residual by uncached prompt tokens (request_path_s).
        self.prompt_residual = [(int(n), float(s)) for n, s in o.get("prompt_residual", [])]
        # How the deployed probe's lone requests scattered about that path, per route
        # (quantiles, median 0): the simulator draws each request's share (path_jitter).
        self.path_jitter = {k: [float(v) for v in q] for k, q in (o.get("path_jitter_s") or {}).items()}
        # The front end's CPU beside the engines (competes for a CPU host's cores).
        self.frontend_cpu_per_request_s = float(o.get("frontend_cpu_per_request_s", 0.0))
        self.frontend_cpu_per_prompt_token_s = float(o.get("frontend_cpu_per_prompt_token_s", 0.0))
        self.frontend_cpu_per_token_s = float(o.get("frontend_cpu_per_token_s", 0.0))
        self.transfer_latency_s, self.transfer_bytes_per_s = fit_transfer(profile["transfer"]["points"])
        c = self.coefficients
        if form == "additive":
            self._c = (c["step_s"], c["prefill_seq_s"], c["decode_seq_s"], c["weights_s"], c["per_token_s"],
                       c[PAGED_ATTENTION], c[DENSE_ATTENTION], c["decode_s_per_context_token"])

    def request_path_s(self, prompt_tokens: int, uncached_tokens: int) -> float:
        """A request's path beyond router_*_s and the engine's steps, by its prompt.

        With the deployed probe's residual table (deploy/deployed_probe.py) it is read off
        the table at the uncached tokens, linear between points, flat below the first and
        per_prompt_token_s per token past the last: what the probe found there is mostly the
        deployed worker's prefill running slower than the profiled steps, so it grows with
        the tokens computed, not with those a prefix cache served. Without it the front
        end's per_prompt_token_s is paid on every prompt token (parsing, hashing, messages)."""
        t = self.prompt_residual
        if not t:
            return self.frontend_extra_s + self.per_prompt_token_s * prompt_tokens
        n = uncached_tokens
        if n <= t[0][0]:
            return t[0][1]
        for (n0, s0), (n1, s1) in zip(t, t[1:]):
            if n <= n1:
                return s0 + (s1 - s0) * (n - n0) / (n1 - n0)
        return t[-1][1] + self.per_prompt_token_s * (n - t[-1][0])

    def path_jitter_s(self, route: str, u: float) -> float:
        """The request path's scatter for a request of `route` ("direct" or
        "disaggregated") at quantile u in [0, 1): the probe's quantiles (path_jitter_s, even
        steps from 0 to 100 %), linear between them; 0 without them."""
        q = self.path_jitter.get(route)
        if not q:
            return 0.0
        x = min(max(u, 0.0), 1.0) * (len(q) - 1)
        i = min(int(x), len(q) - 2)
        return q[i] + (q[i + 1] - q[i]) * (x - i)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_profile(cls, profile: dict) -> "CostModel":
        """Fit to the profile's steps; a derived profile without steps uses its fit's
        coefficients as they are."""
        validate_profile(profile)
        if profile["steps"]:
            dense_prefill, why = dense_prefill_of(profile)
            report = fit_steps(profile["steps"], dense_prefill=dense_prefill, paged_only_because=why)
            return cls(profile, report["coefficients"], report, report["model"])
        fit = profile["fit"]
        co = fit["coefficients"]
        # Profiles written before there were two forms name none: theirs is the additive one.
        form = fit.get("model", "additive")
        if form not in FORMS:
            raise ValueError(f"profile.fit.model: one of {sorted(FORMS)}, got {form!r:.80}")
        missing = [k for k in FORMS[form][0] if k not in co and k != DENSE_ATTENTION]
        if missing:
            raise ValueError(f"profile.fit.coefficients: missing {missing}")
        return cls(profile, co, fit, form)

    @classmethod
    def load(cls, path) -> "CostModel":
        from planner.profile_format import load_profile
        return cls.from_profile(load_profile(path))

    @classmethod
    def synthetic(cls, *, step_s: float = 2e-3, prefill_seq_s: float = 0.0, decode_seq_s: float = 0.0,
                  weights_s: float = 0.0,
                  per_token_s: float = 1e-5, attention_s_per_pair: float = 0.0,
                  dense_attention_s_per_pair: float | None = None, dense_prefill: bool = False,
                  decode_s_per_context_token: float = 0.0, transfer_latency_s: float = 1e-4,
                  transfer_bytes_per_s: float = 1e9, kv_bytes_per_token: int = 4096, block_size: int = 16,
                  max_num_batched_tokens: int = 2048, max_num_seqs: int = 128, num_kv_blocks: int = 4096,
                  router_direct_s: float = 0.0, router_disaggregated_s: float = 0.0,
                  per_token_stream_s: float = 0.0, device: str = "cpu", name: str = "synthetic",
                  form: str = "additive", graph_host_s: float = 0.0, eager_host_s: float = 0.0,
                  mixed_host_s: float = 0.0) -> "CostModel":
        """An analytic model from its coefficients (tests, what-ifs), as a valid derived profile.
        form="overlapped" takes the *_host_s coefficients and ignores prefill_seq_s.
        dense_prefill: the engine's, which decides the steps dense_attention_s_per_pair prices
        (default: attention_s_per_pair, one price for both paths)."""
        if form not in FORMS:
            raise ValueError(f"form: one of {sorted(FORMS)}, got {form!r}")
        if dense_attention_s_per_pair is None:
            dense_attention_s_per_pair = attention_s_per_pair
        given = dict(step_s=step_s, prefill_seq_s=prefill_seq_s, decode_seq_s=decode_seq_s, weights_s=weights_s,
                     per_token_s=per_token_s, attention_s_per_pair=attention_s_per_pair,
                     dense_attention_s_per_pair=dense_attention_s_per_pair,
                     decode_s_per_context_token=decode_s_per_context_token, graph_host_s=graph_host_s,
                     eager_host_s=eager_host_s, mixed_host_s=mixed_host_s)
        coef = {k: given[k] for k in FORMS[form][0]}
        # Two exact points on the transfer line stand for its coefficients.
        small, large = block_size * kv_bytes_per_token, 1024 * block_size * kv_bytes_per_token
        points = [dict(bytes=n, seconds=transfer_latency_s + n / transfer_bytes_per_s) for n in (small, large)]
        profile = dict(
            version=VERSION, created=_now(),
            hardware=dict(device=device, name=name, count=1, cpu_cores=1, memory_gb=1.0),
            versions=dict(pdserve="synthetic", torch="n/a", triton=None, python="n/a"),
            model=dict(name=name, dtype="n/a", num_layers=1, kv_bytes_per_token=kv_bytes_per_token, num_params=1),
            engine=dict(block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
                        max_num_seqs=max_num_seqs, num_kv_blocks=num_kv_blocks, kernel_backend="n/a",
                        async_scheduling=False, dense_prefill=bool(dense_prefill)),
            steps=[],
            transfer=dict(backend="synthetic", points=points, notes="synthetic: latency + bytes / bandwidth"),
            overheads=dict(router_direct_s=router_direct_s, router_disaggregated_s=router_disaggregated_s,
                           per_token_stream_s=per_token_stream_s, notes="synthetic"),
            fit=dict(model=form, form=FORMS[form][1], coefficients=coef))
        return cls.from_profile(profile)

    def scaled(self, weight_bytes_factor: float, flops_factor: float, tp: int = 1, *,
               attention_factor: float | None = None, kv_bytes_factor: float | None = None,
               comm_s_per_step: float = 0.0, comm_s_per_token: float = 0.0,
               transfer_bytes_per_s: float | None = None, transfer_latency_s: float | None = None,
               num_kv_blocks: int | None = None, name: str | None = None) -> "CostModel":
        """This profile rescaled to another model shape on tp GPUs of the same kind.

        Assumptions (a model, not a measurement):
          - the weight-read floor scales with the weight bytes, split evenly over tp GPUs;
          - linear-layer compute per token with the FLOPs (about 2 x parameters), over tp;
          - prefill attention per (query, key) pair, both paths, with attention_factor
            (layers x heads x head_dim; default flops_factor), over tp (heads are split);
          - decode KV reads per context token with kv_bytes_factor (default 1), over tp;
          - host costs per step and per sequence do not change; tensor parallelism adds
            comm_s_per_step (all-reduce latencies: about 2 per layer) and comm_s_per_token
            (all-reduce bytes per token / link bandwidth), both supplied by the caller;
          - KV transfer: kv_bytes_per_token scales with kv_bytes_factor; each of the tp
            shards moves its share over its own link at the measured bandwidth, so the
            bandwidth is tp x the measured one unless transfer_bytes_per_s is given.
        """
        if not (isinstance(tp, int) and tp >= 1):
            raise ValueError(f"tp must be a positive integer, got {tp!r}")
        for k, v in dict(weight_bytes_factor=weight_bytes_factor, flops_factor=flops_factor).items():
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{k} must be a positive number, got {v!r}")
        af = flops_factor if attention_factor is None else attention_factor
        kf = 1.0 if kv_bytes_factor is None else kv_bytes_factor
        coef = dict(self.coefficients)   # host constants (per step, per sequence) stay as measured
        coef.update(step_s=coef["step_s"] + comm_s_per_step,
                    weights_s=coef["weights_s"] * weight_bytes_factor / tp,
                    per_token_s=coef["per_token_s"] * flops_factor / tp + comm_s_per_token,
                    attention_s_per_pair=coef[PAGED_ATTENTION] * af / tp,
                    dense_attention_s_per_pair=coef[DENSE_ATTENTION] * af / tp,
                    decode_s_per_context_token=coef["decode_s_per_context_token"] * kf / tp)
        p = copy.deepcopy(self.profile)
        kv_bytes = max(1, round(self.kv_bytes_per_token * kf))
        bw = transfer_bytes_per_s if transfer_bytes_per_s is not None else self.transfer_bytes_per_s * tp
        lat = transfer_latency_s if transfer_latency_s is not None else self.transfer_latency_s
        small, large = self.block_size * kv_bytes, 1024 * self.block_size * kv_bytes
        p["transfer"] = dict(backend=p["transfer"]["backend"], notes=f"scaled from the measured fit (tp={tp})",
                             points=[dict(bytes=n, seconds=max(lat + n / bw, 1e-9)) for n in (small, large)])
        p["model"] = dict(p["model"], kv_bytes_per_token=kv_bytes,
                          num_params=max(1, round(p["model"]["num_params"] * flops_factor)),
                          name=name or f"{p['model']['name']} x{flops_factor:g}")
        p["hardware"] = dict(p["hardware"], count=p["hardware"]["count"] * tp)
        if num_kv_blocks is not None:
            p["engine"] = dict(p["engine"], num_kv_blocks=int(num_kv_blocks))
        p["steps"] = []
        p["fit"] = dict(model=self.form, form=FORMS[self.form][1], coefficients=coef,
                        scaled=dict(weight_bytes_factor=weight_bytes_factor, flops_factor=flops_factor, tp=tp,
                                    gpus_per_engine=self.gpus_per_engine * tp,
                                    attention_factor=af, kv_bytes_factor=kf, comm_s_per_step=comm_s_per_step,
                                    comm_s_per_token=comm_s_per_token, source_created=self.profile["created"]))
        return CostModel.from_profile(p)

    def scale_to(self, target: dict, tp: int = 1, **kw) -> "CostModel":
        """:meth:`scaled` with the factors taken from two model descriptions (this profile's
        `model` and `target`, the same fields: num_params, dtype, kv_bytes_per_token, and for
        the attention factor num_layers, num_heads, head_dim)."""
        src = self.profile["model"]
        for k in ("num_params", "kv_bytes_per_token"):
            if not isinstance(target.get(k), int) or target[k] < 1:
                raise ValueError(f"target.{k}: must be a positive integer, got {target.get(k)!r}")
        sb = _DTYPE_BYTES.get(str(src.get("dtype")), 2)
        tb = _DTYPE_BYTES.get(str(target.get("dtype", src.get("dtype"))), sb)
        flops = target["num_params"] / src["num_params"]
        attn = None
        if all(isinstance(d.get(k), int) for d in (src, target) for k in ("num_layers", "num_heads", "head_dim")):
            attn = (target["num_layers"] * target["num_heads"] * target["head_dim"]) / \
                   (src["num_layers"] * src["num_heads"] * src["head_dim"])
        kw.setdefault("attention_factor", attn)
        kw.setdefault("kv_bytes_factor", target["kv_bytes_per_token"] / src["kv_bytes_per_token"])
        kw.setdefault("name", target.get("name"))
        return self.scaled(flops * tb / sb, flops, tp, **kw)

    # ---- the interface the simulator uses -------------------------------------------------------
    def step_time(self, prefill_chunks: list[tuple[int, int]], decode_contexts: list[int]) -> float:
        """Seconds for one engine step: prefill chunks (new_tokens, cached_tokens_before_chunk)
        and one decode token for each sequence of the given current context length."""
        if self.form != "additive":
            serial, host, device = self.step_parts(prefill_chunks, decode_contexts)
            return serial + max(host, device)
        step_s, prefill_seq_s, decode_seq_s, weights_s, per_token_s, paged_attn, dense_attn, kv = self._c
        prefill_tokens, paged_pairs, dense_pairs = prefill_sums(prefill_chunks, self.dense_prefill,
                                                                 several_prompts=self.dense_several_prompts)
        n_tokens = prefill_tokens + len(decode_contexts)
        if n_tokens == 0:
            return 0.0
        return (step_s + prefill_seq_s * len(prefill_chunks) + decode_seq_s * len(decode_contexts)
                + max(weights_s, per_token_s * n_tokens) + paged_attn * paged_pairs + dense_attn * dense_pairs
                + kv * sum(decode_contexts))

    def step_parts(self, prefill_chunks: list[tuple[int, int]],
                   decode_contexts: list[int]) -> tuple[float, float, float]:
        """(serial, host, device) seconds of one step, which takes serial + max(host, device)
        alone on its device. host is work that overlaps the device's and is not slowed by
        another engine on the same device (a GPU engine's own CPU core); device is the part
        engines sharing a device slow each other down in (planner/shared_device.py). The
        additive form, and any engine on a CPU, count the whole step as device work."""
        if self.form == "additive" or self.host_is_device:
            return 0.0, 0.0, self._whole_step(prefill_chunks, decode_contexts)
        return self._overlapped_parts(prefill_chunks, decode_contexts)

    def _overlapped_parts(self, prefill_chunks, decode_contexts) -> tuple[float, float, float]:
        tokens, paged_pairs, dense_pairs = prefill_sums(prefill_chunks, self.dense_prefill,
                                                         several_prompts=self.dense_several_prompts)
        if tokens == 0 and not decode_contexts:
            return 0.0, 0.0, 0.0
        return overlapped_fit.parts(self.coefficients, tokens, paged_pairs, dense_pairs, len(prefill_chunks),
                                    len(decode_contexts), sum(decode_contexts))

    def _whole_step(self, prefill_chunks, decode_contexts) -> float:
        if self.form == "additive":
            return self.step_time(prefill_chunks, decode_contexts)
        serial, host, device = self._overlapped_parts(prefill_chunks, decode_contexts)
        return serial + max(host, device)

    def transfer_time(self, num_tokens: int) -> float:
        """Seconds for the KV of num_tokens (rounded up to whole blocks) to land."""
        if num_tokens <= 0:
            return 0.0
        blocks = -(-num_tokens // self.block_size)
        nbytes = blocks * self.block_size * self.kv_bytes_per_token
        return self.transfer_latency_s + nbytes / self.transfer_bytes_per_s

    def prefill_time(self, num_tokens: int, cached_tokens: int = 0) -> float:
        """An idle engine's time to prefill one prompt: chunks of max_num_batched_tokens."""
        # At least one token is always computed (its logits give the first token).
        t, done = 0.0, max(0, min(cached_tokens, num_tokens - 1))
        while done < num_tokens:
            n = min(self.max_num_batched_tokens, num_tokens - done)
            t += self.step_time([(n, done)], [])
            done += n
        return t

    def __repr__(self) -> str:
        c = ", ".join(f"{k}={v:.3g}" for k, v in self.coefficients.items())
        return f"CostModel({self.profile['model']['name']} on {self.profile['hardware']['name']}: {c})"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
