"""Inputs: JSON/JSONL read streamed with exact rows and lines; Parquet, save_to_disk folders, dataset folders and
Hub ids through HF datasets; every error names the source and row; the encode cache is keyed by content."""

import json
import os

import pytest

from sft.data.conversation import FieldMapping
from sft.errors import DataError
from sft.data.encoding import EncodeError, EncodeSettings
from sft.data.pipeline import encode_split
from sft.config.specs import parse_spec
from sft.data.sources import (MappedArrowFiles, SourceRow, check_keys, iter_json_array, iter_jsonl, open_source,
                              write_raw_rows)
from sft.data.templates import get_template
from tests.conftest import rejected_rows

MULTI = FieldMapping(messages_key="messages")


def read_all(path: str) -> list[SourceRow]:
    """Every row of one source, in memory (a test oracle: the encode path never reads a whole source)."""
    with open_source(path) as source:
        return source.read(0, len(source))


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path, monkeypatch):
    """No network, and a datasets cache of this test's own (datasets reads both settings at import time)."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    datasets.disable_progress_bars()


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def encode(paths, tokenizer, mapping=MULTI, workers=1, **settings):
    return encode_split(paths, get_template("chatml", tokenizer), tokenizer,
                        EncodeSettings(mapping, sequence_length=settings.pop("sequence_length", 4096), **settings),
                        num_workers=workers)


def chat(question, answer, **assistant_keys):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer, **assistant_keys}]}


# ----- JSON and JSONL files ------------------------------------------------------------------------

def test_json_array_and_jsonl_read_with_rows_and_lines(tmp_path):
    rows = read_all(write(tmp_path, "a.json", '[\n  {"a": 1},\n  {"a": [1,\n 2]}, {"a": 3}\n]\n'))
    assert [row.where.rsplit(" ", 3)[1:] for row in rows] == [["1", "(line", "2)"], ["2", "(line", "3)"], ["3", "(line", "4)"]]
    assert rows[1].value == {"a": [1, 2]} and rows[1].text == '{"a": [1,\n 2]}'
    assert rows[2].source.endswith("a.json:3") and rows[2].where.endswith("a.json row 3 (line 4)")
    rows = read_all(write(tmp_path, "b.jsonl", '{"a": 1}\n\n{"a": 2}\n'))
    assert [row.where.rsplit(" ", 1)[1] for row in rows] == ["1", "3"]
    assert [row.source.rsplit(":", 1)[1] for row in rows] == ["1", "2"] and rows[1].value == {"a": 2}


@pytest.mark.parametrize("block_bytes", [1, 2, 5, 17, 64, 1 << 20])
def test_the_json_array_reader_streams_rows_across_block_edges(tmp_path, block_bytes):
    rows = [{"id": i, "text": "é ü 中文 🙂 \\\" \n" * (i % 4), "nested": {"list": [1, 2.5e-3, None, True, "x" * i]}}
            for i in range(40)]
    pieces = [json.dumps(row, indent=1 if i % 3 == 0 else None, ensure_ascii=i % 2 == 0) for i, row in enumerate(rows)]
    path = write(tmp_path, "rows.json", "\ufeff[\n" + ",\n  ".join(pieces) + "\n]\n")
    expected = list(iter_json_array(path, block_bytes=1 << 20))
    got = list(iter_json_array(path, block_bytes=block_bytes))
    assert got == expected
    assert [json.loads(record.text) for record in got] == rows
    assert [record.line for record in got][:4] == [2, 2 + pieces[0].count("\n") + 1, 2 + pieces[0].count("\n") + 2,
                                                   2 + pieces[0].count("\n") + 3]
    one_line = write(tmp_path, "one_line.json", json.dumps(rows))  # a whole array on one line
    assert [json.loads(record.text) for record in iter_json_array(one_line, block_bytes)] == rows


@pytest.mark.parametrize("text, message", [
    ('[{"a": 1},\n {"a": }\n]', r"bad\.json line 2 column 8: malformed JSON in row 2"),
    ('[{"a": 1}\n {"a": 2}]', r"bad\.json line 2: malformed JSON after row 1: expected ',' or ']'"),
    ('{"a": 1}\n{"a": 2}\n', r"expected a JSON array of row objects \(one object per line\? name the file \.jsonl\)"),
    ('[1, 2]', r"bad\.json row 1 \(line 1\): the record is a JSON int"),
    ('', r"the file is empty"),
    ('[{"a": 1}] extra', r"line 1: unexpected text after the closing"),
    ('[{"a": "x"}, {"b": "unterminated}]', r"bad\.json line 1 column 20: malformed JSON in row 2: Unterminated string"),
    ('[{"a": 1},\n', r"bad\.json line 2 column 1: malformed JSON in row 2: Expecting value"),
])
@pytest.mark.parametrize("block_bytes", [1, 3, 1 << 20])
def test_malformed_json_arrays_name_file_and_line(tmp_path, text, message, block_bytes):
    path = write(tmp_path, "bad.json", text)
    with pytest.raises(DataError, match=message):
        list(iter_json_array(path, block_bytes))
    with pytest.raises(DataError, match=message), open_source(path) as source:
        len(source)


def test_non_utf8_input_is_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl line 2: not UTF-8 text"):
        list(iter_jsonl(str(path)))
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"a": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"latin1\.json: not UTF-8 text \(invalid continuation byte at byte 11\)"):
        list(iter_json_array(str(path), block_bytes=4))


def test_malformed_jsonl_lines_are_rows_with_a_reason(tmp_path):
    path = write(tmp_path, "bad.jsonl", '{"a": 1}\n{"a": 2,}\n[1, 2]\n\n{"a": 3}\n')
    rows = read_all(path)
    assert [row.value for row in rows] == [{"a": 1}, None, None, {"a": 3}]
    assert rows[1].where.endswith("bad.jsonl line 2") and rows[1].error.startswith("malformed JSON: ")
    assert rows[1].error.endswith("(column 9)") and rows[1].raw_text() == '{"a": 2,}'
    assert rows[2].where.endswith("bad.jsonl line 3")
    assert rows[2].error == "the record is a JSON list, expected an object"
    assert rows[3].where.endswith("bad.jsonl line 5") and rows[3].source.endswith("bad.jsonl:4")


def test_jsonl_errors_name_the_line_or_are_written_to_the_rejects_file(tmp_path, byte_tokenizer):
    good = json.dumps(chat("q", "a"))
    path = write(tmp_path, "rows.jsonl", f"{good}\n{good}\nnot json\n{good}\n")
    with pytest.raises(EncodeError, match=r"rows\.jsonl line 3: malformed JSON: Expecting value \(column 1\)"):
        encode([path], byte_tokenizer)
    result = encode([path], byte_tokenizer, on_bad_sample="skip")
    assert result.report["kept"] == 3 and result.rejected == 1
    (reject,) = rejected_rows(result)
    assert reject["source"].endswith("rows.jsonl:3") and reject["row"] == "not json"


def test_a_key_no_row_has_lists_the_keys_and_the_field(tmp_path):
    path = write(tmp_path, "q.json", json.dumps([{"question": "a", "answer": "b"}]))
    with open_source(path) as source:
        values = source.first_values()
    with pytest.raises(DataError, match=r"q\.json: no row has the key 'instruction' named by prompt_key; "
                                        r"the rows have keys: answer, question\. Set prompt_key"):
        check_keys(source.name, values, FieldMapping())
    check_keys(source.name, values, FieldMapping(prompt_key="question", response_key="answer", query_key=None))


def test_specs_that_cannot_be_inputs(tmp_path):
    with pytest.raises(DataError, match=r"file not found: .*missing\.jsonl"):
        parse_spec(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match=r"rows\.csv is neither \.json, \.jsonl nor \.parquet"):
        parse_spec(write(tmp_path, "rows.csv", "a,b\n"))
    with pytest.raises(DataError, match=r"not a json file"):
        parse_spec(write(tmp_path, "rows.json", "[]") + "?split=train")
    with pytest.raises(DataError, match=r"unknown option 'revision'"):
        parse_spec("org/name?revision=main")
    spec = parse_spec("org/name?config=c&split=test")
    assert (spec.path, spec.kind, spec.config, spec.split) == ("org/name", "hub", "c", "test")


# ----- datasets: Parquet, save_to_disk folders, dataset folders, Hub ids ---------------------------

def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


# Stored as Parquet, every message has every key: tool_calls and reasoning_content are null where absent.
TOOL_ROWS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4", "tool_calls": None, "reasoning_content": None}]},
    {"messages": [{"role": "system", "content": "Be brief.", "tool_calls": None},
                  {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue.", "reasoning_content": None}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]},
]


def test_parquet_rows_with_null_keys_encode_like_the_same_rows_in_jsonl(tmp_path, byte_tokenizer):
    import pyarrow.parquet as pq

    parquet = write_parquet(tmp_path / "chat.parquet", TOOL_ROWS)
    stored = pq.read_table(parquet).to_pylist()
    assert stored[0]["messages"][0] == {"role": "user", "content": "What is 2+2?", "tool_calls": None,
                                        "reasoning_content": None}
    plain = [{"messages": [{key: value for key, value in message.items() if value is not None}
                           for message in row["messages"]]} for row in TOOL_ROWS]
    jsonl = write(tmp_path, "chat.jsonl", "\n".join(json.dumps(row) for row in plain))
    from_parquet, from_jsonl = encode([parquet], byte_tokenizer), encode([jsonl], byte_tokenizer)
    assert from_parquet.report["kept"] == 3 and from_parquet.report["rejected"] == {}
    assert from_parquet.dataset["input_ids"] == from_jsonl.dataset["input_ids"]
    assert from_parquet.dataset["labels"] == from_jsonl.dataset["labels"]
    assert from_parquet.dataset["source"][2].endswith("chat.parquet:3")


def test_errors_from_parquet_rows_name_the_file_and_row(tmp_path, byte_tokenizer):
    rows = [chat("q", "a"), chat("q", "a"), {"messages": [{"role": "user", "content": "only a question"}]}]
    parquet = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(EncodeError, match=r"bad\.parquet row 3: .*no assistant turn"):
        encode([parquet], byte_tokenizer)
    result = encode([parquet], byte_tokenizer, on_bad_sample="skip")
    assert result.report["kept"] == 2 and [r["source"] for r in rejected_rows(result)] == [f"{parquet}:3"]
    with pytest.raises(DataError, match=r"bad\.parquet: no row has the key 'conversations' named by messages_key; "
                                        r"the rows have keys: messages"):
        encode([parquet], byte_tokenizer, mapping=FieldMapping(messages_key="conversations"))


def test_save_to_disk_folders_dataset_and_dataset_dict(tmp_path):
    import datasets

    rows = [chat(f"q{i}", f"a{i}") for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(str(tmp_path / "dict"))
    single = read_all(str(tmp_path / "single"))
    assert [row.value for row in single] == rows and single[4].where == f"{tmp_path / 'single'} row 5"
    assert [row.value for row in read_all(str(tmp_path / "dict"))] == rows[:3]
    test = read_all(f"{tmp_path / 'dict'}?split=test")
    assert [row.value for row in test] == rows[3:]
    assert test[1].where == f"{tmp_path / 'dict'} (split test) row 2" and test[1].source == f"{tmp_path / 'dict'}?split=test:2"
    with pytest.raises(DataError, match=r"no split 'validation'; the folder has splits: train, test"):
        read_all(f"{tmp_path / 'dict'}?split=validation")


def test_dataset_folders_load_like_hub_ids_with_config_and_split(tmp_path, monkeypatch):
    rows = [chat(f"q{i}", f"a{i}") for i in range(4)]
    write_parquet(tmp_path / "org" / "name" / "data" / "train-00000-of-00001.parquet", rows[:3])
    write_parquet(tmp_path / "org" / "name" / "data" / "test-00000-of-00001.parquet", rows[3:])
    write_parquet(tmp_path / "org" / "two" / "alpha" / "train.parquet", rows[:1])
    write_parquet(tmp_path / "org" / "two" / "beta" / "train.parquet", rows[1:])
    write(tmp_path, "org/two/README.md", "---\nconfigs:\n"
          "- config_name: alpha\n  data_files:\n  - split: train\n    path: alpha/*.parquet\n"
          "- config_name: beta\n  data_files:\n  - split: train\n    path: beta/*.parquet\n---\n# Two configs\n")
    monkeypatch.chdir(tmp_path)  # so that org/name is a folder here, spelled as a Hub id
    train = read_all("org/name")
    assert [row.value for row in train] == rows[:3] and train[0].where == "org/name (split train) row 1"
    assert [row.value for row in read_all("org/name?split=test")] == rows[3:]
    beta = read_all("org/two?config=beta&split=train")
    assert [row.value for row in beta] == rows[1:] and beta[2].where == "org/two (config beta, split train) row 3"
    assert beta[2].source == "org/two?config=beta&split=train:3"
    with pytest.raises(DataError, match=r"org/name\?split=validation: no split 'validation'; the dataset has splits: train, test"):
        read_all("org/name?split=validation")
    with pytest.raises(DataError, match=r"org/two: the dataset has several configs; choose one with \?config=NAME: alpha, beta"):
        read_all("org/two")
    with pytest.raises(DataError, match=r"no config 'gamma'; the dataset has configs: alpha, beta"):
        read_all("org/two?config=gamma")


def test_an_unknown_hub_id_is_a_data_error_naming_it():
    with pytest.raises(DataError, match=r"nosuch-org/nosuch-dataset: cannot reach the Hub for dataset 'nosuch-org/nosuch-dataset'"):
        read_all("nosuch-org/nosuch-dataset")


# ----- dataset folders of JSON files: our reader, file by file; what datasets gives back is checked -------

def mixed_content_rows(count=6):
    """Rows whose assistant content is a string in some rows and a list of parts in others (both valid)."""
    return [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"hello {i}" if i % 2 == 0 else
                           [{"type": "text", "text": f"hello {i}"}]}]} for i in range(count)]


def test_a_folder_of_jsonl_with_mixed_content_types_encodes_like_the_file_itself(tmp_path, byte_tokenizer):
    """datasets' JSON builder turns a column whose type varies into JSON strings: the folder trained on
    '"hello 0"' with its quotes, exit 0. The folder's files are read by our reader instead."""
    text = "\n".join(json.dumps(row) for row in mixed_content_rows()) + "\n"
    folder = tmp_path / "chat"
    direct = write(tmp_path, "chat.jsonl", text)
    write(tmp_path, "chat/data.jsonl", text)
    from_folder, from_file = encode([str(folder)], byte_tokenizer), encode([direct], byte_tokenizer)
    assert from_folder.report["kept"] == 6
    assert from_folder.dataset["input_ids"] == from_file.dataset["input_ids"]
    assert from_folder.dataset["labels"] == from_file.dataset["labels"]
    answer = [token for token in from_folder.dataset[0]["labels"] if token != -100]
    assert byte_tokenizer.decode(answer).startswith("hello 0")
    assert from_folder.dataset["source"][1] == f"{folder / 'data.jsonl'}:2"
    assert read_all(str(folder))[1].where == f"{folder / 'data.jsonl'} line 2"


