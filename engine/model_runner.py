"""Owns the model and its paged KV cache on one device, and turns a scheduled step into
tensors, a forward pass and the logits to sample from."""
from __future__ import annotations

import logging

import torch

from engine.config import EngineConfig, ModelConfig
from engine.kernels import default_backend, get_ops
from engine.model import loader
from engine.model.llama import ForwardBatch, LlamaForCausalLM
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
        self.model = self._build_model(source)
        self.model.init_rope(max_model_len, device)
        self.num_blocks = self._decide_num_blocks(max_model_len)
        # One tensor for the whole cache: [layer, k/v, block, slot, kv_head, head_dim]. A
        # block of one layer is contiguous, which is what KV transfer ships.
        self.kv_cache = torch.zeros(mcfg.num_layers, 2, self.num_blocks, self.block_size,
                                    mcfg.num_kv_heads, mcfg.head_dim, device=device, dtype=dtype)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(mcfg.num_layers)]
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
        return model.eval()

    def _decide_num_blocks(self, max_model_len: int) -> int:
        per_block = kv_bytes_per_token(self.mcfg, self.dtype) * self.block_size
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
    def execute(self, scheduled: list[ScheduledSeq], on_layer_done=None) -> torch.Tensor | None:
        """Run the forward for this step. Returns logits [N, V] for the scheduled entries
        whose `samples` is true, in scheduled order (None if there are none)."""
        bs = self.block_size
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        prefills = [s for s in scheduled if s.num_new_tokens > 1]
        ordered = decodes + prefills
        ids, pos, slots, sample_idx = [], [], [], []
        for s in ordered:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            ids.extend(seq.token_ids[start:end])
            table = seq.block_table
            for p in range(start, end):
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            if s.samples:
                sample_idx.append(len(ids) - 1)
        dev = self.device

        def as_tensor(x, dtype=torch.int64):
            return torch.tensor(x, dtype=dtype).to(dev, non_blocking=True)

        def tables(group):
            width = max(len(s.seq.block_table) for s in group)
            return as_tensor([s.seq.block_table + [0] * (width - len(s.seq.block_table)) for s in group],
                             torch.int32)

        batch = ForwardBatch(positions=as_tensor(pos), slot_mapping=as_tensor(slots),
                             num_decodes=len(decodes),
                             decode_block_tables=tables(decodes) if decodes else None,
                             decode_context_lens=as_tensor([s.seq.num_computed_tokens + 1 for s in decodes],
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
        hidden = self.model(as_tensor(ids), batch)
        if not sample_idx:
            return None
        logits = self.model.compute_logits(hidden[as_tensor(sample_idx)])
        # Back to the caller's order (decodes were moved first).
        order = [s for s in ordered if s.samples]
        rank = {id(s): i for i, s in enumerate(order)}
        want = [rank[id(s)] for s in scheduled if s.samples]
        if want != list(range(len(want))):
            logits = logits[torch.tensor(want, device=logits.device)]
        return logits

    # ---- KV block access (disaggregation) -------------------------------------------------------
    def read_kv_blocks(self, layer: int, block_ids: list[int]) -> torch.Tensor:
        """[2, n, block_size, kv_heads, head_dim] copy of one layer's blocks."""
        return self.kv_cache[layer][:, torch.tensor(block_ids, device=self.device)]

    def write_kv_blocks(self, layer: int, block_ids: list[int], data: torch.Tensor) -> None:
        self.kv_cache[layer][:, torch.tensor(block_ids, device=self.device)] = data.to(self.device, self.dtype)
