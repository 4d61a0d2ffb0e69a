"""Caches that make the embedder's training step cheaper without changing a single number.

Two memos, both bounded in memory, both keyed by content, both checked bitwise by
``tests/test_input_cache.py``:

* :class:`ItemInputs` -- the processor's output per item (the rendered chat tokenised, the image
  loaded and preprocessed). :func:`pad_item_inputs` assembles a batch from per-item outputs exactly
  as the processor pads one (same ids, masks, pixel rows and grids). Keyed by the rendered text, the
  image file (path, size, modification time) and the processor's digest (pixel budget, template, vocabulary).
* :class:`VisionFeatures` -- the frozen vision tower's output per image. The vision tower is frozen in
  every stage of every row (LoRA targets the language model only; full fine-tuning leaves ``visual``
  frozen too), so an image's features are a function of its pixel rows alone. Keyed by the image's
  pixel rows and grid (so image content and every preprocessing setting), the vision tower's weights
  (full content digest, recomputed when any vision parameter changes in place), dtype, device and autocast
  state. A batch's new images go through the tower together. An image's features do not depend on the
  other images of its batch on CPU (MKL gives each row of the tower's matmuls the same bits whatever
  the number of rows; the test checks each image alone against the batch), so a memoised image equals
  a recomputed one bitwise; the memo is used on CPU only, where this was checked (on a GPU the
  tower runs every time, as before). The memo is process-wide, so stages, dev evaluations and rows run
  in one process share it.

Nothing is written to disk, so no cache can go stale across code or data changes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

#: Default memory budgets (bytes); ``UMARVEL_INPUT_CACHE_MB`` / ``UMARVEL_VISION_CACHE_MB`` override (0: off).
ITEM_CACHE_BYTES = 512 << 20
VISION_CACHE_BYTES = 1024 << 20


def _budget(env: str, default: int) -> int:
    v = os.environ.get(env)
    return default if v in (None, "") else int(float(v) * (1 << 20))


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 64


class BoundedMemo:
    """A least-recently-used dict bounded by the bytes of its tensor values (thread-safe)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._d: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __reduce__(self):  # a copy (deepcopy, pickle) starts empty: a lock cannot be copied
        return (type(self), (self.max_bytes,))

    def get(self, key):
        with self._lock:
            hit = self._d.get(key)
            if hit is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return hit[0]

    def put(self, key, value) -> None:
        n = _nbytes(value)
        if n > self.max_bytes:
            return
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._d[key] = (value, n)
            self._bytes += n
            while self._bytes > self.max_bytes:
                _, (_, m) = self._d.popitem(last=False)
                self._bytes -= m

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._d)


# ---------------------------------------------------------------------------------------------
# Per-item processor outputs
# ---------------------------------------------------------------------------------------------


def _image_identity(item) -> tuple | None:
    """(path, size, mtime_ns) of an item's image file; None for an in-memory image (not memoised)."""
    if getattr(item, "image", None) is not None:
        return None
    path = getattr(item, "image_path", None)
    if path is None:
        return ()
    try:
        st = os.stat(path)
    except OSError:  # not memoised: loading the image raises the reader's own error
        return None
    return (os.fspath(path), st.st_size, st.st_mtime_ns)


class ItemInputs:
    """The processor's output for one item at a time, memoised (see the module docstring)."""

    def __init__(self, max_bytes: int | None = None):
        self.memo = BoundedMemo(
            _budget("UMARVEL_INPUT_CACHE_MB", ITEM_CACHE_BYTES) if max_bytes is None else max_bytes
        )

    def encode(self, processor, proc_digest: str, texts: list[str], items: list) -> list[dict]:
        """Per item, what ``processor`` gives for it alone, unpadded (1-D ids and masks, its pixel
        rows, its grid). The items not in the memo go through the processor in one call, and its
        padded output is cut back into items (padding dropped by the attention mask)."""
        keys = []
        for text, item in zip(texts, items):
            ident = _image_identity(item) if self.memo.max_bytes > 0 else None
            keys.append((proc_digest, text, ident) if ident is not None else None)
        out: list[dict | None] = [self.memo.get(k) if k is not None else None for k in keys]
        todo = [i for i, e in enumerate(out) if e is None]
        if todo:
            kw: dict[str, Any] = dict(
                text=[texts[i] for i in todo], padding=True, return_tensors="pt"
            )
            images = [items[i].load_image() for i in todo if items[i].has_image]
            if images:
                kw["images"] = images
            enc = processor(**kw)
            keep = enc["attention_mask"].bool()
            pixels = iter(
                enc["pixel_values"].split(enc["image_grid_thw"].prod(-1).tolist()) if images else []
            )
            grids = iter(enc["image_grid_thw"].split(1) if images else [])
            for row, i in enumerate(todo):
                e = {
                    k: enc[k][row][keep[row]]
                    for k in ("input_ids", "attention_mask", "mm_token_type_ids")
                    if k in enc
                }
                if items[i].has_image:  # copies: a view would keep the whole batch alive
                    e["pixel_values"], e["image_grid_thw"] = (
                        next(pixels).clone(),
                        next(grids).clone(),
                    )
                out[i] = e
                if keys[i] is not None:
                    self.memo.put(keys[i], e)
        return out


