"""Seed logs -> submission.json, significance against a record, rule checks, loss plots.

    python tools/submission.py LOG [LOG ...] [--author A --name N --write submission.json]
    python tools/submission.py LOG ... --vs 1.10272            # a record's mean BPB
    python tools/submission.py LOG ... --vs-logs RECORD_LOG ...  # the record's own logs
    python tools/submission.py LOG ... --plot losses.png        # needs matplotlib

Reads logs in the reference format (this project's and the record's): one run per log,
one log per seed, each with its `seed:` line. The score that counts is the one a log's
`final_score` line names, with whether it is causal and whether the challenge has
accepted scores of its kind; logs without that line (the record's) count --score
(default: sliding). The JSON goes to stdout (or --write PATH); its "run" key says how the
logs were made (code, profile and changed settings, tokenizer, hardware, versions, data,
caps, early stops). The comparison, rule violations, warnings, non-finite values and
truncation notes go to stderr, so stdout stays valid JSON.

Rules checked: training (with GPTQ calibration where the log says) and all evaluation
together each within their limits, the artifact within its size, a causal counted score,
and every seed run with the same code and settings. Exit status: 0, or 1 when a rule is
broken, a loss or score is not finite or a log is truncated, 2 for unusable input.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# standard library only: --help and the checks must not wait for torch
from trainer.files import write_atomic
from trainer.settings import EVAL_SECONDS_LIMIT, SIZE_LIMIT_BYTES, TRAIN_SECONDS_LIMIT, RunError

RECORD_MARGIN_NATS = 0.005
SIGNIFICANCE = 0.01
SCORE_LINES = {"sliding": "final_int6_sliding_window_exact", "slot": "final_int6_sliding_window_slot_exact",
               "ttt": "legal_ttt_exact", "roundtrip": "final_int6_roundtrip_exact"}
DEFAULT_SCORE = "sliding"
PLAIN_SCORE_LINE = SCORE_LINES["sliding"]  # without SLOT, logged with SLOT on too (older trainers: with SLOT)
# Settings each seed of one submission sets for itself (tools/seed_runs.py sets all three).
PER_SEED_SETTINGS = {"SEED", "RUN_ID", "ARTIFACT_PATH"}

NUMBER = r"([-+]?[\d.]+(?:[eE][-+]?\d+)?)"
# losses and scores: a diverged run logs nan or inf, which must be read and reported, not skipped
VALUE = r"([-+]?(?:[\d.]+(?:[eE][-+]?\d+)?|(?i:nan|inf(?:inity)?)))"
STEP = re.compile(r"^step:(\d+)/")
STEP_TRAIN = re.compile(rf"^step:(\d+)/\d+ train_loss:{VALUE} train_time:{NUMBER}ms step_avg:{NUMBER}ms")
STEP_VAL = re.compile(rf"^step:(\d+)/\d+ val_loss:{VALUE} val_bpb:{VALUE} train_time:{NUMBER}ms step_avg:{NUMBER}ms")
EXACT = re.compile(rf"^(\w+)_exact val_loss:{VALUE} val_bpb:{VALUE}")
FINAL_SCORE = re.compile(rf"^final_score (\w+) val_bpb:{VALUE} slot:(\S+) causal:(yes|no) accepted:(yes|no) "
                         rf"eval_total_time:{NUMBER}ms$")
FINAL_SCORE_LEGAL = re.compile(rf"^final_score (\w+) val_bpb:{VALUE} slot:(\S+) legal:((?:yes|no)(?: \(.*\))?) "
                               rf"eval_total_time:{NUMBER}ms$")  # older trainers' form
# an evaluation of the artifact: `<name> val_loss:...` (the post-EMA DIAGNOSTIC line, two
# words before val_loss, is training's own check, not an evaluation of the artifact)
EVALUATION = re.compile(rf"^(\w+) val_loss:\S+ val_bpb:\S+ (?:.* )?eval_time:{NUMBER}ms$")
STOP_REASONS = ("wallclock_cap", "safety_cap")
STOPPED = re.compile(rf"^stopping_early: ({'|'.join(STOP_REASONS)}) train_time:{NUMBER}ms step:(\d+)/")
TIME_BUDGET = re.compile(rf"^time_budget: training {NUMBER}ms \+ gptq calibration {NUMBER}ms = {NUMBER}ms ")
TOTAL = re.compile(r"^Total submission size \S+: (\d+) bytes")
MODEL = re.compile(r"^Serialized model \S+: (\d+) bytes")
CODE = re.compile(r"^Code size: (\d+) bytes")


def shared_settings(text: str) -> str:
    """A `settings_changed:` list without the settings each seed sets for itself ("none"
    when nothing else was changed). The trainer writes the settings in one fixed order, so
    two runs with the same settings give the same text."""
    items = [] if text == "none" else re.split(r" (?=[A-Z][A-Z0-9_]*=)", text)
    return " ".join(item for item in items if item.split("=", 1)[0] not in PER_SEED_SETTINGS) or "none"


# Lines saying how a run was made, and the "run" fields each fills (a group that did not
# match, such as an optional field older trainers do not write, gives null).
SETUP_LINES: list[tuple[re.Pattern[str], tuple[tuple[str, Callable[[str], object]], ...]]] = [
    (re.compile(r"^code: source_sha256:(\w+) shipped_sha256:(\w+)$"),
     (("source_sha256", str), ("shipped_sha256", str))),
    # smoke: an empty group when absent, so a run that is not the smoke run reads false, not null
    (re.compile(r"^profile: (\S+)(| smoke)$"), (("profile", str), ("smoke", bool))),
    (re.compile(r"^settings_changed: (.+)$"), (("settings_changed", shared_settings),)),
    (re.compile(r"^tokenizer_sha256:([0-9a-f]{64})\b"), (("tokenizer_sha256", str),)),
    (re.compile(r"^hardware: (.+)$"), (("hardware", str),)),
    (re.compile(r"^torch:(\S+) python:(\S+)"), (("torch", str), ("python", str))),
    (re.compile(r"^(?:attention_backend:(\S+) )?attention_mode:(\S+) num_heads:(\d+) num_kv_heads:(\d+)"),
     (("attention_backend", str), ("attention_mode", str), ("num_heads", int), ("num_kv_heads", int))),
    (re.compile(r"^train_loader:dataset:(\S+) train_shards:(\d+)(?: tokens:(\d+))?"),
     (("train_dataset", str), ("train_shards", int), ("train_tokens", int))),
    (re.compile(r"^val_loader:shards pattern=(.+) tokens:(\d+)"), (("val_pattern", str), ("val_tokens", int))),
    (re.compile(rf"^train_batch_tokens:(\d+) train_seq_len:(\d+) iterations:(\d+) warmup_steps:(\d+) "
                rf"max_wallclock_seconds:{NUMBER}(?: safety_cap_seconds:{NUMBER})?"),
     (("train_batch_tokens", int), ("train_seq_len", int), ("iterations", int), ("warmup_steps", int),
      ("max_wallclock_seconds", float), ("safety_cap_seconds", float))),
]
# the counted score's facts come from the final_score line
SCORE_FIELDS = ["slot", "causal", "accepted"]
RUN_FIELDS = SCORE_FIELDS + [name for _, names in SETUP_LINES for name, _ in names]
# The seeds of one submission are one program run with one set of settings, only the seed
# differing; seeds that differ in any of these are not one submission (a rule violation).
SAME_FOR_EVERY_SEED = ("source_sha256", "shipped_sha256", "profile", "smoke", "settings_changed", "tokenizer_sha256")


class LogError(ValueError):
    """A log (or an option) that cannot be used; the message names the file or option."""


@dataclass
class FinalScore:
    """The trainer's `final_score` line: which `_exact` line counts, and two facts about it."""
    line: str
    bpb: float
    slot: str  # the SLOT mode, or "off"
    causal: bool  # issue #1017's conditions hold (the trainer's score_kind decides)
    accepted: bool | None  # the challenge has accepted scores of this kind; None: the log does not say
    eval_total_ms: float
    label: str  # as the log wrote it: "causal:no", or an older "legal:no (why)"


