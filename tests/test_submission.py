"""tools/submission.py: JSON from real logs, rule checks, truncation, the t-test, plots."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

from tools import submission

LOGS = ROOT / "tests" / "data" / "record-logs"
SEED_1337, SEED_42 = LOGS / "train_seed1337.log", LOGS / "train_seed42.log"

GOOD_LOG = """train_loader:dataset:fineweb10B_sp1024 train_shards:80 tokens:8000000000
val_loader:shards pattern=./data/datasets/fineweb10B_sp1024/fineweb_val_*.bin tokens:62021632
attention_backend:flash_attention_3 attention_mode:gqa num_heads:8 num_kv_heads:4
train_batch_tokens:786432 train_seq_len:2048 iterations:20000 warmup_steps:20 max_wallclock_seconds:600.000{caps}
seed:{seed}
hardware: {hardware}
torch:2.13.0+cu128 python:3.11.7
step:100/20000 train_loss:2.5000 train_time:{train_ms}ms step_avg:88.00ms
step:200/20000 val_loss:2.1000 val_bpb:1.2400 train_time:{train_ms}ms step_avg:88.00ms
Serialized model int6+brotli: {model} bytes
Total submission size int6+brotli: {total} bytes
final_int6_roundtrip val_loss:1.9 val_bpb:1.13 eval_time:6000ms
final_int6_roundtrip_exact val_loss:1.90000000 val_bpb:1.13000000
final_int6_sliding_window val_loss:1.86 val_bpb:1.10 stride:64 eval_time:{eval_ms}ms
final_int6_sliding_window_exact val_loss:{loss} val_bpb:{bpb}
"""
TTT_LINES = """legal_ttt val_loss:1.85 val_bpb:1.0950 eval_time:400000ms
legal_ttt_exact val_loss:1.85000000 val_bpb:1.09500000
"""


def write_log(tmp_path, name="run.log", seed=1, train_ms=500_000, model=15_700_000, total=15_720_000,
              eval_ms=165_000, loss=1.86, bpb=1.1015, hardware="8xNVIDIA H100 80GB HBM3", caps="", extra=""):
    path = tmp_path / name
    path.write_text(GOOD_LOG.format(seed=seed, train_ms=train_ms, model=model, total=total, eval_ms=eval_ms,
                                    loss=loss, bpb=bpb, hardware=hardware, caps=caps) + extra)
    return path


def final_score(line="legal_ttt_exact", bpb="1.09500000", slot="window", legal="yes"):
    return f"final_score {line} val_bpb:{bpb} slot:{slot} legal:{legal} eval_total_time:571000ms\n"


def run(*argv, capsys):
    status = submission.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_reference_logs_give_exactly_their_figures(capsys):
    status, out, err = run(SEED_1337, SEED_42, "--author", "me", "--name", "ref", capsys=capsys)
    result = json.loads(out)
    assert status == 0, err
    assert list(result) == ["author", "name", "date", "track", "val_bpb", "val_bpb_std", "seeds", "seed_results",
                            "bytes_total", "code_bytes", "hardware", "run"]
    assert result["seeds"] == [1337, 42]
    assert result["seed_results"]["1337"] == {"val_bpb": 1.10165738, "val_loss": 1.86009741, "artifact_bytes": 15_795_518,
                                              "steps": 6660, "step_avg_ms": 88.75}
    assert result["seed_results"]["42"] == {"val_bpb": 1.10377675, "val_loss": 1.86367588, "artifact_bytes": 15_793_163,
                                            "steps": 6650, "step_avg_ms": 88.9}
    assert result["val_bpb"] == pytest.approx((1.10165738 + 1.10377675) / 2, abs=1e-8)
    assert result["val_bpb_std"] == pytest.approx(abs(1.10165738 - 1.10377675) / 2 ** 0.5, abs=1e-8)
    assert result["bytes_total"] == 15_795_518 and result["code_bytes"] == 71_382
    # the reference run predates the hardware, torch and attention_backend lines: null, not guessed
    assert result["run"] == {
        "score_line": "final_int6_sliding_window_exact", "hardware": None, "torch": None, "python": None,
        "attention_backend": None, "attention_mode": "gqa", "num_heads": 8, "num_kv_heads": 4,
        "train_dataset": "fineweb10B_sp1024", "train_shards": 80, "train_tokens": None,
        "val_pattern": "./data/datasets/fineweb10B_sp1024/fineweb_val_*.bin", "val_tokens": 62021632,
        "train_batch_tokens": 786432, "train_seq_len": 2048, "iterations": 20000, "warmup_steps": 20,
        "max_wallclock_seconds": 600.0, "safety_cap_seconds": None, "slot": None, "differs_between_seeds": []}


@pytest.mark.parametrize("score, bpb", [("ttt", 1.11008032), ("roundtrip", 1.13354285)])
def test_other_scores(capsys, score, bpb):
    status, out, _ = run(SEED_1337, "--score", score, capsys=capsys)
    assert status == 0 and json.loads(out)["seed_results"]["1337"]["val_bpb"] == bpb


def test_write_goes_to_a_file(tmp_path, capsys):
    status, out, _ = run(SEED_1337, "--write", tmp_path / "submission.json", capsys=capsys)
    assert status == 0 and out == "" and json.loads((tmp_path / "submission.json").read_text())["seeds"] == [1337]


def test_hand_made_log_is_clean_and_names_its_hardware(tmp_path, capsys):
    status, out, err = run(write_log(tmp_path), capsys=capsys)
    assert status == 0 and err == ""
    assert json.loads(out)["hardware"] == "8xNVIDIA H100 80GB HBM3" and json.loads(out)["code_bytes"] == 20_000


@pytest.mark.parametrize("settings, message", [
    ({"train_ms": 600_500}, "training took 600.5 s (limit 600 s)"),
    ({"eval_ms": 601_000}, "evaluation final_int6_sliding_window took 601.0 s (limit 600 s)"),
    ({"total": 16_000_123}, "artifact + code is 16000123 bytes, 123 over 16000000"),
])
def test_each_rule_violation_is_listed(tmp_path, capsys, settings, message):
    status, out, err = run(write_log(tmp_path, **settings), capsys=capsys)
    assert status == 1 and f"rule violation: {message}" in err
    json.loads(out)  # the JSON is still printed


def test_missing_final_score_is_a_violation(tmp_path, capsys):
    status, _, err = run(SEED_1337, "--score", "ttt", capsys=capsys)
    assert status == 0  # the reference log does have a TTT score
    path = tmp_path / "no_score.log"
    path.write_text(SEED_1337.read_text().replace("final_int6_sliding_window_exact", "something_else"))
    status, _, err = run(path, capsys=capsys)
    assert status == 1 and "no final score (final_int6_sliding_window_exact)" in err


def test_truncated_log_says_what_it_holds(tmp_path, capsys):
    lines = SEED_1337.read_text().splitlines()
    cut = next(i for i, line in enumerate(lines) if line.startswith("ema:"))
    path = tmp_path / "killed.log"
    path.write_text("\n".join(lines[:cut]))
    status, out, err = run(path, capsys=capsys)
    assert status == 1
    assert "truncated log (killed run?): reached step 6660, last val_bpb 1.1314; no artifact size was logged" in err
    assert json.loads(out)["seeds"] == []


def test_unusable_input_gives_one_clear_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello\n")
    for path, message in ((tmp_path / "missing.log", "cannot read log"), (tmp_path / "notes.txt", "no training-log lines")):
        status, _, err = run(path, capsys=capsys)
        assert status == 2 and err.startswith(f"error: {path}: {message}") and "Traceback" not in err


@pytest.mark.parametrize("t, dof, expected", [(2.015, 5, 0.95), (3.365, 5, 0.99), (1.812, 10, 0.95), (2.764, 10, 0.99),
                                              (-2.015, 5, 0.05), (0.0, 3, 0.5), (1.96, 1e6, 0.975)])
def test_student_t_cdf_against_the_table(t, dof, expected):
    assert submission.student_t_cdf(t, dof) == pytest.approx(expected, abs=5e-4)


def test_welch_test_by_hand():
    ours, theirs = [1.0, 1.1, 0.9], [1.3, 1.5, 1.4, 1.2]
    t, dof, p = submission.welch_p_value(ours, theirs, margin=0.0)
    var_ours, var_theirs = 0.01 / 3, (0.05 / 3) / 4
    assert t == pytest.approx((1.0 - 1.35) / (var_ours + var_theirs) ** 0.5)
    assert dof == pytest.approx((var_ours + var_theirs) ** 2 / (var_ours ** 2 / 2 + var_theirs ** 2 / 3))
    assert p == pytest.approx(submission.student_t_cdf(t, dof)) and p < 0.01


def test_comparison_against_a_record(tmp_path, capsys):
    def seeds(*losses):
        return [write_log(tmp_path, f"s{i}.log", seed=i, loss=loss, bpb=loss / 1.6886) for i, loss in enumerate(losses)]

    # 0.02 nats better, but the record's two seeds spread widely (Welch dof ~1.2): not enough
    status, _, err = run(*seeds(1.840, 1.841, 1.839), "--vs-logs", SEED_1337, SEED_42, capsys=capsys)
    assert status == 0 and "Welch t-test" in err and "p=0.0233; the bar p < 0.01 is NOT met" in err
    ours = seeds(1.700, 1.701, 1.699)
    status, _, err = run(*ours, "--vs-logs", SEED_1337, SEED_42, capsys=capsys)
    assert "the bar p < 0.01 is MET" in err
    status, _, err = run(*ours, "--vs", 1.10272, capsys=capsys)
    assert "one-sample t-test" in err and "improvement: +0.0" in err
    status, _, err = run(ours[0], "--vs", 1.10272, capsys=capsys)
    assert "needs at least 2 seeds" in err


def test_plot_without_matplotlib_is_a_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    status, _, err = run(SEED_1337, "--plot", tmp_path / "loss.png", capsys=capsys)
    assert status == 2 and "--plot needs matplotlib" in err and not (tmp_path / "loss.png").exists()


def test_plot_with_matplotlib(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    status, _, _ = run(SEED_1337, SEED_42, "--plot", tmp_path / "loss.png", capsys=capsys)
    assert status == 0 and (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_command_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "submission.py"), str(SEED_1337)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and json.loads(result.stdout)["seed_results"]["1337"]["steps"] == 6660


# --- one run per log, one log per seed -------------------------------------------------

def one_line_error(status, err, *fragments):
    lines = err.strip().splitlines()
    return status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and all(f in lines[0] for f in fragments)


def test_two_runs_appended_to_one_log_are_refused(tmp_path, capsys):
    path = tmp_path / "appended.log"
    path.write_text(SEED_1337.read_text() + SEED_42.read_text())
    status, out, err = run(path, capsys=capsys)
    assert one_line_error(status, err, str(path), "holds more than one run", "second 'seed:' line at line 300, the first at line 16")
    assert out == ""


def test_a_step_counter_going_back_is_a_second_run(tmp_path, capsys):
    lines = SEED_1337.read_text().splitlines()
    second_run = [line for line in SEED_42.read_text().splitlines() if line.startswith("step:")]
    path = tmp_path / "appended.log"
    path.write_text("\n".join(lines + second_run))  # the second run's header was lost
    status, _, err = run(path, capsys=capsys)
    assert one_line_error(status, err, str(path), "the step counter goes back from 6660 at line 65 to 0 at line 285")


def test_the_same_log_twice_is_refused(capsys):
    status, _, err = run(SEED_1337, SEED_42, SEED_1337, "--vs", 1.1, capsys=capsys)
    assert one_line_error(status, err, f"{SEED_1337}: given twice")


def test_two_logs_of_one_seed_are_refused(tmp_path, capsys):
    copy = tmp_path / "copy.log"
    copy.write_text(SEED_1337.read_text())
    status, _, err = run(SEED_1337, copy, "--vs", 1.1, capsys=capsys)
    assert one_line_error(status, err, f"{SEED_1337} and {copy} are both seed 1337")


def test_seeds_that_score_the_same_give_no_t_test(tmp_path, capsys):
    logs = [write_log(tmp_path, f"s{seed}.log", seed=seed) for seed in (1, 2)]
    status, _, err = run(*logs, "--vs", 1.2, capsys=capsys)
    assert status == 0 and "Traceback" not in err
    assert "every seed scored exactly the same, so a t-test is undefined" in err


# --- the final_score line ---------------------------------------------------------------

def test_final_score_names_the_counted_score(tmp_path, capsys):
    path = write_log(tmp_path, extra=TTT_LINES + final_score())
    status, out, err = run(path, capsys=capsys)
    result = json.loads(out)
    assert status == 0 and err == ""
    assert result["seed_results"]["1"]["val_bpb"] == 1.095 and result["seed_results"]["1"]["val_loss"] == 1.85
    assert result["run"]["score_line"] == "legal_ttt_exact" and result["run"]["slot"] == "window"


def test_an_explicit_score_that_disagrees_is_overruled_in_one_line(tmp_path, capsys):
    path = write_log(tmp_path, extra=TTT_LINES + final_score())
    status, out, err = run(path, "--score", "sliding", capsys=capsys)
    assert status == 0 and json.loads(out)["seed_results"]["1"]["val_bpb"] == 1.095
    assert err == ("note: --score sliding (final_int6_sliding_window_exact) is ignored: the logs' final_score line "
                   "counts legal_ttt_exact\n")


def test_an_illegal_final_score_is_a_rule_violation(tmp_path, capsys):
    path = write_log(tmp_path, extra=final_score("final_int6_sliding_window_exact", "1.10150000", "shared",
                                                 "no (SLOT_MODE=shared leaks)"))
    status, out, err = run(path, capsys=capsys)
    assert status == 1 and err.count("\n") == 1
    assert err.startswith(f"{path}: rule violation: final_score says legal:no (SLOT_MODE=shared leaks): SLOT_MODE=shared")
    assert "leaks future tokens" in err
    json.loads(out)


def test_a_final_score_that_is_not_its_line_is_a_rule_violation(tmp_path, capsys):
    path = write_log(tmp_path, extra=final_score("final_int6_sliding_window_exact", "1.00000000"))
    status, _, err = run(path, capsys=capsys)
    assert status == 1
    assert "final_score val_bpb:1.00000000 is not final_int6_sliding_window_exact's val_bpb:1.10150000" in err


@pytest.mark.parametrize("lines, message", [
    ([final_score("legal_ttt_exact"), final_score("final_int6_sliding_window_exact", "1.10150000")],
     "final_score lines count different scores"),
    ([final_score("final_int8_zlib_roundtrip_exact")], "final_score names 'final_int8_zlib_roundtrip_exact'"),
    (["final_score legal_ttt_exact val_bpb:1.1\n"], "line 18 cannot be read (a final_score line in an unknown shape)"),
])
def test_unusable_final_scores_are_refused(tmp_path, capsys, lines, message):
    logs = [write_log(tmp_path, f"s{seed}.log", seed=seed, extra=TTT_LINES + line) for seed, line in enumerate(lines)]
    status, _, err = run(*logs, capsys=capsys)
    assert one_line_error(status, err, message)


# --- non-finite values ------------------------------------------------------------------

def test_a_nan_training_loss_is_reported(tmp_path, capsys):
    path = write_log(tmp_path, extra="step:300/20000 train_loss:nan train_time:500000ms step_avg:88.00ms\n"
                                     "step:301/20000 train_loss:inf train_time:500000ms step_avg:88.00ms\n")
    status, _, err = run(path, capsys=capsys)
    assert status == 1 and f"{path}: not finite: train_loss is nan at step 300 (and 1 more)" in err


def test_a_nan_score_is_reported_and_not_counted(tmp_path, capsys):
    path = write_log(tmp_path, loss="nan", bpb="nan")
    status, out, err = run(path, "--vs", 1.1, capsys=capsys)
    assert status == 1
    assert "not finite: final_int6_sliding_window_exact is val_loss:nan val_bpb:nan" in err
    result = json.loads(out)  # strict JSON: no NaN slipped in
    assert result["seeds"] == [] and result["val_bpb"] is None
    assert "comparison: skipped, our logs have no finite final_int6_sliding_window_exact score" in err


# --- output paths ------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["--write", "--plot"])
def test_an_output_folder_that_does_not_exist_is_one_line(tmp_path, capsys, option):
    target = tmp_path / "missing" / "out"
    others = ["--write", tmp_path / "submission.json"] if option == "--plot" else ["--plot", tmp_path / "loss.png"]
    status, out, err = run(SEED_1337, option, target, *others, capsys=capsys)
    assert one_line_error(status, err, f"{option} {target}: the folder {target.parent} does not exist")
    assert list(tmp_path.iterdir()) == [] and out == ""  # nothing half-written


# --- how the logs were made ----------------------------------------------------------------

def test_run_fields_come_from_the_log(tmp_path, capsys):
    path = write_log(tmp_path, caps=" safety_cap_seconds:590.000", extra=final_score(
        "final_int6_sliding_window_exact", "1.10150000"))
    status, out, err = run(path, capsys=capsys)
    assert status == 0 and err == ""
    assert json.loads(out)["run"] == {
        "score_line": "final_int6_sliding_window_exact", "hardware": "8xNVIDIA H100 80GB HBM3",
        "torch": "2.13.0+cu128", "python": "3.11.7", "attention_backend": "flash_attention_3",
        "attention_mode": "gqa", "num_heads": 8, "num_kv_heads": 4, "train_dataset": "fineweb10B_sp1024",
        "train_shards": 80, "train_tokens": 8_000_000_000,
        "val_pattern": "./data/datasets/fineweb10B_sp1024/fineweb_val_*.bin", "val_tokens": 62021632,
        "train_batch_tokens": 786432, "train_seq_len": 2048, "iterations": 20000, "warmup_steps": 20,
        "max_wallclock_seconds": 600.0, "safety_cap_seconds": 590.0, "slot": "window", "differs_between_seeds": []}


def test_seeds_run_differently_are_listed_per_seed(tmp_path, capsys):
    first = write_log(tmp_path, "a.log", seed=1)
    second = write_log(tmp_path, "b.log", seed=2, hardware="1xCPU (2 cores)")
    status, out, err = run(first, second, capsys=capsys)
    run_fields = json.loads(out)["run"]
    assert status == 0
    assert run_fields["hardware"] == {"1": "8xNVIDIA H100 80GB HBM3", "2": "1xCPU (2 cores)"}
    assert run_fields["differs_between_seeds"] == ["hardware"] and run_fields["torch"] == "2.13.0+cu128"
    assert err == ("note: the seeds were not run alike: hardware differs (seed 1: 8xNVIDIA H100 80GB HBM3, "
                   "seed 2: 1xCPU (2 cores))\n")


def test_check_logs_is_what_main_reports(tmp_path):
    assert submission.check_logs([SEED_1337, SEED_42]) == []
    late = write_log(tmp_path, train_ms=600_500)
    assert submission.check_logs([late]) == [f"{late}: rule violation: training took 600.5 s (limit 600 s)"]
