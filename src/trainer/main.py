"""Main: the run as a short list of phases, and the command line that turns every
failure into one line and an exit status."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import sentencepiece
import torch

from trainer.artifact import artifact_target, export_artifact, file_signature, load_quantized_model, running_code
from trainer.data import build_smoke_corpus, check_vocabulary, load_validation_tokens, shard_paths
from trainer.evaluation import EvalData, EvalResult, build_token_bytes, evaluate_artifact
from trainer.files import bundled_file, file_sha256
from trainer.shards import read_shard, recorded_tokenizer
from trainer.model import GPT, ModelConfig, enable_flash_attention_3
from trainer.runtime import Runtime, Terminated, open_run_files, start_runtime, stop_on_signals
from trainer.settings import (SMOKE_EXPECTED_BPB, SMOKE_SETTINGS, Hyperparameters, InputError, RunError, changed_settings,
                              describe_settings, misspelled_settings, with_smoke_when_no_data)
from trainer.training import TrainingTime, train

USAGE = """Parameter-golf trainer; settings are environment variables.
  torchrun --standalone --nproc_per_node=8 train_gpt.py   8 GPUs
  python train_gpt.py                                     1 process (no FineWeb: the smoke run)
  PROFILE=pr1493 python train_gpt.py                      another record's defaults
"""


def load_tokenizer(hp: Hyperparameters) -> tuple[Any, str]:
    """The SentencePiece model and its sha256, checked against the vocabulary size and
    against the tokenizer the data's manifest records."""
    path = bundled_file(hp.tokenizer_path)
    if not path.is_file():  # a device or a pipe would block the read forever
        reason = "not a regular file" if path.exists() else "no such file"
        raise InputError(f"TOKENIZER_PATH={hp.tokenizer_path!r} is not allowed: {reason}")
    try:
        tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as error:
        raise InputError(f"TOKENIZER_PATH={str(path)!r} is not allowed: not a SentencePiece model ({error})") from None
    if tokenizer.vocab_size() != hp.vocab_size:
        raise InputError(f"VOCAB_SIZE={hp.vocab_size} is not allowed: the tokenizer {path} has "
                         f"{tokenizer.vocab_size()} pieces")
    return tokenizer, file_sha256(path)


def check_data_tokenizer(hp: Hyperparameters, tokenizer_sha256: str) -> str:
    """Refuse data whose manifest names another tokenizer; say what is known."""
    recorded = recorded_tokenizer(hp.data_path)
    if recorded is not None and recorded != tokenizer_sha256:
        raise InputError(f"TOKENIZER_PATH={hp.tokenizer_path!r} is not allowed: {hp.data_path}'s manifest says its "
                         f"shards were made with tokenizer sha256 {recorded[:16]}, this one is {tokenizer_sha256[:16]}")
    return "matches the data's manifest" if recorded else "the data records no tokenizer"


def load_data(hp: Hyperparameters, runtime: Runtime) -> EvalData:
    """The tokenizer's byte table and the validation tokens; every shard checked."""
    tokenizer, tokenizer_sha256 = load_tokenizer(hp)
    if hp.smoke and hp.data_path == SMOKE_SETTINGS[hp.profile]["data_path"] and runtime.is_main:
        build_smoke_corpus(hp.data_path, tokenizer, bundled_file(hp.tokenizer_path))  # only into its own folder
    runtime.barrier()  # every rank waits for the corpus, whoever built it
    agreement = check_data_tokenizer(hp, tokenizer_sha256)
    val_tokens = load_validation_tokens(hp.val_files, max(hp.train_seq_len, hp.eval_seq_len), hp.vocab_size, runtime)
    train_paths = shard_paths(hp.train_files)
    train_shards = [read_shard(path) for path in train_paths]
    check_vocabulary(train_shards, train_paths, hp.vocab_size, runtime)
    runtime.log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={hp.tokenizer_path}")
    runtime.log(f"tokenizer_sha256:{tokenizer_sha256} ({agreement})")
    runtime.log(f"train_loader:dataset:{Path(hp.data_path).name} train_shards:{len(train_paths)} "
                f"tokens:{sum(shard.size for shard in train_shards)}")
    runtime.log(f"val_loader:shards pattern={hp.val_files} tokens:{val_tokens.numel() - 1}")
    return EvalData(val_tokens=val_tokens, token_bytes=build_token_bytes(tokenizer, hp.vocab_size, runtime.device))


