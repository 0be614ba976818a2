"""trainer.settings: settings from the environment, ranges, profiles, one-line errors."""

from __future__ import annotations

import glob
import math
from dataclasses import fields
from pathlib import Path

import pytest

from tools import pack
from trainer.main import run_cli
from trainer.settings import (PROFILES, Hyperparameters, InputError, changed_settings, describe_settings, misspelled_settings,
                              profile_defaults, with_smoke_when_no_data)
from conftest import ROOT



def test_defaults_are_the_pr1217_record_run():
    hp = Hyperparameters.from_env({})
    assert (hp.num_layers, hp.model_dim, hp.num_heads, hp.num_kv_heads) == (11, 512, 8, 4)
    assert (hp.qk_gain_init, hp.slot_enabled, hp.slot_steps, hp.slot_lr) == (5.0, True, 8, 0.005)
    assert (hp.train_batch_tokens, hp.train_seq_len, hp.muon_eq_r, hp.matrix_lr) == (786_432, 2048, True, 0.03)
    assert (hp.early_layers_lr_scale, hp.gptq_fine_scales, hp.max_wallclock_seconds) == (1.0, False, 600.0)


def test_environment_beats_the_smoke_settings():
    hp = Hyperparameters.from_env({"SMOKE": "1", "MODEL_DIM": "96", "MUON_EQ_R": "0"})
    assert hp.smoke and hp.model_dim == 96 and hp.num_layers == 4 and not hp.muon_eq_r


def test_the_smoke_run_is_bounded_by_steps():
    hp = Hyperparameters.from_env({"SMOKE": "1"})
    assert hp.max_wallclock_seconds == 0 and hp.iterations > 0 and hp.safety_cap_seconds > 0