def test_a_folder_of_json_files_with_different_columns_reads_each_file(tmp_path, byte_tokenizer):
    """Two JSONL files with different columns made datasets raise DatasetGenerationError; each file is its own
    source now, JSON Lines in a .json file included (datasets reads those as JSON Lines too)."""
    from sft.data.sources import source_fingerprint

    folder = tmp_path / "mixed"
    write(tmp_path, "mixed/a.jsonl", json.dumps(chat("q a", "a a")) + "\n")
    write(tmp_path, "mixed/b.jsonl", json.dumps({**chat("q b", "a b"), "id": 7}) + "\n")
    write(tmp_path, "mixed/c.json", json.dumps(chat("q c", "a c")) + "\n" + json.dumps(chat("q d", "a d")) + "\n")
    write(tmp_path, "mixed/d.json", json.dumps([chat("q e", "a e")], indent=1))
    result = encode([str(folder)], byte_tokenizer)
    assert result.report["kept"] == 5
    assert result.dataset["source"] == [f"{folder / name}" for name in ("a.jsonl:1", "b.jsonl:1", "c.json:1", "c.json:2",
                                                                          "d.json:1")]
    rows = read_all(str(folder))
    assert [row.where for row in rows][2:] == [f"{folder / 'c.json'} line 1", f"{folder / 'c.json'} line 2",
                                               f"{folder / 'd.json'} row 1 (line 2)"]
    first = source_fingerprint(str(folder))
    os.utime(folder / "b.jsonl")
    assert source_fingerprint(str(folder)) == first
    write(tmp_path, "mixed/b.jsonl", json.dumps(chat("q b", "another")) + "\n")
    assert source_fingerprint(str(folder)) != first


