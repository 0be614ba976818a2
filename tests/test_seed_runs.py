"""tools/seed_runs.py: one training run per seed -> train_seed<N>.log and submission.json, or nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools import seed_runs

from conftest import QUICK_RUN, ROOT, TOKENIZER
from test_submission import TTT_LINES, final_score, log_text
from trainer.files import file_sha256

TOOL = ROOT / "tools" / "seed_runs.py"
RECORD_NAMES = ["submission.json", "train_seed1.log", "train_seed2.log"]

# A stand-in trainer for the refusals: a real log in a second, and a seam to break one seed.
FAKE_TRAINER = """import os, sys
from pathlib import Path
seed = os.environ["SEED"]
if seed == os.environ.get("FAKE_FAIL_SEED"):
    sys.exit(3)
train_ms = 600_500 if seed == os.environ.get("FAKE_SLOW_SEED") else 500_000
settings = " ".join(f"{{name}}={{os.environ[name]}}" for name in ("DATA_PATH", "RUN_ID", "ARTIFACT_PATH", "SEED"))
if seed == os.environ.get("FAKE_OTHER_SETTINGS_SEED"):
    settings += " SLOT_STEPS=4"
Path("logs").mkdir(exist_ok=True)
text = {template!r}.format(seed=seed, train_ms=train_ms, settings=settings)
if seed == os.environ.get("FAKE_TTT_SEED"):
    text += {ttt!r} + {ttt_score!r}
else:
    text += {sliding_score!r}
text += f"artifact_path:{{os.environ['ARTIFACT_PATH']}} run_id:{{os.environ['RUN_ID']}} cwd:{{os.getcwd()}}\\n"
Path("logs", os.environ["RUN_ID"] + ".txt").write_text(text)
"""


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch) -> Path:
    # no time_budget line (none without MAX_WALLCLOCK_SECONDS), so training time alone counts
    template = log_text(seed="{seed}", train_ms="{train_ms}", calibration_ms=None, settings="{settings}",
                        hardware="1xCPU (2 cores)", final="")
    script = tmp_path / "trainer" / "fake_train.py"  # not among the record's files
    script.parent.mkdir()
    script.write_text(FAKE_TRAINER.format(template=template, ttt=TTT_LINES, ttt_score=final_score(),
                                          sliding_score=final_score("final_int6_sliding_window_exact", "1.10150000",
                                                                    total_ms=171_000)))
    monkeypatch.setenv("DATA_PATH", "data")
    monkeypatch.chdir(tmp_path)
    return script


def make_old_record(folder: Path) -> dict[str, str]:
    contents = {name: f"an earlier record's {name}\n" for name in RECORD_NAMES}
    for name, text in contents.items():
        (folder / name).write_text(text)
    return contents


def record(folder: Path) -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(folder.iterdir()) if path.is_file()}


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def exact_figures(log: str) -> dict:
    """A seed's figures read straight from its log, not through tools/submission.py."""
    counted, causal, accepted = re.search(r"^final_score (\w+) .* causal:(\w+) accepted:(\w+) ", log,
                                          re.MULTILINE).groups()
    loss, bpb = re.search(rf"^{counted} val_loss:(\S+) val_bpb:(\S+)$", log, re.MULTILINE).groups()
    steps, avg = re.findall(r"^step:(\d+)/\d+ .* step_avg:([\d.]+)ms$", log, re.MULTILINE)[-1]
    total = re.search(r"^Total submission size \S+: (\d+) bytes$", log, re.MULTILINE)[1]
    return {"val_bpb": float(bpb), "val_loss": float(loss), "artifact_bytes": int(total), "steps": int(steps),
            "step_avg_ms": float(avg), "causal": causal == "yes", "accepted": accepted == "yes"}


