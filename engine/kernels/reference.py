"""Plain-torch reference implementations of every kernel the model uses.

These run on any device (the CPU path in CI uses them) and are the oracle the Triton
kernels are tested against. Shapes, with T = tokens in the step, H = query heads,
KH = KV heads, D = head dim, NB = KV blocks, BS = block size:

  k_cache, v_cache : [NB, BS, KH, D]        one pair per layer
  slot_mapping     : [T] int64               block_id * BS + offset; -1 = do not write
  block_tables     : [S, max_blocks] int32   padded with 0 (masked by context_lens)
  context_lens     : [S] int32               tokens of context each sequence attends to,
                                             including the ones computed in this step
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias, weight [out_features, in_features] as in nn.Linear."""
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 as HF does, then cast back before scaling by the weight.
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """residual += x; return (rms_norm(residual), residual). The fused pre-norm of a block."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2*I] holding [gate | up] -> silu(gate) * up, [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's pre-norm and the projection that reads it: residual (x when None, else
    x + residual) is normalised and multiplied by weight [out, in]. Returns (the product,
    the new residual). A backend may fuse the norm into the matrix-vector product."""
    if residual is None:
        return linear(rms_norm(x, norm_weight, eps), weight), x
    h, residual = add_rms_norm(x, residual, norm_weight, eps)
    return linear(h, weight), residual


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """linear(silu_and_mul(x), weight): the MLP's down projection and the activation it reads."""
    return linear(silu_and_mul(x), weight)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) rotary embedding as in HF Llama.

    q: [T, H, D], k: [T, KH, D], positions: [T] int64,
    cos_sin_cache: [max_pos, D] fp32 holding [cos(D/2) | sin(D/2)] per position.
    Returns new tensors (inputs are not modified).
    """
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [T, D/2] each
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V ([T, KH, D]) into the paged cache at slot_mapping (in place)."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    kh, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def rotary_embedding_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                              cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor) -> torch.Tensor:
    """rotary_embedding, then write_kv of the rotated K and of V; returns the rotated q.
    One op so a backend can fuse the two (the GPU decode step is launch-bound there)."""
    q, k = rotary_embedding(q, k, positions, cos_sin_cache)
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, n: int) -> torch.Tensor:
    """Contiguous [n, KH, D] view of one sequence's first n cached tokens."""
    bs = cache.shape[1]
    nblocks = (n + bs - 1) // bs
    # index_select copies whole rows; advanced indexing (cache[ids]) is several times slower on CPU.
    return cache.index_select(0, block_table[:nblocks].long()).flatten(0, 1)[:n]


def _decode_padded(q, k_cache, v_cache, block_tables, context_lens, scale):
    S, H, D = q.shape
    bs, KH = k_cache.shape[1], k_cache.shape[2]
    max_len = int(context_lens.max())
    nblocks = (max_len + bs - 1) // bs
    ids = block_tables[:, :nblocks].reshape(-1).long()
    k = k_cache.index_select(0, ids).view(S, nblocks * bs, KH, D)[:, :max_len]  # [S, L, KH, D]
    v = v_cache.index_select(0, ids).view(S, nblocks * bs, KH, D)[:, :max_len]
    valid = torch.arange(max_len, device=q.device)[None, :] < context_lens[:, None].to(q.device)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2),                       # [S, H, 1, D]
        k.transpose(1, 2).to(q.dtype),        # [S, KH, L, D]
        v.transpose(1, 2).to(q.dtype),
        attn_mask=valid[:, None, None, :],
        scale=scale, enable_gqa=(H != KH))
    return out.squeeze(2)


DECODE_GROUP = 8


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """One query token per sequence. q: [S, H, D] -> [S, H, D].

    The query is the last of each sequence's context_lens[s] tokens and sees all of them.
    Sequences are gathered into a padded batch; to keep the padding (and the gathered
    copy) small, they are sorted by length and processed in groups of similar length.
    """
    S = q.shape[0]
    if S <= DECODE_GROUP:
        return _decode_padded(q, k_cache, v_cache, block_tables, context_lens, scale)
    order = torch.argsort(context_lens)
    out = torch.empty_like(q)
    for i in range(0, S, DECODE_GROUP):
        idx = order[i:i + DECODE_GROUP]
        out[idx] = _decode_padded(q[idx], k_cache, v_cache, block_tables[idx], context_lens[idx], scale)
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new query tokens over its whole paged context.

    q: [T, H, D] with sequence s owning rows query_start_loc[s]:query_start_loc[s+1]; those
    rows are the *last* q_len of its context_lens[s] tokens (a chunk after a cached or
    already-computed prefix). The cache must already hold this step's K/V.
    """
    out = torch.empty_like(q)
    H, KH = q.shape[1], k_cache.shape[2]
    qsl = query_start_loc.tolist()
    lens = context_lens.tolist()
    for s in range(len(lens)):
        start, end, n = qsl[s], qsl[s + 1], lens[s]
        q_len = end - start
        if q_len == 0:
            continue
        k = _gather_context(k_cache, block_tables[s], n).transpose(0, 1).to(q.dtype)  # [KH, n, D]
        v = _gather_context(v_cache, block_tables[s], n).transpose(0, 1).to(q.dtype)
        qs = q[start:end].transpose(0, 1)  # [H, q_len, D]
        if q_len == n:
            mask, causal = None, True
        else:
            # Query i sits at absolute position n - q_len + i and sees keys 0..that position.
            qpos = torch.arange(n - q_len, n, device=q.device)
            mask, causal = torch.arange(n, device=q.device)[None, :] <= qpos[:, None], False
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, is_causal=causal,
                                           scale=scale, enable_gqa=(H != KH))
        out[start:end] = o.transpose(0, 1)
    return out


def causal_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int],
                             scale: float) -> torch.Tensor:
    """Causal attention of chunks that start their sequences (nothing cached before them),
    over their own K/V: q [T, H, D], k/v [T, KH, D] (rotary applied), sequence s owning the
    next seq_lens[s] rows. No paged cache is read, so a dense kernel serves it (on CUDA,
    torch's fused SDPA); equal to paged_prefill_attention over a cache holding these K/V.
    seq_lens is host data: slicing by it launches nothing and waits for nothing."""
    group = q.shape[1] // k.shape[1]

    def one(qs, ks, vs):   # [n, heads, D] -> [1, heads, n, D]: the fused kernels take 4-D only
        if qs.shape[0] == 1:   # one key: the softmax is 1 (and fused kernels refuse a length of 1)
            return vs.repeat_interleave(group, dim=1).to(qs.dtype)
        o = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                           vs.transpose(0, 1)[None], is_causal=True, scale=scale,
                                           enable_gqa=group > 1)
        return o[0].transpose(0, 1)
    if len(seq_lens) == 1:
        return one(q, k, v)
    out = torch.empty_like(q)
    start = 0
    for n in seq_lens:
        end = start + n
        if n:
            out[start:end] = one(q[start:end], k[start:end], v[start:end])
        start = end
    return out
