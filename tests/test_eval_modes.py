"""tools/eval_modes.py: one artifact scored plainly and under each SLOT mode, each line
saying whether such a score is causal and accepted; bad input is one line."""

from __future__ import annotations

import re

import pytest

from tools import eval_modes
from trainer.evaluation import evaluate_sliding, with_slot
from trainer.artifact import load_quantized_model
from trainer.main import load_data
from trainer.model import ModelConfig
from trainer.runtime import Runtime
from trainer.settings import Hyperparameters
from conftest import QUICK_RUN, TINY


@pytest.fixture
def settings(monkeypatch, quick_corpus) -> dict[str, str]:
    values = {**TINY, "TOKENIZER_PATH": QUICK_RUN["TOKENIZER_PATH"], "DATA_PATH": str(quick_corpus), "SLOT_STEPS": "1",
              "EVAL_STRIDE": "32", "EVAL_BATCH_SEQS": "64"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def table_lines(out: str) -> list[str]:
    """The header and rows after the run's loading lines."""
    lines = out.strip().splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("mode ")):]


def test_every_mode_is_one_line_with_its_score_and_legality(settings, tiny_artifact, capsys):
    assert eval_modes.main([str(tiny_artifact)]) == 0
    header, *rows = table_lines(capsys.readouterr().out)
    assert header.split() == ["mode", "val_bpb", "vs", "plain", "eval_time", "causal", "accepted"]
    table = {row.split()[0]: row.split() for row in rows}
    assert [(mode, table[mode][4:]) for mode in table] == [
        ("off", ["yes", "yes"]), ("window", ["yes", "no"]), ("batch_causal", ["yes", "no"]), ("shared", ["no", "no"])]
    # the figures are the trainer's own evaluation of the same artifact
    hp = Hyperparameters.from_env(settings)
    runtime = Runtime()
    model = load_quantized_model(ModelConfig.from_settings(hp), tiny_artifact.read_bytes(), "tiny", runtime)
    data = load_data(hp, runtime)
    plain, window = evaluate_sliding(model, data, with_slot(hp, "window"), runtime)
    assert float(table["off"][1]) == pytest.approx(plain.bpb, abs=1e-6) and table["off"][2] == "+0.000000"
    assert float(table["window"][1]) == pytest.approx(window.bpb, abs=1e-6)
    assert float(table["window"][2]) == pytest.approx(window.bpb - plain.bpb, abs=2e-6)


@pytest.mark.parametrize("argv, line", [
    (["{artifact}", "--modes", "window,sliced"], r"error: --modes 'window,sliced': expected a comma-separated list of "
                                                 r"off, window, batch_causal, shared"),
    (["{artifact}.missing"], r"error: \S+\.missing: no such artifact file"),
])
def test_bad_input_is_one_line(settings, tiny_artifact, capsys, argv, line):
    assert eval_modes.main([arg.format(artifact=tiny_artifact) for arg in argv]) == 2
    assert re.fullmatch(line, capsys.readouterr().err.strip())


def test_only_the_modes_asked_for(settings, tiny_artifact, capsys):
    assert eval_modes.main([str(tiny_artifact), "--modes", "shared"]) == 0
    rows = table_lines(capsys.readouterr().out)[1:]
    assert [row.split()[0] for row in rows] == ["shared"] and re.fullmatch(r"[+-]\d\.\d{6}", rows[0].split()[2])
