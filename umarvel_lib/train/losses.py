"""Contrastive and distillation losses, as pure functions on embeddings/scores plus thin modules.

The math follows the official U-MARVEL code (docs/recipe.md "Loss and temperature", "Stages"):

* **InfoNCE** on ``cos / τ`` (``scale = 1/τ`` in sentence-transformers' terms). ``τ`` is a *raw*
  scalar tensor: no clamp, no log-parameterisation. Labels are the diagonal, so every other
  positive of the (global) batch is a negative.
* **Symmetric** (CC3M stage): the candidate→query term is **added** to the query→candidate term
  (sum, not mean), as in ``qwen2_vl_finetune.py``.
* **Hard negatives** (HN stage): ``K`` mined negatives per query are appended to *every* query's
  logits, so query ``i`` sees all ``B`` positives and all ``B·K`` hard negatives of the batch:
  logits are ``B × B(1+K)``. Column blocks are ordered as in the official code:
  ``[c_1..c_B | hn_{1,1}..hn_{B,1} | ... | hn_{1,K}..hn_{B,K}]``.
* **Hard negatives only** (Table 5 "failed" row, ``ignore_batch_other_samples=True``): query ``i``
  sees only ``[c_i, hn_{i,1..K}]``, label 0.
* **Distillation** (stage 5): ``KL(softmax(teacher/τ.detach()) ‖ softmax(cos/τ))``, batchmean, over
  each query's own candidate list; no in-batch negatives. The teacher is
  ``(cos + w·P(Yes)) / 2`` (:func:`umarvel_lib.models.reranker.fused_teacher`).

Inputs to every function are assumed already L2-normalised (the embedder normalises).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "info_nce_logits",
    "info_nce",
    "gather_with_grad",
    "distill_kl",
    "InfoNCELoss",
    "DistillKLLoss",
]


# --------------------------------------------------------------------------------------------
# InfoNCE
# --------------------------------------------------------------------------------------------
def info_nce_logits(
    q: torch.Tensor,
    c: torch.Tensor,
    tau: torch.Tensor | float,
    *,
    hard_negatives: torch.Tensor | None = None,
    hard_negatives_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query→candidate logits and labels for :func:`info_nce`.

    Args:
        q: ``(B, D)`` query embeddings.
        c: ``(B, D)`` positive candidate embeddings (row ``i`` is the positive of query ``i``).
        tau: raw temperature (scalar tensor or float); logits are ``(q·c)/τ``.
        hard_negatives: optional ``(B, K, D)`` mined negatives.
        hard_negatives_only: if True each query sees only ``[c_i, hn_i]`` (label 0).

    Returns:
        ``(logits, labels)``: logits ``(B, B)``, ``(B, B(1+K))`` or ``(B, 1+K)``; labels ``(B,)``.
    """
    if q.ndim != 2 or c.ndim != 2 or q.shape != c.shape:
        raise ValueError(
            f"q and c must both be (B, D) with the same shape, got {tuple(q.shape)} and {tuple(c.shape)}"
        )
    B = q.shape[0]
    if hard_negatives is not None:
        if (
            hard_negatives.ndim != 3
            or hard_negatives.shape[0] != B
            or hard_negatives.shape[2] != q.shape[1]
        ):
            raise ValueError(
                f"hard_negatives must be (B={B}, K, D={q.shape[1]}), got {tuple(hard_negatives.shape)}"
            )
    if hard_negatives_only:
        if hard_negatives is None:
            raise ValueError("hard_negatives_only=True needs hard_negatives")
        cands = torch.cat([c.unsqueeze(1), hard_negatives], dim=1)  # (B, 1+K, D)
        logits = torch.einsum("bd,bkd->bk", q, cands) / tau
        labels = torch.zeros(B, dtype=torch.long, device=q.device)
        return logits, labels
    if hard_negatives is not None:
        K = hard_negatives.shape[1]
        # (B, K, D) -> (K, B, D) -> (K*B, D): block k holds every query's k-th negative (official order)
        hn = hard_negatives.transpose(0, 1).reshape(K * B, -1)
        cands = torch.cat([c, hn], dim=0)
    else:
        cands = c
    logits = q @ cands.T / tau
    labels = torch.arange(B, device=q.device)
    return logits, labels


def info_nce(
    q: torch.Tensor,
    c: torch.Tensor,
    tau: torch.Tensor | float,
    *,
    hard_negatives: torch.Tensor | None = None,
    symmetric: bool = False,
    hard_negatives_only: bool = False,
) -> torch.Tensor:
    """InfoNCE with in-batch negatives on ``cos/τ`` (``scale = 1/τ``), mean over queries.

    ``loss = CE(q @ [c; hn].T / τ, diag)`` (+ ``CE(c @ q.T / τ, diag)`` if ``symmetric``; the
    two directions are **summed**). With ``hard_negatives_only`` each query's logits are
    ``[q_i·c_i, q_i·hn_i1, ..., q_i·hn_iK] / τ`` with label 0.

    The symmetric term is candidate→query over the ``B`` queries only (hard negatives are not
    queries); combining it with ``hard_negatives_only`` is refused.
    """
    if symmetric and hard_negatives_only:
        raise ValueError("symmetric=True is not defined together with hard_negatives_only=True")
    logits, labels = info_nce_logits(
        q, c, tau, hard_negatives=hard_negatives, hard_negatives_only=hard_negatives_only
    )
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = loss + F.cross_entropy(c @ q.T / tau, torch.arange(q.shape[0], device=q.device))
    return loss


