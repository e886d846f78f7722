"""CUDA graphs for decode steps.

A decode step of a large model is a few hundred small kernel launches (per layer: norms,
projections, rotary, KV write, attention, activation); at small batches the GPU finishes
each faster than Python can launch the next. Capturing the whole forward (and the logits
projection) once per batch bucket and replaying it removes that launch cost.

A graph replays fixed addresses and shapes, so every input lives in a static buffer sized
for the largest bucket, and a step of n sequences runs the graph of the smallest bucket
>= n. The padded entries [n, bucket) are made harmless: slot -1 (the KV write skips it)
and a context length of 0 (attention reads no KV for it and yields zeros); their logits
are computed and ignored.

The graph also takes the greedy argmax of its logits, so an all-greedy step copies back
only the token ids (and launches nothing after the replay).

With overlapped scheduling (engine/overlap.py) a step's input ids may be the previous
step's sampled tokens, still on the device: a per-row source index (-1 = the staged id)
selects them from `prev_tokens` inside the graph, so feeding them costs no host sync and
one device copy.

Graphs are also bucketed by block-table width (CONTEXT_BUCKETS, up to the longest
sequence the engine admits): the decode attention sizes its split-K partitions from the
table's width (it cannot read the context lengths without a host sync), so a table far
wider than the contexts would give long, mostly idle partitions. Columns past a
sequence's length are never read (the kernels mask by context length), so stale entries
there need no clearing.
"""
from __future__ import annotations

import bisect
import logging

import torch

from engine.host_to_device import to_device
from engine.model.llama import ForwardBatch, LlamaForCausalLM

log = logging.getLogger(__name__)

# Block-table widths (in tokens) that get their own graphs, besides the maximum.
CONTEXT_BUCKETS = (1024, 4096)


