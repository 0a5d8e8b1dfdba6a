"""scripts/encode.py end to end: files written, report, rejects, cache reuse and invalidation, workers."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, shared_path

ROWS = [{"instruction": f"Question {i}?", "input": "" if i % 3 else f"context {i}", "output": f"Answer number {i}."}
        for i in range(600)]
ROWS[5]["output"] = ""  # a bad row
ROWS[7]["output"] = "A long answer. " * 20  # truncated at sequence_length


def run_encode(*args, check=True):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "encode.py"), *args],
                            capture_output=True, text=True, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(result.stdout + result.stderr)
    return result


@pytest.fixture
def setup(tmp_path, byte_tokenizer_dir):
    train = tmp_path / "train.json"
    train.write_text(json.dumps(ROWS))
    validation = tmp_path / "val.jsonl"
    validation.write_text("\n".join(json.dumps(r) for r in ROWS[10:20]) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"pretrain: {byte_tokenizer_dir}\noutput_dir: {tmp_path / 'out'}\nsequence_length: 160\n"
        f"validation:\n  data_args:\n    file_name: {validation}\n"
        f"sft_train:\n  data_args:\n    file_name: {train}\n    template: chatml\n    on_bad_sample: skip\n"
    )
    return tmp_path, str(config)


def test_encode_writes_splits_report_and_rejects(setup):
    from sft.data.pipeline import load_encoded

    tmp_path, config = setup
    out = tmp_path / "enc"
    result = run_encode("--config_path", config, "--out", str(out))
    assert "[train] rows read 600 | kept 599" in result.stdout
    assert "rejected       1  empty response" in result.stdout
    assert "[validation] rows read 10 | kept 10" in result.stdout
    train = load_encoded(str(out / "train"))
    assert len(train) == 599 and {"input_ids", "labels"} <= set(train.column_names)
    assert isinstance(train[0]["input_ids"][0], int)
    assert len(load_encoded(str(out / "validation"))) == 10
    rejects = [json.loads(line) for line in (out / "rejects-train.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["source"].endswith("train.json:6") and "empty response" in rejects[0]["reason"]
    meta = json.loads((out / "encode_meta.json").read_text())
    assert meta["reports"]["train"]["kept"] == 599 and meta["reports"]["train"]["truncated"] > 0


def test_second_run_reuses_the_cache_and_changed_inputs_do_not(setup):
    tmp_path, config = setup
    first = run_encode("--config_path", config)
    assert "Wrote" in first.stdout
    folder = first.stdout.strip().splitlines()[-1].split()[-1]
    assert folder.startswith(str(tmp_path / "out" / "encoded"))
    again = run_encode("--config_path", config)
    assert "Reusing encoded data" in again.stdout and again.stdout.strip().endswith(folder)
    longer = run_encode("--config_path", config, "--sequence_length", "400")
    assert "Wrote" in longer.stdout and not longer.stdout.strip().endswith(folder)
    other_template = run_encode("--config_path", config, "--global_template", "alpaca")
    assert "Wrote" in other_template.stdout
    rows = json.loads((tmp_path / "train.json").read_text())
    rows[0]["output"] = "A changed answer."
    (tmp_path / "train.json").write_text(json.dumps(rows))
    edited = run_encode("--config_path", config)
    assert "Wrote" in edited.stdout and not edited.stdout.strip().endswith(folder)


def test_two_workers_give_the_same_dataset(setup):
    from sft.data.pipeline import load_encoded

    tmp_path, config = setup
    run_encode("--config_path", config, "--out", str(tmp_path / "w1"))
    run_encode("--config_path", config, "--out", str(tmp_path / "w2"), "--sft_train.data_args.preprocessing_num_workers", "2")
    one, two = load_encoded(str(tmp_path / "w1" / "train")), load_encoded(str(tmp_path / "w2" / "train"))
    assert one["input_ids"] == two["input_ids"] and one["labels"] == two["labels"] and one["source"] == two["source"]


def test_bad_input_exits_non_zero_with_file_and_row(setup):
    tmp_path, config = setup
    result = run_encode("--config_path", config, "--out", str(tmp_path / "e"),
                        "--sft_train.data_args.on_bad_sample", "error", check=False)
    assert result.returncode == 1
    assert "train.json row 6 (line 1): empty response" in result.stderr
    assert not (tmp_path / "e").exists()  # nothing half-written
    missing = run_encode("--config_path", config, "--prompt_key", "question", check=False)
    assert missing.returncode == 1 and "no row has the key 'question' named by prompt_key" in missing.stderr


def test_real_tokenizer_and_workers(tmp_path):
    tokenizer = shared_path("tokenizers", "qwen2.5-instruct")
    data = shared_path("datasets", "alpaca_en_demo.json")
    config = tmp_path / "run.yaml"
    config.write_text(f"pretrain: {tokenizer}\noutput_dir: {tmp_path}\nsequence_length: 512\n"
                      f"sft_train:\n  data_args:\n    file_name: {data}\n    preprocessing_num_workers: 2\n")
    result = run_encode("--config_path", str(config), "--out", str(tmp_path / "enc"))
    assert "[train] rows read 999 | kept 999 | samples 999 (split 0) | truncated" in result.stdout
    assert "length p50" in result.stdout and "supervised" in result.stdout


def test_pack_refuses_samples_longer_than_its_rows_in_one_line(setup):
    tmp_path, config = setup
    run_encode("--config_path", config, "--out", str(tmp_path / "enc"))  # sequence_length 160
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "pack.py"), "--config_path", config,
                             "--sft_train.data_args.encoded_path", str(tmp_path / "enc"), "--sequence_length", "64",
                             "--out", str(tmp_path / "packed")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: a sample of" in result.stderr and "does not fit a row of 64" in result.stderr
    assert not (tmp_path / "packed").exists()


def test_an_encoded_folder_is_checked_against_the_run(setup):
    """Issue 10 item 7: a folder given as encoded_path must have been encoded the way this run would encode."""
    from sft.errors import ConfigError
    from sft.config import load_config
    from sft.data.build import check_encoded_folder, load_tokenizer

    tmp_path, config = setup
    out = tmp_path / "enc"
    run_encode("--config_path", config, "--out", str(out))
    packed = tmp_path / "packed"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "pack.py"), "--config_path", config,
                    "--sft_train.data_args.encoded_path", str(out), "--out", str(packed)], check=True, cwd=ROOT,
                   capture_output=True)

    def check(folder, *overrides):
        run = load_config(config, list(overrides))
        return check_encoded_folder(run, str(folder), load_tokenizer(run.pretrain))

    assert check(out)["cache_key"] and check(packed)["packed_sequence_length"] == 160
    with pytest.raises(ConfigError, match=r"encoded_path: .*enc was encoded differently from this run: template: "
                                          r"'chatml' there, 'native' here; sequence_length: 160 there, 200 here"):
        check(out, "--sft_train.data_args.template", "native", "--sequence_length", "200")
    with pytest.raises(ConfigError, match=r"sequence_length: 160 there, 128 here"):
        check(packed, "--sequence_length", "128")
    with pytest.raises(ConfigError, match=r"field mapping: prompt_key 'instruction' there, 'question' here"):
        check(out, "--prompt_key", "question")
    with pytest.raises(ConfigError, match=r"has no encode_meta\.json"):
        check(tmp_path)
