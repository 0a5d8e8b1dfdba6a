"""Validation answers, scored: each sample's prompt and reference, batches of prompts, exact match.

Pure: token ids in, text and tensors out; no devices and no processes (the worker generates: SFTWorker.answer_samples).

An encoded sample's labels hold its input_ids at supervised positions and -100 elsewhere (sft/data/encoding.py),
and they are generation-faithful: the tokens before a supervised span are exactly what the template renders as
the generation prompt at that point. So the sample's last supervised span is the answer to score, and the ids
before it are the prompt, with nothing re-read or re-rendered::

    input_ids  <|im_start|>user\\nWrite 47 in words.<|im_end|>\\n<|im_start|>assistant\\n  forty-seven <|im_end|>  \\n
    labels     -100 ...                                                  -100   forty-seven <|im_end|>  -100
               '------------------------------ prompt ------------------------'  '------ last span ------'

The reference is the last span cut by the same StopRule that cuts a generated answer (sft/generation.py), so
both end where generation stops; an answer matches when the two are equal up to surrounding whitespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from sft.errors import IGNORE_INDEX
from sft.generation import StopRule

ANSWER_COLUMNS = ("step", "prompt", "reference", "answer", "match")  # one row per answer in a tracker's table


@dataclass(frozen=True)
class AnswerCase:
    """What one validation sample asks: the prompt's token ids and the reference answer's text."""

    index: int
    """The sample's position in the validation set."""
    prompt_ids: list[int]
    reference: str


@dataclass(frozen=True)
class ScoredAnswer:
    """The model's answer to one validation sample, beside its prompt and reference."""

    index: int
    prompt: str
    reference: str
    answer: str

    @property
    def match(self) -> bool:
        return exact_match(self.answer, self.reference)

    def record(self) -> dict:
        """The answer as logged to metrics.jsonl."""
        return {"index": self.index, "prompt": self.prompt, "reference": self.reference, "answer": self.answer,
                "match": self.match}


def last_supervised_span(labels: Sequence[int]) -> tuple[int, int]:
    """(start, end) of the last run of supervised positions (labels != -100); a ValueError when there is none."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    if end == 0:
        raise ValueError("the sample has no supervised token")
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def answer_case(index: int, input_ids: Sequence[int], labels: Sequence[int], tokenizer, stops: StopRule) -> AnswerCase:
    """The prompt (input_ids before the last supervised span) and the reference (that span's text up to where
    ``stops`` ends an answer) of one encoded sample."""
    start, end = last_supervised_span(labels)
    return AnswerCase(index, list(input_ids[:start]), stops.answer_text(tokenizer, list(labels[start:end])))


def left_padded(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of prompts padded on the left to the longest, so that every row's next
    token is generated at the same, last position."""
    longest = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, longest - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, longest - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def exact_match(answer: str, reference: str) -> bool:
    """Equal up to whitespace at either end."""
    return answer.strip() == reference.strip()


def exact_match_rate(answers: Sequence[ScoredAnswer]) -> float:
    """The fraction of answers that match their reference (0.0 for none)."""
    return sum(answer.match for answer in answers) / len(answers) if answers else 0.0