def gpu_description(device: torch.device) -> str:
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10).stdout.split("\n")[0].strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    major, minor = torch.cuda.get_device_capability(device)
    return f"gpu:{torch.cuda.get_device_name(device)} capability:{major}.{minor} driver:{driver} cuda:{torch.version.cuda}"


def log_run_header(hp: Hyperparameters, runtime: Runtime) -> None:
    """What ties the log to its code, settings and machine."""
    code = running_code()
    runtime.log(f"log: {runtime.log_path.resolve() if runtime.log_path else 'none'}")
    runtime.log(f"code: source_sha256:{code.source_sha256[:16]} shipped_sha256:{code.shipped_sha256[:16]}")
    runtime.log(f"profile: {hp.profile}{' smoke' if hp.smoke else ''}")
    runtime.log(f"settings_changed: {changed_settings(hp)}")
    for warning in misspelled_settings(dict(os.environ)):
        runtime.log(warning)
    if runtime.device.type == "cuda":
        runtime.log(f"hardware: {runtime.world_size}x{torch.cuda.get_device_name(runtime.device)}")
        runtime.log(gpu_description(runtime.device))
    else:
        runtime.log(f"hardware: {runtime.world_size}xCPU ({os.cpu_count()} cores)")
    runtime.log(f"torch:{torch.__version__} python:{sys.version.split()[0]}")
    runtime.log(f"seed:{hp.seed}")
    if Path(hp.artifact_path).exists():
        runtime.log(f"artifact: {hp.artifact_path} exists (an earlier run's); this run replaces it "
                    "(set ARTIFACT_PATH to keep it)")
    if hp.safety_cap_seconds > 0:
        runtime.log(f"safety_cap: training stops after {hp.safety_cap_seconds:.0f}s even before ITERATIONS; "
                    "the run then says so at the end, and its score is not the step-bounded one")


def log_model(hp: Hyperparameters, model: GPT, runtime: Runtime) -> None:
    runtime.log(f"model_params:{sum(p.numel() for p in model.parameters())}")
    runtime.log(f"XSA:last_{hp.xsa_last_n} active_layers:{[i for i, block in enumerate(model.blocks) if block.attn.use_xsa]}")
    runtime.log(f"world_size:{runtime.world_size} grad_accum_steps:{runtime.accum_steps}")
    backend = "flash_attention_3" if enable_flash_attention_3(runtime.device) else "sdpa"
    runtime.log(f"attention_backend:{backend} attention_mode:gqa num_heads:{hp.num_heads} num_kv_heads:{hp.num_kv_heads}")
    runtime.log(f"tie_embeddings:True embed_lr:{hp.tied_embed_lr} head_lr:0.0 matrix_lr:{hp.matrix_lr} scalar_lr:{hp.scalar_lr}")
    runtime.log(f"train_batch_tokens:{hp.train_batch_tokens} train_seq_len:{hp.train_seq_len} "
                f"iterations:{hp.iterations} warmup_steps:{hp.warmup_steps} "
                f"max_wallclock_seconds:{hp.max_wallclock_seconds:.3f} safety_cap_seconds:{hp.safety_cap_seconds:.3f}")


def log_time_budget(hp: Hyperparameters, training: TrainingTime, calibration_seconds: float, runtime: Runtime) -> None:
    """The challenge counts training and GPTQ calibration in its 600 s: both must fit the cap."""
    if hp.max_wallclock_seconds <= 0:
        return
    total, cap = training.ms + 1000 * calibration_seconds, 1000 * hp.max_wallclock_seconds
    runtime.log(f"time_budget: training {training.ms:.0f}ms + gptq calibration {1000 * calibration_seconds:.0f}ms "
                f"= {total:.0f}ms of MAX_WALLCLOCK_SECONDS={cap:.0f}ms")
    if total > cap:
        runtime.log(f"warning: training and GPTQ calibration took {total / 1000:.1f}s, over MAX_WALLCLOCK_SECONDS; "
                    f"calibration needed {1000 * calibration_seconds:.0f}ms of GPTQ_RESERVE_MS={hp.gptq_reserve_ms:.0f}")