@dataclass
class RunLog:
    path: Path
    seed: int | None = None
    train_points: list[tuple[int, float]] = field(default_factory=list)
    val_points: list[tuple[int, float, float]] = field(default_factory=list)  # step, loss, bpb
    scores: dict[str, tuple[float, float]] = field(default_factory=dict)  # line name -> (loss, bpb)
    final_score: FinalScore | None = None
    eval_times_ms: dict[str, float] = field(default_factory=dict)
    steps: int | None = None
    step_avg_ms: float | None = None
    train_time_ms: float | None = None
    budget_ms: float | None = None  # training + GPTQ calibration, from the time_budget line
    stopped: str | None = None  # one of STOP_REASONS when training stopped before ITERATIONS
    total_bytes: int | None = None
    model_bytes: int | None = None
    code_bytes: int | None = None
    run: dict[str, object] = field(default_factory=dict)  # RUN_FIELDS that the log names
    not_finite: list[str] = field(default_factory=list)  # e.g. "train_loss is nan at step 5"

    @property
    def hardware(self) -> str | None:
        return self.run.get("hardware")

    @property
    def made_by_this_trainer(self) -> bool:
        """Only this project's trainer writes the `code:` line, and it names its counted score in a final_score line."""
        return self.run.get("source_sha256") is not None

    @property
    def truncated(self) -> bool:
        return self.total_bytes is None or not self.scores

    @property
    def label(self) -> str:
        return str(self.seed)


