"""Seed logs -> submission.json, significance against a record, rule checks, loss plots.

    python tools/submission.py LOG [LOG ...] [--author A --name N --write submission.json]
    python tools/submission.py LOG ... --vs 1.10272            # a record's mean BPB
    python tools/submission.py LOG ... --vs-logs RECORD_LOG ...  # the record's own logs
    python tools/submission.py LOG ... --plot losses.png        # needs matplotlib

Reads logs in the reference format (this project's and the reference run's). The JSON
goes to stdout (or --write PATH); the comparison, rule violations and truncation notes go
to stderr, so stdout stays valid JSON. Exit status: 0, or 1 when a rule is broken or a
log is truncated, 2 for unusable input.
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

SIZE_LIMIT_BYTES = 16_000_000
TIME_LIMIT_MS = 600_000
RECORD_MARGIN_NATS = 0.005
SIGNIFICANCE = 0.01
SCORE_LINES = {"sliding": "final_int6_sliding_window_exact", "ttt": "legal_ttt_exact",
               "roundtrip": "final_int6_roundtrip_exact"}

NUMBER = r"([-+]?[\d.]+(?:[eE][-+]?\d+)?)"
STEP_TRAIN = re.compile(rf"^step:(\d+)/\d+ train_loss:{NUMBER} train_time:{NUMBER}ms step_avg:{NUMBER}ms")
STEP_VAL = re.compile(rf"^step:(\d+)/\d+ val_loss:{NUMBER} val_bpb:{NUMBER} train_time:{NUMBER}ms step_avg:{NUMBER}ms")
EXACT = re.compile(rf"^(\w+)_exact val_loss:{NUMBER} val_bpb:{NUMBER}")
EVAL_TIME = re.compile(rf"^(\w+) .*eval_time:{NUMBER}ms")
STOPPED = re.compile(rf"^stopping_early: wallclock_cap train_time:{NUMBER}ms step:(\d+)/")
TOTAL = re.compile(r"^Total submission size \S+: (\d+) bytes")
MODEL = re.compile(r"^Serialized model \S+: (\d+) bytes")
CODE = re.compile(r"^Code size: (\d+) bytes")


class LogError(ValueError):
    """A log that cannot be read; the message names the file."""


@dataclass
class RunLog:
    path: Path
    seed: int | None = None
    hardware: str | None = None
    train_points: list[tuple[int, float]] = field(default_factory=list)
    val_points: list[tuple[int, float, float]] = field(default_factory=list)  # step, loss, bpb
    scores: dict[str, tuple[float, float]] = field(default_factory=dict)  # line name -> (loss, bpb)
    eval_times_ms: dict[str, float] = field(default_factory=dict)
    steps: int | None = None
    step_avg_ms: float | None = None
    train_time_ms: float | None = None
    total_bytes: int | None = None
    model_bytes: int | None = None
    code_bytes: int | None = None

    @property
    def truncated(self) -> bool:
        return self.total_bytes is None or not self.scores


def parse_log(path: Path) -> RunLog:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as error:
        raise LogError(f"{path}: cannot read log ({error.strerror})") from None
    log = RunLog(path)
    for raw in lines:
        line = raw.strip()
        if match := STEP_TRAIN.match(line):
            step, loss, train_ms, avg = int(match[1]), float(match[2]), float(match[3]), float(match[4])
            log.train_points.append((step, loss))
            log.steps, log.train_time_ms, log.step_avg_ms = step, train_ms, avg
        elif match := STEP_VAL.match(line):
            step = int(match[1])
            log.val_points.append((step, float(match[2]), float(match[3])))
            log.steps, log.train_time_ms, log.step_avg_ms = step, float(match[4]), float(match[5])
        elif match := STOPPED.match(line):
            log.train_time_ms, log.steps = float(match[1]), int(match[2])
        elif match := EXACT.match(line):
            log.scores[match[1] + "_exact"] = (float(match[2]), float(match[3]))
        elif line.startswith("seed:"):
            log.seed = int(line.split(":", 1)[1])
        elif line.startswith("hardware:"):
            log.hardware = line.split(":", 1)[1].strip()
        elif match := TOTAL.match(line):
            log.total_bytes = int(match[1])
        elif match := MODEL.match(line):
            log.model_bytes = int(match[1])
        elif match := CODE.match(line):
            log.code_bytes = int(match[1])
        if match := EVAL_TIME.match(line):
            log.eval_times_ms[match[1]] = float(match[2])
    if log.seed is None and not log.train_points and not log.scores:
        raise LogError(f"{path}: no training-log lines found (expected lines like 'seed:1337' and 'step:...')")
    return log


def code_bytes(log: RunLog) -> int | None:
    if log.total_bytes is not None and log.model_bytes is not None:
        return log.total_bytes - log.model_bytes
    return log.code_bytes


def rule_violations(log: RunLog, score_line: str) -> list[str]:
    problems = []
    if log.train_time_ms is not None and log.train_time_ms > TIME_LIMIT_MS:
        problems.append(f"training took {log.train_time_ms / 1000:.1f} s (limit 600 s)")
    for name, milliseconds in log.eval_times_ms.items():
        if milliseconds > TIME_LIMIT_MS:
            problems.append(f"evaluation {name} took {milliseconds / 1000:.1f} s (limit 600 s)")
    if log.total_bytes is not None and log.total_bytes > SIZE_LIMIT_BYTES:
        problems.append(f"artifact + code is {log.total_bytes} bytes, {log.total_bytes - SIZE_LIMIT_BYTES} over {SIZE_LIMIT_BYTES}")
    if score_line not in log.scores:
        problems.append(f"no final score ({score_line})")
    return problems


def truncation_note(log: RunLog) -> str:
    last_val = f", last val_bpb {log.val_points[-1][2]}" if log.val_points else ""
    size = "an artifact size was logged" if log.total_bytes is not None else "no artifact size was logged"
    return f"{log.path}: truncated log (killed run?): reached step {log.steps}{last_val}; {size}; scores: {sorted(log.scores) or 'none'}"


def build_submission(logs: list[RunLog], score_line: str, args: argparse.Namespace) -> dict:
    scored = [log for log in logs if score_line in log.scores]
    results = {}
    for log in scored:
        loss, bpb = log.scores[score_line]
        results[str(log.seed)] = {"val_bpb": bpb, "val_loss": loss, "artifact_bytes": log.total_bytes,
                                  "steps": log.steps, "step_avg_ms": log.step_avg_ms}
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
            "hardware": hardware}


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
    scored = [log for log in logs if score_line in log.scores]
    our_nats = [log.scores[score_line][0] for log in scored]
    our_bpb = [log.scores[score_line][1] for log in scored]
    if record_logs:
        theirs = [log.scores[score_line] for log in record_logs if score_line in log.scores]
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
        label = f"seed {log.seed}" if log.seed is not None else log.path.name
        if log.train_points:
            axis.plot(*zip(*log.train_points), label=f"{label} train", alpha=0.7)
        if log.val_points:
            axis.plot([s for s, _, _ in log.val_points], [v for _, v, _ in log.val_points], "o-", label=f"{label} val")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats/token)")
    axis.legend()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    figure.savefig(temporary, dpi=120)
    os.replace(temporary, path)


def write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--score", choices=sorted(SCORE_LINES), default="sliding",
                        help="which final line counts (default: the sliding-window exact BPB)")
    parser.add_argument("--author", default="")
    parser.add_argument("--name", default="")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--track", default="10min_16mb")
    parser.add_argument("--write", type=Path, help="write the JSON here instead of stdout")
    parser.add_argument("--vs", type=float, help="a record's mean BPB to compare against")
    parser.add_argument("--vs-logs", nargs="+", type=Path, default=[], help="the record's own logs")
    parser.add_argument("--plot", type=Path, help="draw train/val loss against step (PNG)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    score_line = SCORE_LINES[args.score]
    try:
        logs = [parse_log(path) for path in args.logs]
        record_logs = [parse_log(path) for path in args.vs_logs]
        if args.plot:
            plot_losses(logs, args.plot)
    except LogError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(build_submission(logs, score_line, args), indent=2) + "\n"
    if args.write:
        write_atomic(args.write, text)
    else:
        sys.stdout.write(text)
    failed = False
    for log in logs:
        if log.truncated:
            print(truncation_note(log), file=sys.stderr)
            failed = True
        for problem in rule_violations(log, score_line):
            print(f"{log.path}: rule violation: {problem}", file=sys.stderr)
            failed = True
    if args.vs is not None or record_logs:
        for line in compare(logs, score_line, args.vs, record_logs):
            print(line, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
