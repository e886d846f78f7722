"""Triton kernels (engine/kernels/triton_ops.py) against the torch reference.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
which must be set before the kernels are defined), so shapes here are kept small. The
`gpu`-marked class adds production-sized shapes and is skipped when CUDA is absent.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from engine.kernels import reference as ref  # noqa: E402
from engine.kernels import triton_ops as tri  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if DEVICE.type == "cpu":
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tri._rms_norm_kernel, InterpretedFunction):
        raise RuntimeError("engine.kernels.triton_ops was imported before TRITON_INTERPRET=1 "
                           "was set; run this module first or export TRITON_INTERPRET=1")
DTYPES = [torch.float32, torch.bfloat16]
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(device=DEVICE, dtype=dtype)


def _close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


def _paged_kv(ctx_lens, kv_heads, head_dim, block_size, dtype, seed=0, spare_blocks=3):
    """Random K/V caches plus block tables that hand out physical blocks in shuffled order.

    Spare blocks (never referenced) and the table padding (block 0) hold random data too,
    so a kernel that reads past a context or through padding gets the wrong answer.
    """
    blocks = [-(-n // block_size) for n in ctx_lens]
    num_blocks = sum(blocks) + spare_blocks
    perm = torch.randperm(num_blocks, generator=_gen(seed + 1)).tolist()
    tables = torch.zeros(len(ctx_lens), max(blocks) + 1, dtype=torch.int32)
    used = 0
    for s, nb in enumerate(blocks):
        tables[s, :nb] = torch.tensor(perm[used:used + nb], dtype=torch.int32)
        used += nb
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = _randn(*shape, dtype=dtype, seed=seed + 2)
    v_cache = _randn(*shape, dtype=dtype, seed=seed + 3)
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, tables.to(DEVICE), lens


# --------------------------------------------------------------------------------------
# elementwise / norm ops
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 100), (1, 2048)])
def test_rms_norm(shape, dtype):
    x = _randn(*shape, dtype=dtype, seed=1)
    w = _randn(shape[-1], dtype=dtype, seed=2)
    _close(tri.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), dtype)


def test_rms_norm_fp32_weight_promotes_like_reference():
    x = _randn(4, 96, dtype=torch.bfloat16, seed=1)
    w = _randn(96, seed=2)
    out, expected = tri.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5)
    assert out.dtype == expected.dtype == torch.float32
    _close(out, expected, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 64), (3, 200)])
def test_add_rms_norm(shape, dtype):
    x = _randn(*shape, dtype=dtype, seed=1)
    res = _randn(*shape, dtype=dtype, seed=2)
    w = _randn(shape[-1], dtype=dtype, seed=3)
    x_before, res_before = x.clone(), res.clone()
    out, new_res = tri.add_rms_norm(x, res, w, 1e-6)
    exp_out, exp_res = ref.add_rms_norm(x, res, w, 1e-6)
    _close(new_res, exp_res, dtype)
    _close(out, exp_out, dtype)
    assert torch.equal(x, x_before) and torch.equal(res, res_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 2 * 48), (3, 2 * 1500), (2, 2, 2 * 32)])
def test_silu_and_mul(shape, dtype):
    x = _randn(*shape, dtype=dtype, seed=4, scale=3.0)
    _close(tri.silu_and_mul(x), ref.silu_and_mul(x), dtype)


def _close_sum(actual, expected, dtype):
    # A product's low-precision output differs from the reference's by a few of its ulps (the
    # input is rounded once where the separate ops round twice, and the sums go in another
    # order): outputs are O(1) here, where a wrong row or chunk is off by O(1).
    tol = dict(atol=6e-2, rtol=3e-2) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


@pytest.fixture
def gemv_launches(monkeypatch):
    """Counts the fused matrix-vector launches (a wrapper that falls back to the separate
    ops launches none)."""
    launched = []
    real = tri._gemv
    monkeypatch.setattr(tri, "_gemv", lambda *a, **k: (launched.append(a[0]), real(*a, **k))[1])
    return launched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, max_rows", [(1, 1), (3, 4), (3, 1)])
@pytest.mark.parametrize("K, N", [(128, 32), (150, 40)])   # 150, 40: partial K chunks and N tiles
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_linear(with_residual, K, N, rows, max_rows, dtype, monkeypatch, gemv_launches):
    monkeypatch.setattr(tri, "FUSED_GEMV_MAX_ROWS", max_rows)
    x = _randn(rows, K, dtype=dtype, seed=20, scale=2.0)
    res = _randn(rows, K, dtype=dtype, seed=21) if with_residual else None
    norm_w = _randn(K, dtype=dtype, seed=22).abs() + 0.5
    w = _randn(N, K, dtype=dtype, seed=23, scale=K ** -0.5)
    before = [t.clone() for t in (x, res) if t is not None]
    out, new_res = tri.rms_norm_linear(x, res, norm_w, 1e-5, w)
    exp_out, exp_res = ref.rms_norm_linear(x, res, norm_w, 1e-5, w)
    _close_sum(out, exp_out, dtype)
    _close(new_res, exp_res, dtype)
    assert out.shape == (rows, N) and new_res.shape == (rows, K)
    assert all(torch.equal(t, b) for t, b in zip((x, res), before) if t is not None)
    assert gemv_launches == ([] if rows > max_rows else [tri._PRO_ADD_NORM if with_residual else tri._PRO_NORM])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, max_rows", [(1, 1), (2, 2), (2, 1)])
@pytest.mark.parametrize("I, N", [(128, 16), (100, 20)])
def test_silu_and_mul_linear(I, N, rows, max_rows, dtype, monkeypatch, gemv_launches):
    monkeypatch.setattr(tri, "FUSED_GEMV_MAX_ROWS", max_rows)
    x = _randn(rows, 2 * I, dtype=dtype, seed=24, scale=3.0)
    w = _randn(N, I, dtype=dtype, seed=25, scale=I ** -0.5)
    _close_sum(tri.silu_and_mul_linear(x, w), ref.silu_and_mul_linear(x, w), dtype)
    assert gemv_launches == ([] if rows > max_rows else [tri._PRO_SILU_MUL])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, max_rows", [(1, 1), (3, 4), (3, 1)])
@pytest.mark.parametrize("K, N", [(128, 32), (150, 40)])
def test_linear_batch_one_goes_through_the_triton_product(K, N, rows, max_rows, dtype, monkeypatch, gemv_launches):
    """A product with nothing to fold in (o_proj, lm_head) at a decode-sized batch, where the
    tile table has an entry for it."""
    monkeypatch.setattr(tri, "FUSED_GEMV_MAX_ROWS", max_rows)
    monkeypatch.setitem(tri.GEMV_CONFIGS, tri._PRO_NONE, tri.GemvTile(16, 64, 1))
    x = _randn(rows, K, dtype=dtype, seed=26, scale=2.0)
    w = _randn(N, K, dtype=dtype, seed=27, scale=K ** -0.5)
    out = tri.linear(x, w)
    _close_sum(out, ref.linear(x, w), dtype)
    assert out.shape == (rows, N)
    assert gemv_launches == ([] if rows > max_rows else [tri._PRO_NONE])
    # Through a leading batch dimension too, and a bias always to cuBLAS (the kernel has none).
    _close_sum(tri.linear(x[None], w)[0], ref.linear(x, w), dtype)
    b = _randn(N, dtype=dtype, seed=28)
    launched = len(gemv_launches)
    _close_sum(tri.linear(x, w, b), ref.linear(x, w, b), dtype)
    assert len(gemv_launches) == launched


def test_linear_leaves_an_op_without_a_tile_to_cublas(monkeypatch, gemv_launches):
    """An op the tile table has no entry for is not fused (the sweep did not keep it): on a
    GPU for every op, under the interpreter for the plain product (the default table has
    none, so o_proj and lm_head stay on torch's product)."""
    monkeypatch.setattr(tri, "GEMV_CONFIGS", {})
    x, w = _randn(1, 64, seed=29), _randn(16, 64, seed=30)
    assert not tri._gemv_fits(tri._PRO_NONE, x.to("meta"), w.to("meta"))
    tri.linear(x, w)
    assert gemv_launches == []
    monkeypatch.setattr(tri, "GEMV_CONFIGS", {tri._PRO_NONE: tri.GemvTile(16, 64, 1)})
    assert tri._gemv_fits(tri._PRO_NONE, x.to("meta"), w.to("meta"))
    assert not tri._gemv_fits(tri._PRO_SILU_MUL, x.to("meta"), w.to("meta"))
    tri.linear(x, w)
    assert gemv_launches == [tri._PRO_NONE]


# Every variant of the kernel (the sweep times them on a GPU), at tiles that cross the row's
# and the weight's edges: the norm's pass in chunks or whole, the next weight tile prefetched,
# the per-tile row reduction.
GEMV_VARIANTS = [tri.GemvTile(16, 64, 1, prefetch, row_acc, wide_norm)
                 for prefetch, row_acc, wide_norm in [(False, False, False), (False, False, True),
                                                      (True, False, False), (True, True, True), (False, True, False)]]


# (op, tile, the wide norm pass's largest block): 8192 reads K=150 in one block, 64 in 3.
GEMV_CASES = ([(op, t, 8192) for op in ("none", "norm", "add_norm", "silu") for t in GEMV_VARIANTS]
              + [(op, t, 64) for op in ("norm", "add_norm") for t in GEMV_VARIANTS if t.wide_norm])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, tile, norm_block_max", GEMV_CASES,
                         ids=["%s-pf%d-ra%d-wn%d-nb%d" % (op, *t[3:6], nb) for op, t, nb in GEMV_CASES])