def read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError as error:
        raise LogError(f"{path}: cannot read log ({error.strerror})") from None


def refuse_more_than_one_run(path: Path, lines: list[str]) -> None:
    """A run starts with its seed line: a second one, or a step counter that goes back,
    means that two runs were appended to one file, and its figures would mix them."""
    first_seed_line, last_step = None, None
    for number, line in enumerate(lines, 1):
        if line.startswith("seed:"):
            if first_seed_line is not None:
                raise LogError(f"{path}: holds more than one run (a second 'seed:' line at line {number}, the first "
                               f"at line {first_seed_line}); give each run its own log")
            first_seed_line = number
        elif match := STEP.match(line):
            step = int(match[1])
            if last_step is not None and step < last_step[0]:
                raise LogError(f"{path}: holds more than one run (the step counter goes back from {last_step[0]} "
                               f"at line {last_step[1]} to {step} at line {number}); give each run its own log")
            last_step = (step, number)


def note_if_not_finite(log: RunLog, what: str, *values: float) -> None:
    if not all(math.isfinite(value) for value in values):
        log.not_finite.append(what)


def read_setup_line(log: RunLog, line: str) -> None:
    for pattern, names in SETUP_LINES:
        if match := pattern.match(line):
            for (name, kind), value in zip(names, match.groups()):
                log.run[name] = None if value is None else kind(value)
            return


def parse_final_score(line: str) -> FinalScore:
    if match := FINAL_SCORE.match(line):
        name, bpb, slot, causal, accepted, total_ms = match.groups()
        return FinalScore(name, float(bpb), slot, causal == "yes", accepted == "yes", float(total_ms),
                          f"causal:{causal}")
    if match := FINAL_SCORE_LEGAL.match(line):
        # Older trainers wrote one label, legal:, which meant causal (only SLOT_MODE=shared
        # was "no"). Whether the challenge accepts such a score they did not say: unknown
        # (null), not guessed here. Their slot: named the run's SLOT setting even when TTT,
        # which scores without SLOT, counted; only their sliding-window score used it.
        name, bpb, slot, legal, total_ms = match.groups()
        counted_slot = slot if name == PLAIN_SCORE_LINE else "off"
        return FinalScore(name, float(bpb), counted_slot, legal.split()[0] == "yes", None, float(total_ms),
                          f"legal:{legal}")
    raise ValueError("a final_score line in an unknown shape")


def read_final_score(log: RunLog, line: str) -> None:
    final = log.final_score = parse_final_score(line)
    log.run.update(slot=final.slot, causal=final.causal, accepted=final.accepted)
    note_if_not_finite(log, f"final_score is val_bpb:{final.bpb}", final.bpb)


