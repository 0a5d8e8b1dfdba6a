"""bench/gpu_suite.py without a GPU: argument handling and the plan, the measurements and the report with its goals
from canned results, gpu_check.sh's resume lines, a budget that skips everything cleanly, and the dry run end to
end (tiny model, byte-level tokenizer, 2 steps, one case of ours and TRL's on CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SHARED_DATA, shared_path


def _load():
    if "gpu_suite" not in sys.modules:  # bench/ is no package
        spec = importlib.util.spec_from_file_location("gpu_suite", os.path.join(ROOT, "bench", "gpu_suite.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_suite"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_suite"]


suite = _load()


# ----- arguments and the plan ----------------------------------------------------------------------------------
def test_arguments_default_to_the_gpu_run_and_the_dry_run_shrinks_it():
    args = suite.parse_args([])
    assert (args.dry_run, args.steps, args.sequence_length, args.budget_s, args.tokenizer) == (False, 24, 4096, 540, "qwen")
    for flag in ("--dry-run", "--cpu-smoke"):
        args = suite.parse_args([flag])
        assert (args.dry_run, args.steps, args.sequence_length, args.tokenizer) == (True, 2, 512, "byte")
    args = suite.parse_args(["--steps", "30", "--budget_s", "300", "--started_at", "100", "--out", "/x"])
    assert (args.steps, args.budget_s, args.started_at, args.out) == (30, 300, 100, "/x")
    with pytest.raises(SystemExit):
        suite.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        suite.parse_args(["--no-such-flag"])


def test_shapes_are_the_real_qwen25_configs():
    small, big = suite.SHAPES["0.5b"], suite.SHAPES["1.5b"]
    assert (small["hidden_size"], small["num_hidden_layers"], small["num_attention_heads"], small["num_key_value_heads"],
            small["intermediate_size"]) == (896, 24, 14, 2, 4864)
    assert (big["hidden_size"], big["num_hidden_layers"], big["num_attention_heads"], big["num_key_value_heads"],
            big["intermediate_size"]) == (1536, 28, 12, 2, 8960)
    for shape in (small, big):
        assert shape["vocab_size"] == 151936 and shape["tie_word_embeddings"] is True


def test_plan_puts_the_goal_cases_first_and_selection_takes_names_or_variants():
    cases = suite.plan(dry_run=False)
    assert [c.name for c in cases[:2]] == ["1.5b-sharegpt/varlen", "1.5b-sharegpt/trl"]
    assert {c.variant for c in cases} == set(suite.VARIANTS)
    assert all(0 < c.min_s <= c.cap_s for c in cases)
    chosen, skipped = suite.select(cases, "varlen,trl", dry_run=False)
    assert [c.name for c in chosen] == ["1.5b-sharegpt/varlen", "1.5b-sharegpt/trl", "moe-sharegpt/varlen",
                                        "moe-sharegpt/trl", "0.5b-alpaca/varlen", "0.5b-alpaca/trl"] and skipped == []
    chosen, _ = suite.select(cases, " 0.5b-alpaca/padded ,resume", dry_run=False)
    assert [c.name for c in chosen] == ["resume", "0.5b-alpaca/padded"]
    with pytest.raises(SystemExit, match="unknown nope"):
        suite.select(cases, "varlen,nope", dry_run=False)
    dry = suite.plan(dry_run=True)
    chosen, skipped = suite.select(dry, None, dry_run=True)
    assert {c.variant for c, _ in skipped} == {"zero3", "resume"} and all("skipped on CPU" in why for _, why in skipped)
    assert "resume" not in {c.variant for c in chosen}
    chosen, skipped = suite.select(dry, "resume", dry_run=True)  # named: it runs, on the CPU too
    assert [c.name for c in chosen] == ["resume"] and skipped == []


def test_list_prints_the_plan_and_runs_nothing(capsys):
    assert suite.main(["--list", "--cases", "trl"]) == 0
    out = capsys.readouterr().out
    assert "1.5b-sharegpt/trl" in out and "0.5b-alpaca/trl" in out and "varlen" not in out


def test_datasheet_peak_by_device_name():
    assert suite.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert suite.datasheet_peak("NVIDIA H200") == 989e12
    assert suite.datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert suite.datasheet_peak("CPU") is None


# ----- measurements --------------------------------------------------------------------------------------------
def _steps(count, tokens=4000.0, seconds=0.5):
    return [suite.StepRecord(tokens, tokens * 1.25, 4, tokens / 2, seconds * (3 if i == 0 else 1)) for i in range(count)]


def test_summary_leaves_out_the_warm_up_third_and_counts_flops_per_step():
    assert [suite.warmup_steps(n) for n in (0, 1, 2, 3, 24)] == [0, 0, 1, 1, 8]
    summary = suite.summarize(_steps(24), lambda length, fraction: 100.0 * length + 10.0 * fraction)
    assert summary.steps == 16 and summary.tokens_per_second == pytest.approx(8000.0)
    assert summary.padding == pytest.approx(0.2) and summary.samples_per_step == 4
    assert summary.flops_per_second == pytest.approx(8000.0 * (100.0 * 1000 + 10.0 * 0.5))
    assert suite.summarize([], None) is None


def test_mfu_uses_the_projects_flop_formula_on_the_exact_parameter_count(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from sft.train.modeling import train_flops_per_token

    config = Qwen2Config(vocab_size=300, **{k: v for k, v in suite.SHAPES["tiny"].items()})
    config.save_pretrained(tmp_path)
    flops_per_token, parameters = suite.flop_model(str(tmp_path))
    assert parameters == sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert flops_per_token(1000, 0.5) == train_flops_per_token(config, parameters, 1000, 0.5)
    device = suite.Device("NVIDIA H100 80GB HBM3", True, 989e12, 790e12)
    result = suite.Result("g/varlen", "varlen", "1.5b", "sharegpt", "ok")
    suite.fill_measurements(result, _steps(6), flops_per_token, device)
    expected = 8000.0 * flops_per_token(1000, 0.5)
    assert result.mfu == pytest.approx(expected / 989e12) and result.mfu_measured_peak == pytest.approx(expected / 790e12)


def test_ours_steps_come_from_metrics_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "data/packing_fill_ratio": 0.98}]
    for step in (1, 2, 3):
        rows.append({"step": step, "perf/tokens_per_second": 1000.0 * step, "time/step": 0.5,
                     "perf/samples_per_second": 8.0, "perf/padding_ratio": 0.5, "perf/supervised_fraction": 0.25,
                     "memory/peak_gib": float(step)})
    rows.append({"step": 3, "time/checkpoint": 1.0})
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 4, "perf/tok')  # a torn last line
    records = suite.ours_records(str(path))
    assert len(records) == 3 == suite.last_logged_step(str(path))
    assert records[1] == suite.StepRecord(1000.0, 2000.0, 4.0, 250.0, 0.5)
    assert suite.ours_peak_bytes(str(path)) == 3 * 2**30
    assert suite.ours_records(str(tmp_path / "none.jsonl")) == []
    log = tmp_path / "train.log"
    log.write_text("model 1.50M parameters (all trainable), attention varlen, strategy ddp_train, 1 process(es)\n")
    assert suite.attention_used(str(log)) == "varlen"


def test_trl_worker_lines_parse_and_a_liger_fallback_restarts_the_count():
    step = json.dumps({"tokens": 10, "padded": 10, "samples": 2, "targets": 5, "seconds": 0.1})
    text = "\n".join([f"SUITE_STEP {step}", "SUITE_RESET off (liger failed: X)", f"SUITE_STEP {step}", "noise",
                      f"SUITE_STEP {step}", 'SUITE_RESULT {"peak_alloc_bytes": 1024, "liger": "off"}'])
    records, info = suite.parse_trl_output(text)
    assert len(records) == 2 and records[0].samples == 2 and info == {"peak_alloc_bytes": 1024, "liger": "off"}


GPU_CHECK_RESUME = """resumed from checkpoint-6
resume_check straight run again vs straight: max loss rel diff {again} | final weights bitwise equal
resume_check stopped + resumed vs straight: max loss rel diff {resumed} | final weights rel diff 1.0e-04 overall
"""


def test_resume_verdict_from_gpu_check_lines():
    status, note = suite.parse_resume_output(GPU_CHECK_RESUME.format(again="0.00e+00", resumed="2.00e-04"), 0)
    assert status == "PASS" and "resumed from checkpoint-6" in note
    assert suite.parse_resume_output(GPU_CHECK_RESUME.format(again="5.00e-03", resumed="4.00e-03"), 0)[0] == "PASS"
    assert suite.parse_resume_output(GPU_CHECK_RESUME.format(again="0.00e+00", resumed="2.00e-02"), 0)[0] == "FAIL"
    failed = "resume_check: FAILED, the stopped run did not stop before step 12 or did not resume: no resume\n"
    assert suite.parse_resume_output(failed, 1) == ("FAIL", failed.strip())
    assert suite.parse_resume_output("Traceback ...\n", 1)[0] == "FAIL"
    assert suite.parse_resume_output("resumed from checkpoint-6\n", None)[0] == "timeout"


# ----- the report and its goals --------------------------------------------------------------------------------
def _result(case, status="ok", tokens=None, mfu=None, **extra):
    group, variant = case.split("/") if "/" in case else (None, case)
    shape, data = (group.split("-") if group else (None, None))
    return suite.Result(case, variant, shape, data, status, tokens_per_second=tokens, mfu=mfu, **extra)


def test_goals_pass_and_fail_with_their_numbers():
    results = [_result("1.5b-sharegpt/varlen", tokens=52000.0, mfu=0.43, mfu_measured_peak=0.54),
               _result("1.5b-sharegpt/trl", tokens=30000.0, mfu=0.25),
               _result("1.5b-sharegpt/padded", tokens=45000.0),
               _result("1.5b-sharegpt/zero3", tokens=90000.0),  # ZeRO-3 is not "ours" for the TRL comparison
               _result("0.5b-alpaca/varlen", tokens=100000.0, mfu=0.30),
               _result("0.5b-alpaca/trl", tokens=90000.0)]
    goals = {g["goal"]: g for g in suite.evaluate_goals(results)}
    mfu = goals["packed varlen MFU >= 40% on the 1.5B shape (1.5b-sharegpt)"]
    assert mfu["verdict"] == "PASS" and "43.0%" in mfu["detail"] and "54.0%" in mfu["detail"]
    big = goals["ours >= 1.3x TRL's tokens/s (1.5b-sharegpt)"]
    assert big["verdict"] == "PASS" and "52,000 vs TRL 30,000 tokens/s = 1.73x" in big["detail"]
    small = goals["ours >= 1.3x TRL's tokens/s (0.5b-alpaca)"]
    assert small["verdict"] == "FAIL" and "1.11x" in small["detail"]
    assert len(goals) == 3  # no MFU goal for the 0.5B shape

    results[0] = _result("1.5b-sharegpt/varlen", "failed", note="unknown choice varlen")
    results[1] = _result("1.5b-sharegpt/trl", "timeout")
    goals = {g["goal"]: g for g in suite.evaluate_goals(results)}
    mfu = goals["packed varlen MFU >= 40% on the 1.5B shape (1.5b-sharegpt)"]
    assert mfu["verdict"] == "not evaluated" and mfu["detail"] == "varlen case: failed: unknown choice varlen"
    assert goals["ours >= 1.3x TRL's tokens/s (1.5b-sharegpt)"]["detail"] == "TRL case: timeout"


def test_report_table_lists_every_case_and_is_written_to_out(tmp_path):
    results = [_result("1.5b-sharegpt/varlen", tokens=52000.0, mfu=0.43, peak_alloc_gib=51.2, peak_smi_gib=55.0,
                       attention="varlen", steps=16, wall_s=41.0, note="micro-batch 1 rows x 2"),
               _result("1.5b-sharegpt/trl", tokens=39000.0, mfu=0.3, note="liger on | x"),
               _result("resume", "PASS", note="resumed from checkpoint-6"),
               _result("0.5b-alpaca/padded", "skipped", note="out of time: 20 s left, needs ~35 s")]
    header = {"device": "NVIDIA H100 80GB HBM3", "datasheet_tflops": 989.0, "measured_tflops": 790.0, "budget": "540 s"}
    text = suite.write_report(results, header, str(tmp_path))
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(results)  # header row + one per case
    assert "MFU (989 TF)" in table[0] and "MFU (790 TF)" in table[0]
    assert "| 1.5b-sharegpt/varlen | ok | 52,000 | 43.0% |" in text and "| 51.2 | 55.0 |" in text
    assert "liger on / x" in text  # a '|' in a note does not break the table
    assert "ours >= 1.3x TRL's tokens/s (1.5b-sharegpt): PASS (ours (varlen) 52,000 vs TRL 39,000 tokens/s = 1.33x)" in text
    assert (tmp_path / "gpu_suite.md").read_text() == text
    payload = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [r["case"] for r in payload["results"]] == [r.case for r in results]
    assert {g["verdict"] for g in payload["goals"]} == {"PASS"}


def test_no_time_left_skips_every_case_and_still_writes_the_table(tmp_path, capsys):
    out = tmp_path / "out"
    code = suite.main(["--dry-run", "--budget_s", "0", "--cases", "tiny-alpaca/varlen,tiny-alpaca/trl,resume",
                       "--out", str(out), "--work", str(tmp_path / "work")])
    assert code == 0
    text = (out / "gpu_suite.md").read_text()
    for case in ("tiny-alpaca/varlen", "tiny-alpaca/trl", "resume"):
        assert f"| {case} | skipped |" in text
    assert "out of time" in text
    assert not (tmp_path / "work" / "encoded-alpaca").exists()  # nothing was set up for cases that cannot run
    assert "| tiny-alpaca/trl | skipped |" in capsys.readouterr().out


# ----- the dry run, end to end ---------------------------------------------------------------------------------
def test_dry_run_end_to_end_on_cpu(tmp_path):
    shared_path("datasets", "alpaca_en_demo.json")
    out = tmp_path / "out"
    env = dict(os.environ, SFT_SHARED_DATA=SHARED_DATA, PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""))
    env.pop("OUT", None)
    run = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_suite.sh"), "--dry-run", "--cases",
                          "tiny-alpaca/varlen,tiny-alpaca/trl", "--peak_tflops", "1", "--out", str(out),
                          "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, env=env, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    payload = json.loads((out / "gpu_suite.json").read_text())
    results = {r["case"]: r for r in payload["results"]}
    assert list(results) == ["tiny-alpaca/varlen", "tiny-alpaca/trl"]
    trl = results["tiny-alpaca/trl"]
    if importlib.util.find_spec("trl") is None:  # requirements.txt has no trl: the case says so and the rest runs
        assert trl["status"] == "skipped" and "trl is not installed" in trl["note"], trl
    else:
        assert trl["status"] == "ok", trl
        assert trl["tokens_per_second"] > 0 and trl["mfu"] > 0 and trl["steps"] == 1 and trl["peak_alloc_gib"] > 0
        assert "padding_free" in trl["note"] and trl["attention"] == "sdpa"
        assert "| tiny-alpaca/trl | ok |" in run.stdout  # the table is printed last
    varlen = results["tiny-alpaca/varlen"]
    # "varlen" is being added as a config choice: until it is, the case fails with the config's message, alone
    if varlen["status"] == "ok":
        assert varlen["tokens_per_second"] > 0 and varlen["attention"] == "varlen" and varlen["steps"] == 1
    else:
        assert varlen["status"] == "failed" and "varlen" in varlen["note"], varlen
    assert "ours >= 1.3x TRL's tokens/s (tiny-alpaca)" in (out / "gpu_suite.md").read_text()