def test_every_gemv_variant_matches_the_reference(op, tile, norm_block_max, dtype, monkeypatch, gemv_launches):
    monkeypatch.setattr(tri, "GEMV_CONFIG", tile)
    monkeypatch.setattr(tri, "_NORM_BLOCK_MAX", norm_block_max)   # 64: the wide pass in 3 chunks of K=150
    _check_batch_one_product(op, 40, 150, dtype, seed=34)
    assert len(gemv_launches) == 1


def _check_batch_one_product(op: str, N: int, K: int, dtype, seed: int) -> None:
    """One row through the op's Triton product against the reference: "none" (linear),
    "norm" / "add_norm" (rms_norm_linear without / with a residual) or "silu"."""
    w = _randn(N, K, dtype=dtype, seed=seed, scale=K ** -0.5)
    if op == "silu":
        x = _randn(1, 2 * K, dtype=dtype, seed=seed + 1, scale=3.0)
        out, expected = tri.silu_and_mul_linear(x, w), ref.silu_and_mul_linear(x, w)
    elif op == "none":
        x = _randn(1, K, dtype=dtype, seed=seed + 1, scale=2.0)
        out, expected = tri.linear(x, w), ref.linear(x, w)
    else:
        x = _randn(1, K, dtype=dtype, seed=seed + 1, scale=2.0)
        res = _randn(1, K, dtype=dtype, seed=seed + 2) if op == "add_norm" else None
        norm_w = _randn(K, dtype=dtype, seed=seed + 3).abs() + 0.5
        (out, new_res), (expected, exp_res) = (f(x, res, norm_w, 1e-5, w) for f in (tri.rms_norm_linear,
                                                                                  ref.rms_norm_linear))
        _close(new_res, exp_res, dtype)
    _close_sum(out, expected, dtype)


