"""Chat templates: a conversation -> rendered samples, each one string plus the character spans trained on.

    render.py   the algorithm: generation-faithful targets, split samples, reasoning masks (ChatTemplate)
    named.py    the templates written in Python as pieces (qwen2_5, qwen3, chatml, llama3, base/empty, alpaca)
    native.py   the tokenizer's own Jinja template, probed for prefix stability at load time

The names a config may give are sft.config.sections.TEMPLATES: ``native`` plus the keys of named.NAMED.
"""

from sft.data.templates.named import NAMED, named_template
from sft.data.templates.native import NativeTemplate
from sft.data.templates.render import ChatTemplate, Sample, TemplateError, TemplateRefused

__all__ = ["ChatTemplate", "Sample", "TemplateError", "TemplateRefused", "get_template"]


def get_template(name: str, tokenizer) -> ChatTemplate:
    """The template called ``name`` for this tokenizer (``native`` reads the tokenizer's own)."""
    if name == "native":
        return NativeTemplate.from_tokenizer(tokenizer)
    if name not in NAMED:
        raise TemplateError(f"unknown template {name!r}; choose one of native, {', '.join(NAMED)}")
    return named_template(name, tokenizer)
