"""Validation answers, scored (sft/train/answers.py): each encoded sample's prompt and reference, left-padded
prompt batches, exact match; on samples encoded by the real tokenizers with their own templates."""

import json

import pytest
import torch

from sft.data.conversation import FieldMapping
from sft.data.encoding import EncodeSettings
from sft.data.pipeline import encode_split
from sft.data.templates import get_template
from sft.errors import IGNORE_INDEX
from sft.generation import stop_rule
from sft.train.answers import (ScoredAnswer, answer_case, exact_match, exact_match_rate, last_supervised_span,
                               left_padded)
from tests.conftest import real_tokenizer

TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
         {"role": "user", "content": "Write 47 in words."}, {"role": "assistant", "content": "forty-seven"}]


@pytest.mark.parametrize("tokenizer_name, template, switches", [
    ("qwen2.5-instruct", "native", {}), ("llama3", "native", {}), ("qwen3", "native", {"enable_thinking": False}),
    ("qwen2.5-instruct", "chatml", {}),
])
def test_the_prompt_is_the_generation_prompt_and_the_reference_the_last_answer(tmp_path, tokenizer_name, template,
                                                                                switches):
    tokenizer = real_tokenizer(tokenizer_name)
    chat = get_template(template, tokenizer, switches)
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"messages": TURNS}) + "\n")
    encoded = encode_split([str(path)], chat, tokenizer, EncodeSettings(FieldMapping(messages_key="messages"),
                                                                        sequence_length=10**6)).dataset[0]
    case = answer_case(3, encoded["input_ids"], encoded["labels"], tokenizer, stop_rule(tokenizer, chat))
    # The prompt is what generating the last turn starts from, token for token: the template's generation prompt
    # after the earlier turns, tokenized alone.
    expected = tokenizer(chat.generation_prompt(TURNS[:3]), add_special_tokens=False).input_ids
    assert case.prompt_ids == expected
    assert case.reference == "forty-seven"
    assert case.index == 3
    # The first turn's answer is supervised too, but it is not the one scored.
    assert "Hello there" in tokenizer.decode(case.prompt_ids)


def test_the_last_supervised_span():
    ignore = IGNORE_INDEX
    assert last_supervised_span([ignore, 5, 6, ignore, ignore, 7, 8, 9, ignore]) == (5, 8)
    assert last_supervised_span([ignore, 5, 6]) == (1, 3)
    assert last_supervised_span([4]) == (0, 1)
    with pytest.raises(ValueError, match="no supervised token"):
        last_supervised_span([ignore, ignore])


def test_the_reference_ends_where_an_answer_would_stop(byte_tokenizer):
    from sft.generation import StopRule

    # A stop id ends the reference; a marker of several tokens is cut from the text, as in a generated answer.
    ids = byte_tokenizer.encode("seven", add_special_tokens=False)
    eos = byte_tokenizer.eos_token_id
    case = answer_case(0, [1, 2] + ids + [eos, 3], [IGNORE_INDEX] * 2 + ids + [eos, IGNORE_INDEX], byte_tokenizer,
                       StopRule((eos,), ""))
    assert (case.prompt_ids, case.reference) == ([1, 2], "seven")
    marked = byte_tokenizer.encode("seven<END>", add_special_tokens=False)
    case = answer_case(0, [1] + marked, [IGNORE_INDEX] + marked, byte_tokenizer, StopRule((eos,), "<END>"))
    assert case.reference == "seven"


def test_prompts_are_padded_on_the_left_with_a_mask():
    batch = left_padded([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long


def test_exact_match_ignores_only_surrounding_whitespace():
    assert exact_match(" forty-seven\n", "forty-seven")
    assert not exact_match("Forty-seven", "forty-seven")
    assert not exact_match("forty seven", "forty-seven")
    assert not exact_match("", "forty-seven")
    answers = [ScoredAnswer(i, "p", "forty-seven", answer) for i, answer in
               enumerate(["forty-seven", "forty-seven ", "fourteen", "four hundred seventy-seven"])]
    assert [a.match for a in answers] == [True, True, False, False]
    assert exact_match_rate(answers) == 0.5
    assert exact_match_rate([]) == 0.0
    assert answers[2].record() == {"index": 2, "prompt": "p", "reference": "forty-seven", "answer": "fourteen",
                                   "match": False}