def test_fused_products_leave_large_weights_to_the_separate_ops(monkeypatch, gemv_launches):
    """Past FUSED_GEMV_MAX_WEIGHT_BYTES the separate op and cuBLAS serve the product."""
    x, res = _randn(1, 64, seed=30), _randn(1, 64, seed=31)
    norm_w, w = _randn(64, seed=32).abs() + 0.5, _randn(16, 64, seed=33, scale=0.125)
    monkeypatch.setattr(tri, "FUSED_GEMV_MAX_WEIGHT_BYTES", w.numel() * w.element_size() - 1)
    _close_sum(tri.rms_norm_linear(x, res, norm_w, 1e-5, w)[0], ref.rms_norm_linear(x, res, norm_w, 1e-5, w)[0],
               torch.float32)
    assert gemv_launches == []
    monkeypatch.setattr(tri, "FUSED_GEMV_MAX_WEIGHT_BYTES", w.numel() * w.element_size())
    tri.rms_norm_linear(x, res, norm_w, 1e-5, w)
    assert gemv_launches == [tri._PRO_ADD_NORM]


def test_fused_products_serve_a_batch_one_decode_with_the_references_tokens(gemv_launches, monkeypatch):
    """The model takes the fused products where the triton backend offers them (plain
    Linear projections, one row), and greedy tokens stay the torch backend's."""
    from engine.llm_engine import LLMEngine
    # o_proj through the plain product too. The layers' weights fit under the limit, the
    # 49152-row lm_head does not (it stays on torch's product: the limit is kept, and the
    # interpreter is spared thousands of programs).
    monkeypatch.setitem(tri.GEMV_CONFIGS, tri._PRO_NONE, tri.GemvTile(16, 64, 1))
    monkeypatch.setattr(tri, "FUSED_GEMV_MAX_WEIGHT_BYTES", 1 << 20)
    from engine.sampling_params import SamplingParams

    def run(backend):
        e = LLMEngine("random:tiny", device="cpu", dtype="float32", kernel_backend=backend, max_model_len=64,
                      enable_prefix_caching=False)
        e.add_request("a", [11, 12, 13, 14, 15], SamplingParams(max_tokens=2, ignore_eos=True))
        toks = []
        while e.has_unfinished():
            toks += [t for o in e.step() for t in o.new_token_ids]
        return toks, e.runner.model.cfg.num_layers

    expected, layers = run("torch")
    assert gemv_launches == []
    assert run("triton")[0] == expected and len(expected) == 2
    # One decode step (the 5-token prefill is not a one-row product), each layer's two norms
    # and its activation fused; the first layer's input norm has no residual to add.
    assert gemv_launches.count(tri._PRO_NORM) == 1
    assert gemv_launches.count(tri._PRO_ADD_NORM) == 2 * layers - 1
    assert gemv_launches.count(tri._PRO_SILU_MUL) == layers
    # Each o_proj of the decode step; the lm_head is over the limit.
    assert gemv_launches.count(tri._PRO_NONE) == layers


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,KH,D", [(7, 4, 4, 32), (5, 8, 2, 64), (3, 20, 4, 128)])
def test_rotary_embedding(T, H, KH, D, dtype):
    max_pos = 64
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).float().to(DEVICE)
    # q and k as strided views of one fused projection, as the model produces them.
    qkv = _randn(T, (H + 2 * KH) * D, dtype=dtype, seed=5)
    q = qkv[:, :H * D].view(T, H, D)
    k = qkv[:, H * D:(H + KH) * D].view(T, KH, D)
    positions = torch.randint(0, max_pos, (T,), generator=_gen(6)).to(DEVICE)
    qkv_before = qkv.clone()
    q_out, k_out = tri.rotary_embedding(q, k, positions, cos_sin)
    q_exp, k_exp = ref.rotary_embedding(q, k, positions, cos_sin)
    _close(q_out, q_exp, dtype)
    _close(k_out, k_exp, dtype)
    assert torch.equal(qkv, qkv_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,KH,D", [(16, 2, 32), (8, 3, 64)])
def test_write_kv(block_size, KH, D, dtype):
    T, num_blocks = 12, 6
    kv = _randn(T, 2 * KH * D, dtype=dtype, seed=7)
    k = kv[:, :KH * D].view(T, KH, D)  # non-contiguous token stride
    v = kv[:, KH * D:].view(T, KH, D)
    slots = torch.randperm(num_blocks * block_size, generator=_gen(8))[:T]
    slots[[2, 5, 11]] = -1
    slots = slots.to(DEVICE)
    k_cache = _randn(num_blocks, block_size, KH, D, dtype=dtype, seed=9)
    v_cache = _randn(num_blocks, block_size, KH, D, dtype=dtype, seed=10)
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    ref.write_kv(k, v, k_exp, v_exp, slots)
    tri.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_exp)
    assert torch.equal(v_cache, v_exp)


