"""Chat templates: a conversation -> rendered samples, each one string plus the character spans trained on.

    render.py   the algorithm: generation-faithful targets, split samples, reasoning masks (ChatTemplate)
    named.py    the templates written in Python as pieces (qwen2_5, qwen3, chatml, llama3, base/empty, alpaca)
    native.py   the tokenizer's own Jinja template (or a Jinja file), probed for prefix stability at load time

The names a config may give are sft.config.sections.TEMPLATES: ``native`` plus the keys of named.NAMED.
"""

from typing import Optional

from sft.config.sections import is_jinja_file
from sft.data.templates.named import NAMED, named_template
from sft.data.templates.native import NativeTemplate
from sft.data.templates.render import ChatTemplate, Sample, TemplateError, TemplateRefused

__all__ = ["ChatTemplate", "Sample", "TemplateError", "TemplateRefused", "get_template"]


def get_template(name: str, tokenizer, switches: Optional[dict] = None, jinja: Optional[str] = None) -> ChatTemplate:
    """The template called ``name`` for this tokenizer: ``native`` reads the tokenizer's own, a path ending .jinja
    or .j2 reads that file (or takes ``jinja``, its text as recorded in a checkpoint), rendered like native;
    ``switches`` (chat_template_kwargs) reach every render of those two, and a template written in Python
    refuses them."""
    if name == "native":
        return NativeTemplate.from_tokenizer(tokenizer, switches)
    if is_jinja_file(name):
        if jinja is not None:
            return NativeTemplate.from_text(jinja, tokenizer, switches, name=name)
        return NativeTemplate.from_file(name, tokenizer, switches)
    if name not in NAMED:
        raise TemplateError(f"unknown template {name!r}; choose one of native, {', '.join(NAMED)} or a Jinja file")
    if switches:
        raise TemplateError(f"template {name} is written in Python and takes no chat_template_kwargs; use native "
                            "or a Jinja file")
    return named_template(name, tokenizer)
