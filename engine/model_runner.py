"""Owns the model and its paged KV cache on one device, and turns a scheduled step into
tensors, a forward pass and the logits to sample from."""
from __future__ import annotations

import logging

import torch

from engine.attention_path import dense_prefill_step, dense_serves_several_prompts
from engine.config import EngineConfig, ModelConfig
from engine.cuda_graphs import DecodeGraphs
from engine.host_to_device import to_device
from engine.kernels import default_backend, get_ops
from engine import quant
from engine.model import loader
from engine.model.llama import ForwardBatch, LlamaForCausalLM
from engine.overlap import LaunchedStep
from engine.runner_output import RunnerOutput
from engine.scheduler import ScheduledSeq
from engine.step_inputs import StepInputs, build_inputs

log = logging.getLogger(__name__)

_CPU_DEFAULT_KV_GB = 1.0


def kv_bytes_per_token(mcfg: ModelConfig, dtype: torch.dtype) -> int:
    return mcfg.num_layers * 2 * mcfg.num_kv_heads * mcfg.head_dim * torch.empty((), dtype=dtype).element_size()


def _init_random_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and not name.endswith("bias"):
                p.fill_(1.0)       # norm weights
            else:
                p.normal_(0.0, 0.02, generator=gen)


class ModelRunner:
    def __init__(self, source: loader.ModelSource, mcfg: ModelConfig, cfg: EngineConfig,
                 device: torch.device, dtype: torch.dtype, max_model_len: int):
        self.mcfg, self.cfg, self.device, self.dtype = mcfg, cfg, device, dtype
        self.block_size = cfg.block_size
        backend = cfg.kernel_backend or default_backend(device)
        self.ops = get_ops(backend)
        # Prefill chunks with no prefix attend densely over their own K/V (Attention.forward;
        # EngineConfig.dense_prefill says when); off, every chunk takes the paged kernel
        # (benchmarks/gpu_prefill.py compares them).
        self.dense_fresh_prefill = device.type == "cpu" if cfg.dense_prefill is None else cfg.dense_prefill
        self.dense_several_prompts = dense_serves_several_prompts(backend)
        if backend == "triton":
            from engine.kernels.triton_ops import dense_prefill_supported
            self.dense_fresh_prefill = bool(cfg.dense_prefill) and dense_prefill_supported(
                mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim, dtype, device)
        if backend == "cpu":
            # Compile (or load from the on-disk cache) the numba kernels now, not inside the
            # first request's step, where seconds of silence would look like a dead worker.
            from engine.kernels import cpu_ops
            cpu_ops.warm_up(dtype)
        self.model = self._build_model(source)
        self.model.init_rope(max_model_len, device)
        self.num_blocks = self._decide_num_blocks(max_model_len)
        # One tensor for the whole cache: [layer, k/v, block, slot, kv_head, head_dim]. A
        # block of one layer is contiguous, which is what KV transfer ships.
        self.kv_cache = torch.zeros(mcfg.num_layers, 2, self.num_blocks, self.block_size,
                                    mcfg.num_kv_heads, mcfg.head_dim, device=device, dtype=self.kv_cache_dtype)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(mcfg.num_layers)]
        # Decode steps replay CUDA graphs on the GPU with the Triton kernels (the torch
        # reference kernels sync the host, so they cannot be captured).
        self.decode_graphs: DecodeGraphs | None = None
        if cfg.enable_cuda_graphs and device.type == "cuda" and backend == "triton":
            # Buckets past the largest batch the scheduler can form would never be used.
            sizes = sorted(cfg.cuda_graph_batch_sizes)
            # (A speculative verify step runs 1 + k decode rows per sequence.)
            rows = max(cfg.max_num_seqs, min(cfg.max_num_seqs, cfg.spec_max_batch) * (1 + cfg.num_speculative_tokens)
                       if cfg.speculative else 0)
            sizes = [b for b in sizes if b < rows] + [b for b in sizes if b >= rows][:1]
            self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, sizes,
                                              -(-max_model_len // self.block_size), device)
            self.decode_graphs.capture()
        log.info("model %s on %s/%s, kernels=%s, %d KV blocks of %d tokens",
                 source.name, device, dtype, backend, self.num_blocks, self.block_size)

    def _build_model(self, source: loader.ModelSource) -> LlamaForCausalLM:
        # Build on the meta device and materialise once, in the target dtype, on the target
        # device: an 8B model never exists twice or in fp32.
        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device("meta"):
                model = LlamaForCausalLM(self.mcfg, self.ops)
        finally:
            torch.set_default_dtype(prev)
        model = model.to_empty(device=self.device)
        if source.kind == "random":
            _init_random_(model, self.cfg.seed)
        elif source.kind == "hf":
            model.load_weights(loader.hf_weights(source.path))
        else:
            model.load_weights(loader.gguf_weights(loader.open_gguf(source.path), self.mcfg))
        # Weight quantization and the fp8 KV cache (engine/quant), once the weights are final.
        backend = self.cfg.kernel_backend or default_backend(self.device)
        self.kv_cache_dtype = quant.prepare_model(model, self.cfg, backend, self.dtype)
        return model.eval()

    def _decide_num_blocks(self, max_model_len: int) -> int:
        per_block = kv_bytes_per_token(self.mcfg, self.kv_cache_dtype) * self.block_size
        cfg = self.cfg
        if cfg.num_kv_blocks is not None:
            n = cfg.num_kv_blocks
        elif cfg.kv_cache_memory_gb is not None:
            n = int(cfg.kv_cache_memory_gb * 2**30) // per_block
        elif self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # Memory this process's caching allocator holds but no tensor uses (temporaries of
            # the weight load, an engine dropped earlier in the process) counts as used in
            # mem_get_info: hand it back first, or the pool comes out smaller than it can be,
            # or below zero for a second engine in one process.
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            # Leave room for the activations of the largest step (logits dominate).
            act = cfg.max_num_batched_tokens * (self.mcfg.vocab_size * 4 + self.mcfg.intermediate_size * 8) + 2**30
            budget = free - (1 - cfg.gpu_memory_utilization) * total - act
            n = int(budget) // per_block
        else:
            # Enough for every sequence slot at full length, capped by a modest default.
            want = -(-cfg.max_num_seqs * max_model_len // self.block_size)
            n = min(want, int(_CPU_DEFAULT_KV_GB * 2**30) // per_block)
        if n < 2:
            raise ValueError(f"only {n} KV blocks fit; give more memory or a smaller model")
        return n

    # ---- one step --------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq], on_layer_done=None,
                prev: LaunchedStep | None = None) -> RunnerOutput:
        """Run the forward for this step; the output holds the logits of the scheduled
        entries that sample (see RunnerOutput). With overlapped scheduling, `prev` is the
        launched step whose sampled tokens some inputs still are (placeholders): those are
        taken from its token tensor on the device."""
        # Decode rows first (a speculative verify chunk runs as 1 + num_spec decode rows,
        # on the decode path and its CUDA graphs), then prefill chunks.
        decodes = [s for s in scheduled if s.num_new_tokens == 1 or s.num_spec]
        prefills = [s for s in scheduled if s.num_new_tokens > 1 and not s.num_spec]
        inp = build_inputs(decodes + prefills, self.block_size, prev)
        num_decode_rows = sum(s.num_new_tokens for s in decodes)
        graphs = self.decode_graphs
        if (graphs is not None and decodes and not prefills and on_layer_done is None
                and graphs.can_run(num_decode_rows, max(len(s.seq.block_table) for s in decodes))):
            return self._execute_decode_graph(scheduled, inp, prev)
        dev = self.device

        def as_tensor(x, dtype=torch.int64):
            # (A prefill chunk's lists are thousands of ints, converted while the GPU waits.)
            return to_device(x, dev, dtype)

        def padded(tables):
            width = max(map(len, tables))
            return as_tensor([t + [0] * (width - len(t)) for t in tables], torch.int32)

        dec = slice(0, num_decode_rows)
        batch = ForwardBatch(positions=as_tensor(inp.positions), slot_mapping=as_tensor(inp.slots),
                             num_decodes=num_decode_rows,
                             decode_block_tables=padded(inp.block_tables[dec]) if decodes else None,
                             decode_context_lens=as_tensor([p + 1 for p in inp.positions[dec]],
                                                           torch.int32) if decodes else None,
                             prefill_block_tables=padded([s.seq.block_table for s in prefills]) if prefills else None,
                             prefill_query_start_loc=None, prefill_context_lens=None,
                             kv_caches=self.kv_caches, on_layer_done=on_layer_done)
        if prefills:
            qsl = [0]
            for s in prefills:
                qsl.append(qsl[-1] + s.num_new_tokens)
            batch.prefill_query_start_loc = as_tensor(qsl, torch.int32)
            batch.prefill_context_lens = as_tensor(
                [s.seq.num_computed_tokens + s.num_new_tokens for s in prefills], torch.int32)
            if dense_prefill_step((s.seq.num_computed_tokens for s in prefills), self.dense_fresh_prefill,
                                  self.dense_several_prompts):
                batch.prefill_fresh_lens = [s.num_new_tokens for s in prefills]
        input_ids = as_tensor(inp.token_ids)
        if inp.has_placeholders:
            fill = [r for r, src in enumerate(inp.sources) if src >= 0]
            input_ids[as_tensor(fill)] = prev.tokens[as_tensor([inp.sources[r] for r in fill])]
        hidden = self.model(input_ids, batch)
        # The rows to sample, in the caller's order (decodes were moved first).
        sample_rows = inp.sample_rows(scheduled)
        logits = self.model.compute_logits(hidden[as_tensor(sample_rows)]) if sample_rows else None
        return RunnerOutput.for_step(scheduled, logits)

    def _execute_decode_graph(self, scheduled: list[ScheduledSeq], inp: StepInputs,
                              prev: LaunchedStep | None) -> RunnerOutput:
        # Run even when nothing samples: a 1-token prefill chunk must still write its KV.
        fill = inp.has_placeholders
        logits, greedy = self.decode_graphs.run(inp.token_ids, inp.positions, inp.slots, inp.block_tables,
                                                [p + 1 for p in inp.positions], inp.sources if fill else None,
                                                prev.tokens if fill else None)
        sample_rows = inp.sample_rows(scheduled)
        if not sample_rows:
            return RunnerOutput.for_step(scheduled, None)
        if len(sample_rows) != len(inp.token_ids):
            rows = to_device(sample_rows, logits.device)
            logits, greedy = logits[rows], greedy[rows]
        return RunnerOutput.for_step(scheduled, logits, greedy)

    # ---- KV block access (disaggregation) -------------------------------------------------------
    def read_kv_blocks(self, layer: int, block_ids: list[int]) -> torch.Tensor:
        """[2, n, block_size, kv_heads, head_dim] copy of one layer's blocks."""
        return self.kv_cache[layer][:, torch.tensor(block_ids, device=self.device)]

    def write_kv_blocks(self, layer: int, block_ids: list[int], data: torch.Tensor) -> None:
        self.kv_cache[layer][:, torch.tensor(block_ids, device=self.device)] = data.to(self.device, self.kv_cache.dtype)
