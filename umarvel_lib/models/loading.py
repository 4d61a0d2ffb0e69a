"""Loading a local Qwen-VL checkpoint: processors, the image budget, U-MARVEL's tokens; never a download.

* :func:`load_backbone` loads any *local* Qwen2-VL / Qwen2.5-VL / Qwen3-VL directory (a micro build
  from :func:`umarvel_lib.micro.build.build_backbone`, Qwen2-VL-7B-Instruct, Qwen3-VL-4B, a released
  U-MARVEL checkpoint) with ``from_pretrained(..., local_files_only=True)``, makes sure U-MARVEL's
  added tokens exist and records their ids in the config. Anything that is not a local directory
  fails at once: nothing is ever downloaded.
* :func:`load_processor` goes through image-only processor subclasses (the stock ones need
  torchvision for their video slot); :func:`set_pixel_limits` and :data:`PAPER_PIXELS` set the
  visual-token budget.
* :func:`resolve_local_checkpoint` turns a checkpoint argument into a local directory, or a clear
  error (a hub id is named as one).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from ..io import check_safetensors, read_json
from .qwen_vl import EMB_TOKEN, INSTRUCTION_END, INSTRUCTION_START, UMARVEL_TOKENS

# ------------------------------------------------------------------------------------------------
# processors (image-only subclasses: the stock ones need torchvision for their video slot)
# ------------------------------------------------------------------------------------------------
try:  # these imports are cheap compared with the models; keep them at module level for subclassing
    from transformers import Qwen2VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
except ImportError as e:  # pragma: no cover - only with a transformers too old for this kit
    raise ImportError(
        f"umarvel_lib.models.loading needs transformers>=5 with Qwen2-VL/Qwen3-VL: {e}"
    ) from e


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def _qwen25_processor_class():
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(
                image_processor, tokenizer, None, chat_template=chat_template, **kwargs
            )

    return ImageOnlyQwen2_5_VLProcessor


# The paper's image budget per backbone kind (the released vision_process MIN_PIXELS/MAX_PIXELS):
# Qwen2-VL 4*28*28 .. 300*28*28 (at most 300 visual tokens after the 2x2 merge); Qwen3-VL resets the
# maximum to 224*224. (min_pixels, max_pixels).
PAPER_PIXELS: dict[str, tuple[int, int]] = {
    "qwen2_vl": (4 * 28 * 28, 300 * 28 * 28),
    "qwen2_5_vl": (4 * 28 * 28, 300 * 28 * 28),
    "qwen3_vl": (4 * 28 * 28, 224 * 224),
}


def set_pixel_limits(processor, min_pixels: int, max_pixels: int) -> None:
    """Make ``processor`` resize every image into ``[min_pixels, max_pixels]`` (its visual-token budget)."""
    from transformers.image_utils import SizeDict

    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    ip = processor.image_processor
    ip.size = SizeDict(shortest_edge=int(min_pixels), longest_edge=int(max_pixels))
    for name, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if getattr(ip, name, None) is not None:
            setattr(ip, name, int(v))


def _model_type(path: Path) -> str | None:
    cfg = path / "config.json"
    if cfg.is_file():
        return read_json(cfg).get("model_type")
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = path / name
        if f.is_file():
            pc = read_json(f).get("processor_class", "")
            if "Qwen3" in pc:
                return "qwen3_vl"
            if "Qwen2_5" in pc:
                return "qwen2_5_vl"
            if "Qwen2" in pc:
                return "qwen2_vl"
    return None


def _require_local_dir(path) -> Path:
    p = Path(os.fspath(path)).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"{os.fspath(path)!r} is not a local directory; no download is attempted; pass the path of a local "
            f"copy (e.g. a directory made with `huggingface-cli download` on a machine with network, or a micro "
            f"build from umarvel_lib.micro.build.build_backbone)"
        )
    return p


def load_processor(path):
    """Load the processor of a local model directory through the image-only subclass.

    (``AutoProcessor.from_pretrained`` silently returns only the tokenizer without torchvision.)
    """
    p = _require_local_dir(path)
    mt = _model_type(p)
    if mt == "qwen3_vl":
        cls = ImageOnlyQwen3VLProcessor
    elif mt == "qwen2_5_vl":
        cls = _qwen25_processor_class()
    elif mt in ("qwen2_vl", None):
        cls = ImageOnlyQwen2VLProcessor
    else:
        raise ValueError(f"{p}: model_type {mt!r} is not a Qwen2-VL/Qwen2.5-VL/Qwen3-VL checkpoint")
    with _quiet_transformers():
        proc = cls.from_pretrained(str(p), local_files_only=True)
    if type(proc.image_processor).__name__ != "Qwen2VLImageProcessorPil":
        # real checkpoints name the torchvision processor; rebuild the PIL one from the same settings
        ip = Qwen2VLImageProcessorPil.from_pretrained(str(p), local_files_only=True)
        proc = cls(image_processor=ip, tokenizer=proc.tokenizer, chat_template=proc.chat_template)
    if proc.chat_template is None and getattr(proc.tokenizer, "chat_template", None):
        proc.chat_template = (
            proc.tokenizer.chat_template
        )  # template stored only in tokenizer_config.json
    return proc


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def record_token_ids(model, tokenizer) -> dict[str, int]:
    """Write ``emb_token_id``/``instruction_start_token_id``/``instruction_end_token_id`` into the config."""
    ids = {
        "emb_token_id": tokenizer.convert_tokens_to_ids(EMB_TOKEN),
        "instruction_start_token_id": tokenizer.convert_tokens_to_ids(INSTRUCTION_START),
        "instruction_end_token_id": tokenizer.convert_tokens_to_ids(INSTRUCTION_END),
    }
    for k, v in ids.items():
        setattr(model.config, k, v)
    return ids


def ensure_umarvel_tokens(model, tokenizer) -> dict[str, int]:
    """Add ``<emb>``, ``<instruction_start>``, ``<instruction_end>`` if missing (as U-MARVEL's loader does),
    grow the embeddings if the tokenizer outgrew them, and record the ids in ``model.config``.

    Unlike the released loader we never *shrink* the embedding matrix (Qwen2-VL pads it to 152064 rows).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in UMARVEL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing)
    n_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_rows:
        model.resize_token_embeddings(len(tokenizer))
    return record_token_ids(model, tokenizer)


