"""The engine's cost model: seconds per engine step and per KV transfer, fitted to a profile.

The form of a step's time (all coefficients non-negative):

    t = step_s + prefill_seq_s * S + decode_seq_s * D    host: scheduling, launches, sampling
        + max(weights_s, per_token_s * (P + D))            linear layers: weight-read floor or compute
        + attention_s_per_pair * A                        prefill attention (compute bound)
        + decode_s_per_context_token * K                  decode attention (KV reads)

with P prefill tokens in S chunks, A their causal attention pairs
(profile_format.attention_pairs), D decoded sequences and K the tokens they attend to.
Why this form: on a GPU the linear layers read every weight once per step whatever the
batch, so a small step (a decode batch, a short chunk) costs about the weight read and is
near-constant in its tokens; past the ridge point (tokens where compute time equals that
read) they are compute bound and linear in tokens. A pure decode step replays a CUDA graph
while a step with a prefill chunk launches its kernels one by one (prefill_seq_s). Prefill
attention adds a term quadratic in a chunk's length (A); decode attention reads each
sequence's KV (K). On a CPU the floor
fits to about zero and the model is close to linear in tokens. The fit minimises relative
residuals (steps span milliseconds to seconds): non-negative least squares for each
candidate ridge point, keeping the best (:func:`fit_steps`).

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

from planner.profile_format import VERSION, attention_pairs, validate_profile

COEFFICIENTS = ("step_s", "prefill_seq_s", "decode_seq_s", "weights_s", "per_token_s", "attention_s_per_pair",
                "decode_s_per_context_token")
FORM = ("step_s + prefill_seq_s*S + decode_seq_s*D + max(weights_s, per_token_s*(P+D)) + attention_s_per_pair*A "
        "+ decode_s_per_context_token*K")
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


def _features(steps: list[dict]) -> dict[str, np.ndarray]:
    col = lambda k: np.array([float(s[k]) for s in steps])   # noqa: E731
    return dict(prefill_seqs=col("num_prefill_seqs"), decode_seqs=col("decode_seqs"),
                tokens=col("prefill_tokens") + col("decode_seqs"), pairs=col("prefill_context"),
                context=col("decode_context"), y=col("seconds"))


def _fit_arrays(f: dict[str, np.ndarray]) -> dict[str, float]:
    y = f["y"]
    w = 1.0 / y   # relative residuals
    tokens = f["tokens"]

    def solve(ridge: float) -> tuple[float, np.ndarray]:
        a = np.column_stack([np.ones_like(y), f["prefill_seqs"], f["decode_seqs"], np.maximum(tokens, ridge),
                             f["pairs"], f["context"]])
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
    return dict(step_s=float(x[0]), prefill_seq_s=float(x[1]), decode_seq_s=float(x[2]),
                weights_s=float(x[3] * best_ridge), per_token_s=float(x[3]), attention_s_per_pair=float(x[4]),
                decode_s_per_context_token=float(x[5]))


def _relative_errors(coef: dict[str, float], steps: list[dict]) -> np.ndarray:
    return np.array([predict_entry(coef, s) / s["seconds"] - 1.0 for s in steps])


def _summary(rel: np.ndarray) -> dict:
    if rel.size == 0:
        return dict(n=0)
    a = np.abs(rel)
    return dict(n=int(a.size), median=float(np.median(a)), p90=float(np.quantile(a, 0.9)), max=float(a.max()),
                mean_signed=float(rel.mean()))


def fit_steps(steps: list[dict], folds: int = 5) -> dict:
    """Fit the coefficients to measured steps; report relative errors in-sample, per kind,
    and on held-out points (k-fold: each fold predicted by a fit to the others)."""
    if not steps:
        raise ValueError("fit_steps: no steps")
    coef = _fit_arrays(_features(steps))
    rel = _relative_errors(coef, steps)
    report = dict(form=FORM, coefficients=coef, relative_error=_summary(rel),
                  relative_error_by_kind={k: _summary(rel[[s.get("kind") == k for s in steps]])
                                          for k in sorted({s.get("kind") for s in steps if s.get("kind")})})
    if len(steps) >= 2 * folds:
        held = np.empty(len(steps))
        idx = np.arange(len(steps))
        for k in range(folds):
            test = idx % folds == k
            train = [s for s, t in zip(steps, test) if not t]
            c = _fit_arrays(_features(train))
            held[test] = _relative_errors(c, [s for s, t in zip(steps, test) if t])
        report["holdout_relative_error"] = _summary(held)
    return report


def fit_transfer(points: list[dict]) -> tuple[float, float]:
    """(latency_s, bytes_per_s) from measured (bytes, seconds) points, relative residuals."""
    b = np.array([float(p["bytes"]) for p in points])
    y = np.array([float(p["seconds"]) for p in points])
    if len(points) == 1 or np.all(b == b[0]):
        return 0.0, float(np.median(b / y))
    w = 1.0 / y
    lat, inv_bw = nnls(np.column_stack([np.ones_like(b), b]) * w[:, None], np.ones_like(y))
    if inv_bw <= 0:   # flat in bytes: no bandwidth term measurable; keep a line through the points
        return float(lat), math.inf
    return float(lat), float(1.0 / inv_bw)


def predict_entry(coef: dict[str, float], s: dict) -> float:
    """A step's time from its profile entry (the sums of profile_format.step_entry)."""
    d = s["decode_seqs"]
    return (coef["step_s"] + coef["prefill_seq_s"] * s["num_prefill_seqs"] + coef["decode_seq_s"] * d
            + max(coef["weights_s"], coef["per_token_s"] * (s["prefill_tokens"] + d))
            + coef["attention_s_per_pair"] * s["prefill_context"]
            + coef["decode_s_per_context_token"] * s["decode_context"])


