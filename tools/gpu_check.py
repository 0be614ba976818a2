"""One command for a fresh GPU machine: what it is, how fast the real training loop runs,
what every SLOT mode scores and costs, how long GPTQ takes and how big the artifact is.

    python tools/gpu_check.py results/                          # the default 27M model
    python tools/gpu_check.py results/ --record ref/train_gpt.py   # and the record's script beside it
    python tools/gpu_check.py results/ --tiny --steps 3         # the smoke run's model (any CPU)

Settings come from the environment as for train_gpt.py (DATA_PATH: the tokens to train
and evaluate on; with --tiny, variables that are set still win over the small profile).
Training runs the trainer's own loop (loader, EMA, stop flags, late-QAT graph, logging)
for --steps timed steps after --warmup warm-up steps, --repeats times; a separate short
loop splits a step into forward, backward and optimiser with CUDA events. With several
GPUs the tool re-runs itself under torchrun on all of them. It writes gpu_check.json and
gpu_check.md (a table) into the folder given.

--record runs the PR #1217 record's script (kept outside this repository) with the same
settings and tokens, in a temporary folder of its own, giving it a stand-in
`flash_attn_interface` module that uses PyTorch's attention, as this trainer does without
FlashAttention-3. A comparison that did not happen (the script failed, timed out or
printed none of the numbers) says so in the table and makes the exit status 3; a timeout
stops the script's whole process group.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from trainer.artifact import export_artifact, load_quantized_model
from trainer.data import make_sampler
from trainer.evaluation import CAUSAL_SLOT_MODES, SLOT_LABELS, EvalData, evaluate_sliding, score_kind, with_slot
from trainer.files import bundled_file, write_atomic
from trainer.main import gpu_description, load_data
from trainer.model import GPT, ModelConfig, enable_flash_attention_3
from trainer.optimizer import build_optimizers
from trainer.runtime import Runtime, start_runtime
from trainer.settings import Hyperparameters, InputError
import trainer.training as training
from trainer.training import train, train_step

# What the PR #1217 record was run with (its README), on top of its own defaults.
RECORD_SETTINGS = {"QK_GAIN_INIT": "5.0", "SLOT_ENABLED": "1", "SLOT_STEPS": "8", "SLOT_LR": "0.005"}
FLASH_ATTENTION_STAND_IN = '''"""Stand-in for FlashAttention-3's interface, written by tools/gpu_check.py: PyTorch's attention."""
import torch.nn.functional as F


def flash_attn_func(q, k, v, causal=True):
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal, enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)
'''


def environment(runtime: Runtime) -> dict:
    try:
        import flash_attn_interface  # noqa: F401
        flash_attention_3 = True
    except ImportError:
        flash_attention_3 = False
    try:
        import brotli
        brotli_version = getattr(brotli, "__version__", "present")
    except ImportError:
        brotli_version = None
    on_gpu = runtime.device.type == "cuda"
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "device": torch.cuda.get_device_name(runtime.device) if on_gpu else f"CPU ({os.cpu_count()} cores)",
            "devices": runtime.world_size, "gpu": gpu_description(runtime.device) if on_gpu else None,
            "attention_backend": "flash_attention_3" if enable_flash_attention_3(runtime.device) else "sdpa",
            "flash_attention_3_importable": flash_attention_3, "brotli": brotli_version}


def spread(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    deviation = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": mean, "std": deviation, "values": values}


def measure_training(hp: Hyperparameters, data: EvalData, runtime: Runtime,
                     repeats: int) -> tuple[dict, GPT]:
    """The trainer's own loop, `repeats` times; ms/step from its final validation line."""
    step_ms, warmup_seconds, peaks = [], [], []
    real_warm_up, lines = training.warm_up_and_reset, []

    def timed_warm_up(*args):
        runtime.synchronize()
        started = time.perf_counter()
        real_warm_up(*args)
        runtime.synchronize()
        warmup_seconds.append(time.perf_counter() - started)

    training.warm_up_and_reset = timed_warm_up
    runtime.log = lambda message, console=True: lines.append(message)
    try:
        for _ in range(repeats):
            if runtime.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(runtime.device)
            torch.manual_seed(hp.seed)
            model = GPT(ModelConfig.from_settings(hp)).to(runtime.device)
            lines.clear()
            train(hp, model, data, runtime)
            final = next(line for line in reversed(lines) if re.match(rf"step:{hp.iterations}/\d+ val_loss", line))
            step_ms.append(float(re.search(r"step_avg:([\d.]+)ms", final)[1]))
            peaks.append(torch.cuda.max_memory_allocated(runtime.device) / 2**20 if runtime.device.type == "cuda" else None)
    finally:
        training.warm_up_and_reset = real_warm_up
        del runtime.log
    step = spread(step_ms)
    return {"steps": hp.iterations, "warmup_steps": hp.warmup_steps, "repeats": repeats, "ms_per_step": step,
            "tokens_per_second": hp.train_batch_tokens / (step["mean"] / 1000),
            "compile_and_warmup_seconds": warmup_seconds[0], "warmup_seconds_when_compiled": warmup_seconds[1:],
            "peak_memory_mib": peaks[-1], "final_val_line": final}, model