def load_backbone(path, *, attn_implementation: str | None = None, dtype=None):
    """``(model, processor)`` from a local directory; never downloads.

    Works for micro builds and for real Qwen2-VL / Qwen2.5-VL / Qwen3-VL / U-MARVEL checkpoints. The
    U-MARVEL tokens are ensured and their ids recorded in ``model.config``.
    """
    from transformers import AutoModelForImageTextToText

    p = _require_local_dir(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{p} has no config.json; is it a model directory (or an incomplete build)?"
        )
    for w in sorted(
        p.glob("*.safetensors")
    ):  # a cut weight file: its name, not transformers' bare error
        check_safetensors(w)
    kw: dict[str, Any] = {"local_files_only": True}
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    if dtype is not None:
        kw["dtype"] = dtype
    with _quiet_transformers():
        model = AutoModelForImageTextToText.from_pretrained(str(p), **kw)
    processor = load_processor(p)
    ensure_umarvel_tokens(model, processor.tokenizer)
    model.eval()
    return model, processor


def resolve_local_checkpoint(path: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a clear error (this kit never downloads from a hub)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p.resolve()
    s = str(path)
    looks_like_hub = (
        "/" in s and not s.startswith(("/", ".", "~")) and s.count("/") == 1
    ) or "/" not in s
    hint = (
        f"{s!r} looks like a hub id; this kit loads checkpoints from local directories only (no hub access). "
        "Download it first (e.g. `huggingface-cli download ORG/NAME --local-dir DIR` on a machine with network) "
        "and pass DIR."
        if looks_like_hub
        else f"checkpoint directory {s!r} does not exist"
    )
    raise FileNotFoundError(hint)