def read_line(log: RunLog, line: str) -> None:
    if match := STEP_TRAIN.match(line):
        step, loss = int(match[1]), float(match[2])
        note_if_not_finite(log, f"train_loss is {match[2]} at step {step}", loss)
        if math.isfinite(loss):  # a plot cannot draw inf
            log.train_points.append((step, loss))
        log.steps, log.train_time_ms, log.step_avg_ms = step, float(match[3]), float(match[4])
    elif match := STEP_VAL.match(line):
        step, loss, bpb = int(match[1]), float(match[2]), float(match[3])
        note_if_not_finite(log, f"val_loss is {match[2]} at step {step}", loss, bpb)
        if math.isfinite(loss):
            log.val_points.append((step, loss, bpb))
        log.steps, log.train_time_ms, log.step_avg_ms = step, float(match[4]), float(match[5])
    elif match := STOPPED.match(line):
        log.stopped, log.train_time_ms, log.steps = match[1], float(match[2]), int(match[3])
    elif line.startswith("stopping_early"):
        raise ValueError(f"a stopping_early line in an unknown shape (known reasons: {', '.join(STOP_REASONS)})")
    elif match := TIME_BUDGET.match(line):
        log.budget_ms = float(match[3])
    elif match := EXACT.match(line):
        loss, bpb = float(match[2]), float(match[3])
        note_if_not_finite(log, f"{match[1]}_exact is val_loss:{match[2]} val_bpb:{match[3]}", loss, bpb)
        log.scores[match[1] + "_exact"] = (loss, bpb)
    elif line.startswith("final_score"):
        read_final_score(log, line)
    elif line.startswith("seed:"):
        log.seed = int(line.split(":", 1)[1])
    elif match := TOTAL.match(line):
        log.total_bytes = int(match[1])
    elif match := MODEL.match(line):
        log.model_bytes = int(match[1])
    elif match := CODE.match(line):
        log.code_bytes = int(match[1])
    elif match := EVALUATION.match(line):
        log.eval_times_ms[match[1]] = float(match[2])
    else:
        read_setup_line(log, line)


def parse_log(path: Path) -> RunLog:
    lines = read_lines(path)
    refuse_more_than_one_run(path, lines)
    log = RunLog(path)
    for number, line in enumerate(lines, 1):
        try:
            read_line(log, line)
        except ValueError as error:  # a number like '1.2.3', a seed that is not a number, ...
            raise LogError(f"{path}: line {number} cannot be read ({error}): {line[:120]!r}") from None
    if log.seed is None and not log.train_points and not log.scores:
        raise LogError(f"{path}: no training-log lines found (expected lines like 'seed:1337' and 'step:...')")
    if log.seed is None:
        # Every script of the challenge logs its seed; without it two logs (two copies of
        # one run, say) cannot be told apart and would count as two seeds.
        raise LogError(f"{path}: no 'seed:' line, so it cannot be told apart from another seed's log "
                       "(one log per seed)")
    if log.final_score is not None and log.final_score.line not in SCORE_LINES.values():
        raise LogError(f"{path}: final_score names {log.final_score.line!r}, not one of {sorted(SCORE_LINES.values())}")
    return log


def read_logs(paths: list[Path]) -> list[RunLog]:
    """One log per seed: the same file twice, or two logs of one seed (a copy, say), would
    count a run twice."""
    seen: dict[str, Path] = {}
    for path in paths:
        if (key := os.path.realpath(path)) in seen:
            raise LogError(f"{path}: given twice (one log per seed)")
        seen[key] = path
    logs = [parse_log(path) for path in paths]
    by_seed: dict[int, RunLog] = {}
    for log in logs:
        if (first := by_seed.setdefault(log.seed, log)) is not log:
            raise LogError(f"{first.path} and {log.path} are both seed {log.seed} (one log per seed)")
    return logs


def counted_score_line(logs: list[RunLog], score: str | None) -> tuple[str, list[str]]:
    """The `_exact` line that counts, and notes. The logs' final_score lines decide; --score
    only chooses for logs without one (the record's)."""
    named = {log.final_score.line: log for log in logs if log.final_score is not None}
    if len(named) > 1:
        listing = ", ".join(f"{log.path}: {line}" for line, log in named.items())
        raise LogError(f"the logs' final_score lines count different scores ({listing}); give logs of one setting")
    if not named:
        return SCORE_LINES[score or DEFAULT_SCORE], []
    line = next(iter(named))
    if score is not None and SCORE_LINES[score] != line:
        return line, [f"note: --score {score} ({SCORE_LINES[score]}) is ignored: the logs' final_score line "
                      f"counts {line}"]
    return line, []


