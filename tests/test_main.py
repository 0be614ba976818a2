"""MAIN: whole runs in one process, the shipped file, and every way a run can end."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

import trainer
from conftest import QUICK_RUN, ROOT, run_in_process, run_log


@pytest.fixture
def quick(tmp_path, quick_corpus, monkeypatch):
    """A whole quick run in tmp_path; returns (exit status, log text, console output)."""

    def run(argv=None, **settings):
        status = run_in_process(tmp_path, {**QUICK_RUN, "DATA_PATH": str(quick_corpus), **settings}, monkeypatch, argv)
        logs = list((tmp_path / "logs").glob("*.txt"))
        return status, logs[0].read_text() if logs else ""

    return run


def test_a_quick_run_writes_a_self_describing_log(quick, tmp_path, capsys):
    status, log = quick(SEED="7", SLOT_STEP="4")
    out = capsys.readouterr().out
    assert status == 0
    assert "warning: SLOT_STEP is not a setting (ignored); did you mean SLOT_STEPS?" in log.splitlines()[2:4]
    source_hash, shipped_hash, _ = trainer.running_code()
    assert log.startswith(f"code: source_sha256:{source_hash[:16]} shipped_sha256:{shipped_hash[:16]}\nsettings_changed: ")
    assert "SEED=7" in log.splitlines()[1]
    assert re.search(r"^final_score final_int6_sliding_window_exact val_bpb:[\d.]+ slot:window legal:yes", log, re.MULTILINE)
    assert f"Code size: {trainer.running_code()[2]} bytes" in log
    assert f"artifact: {tmp_path / 'final_model.int6.ptz'}" in out and f"log: {tmp_path / 'logs'}" in out
    assert re.search(r"^result: [\d.]+ bits per byte of held-out text \(lower is better; guessing uniformly scores [\d.]+; SEED=1337 gives", out, re.MULTILINE)


def final_lines(output: str) -> list[str]:
    """The run's result lines without the timings, which differ from run to run."""
    lines = [line for line in output.splitlines() if line.startswith(("final_", "legal_ttt", "Serialized", "step:"))]
    return [re.sub(r"(eval_time|train_time|step_avg|eval_total_time):[\d.]+ms", "", line) for line in lines]


@pytest.mark.packed
def test_the_shipped_file_behaves_like_the_source(quick, tmp_path, quick_corpus, capsys):
    settings = {"TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "4096"}
    status, log = quick(**settings)
    shipped_folder = tmp_path / "shipped"
    shipped_folder.mkdir()
    environ = {k: v for k, v in os.environ.items() if k not in ("RUN_ID", "WORLD_SIZE", "RANK")}
    shipped = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=shipped_folder, capture_output=True, text=True,
                             env={**environ, **QUICK_RUN, **settings, "DATA_PATH": str(quick_corpus), "OMP_NUM_THREADS": "1"},
                             timeout=600)
    assert status == 0 and shipped.returncode == 0, shipped.stderr[-2000:]
    assert final_lines(log) == final_lines(shipped.stdout) and len(final_lines(log)) > 8
    assert trainer.running_code()[1][:16] in shipped.stdout.splitlines()[0]  # the same shipped hash either way


@pytest.mark.parametrize("settings, message", [
    ({"NUM_HEADS": "5"}, "error: NUM_HEADS=5 is not allowed: must divide MODEL_DIM=64"),
    ({"TRAIN_SEQ_LEN": "x"}, "error: TRAIN_SEQ_LEN='x' is not allowed: expected an integer"),
    ({"TOKENIZER_PATH": "missing.model"}, "error: TOKENIZER_PATH='missing.model' is not allowed: no such file"),
])
def test_bad_settings_stop_at_start_with_one_line(quick, capsys, settings, message):
    status, _ = quick(**settings)
    assert status == 2 and capsys.readouterr().err.strip().splitlines() == [message]


def test_an_unknown_argument_is_an_error(quick, capsys):
    status, _ = quick(argv=["--steps", "3"])
    assert status == 2 and "error: unknown argument '--steps'" in capsys.readouterr().err