class Marks:
    """Time marks on the device's own clock: CUDA events on a GPU, the host clock on a CPU."""

    def __init__(self, runtime: Runtime):
        self.on_gpu, self.marks = runtime.device.type == "cuda", []

    def mark(self) -> None:
        if self.on_gpu:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        pairs = zip(self.marks, self.marks[1:])
        return [a.elapsed_time(b) if self.on_gpu else 1000 * (b - a) for a, b in pairs]


def measure_step_split(hp: Hyperparameters, model: GPT, runtime: Runtime, steps: int) -> dict:
    """Forward, backward and optimiser milliseconds per step, after the loop's compilation."""
    train_model, optimizers = runtime.compile(model), build_optimizers(hp, model, runtime)
    sampler = make_sampler(hp, runtime)
    totals = {"forward": 0.0, "backward": 0.0, "optimiser": 0.0}
    for _ in range(steps):
        batches, marks = sampler.next_step(runtime), Marks(runtime)
        optimizers.zero_grad()
        marks.mark()
        for inputs, targets in batches:
            with runtime.autocast():
                loss = train_model(inputs, targets)
            marks.mark()
            (loss / len(batches)).backward()
            marks.mark()
        optimizers.step(hp.grad_clip_norm)
        marks.mark()
        runtime.synchronize()
        elapsed = marks.intervals_ms()
        totals["forward"] += sum(elapsed[0:-1:2])
        totals["backward"] += sum(elapsed[1:-1:2])
        totals["optimiser"] += elapsed[-1]
    return {name: value / steps for name, value in totals.items()}


def warm_every_mode(hp: Hyperparameters, model: GPT, data: EvalData, runtime: Runtime) -> None:
    """Evaluate a few batches in every SLOT mode, so no timing or sync count includes compiling."""
    short = dataclasses.replace(data, val_tokens=data.val_tokens[: hp.eval_seq_len + hp.eval_batch_seqs * hp.eval_stride + 1])
    for mode in SLOT_LABELS:
        evaluate_sliding(model, short, with_slot(hp, mode), runtime)


def count_host_syncs(hp: Hyperparameters, model: GPT, data: EvalData,
                     runtime: Runtime) -> dict | None:
    """Synchronising calls in a few training steps and one evaluation batch per SLOT mode,
    as torch.cuda.set_sync_debug_mode reports them (CUDA only)."""
    if runtime.device.type != "cuda":
        return None
    optimizers, sampler = build_optimizers(hp, model, runtime), make_sampler(hp, runtime)
    train_model = runtime.compile(model)
    short = dataclasses.replace(data, val_tokens=data.val_tokens[: hp.eval_seq_len + hp.eval_batch_seqs * hp.eval_stride + 1])
    train_step(train_model, optimizers, sampler.next_step(runtime), hp, runtime)  # compiled before counting
    warm_every_mode(hp, model, data, runtime)
    found: dict[str, list[str]] = {}
    for phase in ("train_step", *SLOT_LABELS):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            if phase == "train_step":
                for _ in range(3):
                    train_step(train_model, optimizers, sampler.next_step(runtime), hp, runtime)
            else:
                evaluate_sliding(model, short, with_slot(hp, phase), runtime)
            torch.cuda.set_sync_debug_mode("default")
        found[phase] = sorted({str(w.message).split("\n")[0] for w in caught})
    return found


def measure_evaluation(hp: Hyperparameters, model: GPT, data: EvalData,
                       runtime: Runtime, tokens: int) -> dict:
    """Every SLOT mode on the same slice of validation tokens: BPB, seconds, tokens/s."""
    sliced = dataclasses.replace(data, val_tokens=data.val_tokens[: tokens + 1])
    warm_every_mode(hp, model, data, runtime)
    results = {}
    for mode in SLOT_LABELS:
        runtime.synchronize()
        plain, adapted = evaluate_sliding(model, sliced, with_slot(hp, mode), runtime)
        result, kind = adapted or plain, score_kind(mode)
        results[mode] = {"val_bpb": result.bpb, "seconds": result.seconds, "tokens_per_second": result.tokens / result.seconds,
                         "causal": kind.causal, "accepted": kind.accepted}
    plain = results["off"]["val_bpb"]
    leak = plain - results["shared"]["val_bpb"]
    for mode in CAUSAL_SLOT_MODES:
        results[mode]["share_of_shared_gain"] = (plain - results[mode]["val_bpb"]) / leak if leak else None
    return {"tokens": tokens, "modes": results}


