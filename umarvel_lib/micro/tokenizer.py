"""A small byte-level BPE tokenizer with the Qwen2-VL special tokens, trained locally.

The micro backbones cannot download Qwen's 151k-token tokenizer, so we train a small one on a
deterministic synthetic corpus (scene captions from :mod:`umarvel_lib.data.scenes` plus generic
retrieval/chat lines) and give it the same special tokens and chat template as Qwen2-VL (both in
:mod:`umarvel_lib.models.qwen_vl`).

Determinism: the corpus is built only from tuples/lists and a seeded ``random.Random``; the BPE
trainer breaks ties on the pair itself, so ``tokenizer.json`` is byte-identical across processes
and ``PYTHONHASHSEED`` values (tested in ``tests/test_backbone.py``).
"""

from __future__ import annotations

import random

from ..data import scenes
from ..models.qwen_vl import (
    ANSWER_TOKENS,
    DEFAULT_SYSTEM_PROMPT,
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    UMARVEL_TOKENS,
)

# Qwen2's pre-tokenisation regex (splits words, numbers, punctuation, whitespace runs).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Generic lines: chat/retrieval phrasing the embedder and reranker will see, plus plain English.
_FIXED_LINES = (
    DEFAULT_SYSTEM_PROMPT,
    "\nSummarize above image and sentence in one word: ",
    "\nSummarize above sentence in one word: ",
    "\nSummarize above image in one word: ",
    "Retrieve an image that matches the given caption.",
    "Find a caption that describes the everyday image.",
    "Retrieve a similar image to the given one.",
    "Find an image that shows the described change.",
    "Retrieve a Wikipedia paragraph that answers this question about the image.",
    "Identify the news image that matches the headline.",
    "Judge whether the candidate matches the query. Answer Yes or No.",
    "Does the candidate match the query? Yes",
    "Does the candidate match the query? No",
    "Query:",
    "Candidate:",
    "Answer:",
    "Yes",
    "No",
    "yes",
    "no",
)
_WORDS = (
    "the a an of to in on at for with by from and or but not is are was were be been has have had do does "
    "this that these those it its there here what which who where when why how image picture photo scene "
    "caption sentence text query candidate document paragraph question answer retrieve find match matches "
    "describe describes shows showing similar different same change changed replace color colour shape "
    "object objects background left right top bottom middle center corner next above below near far one two "
    "three four five six seven eight nine ten many few some all every each more less than very small large "
    "big little red green blue yellow purple orange white black cyan gray grey brown dark light bright man "
    "woman person people child dog cat bird car bus train street city house room table chair window tree "
    "flower water sky grass food plate cup book phone computer sign wall road beach mountain river field "
    "game player team ball sport run walk sit stand hold look eat drink play ride wear open close new old "
    "good bad first last day night time year people news article wikipedia entity title fashion dress shirt "
    "shoe style model fine grained category species landmark recipe instruction given following based"
).split()
_NUMBERS = tuple(str(i) for i in range(0, 101)) + ("1,000", "3.5", "2024")


def _generic_line(rng: random.Random) -> str:
    n = rng.randint(4, 14)
    words = [rng.choice(_WORDS) for _ in range(n)]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), rng.choice(_NUMBERS))
    s = " ".join(words)
    s = s[0].upper() + s[1:]
    return s + rng.choice((".", ".", "?", "!", ",", ":"))


def training_corpus(seed: int = 0, n_captions: int = 6000, n_generic: int = 3000) -> list[str]:
    """The deterministic corpus the tokenizer is trained on (a list, in a fixed order)."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(n_captions):
        s = scenes.sample_scene(rng)
        lines.append(scenes.caption(s, rng))
        if rng.random() < 0.05:
            lines.append(scenes.canonical_caption(s))
    for _ in range(n_generic):
        lines.append(_generic_line(rng))
    for _i in range(20):  # make the fixed phrases frequent enough to be merged
        lines.extend(_FIXED_LINES)
    return lines


def _train_bpe(vocab_size: int, seed: int):
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_corpus(seed), trainer=trainer, length=None)
    # U-MARVEL tokens: atomic, never split, kept on decode (plain added tokens, as in U-MARVEL's loader).
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False, single_word=False) for t in UMARVEL_TOKENS]
    )
    # "Yes"/"No" are normally learnt as ordinary BPE tokens (the corpus has many); only add them if not, so
    # that they don't get split out of words like "Yesterday"
    missing = [t for t in ANSWER_TOKENS if t not in tok.get_vocab()]
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False, single_word=False) for t in missing]
    )
    return tok


def build_tokenizer(vocab_size: int = 2048, seed: int = 0):
    """Train the byte-level BPE and wrap it as a ``PreTrainedTokenizerFast`` with Qwen2-VL's specials.

    Ids 0-6 are Qwen2-VL's special tokens in :data:`QWEN_SPECIAL_TOKENS` order; ``<emb>``,
    ``<instruction_start>``, ``<instruction_end>`` are the last three ids; ``Yes`` and ``No`` are single
    tokens (ordinary BPE tokens of the trained vocabulary).
    ``vocab_size`` is an upper bound (the corpus may not support that many merges).
    """
    from transformers import PreTrainedTokenizerFast

    bpe = _train_bpe(vocab_size, seed)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=32768,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    fast.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return fast


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of every token this kit relies on; raises if one is missing or splits."""
    out = {}
    for t in QWEN_SPECIAL_TOKENS + UMARVEL_TOKENS + ANSWER_TOKENS:
        ids = tokenizer.encode(t, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"token {t!r} is not a single token in this tokenizer (got ids {ids})")
        out[t] = ids[0]
    return out
