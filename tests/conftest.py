"""Shared fixtures: paths to the shared real data, and tiny tokenizers built in-process."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHARED_DATA = os.environ.get("SFT_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))


def shared_path(*parts: str) -> str:
    """A file under ../shared/data; missing data fails the test in CI (CI=true) and skips it elsewhere."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        message = f"shared test data missing: {path} (set SFT_SHARED_DATA to the folder holding datasets/ and tokenizers/)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def byte_tokenizer_dir(tmp_path_factory):
    from sft.data.local_tokenizer import CHATML_JINJA, save_byte_tokenizer

    return save_byte_tokenizer(str(tmp_path_factory.mktemp("byte_tokenizer")), with_bos=True, chat_template=CHATML_JINJA)


@pytest.fixture(scope="session")
def byte_tokenizer(byte_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(byte_tokenizer_dir)


_TOKENIZERS = {}


def real_tokenizer(name: str):
    """A real tokenizer from ../shared/data/tokenizers, loaded once per session."""
    from transformers import AutoTokenizer

    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = AutoTokenizer.from_pretrained(shared_path("tokenizers", name))
    return _TOKENIZERS[name]


def rejected_rows(result) -> list[dict]:
    """The rejected rows of an encoded split (sft.data.pipeline.SplitResult), read back from its rejects file."""
    import json

    if result.rejects_path is None:
        return []
    with open(result.rejects_path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def full_logits_loss_sum(model, batch):
    """The reference for sft.train.modeling.loss_sum: the summed cross-entropy from full logits, the textbook way
    (half-precision logits upcast to float32, as the library does), and the number of target tokens."""
    import torch.nn.functional as F

    from sft.train.loss import upcast
    from sft.train.modeling import NOT_MODEL_INPUTS

    inputs = {key: value for key, value in batch.items() if key not in NOT_MODEL_INPUTS}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(upcast(logits).reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, int((targets != -100).sum())