def code_bytes(log: RunLog) -> int | None:
    if log.total_bytes is not None and log.model_bytes is not None:
        return log.total_bytes - log.model_bytes
    return log.code_bytes


def is_scored(log: RunLog, score_line: str) -> bool:
    """A finite score on the line that counts, and one the log itself would count: a trainer
    log that lost its final_score line does not say which score is its own."""
    if log.made_by_this_trainer and log.final_score is None:
        return False
    return score_line in log.scores and all(math.isfinite(value) for value in log.scores[score_line])


def final_score_violations(log: RunLog) -> list[str]:
    final = log.final_score
    if final is None:
        return ["a log of this trainer (it has a code: line) without its final_score line (cut or edited?): "
                "which score counts is unknown, so none is counted"] if log.made_by_this_trainer else []
    problems = []
    if not final.causal:
        why = ("SLOT_MODE=shared fits one delta on a whole batch of windows, so a window's score has seen "
               "later windows' tokens (it leaks future tokens)") if final.slot == "shared" else \
              "the trainer marked the counted score as not causal"
        problems.append(f"final_score says {final.label}: {why}")
    exact = log.scores.get(final.line)
    if exact is not None and math.isfinite(final.bpb) and math.isfinite(exact[1]) and abs(exact[1] - final.bpb) > 5e-9:
        problems.append(f"final_score val_bpb:{final.bpb:.8f} is not {final.line}'s val_bpb:{exact[1]:.8f}")
    return problems


def training_time(log: RunLog) -> tuple[str, float] | None:
    """What the challenge's training limit counts: training and GPTQ calibration together
    where the log adds them up (time_budget), else the training time alone."""
    if log.budget_ms is not None:
        return "training and GPTQ calibration", log.budget_ms
    if log.train_time_ms is not None:
        return "training", log.train_time_ms
    return None


def evaluation_time(log: RunLog) -> tuple[str, float] | None:
    """All evaluation of the artifact together, which the challenge limits: the trainer's own
    total (eval_total_time), else the sum of the evaluation lines (the record's logs)."""
    if log.final_score is not None:
        return "eval_total_time", log.final_score.eval_total_ms
    times = log.eval_times_ms
    return (" + ".join(times), sum(times.values())) if times else None


def rule_violations(log: RunLog, score_line: str) -> list[str]:
    problems = []
    if (training := training_time(log)) is not None and training[1] > 1000 * TRAIN_SECONDS_LIMIT:
        problems.append(f"{training[0]} took {training[1] / 1000:.1f} s (limit {TRAIN_SECONDS_LIMIT:.0f} s)")
    if (evaluation := evaluation_time(log)) is not None and evaluation[1] > 1000 * EVAL_SECONDS_LIMIT:
        problems.append(f"evaluation took {evaluation[1] / 1000:.1f} s in all ({evaluation[0]}; "
                        f"limit {EVAL_SECONDS_LIMIT:.0f} s)")
    if log.total_bytes is not None and log.total_bytes > SIZE_LIMIT_BYTES:
        problems.append(f"artifact + code is {log.total_bytes} bytes, {log.total_bytes - SIZE_LIMIT_BYTES} over {SIZE_LIMIT_BYTES}")
    if score_line not in log.scores:
        problems.append(f"no final score ({score_line})")
    return problems + final_score_violations(log)


def not_finite_note(log: RunLog) -> str:
    more = f" (and {len(log.not_finite) - 1} more)" if len(log.not_finite) > 1 else ""
    return f"{log.path}: not finite: {log.not_finite[0]}{more}"


def truncation_note(log: RunLog) -> str:
    last_val = f", last val_bpb {log.val_points[-1][2]}" if log.val_points else ""
    size = "an artifact size was logged" if log.total_bytes is not None else "no artifact size was logged"
    return f"{log.path}: truncated log (killed run?): reached step {log.steps}{last_val}; {size}; scores: {sorted(log.scores) or 'none'}"


def log_problems(log: RunLog, score_line: str) -> list[str]:
    """Every reason this log cannot stand in a submission, one line each, naming the file."""
    problems = [truncation_note(log)] if log.truncated else []
    problems += [not_finite_note(log)] if log.not_finite else []
    return problems + [f"{log.path}: rule violation: {problem}" for problem in rule_violations(log, score_line)]


