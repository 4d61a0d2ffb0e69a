"""The micro backbone: a few-million-parameter Qwen2-VL / Qwen3-VL built and pre-trained locally.

:mod:`.recipe` (BackboneConfig), :mod:`.tokenizer` (a locally trained BPE with Qwen's special tokens),
:mod:`.build` (architecture, processor, cached build), :mod:`.pretrain` (generative pre-training on
the project's Trainer, with resume), :mod:`.probe` (the caption probe) and :mod:`.shipped` (the
build that ships in ``backbones/``). Above :mod:`umarvel_lib.models` and :mod:`umarvel_lib.train`,
which it uses; a micro build loads like any checkpoint (:func:`umarvel_lib.models.loading.load_backbone`).
"""
