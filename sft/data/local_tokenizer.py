"""A byte-level BPE tokenizer built locally, with no download and no training data.

Every byte is one token (the 256-symbol byte alphabet), plus a few special tokens. It is lossless on
any text, so it serves tests and the demo where a real tokenizer cannot be fetched.
"""

from __future__ import annotations

import os
from typing import Optional

BOS, EOS, PAD = "<|begin_of_text|>", "<|endoftext|>", "<|pad|>"
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# A ChatML template in the usual Jinja form, so that `native` can be exercised on this tokenizer too.
CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_byte_tokenizer(with_bos: bool = False, chat_template: Optional[str] = None):
    """A PreTrainedTokenizerFast over bytes; eos ``<|endoftext|>``, optional bos, ChatML markers as added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    special = {"eos_token": EOS, "pad_token": PAD}
    if with_bos:
        special["bos_token"] = BOS
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHATML_TOKENS)})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def save_byte_tokenizer(directory: str, with_bos: bool = False, chat_template: Optional[str] = None) -> str:
    """Build the byte tokenizer and save it as an HF tokenizer folder that AutoTokenizer loads."""
    os.makedirs(directory, exist_ok=True)
    build_byte_tokenizer(with_bos, chat_template).save_pretrained(directory)
    return directory