def test_json_folders_choose_splits_and_refuse_what_they_cannot_read(tmp_path, byte_tokenizer):
    write(tmp_path, "splits/train.jsonl", json.dumps(chat("q1", "a1")) + "\n")
    write(tmp_path, "splits/test.jsonl", json.dumps(chat("q2", "a2")) + "\n")
    assert [row.value for row in read_all(f"{tmp_path / 'splits'}?split=test")] == [chat("q2", "a2")]
    with pytest.raises(DataError, match=r"no split 'validation'; the dataset has splits: train, test"):
        read_all(f"{tmp_path / 'splits'}?split=validation")
    (tmp_path / "packed").mkdir()
    import gzip

    with gzip.open(tmp_path / "packed" / "rows.jsonl.gz", "wt") as handle:
        handle.write(json.dumps(chat("q", "a")) + "\n")
    with pytest.raises(DataError, match=r"rows\.jsonl\.gz: only plain \.json and \.jsonl files are read"):
        read_all(str(tmp_path / "packed"))


def test_the_encode_script_trains_the_answer_of_a_mixed_folder_without_quotes(tmp_path):
    """The reported bug, end to end: scripts/encode.py, the Qwen3 tokenizer, its own template."""
    import subprocess
    import sys

    from sft.data.pipeline import load_encoded
    from tests.conftest import ROOT, shared_path

    tokenizer = shared_path("tokenizers", "qwen3")
    write(tmp_path, "chat/data.jsonl", "\n".join(json.dumps(row) for row in mixed_content_rows(4)) + "\n")
    config = write(tmp_path, "run.yaml", f"pretrain: {tokenizer}\noutput_dir: {tmp_path / 'out'}\nsequence_length: 512\n"
                   f"messages_key: messages\nsft_train:\n  data_args:\n    file_name: {tmp_path / 'chat'}\n"
                   "    template: native\n")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "encode.py"), "--config_path", config,
                             "--out", str(tmp_path / "enc")], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")})
    assert result.returncode == 0, result.stderr
    from transformers import AutoTokenizer

    qwen3 = AutoTokenizer.from_pretrained(tokenizer)
    encoded = load_encoded(str(tmp_path / "enc" / "train"))
    answers = [qwen3.decode([token for token in row["labels"] if token != -100]) for row in encoded]
    assert [answer.split("</think>")[-1].strip() for answer in answers] == [f"hello {i}<|im_end|>" for i in range(4)]