def pad_item_inputs(encs: list[dict], *, pad_id: int, padding_side: str) -> dict:
    """One batch from per-item processor outputs, padded as the processor pads a batch: ids with
    ``pad_id``, the attention mask and ``mm_token_type_ids`` with 0, on ``padding_side``; pixel
    rows and image grids concatenated in item order."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(int(e["input_ids"].shape[0]) for e in encs)
    fills = {"input_ids": pad_id, "attention_mask": 0, "mm_token_type_ids": 0}
    out: dict[str, torch.Tensor] = {}
    for k, fill in fills.items():
        if k not in encs[0]:
            continue
        rows = torch.full((len(encs), length), fill, dtype=encs[0][k].dtype)
        for i, e in enumerate(encs):
            v = e[k]
            if padding_side == "right":
                rows[i, : v.shape[0]] = v
            else:
                rows[i, length - v.shape[0] :] = v
        out[k] = rows
    for k in ("pixel_values", "image_grid_thw"):
        parts = [e[k] for e in encs if k in e]
        if parts:
            out[k] = torch.cat(parts, dim=0)
    return out


# ---------------------------------------------------------------------------------------------
# Frozen vision tower outputs
# ---------------------------------------------------------------------------------------------


def _vision_state(visual: nn.Module) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in visual.state_dict().values())


def vision_digest(visual: nn.Module) -> str:
    """Full-content sha256 of the vision tower's weights, memoised on the module until any of its
    tensors is modified in place (their version counters move) or replaced."""
    state = _vision_state(visual)
    memo = getattr(visual, "_umarvel_vision_digest", None)
    if memo is not None and memo[0] == state:
        return memo[1]
    h = hashlib.sha256(b"umarvel-vision/v1|")
    for name, t in visual.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()
    visual._umarvel_vision_digest = (state, digest)
    return digest


def vision_cacheable(visual: nn.Module) -> bool:
    """The tower's output is a function of its input: every parameter frozen (under grad mode), no
    active dropout, on CPU (see the module docstring) and not sharded (FSDP: the tower's weights are
    gathered inside the model's own forward only)."""
    first = next(visual.parameters(), None)
    if first is None or first.device.type != "cpu":
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed: nothing is sharded
        DTensor = ()  # noqa: N806
    if any(isinstance(p, DTensor) or isinstance(p.data, DTensor) for p in visual.parameters()):
        return False
    if torch.is_grad_enabled() and any(p.requires_grad for p in visual.parameters()):
        return False
    if visual.training:
        for m in visual.modules():
            if isinstance(m, nn.Dropout) and m.p > 0:
                return False
    return True


def _autocast_key(device: torch.device) -> tuple:
    if torch.is_autocast_enabled(device.type):
        return (True, str(torch.get_autocast_dtype(device.type)))
    return (False,)


class VisionFeatures:
    """Process-wide memo of the frozen vision tower's per-image outputs (see the module docstring)."""

    def __init__(self, max_bytes: int | None = None):
        self.memo = BoundedMemo(
            _budget("UMARVEL_VISION_CACHE_MB", VISION_CACHE_BYTES)
            if max_bytes is None
            else max_bytes
        )

    def image_outputs(self, core: nn.Module, pixel_values: torch.Tensor, grid: torch.Tensor):
        """What ``core.get_image_features(pixel_values, grid)`` returns (the per-image pooled features,
        and Qwen3-VL's per-image deepstack features): memoised images from the memo, the others
        through the tower in one call."""
        visual = core.visual
        dig = vision_digest(visual)
        ctx = (dig, str(pixel_values.device), str(visual.dtype), _autocast_key(pixel_values.device))
        rows = pixel_values.split(grid.prod(-1).tolist())
        grids = grid.split(1)
        keys, hits = [], []
        for r, g in zip(rows, grids):
            h = hashlib.sha256()
            h.update(f"{tuple(r.shape)}|{r.dtype}|".encode())
            h.update(r.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            h.update(g.cpu().numpy().tobytes())
            keys.append((ctx, h.hexdigest()))
            hits.append(self.memo.get(keys[-1]))
        todo = [i for i, hit in enumerate(hits) if hit is None]
        if todo:  # the batch's new images through the tower together, in batch order
            out = core.get_image_features(
                torch.cat([rows[i] for i in todo]),
                torch.cat([grids[i] for i in todo]),
                return_dict=True,
            )
            deep = getattr(out, "deepstack_features", None) or []
            for j, i in enumerate(todo):
                hits[i] = {
                    "type": type(out),
                    "pooled": out.pooler_output[j].detach(),
                    "deep": [layer[j].detach() for layer in deep],
                }
                self.memo.put(keys[i], hits[i])
        res = hits[0]["type"](pooler_output=tuple(hit["pooled"] for hit in hits))
        if hits[0]["deep"]:
            res.deepstack_features = [
                tuple(hit["deep"][k] for hit in hits) for k in range(len(hits[0]["deep"]))
            ]
        return res


#: The process-wide vision memo the embedder uses.
VISION_FEATURES = VisionFeatures()
