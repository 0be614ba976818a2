"""CONFIGURATION and RUNTIME: settings from the environment, one-line errors, the run's files."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

import trainer
from conftest import ROOT, tiny_hp


def test_defaults_are_the_reference_run():
    hp = trainer.Hyperparameters.from_env({})
    assert (hp.num_layers, hp.model_dim, hp.num_heads, hp.num_kv_heads) == (11, 512, 8, 4)
    assert (hp.qk_gain_init, hp.slot_enabled, hp.slot_steps, hp.slot_lr) == (5.0, True, 8, 0.005)
    assert (hp.train_batch_tokens, hp.train_seq_len, hp.muon_eq_r, hp.matrix_lr) == (786_432, 2048, True, 0.03)
    assert (hp.early_layers_lr_scale, hp.gptq_fine_scales, hp.max_wallclock_seconds) == (1.0, False, 600.0)


def test_environment_beats_the_smoke_profile():
    hp = trainer.Hyperparameters.from_env({"SMOKE": "1", "MODEL_DIM": "96", "MUON_EQ_R": "0"})
    assert hp.smoke and hp.model_dim == 96 and hp.num_layers == 4 and not hp.muon_eq_r


def test_the_embedded_default_is_bounded_by_steps():
    hp = trainer.Hyperparameters.from_env({"SMOKE": "1"})
    assert hp.max_wallclock_seconds == 0 and hp.iterations > 0 and hp.safety_cap_seconds > 0


@pytest.mark.parametrize("environ, message", [
    ({"NUM_LAYERS": "eleven"}, "NUM_LAYERS='eleven' is not allowed: expected an integer"),
    ({"QK_GAIN_INIT": "nan"}, "QK_GAIN_INIT='nan' is not allowed: expected a finite number"),
    ({"MUON_EQ_R": "maybe"}, "MUON_EQ_R='maybe' is not allowed: expected 0 or 1"),
    ({"NUM_HEADS": "7"}, "NUM_HEADS=7 is not allowed: must divide MODEL_DIM=512"),
    ({"NUM_HEADS": "0"}, "NUM_HEADS=0 is not allowed: must be positive"),
    ({"NUM_KV_HEADS": "0"}, "NUM_KV_HEADS=0 is not allowed: must be positive"),
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS=3 is not allowed: must divide NUM_HEADS=8"),
    ({"SEED": "-1"}, "SEED=-1 is not allowed: must not be negative"),
    ({"SEED": str(2**32)}, "SEED=4294967296 is not allowed: must be below 2**32"),
    ({"TTT_CHUNK_TOKENS": "0"}, "TTT_CHUNK_TOKENS=0 is not allowed: must be positive"),
    ({"SLOT_STEPS": "-2"}, "SLOT_STEPS=-2 is not allowed: must not be negative"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS=1000 is not allowed: must be a multiple of TRAIN_SEQ_LEN=2048"),
    ({"SLOT_MODE": "future"}, "SLOT_MODE='future' is not allowed: one of window, batch_causal, shared"),
    ({"VE_LAYERS": "9,99"}, "VE_LAYERS='9,99' is not allowed: layers must lie in 0..10"),
    ({"VE_LAYERS": "a,b"}, "VE_LAYERS='a,b' is not allowed: a comma-separated list of layer numbers"),
    ({"EVAL_STRIDE": "4096"}, "EVAL_STRIDE=4096 is not allowed: must be at most EVAL_SEQ_LEN=2048"),
    ({"ROPE_DIMS": "2"}, "ROPE_DIMS=2 is not allowed: must be 0 (all) or even in 4..the head dim"),
    ({"EMA_DECAY": "1"}, "EMA_DECAY=1.0 is not allowed: must lie in [0, 1)"),
])
def test_bad_settings_name_the_variable(environ, message):
    with pytest.raises(trainer.ConfigError) as caught:
        trainer.Hyperparameters.from_env(environ)
    assert str(caught.value).startswith(message)


def test_a_misspelled_setting_is_named_with_the_closest_real_one():
    warnings = trainer.misspelled_settings({"SLOT_STEP": "4", "PATH": "/bin", "MODEL_DIMS": "64", "SLOT_STEPS": "4"})
    assert warnings == ["warning: MODEL_DIMS is not a setting (ignored); did you mean MODEL_DIM?",
                        "warning: SLOT_STEP is not a setting (ignored); did you mean SLOT_STEPS?"]


def test_changed_settings_list_only_what_differs():
    assert trainer.changed_settings(trainer.Hyperparameters.from_env({"SEED": "42", "SLOT_MODE": "shared"})) == \
        "SEED=42 SLOT_MODE=shared"
    assert trainer.changed_settings(trainer.Hyperparameters.from_env({})) == "none"


def test_help_starts_with_its_first_line(capsys):
    assert trainer.run_cli(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Parameter-golf trainer") and "  SLOT_STEPS " in out


@pytest.mark.parametrize("version, fine", [("2.13.0+cpu", True), ("2.5.1", True), ("2.4.1+cu121", False), ("1.13.0", False)])
def test_torch_version_floor(version, fine):
    if fine:
        trainer.check_torch_version(version)
    else:
        with pytest.raises(trainer.ConfigError, match=rf"torch {re.escape(version)} is too old: this trainer needs torch >= 2.5"):
            trainer.check_torch_version(version)


def test_requirements_state_the_same_torch_floor():
    assert "torch>=2.5" in (ROOT / "requirements.txt").read_text()


def test_world_size_must_divide_eight(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(trainer.ConfigError, match=r"WORLD_SIZE=3 is not allowed: must divide 8"):
        trainer.start_runtime(tiny_hp(GRAD_ACCUM_STEPS="0"))


def test_a_run_id_is_never_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hp = tiny_hp(RUN_ID="mine", ARTIFACT_PATH=str(tmp_path / "a.ptz"))
    trainer.open_run_files(hp, trainer.Runtime())
    assert (tmp_path / "logs" / "mine.txt").read_text() == ""
    with pytest.raises(trainer.ConfigError, match=r"RUN_ID='mine' is not allowed: logs/mine.txt already holds another run's log"):
        trainer.open_run_files(hp, trainer.Runtime())


def test_an_unwritable_artifact_folder_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(trainer.ConfigError, match=r"ARTIFACT_PATH='.*file/model.ptz' is not allowed: cannot write there"):
        trainer.open_run_files(tiny_hp(ARTIFACT_PATH=str(tmp_path / "file" / "model.ptz")), trainer.Runtime())
    assert not list((tmp_path / "file").parent.glob(".*probe"))


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [spec.name.upper() for spec in fields(trainer.Hyperparameters) if f"`{spec.name.upper()}`" not in readme]
    assert not missing, f"README.md lacks {missing}"
