"""Packed sequences without cross-document attention, through PyTorch's own varlen flash attention.

Packed rows carry `position_ids` that restart at 0 for every document. With `sdpa`, transformers turns them
into a dense block-diagonal mask, which forces the masked (slower) kernel and still computes every
query-key pair of the 2048-token row. Flash attention's varlen entry point computes only inside each
document (sum of l_i^2 instead of S^2), which is the point of packing. `flash_attn` is a separate package
that may be missing; PyTorch >= 2.9 ships the same kernel as `torch.nn.attention.varlen.varlen_attn`.

`register()` adds it to transformers as attn_implementation "tl_varlen" (with no mask to build), and
`VarlenCollator` precomputes the document boundaries once per batch so the 22 layers of a forward pass do
not each rediscover them. Document boundaries are where a position does not follow its predecessor by 1.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

NAME = "tl_varlen"


def torch_varlen_fn() -> Callable | None:
    """torch.nn.attention.varlen.varlen_attn when this torch has it, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def boundaries(position_ids) -> tuple[Any, int]:
    """(cu_seqlens int32 of the flattened batch, longest document) from (B, S) position ids."""
    import torch

    flat = position_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    idx = torch.nonzero(starts, as_tuple=False).reshape(-1)
    total = torch.tensor([flat.numel()], device=flat.device, dtype=idx.dtype)
    cu = torch.cat([idx, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


def _call_kwargs(fn: Callable, n_q: int, n_kv: int, scale: float | None) -> tuple[dict[str, Any], bool]:
    """Keyword arguments for this torch's varlen_attn (its signature changed between releases), and
    whether K/V must be repeated for grouped-query attention because this version cannot do it itself."""
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)  # causal
    else:
        kwargs["is_causal"] = True
    if "scale" in params and scale is not None:
        kwargs["scale"] = scale
    repeat = n_q != n_kv
    if repeat and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
        repeat = False
    return kwargs, repeat


def _reference_varlen(q, k, v, cu, max_len, is_causal=True, scale=None, **_):
    """Per-document SDPA: the same result as varlen flash attention, on any device (CPU tests, fallbacks)."""
    import torch
    import torch.nn.functional as F

    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out


def varlen_attention_forward(module, query, key, value, attention_mask, scaling: float | None = None,
                             dropout: float = 0.0, position_ids=None, cu_seq_lens_q=None, max_length_q=None,
                             **kwargs):
    """transformers attention interface: (B, H, S, D) in, (B, S, H, D) out, attention within documents only."""
    b, h, s, d = query.shape
    n_kv = key.shape[1]
    if cu_seq_lens_q is None:
        if position_ids is None:
            raise ValueError(f"attn_implementation {NAME}: needs position_ids (packed rows) or cu_seq_lens_q")
        cu_seq_lens_q, max_length_q = boundaries(position_ids.expand(b, -1))
    cu = cu_seq_lens_q.to(device=query.device, dtype=torch_int32())
    max_len = int(max_length_q)
    q = query.transpose(1, 2).reshape(b * s, h, d)
    k = key.transpose(1, 2).reshape(b * s, n_kv, d)
    v = value.transpose(1, 2).reshape(b * s, n_kv, d)
    fn = torch_varlen_fn() if query.is_cuda else None
    if fn is None:
        k, v = _repeat(k, v, h // n_kv)
        out = _reference_varlen(q, k, v, cu, max_len, scale=scaling)
    else:
        extra, repeat = _call_kwargs(fn, h, n_kv, scaling)
        if repeat:
            k, v = _repeat(k, v, h // n_kv)
        out = fn(q, k, v, cu, cu, max_len, max_len, **extra)
    return out.reshape(b, s, h, d), None


def _repeat(k, v, n_rep: int):
    if n_rep == 1:
        return k, v
    return k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)


def torch_int32():
    import torch

    return torch.int32


def _no_mask(*args, **kwargs):
    """Mask builder for tl_varlen: nothing to build, the boundaries come from the position ids."""
    return None


def register() -> str:
    """Make attn_implementation="tl_varlen" known to transformers (idempotent). Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, _no_mask)
    return NAME


@dataclass
class VarlenCollator:
    """Wraps a packed-row collator: adds the document boundaries (cu_seq_lens_q/k, max_length_q/k) once per batch."""

    base: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(features)
        if "position_ids" in batch:
            cu, longest = boundaries(batch["position_ids"])
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
            batch["max_length_q"] = batch["max_length_k"] = longest
        return batch