@pytest.mark.parametrize("environ, message", [
    ({"NUM_LAYERS": "eleven"}, "NUM_LAYERS='eleven' is not allowed: expected an integer"),
    ({"QK_GAIN_INIT": "nan"}, "QK_GAIN_INIT='nan' is not allowed: expected a finite number"),
    ({"MUON_EQ_R": "maybe"}, "MUON_EQ_R='maybe' is not allowed: expected 0 or 1"),
    ({"NUM_HEADS": "7"}, "NUM_HEADS=7 is not allowed: must divide MODEL_DIM=512"),
    ({"NUM_HEADS": "0"}, "NUM_HEADS=0 is not allowed: must lie in [1, inf)"),
    ({"NUM_KV_HEADS": "0"}, "NUM_KV_HEADS=0 is not allowed: must lie in [1, inf)"),
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS=3 is not allowed: must divide NUM_HEADS=8"),
    ({"SEED": "-1"}, "SEED=-1 is not allowed: must lie in [0, 4294967295]"),
    ({"SEED": str(2**32)}, "SEED=4294967296 is not allowed: must lie in [0, 4294967295]"),
    ({"TTT_CHUNK_TOKENS": "0"}, "TTT_CHUNK_TOKENS=0 is not allowed: must lie in [1, inf)"),
    ({"SLOT_STEPS": "-2"}, "SLOT_STEPS=-2 is not allowed: must lie in [0, inf)"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS=1000 is not allowed: must be a multiple of TRAIN_SEQ_LEN=2048"),
    ({"SLOT_MODE": "future"}, "SLOT_MODE='future' is not allowed: one of window, batch_causal, shared"),
    ({"VE_LAYERS": "9,99"}, "VE_LAYERS='9,99' is not allowed: layers must lie in 0..10"),
    ({"VE_LAYERS": "a,b"}, "VE_LAYERS='a,b' is not allowed: a comma-separated list of layer numbers"),
    ({"EVAL_STRIDE": "4096"}, "EVAL_STRIDE=4096 is not allowed: must be at most EVAL_SEQ_LEN=2048"),
    ({"ROPE_DIMS": "2"}, "ROPE_DIMS=2 is not allowed: must be 0 (all) or even in 4..the head dim"),
    ({"EMA_DECAY": "1"}, "EMA_DECAY=1.0 is not allowed: must lie in [0, 1)"),
    ({"ROPE_DIMS": "1"}, "ROPE_DIMS=1 is not allowed: must be 0 (all) or even in 4..the head dim"),
    ({"ROPE_DIMS": "66"}, "ROPE_DIMS=66 is not allowed: must be 0 (all) or even in 4..the head dim"),
    ({"ROPE_DIMS": "5"}, "ROPE_DIMS=5 is not allowed: must be 0 (all) or even in 4..the head dim"),
    ({"RUN_ID": ".hidden"}, "RUN_ID='.hidden' is not allowed: letters, digits, '.', '_' and '-' (at most 128, not starting "
                            "with '.'): it names logs/<RUN_ID>.txt"),
    ({"ARTIFACT_PATH": "out/.."}, "ARTIFACT_PATH='out/..' is not allowed: a file name, optionally in a folder"),
    ({"MLP_MULT": "1.01"}, "MLP_MULT=1.01 is not allowed: must give a whole hidden width"),
    ({"BIGRAM_VOCAB_SIZE": "1"}, "BIGRAM_VOCAB_SIZE=1 is not allowed: must be 0 (off) or at least 2"),
    ({"VE_LAYERS": "11"}, "VE_LAYERS='11' is not allowed: layers must lie in 0..10"),
    ({"XSA_LAST_N": "12"}, "XSA_LAST_N=12 is not allowed: must be at most NUM_LAYERS=11"),
    ({"GPTQ_RESERVE_MS": "600100"}, "GPTQ_RESERVE_MS=600100.0 is not allowed: must be less than MAX_WALLCLOCK_SECONDS=600 in ms"),
    ({"GPTQ_RESERVE_MS": "600000"}, "GPTQ_RESERVE_MS=600000.0 is not allowed: must be less than MAX_WALLCLOCK_SECONDS=600 in ms"),
    ({"MATRIX_CLIP_SIGMAS": "12", "GPTQ_FINE_SCALES": "1"}, "GPTQ_FINE_SCALES=1 is not allowed: only refines the quantile "
                                                           "search: not with MATRIX_CLIP_SIGMAS > 0"),
    ({"MUON_MOMENTUM": "1"}, "MUON_MOMENTUM=1.0 is not allowed: must lie in [0, 1)"),
])
def test_bad_settings_name_the_variable(environ, message):
    with pytest.raises(InputError) as caught:
        Hyperparameters.from_env(environ)
    assert str(caught.value).startswith(message)


def test_a_misspelled_setting_is_named_with_the_closest_real_one():
    warnings = misspelled_settings({"SLOT_STEP": "4", "PATH": "/bin", "MODEL_DIMS": "64", "SLOT_STEPS": "4"})
    assert warnings == ["warning: MODEL_DIMS is not a setting (ignored); did you mean MODEL_DIM?",
                        "warning: SLOT_STEP is not a setting (ignored); did you mean SLOT_STEPS?"]


def test_changed_settings_list_only_what_differs():
    assert changed_settings(Hyperparameters.from_env({"SEED": "42", "SLOT_MODE": "shared"})) == \
        "SEED=42 SLOT_MODE=shared"
    assert changed_settings(Hyperparameters.from_env({})) == "none"


def test_help_starts_with_its_first_line(capsys):
    assert run_cli(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Parameter-golf trainer") and "  SLOT_STEPS " in out


NUMBERS = [spec for spec in fields(Hyperparameters) if spec.type in ("int", "float")]


def outside(interval: str, kind: str) -> list:
    """Values just outside an interval like "[0, 1)" (none beyond an infinite end)."""
    low, high = (float(part) for part in interval[1:-1].split(","))
    values = []
    if math.isfinite(low):
        values.append(low if interval[0] == "(" else low - (1 if kind == "int" else 1e-9 * max(1, abs(low))))
    if math.isfinite(high):
        values.append(high if interval[-1] == ")" else high + (1 if kind == "int" else 1e-9 * max(1, abs(high))))
    return [int(v) if kind == "int" else v for v in values]


def test_every_number_states_its_range_and_the_defaults_lie_in_it():
    assert all(isinstance(spec.metadata["within"], str) for spec in NUMBERS), \
        [spec.name for spec in NUMBERS if not isinstance(spec.metadata["within"], str)]
    for profile in PROFILES:
        profile_defaults(profile, False).validate()
        profile_defaults(profile, True).validate()


@pytest.mark.parametrize("spec", NUMBERS, ids=[spec.name for spec in NUMBERS])
def test_a_number_outside_its_range_stops_at_start_with_one_line(spec):
    for value in outside(spec.metadata["within"], spec.type):
        with pytest.raises(InputError) as caught:
            Hyperparameters.from_env({spec.name.upper(): repr(value)})
        assert str(caught.value).startswith(f"{spec.name.upper()}={value!r} is not allowed: must lie in "), caught.value


@pytest.mark.parametrize("environ, message", [
    ({"SLOT_LR": "-1"}, "SLOT_LR=-1.0 is not allowed: must lie in [0, inf)"),
    ({"BETA1": "1.5"}, "BETA1=1.5 is not allowed: must lie in [0, 1)"),
    ({"LOGIT_SOFTCAP": "0"}, "LOGIT_SOFTCAP=0.0 is not allowed: must lie in (0, inf)"),
    ({"ROPE_BASE": "-5"}, "ROPE_BASE=-5.0 is not allowed: must lie in (1, inf)"),
    ({"MAX_WALLCLOCK_SECONDS": "1", "GPTQ_RESERVE_MS": "9000"},
     "GPTQ_RESERVE_MS=9000.0 is not allowed: must be less than MAX_WALLCLOCK_SECONDS=1 in ms"),
    ({"RUN_ID": "../x"}, "RUN_ID='../x' is not allowed: letters, digits"),
    ({"RUN_ID": "/tmp/abs"}, "RUN_ID='/tmp/abs' is not allowed: letters, digits"),
    ({"RUN_ID": ".hidden"}, "RUN_ID='.hidden' is not allowed: letters, digits"),
    ({"ARTIFACT_PATH": ""}, "ARTIFACT_PATH='' is not allowed: a file name"),
    ({"ARTIFACT_PATH": "."}, "ARTIFACT_PATH='.' is not allowed: a file name"),
    ({"ARTIFACT_PATH": "out/"}, "ARTIFACT_PATH='out/' is not allowed: a file name"),
    ({"PROFILE": "pr9999"}, "PROFILE='pr9999' is not allowed: one of pr1217, pr1493"),
], ids=["slot_lr", "beta1", "softcap", "rope_base", "reserve", "run_id_up", "run_id_absolute", "run_id_hidden",
        "artifact_empty", "artifact_dot", "artifact_folder", "profile"])
def test_the_examples_of_late_failures_now_stop_at_start(environ, message):
    with pytest.raises(InputError) as caught:
        Hyperparameters.from_env(environ)
    assert str(caught.value).startswith(message)


def test_glob_characters_in_data_path_are_literal(tmp_path):
    folder = tmp_path / "data[1]*"
    folder.mkdir()
    (folder / "fineweb_train_000000.bin").write_bytes(b"")
    hp = Hyperparameters.from_env({"DATA_PATH": str(folder)})
    assert [Path(p).parent.name for p in glob.glob(hp.train_files)] == ["data[1]*"]


def test_the_smoke_run_starts_when_there_is_no_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert with_smoke_when_no_data({})["SMOKE"] == "1"
    assert "SMOKE" not in with_smoke_when_no_data({"DATA_PATH": "mine"})
    shards = tmp_path / Hyperparameters().data_path
    shards.mkdir(parents=True)
    (shards / "fineweb_train_000000.bin").write_bytes(b"")
    assert "SMOKE" not in with_smoke_when_no_data({})


def test_a_profile_sets_its_record_values_and_every_setting_still_wins():
    hp = Hyperparameters.from_env({"PROFILE": "pr1493"})
    assert (hp.vocab_size, hp.mlp_mult, hp.qk_gain_init, hp.num_loops, hp.parallel_residual_start) == (8192, 4.0, 5.25, 2, 7)
    assert (hp.matrix_lr, hp.muon_wd, hp.embed_wd, hp.adam_wd, hp.ema_decay, hp.warmdown_frac) == (0.022, 0.095, 0.085, 0.02, 0.9965, 0.72)
    assert (hp.matrix_clip_sigmas, hp.embed_clip_sigmas, hp.gptq_reserve_ms, hp.train_sampler) == (12.85, 20.0, 12000.0, "shuffled")
    assert not hp.slot_enabled and hp.ttt_enabled and (hp.ttt_lr, hp.ttt_freeze_blocks) == (0.005, 0)
    assert Hyperparameters.from_env({"PROFILE": "pr1493", "NUM_LOOPS": "0"}).num_loops == 0
    assert changed_settings(Hyperparameters.from_env({"PROFILE": "pr1493", "SEED": "42"})) == "SEED=42"
    assert changed_settings(Hyperparameters.from_env({"PROFILE": "pr1493", "SMOKE": "1"})) == "none"


def test_the_smoke_run_keeps_each_profiles_features():
    smoke = Hyperparameters.from_env({"PROFILE": "pr1493", "SMOKE": "1"})
    assert smoke.num_loops == 2 and smoke.loop_end < smoke.num_layers and 0 <= smoke.parallel_residual_start < smoke.num_layers
    assert smoke.ttt_enabled and smoke.vocab_size == 8192 and smoke.data_path != profile_defaults("pr1217", True).data_path


def test_help_shows_every_profiles_values_and_the_ranges():
    text = describe_settings()
    assert text.startswith("Environment variables (pr1217 / pr1493 values, then the allowed range):\n  PROFILE ")
    assert len(text.splitlines()) == 1 + len(fields(Hyperparameters))
    assert "  VOCAB_SIZE                   [1024 / 8192] [2, 65536]: tokenizer vocabulary size" in text
    assert "  MATRIX_LR                    [0.03 / 0.022] [0, inf): Muon LR of the weight banks" in text


@pytest.mark.parametrize("environ, message", [
    ({"NUM_LOOPS": "2", "LOOP_START": "5", "LOOP_END": "3"}, "LOOP_END=3 is not allowed: must lie in LOOP_START=5..NUM_LAYERS-1=10"),
    ({"NUM_LOOPS": "2", "LOOP_END": "11"}, "LOOP_END=11 is not allowed: must lie in LOOP_START=3..NUM_LAYERS-1=10"),
    ({"WARMDOWN_FRAC": "0.5"}, "WARMDOWN_FRAC=0.5 is not allowed: and WARMDOWN_ITERS=3500 both set the warmdown"),
    ({"PROFILE": "pr1493", "GPTQ_FINE_SCALES": "1"}, "GPTQ_FINE_SCALES=1 is not allowed: only refines the quantile search"),
    ({"TRAIN_SAMPLER": "random"}, "TRAIN_SAMPLER='random' is not allowed: one of coprime, shuffled"),
])
def test_the_new_settings_check_each_other(environ, message):
    with pytest.raises(InputError) as caught:
        Hyperparameters.from_env(environ)
    assert str(caught.value).startswith(message)


def test_the_readme_documents_every_setting_as_this_module_has_it():
    """The README's table is generated from each setting's profiles, range and meaning."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert pack.readme_with_table(readme) == readme, "run python tools/pack.py"


@pytest.mark.parametrize("environ", [
    {"ROPE_DIMS": "0"}, {"ROPE_DIMS": "4"}, {"ROPE_DIMS": "6"}, {"ROPE_DIMS": "64"}, {"MLP_MULT": "1.001953125"},
    {"BIGRAM_VOCAB_SIZE": "2"}, {"BIGRAM_VOCAB_SIZE": "0"}, {"VE_LAYERS": "0,10"}, {"XSA_LAST_N": "11"},
    {"EVAL_STRIDE": "2048"}, {"GPTQ_RESERVE_MS": "599999"}, {"NUM_LOOPS": "1", "LOOP_START": "4", "LOOP_END": "4"},
    {"NEGATIVE_SLOPE": "1"}, {"NEGATIVE_SLOPE": "0"}, {"SEED": "4294967295"},
], ids=lambda environ: " ".join(f"{k}={v}" for k, v in environ.items()))
def test_the_edges_of_each_rule_are_allowed(environ):
    Hyperparameters.from_env(environ)  # the edges of the ranges and rules above, each on the allowed side


@pytest.mark.parametrize("word, value", [("1", True), ("true", True), ("Yes", True), (" ON ", True), ("TRUE", True),
                                         ("0", False), ("false", False), ("no", False), ("Off", False), ("", False),
                                         ("FALSE", False)])
def test_every_word_for_a_switch(word, value):
    assert Hyperparameters.from_env({"SLOT_ENABLED": word}).slot_enabled is value


def test_settings_come_from_the_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("SLOT_STEPS", "3")
    monkeypatch.setenv("SMOKE", "1")
    hp = Hyperparameters.from_env()
    assert hp.slot_steps == 3 and hp.smoke and hp.num_layers == 4


def test_the_smoke_run_starts_when_the_chosen_profile_has_no_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shards = tmp_path / Hyperparameters().data_path  # the pr1217 profile's data only
    shards.mkdir(parents=True)
    (shards / "fineweb_train_000000.bin").write_bytes(b"")
    assert with_smoke_when_no_data({"PROFILE": "pr1493"}) == {"PROFILE": "pr1493", "SMOKE": "1"}
    assert with_smoke_when_no_data({"PROFILE": "pr1217"}) == {"PROFILE": "pr1217"}
    assert with_smoke_when_no_data({"SMOKE": "0", "PROFILE": "pr1493"}) == {"SMOKE": "0", "PROFILE": "pr1493"}
    assert with_smoke_when_no_data({"PROFILE": "nonesuch"}) == {"PROFILE": "nonesuch"}  # refused later, by its name
