"""Answers from a model with a chat template: the stop rule, the messages of a turn, one generated answer.

Shared by training's answers (``SFTWorker.answer``, ``SFTWorker.answer_samples``) and ``scripts/chat.py``: answers stop at eos
and at the template's end-of-turn marker, which ends generation when it is one token and is cut from the text
when it is several (see ``StopRule``). torch is imported only when an answer is generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional


@dataclass(frozen=True)
class StopRule:
    """Where an answer ends: at any of ``ids`` (eos, and a one-token end-of-turn marker such as <|im_end|>),
    and at ``marker`` in the text (an end-of-turn marker of several tokens cannot stop generation by id)."""

    ids: tuple[int, ...]
    marker: str

    def answer_text(self, tokenizer, new_ids: list[int]) -> str:
        """The answer in generated token ids: up to the first stop id, decoded, cut at the marker."""
        end = next((i for i, token in enumerate(new_ids) if token in self.ids), len(new_ids))
        text = tokenizer.decode(new_ids[:end], skip_special_tokens=False)
        return text.split(self.marker)[0] if self.marker else text


def stop_rule(tokenizer, template) -> StopRule:
    """The stop tokens and marker of ``template`` for ``tokenizer`` (as SFTWorker.answer computes them)."""
    marker = template.end_of_turn.strip()
    stops = {tokenizer.eos_token_id}
    marker_ids = tokenizer.encode(marker, add_special_tokens=False) if marker else []
    if len(marker_ids) == 1:
        stops.add(marker_ids[0])
    stops.discard(None)
    return StopRule(tuple(sorted(stops)), marker)


def conversation(user: str, history: Iterable[dict] = (), system: Optional[str] = None) -> list[dict]:
    """The messages of one turn: the optional system message, the earlier turns, the new user message."""
    return ([{"role": "system", "content": system}] if system else []) + list(history) + \
        [{"role": "user", "content": user}]


def generate_answer(model, tokenizer, template, messages: list[dict], max_new_tokens: int = 256,
                    temperature: float = 0.0, stops: Optional[StopRule] = None) -> str:
    """The model's answer after ``messages``: greedy, or sampled at ``temperature`` when it is above 0."""
    import torch

    stops = stops or stop_rule(tokenizer, template)
    text = template.generation_prompt(messages)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             **generate_options(tokenizer, stops, temperature))
    return stops.answer_text(tokenizer, out[0, ids.shape[1]:].tolist())


def generate_options(tokenizer, stops: StopRule, temperature: float = 0.0) -> dict:
    """model.generate's options besides the inputs: greedy (temperature 0) or sampled, stopping at ``stops``."""
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}  # no sampling defaults to warn about
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"pad_token_id": pad_id, "eos_token_id": list(stops.ids), "use_cache": True, **sampling}
