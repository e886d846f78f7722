"""The engine's side of speculative decoding: before the schedule, give running decode
sequences draft tokens (Sequence.spec_token_ids); after the target's verify forward, turn
each verify chunk's 1 + k logit rows into the tokens to emit, and measure acceptance.
The KV rollback itself is the scheduler's (Scheduler.rollback_spec)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import EngineConfig, ModelConfig
from engine.kernels import default_backend
from engine.sequence import Sequence
from engine.spec_decode.adaptive import SpecController, SpecTuning
from engine.spec_decode.ngram import NgramProposer
from engine.spec_decode.rejection import processed_probs, rejection_sample, verify_greedy


@dataclass
class SpecStats:
    num_verify: int = 0      # verify chunks run (one per sequence per step)
    num_proposed: int = 0    # draft tokens verified
    num_accepted: int = 0    # of them, accepted
    num_emitted: int = 0     # tokens produced by verify chunks (accepted + one each)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0


class SpecDecoder:
    def __init__(self, cfg: EngineConfig, target_mc: ModelConfig, num_blocks: int, device: torch.device,
                 dtype: torch.dtype, max_model_len: int):
        self.max_model_len = max_model_len
        tuning = SpecTuning()
        if device.type == "cuda":
            # Verify rows ride in the decode graph: on an H100 with llama3-8b a step of 128
            # rows costs 1.7x one of 1 row (benchmarks/RESULTS.md), ~0.6% per extra row;
            # the fixed part is the host work of proposing and verifying.
            tuning.verify_token_cost, tuning.verify_overhead = 0.006, 0.05
        elif (cfg.kernel_backend or default_backend(device)) == "cpu":
            # The cpu backend's linear loop reads the weights once for up to 8 rows
            # (cpu_ops.linear): SmolLM2 fp32, 4 rows cost ~1.35x one row, ~12% per extra row.
            # Past 8 rows torch's GEMM takes over and rows cost several times more, so k is
            # capped to keep a verify step within 8 rows.
            from engine.kernels import cpu_ops
            tuning.verify_token_cost, tuning.verify_overhead = 0.12, 0.1
            tuning.max_verify_rows = cpu_ops._LINEAR_MAX_ROWS
        else:
            # torch's CPU GEMM: a small model's step is compute-bound, 5 rows cost ~4-5x one row.
            tuning.verify_token_cost, tuning.verify_overhead = 0.8, 0.1
        if cfg.speculative == "ngram":
            self.proposer = NgramProposer()
        else:
            from engine.spec_decode.draft import DraftModelProposer
            self.proposer = DraftModelProposer(cfg.speculative, cfg, target_mc, num_blocks, device, dtype,
                                               max_model_len)
            # A draft token costs about one draft decode step: its share of the target's bytes.
            tuning.draft_token_cost = self.proposer.num_params() / max(target_mc.num_params(), 1)
        self.controller = SpecController(cfg.num_speculative_tokens, cfg.spec_max_batch, cfg.spec_adaptive, tuning)
        self.stats = SpecStats()
        self._draft_probs: dict[str, torch.Tensor] = {}

    def propose(self, running: list[Sequence]) -> None:
        """Set spec_token_ids on the running sequences that are at a decode step."""
        self._draft_probs.clear()
        cands, ks = [], []
        batch = len(running)
        if batch > self.controller.max_batch:
            # Off at this batch size: skip proposing, which at a small model's ~2 ms steps
            # cost a measurable share of each one (benchmarks/RESULTS.md). Drafts the last
            # step's token budget did not reach are still set: cleared, so the scheduler
            # does not verify stale ones.
            for seq in running:
                if seq.spec_token_ids:
                    seq.spec_token_ids = []
            return
        for seq in running:
            seq.spec_token_ids = []
            if seq.prefill_only or seq.num_computed_tokens + 1 != seq.num_tokens:
                continue
            k = self.controller.num_tokens(seq.seq_id, batch)
            # Never past max_tokens (one token is the verify step's own) or the context.
            k = min(k, seq.params.max_tokens - seq.num_output_tokens - 1,
                    self.max_model_len - seq.num_tokens - 1)
            cands.append(seq)
            ks.append(max(k, 0))
        if not cands or not any(ks):
            return
        for seq, k, (toks, q) in zip(cands, ks, self.proposer.propose(cands, ks)):
            toks = toks[:k]
            seq.spec_token_ids = toks
            if q is not None and toks:
                self._draft_probs[seq.seq_id] = q[:len(toks)]

    def verify(self, seq: Sequence, num_spec: int, logits: torch.Tensor) -> list[int]:
        """logits [1 + num_spec, V] at the verify chunk's positions -> tokens to emit."""
        drafts = seq.spec_token_ids[:num_spec]
        if seq.params.greedy:
            tokens = verify_greedy(logits, drafts)
        else:
            p = processed_probs(logits, seq.params)
            q = self._draft_probs.get(seq.seq_id)
            d = torch.tensor([drafts], dtype=torch.int64, device=p.device)
            out, n = rejection_sample(p[None], d, None if q is None else q[None].to(p.device), seq.generator)
            tokens = out[0, :int(n[0]) + 1].tolist()
        accepted = len(tokens) - 1
        self.controller.observe(seq.seq_id, num_spec, accepted)
        st = self.stats
        st.num_verify += 1
        st.num_proposed += num_spec
        st.num_accepted += accepted
        st.num_emitted += len(tokens)
        return tokens

    def forget(self, seq_id: str) -> None:
        self.controller.forget(seq_id)
        self._draft_probs.pop(seq_id, None)
        self.proposer.forget(seq_id)
