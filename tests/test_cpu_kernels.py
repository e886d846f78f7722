"""The CPU backend (engine/kernels/cpu_ops.py) against the torch reference it replaces."""
from __future__ import annotations

import pytest
import torch

from engine.kernels import cpu_ops, default_backend, get_ops
from engine.kernels import reference as ref

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="numba is not installed")


def _paged_case(S, H, KH, D, block_size, ctx_lens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in ctx_lens)
    num_blocks = S * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, KH, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, KH, D, generator=g).to(dtype)
    # Blocks scattered over the pool in a random order, as after allocation churn; the
    # unused tail of each row is padding (block 0) that the kernel must never read.
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(S, max_blocks, dtype=torch.int32)
    used = 0
    for s, n in enumerate(ctx_lens):
        nb = -(-n // block_size)
        tables[s, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    q = torch.randn(S, H, D, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(ctx_lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("H,KH,D,block_size,ctx_lens", [
    (4, 4, 16, 4, [1]),                       # MHA, a single token of context
    (8, 2, 32, 16, [1, 17, 16, 33, 5]),       # GQA 4:1, block boundaries either side
    (9, 3, 64, 16, [228]),                     # SmolLM2's head layout, one long sequence
    (6, 1, 8, 8, [40, 3, 64, 9, 1, 57, 8, 30, 12]),  # MQA, more sequences than threads
])
def test_paged_decode_attention_matches_reference(H, KH, D, block_size, ctx_lens, dtype):
    q, kc, vc, bt, lens = _paged_case(len(ctx_lens), H, KH, D, block_size, ctx_lens, dtype)
    want = ref.paged_decode_attention(q, kc, vc, bt, lens, D ** -0.5)
    got = cpu_ops.paged_decode_attention(q, kc, vc, bt, lens, D ** -0.5)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_padding_blocks_are_never_read():
    q, kc, vc, bt, lens = _paged_case(3, 4, 2, 16, 4, [5, 2, 9], torch.float32)
    want = cpu_ops.paged_decode_attention(q, kc, vc, bt, lens, 0.25)
    # Poison every slot past each sequence's context, and block 0 (the table padding).
    used = torch.zeros(kc.shape[0], kc.shape[1], dtype=torch.bool)
    for s, n in enumerate(lens.tolist()):
        for t in range(n):
            used[bt[s, t // 4], t % 4] = True
    kc[~used] = float("nan")
    vc[~used] = float("nan")
    got = cpu_ops.paged_decode_attention(q, kc, vc, bt, lens, 0.25)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("threads", [2, 3, 8])
@pytest.mark.parametrize("ctx_lens", [
    [40, 3, 64, 9, 1, 57, 8, 30, 12],         # uneven lengths
    [300, 1, 1],                              # one sequence holds almost all the work
    [7, 7],                                   # fewer sequences than threads
])
def test_attention_split_over_threads_equals_one_thread(monkeypatch, threads, ctx_lens):
    """The batch split over Python threads (ranges of sequences) gives exactly the
    single-thread result: every row is written once, by one thread, the same way."""
    q, kc, vc, bt, lens = _paged_case(len(ctx_lens), 6, 2, 16, 8, ctx_lens, torch.float32)
    monkeypatch.setattr(cpu_ops, "_SPLIT_MIN_WORK", 1 << 62)
    one = cpu_ops.paged_decode_attention(q, kc, vc, bt, lens, 0.25)
    monkeypatch.setattr(cpu_ops, "_SPLIT_MIN_WORK", 1)
    monkeypatch.setattr(cpu_ops, "_kernel_threads", lambda: threads)
    parts = cpu_ops._split_sequences(lens.numpy(), 2 * 16)
    assert len(parts) == min(threads, len(ctx_lens))
    assert parts[0][0] == 0 and parts[-1][1] == len(ctx_lens)
    assert all(a < b for a, b in parts) and all(p[1] == n[0] for p, n in zip(parts, parts[1:]))
    got = cpu_ops.paged_decode_attention(q, kc, vc, bt, lens, 0.25)
    torch.testing.assert_close(got, one, atol=0, rtol=0)
    torch.testing.assert_close(got, ref.paged_decode_attention(q, kc, vc, bt, lens, 0.25), atol=2e-6, rtol=2e-6)


def test_split_balances_context_tokens_not_sequences(monkeypatch):
    monkeypatch.setattr(cpu_ops, "_kernel_threads", lambda: 2)
    monkeypatch.setattr(cpu_ops, "_SPLIT_MIN_WORK", 1)
    lens = torch.tensor([500, 10, 10, 10, 10, 10, 10, 500], dtype=torch.int32).numpy()
    (a, b), (c, d) = cpu_ops._split_sequences(lens, 1)
    assert (a, b, c, d) == (0, 4, 4, 8)     # 530 tokens each side
    monkeypatch.setattr(cpu_ops, "_SPLIT_MIN_WORK", 10 ** 9)
    assert cpu_ops._split_sequences(lens, 1) == [(0, 8)]      # too little work to hand off


def test_views_of_the_engine_cache_layout():
    # The engine passes kv_cache[layer, 0] / [layer, 1]: views into one [L, 2, NB, BS, KH, D] tensor.
    q, kc, vc, bt, lens = _paged_case(4, 8, 2, 16, 8, [3, 8, 20, 11], torch.float32)
    big = torch.zeros(3, 2, *kc.shape)
    big[1, 0], big[1, 1] = kc, vc
    want = ref.paged_decode_attention(q, kc, vc, bt, lens, 0.25)
    got = cpu_ops.paged_decode_attention(q, big[1, 0], big[1, 1], bt, lens, 0.25)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


def test_uncompiled_dtype_falls_back_to_reference():
    q, kc, vc, bt, lens = _paged_case(2, 4, 2, 16, 4, [6, 3], torch.bfloat16)
    want = ref.paged_decode_attention(q, kc, vc, bt, lens, 0.25)
    got = cpu_ops.paged_decode_attention(q, kc, vc, bt, lens, 0.25)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_empty_context_is_rejected():
    q, kc, vc, bt, lens = _paged_case(2, 4, 2, 16, 4, [6, 3], torch.float32)
    lens[1] = 0
    with pytest.raises(ValueError, match="context lengths"):
        cpu_ops.paged_decode_attention(q, kc, vc, bt, lens, 0.25)


def test_cpu_is_the_default_backend_on_cpu_and_exposes_every_op():
    assert default_backend(torch.device("cpu")) == "cpu"
    ops = get_ops("cpu")
    assert ops.paged_decode_attention is cpu_ops.paged_decode_attention
    assert ops.rms_norm is cpu_ops.rms_norm and ops.silu_and_mul is ref.silu_and_mul


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1, 7, 300])
def test_rms_norms_match_reference(T, dtype):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, 96, generator=g).to(dtype) * 3
    res = torch.randn(T, 96, generator=g).to(dtype)
    w = torch.rand(96, generator=g).to(dtype) + 0.5
    x_in, res_in = x.clone(), res.clone()
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), **tol)
    got, got_res = cpu_ops.add_rms_norm(x, res, w, 1e-6)
    want, want_res = ref.add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(got_res, want_res, atol=0, rtol=0)   # the residual sum is exact
    torch.testing.assert_close(got, want, **tol)
    assert x.equal(x_in) and res.equal(res_in) and got.shape == x.shape   # inputs untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [6, 40])
def test_rotary_matches_reference(T, dtype):
    from engine.model.rope import build_cos_sin_cache
    g = torch.Generator().manual_seed(1)
    cache = build_cos_sin_cache(64, 512, 10000.0, None)
    pos = torch.tensor([0, 5, 511, 17, 17, 300] * 7)[:T]
    q = torch.randn(T, 9, 64, generator=g).to(dtype)
    k = torch.randn(T, 3, 64, generator=g).to(dtype)
    q_in, k_in = q.clone(), k.clone()
    got_q, got_k = cpu_ops.rotary_embedding(q, k, pos, cache)
    want_q, want_k = ref.rotary_embedding(q, k, pos, cache)
    torch.testing.assert_close(got_q, want_q, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(got_k, want_k, atol=2e-6, rtol=2e-6)
    assert q.equal(q_in) and k.equal(k_in)


def test_rotary_on_strided_views_of_a_fused_projection():
    # The model splits q/k out of one fused qkv matmul: non-contiguous views.
    from engine.model.rope import build_cos_sin_cache
    cache = build_cos_sin_cache(16, 64, 10000.0, None)
    qkv = torch.randn(5, (4 + 2 + 2) * 16)
    q, k, _ = qkv.split([64, 32, 32], dim=-1)
    q, k = q.view(5, 4, 16), k.view(5, 2, 16)
    pos = torch.arange(5) * 3
    for a, b in zip(cpu_ops.rotary_embedding(q, k, pos, cache), ref.rotary_embedding(q, k, pos, cache)):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_write_kv_matches_reference_and_skips_padding(dtype):
    g = torch.Generator().manual_seed(3)
    k = torch.randn(5, 2, 8, generator=g).to(dtype)
    v = torch.randn(5, 2, 8, generator=g).to(dtype)
    slots = torch.tensor([7, -1, 0, 13, -1])
    caches = [torch.zeros(4, 4, 2, 8, dtype=dtype) for _ in range(4)]
    ref.write_kv(k, v, caches[0], caches[1], slots)
    cpu_ops.write_kv(k, v, caches[2], caches[3], slots)
    assert caches[2].equal(caches[0]) and caches[3].equal(caches[1])
    assert int((caches[2] != 0).any(-1).any(-1).sum()) == 3       # three slots written, padding skipped
    with pytest.raises(IndexError):
        cpu_ops.write_kv(k, v, caches[2], caches[3], torch.tensor([0, 1, 2, 3, 16]))


def test_out_of_range_lengths_and_positions_are_refused():
    # numba does not bounds-check, so the wrappers must: a length past the block table or a
    # position past the rotary table would read foreign memory instead of raising.
    q, kc, vc, bt, lens = _paged_case(2, 4, 2, 16, 4, [6, 3], torch.float32)
    lens[0] = bt.shape[1] * 4 + 1
    with pytest.raises(ValueError, match="context lengths"):
        cpu_ops.paged_decode_attention(q, kc, vc, bt, lens, 0.25)
    from engine.model.rope import build_cos_sin_cache
    cache = build_cos_sin_cache(16, 8, 10000.0, None)
    qr, kr = torch.randn(2, 2, 16), torch.randn(2, 1, 16)
    with pytest.raises(ValueError, match="positions"):
        cpu_ops.rotary_embedding(qr, kr, torch.tensor([3, 8]), cache)


@pytest.mark.parametrize("package", ["decode_worker", "prefill_worker", "engine"])
def test_engine_openmp_default_is_set_before_torch_loads(package):
    """GOMP_SPINCOUNT only counts if it is in the environment when torch loads libgomp:
    every worker process must import engine before torch (a fresh interpreter checks)."""
    import os
    import subprocess
    import sys
    code = (
        "import os, sys\n"
        "seen = []\n"
        "class Hook:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' and not seen:\n"
        "            seen.append(os.environ.get('GOMP_SPINCOUNT'))\n"
        "sys.meta_path.insert(0, Hook())\n"
        f"import {package}\n"
        "print(seen[0])\n")
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "3000"


# ---- linear ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(1,), (3,), (8,), (2, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_f_linear(dtype, lead, with_bias):
    g = torch.Generator().manual_seed(len(lead) * 10 + lead[-1])
    x = torch.randn(*lead, 40, generator=g).to(dtype)
    w = torch.randn(33, 40, generator=g).to(dtype)
    b = torch.randn(33, generator=g).to(dtype) if with_bias else None
    got = cpu_ops.linear(x, w, b)
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == dtype and got.shape == (*lead, 33)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_linear_split_over_threads_equals_one_thread(monkeypatch, threads):
    g = torch.Generator().manual_seed(threads)
    x, w, b = torch.randn(4, 64, generator=g), torch.randn(37, 64, generator=g), torch.randn(37, generator=g)
    monkeypatch.setattr(cpu_ops, "_LINEAR_SPLIT_MIN_MACS", 1 << 62)
    one = cpu_ops.linear(x, w, b)
    monkeypatch.setattr(cpu_ops, "_LINEAR_SPLIT_MIN_MACS", 1)
    monkeypatch.setattr(cpu_ops, "_kernel_threads", lambda: threads)
    calls = []
    real = cpu_ops._run_ranges
    monkeypatch.setattr(cpu_ops, "_run_ranges", lambda k, a, r: (calls.append(r), real(k, a, r)))
    got = cpu_ops.linear(x, w, b)
    assert len(calls) == 1 and len(calls[0]) == threads          # it really was split
    assert calls[0][0][0] == 0 and calls[0][-1][1] == 37
    torch.testing.assert_close(got, one, atol=0, rtol=0)          # each output column once, same arithmetic


def test_linear_falls_back_and_keeps_f_linear_errors(monkeypatch):
    x, w = torch.randn(20, 16), torch.randn(8, 16)
    used = _spy_kernels(monkeypatch)
    wg = torch.randn(8, 16, requires_grad=True)     # gradients: torch's path, which carries them
    assert cpu_ops.linear(x[:1], wg).requires_grad and used == []
    with torch.no_grad():
        assert not cpu_ops.linear(x[:1], wg).requires_grad and used == [cpu_ops._linear_kernel]
    used.clear()
    # More rows than a decode-sized batch: torch's GEMM (bit-identical to F.linear).
    torch.testing.assert_close(cpu_ops.linear(x, w), torch.nn.functional.linear(x, w), atol=0, rtol=0)
    wt = torch.randn(16, 8).t()        # a non-contiguous weight: F.linear too
    torch.testing.assert_close(cpu_ops.linear(x[:2], wt), torch.nn.functional.linear(x[:2], wt), atol=0, rtol=0)
    assert cpu_ops.linear(torch.randn(0, 16), w).shape == (0, 8)
    with pytest.raises(RuntimeError):
        cpu_ops.linear(torch.randn(1, 15), w)       # wrong inner size: F.linear's own error
    xb = torch.randn(2, 16, dtype=torch.bfloat16)   # not compiled: F.linear
    assert cpu_ops.linear(xb, w.bfloat16()).dtype == torch.bfloat16
    assert used == []


def test_model_linears_go_through_the_backend_op():
    """Every projection of the model (qkv, o, gate_up, down, the tied logits) calls ops.linear,
    so the CPU backend's loop is what runs at decode."""
    import types

    from engine.config import ModelConfig
    from engine.model.llama import LlamaForCausalLM
    seen = []
    ops = get_ops("torch")
    spy = types.SimpleNamespace(**{**vars(ops), "linear": lambda x, w, b=None: (seen.append(tuple(w.shape)),
                                                                               ref.linear(x, w, b))[1]})
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg, spy)
    model.compute_logits(torch.randn(1, 16))
    model.layers[0].self_attn.qkv_proj(torch.randn(1, 16))
    model.layers[0].self_attn.o_proj(torch.randn(1, 16))
    model.layers[0].mlp(torch.randn(1, 16))
    assert seen == [(64, 16), (32, 16), (16, 16), (48, 16), (16, 24)]


def _spy_kernels(monkeypatch) -> list:
    """Records the kernel of every call that took a loop (not the torch fallback)."""
    used = []
    real = cpu_ops._run_linear
    monkeypatch.setattr(cpu_ops, "_run_linear", lambda kernel, *a: (used.append(kernel), real(kernel, *a))[1])
    return used


@pytest.mark.parametrize("rows", [1, 3, 8, 40])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_linear_matches_the_quant_reference(monkeypatch, rows, with_bias):
    from engine.quant import reference as qref
    g = torch.Generator().manual_seed(rows)
    q, scale = qref.quantize_int8(torch.randn(45, 64, generator=g))
    x = torch.randn(rows, 64, generator=g)
    b = torch.randn(45, generator=g) if with_bias else None
    used = _spy_kernels(monkeypatch)
    got = cpu_ops.quant_linear(x, q, scale, b)
    assert used == [cpu_ops._int8_linear_kernel]          # the loop ran, not the fallback
    want = qref.quant_linear(x.double(), q, scale, None if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == (rows, 45)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_int8_linear_split_equals_one_thread_and_falls_back(monkeypatch):
    from engine.quant import reference as qref
    g = torch.Generator().manual_seed(5)
    q, scale = qref.quantize_int8(torch.randn(37, 64, generator=g))
    x = torch.randn(4, 64, generator=g)
    one = cpu_ops.quant_linear(x, q, scale)
    monkeypatch.setattr(cpu_ops, "_LINEAR_SPLIT_MIN_MACS", 1)
    monkeypatch.setattr(cpu_ops, "_kernel_threads", lambda: 3)
    torch.testing.assert_close(cpu_ops.quant_linear(x, q, scale), one, atol=0, rtol=0)
    # fp8 weights (numba has no e4m3), long prefill chunks and fp64 activations: the
    # reference, bit for bit.
    used = _spy_kernels(monkeypatch)
    q8, s8 = qref.quantize_fp8(torch.randn(37, 64, generator=g))
    torch.testing.assert_close(cpu_ops.quant_linear(x, q8, s8), qref.quant_linear(x, q8, s8), atol=0, rtol=0)
    xl = torch.randn(cpu_ops._INT8_LINEAR_MAX_ROWS + 1, 64, generator=g)
    torch.testing.assert_close(cpu_ops.quant_linear(xl, q, scale), qref.quant_linear(xl, q, scale), atol=0, rtol=0)
    xd = x.double()
    torch.testing.assert_close(cpu_ops.quant_linear(xd, q, scale), qref.quant_linear(xd, q, scale), atol=0, rtol=0)
    assert used == []


def test_cpu_backend_quantized_model_uses_the_int8_loop(monkeypatch):
    from engine.config import EngineConfig, ModelConfig
    from engine.model.llama import LlamaForCausalLM
    from engine.quant import QuantLinear, prepare_model
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8)
    model = LlamaForCausalLM(cfg, get_ops("cpu"))
    prepare_model(model, EngineConfig(quantization="int8"), "cpu", torch.float32)
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 5 and all(m.cpu_loop for m in quant)       # 4 projections + the logits
    used = _spy_kernels(monkeypatch)
    with torch.inference_mode():     # as the engine runs it (the loops never carry gradients)
        model.compute_logits(torch.randn(1, 16))
        model.layers[0].mlp(torch.randn(2, 16))
    assert used == [cpu_ops._int8_linear_kernel] * 3
