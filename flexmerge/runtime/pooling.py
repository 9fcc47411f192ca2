"""Mean pooling of an encoder's last hidden state: the features external heads and the router read."""

from __future__ import annotations

import torch


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of `hidden` over the non-padding tokens (dim -2): a batch [B, L, H] or one row
    [L, H]. One definition, so that the features the wordnet suite trains its heads on are the
    ones the runtime serves them on."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(-2) / mask.sum(-2).clamp_min(1)
