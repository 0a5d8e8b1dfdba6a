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