# ---- the model ------------------------------------------------------------------------------------------
class CostModel:
    """Seconds per engine step and per KV transfer for one engine configuration.

    step_time(prefill_chunks, decode_contexts): one engine step that prefills each chunk
        (new_tokens, cached_tokens_before_chunk) and decodes one token for each sequence of
        the given current context length (tokens it attends to, the new one included).
    transfer_time(num_tokens): the KV of num_tokens (whole blocks) landing in the decode
        worker, from latency + bytes / bandwidth.
    """

    def __init__(self, profile: dict, coefficients: dict[str, float], fit_report: dict | None = None):
        self.profile = profile
        self.coefficients = {k: float(coefficients[k]) for k in COEFFICIENTS}
        self.fit_report = fit_report or {}
        e, m, o = profile["engine"], profile["model"], profile["overheads"]
        self.block_size = int(e["block_size"])
        self.max_num_batched_tokens = int(e["max_num_batched_tokens"])
        self.max_num_seqs = int(e["max_num_seqs"])
        self.num_kv_blocks = int(e["num_kv_blocks"])
        self.kv_bytes_per_token = int(m["kv_bytes_per_token"])
        self.router_direct_s = float(o["router_direct_s"])
        self.router_disaggregated_s = float(o["router_disaggregated_s"])
        self.per_token_stream_s = float(o["per_token_stream_s"])
        self.transfer_latency_s, self.transfer_bytes_per_s = fit_transfer(profile["transfer"]["points"])
        c = self.coefficients
        self._c = (c["step_s"], c["prefill_seq_s"], c["decode_seq_s"], c["weights_s"], c["per_token_s"],
                   c["attention_s_per_pair"], c["decode_s_per_context_token"])

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_profile(cls, profile: dict) -> "CostModel":
        """Fit to the profile's steps; a derived profile without steps uses its fit's
        coefficients as they are."""
        validate_profile(profile)
        if profile["steps"]:
            report = fit_steps(profile["steps"])
            return cls(profile, report["coefficients"], report)
        co = profile["fit"]["coefficients"]
        missing = [k for k in COEFFICIENTS if k not in co]
        if missing:
            raise ValueError(f"profile.fit.coefficients: missing {missing}")
        return cls(profile, co, profile["fit"])

    @classmethod
    def load(cls, path) -> "CostModel":
        from planner.profile_format import load_profile
        return cls.from_profile(load_profile(path))

    @classmethod
    def synthetic(cls, *, step_s: float = 2e-3, prefill_seq_s: float = 0.0, decode_seq_s: float = 0.0,
                  weights_s: float = 0.0,
                  per_token_s: float = 1e-5, attention_s_per_pair: float = 0.0,
                  decode_s_per_context_token: float = 0.0, transfer_latency_s: float = 1e-4,
                  transfer_bytes_per_s: float = 1e9, kv_bytes_per_token: int = 4096, block_size: int = 16,
                  max_num_batched_tokens: int = 2048, max_num_seqs: int = 128, num_kv_blocks: int = 4096,
                  router_direct_s: float = 0.0, router_disaggregated_s: float = 0.0,
                  per_token_stream_s: float = 0.0, device: str = "cpu", name: str = "synthetic") -> "CostModel":
        """An analytic model from its coefficients (tests, what-ifs), as a valid derived profile."""
        coef = dict(step_s=step_s, prefill_seq_s=prefill_seq_s, decode_seq_s=decode_seq_s, weights_s=weights_s,
                    per_token_s=per_token_s,
                    attention_s_per_pair=attention_s_per_pair, decode_s_per_context_token=decode_s_per_context_token)
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
                        async_scheduling=False),
            steps=[],
            transfer=dict(backend="synthetic", points=points, notes="synthetic: latency + bytes / bandwidth"),
            overheads=dict(router_direct_s=router_direct_s, router_disaggregated_s=router_disaggregated_s,
                           per_token_stream_s=per_token_stream_s, notes="synthetic"),
            fit=dict(form=FORM, coefficients=coef))
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
          - prefill attention per (query, key) pair with attention_factor (layers x heads x
            head_dim; default flops_factor), over tp (heads are split);
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
        c = self.coefficients
        coef = dict(step_s=c["step_s"] + comm_s_per_step, prefill_seq_s=c["prefill_seq_s"],
                    decode_seq_s=c["decode_seq_s"],
                    weights_s=c["weights_s"] * weight_bytes_factor / tp,
                    per_token_s=c["per_token_s"] * flops_factor / tp + comm_s_per_token,
                    attention_s_per_pair=c["attention_s_per_pair"] * af / tp,
                    decode_s_per_context_token=c["decode_s_per_context_token"] * kf / tp)
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
        p["fit"] = dict(form=FORM, coefficients=coef,
                        scaled=dict(weight_bytes_factor=weight_bytes_factor, flops_factor=flops_factor, tp=tp,
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
        step_s, prefill_seq_s, decode_seq_s, weights_s, per_token_s, attn, kv = self._c
        n_tokens = len(decode_contexts)
        pairs = 0
        for new, cached in prefill_chunks:
            n_tokens += new
            pairs += attention_pairs(new, cached)
        if n_tokens == 0:
            return 0.0
        return (step_s + prefill_seq_s * len(prefill_chunks) + decode_seq_s * len(decode_contexts)
                + max(weights_s, per_token_s * n_tokens) + attn * pairs + kv * sum(decode_contexts))

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
