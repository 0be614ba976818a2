"""trainer.main: one whole run in one process, the shipped file behaving like the source,
and every way a run can end (as unit tests of run_cli, and once through the shipped file)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys

import pytest

import trainer.main as main_module
from trainer.artifact import ArtifactReport, running_code
from trainer.data import load_validation_tokens
from trainer.evaluation import EvalResult
from trainer.files import file_sha256
from trainer.main import check_data_tokenizer, explain_score, load_tokenizer, log_model, log_run_header, log_time_budget
from trainer.runtime import Runtime, Terminated
from trainer.settings import Hyperparameters, InputError, RunError
from trainer.shards import read_shard
from conftest import QUICK_RUN, ROOT, TOKENIZER, TOKENIZER_8192, run_in_process, run_log


def quick_settings(quick_corpus) -> dict[str, str]:
    """A quick whole run with SLOT and TTT on, a seed of its own and a misspelt setting."""
    return {**QUICK_RUN, "DATA_PATH": str(quick_corpus), "SEED": "7", "SLOT_STEP": "4", "TTT_ENABLED": "1",
            "TTT_CHUNK_TOKENS": "4096"}


def shipped_run(folder, settings: dict) -> subprocess.Popen:
    """The shipped file started in `folder`. Several run at once on two cores, each with the
    smoke run's two threads: a thread that waits sleeps rather than spins (OMP_WAIT_POLICY)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("RUN_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py")], cwd=folder, text=True,
                            env={**environ, **settings, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# How a run ends, for real: (settings, exit status, the last line on stderr and in the log,
# whether a log exists). "sigterm" is sent SIGTERM once training has started. The shipped
# file is tried on SHIPPED_ENDINGS (its own start-up and signal handling), the readable
# source in process on the rest.
ENDINGS = {
    "bad_setting": ({"NUM_HEADS": "5"}, 2, r"error: NUM_HEADS=5 is not allowed: must divide MODEL_DIM=64", False),
    "device_as_tokenizer": ({"TOKENIZER_PATH": "/dev/null"}, 2,
                            r"error: TOKENIZER_PATH='/dev/null' is not allowed: not a regular file", True),
    "data_of_another_tokenizer": ({"TOKENIZER_PATH": str(TOKENIZER_8192), "VOCAB_SIZE": "8192"}, 2,
                                  r"error: TOKENIZER_PATH='\S+' is not allowed: \S+'s manifest says its shards were made "
                                  r"with tokenizer sha256 849ea920119b5135, this one is 4e979c92754cc9d7", True),
    "run_failure": ({"ITERATIONS": "30", "TIED_EMBED_LR": "1e30", "SCALAR_LR": "1e30", "GRAD_CLIP_NORM": "0"}, 1,
                    r"error: training loss is not finite at step \d+; stopping \(lower the LRs or check the data\)", True),
    "sigterm": ({"ITERATIONS": "100000"}, 143, r"terminated \(SIGTERM\) during training at step \d+", True),
}
SHIPPED_ENDINGS = ("bad_setting", "sigterm")


def assert_ended(case: str, folder, returncode: int, stderr: str) -> None:
    _, status, line, logged = ENDINGS[case]
    assert returncode == status and "Traceback" not in stderr
    assert re.fullmatch(line, stderr.strip().splitlines()[-1]), stderr[-1000:]
    logs = list((folder / "logs").glob("*.txt"))
    assert len(logs) == int(logged) and all(re.fullmatch(line, log.read_text().splitlines()[-1]) for log in logs)


@pytest.fixture(scope="module")
def shipped_runs(tmp_path_factory, quick_corpus) -> dict[str, tuple]:
    """The shipped file on the quick settings and on every case of SHIPPED_ENDINGS, all
    started at once (each process spends about a second importing torch), "sigterm"
    signalled after its first training step: {case: (folder, exit status, stdout, stderr)}."""
    started = {"quick": (tmp_path_factory.mktemp("quick"), quick_settings(quick_corpus))}
    for case in SHIPPED_ENDINGS:
        started[case] = tmp_path_factory.mktemp(case), {**QUICK_RUN, "DATA_PATH": str(quick_corpus), **ENDINGS[case][0]}
    processes = {case: shipped_run(folder, settings) for case, (folder, settings) in started.items()}
    sigterm = processes["sigterm"]
    while not (sigterm.stdout.readline() or "step:1/").startswith("step:1/"):
        pass
    sigterm.send_signal(signal.SIGTERM)
    ended = {}
    for case, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        ended[case] = started[case][0], process.returncode, stdout, stderr
    return ended


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, quick_corpus):
    """The quick settings' run of the readable source, in process: (exit status, log,
    console, folder)."""
    folder = tmp_path_factory.mktemp("quick_run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        console = io.StringIO()
        with contextlib.redirect_stdout(console):
            status = run_in_process(folder, quick_settings(quick_corpus), monkeypatch)
    return status, run_log(folder), console.getvalue(), folder


def test_a_quick_run_writes_a_self_describing_log(quick_run, quick_corpus):
    status, log, out, folder = quick_run
    lines = log.splitlines()
    assert status == 0
    code = running_code()
    assert lines[0] == f"log: {next((folder / 'logs').glob('*.txt'))}"
    assert lines[1] == f"code: source_sha256:{code.source_sha256[:16]} shipped_sha256:{code.shipped_sha256[:16]}"
    assert lines[2] == "profile: pr1217 smoke" and lines[3].startswith("settings_changed: ") and "SEED=7" in lines[3]
    assert "warning: SLOT_STEP is not a setting (ignored); did you mean SLOT_STEPS?" in lines[4:6]
    assert re.search(r"^tokenizer_sha256:[0-9a-f]{64} \(matches the data's manifest\)$", log, re.MULTILINE)
    hp = Hyperparameters.from_env(quick_settings(quick_corpus))
    train_shards = [read_shard(path) for path in sorted(quick_corpus.glob("fineweb_train_*.bin"))]
    validation = load_validation_tokens(hp.val_files, hp.eval_seq_len, hp.vocab_size, Runtime())
    assert f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={TOKENIZER}" in lines
    assert (f"train_loader:dataset:{quick_corpus.name} train_shards:{len(train_shards)} "
            f"tokens:{sum(shard.size for shard in train_shards)}") in lines
    assert f"val_loader:shards pattern={hp.val_files} tokens:{validation.numel() - 1}" in lines  # ordinals scored
    assert re.search(r"^final_int6_sliding_window_slot_exact val_loss:[\d.]+ val_bpb:[\d.]+$", log, re.MULTILINE)
    assert re.search(r"^final_score legal_ttt_exact val_bpb:[\d.]+ slot:off causal:yes accepted:yes ", log, re.MULTILINE)
    assert f"Code size: {code.shipped_bytes} bytes" in log
    assert f"artifact: {folder / 'final_model.int6.ptz'}" in out and out.splitlines()[-1] == lines[0]
    assert "result:" not in log  # the explanation is for the smoke run as shipped only


class Built(Exception):
    pass


def test_the_smoke_run_builds_its_corpus_only_in_its_own_folder(tmp_path, monkeypatch):
    calls = []

    def recording_build(*args):
        calls.append(args)
        raise Built  # the rest of load_data is another test's

    monkeypatch.setattr(main_module, "build_smoke_corpus", recording_build)
    hp = Hyperparameters.from_env({"SMOKE": "1"})
    with pytest.raises(Built):
        main_module.load_data(hp, Runtime())
    ((data_path, tokenizer, tokenizer_path),) = calls
    assert data_path == hp.data_path and tokenizer.vocab_size() == 1024 and tokenizer_path == TOKENIZER
    elsewhere = Hyperparameters.from_env({"SMOKE": "1", "DATA_PATH": str(tmp_path)})
    with pytest.raises(InputError):  # no shards there, and none made
        main_module.load_data(elsewhere, Runtime())
    assert len(calls) == 1 and list(tmp_path.iterdir()) == []


def test_the_explanation_is_only_for_the_smoke_run_as_shipped():
    score = EvalResult(nll=1000.0, tokens=1000.0, bytes=800.0, seconds=1.0)
    line = explain_score(Hyperparameters.from_env({"SMOKE": "1"}), score)
    assert re.fullmatch(r"result: 1\.8034 bits per byte of held-out text \(lower is better; guessing uniformly scores 12\.50; "
                        r"SEED=1337 gives 1\.82 on the machine the README names\)", line)
    assert explain_score(Hyperparameters.from_env({"SMOKE": "1", "SEED": "2"}), score) is None
    assert explain_score(Hyperparameters.from_env({}), score) is None


def test_the_header_says_a_run_replaces_an_earlier_artifact_and_what_the_safety_cap_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "final_model.int6.ptz").write_bytes(b"an earlier run's")
    lines = []
    runtime = Runtime()
    runtime.log = lambda message, console=True: lines.append(message)
    log_run_header(Hyperparameters.from_env({"SMOKE": "1"}), runtime)
    assert "artifact: final_model.int6.ptz exists (an earlier run's); this run replaces it (set ARTIFACT_PATH to keep it)" in lines
    assert lines[-1] == ("safety_cap: training stops after 3600s even before ITERATIONS; the run then says so at the end, "
                         "and its score is not the step-bounded one")
    lines.clear()
    log_run_header(Hyperparameters.from_env({"SAFETY_CAP_SECONDS": "1"}), runtime)  # not the smoke run
    assert lines[2] == "profile: pr1217" and lines[-1].startswith("safety_cap: training stops after 1s even before")