class DecodeGraphs:
    """Captured decode forwards, one per (batch bucket, table width), sharing one memory pool."""

    def __init__(self, model: LlamaForCausalLM, kv_caches: list, batch_sizes, max_blocks_per_seq: int,
                 device: torch.device, use_graphs: bool = True):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        # use_graphs=False runs the same padded static-buffer forward eagerly: that is how
        # the padding is tested on a CPU (Triton interpreter), where nothing can be captured.
        self.use_graphs = use_graphs
        self.batch_sizes = sorted(set(int(b) for b in batch_sizes))
        self.max_batch = self.batch_sizes[-1]
        self.max_blocks = max_blocks_per_seq
        bs = kv_caches[0][0].shape[1]
        self.widths = sorted({min(-(-t // bs), max_blocks_per_seq) for t in CONTEXT_BUCKETS}
                             | {max_blocks_per_seq})
        B = self.max_batch
        # Every input of a step lives in one int32 buffer, so a step costs one host->device
        # copy (each separate small copy costs ~10 us of host time, and the GPU idles while
        # the host works):
        #   [0:B) input ids | [B:2B) positions | [2B:3B) slots | [3B:4B) context lengths |
        #   [4B:5B) the row of prev_tokens that replaces the input id, or -1 |
        #   [5B:5B + b*w) the block table of the running (b, w) graph, [b, w] row-major.
        # int32 is enough for all of them (token ids < 2^31, slots < blocks * block size)
        # and the kernels widen positions/slots to int64 before any address arithmetic.
        # All tables share one region: only one graph runs at a time, each sees a
        # contiguous [b, w] view (a strided view would make every layer copy it).
        self._meta = 5 * B
        self._size = self._meta + B * self.max_blocks
        self.inputs = torch.zeros(self._size, dtype=torch.int32, device=device)
        # The previous step's sampled tokens (overlapped scheduling), copied here on the device.
        self.prev_tokens = torch.zeros(B, dtype=torch.int32, device=device)
        # Host staging, pinned so the copy is a true async DMA. Two of them, alternated, each
        # with an event: a step may launch without syncing the host (no sampled rows), and
        # the buffer its copy reads must not be rewritten before that copy has run.
        pin = device.type == "cuda"
        self._staging = [torch.zeros(self._size, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._staging_np = [t.numpy() for t in self._staging]
        self._copied = [torch.cuda.Event() if pin else None for _ in range(2)]
        self._turn = 0
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}   # (batch, width) -> graph
        self.logits: dict[tuple[int, int], torch.Tensor] = {}  # each graph's static output [b, V] fp32
        # Each graph's greedy choice [b] (argmax of its logits), computed inside the graph so
        # an all-greedy step reads back only the token ids.
        self.greedy: dict[tuple[int, int], torch.Tensor] = {}
        self.num_replays = 0                         # how many steps ran as a graph (tests, stats)

    def _views(self, b: int, w: int):
        B, x = self.max_batch, self.inputs
        return (x[0:b], x[B:B + b], x[2 * B:2 * B + b], x[3 * B:3 * B + b],
                x[self._meta:self._meta + b * w].view(b, w), x[4 * B:4 * B + b])

    def _batch(self, b: int, w: int) -> ForwardBatch:
        _, positions, slots, context_lens, tables, _ = self._views(b, w)
        return ForwardBatch(positions=positions, slot_mapping=slots,
                            num_decodes=b, decode_block_tables=tables,
                            decode_context_lens=context_lens, prefill_block_tables=None,
                            prefill_query_start_loc=None, prefill_context_lens=None,
                            kv_caches=self.kv_caches, on_layer_done=None)

    def _forward(self, b: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        views = self._views(b, w)
        ids, src = views[0], views[5]
        ids = torch.where(src >= 0, self.prev_tokens.index_select(0, src.clamp(min=0)), ids)
        hidden = self.model(ids, self._batch(b, w))
        logits = self.model.compute_logits(hidden)
        return logits, logits.argmax(dim=-1)

    @torch.inference_mode()
    def capture(self) -> None:
        if not self.use_graphs:
            return
        # Every entry is padding while capturing (slot -1, context 0): the graphs' warm-up
        # forwards touch no KV block.
        B = self.max_batch
        self.inputs.zero_()
        self.inputs[2 * B:3 * B] = -1
        self.inputs[4 * B:5 * B] = -1
        pool = None
        # Largest first: the smaller graphs then fit in the memory the first one reserved.
        for w in reversed(self.widths):
            for b in reversed(self.batch_sizes):
                # Warm-up outside the capture: Triton compiles its kernels for these shapes
                # and cuBLAS picks (and allocates workspace for) its algorithms.
                for _ in range(2):
                    self._forward(b, w)
                torch.cuda.synchronize(self.device)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self.logits[b, w], self.greedy[b, w] = self._forward(b, w)
                pool = g.pool() if pool is None else pool
                self.graphs[b, w] = g
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s x table widths %s",
                 self.batch_sizes, self.widths)

    def bucket_for(self, n: int) -> int | None:
        i = bisect.bisect_left(self.batch_sizes, n)
        return self.batch_sizes[i] if i < len(self.batch_sizes) else None

    def width_for(self, blocks: int) -> int:
        return self.widths[bisect.bisect_left(self.widths, blocks)]

    def can_run(self, n: int, widest_table: int) -> bool:
        return 0 < n <= self.max_batch and widest_table <= self.max_blocks

    def _stage(self, b: int, w: int, input_ids, positions, slots, block_tables, context_lens, sources) -> int:
        """Fill a host staging buffer for a (b, w) step; returns its length in entries."""
        turn = self._turn
        self._turn ^= 1
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # its previous copy has been consumed
        buf, n, B = self._staging_np[turn], len(input_ids), self.max_batch
        meta = buf[:5 * B].reshape(5, B)
        meta[0, :n], meta[1, :n], meta[2, :n], meta[3, :n] = input_ids, positions, slots, context_lens
        meta[4, :n] = -1 if sources is None else sources
        # The padded rows [n, b) are rewritten every step (a bigger batch may have used them):
        # slot -1 (the KV write skips it) and context 0 (attention reads nothing).
        meta[:, n:b] = 0
        meta[2, n:b] = -1
        meta[4, n:b] = -1
        # Table entries past a sequence's length are never read (the kernels mask by context
        # length), so stale values there need no clearing.
        tables = buf[self._meta:self._meta + b * w].reshape(b, w)
        for row, t in zip(tables, block_tables):
            row[:len(t)] = t
        return turn

    def run(self, input_ids: list[int], positions: list[int], slots: list[int],
            block_tables: list[list[int]], context_lens: list[int], sources: list[int] | None = None,
            prev_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of n = len(input_ids) sequences. Returns (logits [n, V] fp32,
        greedy token ids [n] int64): views of the graph's static outputs, valid until the
        next replay. sources[i] >= 0 takes row i's input id from prev_tokens[sources[i]]
        (a device tensor, e.g. the previous step's sampled tokens) instead of input_ids[i]."""
        n = len(input_ids)
        b = self.bucket_for(n)
        w = self.width_for(max(len(t) for t in block_tables))
        if sources is not None:
            if len(prev_tokens) > self.max_batch:
                # The previous step sampled more rows than a graph holds (an eager step past
                # the largest bucket): keep only the rows this step reads.
                rows = sorted({r for r in sources if r >= 0})
                prev_tokens = prev_tokens[to_device(rows, prev_tokens.device)]
                where = {r: i for i, r in enumerate(rows)}
                sources = [where[r] if r >= 0 else -1 for r in sources]
            # Queued before the replay, so it reads prev_tokens before this step's graph
            # overwrites any static output it may be a view of.
            self.prev_tokens[:len(prev_tokens)].copy_(prev_tokens)
        turn = self._stage(b, w, input_ids, positions, slots, block_tables, context_lens, sources)
        # Only the meta rows and this step's [b, w] table travel.
        upto = self._meta + b * w
        self.inputs[:upto].copy_(self._staging[turn][:upto], non_blocking=True)
        if self._copied[turn] is not None:
            self._copied[turn].record()
        if self.use_graphs:
            self.graphs[b, w].replay()
        else:
            self.logits[b, w], self.greedy[b, w] = self._forward(b, w)
        self.num_replays += 1
        return self.logits[b, w][:n], self.greedy[b, w][:n]