def run_fields_by_seed(logs: list[RunLog]) -> dict[str, dict[str, object]]:
    """RUN_FIELDS -> {seed: value}; a field a log does not name is None."""
    return {name: {log.label: log.run.get(name) for log in logs} for name in RUN_FIELDS}


def fields_that_differ(by_seed: dict[str, dict[str, object]]) -> list[str]:
    return [name for name, values in by_seed.items() if len(set(values.values())) > 1]


def per_seed(values: dict[str, object]) -> str:
    return ", ".join(f"seed {label}: {value}" for label, value in values.items())


def seed_violations(logs: list[RunLog]) -> list[str]:
    """The seeds must be one program with one set of settings (SAME_FOR_EVERY_SEED)."""
    by_seed = run_fields_by_seed(logs)
    return [f"rule violation: the seeds were not run with the same code and settings: {name} differs "
            f"({per_seed(by_seed[name])})" for name in fields_that_differ(by_seed) if name in SAME_FOR_EVERY_SEED]


def all_problems(logs: list[RunLog], score_line: str) -> list[str]:
    return [problem for log in logs for problem in log_problems(log, score_line)] + seed_violations(logs)


def check_logs(paths: list[Path], score: str | None = None) -> list[str]:
    """What main() reports against these logs (empty: they make a valid submission).
    Raises LogError for unusable input. For tools that must check before they publish."""
    logs = read_logs(paths)
    score_line, _ = counted_score_line(logs, score)
    return all_problems(logs, score_line)


def stopped_early(logs: list[RunLog]) -> dict[str, str]:
    """{seed: what stopped its training before ITERATIONS} for the seeds that stopped early."""
    return {log.label: log.stopped for log in logs if log.stopped is not None}


def describe_runs(logs: list[RunLog], score_line: str) -> dict:
    """How the logs were made. A field the seeds agree on holds its value; one they do not
    agree on holds a value per seed, and is listed under differs_between_seeds."""
    by_seed = run_fields_by_seed(logs)
    differing = fields_that_differ(by_seed)
    description: dict[str, object] = {"score_line": score_line}
    for name, values in by_seed.items():
        description[name] = values if name in differing else next(iter(values.values()), None)
    description["stopped_early"] = stopped_early(logs)
    description["differs_between_seeds"] = differing
    return description


def run_difference_notes(logs: list[RunLog]) -> list[str]:
    """The differences that do not break a rule (hardware, versions): worth knowing."""
    by_seed = run_fields_by_seed(logs)
    return [f"note: the seeds were not run alike: {name} differs ({per_seed(by_seed[name])})"
            for name in fields_that_differ(by_seed) if name not in SAME_FOR_EVERY_SEED]


def slot_warning(logs: list[RunLog], score_line: str) -> list[str]:
    """The challenge has never accepted a SLOT score (PR #1217 is "Non Record"; no SLOT
    submission made the leaderboard): whoever submits one should know before they do."""
    slots = sorted({log.final_score.slot for log in logs if log.final_score is not None} - {"off"})
    if not slots:
        return []
    plain = f"; {PLAIN_SCORE_LINE} in each log is the plain score, of a kind it has accepted" \
        if score_line != PLAIN_SCORE_LINE else ""
    return [f"warning: the counted score ({score_line}) is a SLOT score (slot:{', '.join(slots)}), which the "
            f"challenge has never accepted{plain}"]


def safety_cap_notes(logs: list[RunLog]) -> list[str]:
    """A run stopped by SAFETY_CAP_SECONDS is not a rule violation: the challenge limits the
    time (checked on its own, with or without a cap), and its own runs are stopped by a
    clock too. But such a run is not the step-bounded one its settings describe, and its
    score depends on the machine's speed: the reader must be told."""
    return [f"note: {log.path}: seed {log.seed} was stopped by the safety cap (SAFETY_CAP_SECONDS="
            f"{log.run.get('safety_cap_seconds')}) at step {log.steps} of ITERATIONS={log.run.get('iterations')}: its "
            "score is not the step-bounded one and depends on the machine's speed"
            for log in logs if log.stopped == "safety_cap"]