def final_lines(output: str) -> list[str]:
    """The run's result lines without the timings, which differ from run to run."""
    lines = [line for line in output.splitlines() if line.startswith(("final_", "legal_ttt", "Serialized", "step:"))]
    return [re.sub(r"(eval_time|train_time|step_avg|eval_total_time):[\d.]+ms", "", line) for line in lines]


@pytest.mark.packed
def test_the_shipped_file_behaves_like_the_source(shipped_runs, quick_run):
    status, log, _, _ = quick_run
    _, returncode, stdout, stderr = shipped_runs["quick"]
    assert status == returncode == 0, stderr[-2000:]
    assert final_lines(log) == final_lines(stdout) and len(final_lines(stdout)) > 8
    assert running_code().shipped_sha256[:16] in stdout.splitlines()[1]  # the same shipped hash either way


@pytest.mark.packed
@pytest.mark.parametrize("case", SHIPPED_ENDINGS)
def test_how_the_shipped_file_ends(shipped_runs, case):
    """Exit status 2 for bad input (one line, at start), 128+N for a signal; the line in the
    log too once the log exists."""
    folder, returncode, _, stderr = shipped_runs[case]
    assert_ended(case, folder, returncode, stderr)


@pytest.mark.parametrize("case", [case for case in ENDINGS if case not in SHIPPED_ENDINGS])
def test_how_a_run_ends(tmp_path, quick_corpus, monkeypatch, capsys, case):
    """Exit status 2 for bad input found once the log exists, 1 for a failed run."""
    status = run_in_process(tmp_path, {**QUICK_RUN, "DATA_PATH": str(quick_corpus), **ENDINGS[case][0]}, monkeypatch)
    assert_ended(case, tmp_path, status, capsys.readouterr().err)