def test_a_saved_dataset_with_a_json_column_is_read_decoded(tmp_path, byte_tokenizer):
    """datasets stores a Json feature (its answer to mixed types) as JSON text; its Arrow files read directly
    gave '"hello 0"'. The rows are decoded by the dataset's own features."""
    import datasets

    rows = mixed_content_rows()
    saved = datasets.Dataset.from_list(rows, on_mixed_types="use_json")
    assert isinstance(saved.features["messages"].feature["content"], datasets.Json)
    saved.save_to_disk(str(tmp_path / "saved"))
    assert [row.value for row in read_all(str(tmp_path / "saved"))] == rows
    jsonl = write(tmp_path, "rows.jsonl", "\n".join(json.dumps(row) for row in rows))
    from_saved, from_file = encode([str(tmp_path / "saved")], byte_tokenizer), encode([jsonl], byte_tokenizer)
    assert from_saved.dataset["labels"] == from_file.dataset["labels"]


def test_media_columns_are_refused_by_name():
    import datasets

    from sft.data.sources.datasets_source import row_decoder

    assert row_decoder(datasets.Features({"text": datasets.Value("string"),
                                          "turns": datasets.List({"role": datasets.Value("string")})}), "d") is None
    with pytest.raises(DataError, match=r"d: column 'picture' holds Image data, which cannot be read as rows of text"):
        row_decoder(datasets.Features({"text": datasets.Value("string"), "picture": datasets.Image()}), "d")