def explain_score(hp: Hyperparameters, score: EvalResult) -> str | None:
    """For the smoke run as shipped (no setting changed): what the number means and what to
    expect; None for any other run."""
    if not hp.smoke or changed_settings(hp) != "none":
        return None
    return (f"result: {score.bpb:.4f} bits per byte of held-out text (lower is better; guessing uniformly scores "
            f"{math.log2(hp.vocab_size) * score.tokens / score.bytes:.2f}; SEED=1337 gives "
            f"{SMOKE_EXPECTED_BPB[hp.profile]:.2f} on the machine the README names)")


def run(hp: Hyperparameters, runtime: Runtime) -> int:
    """The whole run as phases; returns the exit status."""
    artifact_at_start = file_signature(Path(hp.artifact_path))
    log_run_header(hp, runtime)
    data = load_data(hp, runtime)
    model = GPT(ModelConfig.from_settings(hp)).to(runtime.device)
    log_model(hp, model, runtime)
    training = train(hp, model, data, runtime)
    target = artifact_target(hp, artifact_at_start, runtime.log_path.stem if runtime.log_path else "run", runtime)
    report = export_artifact(hp, model, runtime, target)
    log_time_budget(hp, training, report.calibration_seconds, runtime)
    quantized = load_quantized_model(model.config, report.blob, str(report.path), runtime)
    score = evaluate_artifact(hp, quantized, data, runtime)
    if explanation := explain_score(hp, score):
        runtime.log(explanation)
    if training.stopped == "safety_cap":
        runtime.log(f"warning: SAFETY_CAP_SECONDS={hp.safety_cap_seconds:.0f} stopped training at step {training.steps} of "
                    f"ITERATIONS={hp.iterations}: this score is not the step-bounded one, and depends on the machine's speed")
    runtime.log(f"artifact: {report.path.resolve()}")
    runtime.log(f"log: {runtime.log_path.resolve() if runtime.log_path else 'none'}")
    runtime.barrier()  # no rank tears the group down while another still talks
    if runtime.is_main and report.replaced():
        raise RunError(f"{report.path} was replaced by another process after this run wrote it: the score above is "
                       "for this run's own bytes, which are no longer on disk")
    if runtime.log_failure is not None:
        raise RunError(runtime.log_failure)
    return 1 if report.over_limit else 0


def run_cli(argv: list[str]) -> int:
    """Entry point: bad input ends the run with one clear line (exit 2), a failed run with
    one line (exit 1), Ctrl-C, SIGTERM or SIGHUP with where it stopped (exit 130, 143 or
    129); all of them in the log too once the log exists."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE, describe_settings(), sep="\n")
        return 0
    if argv:
        print(f"error: unknown argument {argv[0]!r}: settings are environment variables (see --help)", file=sys.stderr)
        return 2
    stop_on_signals()
    runtime = None
    try:
        environ = with_smoke_when_no_data(dict(os.environ))
        if environ.get("SMOKE") == "1" and "SMOKE" not in os.environ:
            print("smoke: no FineWeb at the default path: running the smoke run (SMOKE=1); "
                  "tools/download_fineweb.py gets FineWeb", flush=True)
        hp = Hyperparameters.from_env(environ)
        runtime = start_runtime(hp)
        open_run_files(hp, runtime)
        return run(hp, runtime)
    except InputError as error:
        status, message = 2, f"error: {error}"
    except (RunError, OSError) as error:
        status, message = 1, f"error: {error}"
    except KeyboardInterrupt:
        status, message = 130, f"interrupted {runtime.stage if runtime else 'at start-up'}"
    except Terminated as stopped:
        name = signal.Signals(stopped.signum).name
        status, message = 128 + stopped.signum, f"terminated ({name}) {runtime.stage if runtime else 'at start-up'}"
    except Exception as error:
        if runtime is not None:
            runtime.fail(f"error: unexpected {type(error).__name__}: {error} (traceback on the console)")
        raise
    finally:
        if runtime is not None:
            runtime.close()
    if runtime is not None:
        runtime.fail(message)
    else:
        print(message, file=sys.stderr, flush=True)
    return status