def build_submission(logs: list[RunLog], score_line: str, args: argparse.Namespace) -> dict:
    scored = [log for log in logs if is_scored(log, score_line)]
    results = {}
    for log in scored:
        loss, bpb = log.scores[score_line]
        final = log.final_score
        results[log.label] = {"val_bpb": bpb, "val_loss": loss, "artifact_bytes": log.total_bytes,
                              "steps": log.steps, "step_avg_ms": log.step_avg_ms,
                              "causal": final.causal if final else None, "accepted": final.accepted if final else None}
    values = [log.scores[score_line][1] for log in scored]
    sizes = [log.total_bytes for log in logs if log.total_bytes is not None]
    codes = [c for c in (code_bytes(log) for log in logs) if c is not None]
    hardware = next((log.hardware for log in logs if log.hardware), None)
    return {"author": args.author, "name": args.name, "date": args.date, "track": args.track,
            "val_bpb": round(statistics.fmean(values), 8) if values else None,
            # sample standard deviation (n-1); null with fewer than two seeds
            "val_bpb_std": round(statistics.stdev(values), 8) if len(values) > 1 else None,
            "seeds": [log.seed for log in scored], "seed_results": results,
            "bytes_total": max(sizes) if sizes else None, "code_bytes": max(codes) if codes else None,
            "hardware": hardware, "run": describe_runs(logs, score_line)}