def test_parquet_folder_files_with_other_columns_are_named(tmp_path):
    """datasets fails on them with 'An error occurred while generating the dataset', naming no file."""
    write_parquet(tmp_path / "pq" / "a.parquet", [chat("q", "a")])
    write_parquet(tmp_path / "pq" / "b.parquet", [{**chat("q", "a"), "id": 1}])
    with pytest.raises(DataError, match=r"pq: .*b\.parquet has the columns messages, id but .*a\.parquet has messages;"):
        read_all(str(tmp_path / "pq"))


def test_rows_come_through_datasets_when_its_files_are_not_its_rows(tmp_path):
    """A split slice (or an indices mapping) is not the Arrow files' rows in order: the public row check sees it."""
    import datasets

    from sft.data.sources.datasets_source import _same_rows

    rows = [chat(f"q{i}", f"a{i}") for i in range(5)]
    write_parquet(tmp_path / "org" / "data" / "train-00000-of-00001.parquet", rows)
    assert [row.value for row in read_all(f"{tmp_path / 'org'}?split=train[1:3]")] == rows[1:3]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    loaded = datasets.load_from_disk(str(tmp_path / "saved"))
    files = MappedArrowFiles([entry["filename"] for entry in loaded.cache_files], loaded.column_names)
    assert _same_rows(files, loaded)
    assert not _same_rows(files, loaded.shuffle(seed=1, keep_in_memory=True))
    assert not _same_rows(files, loaded.select([0, 1, 2, 4, 3]))
    files.close()


