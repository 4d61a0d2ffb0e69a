"""GradCache: full-batch contrastive gradients with chunk-sized activation memory.

Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (2021).
Accumulating gradients does *not* add in-batch negatives; GradCache does (VLM2Vec#27, #50):

1. **Embed without a graph**, chunk by chunk, remembering the RNG state before each chunk.
2. **Loss on the full batch** of those (detached, grad-requiring) embeddings; ``backward`` gives
   the gradient of the loss w.r.t. every embedding, and also accumulates the gradient of any
   parameter used directly in the loss (``τ``).
3. **Re-embed each chunk with a graph**, with the RNG state of step 1 replayed (so dropout draws
   the same masks), and back-propagate ``sum(emb · d loss / d emb)``.

The parameter gradients equal those of plain training on the same chunks (same dropout masks)
to floating-point precision; ``tests/test_gradcache.py`` checks this, for model parameters and
``τ``. After a call the global RNG has advanced exactly as one plain forward pass would have,
so runs with and without GradCache draw the same random numbers afterwards.

Generic: streams are ``(encode_fn, inputs)`` pairs. ``inputs`` is anything that can be sliced
along its first axis (a list of items, a tensor, a dict of tensors); ``encode_fn(chunk)`` returns
``(n, D)`` embeddings. For hard negatives pass a flat list of ``B·K`` items as a third stream
and reshape to ``(B, K, D)`` inside ``loss_fn``.

Distributed (not exercised by the tests beyond the gloo gather check): pass ``no_sync`` so DDP
all-reduces only on the last chunk. ``τ`` gets its gradient from the loss backward, outside any
DDP forward, so a DDP-wrapped module holding ``τ`` needs ``find_unused_parameters=True`` (its
gradient is identical on every rank anyway), or ``τ`` must live outside the wrapped module.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["RandContext", "split_inputs", "grad_cache_step", "GradCache", "loss_in_full_precision"]


class RandContext:
    """Snapshot of the RNG states: torch CPU, the current CUDA device (if initialised), Python's
    ``random`` and NumPy's global generator.

    ``with ctx:`` runs the body with the snapshot restored and afterwards puts every generator back
    where it was before the block (like the original GradCache's ``RandContext``, which covers
    torch only; ``random``/NumPy are included here because a collate step that samples, e.g.,
    instructions must see the same draws in both passes).
    """

    def __init__(self):
        self.cpu_state = torch.get_rng_state()
        self.cuda_devices: list[int] = []
        self.cuda_states: list[torch.Tensor] = []
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda_devices = [torch.cuda.current_device()]
            self.cuda_states = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]
        self.py_state = random.getstate()
        self.np_state = np.random.get_state()
        self._saved: RandContext | None = None

    def restore(self) -> None:
        """Set every generator to this snapshot (globally, no context)."""
        torch.set_rng_state(self.cpu_state)
        for d, s in zip(self.cuda_devices, self.cuda_states):
            torch.cuda.set_rng_state(s, d)
        random.setstate(self.py_state)
        np.random.set_state(self.np_state)

    def __enter__(self):
        self._saved = RandContext()
        self.restore()
        return self

    def __exit__(self, *exc):
        assert self._saved is not None
        self._saved.restore()
        self._saved = None
        return False


def split_inputs(inputs: Any, chunk_size: int) -> list[Any]:
    """Split ``inputs`` into chunks of ``chunk_size`` along the first axis.

    Supports tensors, dicts of tensors/sequences (every value split the same way) and sequences
    (lists, tuples, anything with ``len`` and slicing).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if isinstance(inputs, torch.Tensor):
        return list(inputs.split(chunk_size, dim=0))
    if isinstance(inputs, dict):
        lens = {k: len(v) for k, v in inputs.items()}
        if len(set(lens.values())) != 1:
            raise ValueError(f"dict inputs must have equal first dimensions, got {lens}")
        n = next(iter(lens.values()))
        return [
            {k: v[i : i + chunk_size] for k, v in inputs.items()} for i in range(0, n, chunk_size)
        ]
    n = len(inputs)
    return [inputs[i : i + chunk_size] for i in range(0, n, chunk_size)]


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    """Half-precision embeddings (autocast) as float32; float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def loss_in_full_precision(
    loss_fn: Callable[..., torch.Tensor], *embs: torch.Tensor
) -> torch.Tensor:
    """``loss_fn(*embs)`` on float32 copies of half-precision embeddings with any autocast turned off
    (also one opened by the caller around the whole step): cos/τ with τ≈0.05 is too sharp for bf16
    logits. The loss must be a scalar."""
    with torch.autocast(device_type=embs[0].device.type, enabled=False):
        loss = loss_fn(*[_full_precision(e) for e in embs])
    if loss.ndim != 0:
        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
    return loss


@dataclass
class _Stream:
    encode_fn: Callable[[Any], torch.Tensor]
    chunks: list[Any]


def grad_cache_step(
    encode_fns: Sequence[Callable[[Any], torch.Tensor]] | Callable[[Any], torch.Tensor],
    inputs: Sequence[Any],
    loss_fn: Callable[..., torch.Tensor],
    chunk_size: int,
    *,
    split_fn: Callable[[Any, int], list[Any]] = split_inputs,
    autocast: Callable[[], AbstractContextManager] | None = None,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    replay_rng: bool = True,
) -> torch.Tensor:
    """One GradCache forward/backward; gradients are *accumulated* into ``.grad`` (call
    ``optimizer.zero_grad()`` yourself). Returns the detached full-batch loss.

    Args:
        encode_fns: one ``encode_fn(chunk) -> (n, D)`` per stream, or a single one shared by all.
        inputs: one sliceable input per stream, e.g. ``(queries, candidates)`` or
            ``(queries, candidates, flat_hard_negatives)``.
        loss_fn: ``loss_fn(*embeddings) -> scalar`` on the full-batch embeddings (may gather
            across ranks and use ``τ``).
        chunk_size: items per forward pass.
        split_fn: how to chunk an input (default :func:`split_inputs`).
        autocast: context factory wrapped around every encode (mixed precision); the loss always
            runs in float32 on float32 copies of the embeddings.
        no_sync: context factory (e.g. ``lambda: accelerator.no_sync(model)``) used for every
            backward except the last chunk's, so DDP all-reduces once per step.
        backward: function used to back-propagate the *loss* (e.g. ``accelerator.backward``);
            defaults to ``loss.backward()``. Chunk surrogates always use ``Tensor.backward``.
        replay_rng: replay the per-chunk RNG state in the second pass (turn off only to show
            why it matters).
    """
    if callable(encode_fns):
        encode_fns = [encode_fns] * len(inputs)
    if len(encode_fns) != len(inputs):
        raise ValueError(f"{len(encode_fns)} encode_fns for {len(inputs)} input streams")
    ac = autocast or contextlib.nullcontext
    ns = no_sync or contextlib.nullcontext

    streams = [_Stream(fn, split_fn(x, chunk_size)) for fn, x in zip(encode_fns, inputs)]
    if all(len(s.chunks) <= 1 for s in streams):
        # Every stream fits in one chunk: caching buys no memory, so do the plain step (one forward
        # with a graph instead of two forwards). Same gradients, same RNG draws.
        with ac():
            embs = [s.encode_fn(s.chunks[0]) for s in streams]
        loss = loss_in_full_precision(loss_fn, *embs)
        (backward or torch.Tensor.backward)(loss)
        return loss.detach()

    # 1) embeddings without a graph, one RNG snapshot per chunk
    reps: list[torch.Tensor] = []
    rngs: list[list[RandContext]] = []
    with torch.no_grad():
        for s in streams:
            outs, states = [], []
            for chunk in s.chunks:
                states.append(RandContext())
                with ac():
                    outs.append(s.encode_fn(chunk))
            reps.append(torch.cat(outs, dim=0))
            rngs.append(states)
    rng_after = RandContext()  # state after the whole first pass, restored at the end

    # 2) full-batch loss; d loss / d embeddings (+ τ's gradient accumulated directly)
    leaves = [_full_precision(r.detach()).requires_grad_(True) for r in reps]
    loss = loss_in_full_precision(loss_fn, *leaves)
    with ns():
        (backward or torch.Tensor.backward)(loss)
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]

    # 3) chunked re-forward with graph, backward of <emb, grad>
    last = (len(streams) - 1, len(streams[-1].chunks) - 1)
    for si, s in enumerate(streams):
        offset = 0
        for ci, chunk in enumerate(s.chunks):
            rng = rngs[si][ci] if replay_rng else contextlib.nullcontext()
            is_last = (si, ci) == last
            with rng, contextlib.nullcontext() if is_last else ns():
                with ac():
                    emb = s.encode_fn(chunk)
                g = grads[si][offset : offset + emb.shape[0]]
                offset += emb.shape[0]
                if emb.shape != g.shape:
                    raise RuntimeError(
                        f"re-forward of stream {si} chunk {ci} gave shape {tuple(emb.shape)}, first pass {tuple(g.shape)}"
                    )
                surrogate = torch.dot(emb.flatten(), g.to(emb.dtype).flatten())
                surrogate.backward()
    # leave the RNG where a plain single pass would have left it
    rng_after.restore()
    return loss.detach()


class GradCache:
    """Callable wrapper holding the encoders, loss and chunk size of :func:`grad_cache_step`.

    >>> gc = GradCache([model.encode, model.encode], lambda q, c: info_nce(q, c, model.tau), chunk_size=8)
    >>> loss = gc(queries, candidates)   # gradients are now in .grad
    """

    def __init__(self, encode_fns, loss_fn, chunk_size: int, **kw):
        self.encode_fns = encode_fns
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.kw = kw

    def __call__(self, *inputs, **kw) -> torch.Tensor:
        return grad_cache_step(
            self.encode_fns, inputs, self.loss_fn, self.chunk_size, **{**self.kw, **kw}
        )
