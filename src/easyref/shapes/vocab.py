"""ShapesWorld's words and the two tokenizers trained on them (CLIP-style for the base and CLIP, Qwen2 for the MLLM).

Real tokenizers spend most of their vocabulary on words this world never uses, and their embedding
tables would dwarf the miniature models. So both are trained here, with the ``tokenizers`` library,
on every text the world produces (captions, group captions, questions, EasyRef's instruction), with
enough merges that every word becomes a single token: a model then learns "red" as one embedding,
not as a sequence of letters. The 256 byte-level symbols stay in both vocabularies, so any text
still encodes (a typo costs tokens, never an unknown token).

Training is deterministic: the corpus is drawn from a fixed seed and the BPE trainer breaks ties by
token id, so every run yields the same vocabulary and merges (the tests check this).
"""

from __future__ import annotations

import functools
import json

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer, Qwen2Tokenizer

from easyref.config import RELEASE_INSTRUCTION
from easyref.shapes.groups import CONCEPT_ATTRIBUTES, DESCRIBE, KINDS, QUESTION, concept_text, group_caption
from easyref.shapes.splits import random_train_attributes
from easyref.shapes.world import ATTRIBUTES
from easyref.tiny import byte_level_vocab, qwen2_vl_tokenizer

# Captions are at most ~20 tokens; SDXL's pipeline pads every prompt to this length, so it stays short.
CLIP_MAX_LENGTH = 32
CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_CLIP_SUFFIX = "</w>"
_CAPTIONS = 2000
_GROUP_SCENES = 500
# The default system turn of Qwen2-VL-Instruct's chat template: the MLLM reads it in every prompt.
_SYSTEM_PROMPT = "You are a helpful assistant."
_CORPUS_SEED = 0
# Larger than the corpus can fill: training stops once every word is whole, not at a size.
_MAX_VOCAB = 4096


def _group_texts(rng: np.random.Generator, count: int) -> list[str]:
    """Group captions and concept answers (:mod:`easyref.shapes.groups`) over random scenes, and its questions."""
    texts = [QUESTION, DESCRIBE, _SYSTEM_PROMPT]
    for _ in range(count):
        attributes = random_train_attributes(rng)
        for kind in KINDS:
            texts.append(group_caption(kind, attributes))
            concept = {name: getattr(attributes, name) for name in CONCEPT_ATTRIBUTES[kind]}
            texts.append(concept_text(kind, concept))
    return texts


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    rng = np.random.default_rng(_CORPUS_SEED)
    captions = [random_train_attributes(rng).caption() for _ in range(_CAPTIONS)]
    return (*captions, *_group_texts(rng, _GROUP_SCENES), RELEASE_INSTRUCTION)


def world_corpus() -> list[str]:
    """Every text the world uses, in a fixed order: full captions, group phrases, questions, the instruction."""
    return list(_corpus())


def attribute_words() -> list[str]:
    """Every single word that names an attribute value ("top left" gives "top" and "left")."""
    return sorted({word for values in ATTRIBUTES.values() for value in values for word in value.split()})


def _train_merges(template: Tokenizer, end_of_word_suffix: str | None) -> list[tuple[str, str]]:
    """BPE merges learnt on the corpus with ``template``'s normalizer and pre-tokenizer (the ones the
    finished tokenizer will apply), so the merges see exactly the pieces they will later join."""
    suffix = {"end_of_word_suffix": end_of_word_suffix} if end_of_word_suffix else {}
    tokenizer = Tokenizer(models.BPE(**suffix))
    tokenizer.normalizer = template.normalizer
    tokenizer.pre_tokenizer = template.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=_MAX_VOCAB, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **suffix)
    tokenizer.train_from_iterator(_corpus(), trainer)
    return [tuple(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]]


@functools.lru_cache(maxsize=1)
def _clip_merges() -> tuple[tuple[str, str], ...]:
    return tuple(_train_merges(CLIPTokenizer().backend_tokenizer, _CLIP_SUFFIX))


@functools.lru_cache(maxsize=1)
def _qwen_merges() -> tuple[tuple[str, str], ...]:
    return tuple(_train_merges(Qwen2Tokenizer().backend_tokenizer, None))


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """CLIP's BPE (lowercased, words end in ``</w>``) trained on the world, with a 32-token context.

    SDXL's first tokenizer pads with ``<|endoftext|>`` and its second with ``!``; the caller picks.
    """
    merges = list(_clip_merges())
    vocab = byte_level_vocab(merges, CLIP_SPECIAL_TOKENS, word_suffix=_CLIP_SUFFIX)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)


def qwen_tokenizer() -> Qwen2Tokenizer:
    """GPT-2-style byte-level BPE trained on the world, with Qwen2-VL-Instruct's special tokens and chat
    template (built as :mod:`easyref.tiny` builds its own), so EasyRef's prompt building works unchanged."""
    return qwen2_vl_tokenizer(list(_qwen_merges()))
