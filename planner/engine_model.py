"""One engine's scheduling, on counts instead of tensors: the simulator's model of
engine/scheduler.py.

`EngineModel.schedule` follows `Scheduler.schedule` rule for rule (running sequences first,
in order, under the max_num_batched_tokens budget; recompute preemption of the last running
sequence when blocks run out; no admission in a step that preempted; admission in arrival
order while len(running) < max_num_seqs, chunked prefill, prefix-cache hits taken at first
admission with at least one token left to compute; a preempted sequence re-queues at the
head behind landed remote prefills, which wait there for a slot while max_num_seqs run and
give their KV up when they cannot get a block while nothing runs), and `reserve_for_remote`
/ `remote_kv_landed` follow the scheduler's disaggregation entry points. (Deferred frees of
overlapped scheduling are not modelled: the model's blocks come back when a step ends.) It is a copy, not an
import: importing anything of engine/ loads torch and the model code (engine/__init__.py),
and the scheduler works on Sequence objects with token ids and block tables. Instead
tests/test_planner_sim.py runs this model and the real Scheduler side by side on the same
requests and checks that they schedule the same tokens step by step.

Not modelled: speculative decoding, stop strings / EOS (every request runs to its
max_tokens, as bench's requests do with ignore_eos), max_model_len. Overlapped scheduling
changes when tokens leave, not what is scheduled: planner/simulator.py times it.

KV blocks: block tables are counts. A shared prefix (Request.prefix_key) is one prefix-cache
entry per engine holding its leading full blocks, counted once however many sequences use
it; while no running sequence uses it, its blocks are evictable (free, taken last, least
recently used entry first), as the block manager's are. A preempted sequence's own full
blocks stay cached the same way (an entry of its own, found again when it is re-admitted
unless evicted meanwhile). Other full blocks are not tracked as cached: no other request
could hit them (prompts share nothing but their prefix), so they count as free.
"""
from __future__ import annotations

from collections import deque

WAITING, RUNNING, AWAITING_KV, FINISHED = "waiting", "running", "awaiting_kv", "finished"


class SimSeq:
    __slots__ = ("rid", "prompt", "max_tokens", "num_tokens", "computed", "cached", "status", "table",
                 "entry_blocks", "entry", "prefill_only", "prefix_key", "prefix_blocks", "fixed_hit_blocks",
                 "preemptions", "arrival")

    def __init__(self, rid, prompt: int, max_tokens: int, *, prefill_only: bool = False, prefix_key=None,
                 prefix_blocks: int = 0, fixed_hit_blocks: int = 0):
        self.rid, self.prompt, self.max_tokens = rid, prompt, max_tokens
        self.num_tokens = prompt          # prompt + generated
        self.computed = 0                 # tokens whose KV is in the cache
        self.cached = 0                   # prompt tokens served by the prefix cache (first admission)
        self.status = WAITING
        self.table = 0                    # blocks in its block table
        self.entry_blocks = 0             # of those, blocks counted in its prefix entry, not as its own
        self.entry = None                 # the prefix entry it holds a reference to
        self.prefill_only = prefill_only
        self.prefix_key, self.prefix_blocks = prefix_key, prefix_blocks
        self.fixed_hit_blocks = fixed_hit_blocks   # a trace's known hit (no entry: its blocks are free)
        self.preemptions = 0
        self.arrival = 0

    @property
    def outputs(self) -> int:
        return self.num_tokens - self.prompt


class _Entry:
    __slots__ = ("key", "resident", "refs", "last_use", "start")

    def __init__(self, key, start: int = 0):
        self.key, self.resident, self.refs, self.last_use = key, 0, 0, 0
        self.start = start                # index of its first block in the prompt