@pytest.mark.parametrize("error, status, line", [
    (InputError("BAD=1 is not allowed: no"), 2, "error: BAD=1 is not allowed: no"),
    (RunError("the final score is not finite (nan)"), 1, "error: the final score is not finite (nan)"),
    (OSError(28, "No space left on device"), 1, "error: [Errno 28] No space left on device"),
    (KeyboardInterrupt(), 130, "interrupted during training at step 4"),
    (Terminated(15), 143, "terminated (SIGTERM) during training at step 4"),
    (Terminated(1), 129, "terminated (SIGHUP) during training at step 4"),
], ids=["bad_input", "run_failure", "os_error", "ctrl_c", "sigterm", "sighup"])
def test_every_way_a_run_ends_is_one_line_and_a_status(tmp_path, monkeypatch, capsys, error, status, line):
    def failing_run(hp, runtime):
        runtime.stage = "during training at step 4"
        raise error

    monkeypatch.setattr(main_module, "run", failing_run)
    assert run_in_process(tmp_path, {**QUICK_RUN, "RUN_ID": "r"}, monkeypatch) == status
    assert capsys.readouterr().err == line + "\n"
    assert (tmp_path / "logs" / "r.txt").read_text().splitlines()[-1] == line


@pytest.mark.parametrize("settings, says_so", [({}, True), ({"SMOKE": "1"}, False)], ids=["no_data", "smoke_asked"])
def test_a_bare_run_without_fineweb_says_it_runs_the_smoke_run(tmp_path, monkeypatch, capsys, settings, says_so):
    monkeypatch.setattr(main_module, "run", lambda hp, runtime: 0 if hp.smoke else 5)
    assert run_in_process(tmp_path, settings, monkeypatch) == 0
    message = ("smoke: no FineWeb at the default path: running the smoke run (SMOKE=1); "
               "tools/download_fineweb.py gets FineWeb\n")
    assert capsys.readouterr().out == (message if says_so else "")