def student_t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t, via the regularised incomplete beta function."""
    x = dof / (dof + t * t)
    tail = 0.5 * regularized_beta(x, dof / 2, 0.5)
    return 1 - tail if t > 0 else tail


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by Lentz's continued fraction (Numerical Recipes' betacf)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1 - regularized_beta(1 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)) / a
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * result


def welch_p_value(ours: list[float], theirs: list[float], margin: float) -> tuple[float, float, float]:
    """One-sided test that mean(ours) < mean(theirs) - margin. Returns (t, dof, p)."""
    mean_ours, mean_theirs = statistics.fmean(ours), statistics.fmean(theirs)
    var_ours, var_theirs = statistics.variance(ours) / len(ours), statistics.variance(theirs) / len(theirs)
    t = (mean_ours - (mean_theirs - margin)) / math.sqrt(var_ours + var_theirs)
    dof = (var_ours + var_theirs) ** 2 / (var_ours ** 2 / (len(ours) - 1) + var_theirs ** 2 / (len(theirs) - 1))
    return t, dof, student_t_cdf(t, dof)


def one_sample_p_value(ours: list[float], target: float) -> tuple[float, float, float]:
    """One-sided test that mean(ours) < target. Returns (t, dof, p)."""
    t = (statistics.fmean(ours) - target) / (statistics.stdev(ours) / math.sqrt(len(ours)))
    return t, len(ours) - 1, student_t_cdf(t, len(ours) - 1)


def compare(logs: list[RunLog], score_line: str, record_bpb: float | None, record_logs: list[RunLog]) -> list[str]:
    scored = [log for log in logs if is_scored(log, score_line)]
    our_nats = [log.scores[score_line][0] for log in scored]
    our_bpb = [log.scores[score_line][1] for log in scored]
    theirs = [log.scores[score_line] for log in record_logs if is_scored(log, score_line)]
    if not our_nats or (record_logs and not theirs):
        side = "our logs have" if not our_nats else "the record's logs have"
        return [f"comparison: skipped, {side} no finite {score_line} score"]
    if record_logs:
        their_nats, their_bpb = [n for n, _ in theirs], [b for _, b in theirs]
        record_bpb_mean, record_nats = statistics.fmean(their_bpb), statistics.fmean(their_nats)
    else:
        # nats per bit-per-byte is fixed by the validation set: take it from our own seeds
        ratio = statistics.fmean(n / b for n, b in zip(our_nats, our_bpb))
        record_bpb_mean, record_nats, their_nats = record_bpb, record_bpb * ratio, []
    lines = [f"improvement: {record_bpb_mean - statistics.fmean(our_bpb):+.6f} BPB, "
             f"{record_nats - statistics.fmean(our_nats):+.6f} nats (positive = better than the record)"]
    if len(our_nats) < 2 or (record_logs and len(their_nats) < 2):
        lines.append("significance: needs at least 2 seeds on each side with logs (1 is not enough for a t-test)")
        return lines
    # a t statistic divides by the spread: seeds that all score the same leave it undefined
    if statistics.variance(our_nats) + (statistics.variance(their_nats) if record_logs else 0.0) == 0.0:
        lines.append("significance: every seed scored exactly the same, so a t-test is undefined")
        return lines
    if record_logs:
        t, dof, p = welch_p_value(our_nats, their_nats, RECORD_MARGIN_NATS)
        test = "Welch"
    else:
        t, dof, p = one_sample_p_value(our_nats, record_nats - RECORD_MARGIN_NATS)
        test = "one-sample"
    verdict = "MET" if p < SIGNIFICANCE else "NOT met"
    lines.append(f"{test} t-test for beating the record by {RECORD_MARGIN_NATS} nats: t={t:.3f} dof={dof:.1f} "
                 f"p={p:.3g}; the bar p < {SIGNIFICANCE} is {verdict}")
    return lines


def plot_losses(logs: list[RunLog], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LogError("--plot needs matplotlib: pip install matplotlib") from None
    figure, axis = plt.subplots(figsize=(9, 5))
    for log in logs:
        label = f"seed {log.seed}"
        if log.train_points:
            axis.plot(*zip(*log.train_points), label=f"{label} train", alpha=0.7)
        if log.val_points:
            axis.plot([s for s, _, _ in log.val_points], [v for _, v, _ in log.val_points], "o-", label=f"{label} val")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats/token)")
    axis.legend()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        figure.savefig(temporary, dpi=120)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise LogError(f"--plot {path}: cannot write ({error.strerror})") from None
    finally:
        plt.close(figure)


def check_options(args: argparse.Namespace) -> None:
    """Checked before anything is read or written, so a bad option never leaves a lone
    --write file behind, and an output never replaces one of the logs it is made from."""
    if args.vs is not None and not (math.isfinite(args.vs) and args.vs > 0):
        raise LogError(f"--vs {args.vs}: not a record's BPB (a finite number above 0)")
    inputs = {os.path.realpath(path) for path in [*args.logs, *args.vs_logs]}
    for option, path in (("--write", args.write), ("--plot", args.plot)):
        if path is None:
            continue
        if os.path.realpath(path) in inputs:
            raise LogError(f"{option} {path}: is one of the input logs, which it would replace; give another file name")
        if path.is_dir():
            raise LogError(f"{option} {path}: is a folder; give a file name")
        if not path.parent.is_dir():
            raise LogError(f"{option} {path}: the folder {path.parent} does not exist")


def glue_vs_value(argv: list[str]) -> list[str]:
    """argv with `--vs X` written `--vs=X`: argparse takes a value that starts with '-' but
    is not a plain number (-inf) for an option, and answers with its usage text, not the
    one line that check_options gives."""
    glued: list[str] = []
    for arg in argv:
        if glued and glued[-1] == "--vs":
            glued[-1] = f"--vs={arg}"
        else:
            glued.append(arg)
    return glued


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--score", choices=sorted(SCORE_LINES),
                        help="which final line counts in logs without a final_score line "
                             f"(default: {DEFAULT_SCORE}, the sliding-window exact BPB)")
    parser.add_argument("--author", default="")
    parser.add_argument("--name", default="")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--track", default="10min_16mb")
    parser.add_argument("--write", type=Path, help="write the JSON here instead of stdout")
    parser.add_argument("--vs", type=float, help="a record's mean BPB to compare against")
    parser.add_argument("--vs-logs", nargs="+", type=Path, default=[], help="the record's own logs")
    parser.add_argument("--plot", type=Path, help="draw train/val loss against step (PNG)")
    return parser.parse_args(glue_vs_value(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_options(args)
        logs, record_logs = read_logs(args.logs), read_logs(args.vs_logs)
        score_line, notes = counted_score_line(logs, args.score)
        text = json.dumps(build_submission(logs, score_line, args), indent=2) + "\n"
        if args.plot:
            plot_losses(logs, args.plot)
        if args.write:
            write_atomic(args.write, text.encode())
    except (LogError, RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.write:
        sys.stdout.write(text)
    problems = all_problems(logs, score_line)
    warnings = slot_warning(logs, score_line) + safety_cap_notes(logs) + run_difference_notes(logs)
    for line in notes + warnings + problems:
        print(line, file=sys.stderr)
    if args.vs is not None or record_logs:
        for line in compare(logs, score_line, args.vs, record_logs):
            print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
