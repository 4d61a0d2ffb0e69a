"""From the language model's hidden states to a similarity logit: the embedder's pure math.

Pooling masks and pooling (mean over non-pad tokens minus the instruction span, or the hidden state
before ``<emb>``) and the learnable temperature. No model, no tokenizer: tests check every function
by hand.
"""

from __future__ import annotations

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# Pure pooling / mask functions
# ---------------------------------------------------------------------------------------------


def instruction_span_mask(input_ids: torch.Tensor, start_id: int, end_id: int) -> torch.Tensor:
    """Bool mask (B, L) of every token from ``<instruction_start>`` to ``<instruction_end>``, both included.

    Same cumulative-sum construction as the released ``get_instruction_mask``: a token is inside a
    span when more starts than ends have been seen up to it, or it is an end marker itself. A start
    without an end masks to the end of the sequence; rows without markers are all False.
    """
    is_start = (input_ids == start_id).long()
    is_end = (input_ids == end_id).long()
    depth = is_start.cumsum(-1) - is_end.cumsum(-1) + is_end
    return depth > 0


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, L, H) over positions where ``mask`` (B, L) is nonzero, in float32."""
    m = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.to(torch.float32) * m).sum(1) / m.sum(1).clamp(min=1e-7)


def last_before_token(hidden: torch.Tensor, input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Hidden state just before the first ``token_id`` (``<emb>``) of every row, in float32."""
    hit = input_ids == token_id
    if not bool(hit.any(-1).all()):
        raise ValueError(f"token id {token_id} is missing from some rows; cannot pool 'last'")
    pos = hit.int().argmax(-1)
    if bool((pos == 0).any()):
        raise ValueError(f"token id {token_id} is the first token of a row; nothing precedes it")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos - 1].to(torch.float32)


def pooling_mask(
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    start_id: int | None,
    end_id: int | None,
    mask_instruction: bool,
) -> torch.Tensor:
    """Tokens that enter the mean: non-pad tokens, minus the instruction span when requested."""
    keep = attention_mask.bool()
    if mask_instruction and start_id is not None and end_id is not None:
        keep = keep & ~instruction_span_mask(input_ids, start_id, end_id)
    return keep


# ---------------------------------------------------------------------------------------------
# Temperature
# ---------------------------------------------------------------------------------------------


class Temperature(nn.Module):
    """Raw learnable temperature: ``logits = cos / tau`` (U-MARVEL ``Similarity``; init 0.05, no clamp).

    ``min_value`` (default ``None``) optionally clamps tau from below in the forward; off to match the
    released code.
    """

    def __init__(
        self, init: float = 0.05, *, trainable: bool = True, min_value: float | None = None
    ):
        super().__init__()
        self.tau = nn.Parameter(
            torch.tensor(float(init), dtype=torch.float32), requires_grad=trainable
        )
        self.min_value = min_value

    def forward(self, cos: torch.Tensor) -> torch.Tensor:
        """``cos / tau`` in float32 (a bf16 tau would round 0.05 to 0.0500488)."""
        tau = self.tau if self.min_value is None else self.tau.clamp(min=self.min_value)
        return cos.to(torch.float32) / tau

    @property
    def value(self) -> float:
        return float(self.tau.detach().cpu())

    def extra_repr(self) -> str:
        return (
            f"tau={self.value:.6g}, trainable={self.tau.requires_grad}, min_value={self.min_value}"
        )
