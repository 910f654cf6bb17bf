"""The byte-level tokenizer of the fake models: the tiny model, the synthetic full-size model and
the unit tests' fake engine all build theirs here.

It tokenizes as the real Qwen2 tokenizer does (its regex split, then byte-level BPE), so every
UTF-8 byte has a token and any prompt (any script, emoji) encodes without `<unk>`. The Qwen
special tokens follow the byte vocabulary in the real vocabulary's relative order, whole and never
split. Without a corpus there are no merges: one token per UTF-8 byte ("a" is 1 token, "猫" 3,
"😀" 4). With one, merges are trained on it (deterministic for a fixed corpus and size).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

#: The Qwen special tokens, in the real vocabulary's relative order. The processor and the text
#: encoder look these up by text, so they must exist as single added tokens.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The real Qwen2 tokenizer's pre-tokenization split (before the byte-level mapping).
_QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501


def byte_level_bpe(corpus: Sequence[str] = (), *, vocab_size: int = 0) -> Any:
    """A `tokenizers.Tokenizer`: Qwen2's pre-tokenization, the 256 byte tokens (plus merges
    trained on `corpus` up to `vocab_size` entries, if given), then `QWEN_SPECIAL_TOKENS` as
    special added tokens. Light (no transformers): the unit tests' fake engine shares it as JSON.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if corpus:
        bpe = Tokenizer(models.BPE())
    else:
        vocab = {char: i for i, char in enumerate(sorted(alphabet))}
        bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    if corpus:
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=1,
            show_progress=False,
            # Every byte gets a token, so any prompt encodes without <unk>.
            initial_alphabet=alphabet,
            special_tokens=[],
        )
        bpe.train_from_iterator(list(corpus), trainer=trainer)
    # Added after the vocabulary: they take the next ids, in this order.
    bpe.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    return bpe


def qwen2_tokenizer(bpe: Any) -> Any:
    """The transformers `Qwen2Tokenizer` (what the pipelines and their processor take) with
    `bpe`'s vocabulary and merges, and the special tokens and settings of the real Qwen2.5-VL
    tokenizer: no unk/bos, eos `<|im_end|>`, pad `<|endoftext|>`."""
    # In transformers 5 `Qwen2Tokenizer` *is* the fast, `tokenizers`-backed class.
    from transformers import AddedToken, Qwen2Tokenizer

    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # The special tokens go right after the BPE vocabulary, as in the real Qwen tokenizer (ids
    # 151643+ there); `add_tokens` then keeps these ids.
    vocab: dict[str, int] = dict(model["vocab"])
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    # A dict, because transformers' annotations say `merges: list[str]` while BPE wants pairs.
    options: dict[str, Any] = {
        "vocab": vocab,
        "merges": merges,
        "unk_token": None,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 32768,
    }
    tokenizer = Qwen2Tokenizer(**options)
    # `special` keeps them whole (never split by BPE, skipped when decoding).
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS]
    )
    return tokenizer
