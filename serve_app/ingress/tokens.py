"""Prompt lengths as the model counts them: tokens of the pipeline's own tokenizer.

The model replica sends its tokenizer in `ModelInfo.tokenizer_json` (Qwen2.5-VL's for the real
models, the tiny model's BPE on CPU); the ingress rebuilds it once with the `tokenizers` library
(Rust, no torch) and counts here, so a prompt the text path cannot take is refused with a 400
before it reaches a replica, whatever its script: a CJK character or an emoji is one or several
tokens, exactly as the model will see it.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer

from serve_app.common.jobs import ModelInfo


class PromptTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._control_ids = {
            token_id: added.content
            for token_id, added in tokenizer.get_added_tokens_decoder().items()
        }

    def count(self, text: str) -> int:
        """How many tokens `text` is to the model (the prompt alone, without its template)."""
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def control_tokens(self, text: str) -> list[str]:
        """The model's control tokens (`<|im_end|>`, `<|image_pad|>`, ...) that `text` spells:
        inside the prompt template they would end the user's turn or stand for image features
        that do not exist."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return sorted({self._control_ids[i] for i in ids if i in self._control_ids})


@functools.lru_cache(maxsize=4)
def _load(tokenizer_json: str) -> PromptTokenizer:
    # Keyed by the JSON string itself: the service keeps one ModelInfo, so one string object,
    # whose hash Python caches; a 7 MB tokenizer is parsed once.
    return PromptTokenizer(Tokenizer.from_str(tokenizer_json))


def tokenizer_for(info: ModelInfo) -> PromptTokenizer | None:
    """The model's tokenizer, or None when the engine shares none (only characters are
    counted then). Parsing blocks the first time: call it from a thread once."""
    if info.tokenizer_json is None:
        return None
    return _load(info.tokenizer_json)
