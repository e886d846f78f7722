"""Owns the model and its paged KV cache on one device, and turns a scheduled step into
tensors, a forward pass and the logits to sample from."""
from __future__ import annotations

import logging

import torch

from engine.config import EngineConfig, ModelConfig
from engine.cuda_graphs import DecodeGraphs
from engine.kernels import default_backend, get_ops
from engine import quant
from engine.model import loader
from engine.model.llama import ForwardBatch, LlamaForCausalLM
from engine.overlap import LaunchedStep, placeholder_source
from engine.scheduler import ScheduledSeq

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
        self.greedy_ids: torch.Tensor | None = None   # see execute()
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
                prev: LaunchedStep | None = None) -> torch.Tensor | None:
        """Run the forward for this step. Returns logits [N, V] for the scheduled entries
        whose `samples` is true, in scheduled order (None if there are none); a speculative
        verify entry (num_spec > 0) has 1 + num_spec consecutive rows. With overlapped
        scheduling, `prev` is the launched step whose sampled tokens some inputs still
        are (placeholders): those are taken from its token tensor on the device."""
        bs = self.block_size
        # The argmax of the returned logits' rows when the decode graph computed it (the
        # sampler then need not), else None.
        self.greedy_ids: torch.Tensor | None = None
        # A speculative verify chunk (num_spec > 0) runs as 1 + num_spec decode rows over the
        # same block table, row i seeing the context up to its own token: all the chunk's
        # K/V is written before attention, so this is causal attention, and it stays on the
        # decode path (and its CUDA graphs).
        decodes = [s for s in scheduled if s.num_new_tokens == 1 or s.num_spec]
        prefills = [s for s in scheduled if s.num_new_tokens > 1 and not s.num_spec]
        dec_rows = [(s, i) for s in decodes for i in range(1 + s.num_spec)]
        graphs = self.decode_graphs
        if (graphs is not None and decodes and not prefills and on_layer_done is None
                and graphs.can_run(len(dec_rows), max(len(s.seq.block_table) for s in decodes))):
            return self._execute_decode_graph(decodes, prev)
        ordered = decodes + prefills
        ids, pos, slots, sample_idx = [], [], [], []
        fill_rows, fill_src = [], []   # input rows still placeholders, and their source rows in prev
        for s in ordered:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            ids.extend(seq.token_ids[start:end])
            src = placeholder_source(seq, end - 1, prev) if end == seq.num_tokens else -1
            if src >= 0:
                fill_rows.append(len(ids) - 1)
                fill_src.append(src)
                ids[-1] = 0
            if s.num_spec:  # speculative verify chunk: the draft tokens follow the last token
                ids.extend(seq.spec_token_ids[:s.num_spec])
            table = seq.block_table
            for p in range(start, end):
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            if s.samples:  # a verify chunk wants logits at all of its 1 + num_spec positions
                sample_idx.extend(range(len(ids) - 1 - s.num_spec, len(ids)))
        dev = self.device

        def as_tensor(x, dtype=torch.int64):
            return torch.tensor(x, dtype=dtype).to(dev, non_blocking=True)

        def tables(group):
            width = max(len(s.seq.block_table) for s in group)
            return as_tensor([s.seq.block_table + [0] * (width - len(s.seq.block_table)) for s in group],
                             torch.int32)

        batch = ForwardBatch(positions=as_tensor(pos), slot_mapping=as_tensor(slots),
                             num_decodes=len(dec_rows),
                             decode_block_tables=tables([s for s, _ in dec_rows]) if decodes else None,
                             decode_context_lens=as_tensor([s.seq.num_computed_tokens + i + 1 for s, i in dec_rows],
                                                           torch.int32) if decodes else None,
                             prefill_block_tables=tables(prefills) if prefills else None,
                             prefill_query_start_loc=None, prefill_context_lens=None,
                             kv_caches=self.kv_caches, on_layer_done=on_layer_done)
        if prefills:
            qsl = [0]
            for s in prefills:
                qsl.append(qsl[-1] + s.num_new_tokens)
            batch.prefill_query_start_loc = as_tensor(qsl, torch.int32)
            batch.prefill_context_lens = as_tensor(
                [s.seq.num_computed_tokens + s.num_new_tokens for s in prefills], torch.int32)
        input_ids = as_tensor(ids)
        if fill_rows:
            input_ids[as_tensor(fill_rows)] = prev.tokens[as_tensor(fill_src)]
        hidden = self.model(input_ids, batch)
        if not sample_idx:
            return None
        logits = self.model.compute_logits(hidden[as_tensor(sample_idx)])
        # Back to the caller's order (decodes were moved first).
        # (A verify chunk owns 1 + num_spec consecutive rows.)
        first, row = {}, 0
        for s in ordered:
            if s.samples:
                first[id(s)], row = row, row + 1 + s.num_spec
        want = [r for s in scheduled if s.samples for r in range(first[id(s)], first[id(s)] + 1 + s.num_spec)]
        if want != list(range(len(want))):
            logits = logits[torch.tensor(want, device=logits.device)]
        return logits

    def _execute_decode_graph(self, decodes: list[ScheduledSeq], prev: LaunchedStep | None) -> torch.Tensor | None:
        bs = self.block_size
        ids, pos, slots, tables, ctx, sample_rows, src = [], [], [], [], [], [], []
        for s in decodes:
            seq = s.seq
            start = seq.num_computed_tokens
            for i, tok in enumerate([seq.token_ids[start]] + seq.spec_token_ids[:s.num_spec]):
                p = start + i
                src.append(placeholder_source(seq, start, prev) if i == 0 and start == seq.num_tokens - 1 else -1)
                ids.append(tok)
                pos.append(p)
                slots.append(seq.block_table[p // bs] * bs + p % bs)
                tables.append(seq.block_table)
                ctx.append(p + 1)
                if s.samples:
                    sample_rows.append(len(ids) - 1)
        # Run even when nothing samples: a 1-token prefill chunk must still write its KV.
        fill = any(r >= 0 for r in src)
        logits, greedy = self.decode_graphs.run(ids, pos, slots, tables, ctx, src if fill else None,
                                                prev.tokens if fill else None)
        if not sample_rows:
            return None
        if len(sample_rows) != len(ids):
            rows = torch.tensor(sample_rows, device=logits.device)
            logits, greedy = logits[rows], greedy[rows]
        self.greedy_ids = greedy
        return logits

    # ---- KV block access (disaggregation) -------------------------------------------------------
    def read_kv_blocks(self, layer: int, block_ids: list[int]) -> torch.Tensor:
        """[2, n, block_size, kv_heads, head_dim] copy of one layer's blocks."""
        return self.kv_cache[layer][:, torch.tensor(block_ids, device=self.device)]

    def write_kv_blocks(self, layer: int, block_ids: list[int], data: torch.Tensor) -> None:
        self.kv_cache[layer][:, torch.tensor(block_ids, device=self.device)] = data.to(self.device, self.kv_cache.dtype)
