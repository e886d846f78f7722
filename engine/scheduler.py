"""Continuous batching: each step packs running decodes and (chunks of) prefills under a
token budget, admits waiting sequences with prefix-cache hits, and preempts by recompute
when KV blocks run out. Also hosts the two disaggregation modes: sequences whose KV is
sent from elsewhere (decode pool) and prefill-only sequences (prefill pool)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.block_manager import ROOT_HASH, BlockManager, hash_prefix_blocks
from engine.config import EngineConfig
from engine.sequence import FinishReason, Sequence, SeqStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int    # tokens computed for it this step (1 for a decode)
    # Speculative verify: the chunk is the last token plus this many draft tokens
    # (seq.spec_token_ids), and logits are wanted at every one of its positions.
    num_spec: int = 0

    @property
    def samples(self) -> bool:
        """The step reaches the end of the sequence's tokens, so its last logits are sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens - self.num_spec == self.seq.num_tokens


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager):
        self.cfg, self.blocks = cfg, blocks
        self.bs = blocks.block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.awaiting_kv: dict[str, Sequence] = {}
        self.held: dict[str, Sequence] = {}   # finished prefill-only seqs whose KV is still needed
        # Finished sequences whose blocks a launched, not yet processed step still reads or
        # writes (overlapped scheduling): freed once no such step is left (step_done).
        self.deferred: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue management ------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, seq_id: str) -> Sequence | None:
        for s in self.running:
            if s.seq_id == seq_id:
                return s
        for s in self.waiting:
            if s.seq_id == seq_id:
                return s
        return self.awaiting_kv.get(seq_id) or self.held.get(seq_id)

    def _free_blocks(self, seq: Sequence) -> None:
        self.blocks.release(list(reversed(seq.block_table)))
        seq.block_table = []
        seq.block_hashes = []

    def _free_when_idle(self, seq: Sequence) -> None:
        if seq.in_flight:
            self.deferred.append(seq)
        else:
            self._free_blocks(seq)

    def step_done(self, seqs: list[Sequence]) -> None:
        """A launched step's outputs are processed: free what was waiting only for it."""
        for seq in seqs:
            seq.in_flight -= 1
        if self.deferred:
            waiting = []
            for seq in self.deferred:
                if seq.in_flight:
                    waiting.append(seq)
                else:
                    self._free_blocks(seq)
            self.deferred = waiting

    def release_deferred(self) -> None:
        """The device has finished every launched step (the caller waited): free them all."""
        for seq in self.deferred:
            self._free_blocks(seq)
        self.deferred = []

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Remove from whichever queue holds it; free its blocks unless a prefill-only
        sequence finished normally (its KV must outlive it until released). The blocks
        of a sequence still in a launched step are freed once that step is processed."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq.status == SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.awaiting_kv.pop(seq.seq_id, None)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        if seq.prefill_only and reason != FinishReason.ABORT:
            self.held[seq.seq_id] = seq
        else:
            self.held.pop(seq.seq_id, None)
            self._free_when_idle(seq)

    def release_held(self, seq_id: str) -> bool:
        seq = self.held.pop(seq_id, None)
        if seq is None:
            return False
        self._free_when_idle(seq)
        return True

    # ---- prefix cache -------------------------------------------------------------------------
    def _admit_prefix(self, seq: Sequence) -> int:
        """On first admission: take the longest cached prefix. At least one token is always
        left to compute (its logits give the next token), so a full hit gives back its last
        block rather than writing into a shared one."""
        if not self.cfg.enable_prefix_caching:
            return 0
        hashes = hash_prefix_blocks(seq.token_ids, self.bs, seq.cache_salt)
        hits = self.blocks.match_prefix(hashes)
        if hits and len(hits) * self.bs >= seq.num_tokens:
            hits = hits[:-1]
        self.blocks.acquire(hits)
        seq.block_table = list(hits)
        seq.block_hashes = hashes[:len(hits)]
        seq.num_computed_tokens = len(hits) * self.bs
        return len(hits)

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Register blocks that became full of computed tokens with the prefix cache."""
        if not self.cfg.enable_prefix_caching:
            return
        n_full = seq.num_computed_tokens // self.bs
        start = len(seq.block_hashes)
        if n_full <= start:
            return
        parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
        new = hash_prefix_blocks(seq.token_ids[:n_full * self.bs], self.bs, seq.cache_salt,
                                 start=start, parent=parent)
        for i, h in enumerate(new):
            self.blocks.register(seq.block_table[start + i], h, None if parent == ROOT_HASH else parent)
            parent = h
        seq.block_hashes.extend(new)

    # ---- block growth and preemption ------------------------------------------------------------
    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.blocks.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        new = self.blocks.allocate(need)
        if new is None:
            return False
        seq.block_table.extend(new)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop its KV; it re-queues at the front (behind landed
        remote prefills) and will re-prefill prompt + generated tokens (much of it likely
        from the prefix cache)."""
        self.running.remove(seq)
        self._free_blocks(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._requeue(seq)

    def _requeue(self, seq: Sequence) -> None:
        """Back to the head of the queue, behind the landed remote prefills waiting there
        for a slot: they hold their KV and need one token each to run, so nothing that has
        to be recomputed may stand in front of them."""
        at = 0
        while at < len(self.waiting) and self.waiting[at].block_table:
            at += 1
        self.waiting.insert(at, seq)

    # ---- the step -----------------------------------------------------------------------------
    def schedule(self) -> list[ScheduledSeq]:
        budget = self.cfg.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.finishing:   # overlapped: its last token is being sampled; it runs no more
                i += 1
                continue
            if seq.spec_token_ids:
                # A verify chunk only if it fits whole, in budget and in free blocks:
                # speculation never preempts anyone. Otherwise a plain decode.
                k = len(seq.spec_token_ids)
                need = self.blocks.blocks_for(seq.num_tokens + k) - len(seq.block_table)
                spare = self.blocks.num_free_blocks - (len(self.running) - i - 1)  # a block per later decode
                if 1 + k <= budget and seq.num_computed_tokens + 1 == seq.num_tokens and \
                        need <= max(spare, 0) and self._grow(seq, seq.num_tokens + k):
                    out.append(ScheduledSeq(seq, 1 + k, num_spec=k))
                    budget -= 1 + k
                    i += 1
                    continue
                seq.spec_token_ids = []
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self._grow(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != SeqStatus.RUNNING:
                break
            out.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1

        # Admitting new work right after a preemption would only thrash.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            fresh = not seq.block_table
            if fresh:
                hits = self._admit_prefix(seq)
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = hits * self.bs
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = min(remaining, budget)
            if (n < remaining and not self.cfg.enable_chunked_prefill) or \
                    not self._grow(seq, seq.num_computed_tokens + n):
                if fresh:  # give the prefix hit back; try again next step
                    self._free_blocks(seq)
                    seq.num_computed_tokens = 0
                elif not self.running and not self.deferred:
                    # A landed prompt that cannot get its next block while nothing runs
                    # (and no finished sequence's blocks are about to come back) would wait
                    # for ever, since only running sequences are preempted: it gives its KV
                    # up and is recomputed later, so the others can go on.
                    self.waiting.popleft()
                    self._free_blocks(seq)
                    seq.num_computed_tokens = 0
                    seq.num_preemptions += 1
                    self.num_preemptions += 1
                    self._requeue(seq)
                    continue
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def rollback_spec(self, seq: Sequence, num_valid: int) -> None:
        """After a verify step: only the first `num_valid` tokens have KV worth keeping
        (rejected drafts' slots are garbage). Register the blocks that are full of valid
        tokens, and give back trailing blocks past what the sequence's tokens need, so
        the accounting is as if the rejected tokens had never been scheduled."""
        seq.num_computed_tokens = num_valid
        self.commit_full_blocks(seq)
        keep = max(self.blocks.blocks_for(seq.num_tokens), len(seq.block_hashes))
        if len(seq.block_table) > keep:
            self.blocks.release(list(reversed(seq.block_table[keep:])))
            del seq.block_table[keep:]

    # ---- disaggregation ---------------------------------------------------------------------------
    def reserve_for_remote(self, seq: Sequence) -> bool:
        """Decode pool: reserve blocks for a prompt whose KV a prefill worker will send.
        The cached prefix is reused; the rest of the blocks must be written by the sender."""
        hits = self._admit_prefix(seq)
        seq.num_cached_tokens = hits * self.bs
        if not self._grow(seq, seq.num_tokens):
            self._free_blocks(seq)
            seq.num_computed_tokens = 0
            return False
        seq.status = SeqStatus.WAITING_FOR_KV
        self.awaiting_kv[seq.seq_id] = seq
        return True

    def remote_kv_landed(self, seq_id: str) -> Sequence:
        """All prompt KV is in the reserved blocks: the sequence joins the running batch
        (the caller appends the prefill worker's first token). With max_num_seqs already
        running it waits, KV in place, ahead of the prompts not started yet and behind the
        landed ones before it; a slot admits it as a one-token step (a decode)."""
        seq = self.awaiting_kv.pop(seq_id)
        seq.num_computed_tokens = seq.num_tokens
        self.commit_full_blocks(seq)
        if len(self.running) < self.cfg.max_num_seqs:
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            return seq
        seq.status = SeqStatus.WAITING
        self._requeue(seq)
        return seq

    def remote_kv_failed(self, seq_id: str) -> Sequence:
        """The transfer failed or timed out: drop whatever landed (never registered in the
        prefix cache, so nothing stale is shared) and prefill in place instead."""
        seq = self.awaiting_kv.pop(seq_id)
        self._free_blocks(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        self._requeue(seq)
        return seq