def test_write_kv_all_skipped():
    k_cache = _randn(2, 16, 2, 32, seed=1)
    before = k_cache.clone()
    k = _randn(3, 2, 32, seed=2)
    tri.write_kv(k, k, k_cache, k_cache, torch.full((3,), -1, dtype=torch.int64, device=DEVICE))
    assert torch.equal(k_cache, before)


def _rope_cache(max_pos: int, D: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float().to(DEVICE)


def _check_rotary_write_kv(T, H, KH, D, block_size, dtype, pos_dtype, skipped=(), seed=20):
    """The fused op against the reference composition (rotary_embedding, then write_kv):
    the same rotated q, the same cache contents everywhere (written slots and untouched
    ones), and q/k/v left as they were."""
    max_pos, num_blocks = 64, 5
    cos_sin = _rope_cache(max_pos, D)
    qkv = _randn(T, (H + 2 * KH) * D, dtype=dtype, seed=seed)
    q = qkv[:, :H * D].view(T, H, D)              # strided views, as the model passes them
    k = qkv[:, H * D:(H + KH) * D].view(T, KH, D)
    v = qkv[:, (H + KH) * D:].view(T, KH, D)
    positions = torch.randint(0, max_pos, (T,), generator=_gen(seed + 1)).to(DEVICE, pos_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=_gen(seed + 2))[:T]
    slots[list(skipped)] = -1
    slots = slots.to(DEVICE, pos_dtype)
    k_cache = _randn(num_blocks, block_size, KH, D, dtype=dtype, seed=seed + 3)
    v_cache = _randn(num_blocks, block_size, KH, D, dtype=dtype, seed=seed + 4)
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    qkv_before = qkv.clone()
    q_exp = ref.rotary_embedding_write_kv(q, k, v, positions.long(), cos_sin, k_exp, v_exp, slots.long())
    q_out = tri.rotary_embedding_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    _close(q_out, q_exp, dtype)
    _close(k_cache, k_exp, dtype)
    assert torch.equal(v_cache, v_exp)  # V is only copied
    assert torch.equal(qkv, qkv_before)
    return k_cache, k_exp


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,KH,D,block_size", [(7, 4, 4, 32, 16), (5, 8, 2, 64, 8), (3, 20, 4, 128, 16)])
def test_rotary_embedding_write_kv(T, H, KH, D, block_size, dtype):
    _check_rotary_write_kv(T, H, KH, D, block_size, dtype, torch.int64, skipped=[1] if T > 3 else [])


def test_rotary_embedding_write_kv_int32_inputs_and_padding():
    # The decode graphs feed int32 positions/slots; padded rows (slot -1) write nothing.
    k_cache, k_exp = _check_rotary_write_kv(6, 8, 2, 32, 16, torch.float32, torch.int32, skipped=[0, 3, 5])
    assert torch.equal(k_cache, k_exp)


# --------------------------------------------------------------------------------------
# paged decode attention
# --------------------------------------------------------------------------------------

DECODE_CASES = [
    # H, KH, D, block_size, context lens, forced partition tokens (None = heuristic)
    pytest.param(4, 4, 32, 16, [1, 17, 45], None, id="mha-single-pass"),
    pytest.param(8, 2, 32, 16, [5, 33, 80], 16, id="gqa4-split16"),
    pytest.param(6, 2, 32, 32, [80, 3, 64, 47], 32, id="gqa3-bs32-split32"),
    pytest.param(8, 1, 64, 8, [70, 16], 32, id="mqa-bs8-split32"),
    pytest.param(4, 2, 128, 16, [37, 80], 48, id="gqa2-d128-split48"),
]


@pytest.mark.parametrize("fold", [True, False], ids=["fold-reduce", "reduce-kernel"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,KH,D,block_size,ctx_lens,partition", DECODE_CASES)
def test_paged_decode_attention(H, KH, D, block_size, ctx_lens, partition, dtype, fold):
    S = len(ctx_lens)
    k_cache, v_cache, tables, lens = _paged_kv(ctx_lens, KH, D, block_size, dtype, seed=S + H)
    q = _randn(S, H, D, dtype=dtype, seed=11)
    scale = D ** -0.5
    expected = ref.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    if partition is None:
        out = tri.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    else:
        assert max(ctx_lens) > partition  # the case must really split
        # 16-token tiles so the small forced partitions are tile multiples on GPU too.
        out = tri._paged_decode_attention(q, k_cache, v_cache, tables, lens, scale,
                                          partition_tokens=partition, config={"BLOCK_N": 16}, fold_reduce=fold)
    _close(out, expected, dtype)
    _assert_arrivals_reset()


def _assert_arrivals_reset():
    """The folded reduce's counters are back to zero for the next launch (a graph replay
    reuses them)."""
    assert not any(buf.any() for buf in tri._ARRIVALS.values()), "arrival counters left non-zero"


@pytest.mark.parametrize("fold", [True, False], ids=["fold-reduce", "reduce-kernel"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention_graph_padding(dtype, fold):
    """The CUDA-graph layout: a block table far wider than any context (so most split-K
    partitions start past the end and exit), stale block ids past each sequence's length,
    and padded entries with context 0. Real rows match the reference; padded rows are
    zeros, not NaN."""
    H, KH, D, BS = 8, 2, 32, 16
    real = [5, 40, 33]
    k_cache, v_cache, tables, lens = _paged_kv(real, KH, D, BS, dtype, seed=7)
    width = 16  # 256 tokens of table for contexts of at most 40
    wide = torch.zeros(len(real) + 2, width, dtype=torch.int32, device=DEVICE)
    wide[:len(real), :tables.shape[1]] = tables
    # Stale ids from some earlier, longer sequence: in range, but never to be read.
    wide[:len(real), tables.shape[1]:] = k_cache.shape[0] - 1
    wide_lens = torch.tensor(real + [0, 0], dtype=torch.int32, device=DEVICE)
    q = _randn(len(real) + 2, H, D, dtype=dtype, seed=8)
    scale = D ** -0.5
    expected = ref.paged_decode_attention(q[:len(real)], k_cache, v_cache, tables, lens, scale)
    for partition in (16, 32, 0):
        out = tri._paged_decode_attention(q, k_cache, v_cache, wide, wide_lens, scale,
                                          partition_tokens=partition, config={"BLOCK_N": 16}, fold_reduce=fold)
        _close(out[:len(real)], expected, dtype)
        assert torch.equal(out[len(real):], torch.zeros_like(out[len(real):]))
        _assert_arrivals_reset()


def test_decode_reduce_many_partitions():
    """Split-K with more partitions than one reduce chunk (BLOCK_P=16) holds: a 300-token
    context in 16-token partitions is 19 partials per head, reduced in two chunks."""
    H, KH, D, BS = 4, 2, 32, 16
    k_cache, v_cache, tables, lens = _paged_kv([300, 17], KH, D, BS, torch.float32, seed=9)
    q = _randn(2, H, D, seed=10)
    scale = D ** -0.5
    expected = ref.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    for fold in (True, False):
        out = tri._paged_decode_attention(q, k_cache, v_cache, tables, lens, scale,
                                          partition_tokens=16, config={"BLOCK_N": 16}, fold_reduce=fold)
        _close(out, expected, torch.float32)
        assert tri._ARRIVALS, "the folded reduce did not run"
        _assert_arrivals_reset()


def test_folded_reduce_counters_reset_after_a_context_past_the_table():
    """A context longer than its block table's width (never made by the engine) gets fewer
    partitions than it asks for; the arrival counters must still come back to zero, or
    every later launch would reduce early from half-written partials."""
    H, KH, D, BS = 4, 2, 32, 16
    k_cache, v_cache, tables, lens = _paged_kv([64, 64], KH, D, BS, torch.float32, seed=12)
    q = _randn(2, H, D, seed=13)
    scale = D ** -0.5
    too_long = lens.clone()
    too_long[0] = 96   # a block past the table (5 wide; its row reads into the next, in bounds)
    tri._paged_decode_attention(q, k_cache, v_cache, tables, too_long, scale, partition_tokens=16,
                                config={"BLOCK_N": 16}, fold_reduce=True)
    _assert_arrivals_reset()
    expected = ref.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    out = tri._paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, partition_tokens=16,
                                      config={"BLOCK_N": 16}, fold_reduce=True)
    _close(out, expected, torch.float32)


def test_decode_partition_heuristic():
    f = tri._decode_partition_tokens
    # Small batch, long context: split, partitions tile-aligned and not too short.
    tokens = f(4096, 8, 8, 132, 64)
    assert tokens > 0 and tokens % 64 == 0 and tokens >= tri._DECODE_MIN_PARTITION_TOKENS
    assert -(-4096 // tokens) > 1
    # Single sequence gets more partitions than a batch of eight.
    assert f(4096, 1, 8, 132, 64) < tokens
    # Big batch fills the GPU without splitting; short contexts are never split.
    assert f(4096, 256, 8, 132, 64) == 0
    assert f(200, 1, 1, 132, 64) == 0


# --------------------------------------------------------------------------------------
# paged prefill attention
# --------------------------------------------------------------------------------------

PREFILL_CASES = [
    # H, KH, D, block_size, query lens, context lens
    pytest.param(4, 4, 32, 16, [20, 7, 33], [20, 7, 33], id="mha-full-prefill"),
    pytest.param(8, 2, 32, 16, [16, 5, 30], [40, 70, 30], id="gqa4-chunked"),
    pytest.param(6, 2, 64, 8, [0, 12, 1, 17], [10, 50, 77, 17], id="gqa3-bs8-mixed"),
    pytest.param(4, 1, 32, 32, [35, 9], [80, 9], id="mqa-bs32"),
    pytest.param(2, 1, 32, 16, [1, 2, 3, 0, 4] * 4, list(range(3, 23)), id="many-short-seqs"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,KH,D,block_size,q_lens,ctx_lens", PREFILL_CASES)
def test_paged_prefill_attention(H, KH, D, block_size, q_lens, ctx_lens, dtype):
    k_cache, v_cache, tables, lens = _paged_kv(ctx_lens, KH, D, block_size, dtype, seed=H + KH)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    q = _randn(sum(q_lens), H, D, dtype=dtype, seed=12)
    scale = D ** -0.5
    expected = ref.paged_prefill_attention(q, k_cache, v_cache, tables, qsl, lens, scale)
    out = tri.paged_prefill_attention(q, k_cache, v_cache, tables, qsl, lens, scale)
    _close(out, expected, dtype)


def test_chunked_prefill_then_decode_roundtrip():
    """write_kv + prefill in two chunks + one decode step, all through the Triton ops."""
    H, KH, D, BS, n = 4, 2, 32, 16, 37
    k_cache, v_cache, tables, _ = _paged_kv([n + 1], KH, D, BS, torch.float32, seed=21)
    ks, vs, qs = (_randn(n + 1, h, D, seed=30 + i) for i, h in enumerate((KH, KH, H)))
    table = tables[0].long()
    slots = (table[torch.arange(n + 1, device=DEVICE) // BS] * BS
             + torch.arange(n + 1, device=DEVICE) % BS)
    scale = D ** -0.5
    outs = []
    for lo, hi in ((0, 21), (21, n)):
        tri.write_kv(ks[lo:hi], vs[lo:hi], k_cache, v_cache, slots[lo:hi])
        qsl = torch.tensor([0, hi - lo], dtype=torch.int32, device=DEVICE)
        lens = torch.tensor([hi], dtype=torch.int32, device=DEVICE)
        outs.append(tri.paged_prefill_attention(qs[lo:hi], k_cache, v_cache, tables, qsl, lens,
                                                scale))
    tri.write_kv(ks[n:], vs[n:], k_cache, v_cache, slots[n:])
    lens = torch.tensor([n + 1], dtype=torch.int32, device=DEVICE)
    outs.append(tri._paged_decode_attention(qs[n:], k_cache, v_cache, tables, lens, scale,
                                            partition_tokens=16, config={"BLOCK_N": 16}))
    out = torch.cat(outs)
    expected = torch.nn.functional.scaled_dot_product_attention(
        qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1), is_causal=True,
        scale=scale, enable_gqa=True).transpose(0, 1)
    _close(out, expected, torch.float32)


# --------------------------------------------------------------------------------------
# production shapes, GPU only
# --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestLargeShapesGPU:
    H, KH, D, BS = 32, 8, 128, 16

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    def test_decode_long_context_batch8(self, dtype):
        ctx_lens = [4096, 4095, 3001, 2048, 1500, 513, 17, 1]
        k_cache, v_cache, tables, lens = _paged_kv(ctx_lens, self.KH, self.D, self.BS, dtype,
                                                   seed=40)
        sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
        block_n = tri._decode_config(DEVICE)["BLOCK_N"]
        tokens = tri._decode_partition_tokens(4096, 8, self.KH, sms, block_n)
        assert tokens > 0 and -(-4096 // tokens) > 1, "heuristic should split this batch"
        q = _randn(8, self.H, self.D, dtype=dtype, seed=41)
        scale = self.D ** -0.5
        out = tri.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
        expected = ref.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
        _close(out, expected, dtype)
        single = tri._paged_decode_attention(q, k_cache, v_cache, tables, lens, scale,
                                             partition_tokens=0)
        _close(single, expected, dtype)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    @pytest.mark.parametrize("N, K, what", [(6144, 4096, "norm"), (28672, 4096, "add_norm"), (4096, 14336, "silu"),
                                            (4096, 4096, "none")])
    def test_fused_products_llama3_shapes(self, N, K, what, dtype, gemv_launches, monkeypatch):
        monkeypatch.setattr(tri, "FUSED_GEMV_MAX_WEIGHT_BYTES", 1 << 62)   # fused whatever the size
        monkeypatch.setitem(tri.GEMV_CONFIGS, tri._PRO_NONE, tri.GEMV_CONFIGS.get(tri._PRO_NONE, tri.GemvTile(8, 1024, 4)))
        _check_batch_one_product(what, N, K, dtype, seed=42)
        assert len(gemv_launches) == 1

    @pytest.mark.parametrize("tile", GEMV_VARIANTS + [tri.GemvTile(8, 1024, 4, True, False, True, True),
                                                      tri.GemvTile(32, 512, 4, False, False, True, True)],
                             ids=lambda t: "bn%d-bk%d-w%d-pf%d-ra%d-wn%d-pdl%d" % t)
    def test_chained_products_in_a_graph(self, tile, monkeypatch):
        """Two products, the second reading the first's output, replayed from a CUDA graph at
        each variant: as programmatic dependent launches the second starts before the first
        ends, so a read of its input ahead of gdc_wait would see the previous replay's."""
        if tile.pdl and not tri._pdl_supported(DEVICE):
            pytest.skip("no programmatic dependent launch on this GPU / Triton")
        monkeypatch.setattr(tri, "GEMV_CONFIG", tile)
        dtype, K = torch.bfloat16, 4096
        x = _randn(1, K, dtype=dtype, seed=46, scale=2.0)
        res = _randn(1, K, dtype=dtype, seed=47)
        norm_w = _randn(K, dtype=dtype, seed=48).abs() + 0.5
        w1, w2 = _randn(K, K, dtype=dtype, seed=49, scale=K ** -0.5), _randn(6144, K, dtype=dtype, seed=50, scale=K ** -0.5)

        def chain():
            h = tri.linear(x, w1)
            return tri.rms_norm_linear(h, res, norm_w, 1e-5, w2)

        chain()   # compiles outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out, new_res = chain()
        for seed in (51, 52, 53):   # a new input each replay: a stale read shows
            x.copy_(_randn(1, K, dtype=dtype, seed=seed, scale=2.0))
            g.replay()
            expected, exp_res = ref.rms_norm_linear(ref.linear(x, w1), res, norm_w, 1e-5, w2)
            _close_sum(out, expected, dtype)
            _close(new_res, exp_res, dtype)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_rotary_write_kv_llama3_shape(self, dtype):
        _check_rotary_write_kv(64, self.H, self.KH, self.D, self.BS, dtype, torch.int32, skipped=[3, 40])

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_dense_prefill_matches_the_reference(self, dtype):
        """The dense path (cuDNN) at the real head layout, where the start-up probe lets it serve."""
        if not tri.dense_prefill_supported(self.H, self.KH, self.D, dtype, DEVICE):
            pytest.skip("cuDNN attention does not serve this layout here (the engine keeps the paged kernel)")
        lens = [1000, 37]
        q = _randn(sum(lens), self.H, self.D, dtype=dtype, seed=60)
        k = _randn(sum(lens), self.KH, self.D, dtype=dtype, seed=61)
        v = _randn(sum(lens), self.KH, self.D, dtype=dtype, seed=62)
        scale = self.D ** -0.5
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.MATH]):
            expected = ref.causal_prefill_attention(q.float(), k.float(), v.float(), lens, scale)
        _close(tri.causal_prefill_attention(q, k, v, lens, scale), expected.to(dtype), dtype)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    def test_prefill_2048_after_1024_prefix(self, dtype):
        # One long chunk after a cached prefix, plus a short full prefill in the same batch.
        q_lens, ctx_lens = [2048, 100], [3072, 100]
        k_cache, v_cache, tables, lens = _paged_kv(ctx_lens, self.KH, self.D, self.BS, dtype,
                                                   seed=50)
        qsl = torch.tensor([0, 2048, 2148], dtype=torch.int32, device=DEVICE)
        q = _randn(sum(q_lens), self.H, self.D, dtype=dtype, seed=51)
        scale = self.D ** -0.5
        out = tri.paged_prefill_attention(q, k_cache, v_cache, tables, qsl, lens, scale)
        expected = ref.paged_prefill_attention(q, k_cache, v_cache, tables, qsl, lens, scale)
        _close(out, expected, dtype)


# --------------------------------------------------------------------------------------
# dense causal prefill (chunks with no prefix): equal to the paged kernel over the same K/V
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,KH,lens", [(4, 4, [20]), (8, 2, [16, 5, 30]), (6, 2, [0, 12, 1, 17]), (4, 1, [35])])
def test_causal_prefill_attention_equals_the_paged_kernels(H, KH, lens, dtype):
    D, bs = 32, 16
    T = sum(lens)
    q = _randn(T, H, D, dtype=dtype, seed=3)
    k = _randn(T, KH, D, dtype=dtype, seed=4)
    v = _randn(T, KH, D, dtype=dtype, seed=5)
    # The same K/V written into a paged cache, blocks handed out in reverse order.
    blocks = [-(-n // bs) for n in lens]
    num_blocks = sum(blocks) + 2
    k_cache = _randn(num_blocks, bs, KH, D, dtype=dtype, seed=6)
    v_cache = _randn(num_blocks, bs, KH, D, dtype=dtype, seed=7)
    tables = torch.zeros(len(lens), max(blocks) + 1, dtype=torch.int32)
    free = list(range(num_blocks - 1, -1, -1))
    slots, start = [], 0
    for s, n in enumerate(lens):
        for b in range(blocks[s]):
            tables[s, b] = free.pop(0)
        slots += [int(tables[s, i // bs]) * bs + i % bs for i in range(n)]
    slot = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    ref.write_kv(k, v, k_cache, v_cache, slot)
    qsl = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = D ** -0.5
    expected = ref.paged_prefill_attention(q, k_cache, v_cache, tables.to(DEVICE), qsl, ctx, scale)
    _close(ref.causal_prefill_attention(q, k, v, lens, scale), expected, dtype)
    # The triton backend's (cuDNN only) where it can serve the heads and dtype: never on a CPU.
    if tri.dense_prefill_supported(H, KH, D, dtype, q.device):
        _close(tri.causal_prefill_attention(q, k, v, lens, scale), expected, dtype)
    else:
        assert q.device.type == "cpu" or dtype == torch.float32
    _close(tri.paged_prefill_attention(q, k_cache, v_cache, tables.to(DEVICE), qsl, ctx, scale), expected, dtype)


def test_dense_prefill_is_used_only_where_it_runs_and_agrees(monkeypatch):
    """The engine-start probe: a fused op that raises, or answers wrongly, leaves the paged
    kernel in charge; one equal to the unfused reference is used. Never on a CPU or fp32."""
    assert not tri.dense_prefill_supported(8, 2, 32, torch.bfloat16, torch.device("cpu"))
    assert not tri.dense_prefill_supported(8, 2, 32, torch.float32, torch.device("cuda"))
    cpu = torch.device("cpu")
    monkeypatch.setattr(tri, "causal_prefill_attention", ref.causal_prefill_attention)
    assert tri._dense_prefill_agrees(8, 2, 32, torch.bfloat16, cpu)

    def wrong(q, k, v, lens, scale):
        return torch.zeros_like(q)

    def unavailable(q, k, v, lens, scale):
        raise RuntimeError("No available kernel. Aborting execution.")
    for op in (wrong, unavailable):
        monkeypatch.setattr(tri, "causal_prefill_attention", op)
        assert not tri._dense_prefill_agrees(8, 2, 32, torch.bfloat16, cpu)