def measure_artifact(hp: Hyperparameters, model: GPT, runtime: Runtime, out: Path) -> tuple[dict, bytes]:
    runtime.synchronize()
    started = time.perf_counter()
    report = export_artifact(hp, model, runtime, out / "gpu_check.int6.ptz")
    seconds = time.perf_counter() - started
    return {"gptq_and_write_seconds": seconds, "model_bytes": report.model_bytes, "code_bytes": report.code_bytes,
            "total_bytes": report.total_bytes, "fits": not report.over_limit}, report.blob


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), found before any is stopped."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children.get(parent, [])]
        found += frontier
    return found


def run_with_timeout(command: list[str], cwd: Path, environ: dict, timeout: float) -> tuple[int | None, str]:
    """(exit status, output) of `command`; past `timeout` it is killed with every process
    below it (torchrun starts its workers in sessions of their own), and the status is None."""
    process = subprocess.Popen(command, cwd=cwd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        for pid in [process.pid, *descendants(process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        output, _ = process.communicate()
        return None, output


def run_record(script: Path, hp: Hyperparameters, runtime: Runtime, out: Path, timeout: int) -> dict:
    """The record's script with the same data, steps and caps, in a temporary folder of its
    own (its ~108 MB model file goes with it); its own log lines parsed. "failed" says why
    when the comparison did not happen."""
    work = Path(tempfile.mkdtemp(prefix="gpu_check_record_"))
    (work / "flash_attn_interface.py").write_text(FLASH_ATTENTION_STAND_IN)
    environ = {**os.environ, **RECORD_SETTINGS, "DATA_PATH": str(Path(hp.data_path).resolve()),
               "TOKENIZER_PATH": str(bundled_file(hp.tokenizer_path).resolve()), "ITERATIONS": str(hp.iterations),
               "WARMUP_STEPS": str(hp.warmup_steps), "MAX_WALLCLOCK_SECONDS": "0", "VAL_LOSS_EVERY": "0",
               "TRAIN_BATCH_TOKENS": str(hp.train_batch_tokens), "TRAIN_SEQ_LEN": str(hp.train_seq_len),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(work), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={runtime.world_size}", str(script.resolve())]
    started = time.perf_counter()
    try:
        exit_status, output = run_with_timeout(command, work, environ, timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    numbers: dict = {"exit_status": exit_status}
    if exit_status is None:
        numbers["failed"] = f"timed out after {timeout}s (stopped with its workers)"
    (out / "record_output.txt").write_text(output or "")
    numbers["wall_seconds"] = time.perf_counter() - started
    patterns = {"ms_per_step": rf"step:{hp.iterations}/\d+ val_loss:\S+ val_bpb:\S+ train_time:\S+ step_avg:([\d.]+)ms",
                "pre_quantisation_val_bpb": rf"step:{hp.iterations}/\d+ val_loss:\S+ val_bpb:([\d.]+)",
                "peak_memory_mib": r"peak memory allocated: (\d+) MiB", "model_bytes": r"Serialized model int6\+brotli: (\d+) bytes",
                "roundtrip_val_bpb": r"final_int6_roundtrip_exact val_loss:\S+ val_bpb:([\d.]+)",
                "sliding_slot_val_bpb": r"final_int6_sliding_window_exact val_loss:\S+ val_bpb:([\d.]+)",
                "sliding_slot_eval_ms": r"final_int6_sliding_window val_loss:\S+ val_bpb:\S+ stride:\d+ eval_time:(\d+)ms"}
    for name, pattern in patterns.items():
        match = re.search(pattern, output or "")
        numbers[name] = float(match[1]) if match else None
    if "failed" not in numbers and (numbers["exit_status"] != 0 or all(numbers[name] is None for name in patterns)):
        lines = [line.strip() for line in (output or "").splitlines() if line.strip()] or ["no output"]
        reason = next((line for line in lines if re.search(r"Error|error|required", line)), lines[-1])
        numbers["failed"] = f"exit status {numbers['exit_status']} ({reason[:200]}; see record_output.txt)"
    return numbers


def table(report: dict) -> str:
    """The readable summary: one row per measurement, ours beside the record's."""
    training, reference = report["training"], report.get("record") or {}
    rows = [("ms per step (mean ± std over repeats)", f"{training['ms_per_step']['mean']:.1f} ± {training['ms_per_step']['std']:.1f}",
             reference.get("ms_per_step")),
            ("tokens per second", f"{training['tokens_per_second']:,.0f}",
             report["settings"]["train_batch_tokens"] / (reference["ms_per_step"] / 1000) if reference.get("ms_per_step") else None),
            ("peak memory MiB", training["peak_memory_mib"], reference.get("peak_memory_mib")),
            ("compile + warm-up seconds", f"{training['compile_and_warmup_seconds']:.1f}", None),
            ("forward / backward / optimiser ms", " / ".join(f"{v:.1f}" for v in report["step_split_ms"].values()), None),
            ("GPTQ + write seconds", f"{report['artifact']['gptq_and_write_seconds']:.1f}", None),
            ("artifact + code bytes", f"{report['artifact']['total_bytes']:,}", reference.get("model_bytes"))]
    for mode, result in report["evaluation"]["modes"].items():
        rows.append((f"eval {mode}: BPB, tokens/s", f"{result['val_bpb']:.6f}, {result['tokens_per_second']:,.0f}", None))
    lines = [f"# gpu_check: {report['environment']['device']} x{report['environment']['devices']}, torch "
             f"{report['environment']['torch']}, attention {report['environment']['attention_backend']}", "",
             "| measurement | ours | the record's script |", "| --- | --- | --- |"]
    if reference.get("failed"):
        lines[1:1] = [f"**The record's script did not run: {reference['failed']}. Its column is empty.**", ""]
    lines += [f"| {name} | {ours} | {'' if theirs is None else theirs} |" for name, ours, theirs in rows]
    return "\n".join(lines) + "\n"


def relaunch_on_every_gpu(argv: list[str]) -> int | None:
    """Under several GPUs and not yet under torchrun: run again on all of them."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2 or "RANK" in os.environ:
        return None
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={torch.cuda.device_count()}", __file__, *argv]
    return subprocess.run(command).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--tiny", action="store_true", help="the smoke run's model (SMOKE=1 under the environment)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per repeat")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up (compile) steps before them")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--split-steps", type=int, default=3, help="steps split into forward/backward/optimiser")
    parser.add_argument("--eval-tokens", type=int, default=1_048_576, help="validation tokens each SLOT mode scores")
    parser.add_argument("--record", type=Path, help="the PR #1217 record's train_gpt.py, to run beside ours")
    parser.add_argument("--record-timeout", type=int, default=1800, help="seconds")
    args = parser.parse_args(argv)
    if (status := relaunch_on_every_gpu(argv)) is not None:
        return status
    try:
        environ = {**({"SMOKE": "1"} if args.tiny else {}), **os.environ}
        hp = Hyperparameters.from_env({**environ, "ITERATIONS": str(args.steps), "WARMUP_STEPS": str(args.warmup),
                                               "MAX_WALLCLOCK_SECONDS": "0", "SAFETY_CAP_SECONDS": "0", "VAL_LOSS_EVERY": "0"})
        runtime = start_runtime(hp)
        data = load_data(hp, runtime)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(runtime), "settings": dataclasses.asdict(hp)}

    def save() -> None:  # after every phase: a later failure or timeout keeps what was measured
        if runtime.is_main:
            write_atomic(args.out / "gpu_check.json", json.dumps(report, indent=2, default=str).encode())

    # the loop validates on a slice: the whole FineWeb validation set would dominate the time
    loop_data = dataclasses.replace(data, val_tokens=data.val_tokens[: args.eval_tokens + 1])
    report["training"], model = measure_training(hp, loop_data, runtime, args.repeats)
    save()
    # the extra steps run on copies, so the artifact and scores are the loop's model
    report["step_split_ms"] = measure_step_split(hp, copy.deepcopy(model), runtime, args.split_steps)
    report["host_syncs"] = count_host_syncs(hp, copy.deepcopy(model), data, runtime)
    save()
    report["artifact"], blob = measure_artifact(hp, model, runtime, args.out)
    quantized = load_quantized_model(model.config, blob, str(args.out / "gpu_check.int6.ptz"), runtime)
    report["evaluation"] = measure_evaluation(hp, quantized, data, runtime, args.eval_tokens)
    save()
    if args.record and runtime.is_main:
        report["record"] = run_record(args.record, hp, runtime, args.out, args.record_timeout)
        save()
    if runtime.is_main:
        write_atomic(args.out / "gpu_check.md", table(report).encode())
        print(table(report))
    runtime.close()
    if (report.get("record") or {}).get("failed"):
        print(f"error: the record's script did not run: {report['record']['failed']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