def test_a_reused_run_id_refuses_to_mix_runs(quick, tmp_path, capsys):
    assert quick(RUN_ID="same")[0] == 0
    first_log = (tmp_path / "logs" / "same.txt").read_text()
    status, _ = quick(RUN_ID="same")
    assert status == 2 and "error: RUN_ID='same' is not allowed: logs/same.txt already holds another run's log" in capsys.readouterr().err
    assert (tmp_path / "logs" / "same.txt").read_text() == first_log


def test_a_second_run_says_it_replaces_the_artifact(quick, capsys):
    quick(RUN_ID="first")
    status, _ = quick(RUN_ID="second")
    assert status == 0 and "artifact: final_model.int6.ptz exists (an earlier run's); this run replaces it" in capsys.readouterr().out


@pytest.mark.parametrize("call, where", [(1, "during warm-up"), (3, "during training at step 1")])
def test_an_interrupt_says_where_the_run_was(quick, monkeypatch, capsys, call, where):
    calls = []

    def interrupted(*args):  # call 1 is the warm-up step; call 3 the second timed step, after step 1
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args)

    real = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", interrupted)
    status, log = quick()
    assert status == 130 and capsys.readouterr().err.strip() == f"interrupted {where}"
    assert log.splitlines()[-1] == f"interrupted {where}"


def test_a_non_finite_loss_ends_with_status_1_and_the_reason_in_the_log(quick, capsys):
    status, log = quick(ITERATIONS="30", TIED_EMBED_LR="1e30", SCALAR_LR="1e30", GRAD_CLIP_NORM="0")
    err = capsys.readouterr().err
    assert status == 1 and re.search(r"^error: training loss is not finite at step \d+", err, re.MULTILINE)
    assert "Traceback" not in err and log.splitlines()[-1].startswith("error: training loss is not finite")


def test_non_finite_weights_are_never_exported(quick, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(trainer.ExponentialMovingAverage, "copy_to_model",
                        lambda self: [p.data.fill_(math.nan) for p in self.params])
    status, log = quick()
    assert status == 1 and "error: the trained weights hold NaN or infinite values" in capsys.readouterr().err
    assert not (tmp_path / "final_model.int6.ptz").exists() and "error: the trained weights" in log


def test_weights_that_overflow_float16_are_never_exported(quick, monkeypatch, tmp_path, capsys):
    (tmp_path / "final_model.int6.ptz").write_bytes(b"an earlier run's artifact")
    monkeypatch.setattr(trainer.ExponentialMovingAverage, "copy_to_model", lambda self: self.params[0].data.fill_(1e6))
    status, log = quick()
    message = "error: the trained weights do not fit the artifact (skip_weights overflows float16)"
    assert status == 1 and message in capsys.readouterr().err and log.splitlines()[-1].startswith(message)
    assert (tmp_path / "final_model.int6.ptz").read_bytes() == b"an earlier run's artifact"


def test_a_non_finite_score_is_a_failure(quick, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "evaluate_sliding", lambda *a: trainer.EvalResult(math.nan, 1.0, 1.0, 0.0))
    status, log = quick()
    assert status == 1 and "final_score final_int6_sliding_window_exact val_bpb:nan" in log
    assert log.splitlines()[-1] == "error: the final score is not finite (nan); the artifact is not usable"


def test_a_failed_artifact_write_is_one_line_and_leaves_nothing(quick, monkeypatch, tmp_path, capsys):
    def full_disk(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.os, "fsync", full_disk)
    status, log = quick()
    err = capsys.readouterr().err
    assert status == 1 and err.strip().splitlines()[-1] == \
        "error: final_model.int6.ptz: cannot write (No space left on device); nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"] and "cannot write" in log


def test_an_unexpected_error_is_logged_and_raised(quick, monkeypatch, tmp_path):
    def bug(*args):
        raise ValueError("a bug")

    monkeypatch.setattr(trainer, "export_artifact", bug)
    with pytest.raises(ValueError, match="a bug"):
        quick()
    assert run_log(tmp_path).splitlines()[-1] == "error: unexpected ValueError: a bug (traceback on the console)"