def test_arguments_are_refused_with_a_pointer_to_the_settings(capsys):
    assert main_module.run_cli(["--iterations", "5"]) == 2
    assert capsys.readouterr().err == ("error: unknown argument '--iterations': settings are environment variables "
                                       "(see --help)\n")


def test_an_unexpected_error_is_logged_and_raised(tmp_path, monkeypatch):
    def bug(hp, runtime):
        raise ValueError("a bug")

    monkeypatch.setattr(main_module, "run", bug)
    with pytest.raises(ValueError, match="a bug"):
        run_in_process(tmp_path, {**QUICK_RUN, "RUN_ID": "r"}, monkeypatch)
    assert run_log(tmp_path).splitlines()[-1] == "error: unexpected ValueError: a bug (traceback on the console)"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_setting_without_starting_a_run(tmp_path, monkeypatch, capsys, flag):
    assert run_in_process(tmp_path, {}, monkeypatch, [flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Parameter-golf trainer") and "  SLOT_STEPS " in out and not (tmp_path / "logs").exists()
    assert out == f"{main_module.USAGE}\n{main_module.describe_settings()}\n"


def test_the_pr1493_smoke_run_trains_loops_and_scores_with_ttt(tmp_path, monkeypatch, quick_corpus_8192):
    """PROFILE=pr1493 SMOKE=1 end to end at a few steps: the SP8192 smoke corpus (its
    validation text cut short), loops switched on during training, parallel residuals,
    SDClip GPTQ incl. the token table, score-first TTT counted."""
    settings = {"PROFILE": "pr1493", "SMOKE": "1", "ITERATIONS": "2", "WARMUP_STEPS": "1", "VAL_LOSS_EVERY": "0",
                "TRAIN_BATCH_TOKENS": "1024", "DATA_PATH": str(quick_corpus_8192), "TRAIN_SEQ_LEN": "64", "EVAL_SEQ_LEN": "64",
                "EVAL_STRIDE": "64", "EVAL_BATCH_SEQS": "64", "ROPE_TRAIN_SEQ_LEN": "64", "GPTQ_CALIB_SAMPLES": "1",
                "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "NUM_LAYERS": "4", "LOOP_START": "1", "LOOP_END": "2",
                "PARALLEL_RESIDUAL_START": "3", "XSA_LAST_N": "4", "TTT_CHUNK_TOKENS": "1024", "RUN_ID": "pr1493"}
    assert run_in_process(tmp_path, settings, monkeypatch) == 0
    log = run_log(tmp_path)
    assert "profile: pr1493 smoke" in log and "loop_warmup_step:1/1" in log
    assert "layer_loop:enabled step:1 frac:0.500 encoder:[0, 1, 2, 1] decoder:[2, 1, 2, 3]" in log
    assert re.search(r"^gptq_quantize: 25 GPTQ matrices, 0 rounded per row", log, re.MULTILINE)  # 4 layers x 6 + the table
    assert re.search(r"^final_score legal_ttt_exact val_bpb:[\d.]+ slot:off causal:yes accepted:yes ", log, re.MULTILINE)
    assert re.search(r"^tokenizer_sha256:[0-9a-f]{64} \(matches the data's manifest\)$", log, re.MULTILINE)


@pytest.mark.parametrize("smi, driver", [("550.54.15\n550.54.15\n", "550.54.15"), ("", "unknown"), (None, "unknown")],
                         ids=["two_gpus", "silent", "missing"])
def test_the_gpu_is_described_by_name_capability_driver_and_cuda(monkeypatch, smi, driver):
    """nvidia-smi's first line gives the driver (unknown when it says nothing or is missing)."""
    asked = []

    def nvidia_smi(command, **kwargs):
        asked.append((command, kwargs))
        if smi is None:
            raise FileNotFoundError("nvidia-smi")
        return subprocess.CompletedProcess(command, 0, stdout=smi)

    monkeypatch.setattr(main_module.subprocess, "run", nvidia_smi)
    monkeypatch.setattr(main_module.torch.cuda, "get_device_capability", lambda device: (9, 0) if device.index == 3 else None)
    monkeypatch.setattr(main_module.torch.cuda, "get_device_name", lambda device: f"NVIDIA H100 #{device.index}")
    monkeypatch.setattr(main_module.torch.version, "cuda", "12.8")
    described = main_module.gpu_description(main_module.torch.device("cuda", 3))
    assert described == f"gpu:NVIDIA H100 #3 capability:9.0 driver:{driver} cuda:12.8"
    assert asked == [(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                      {"capture_output": True, "text": True, "timeout": 10})]


def logged_by(function, *args):
    """The lines `function` logs, and what it returns."""
    lines, runtime = [], Runtime()
    runtime.log = lambda message, console=True: lines.append(message)
    returned = function(*args, runtime)
    return lines, returned


def test_the_header_names_the_machine_torch_python_and_seed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines, _ = logged_by(log_run_header, Hyperparameters.from_env({"SMOKE": "1", "SEED": "42", "SAFETY_CAP_SECONDS": "0"}))
    assert lines[0] == "log: none" and lines[2] == "profile: pr1217 smoke" and lines[3] == "settings_changed: SEED=42 SAFETY_CAP_SECONDS=0.0"
    assert lines[4:] == [f"hardware: 1xCPU ({os.cpu_count()} cores)", f"torch:{main_module.torch.__version__} python:{sys.version.split()[0]}",
                         "seed:42"]


def test_the_model_lines_say_its_size_xsa_layers_and_schedule():
    hp = Hyperparameters.from_env({"SMOKE": "1", "NUM_LAYERS": "5", "XSA_LAST_N": "2", "MAX_WALLCLOCK_SECONDS": "12.5"})
    model = main_module.GPT(main_module.ModelConfig.from_settings(hp))
    lines, _ = logged_by(log_model, hp, model)
    assert lines == [f"model_params:{sum(p.numel() for p in model.parameters())}", "XSA:last_2 active_layers:[3, 4]",
                     "world_size:1 grad_accum_steps:1",
                     "attention_backend:sdpa attention_mode:gqa num_heads:4 num_kv_heads:2",
                     "tie_embeddings:True embed_lr:0.035 head_lr:0.0 matrix_lr:0.03 scalar_lr:0.025",
                     "train_batch_tokens:8192 train_seq_len:256 iterations:150 warmup_steps:2 max_wallclock_seconds:12.500 "
                     "safety_cap_seconds:3600.000"]


def test_the_model_lines_name_flash_attention_3_where_it_runs(monkeypatch):
    monkeypatch.setattr(main_module, "enable_flash_attention_3", lambda device: True)
    hp = Hyperparameters.from_env({"SMOKE": "1"})
    lines, _ = logged_by(log_model, hp, main_module.GPT(main_module.ModelConfig.from_settings(hp)))
    assert lines[3] == "attention_backend:flash_attention_3 attention_mode:gqa num_heads:4 num_kv_heads:2"


@pytest.mark.parametrize("cap, calibration, expected", [
    ("0", 5.0, []),
    ("600", 5.0, ["time_budget: training 590000ms + gptq calibration 5000ms = 595000ms of MAX_WALLCLOCK_SECONDS=600000ms"]),
    ("600", 10.5, ["time_budget: training 590000ms + gptq calibration 10500ms = 600500ms of MAX_WALLCLOCK_SECONDS=600000ms",
                   "warning: training and GPTQ calibration took 600.5s, over MAX_WALLCLOCK_SECONDS; calibration needed "
                   "10500ms of GPTQ_RESERVE_MS=9000"]),
    ("600", 10.0, ["time_budget: training 590000ms + gptq calibration 10000ms = 600000ms of MAX_WALLCLOCK_SECONDS=600000ms"]),
])
def test_the_time_budget_adds_calibration_to_training(cap, calibration, expected):
    training = main_module.TrainingTime(ms=590_000.0, steps=100, stopped=None)
    lines, _ = logged_by(log_time_budget, Hyperparameters.from_env({"MAX_WALLCLOCK_SECONDS": cap}), training, calibration)
    assert lines == expected


def test_a_one_second_cap_gets_its_budget_line_too():
    training = main_module.TrainingTime(ms=900.0, steps=2, stopped=None)
    hp = Hyperparameters.from_env({"MAX_WALLCLOCK_SECONDS": "1", "GPTQ_RESERVE_MS": "200"})
    lines, _ = logged_by(log_time_budget, hp, training, 0.05)
    assert lines == ["time_budget: training 900ms + gptq calibration 50ms = 950ms of MAX_WALLCLOCK_SECONDS=1000ms"]


def run_with_stand_ins(tmp_path, monkeypatch, runtime, stopped=None, code_bytes=10, after_scoring=lambda: None,
                       interloper=True):
    """`run` with stand-in phases: another process writes ARTIFACT_PATH (m.ptz) during
    training (with `interloper`); the export writes b"blob" where it is told, with 5 s of
    calibration. Returns the exit status, the log lines and what was loaded (bytes, name)."""
    monkeypatch.chdir(tmp_path)
    hp = Hyperparameters.from_env({"SMOKE": "1", "MAX_WALLCLOCK_SECONDS": "600", "ARTIFACT_PATH": str(tmp_path / "m.ptz")})
    lines, loaded, data = [], [], object()
    runtime.log = lambda message, console=True: lines.append(message)

    def train(hp, model, given, runtime):
        assert given is data
        if interloper:
            (tmp_path / "m.ptz").write_bytes(b"another run's")
        return main_module.TrainingTime(590_000.0, 100, stopped)

    def export(hp, model, runtime, target):
        target.write_bytes(b"blob")
        return ArtifactReport(path=target, blob=b"blob", code_bytes=code_bytes, calibration_seconds=5.0)

    def evaluate(hp, model, given, runtime):
        after_scoring()
        return EvalResult(1.0, 1.0, 1.0, 0.0)

    monkeypatch.setattr(main_module, "load_data", lambda hp, runtime: data)
    monkeypatch.setattr(main_module, "train", train)
    monkeypatch.setattr(main_module, "export_artifact", export)
    monkeypatch.setattr(main_module, "load_quantized_model",
                        lambda config, blob, source, runtime: loaded.append((blob, source)))
    monkeypatch.setattr(main_module, "evaluate_artifact", evaluate)
    return main_module.run(hp, runtime), lines, loaded


@pytest.mark.parametrize("log_name, own_name", [("r7.txt", "m.r7.ptz"), (None, "m.run.ptz")])
def test_a_run_hands_each_phase_what_the_one_before_made(tmp_path, monkeypatch, log_name, own_name):
    """Another process wrote ARTIFACT_PATH, so the run exports beside it under a name of its
    own (its log's, else "run"); the time budget adds the export's calibration to training's
    time; what it wrote is scored; a run the safety cap stopped says so before the end."""
    runtime = Runtime(log_path=tmp_path / log_name if log_name else None)
    status, lines, loaded = run_with_stand_ins(tmp_path, monkeypatch, runtime, stopped="safety_cap" if log_name else None)
    assert status == 0 and loaded == [(b"blob", str(tmp_path / own_name))]
    assert (tmp_path / "m.ptz").read_bytes() == b"another run's"
    assert "time_budget: training 590000ms + gptq calibration 5000ms = 595000ms of MAX_WALLCLOCK_SECONDS=600000ms" in lines
    safety = ("warning: SAFETY_CAP_SECONDS=3600 stopped training at step 100 of ITERATIONS=150: this score is not the "
              "step-bounded one, and depends on the machine's speed")
    ending = [*([safety] if log_name else []), f"artifact: {tmp_path / own_name}",
              f"log: {tmp_path / log_name if log_name else 'none'}"]
    assert lines[-len(ending):] == ending and (safety in lines) == bool(log_name)


def test_a_run_replaces_an_earlier_artifact_that_nothing_wrote_since_it_started(tmp_path, monkeypatch):
    (tmp_path / "m.ptz").write_bytes(b"an earlier run's")
    status, _, loaded = run_with_stand_ins(tmp_path, monkeypatch, Runtime(), interloper=False)
    assert status == 0 and loaded == [(b"blob", str(tmp_path / "m.ptz"))] and (tmp_path / "m.ptz").read_bytes() == b"blob"


def test_a_run_over_the_limit_ends_with_status_1_and_a_replaced_artifact_or_an_unwritable_log_fails(tmp_path, monkeypatch):
    over, replaced, unlogged = (tmp_path / name for name in ("over", "replaced", "unlogged"))
    for folder in (over, replaced, unlogged):
        folder.mkdir()
    assert run_with_stand_ins(over, monkeypatch, Runtime(), code_bytes=16_000_000)[0] == 1

    def replace():
        (replaced / "m.run.ptz").write_bytes(b"a third run's")

    with pytest.raises(RunError) as caught:
        run_with_stand_ins(replaced, monkeypatch, Runtime(), after_scoring=replace)
    assert str(caught.value) == (f"{replaced / 'm.run.ptz'} was replaced by another process after this run wrote it: "
                                 "the score above is for this run's own bytes, which are no longer on disk")
    runtime = Runtime()

    def fail_the_log():
        runtime.log_failure = "logs/r.txt: cannot write the log (No space left on device); it is incomplete"

    with pytest.raises(RunError) as caught:
        run_with_stand_ins(unlogged, monkeypatch, runtime, after_scoring=fail_the_log)
    assert str(caught.value) == runtime.log_failure


def test_a_tokenizer_that_cannot_serve_is_named_with_the_reason(tmp_path):
    (tmp_path / "junk.model").write_bytes(b"not a model")
    for path, reason in [(tmp_path / "none.model", "no such file"), (tmp_path, "not a regular file")]:
        with pytest.raises(InputError, match=rf"^TOKENIZER_PATH='{re.escape(str(path))}' is not allowed: {reason}$"):
            load_tokenizer(Hyperparameters.from_env({"TOKENIZER_PATH": str(path)}))
    with pytest.raises(InputError, match=r"junk.model' is not allowed: not a SentencePiece model \("):
        load_tokenizer(Hyperparameters.from_env({"TOKENIZER_PATH": str(tmp_path / "junk.model")}))
    with pytest.raises(InputError, match=rf"^VOCAB_SIZE=8192 is not allowed: the tokenizer {re.escape(str(TOKENIZER))} has 1024 pieces$"):
        load_tokenizer(Hyperparameters.from_env({"TOKENIZER_PATH": str(TOKENIZER), "VOCAB_SIZE": "8192"}))
    tokenizer, sha256 = load_tokenizer(Hyperparameters.from_env({"TOKENIZER_PATH": str(TOKENIZER)}))
    assert tokenizer.vocab_size() == 1024 and sha256 == file_sha256(TOKENIZER)


def test_the_data_manifest_decides_whether_the_tokenizer_matches(tmp_path):
    hp = Hyperparameters.from_env({"DATA_PATH": str(tmp_path), "TOKENIZER_PATH": "t.model"})
    assert check_data_tokenizer(hp, "ab" * 32) == "the data records no tokenizer"
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer_sha256": "ab" * 32}))
    assert check_data_tokenizer(hp, "ab" * 32) == "matches the data's manifest"
    with pytest.raises(InputError, match=rf"^TOKENIZER_PATH='t.model' is not allowed: {re.escape(str(tmp_path))}'s manifest says its "
                                         "shards were made with tokenizer sha256 abababababababab, this one is cdcdcdcdcdcdcdcd$"):
        check_data_tokenizer(hp, "cd" * 32)
