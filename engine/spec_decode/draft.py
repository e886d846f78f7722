"""Draft-model proposer: a smaller model with the same tokenizer, run as a second model
runner with its own paged KV cache and block pool.

Each target sequence has a shadow sequence here (its tokens plus this step's drafts, its
own block table). A propose call first catches the draft's KV up with the target's tokens
(the whole prompt the first time: one chunked forward), then runs k - 1 further one-token
decode steps batched over the sequences. After verification the shadow keeps the KV of
the prefix that the target accepted; the rest is overwritten next time."""
from __future__ import annotations

import dataclasses

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.model import loader
from engine.scheduler import ScheduledSeq
from engine.sequence import Sequence
from engine.spec_decode.rejection import processed_probs


def model_config_of(source: loader.ModelSource) -> ModelConfig:
    if source.kind == "hf":
        return loader.hf_config(source.path)
    if source.kind == "gguf":
        return loader.gguf_config(loader.open_gguf(source.path))
    return loader.random_config(source.path)


@dataclasses.dataclass
class _Shadow:
    seq: Sequence        # token_ids = target tokens (+ drafts); own block_table
    synced: int = 0      # target length at the last sync: tokens before it cannot have changed


class DraftModelProposer:
    def __init__(self, model: str, target_cfg: EngineConfig, target_mc: ModelConfig, num_blocks: int,
                 device: torch.device, dtype: torch.dtype, max_model_len: int):
        self.source = loader.resolve(model)
        self.mc = model_config_of(self.source)
        if self.mc.vocab_size > target_mc.vocab_size:
            raise ValueError(f"speculative: draft model {model!r} has a vocabulary of {self.mc.vocab_size}, "
                             f"larger than the target's {target_mc.vocab_size}; it must share its tokenizer")
        self.target_vocab = target_mc.vocab_size
        # Same token capacity as the target's pool; no prefix cache (shadows are private);
        # full precision weights and KV (the draft is small).
        self.cfg = dataclasses.replace(target_cfg, num_kv_blocks=num_blocks, enable_prefix_caching=False,
                                       speculative=None, quantization=None, kv_cache_dtype=None)
        self.device, self.dtype = device, dtype
        self.max_model_len = min(max_model_len, self.mc.max_position_embeddings)
        self.runner = None      # built on first use: a prefill-only pool never loads it
        self.blocks: BlockManager | None = None
        self.shadows: dict[str, _Shadow] = {}

    def _ensure_loaded(self) -> None:
        if self.runner is None:
            from engine.model_runner import ModelRunner   # model_runner imports the scheduler
            self.runner = ModelRunner(self.source, self.mc, self.cfg, self.device, self.dtype, self.max_model_len)
            self.blocks = BlockManager(self.runner.num_blocks, self.cfg.block_size, False)

    # ---- shadow bookkeeping ----------------------------------------------------------------
    def forget(self, seq_id: str) -> None:
        sh = self.shadows.pop(seq_id, None)
        if sh is not None:
            self.blocks.release(list(reversed(sh.seq.block_table)))

    def _sync(self, target: Sequence) -> _Shadow:
        """Point the shadow at the target's tokens; keep the KV of their common prefix."""
        sh = self.shadows.get(target.seq_id)
        if sh is None:
            # The target's generator: a seeded request stays reproducible with a draft.
            sh = self.shadows[target.seq_id] = _Shadow(Sequence(target.seq_id, [], target.num_prompt_tokens,
                                                                target.params, generator=target.generator))
        s, new = sh.seq, target.token_ids
        valid = min(s.num_computed_tokens, len(new))
        for i in range(sh.synced, valid):
            if s.token_ids[i] != new[i]:
                valid = i
                break
        s.token_ids = list(new)
        s.num_computed_tokens = valid
        sh.synced = len(new)
        keep = self.blocks.blocks_for(valid)
        if len(s.block_table) > keep:
            self.blocks.release(list(reversed(s.block_table[keep:])))
            del s.block_table[keep:]
        return sh

    def _grow(self, s: Sequence, num_tokens: int) -> bool:
        need = self.blocks.blocks_for(num_tokens) - len(s.block_table)
        if need <= 0:
            return True
        new = self.blocks.allocate(need)
        if new is None:
            return False
        s.block_table.extend(new)
        return True

    # ---- proposing ---------------------------------------------------------------------------
    def _pick(self, logits: torch.Tensor, s: Sequence, greedy_tok: int) -> tuple[int, torch.Tensor | None]:
        """Draft token from one row of logits; with its distribution q when sampling."""
        if s.params.greedy:
            return greedy_tok, None
        q = processed_probs(logits[None], s.params)[0]
        tok = int(torch.multinomial(q, 1, generator=s.generator)[0])
        if q.shape[-1] < self.target_vocab:   # a smaller vocabulary: q is 0 on the rest
            q = torch.nn.functional.pad(q, (0, self.target_vocab - q.shape[-1]))
        return tok, q

    # A short catch-up (the tokens the target produced since the last call: the accepted
    # run, or the steps a probe skipped) runs as decode rows, like a verify chunk, so on a
    # GPU it replays the decode graph instead of an eager prefill; a long one (the prompt,
    # the first time) is a prefill chunk.
    MAX_CATCHUP_ROWS = 16

    def _schedule(self, s: Sequence) -> ScheduledSeq:
        n = s.num_tokens - s.num_computed_tokens
        if not 1 < n <= self.MAX_CATCHUP_ROWS:
            return ScheduledSeq(s, n)
        cut = s.num_computed_tokens + 1
        s.spec_token_ids = s.token_ids[cut:]
        del s.token_ids[cut:]
        return ScheduledSeq(s, n, num_spec=n - 1)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        self._ensure_loaded()
        live = {s.seq_id for s in seqs}
        for sid in [sid for sid in self.shadows if sid not in live]:
            self.forget(sid)     # finished, preempted or aborted since the last call
        out: list[tuple[list[int], list | None]] = [([], None) for _ in seqs]
        active = []   # (index, shadow, k)
        for i, (t, k) in enumerate(zip(seqs, ks)):
            if k <= 0:
                continue
            sh = self._sync(t)
            # KV for every target token and the first k - 1 drafts (the last is never fed).
            if t.num_tokens + k - 1 > self.max_model_len or not self._grow(sh.seq, t.num_tokens + k - 1):
                continue     # no room in the draft's pool: this sequence decodes plainly
            active.append((i, sh, k))
            out[i] = ([], [] if not t.params.greedy else None)
        for depth in range(max((k for _, _, k in active), default=0)):
            step = [(i, sh) for i, sh, k in active if k > depth]
            sched = [self._schedule(sh.seq) for _, sh in step]
            ran = self.runner.execute(sched)   # (every entry samples: each reaches its sequence's end)
            logits, last_rows = ran.logits, ran.last_rows
            for e in sched:
                if e.num_spec:    # put the catch-up tokens back where they belong
                    e.seq.token_ids.extend(e.seq.spec_token_ids)
                    e.seq.spec_token_ids = []
            # One argmax and one host sync for the whole batch.
            best = logits[torch.tensor(last_rows, device=logits.device)].argmax(-1).tolist()
            for (i, sh), row, greedy_tok in zip(step, last_rows, best):
                s = sh.seq
                s.num_computed_tokens = s.num_tokens
                tok, q = self._pick(logits[row], s, greedy_tok)
                s.token_ids.append(tok)
                out[i][0].append(tok)
                if q is not None:
                    out[i][1].append(q)
        return [(toks, torch.stack(qs) if qs else None) for toks, qs in out]

    def num_params(self) -> int:
        return self.mc.num_params()