# --------------------------------------------------------------------------------------------
# all-gather with the local slice keeping its gradient
# --------------------------------------------------------------------------------------------
def _dist_ready() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` along dim 0 over all ranks; the local slice is the original tensor.

    As in the official code (and open_clip with ``gather_with_grad=False``): the gathered copies
    from other ranks are constants, and this rank's slice is put back so it keeps its gradient.
    Every rank then computes the same global loss; the gradient reaching this rank's parameters
    is the global-loss gradient through *its own* embeddings only, so the **sum** over ranks of
    the parameter gradients equals single-process full-batch training (DDP's *mean* therefore
    gives ``1/world_size`` of it, which is what the official code trains with). A parameter
    used directly in the loss (``τ``) gets the full gradient on every rank.

    Ranks may hold different batch sizes (padded internally). Identity when not distributed.
    """
    if not _dist_ready():
        return x
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    m = max(sizes)
    xd = x.detach()
    if xd.shape[0] < m:
        xd = torch.cat([xd, xd.new_zeros((m - xd.shape[0], *xd.shape[1:]))], dim=0)
    xd = xd.contiguous()
    bufs = [torch.empty_like(xd) for _ in range(world)]
    dist.all_gather(bufs, xd)
    parts = [b[:s] for b, s in zip(bufs, sizes)]
    parts[rank] = x
    return torch.cat(parts, dim=0)


# --------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------
def distill_kl(
    student_cos: torch.Tensor,
    teacher_scores: torch.Tensor,
    tau: torch.Tensor | float,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``KL(softmax(teacher/τ.detach()) ‖ softmax(student_cos/τ))``, batchmean.

    Args:
        student_cos: ``(B, N)`` cosine of each query with its own ``N`` listed candidates.
        teacher_scores: ``(B, N)`` teacher scores, e.g. :func:`fused_teacher` (already halved).
            No gradient flows into the teacher.
        tau: raw shared temperature; detached on the teacher side, live on the student side.
        mask: optional ``(B, N)`` bool, False for padding in shorter candidate lists.

    Returns the sum over the batch of per-query KL divided by ``B`` (``reduction="batchmean"``).
    The official code adds an ``eps`` to the student log-probabilities; that only shifts the loss
    by a constant and is left out here, so the loss is exactly 0 when student equals teacher.
    """
    if student_cos.shape != teacher_scores.shape or student_cos.ndim != 2:
        raise ValueError(
            f"student_cos and teacher_scores must both be (B, N), got {tuple(student_cos.shape)} / {tuple(teacher_scores.shape)}"
        )
    tau_t = tau.detach() if isinstance(tau, torch.Tensor) else tau
    t_logits = teacher_scores.detach() / tau_t
    s_logits = student_cos / tau
    if mask is not None:
        mask = mask.to(torch.bool)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every query needs at least one unmasked candidate")
        neg = torch.finfo(s_logits.dtype).min
        t_logits = t_logits.masked_fill(~mask, neg)
        s_logits = s_logits.masked_fill(~mask, neg)
    log_p_t = F.log_softmax(t_logits, dim=-1)
    log_p_s = F.log_softmax(s_logits, dim=-1)
    p_t = log_p_t.exp()
    terms = p_t * (log_p_t - log_p_s)
    if mask is not None:
        terms = torch.where(mask, terms, torch.zeros_like(terms))
    return terms.sum() / student_cos.shape[0]


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
class InfoNCELoss(nn.Module):
    """Module around :func:`info_nce`: optional all-gather of queries, candidates and hard negatives.

    ``forward(q, c, tau, hard_negatives=None)``; ``tau`` is the embedder's raw temperature
    (``scale = 1/τ``). With ``gather=True`` (the default, as in the official code) every tensor
    goes through :func:`gather_with_grad`, so negatives span the global batch.
    """

    def __init__(
        self, *, symmetric: bool = False, hard_negatives_only: bool = False, gather: bool = True
    ):
        super().__init__()
        if symmetric and hard_negatives_only:
            raise ValueError("symmetric=True is not defined together with hard_negatives_only=True")
        self.symmetric = symmetric
        self.hard_negatives_only = hard_negatives_only
        self.gather = gather

    def forward(self, q, c, tau, hard_negatives=None):
        if self.gather:
            q, c = gather_with_grad(q), gather_with_grad(c)
            if hard_negatives is not None:
                hard_negatives = gather_with_grad(hard_negatives)
        return info_nce(
            q,
            c,
            tau,
            hard_negatives=hard_negatives,
            symmetric=self.symmetric,
            hard_negatives_only=self.hard_negatives_only,
        )

    def extra_repr(self) -> str:
        return f"symmetric={self.symmetric}, hard_negatives_only={self.hard_negatives_only}, gather={self.gather}"


class DistillKLLoss(nn.Module):
    """Module around :func:`distill_kl`; ``forward(student_cos, teacher_scores, tau, mask=None)``."""

    def forward(self, student_cos, teacher_scores, tau, mask=None):
        return distill_kl(student_cos, teacher_scores, tau, mask=mask)
