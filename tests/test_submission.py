"""tools/submission.py: JSON from real logs, rule checks, truncation, the t-test, plots."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import submission  # noqa: E402

LOGS = ROOT / "tests" / "data" / "reference-logs"
SEED_1337, SEED_42 = LOGS / "train_seed1337.log", LOGS / "train_seed42.log"

GOOD_LOG = """seed:{seed}
hardware: 8xNVIDIA H100 80GB HBM3
step:100/20000 train_loss:2.5000 train_time:{train_ms}ms step_avg:88.00ms
step:200/20000 val_loss:2.1000 val_bpb:1.2400 train_time:{train_ms}ms step_avg:88.00ms
Serialized model int6+brotli: {model} bytes
Total submission size int6+brotli: {total} bytes
final_int6_roundtrip val_loss:1.9 val_bpb:1.13 eval_time:6000ms
final_int6_roundtrip_exact val_loss:1.90000000 val_bpb:1.13000000
final_int6_sliding_window val_loss:1.86 val_bpb:1.10 stride:64 eval_time:{eval_ms}ms
final_int6_sliding_window_exact val_loss:{loss} val_bpb:{bpb}
"""


def write_log(tmp_path, name="run.log", seed=1, train_ms=500_000, model=15_700_000, total=15_720_000,
              eval_ms=165_000, loss=1.86, bpb=1.1015):
    path = tmp_path / name
    path.write_text(GOOD_LOG.format(seed=seed, train_ms=train_ms, model=model, total=total, eval_ms=eval_ms,
                                    loss=loss, bpb=bpb))
    return path


def run(*argv, capsys):
    status = submission.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_reference_logs_give_exactly_their_figures(capsys):
    status, out, err = run(SEED_1337, SEED_42, "--author", "me", "--name", "ref", capsys=capsys)
    result = json.loads(out)
    assert status == 0, err
    assert list(result) == ["author", "name", "date", "track", "val_bpb", "val_bpb_std", "seeds", "seed_results",
                            "bytes_total", "code_bytes", "hardware"]
    assert result["seeds"] == [1337, 42]
    assert result["seed_results"]["1337"] == {"val_bpb": 1.10165738, "val_loss": 1.86009741, "artifact_bytes": 15_795_518,
                                              "steps": 6660, "step_avg_ms": 88.75}
    assert result["seed_results"]["42"] == {"val_bpb": 1.10377675, "val_loss": 1.86367588, "artifact_bytes": 15_793_163,
                                            "steps": 6650, "step_avg_ms": 88.9}
    assert result["val_bpb"] == pytest.approx((1.10165738 + 1.10377675) / 2, abs=1e-8)
    assert result["val_bpb_std"] == pytest.approx(abs(1.10165738 - 1.10377675) / 2 ** 0.5, abs=1e-8)
    assert result["bytes_total"] == 15_795_518 and result["code_bytes"] == 71_382


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