def test_the_cache_key_follows_the_content_of_a_parquet_file(tmp_path, byte_tokenizer, byte_tokenizer_dir):
    from sft.config import load_config
    from sft.data.build import cache_key

    parquet = write_parquet(tmp_path / "chat.parquet", [chat("q", "a")])
    config_path = write(tmp_path, "run.yaml", f"pretrain: {byte_tokenizer_dir}\nmessages_key: messages\n"
                                              f"sft_train:\n  data_args:\n    file_name: {parquet}\n    template: chatml\n")
    config = load_config(config_path, [])
    first, _ = cache_key(config, byte_tokenizer)
    os.utime(parquet)  # a newer timestamp alone changes nothing
    assert cache_key(config, byte_tokenizer)[0] == first
    write_parquet(tmp_path / "chat.parquet", [chat("q", "another answer")])
    assert cache_key(config, byte_tokenizer)[0] != first


# ----- reading in workers, memory ------------------------------------------------------------------

def test_workers_read_their_own_chunks_and_keep_the_order(tmp_path, byte_tokenizer, monkeypatch):
    import sft.data.pipeline

    monkeypatch.setattr(sft.data.pipeline, "CHUNK_ROWS", 3)
    rows = [chat(f"question {i}", f"answer {i}") for i in range(20)]
    rows[7]["messages"][1]["content"] = ""  # a rejected row, in a worker
    parquet = write_parquet(tmp_path / "a.parquet", rows[:10])
    jsonl = write(tmp_path, "b.jsonl", "\n".join(json.dumps(row) for row in rows[10:]))
    one = encode([parquet, jsonl], byte_tokenizer, on_bad_sample="skip")
    two = encode([parquet, jsonl], byte_tokenizer, on_bad_sample="skip", workers=2)
    assert one.dataset["source"] == two.dataset["source"] and one.dataset["input_ids"] == two.dataset["input_ids"]
    assert len(two.dataset) == 19 and two.dataset["source"][9].endswith("b.jsonl:1")
    assert [r["source"] for r in rejected_rows(two)] == [f"{parquet}:8"]
    assert one.report == two.report
    with pytest.raises(EncodeError, match=r"a\.parquet row 8: "):  # raised in a worker, named in the main process
        encode([parquet, jsonl], byte_tokenizer, workers=2)


