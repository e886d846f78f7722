"""Configuration dataclasses: the model's shape, and how the engine runs it."""
from __future__ import annotations

from dataclasses import dataclass, field

from planes.prefix_hash import BLOCK_SIZE


@dataclass
class ModelConfig:
    """Shape of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2)."""
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF-style rope scaling dict ({"rope_type": "llama3", "factor": ..., ...}) or None.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    architecture: str = "llama"

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = 3 * h * i
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * h) + emb + h


@dataclass
class EngineConfig:
    """How one engine instance runs. Both pools use this; the pool picks the knobs."""
    block_size: int = BLOCK_SIZE
    # KV pool size: an explicit block count wins; otherwise `kv_cache_memory_gb`
    # (or, on a GPU, `gpu_memory_utilization` of the free memory after weights).
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 128
    # Per-step token budget: prefill chunks and decode tokens share it.
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # defaults to the model's context length
    kernel_backend: str | None = None  # "torch" | "triton" | "cpu"; default: triton on CUDA, cpu on CPU
    seed: int = 0  # seed for random weights
    # Weight-only quantization of the decoder layers' linears (engine/quant):
    # "int8" | "fp8" (e4m3, per-channel scales) | "fp8_tensor" (one scale per matrix).
    quantization: str | None = None
    # With `quantization` set, quantize the logits projection (lm_head) the same way; no
    # effect without it. None (default) = yes for int8, no for fp8/fp8_tensor, whose e4m3
    # head costs perplexity that int8's does not (why, and the figures: engine/quant).
    quantize_lm_head: bool | None = None
    # KV cache storage: None = the model dtype; "fp8" = e4m3 holding K/V / kv_cache_scale.
    kv_cache_dtype: str | None = None
    kv_cache_scale: float = 1.0
    # CUDA graphs for pure-decode steps (GPU + Triton kernels only): one graph per batch
    # bucket, captured at start-up; a step is padded up to the next bucket. Steps with a
    # prefill chunk, larger batches or a per-layer callback run eagerly.
    enable_cuda_graphs: bool = True
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    # Speculative decoding (engine/spec_decode): None = off; "ngram" = prompt lookup (no
    # extra model); anything else names a draft model (same tokenizer) loaded like `model`.
    speculative: str | None = None
    num_speculative_tokens: int = 4       # most draft tokens verified per sequence per step
    spec_max_batch: int = 16              # no speculation while more sequences are running
    spec_adaptive: bool = True            # pick k (or 0) per sequence from measured acceptance
    # Overlapped scheduling (engine/overlap.py): the host schedules and prepares step n+1
    # while the device runs step n. None = auto (on with a CUDA device, off on CPU, where
    # the forward runs on the host anyway); True/False forces it. Steps with a per-layer
    # callback (the prefill worker) and engines with speculative decoding run synchronously.
    async_scheduling: bool | None = None
    # Prefill chunks that start their sequence attend over their own K/V with a dense fused
    # kernel instead of the paged one (engine/kernels: causal_prefill_attention). None =
    # auto: on a CPU device (torch's SDPA); off on CUDA, where the fused kernel that
    # takes grouped KV heads as they are (cuDNN) builds a plan for every new prompt length
    # (tens of ms, once per length: a stream of varied lengths pays it again and again), and
    # serves one sequence per launch (a step of several prompts keeps the paged kernel).
    # True asks for it on CUDA too; it is used only where a start-up probe finds that kernel
    # runs and agrees with the reference.
    dense_prefill: bool | None = None

    def validate(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if not self.enable_chunked_prefill and self.max_model_len and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens must be >= max_model_len")
        if self.quantization not in (None, "int8", "fp8", "fp8_tensor"):
            raise ValueError(f"quantization must be 'int8', 'fp8', 'fp8_tensor' or None, got {self.quantization!r}")
        if self.quantize_lm_head is not None and not isinstance(self.quantize_lm_head, bool):
            raise ValueError(f"quantize_lm_head must be true, false or null (the default: int8 only), "
                             f"got {self.quantize_lm_head!r}")
        if self.kv_cache_dtype not in (None, "auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be 'fp8', 'auto' or None, got {self.kv_cache_dtype!r}")
        if (isinstance(self.kv_cache_scale, bool) or not isinstance(self.kv_cache_scale, (int, float))
                or not 0 < self.kv_cache_scale < float("inf")):
            raise ValueError(f"kv_cache_scale must be a positive finite number, got {self.kv_cache_scale!r}")
        if any(not isinstance(b, int) or b < 1 for b in self.cuda_graph_batch_sizes):
            raise ValueError(f"cuda_graph_batch_sizes must be positive integers, got {self.cuda_graph_batch_sizes!r}")
        if self.speculative is not None and (not isinstance(self.speculative, str) or not self.speculative):
            raise ValueError(f"speculative must be 'ngram', a draft model name or None, got {self.speculative!r}")
        if isinstance(self.num_speculative_tokens, bool) or not isinstance(self.num_speculative_tokens, int) \
                or not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be an integer in [1, 16], got {self.num_speculative_tokens!r}")
        if isinstance(self.spec_max_batch, bool) or not isinstance(self.spec_max_batch, int) or self.spec_max_batch < 1:
            raise ValueError(f"spec_max_batch must be a positive integer, got {self.spec_max_batch!r}")
        if self.dense_prefill is not None and not isinstance(self.dense_prefill, bool):
            raise ValueError(f"dense_prefill must be true, false or null (auto: on on a CPU), "
                             f"got {self.dense_prefill!r}")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be true, false or null (auto: on with CUDA), "
                             f"got {self.async_scheduling!r}")
        if self.kernel_backend not in (None, "torch", "triton", "cpu"):
            raise ValueError(f"kernel_backend must be 'torch', 'triton' or 'cpu', got {self.kernel_backend!r}")