def test_one_seed_end_to_end_with_the_trainer(tmp_path, quick_corpus):
    environ = {**os.environ, **QUICK_RUN, "DATA_PATH": str(quick_corpus), "ITERATIONS": "2", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(TOOL), "--seeds", "1", "--out", str(tmp_path),  # the shipped file
                             "--author", "me", "--name", "smoke"],
                            cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step:2/2 train_loss:" in result.stdout  # the trainer's output streams through
    files = record(tmp_path)
    assert sorted(files) == ["submission.json", "train_seed1.log"]
    summary, log = json.loads(files["submission.json"]), files["train_seed1.log"]
    assert summary["author"] == "me" and summary["name"] == "smoke" and summary["seeds"] == [1]
    assert "\nseed:1\n" in log
    assert summary["seed_results"]["1"] == exact_figures(log)
    assert summary["val_bpb"] == round(exact_figures(log)["val_bpb"], 8)
    # the trainer's header, as the log reader reads it
    run = summary["run"]
    source, shipped = re.search(r"^code: source_sha256:(\w+) shipped_sha256:(\w+)$", log, re.MULTILINE).groups()
    assert (run["source_sha256"], run["shipped_sha256"]) == (source, shipped)
    assert (run["profile"], run["smoke"], run["tokenizer_sha256"]) == ("pr1217", True, file_sha256(TOKENIZER))
    changed = run["settings_changed"].split()
    assert "ITERATIONS=2" in changed
    assert not [item for item in changed if item.startswith(("SEED=", "RUN_ID=", "ARTIFACT_PATH="))]
    # QUICK_RUN counts the SLOT score: causal, never accepted, and said so
    assert (run["slot"], run["causal"], run["accepted"]) == ("window", True, False)
    assert "warning: the counted score (final_int6_sliding_window_slot_exact) is a SLOT score" in result.stderr
    assert re.fullmatch(r"1xCPU \(\d+ cores\)", summary["run"]["hardware"])
    assert run["differs_between_seeds"] == [] and run["stopped_early"] == {}


@pytest.mark.parametrize("failing", ["1", "2"])
def test_a_seed_that_fails_publishes_nothing(tmp_path, fake_trainer, monkeypatch, capfd, failing):
    old = make_old_record(tmp_path)
    monkeypatch.setenv("FAKE_FAIL_SEED", failing)
    status = seed_runs.main(["--seeds", "1", "2", "--out", str(tmp_path), "--script", str(fake_trainer)])
    (work,) = (tmp_path / ".seed_runs").iterdir()
    assert status == 1 and record(tmp_path) == old  # when seed 2 fails, seed 1's good log is not published either
    assert capfd.readouterr().err.splitlines()[-int(failing) - 1:] == [  # nothing runs after the first broken seed
        *(f"seed_runs: seed {seed} ({seed}/2) in {work}" for seed in range(1, int(failing) + 1)),
        f"seed_runs: seed {failing}: the trainer exited with status 3; train_seed*.log and submission.json left as they were "
        f"(the runs are in {work})"]


def test_a_rule_breaking_log_publishes_nothing(tmp_path, fake_trainer, monkeypatch, capfd):
    old = make_old_record(tmp_path)
    monkeypatch.setenv("FAKE_SLOW_SEED", "2")
    status = seed_runs.main(["--seeds", "1", "2", "--out", str(tmp_path), "--script", str(fake_trainer)])
    err = last_line(capfd.readouterr().err)
    assert status == 1 and record(tmp_path) == old
    assert re.fullmatch(r"seed_runs: seed 2: \S+/logs/seed2-[\d-]+\.txt: rule violation: training took 600\.5 s "
                        r"\(limit 600 s\); train_seed\*\.log and submission\.json left as they were \(.*\)", err), err


def test_logs_that_count_different_scores_publish_nothing(tmp_path, fake_trainer, monkeypatch, capfd):
    old = make_old_record(tmp_path)
    monkeypatch.setenv("FAKE_TTT_SEED", "2")  # each log is fine on its own
    status = seed_runs.main(["--seeds", "1", "2", "--out", str(tmp_path), "--script", str(fake_trainer)])
    err = last_line(capfd.readouterr().err)
    assert status == 1 and record(tmp_path) == old
    assert err.startswith("seed_runs: the logs' final_score lines count different scores (") and "seed2-" in err