def test_workers_end_when_the_caller_records_sigterm_instead_of_dying(tmp_path, byte_tokenizer, monkeypatch):
    """A training loop records SIGTERM to save first; forked workers inherit handlers, and a busy one that only
    recorded it would outlive Pool.terminate and hang the caller (it did, in CI, after an in-process training
    test)."""
    import multiprocessing
    import signal
    import time

    import sft.data.pipeline

    real = sft.data.pipeline._encode_chunk

    def slow_after_the_first(state, chunk):  # patched before the fork: the workers run it too
        if chunk.start > 0:
            time.sleep(3)
        return real(state, chunk)

    monkeypatch.setattr(sft.data.pipeline, "CHUNK_ROWS", 3)
    monkeypatch.setattr(sft.data.pipeline, "_encode_chunk", slow_after_the_first)
    rows = [chat(f"question {i}", f"answer {i}") for i in range(12)]
    rows[1]["messages"][1]["content"] = ""
    jsonl = write(tmp_path, "a.jsonl", "\n".join(json.dumps(row) for row in rows))

    def too_long(*_):
        for child in multiprocessing.active_children():
            child.kill()
        raise TimeoutError("the worker pool did not end")

    recorded: list = []
    previous = signal.signal(signal.SIGTERM, lambda number, _frame: recorded.append(number))
    alarm = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(60)
    started = time.monotonic()
    try:  # the first chunk fails while the other worker is busy: the pool is terminated with work in flight
        with pytest.raises(EncodeError, match=r"a\.jsonl line 2: "):
            encode([jsonl], byte_tokenizer, workers=2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, alarm)
        signal.signal(signal.SIGTERM, previous)
    assert time.monotonic() - started < 30 and recorded == []  # ended by SIGTERM, not by the alarm


def test_the_encoded_folder_loads_with_datasets_also_in_several_files(tmp_path):
    import pyarrow as pa

    from sft.data.pipeline import SHARDS_FILE, DatasetFolderWriter, load_encoded, output_features

    writer = DatasetFolderWriter(str(tmp_path / "out"), output_features(), shard_bytes=1)
    schema = output_features().arrow_schema
    for start in range(0, 6, 2):
        writer.write(pa.table({"input_ids": [[start], [start + 1, 5]], "labels": [[-100], [start + 1, 5]],
                               "length": [1, 2], "source": [f"x:{start}", f"x:{start + 1}"]}, schema=schema))
    assert writer.finish() == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    assert sorted(os.listdir(tmp_path / "out")) == [f"data-0000{i}-of-00003.arrow" for i in range(3)] + [SHARDS_FILE]
    loaded = load_encoded(str(tmp_path / "out"))  # datasets' Dataset.from_file + concatenate_datasets, mapped
    assert loaded["source"] == [f"x:{i}" for i in range(6)] and loaded[3]["input_ids"] == [3, 5]
    assert loaded.features["input_ids"] == output_features()["input_ids"]
    os.remove(tmp_path / "out" / "data-00001-of-00003.arrow")
    with pytest.raises(DataError, match=r"data-00001-of-00003\.arrow listed in shards\.json is missing"):
        load_encoded(str(tmp_path / "out"))


def test_load_encoded_reads_save_to_disk_folders_too(tmp_path):
    """scripts/pack.py writes its rows with Dataset.save_to_disk; load_encoded reads those with load_from_disk."""
    import datasets

    from sft.data.pipeline import load_encoded

    datasets.Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[-100, 2]]}).save_to_disk(str(tmp_path / "packed"))
    assert load_encoded(str(tmp_path / "packed"))["labels"] == [[-100, 2]]


def test_reading_mapped_rows_gives_the_pages_back(tmp_path):
    from sft.data.sources import RawRow

    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("needs Linux /proc")
    path = str(tmp_path / "rows.arrow")
    write_raw_rows((RawRow(i, i, "x" * 2000) for i in range(10_000)), path)  # 20 MB
    rows = MappedArrowFiles([path])
    assert len(rows.to_pylist(0, 10_000)) == 10_000 and rows.to_pylist(9_999, 10_000)[0]["row"] == 9_999

    def resident_kib():
        lines = open("/proc/self/smaps").read().splitlines()
        for index, line in enumerate(lines):
            if line.endswith(path):
                return next(int(entry.split()[1]) for entry in lines[index + 1:] if entry.startswith("Rss:"))
        raise AssertionError("mapping not found")

    assert resident_kib() < 1024  # 20 MB were read; none of it stays counted in this process
    rows.close()