class EngineModel:
    """Queues and block counts of one engine (decode worker, colocated engine or prefill
    worker). The caller runs steps: `schedule()`, then `step_done(scheduled)` when its
    time has passed."""

    def __init__(self, *, block_size: int, max_num_batched_tokens: int, max_num_seqs: int, num_kv_blocks: int,
                 enable_chunked_prefill: bool = True, enable_prefix_caching: bool = True):
        self.bs, self.budget, self.max_num_seqs = block_size, max_num_batched_tokens, max_num_seqs
        self.num_blocks = num_kv_blocks
        self.chunked, self.prefix_caching = enable_chunked_prefill, enable_prefix_caching
        self.waiting: deque[SimSeq] = deque()
        self.running: list[SimSeq] = []
        self.awaiting_kv: dict[object, SimSeq] = {}
        self.own_used = 0                 # blocks owned by sequences (not prefix entries)
        self.pinned = 0                   # blocks of prefix entries some sequence references
        self.entries: dict[object, _Entry] = {}
        self.num_preemptions = 0
        self._tick = 0
        self._arrivals = 0

    # ---- blocks ---------------------------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.bs)

    @property
    def num_free_blocks(self) -> int:
        """Free + evictable, as BlockManager.num_free_blocks."""
        return self.num_blocks - self.own_used - self.pinned

    def _allocate(self, n: int) -> bool:
        if n > self.num_free_blocks:
            return False
        short = n - (self.num_free_blocks - self._evictable())
        if short > 0:       # take evictable prefix blocks, least recently used entry first
            for e in sorted((e for e in self.entries.values() if e.refs == 0), key=lambda e: e.last_use):
                take = min(short, e.resident)
                e.resident -= take
                short -= take
                if e.resident == 0:
                    del self.entries[e.key]
                if short <= 0:
                    break
        self.own_used += n
        return True

    def _evictable(self) -> int:
        return sum(e.resident for e in self.entries.values() if e.refs == 0)

    def _grow(self, seq: SimSeq, tokens: int) -> bool:
        need = self.blocks_for(tokens) - seq.table
        if need <= 0:
            return True
        if not self._allocate(need):
            return False
        seq.table += need
        return True

    def _ref(self, seq: SimSeq, e: _Entry) -> None:
        if seq.entry is None:
            if e.refs == 0:
                self.pinned += e.resident
            e.refs += 1
            seq.entry = e

    def _free_blocks(self, seq: SimSeq, comes_back: bool = False) -> None:
        """Release its blocks. Those of a sequence that comes back (preempted, or an
        admission given up) keep their cached copy, evictable, as released blocks with a
        hash do in the block manager."""
        own = seq.table - seq.entry_blocks
        self.own_used -= own
        kept = min(seq.computed // self.bs - seq.entry_blocks, own) if self.prefix_caching and comes_back else 0
        if kept > 0:
            e = self.entries[("self", seq.rid)] = _Entry(("self", seq.rid), start=seq.entry_blocks)
            e.resident = kept
            self._tick += 1
            e.last_use = self._tick
        e = seq.entry
        if e is not None:
            e.refs -= 1
            self._tick += 1
            e.last_use = self._tick
            if e.refs == 0:
                self.pinned -= e.resident
        seq.table = seq.entry_blocks = 0
        seq.entry = None

    def _admit_prefix(self, seq: SimSeq) -> int:
        """Scheduler._admit_prefix: the cached leading blocks, at least one token left."""
        if not self.prefix_caching:
            return 0
        e = self.entries.get(seq.prefix_key) if seq.prefix_key is not None else None
        shared = max(min(e.resident, seq.prefix_blocks) if e is not None else 0, seq.fixed_hit_blocks)
        own = self.entries.get(("self", seq.rid))
        hits = shared
        if own is not None and shared >= own.start:      # its own blocks continue the chain
            hits = own.start + own.resident
        if hits and hits * self.bs >= seq.num_tokens:
            hits -= 1
        shared = min(shared, hits)
        if shared and e is not None and seq.fixed_hit_blocks < shared:
            self._ref(seq, e)
            seq.entry_blocks = shared
        elif shared:
            # A trace's known hit has no entry: its blocks are this sequence's own while it
            # holds them (taken from the free, evictable ones), as _free_blocks gives back.
            self.own_used += shared
        if own is not None:
            del self.entries[own.key]
            # Its own cached blocks are its own again (they were counted free, evictable);
            # those the chain does not reach, or left for the last token, are just free.
            self.own_used += max(0, hits - max(shared, own.start))
        seq.table = hits
        seq.computed = hits * self.bs
        return hits

    def _commit(self, seq: SimSeq) -> None:
        """Scheduler.commit_full_blocks, for the shared prefix: blocks of it this sequence
        computed and nobody cached yet join the entry (counted there from now on)."""
        if not self.prefix_caching or seq.prefix_key is None:
            return
        full = min(seq.computed // self.bs, seq.prefix_blocks)
        e = self.entries.get(seq.prefix_key)
        if e is None:
            if full == 0:
                return
            e = self.entries[seq.prefix_key] = _Entry(seq.prefix_key)
            self._tick += 1
            e.last_use = self._tick
        if full <= e.resident:
            return
        if seq.entry is not None and seq.entry is not e:
            return
        # Its blocks e.resident..full-1 now hold the cached copy (register() keeps the
        # first registrant's; this sequence's earlier ones stay private).
        gain = full - e.resident
        self._ref(seq, e)
        e.resident = full
        self.pinned += gain
        self.own_used -= gain
        seq.entry_blocks += gain

    # ---- queues -----------------------------------------------------------------------------------
    def add(self, seq: SimSeq) -> None:
        seq.arrival = self._arrivals
        self._arrivals += 1
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: SimSeq) -> None:
        self.running.remove(seq)
        self._free_blocks(seq, comes_back=True)
        seq.computed = 0
        seq.status = WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        self._requeue(seq)

    def _requeue(self, seq: SimSeq) -> None:
        """Scheduler._requeue: the head of the queue, behind the landed prompts there."""
        at = 0
        while at < len(self.waiting) and self.waiting[at].table:
            at += 1
        self.waiting.insert(at, seq)

    def finish(self, seq: SimSeq) -> None:
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING:
            self.waiting.remove(seq)
        self.awaiting_kv.pop(seq.rid, None)
        seq.status = FINISHED
        # (A prefill worker holds a finished prompt's blocks only until the end of the step
        # that finished it: their KV has been handed to the sender by then.)
        self._free_blocks(seq)

    # ---- the step ---------------------------------------------------------------------------------
    def schedule(self) -> list[tuple[SimSeq, int]]:
        """Scheduler.schedule: [(sequence, tokens computed for it this step)]."""
        budget = self.budget
        out: list[tuple[SimSeq, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.computed, budget)
            while not self._grow(seq, seq.computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != RUNNING:
                break
            out.append((seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            fresh = seq.table == 0
            if fresh:
                hits = self._admit_prefix(seq)
                if seq.preemptions == 0:
                    seq.cached = hits * self.bs
            remaining = seq.num_tokens - seq.computed
            n = min(remaining, budget)
            if (n < remaining and not self.chunked) or not self._grow(seq, seq.computed + n):
                if fresh:
                    self._free_blocks(seq, comes_back=True)
                    seq.computed = 0
                elif not self.running:   # a landed prompt gives its KV up (Scheduler.schedule)
                    self.waiting.popleft()
                    self._free_blocks(seq, comes_back=True)
                    seq.computed = 0
                    seq.preemptions += 1
                    self.num_preemptions += 1
                    self._requeue(seq)
                    continue
                break
            self.waiting.popleft()
            seq.status = RUNNING
            self.running.append(seq)
            out.append((seq, n))
            budget -= n
        return out

    @staticmethod
    def step_shape(scheduled: list[tuple[SimSeq, int]]) -> tuple[list[tuple[int, int]], list[int]]:
        """What the cost model prices: prefill chunks as (new tokens, tokens already in the
        cache) and one context length (after the step) per decoding sequence."""
        chunks, contexts = [], []
        for seq, n in scheduled:
            if n == 1 and seq.outputs > 0 and seq.computed == seq.num_tokens - 1:
                contexts.append(seq.num_tokens)
            else:
                chunks.append((n, seq.computed))
        return chunks, contexts

    def step_done(self, scheduled: list[tuple[SimSeq, int]]) -> tuple[list[SimSeq], list[SimSeq]]:
        """The step's results: (sequences that got a token, those of them that finished)."""
        sampled, finished = [], []
        for seq, n in scheduled:
            samples = seq.computed + n == seq.num_tokens
            seq.computed += n
            self._commit(seq)
            if samples:
                sampled.append(seq)
        for seq in sampled:
            seq.num_tokens += 1
            if seq.prefill_only or seq.outputs >= seq.max_tokens:
                self.finish(seq)
                finished.append(seq)
        return sampled, finished

    # ---- disaggregation ---------------------------------------------------------------------------
    def reserve_for_remote(self, seq: SimSeq) -> bool:
        """Scheduler.reserve_for_remote: the cached prefix is reused, blocks for the rest
        reserved; False (nothing held) when they are not free."""
        seq.arrival = self._arrivals
        self._arrivals += 1
        hits = self._admit_prefix(seq)
        seq.cached = hits * self.bs
        if not self._grow(seq, seq.num_tokens):
            self._free_blocks(seq)
            seq.computed = 0
            return False
        seq.status = AWAITING_KV
        self.awaiting_kv[seq.rid] = seq
        return True

    def remote_kv_landed(self, rid) -> SimSeq:
        """The prompt's KV is in: the sequence joins the running batch with the prefill
        worker's first token, or with max_num_seqs running waits, KV in place, behind the
        landed ones before it and ahead of the prompts not started."""
        seq = self.awaiting_kv.pop(rid)
        seq.computed = seq.num_tokens
        self._commit(seq)
        if len(self.running) < self.max_num_seqs:
            seq.status = RUNNING
            self.running.append(seq)
        else:
            seq.status = WAITING
            self._requeue(seq)
        seq.num_tokens += 1
        if seq.outputs >= seq.max_tokens:
            self.finish(seq)
        return seq

    def check(self) -> None:
        """Accounting invariants (tests)."""
        own = sum(s.table - s.entry_blocks for s in self.running) + \
            sum(s.table - s.entry_blocks for s in self.awaiting_kv.values()) + \
            sum(s.table - s.entry_blocks for s in self.waiting)
        assert own == self.own_used, (own, self.own_used)
        assert self.pinned == sum(e.resident for e in self.entries.values() if e.refs), self.pinned
        assert 0 <= self.own_used + self.pinned <= self.num_blocks
