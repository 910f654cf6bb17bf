"""The fake models' one byte-level tokenizer: the tiny model's (trained merges), the synthetic
model's and the fake engine's (no merges) agree on bytes and special tokens."""

from __future__ import annotations

from serve_app.pipeline.random_weights.tokenizer import (
    QWEN_SPECIAL_TOKENS,
    byte_level_bpe,
    qwen2_tokenizer,
)


def test_without_a_corpus_every_utf8_byte_is_one_token() -> None:
    bpe = byte_level_bpe()
    for text, count in (("a", 1), ("猫", 3), ("😀", 4), ("make it blue", 12)):
        assert len(bpe.encode(text, add_special_tokens=False).ids) == count
    assert bpe.get_vocab_size() == 256 + len(QWEN_SPECIAL_TOKENS)


def test_special_tokens_follow_the_bytes_whole_and_in_order() -> None:
    bpe = byte_level_bpe()
    ids = [bpe.token_to_id(t) for t in QWEN_SPECIAL_TOKENS]
    assert ids == list(range(256, 256 + len(QWEN_SPECIAL_TOKENS)))
    assert bpe.encode("a<|im_end|>b", add_special_tokens=False).ids[1] == ids[2]


def test_a_corpus_trains_merges_and_the_transformers_tokenizer_keeps_the_ids() -> None:
    bpe = byte_level_bpe(["make it blue make it red"] * 3, vocab_size=300)
    assert len(bpe.encode("make it blue", add_special_tokens=False).ids) < 12
    tokenizer = qwen2_tokenizer(bpe)
    assert tokenizer("make it blue")["input_ids"] == bpe.encode("make it blue").ids
    special = {t: bpe.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS} == special
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
