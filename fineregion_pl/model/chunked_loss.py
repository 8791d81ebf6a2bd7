"""Token losses from hidden states, the LM head applied in chunks: no ``(tokens, vocab)`` tensor.

The full path (``model(...).logits`` then ``log_softmax``) materialises the logits of every
position, padding and prompts included, and their float32 log-softmax. Here the head runs only on
the positions a loss reads, ``chunk`` rows at a time, each chunk recomputed in backward
(``torch.utils.checkpoint``), so at most one chunk's logits are alive. Liger's fused linear
cross-entropy is used instead when it is importable and the tensors are on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 1024


def _chunk_nll(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def _liger_nll(hidden: Tensor, head: nn.Linear, targets: Tensor) -> Tensor | None:
    if not hidden.is_cuda:
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy(hidden, head.weight, targets, head.bias, reduction="none")


def token_nll(hidden: Tensor, head: nn.Module, targets: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Negative log-likelihood of each target token, ``-log softmax(head(hidden))[target]``: ``(P,)`` float32.

    Args:
        hidden: ``(P, d)`` the last hidden states of the positions that predict ``targets``.
        head: the LM head (an ``nn.Linear``, tied or not).
        targets: ``(P,)`` token ids.
        chunk: rows of logits computed at once.
    """
    fused = _liger_nll(hidden, head, targets) if isinstance(head, nn.Linear) else None
    if fused is not None:
        return fused.float()
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        # the head module itself is called (its hooks gather sharded weights), again in backward
        parts.append(checkpoint(_chunk_nll, head, h, t, use_reentrant=False) if grad else _chunk_nll(head, h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