def test_seeds_run_with_other_settings_publish_nothing(tmp_path, fake_trainer, monkeypatch, capfd):
    old = make_old_record(tmp_path)
    monkeypatch.setenv("FAKE_OTHER_SETTINGS_SEED", "2")  # each log is fine on its own
    status = seed_runs.main(["--seeds", "1", "2", "--out", str(tmp_path), "--script", str(fake_trainer)])
    err = last_line(capfd.readouterr().err)
    assert status == 1 and record(tmp_path) == old
    assert err.startswith("seed_runs: rule violation: the seeds were not run with the same code and settings: "
                          "settings_changed differs (seed 1: DATA_PATH="), err
    assert " SLOT_STEPS=4); train_seed*.log and submission.json left as they were (the runs are in " in err


def test_each_run_gets_its_own_seed_run_id_and_artifact(tmp_path, fake_trainer, capfd):
    status = seed_runs.main(["--seeds", "1", "2", "--out", str(tmp_path), "--script", str(fake_trainer)])
    assert status == 0, capfd.readouterr().err
    files = record(tmp_path)
    assert sorted(files) == RECORD_NAMES
    (work,) = (tmp_path / ".seed_runs").iterdir()
    for seed in (1, 2):
        setup = re.search(r"^artifact_path:(\S+) run_id:(\S+) cwd:(\S+)$", files[f"train_seed{seed}.log"], re.MULTILINE)
        assert setup[1] == str(work / f"seed{seed}.int6.ptz") and setup[3] == str(work)
        assert setup[2].startswith(f"seed{seed}-") and (work / "logs" / f"{setup[2]}.txt").read_text() == files[f"train_seed{seed}.log"]
    assert json.loads(files["submission.json"])["seeds"] == [1, 2]
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


def test_relative_paths_are_made_absolute_for_the_work_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the caller's folder
    env = seed_runs.run_environment({"DATA_PATH": "data/x", "TOKENIZER_PATH": "/abs/tok.model", "OTHER": "keep"},
                                    42, "seed42-now", tmp_path / "work")
    assert env == {"DATA_PATH": str(tmp_path / "data" / "x"), "TOKENIZER_PATH": "/abs/tok.model", "OTHER": "keep",
                   "SEED": "42", "RUN_ID": "seed42-now", "ARTIFACT_PATH": str(tmp_path / "work" / "seed42.int6.ptz")}


def test_without_data_settings_the_runs_use_fineweb_if_present_else_the_smoke_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the caller's folder
    work = tmp_path / "work"
    assert seed_runs.run_environment({}, 1, "r", work)["SMOKE"] == "1"
    fineweb = tmp_path / "data" / "datasets" / "fineweb10B_sp1024"
    fineweb.mkdir(parents=True)
    (fineweb / "fineweb_train_000000.bin").write_bytes(b"")
    environment = seed_runs.run_environment({}, 1, "r", work)
    assert environment["DATA_PATH"] == str(fineweb) and "SMOKE" not in environment
    assert "DATA_PATH" not in seed_runs.run_environment({"SMOKE": "1"}, 1, "r", work)


def test_more_than_one_process_runs_under_torchrun():
    assert seed_runs.trainer_command(Path("t.py"), 1) == [sys.executable, "t.py"]
    assert seed_runs.trainer_command(Path("t.py"), 8) == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                          "--nproc_per_node=8", "t.py"]


@pytest.mark.parametrize("options, environ, message", [
    (["--seeds", "1", "1"], {"DATA_PATH": "d"}, "--seeds 1 1: a seed is repeated"),
    (["--nproc", "0"], {"DATA_PATH": "d"}, "--nproc 0: must be at least 1"),
    (["--script", "missing.py"], {"DATA_PATH": "d"}, "--script missing.py: no such file"),
    (["--out", "missing"], {"DATA_PATH": "d"}, "--out missing: no such folder"),
])
def test_unusable_options_are_one_line(tmp_path, monkeypatch, capfd, options, environ, message):
    # a trainer that would fail at once, should a check let it start
    (tmp_path / "out").mkdir()
    (tmp_path / "trainer.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    for name in ("DATA_PATH", "SMOKE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    status = seed_runs.main(["--out", "out", "--script", "trainer.py", *options])
    err = capfd.readouterr().err
    assert status == 2 and err.startswith(f"seed_runs: {message}") and err.count("\n") == 1
    assert list((tmp_path / "out").iterdir()) == []
