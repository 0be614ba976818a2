"""Train once per seed and write a record's top-level files from the real runs.

    python tools/seed_runs.py [--seeds 1337 42 2024] [--out DIR] [--script PATH] [--nproc N]
                              [--author A --name N]

Every run gets the same settings: the caller's environment, plus SEED, a RUN_ID of its own
(seed1337-<stamp>) and ARTIFACT_PATH=<work>/seed1337.int6.ptz, so no run overwrites another's
log or artifact. The runs work in <out>/.seed_runs/<stamp>-*/, where the trainer's logs/
folder lands (the folder is kept). Since that is not the caller's folder, relative
DATA_PATH and TOKENIZER_PATH values are made absolute; with neither DATA_PATH nor SMOKE
set, the runs use the profile's FineWeb under the caller's folder if it holds training
shards, and the smoke run (SMOKE=1) otherwise, as train_gpt.py itself decides there.

Only when every run exited 0 and every log passes tools/submission.py's checks are the
logs copied to <out>/train_seed<N>.log and <out>/submission.json written by
tools/submission.py. Otherwise nothing at the top level changes, and the exit status is 1
with one line naming the seed and the reason. Exit status 2: unusable options.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tools import submission
from tools import ROOT
from trainer.settings import PROFILES, Hyperparameters, profile_defaults, with_smoke_when_no_data

DEFAULT_SEEDS = [1337, 42, 2024]
# settings the trainer reads as paths relative to its working folder
PATH_SETTINGS = ("DATA_PATH", "TOKENIZER_PATH")


class SeedRunError(RuntimeError):
    """A run or its log that stops the record from being written; the message names the seed."""


class UsageError(ValueError):
    """An option that cannot be used; the message names it."""


@dataclass
class SeedRun:
    seed: int
    run_id: str
    log: Path  # where the trainer writes it: <work>/logs/<run_id>.txt


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=DEFAULT_SEEDS)
    parser.add_argument("--out", type=Path, default=ROOT, help="where the record files go (default: the repository root)")
    parser.add_argument("--script", type=Path, default=ROOT / "train_gpt.py",
                        help="the trainer (default: the shipped train_gpt.py)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (>1: torch.distributed.run)")
    parser.add_argument("--author", default="")
    parser.add_argument("--name", default="")
    return parser.parse_args(argv)


def check_options(args: argparse.Namespace, environ: dict[str, str]) -> None:
    if len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"--seeds {' '.join(map(str, args.seeds))}: a seed is repeated (one run per seed)")
    if args.nproc < 1:
        raise UsageError(f"--nproc {args.nproc}: must be at least 1")
    if not args.script.is_file():
        raise UsageError(f"--script {args.script}: no such file")
    if not args.out.is_dir():
        raise UsageError(f"--out {args.out}: no such folder")


def trainer_command(script: Path, nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]


def default_data_path(environ: dict[str, str]) -> str:
    """The data folder of the run's profile (for a PROFILE the trainer will refuse, the
    field's default: the run stops at that setting anyway)."""
    profile = environ.get("PROFILE", Hyperparameters.profile)
    return profile_defaults(profile, False).data_path if profile in PROFILES else Hyperparameters.data_path


def run_environment(environ: dict[str, str], seed: int, run_id: str, work: Path) -> dict[str, str]:
    """The caller's settings, with paths that still mean the same from the work folder
    (relative ones are read from the caller's folder, the working folder)."""
    env = with_smoke_when_no_data(environ)  # FineWeb if it is here, else the smoke run: train_gpt.py's choice
    if "DATA_PATH" not in env and "SMOKE" not in env:
        env["DATA_PATH"] = default_data_path(env)  # the shards it found here; made absolute below
    for name in PATH_SETTINGS:
        if name in env and not Path(env[name]).is_absolute():
            env[name] = os.path.abspath(env[name])
    env.update(SEED=str(seed), RUN_ID=run_id, ARTIFACT_PATH=str(work / f"seed{seed}.int6.ptz"))
    return env


def run_seed(args: argparse.Namespace, seed: int, stamp: str, work: Path) -> SeedRun:
    """One training run, its output streamed to the console."""
    run = SeedRun(seed, f"seed{seed}-{stamp}", work / "logs" / f"seed{seed}-{stamp}.txt")
    env = run_environment(dict(os.environ), seed, run.run_id, work)
    status = subprocess.run(trainer_command(args.script.resolve(), args.nproc), cwd=work, env=env).returncode
    if status != 0:
        raise SeedRunError(f"seed {seed}: the trainer exited with status {status}")
    if not run.log.is_file():
        raise SeedRunError(f"seed {seed}: the trainer wrote no log at {run.log}")
    return run


def problem_line(problems: list[str]) -> str:
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def check_run(run: SeedRun) -> None:
    """tools/submission.py's own checks on one run's log."""
    try:
        problems = submission.check_logs([run.log])
    except submission.LogError as error:
        raise SeedRunError(f"seed {run.seed}: {error}") from None
    if problems:
        raise SeedRunError(f"seed {run.seed}: {problem_line(problems)}")


def check_together(runs: list[SeedRun]) -> None:
    """The checks across logs (each passed on its own): that all count the same score, and
    that every seed ran the same code with the same settings."""
    try:
        problems = submission.check_logs([run.log for run in runs])
    except submission.LogError as error:
        raise SeedRunError(str(error)) from None
    if problems:
        raise SeedRunError(problem_line(problems))


def write_submission(args: argparse.Namespace, runs: list[SeedRun], work: Path) -> Path:
    """submission.json as tools/submission.py writes it, kept in the work folder until published."""
    path = work / "submission.json"
    status = submission.main([*(str(run.log) for run in runs), "--write", str(path),
                              "--author", args.author, "--name", args.name])
    if status != 0:
        raise SeedRunError(f"tools/submission.py refused the logs (exit status {status}, reason above)")
    return path


def publish(files: dict[Path, Path]) -> None:
    """Copy each source to its destination: all are staged under temporary names first, so
    a failed copy leaves every destination as it was, then each is renamed into place."""
    staged: list[tuple[Path, Path]] = []
    try:
        for source, destination in files.items():
            temporary = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
            staged.append((temporary, destination))
            shutil.copyfile(source, temporary)
    except OSError as error:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise SeedRunError(f"cannot write {staged[-1][1]} ({error.strerror})") from None
    for temporary, destination in staged:
        os.replace(temporary, destination)


def make_work_folder(out: Path, stamp: str) -> Path:
    """A fresh folder per invocation: earlier runs' logs and artifacts stay as they were."""
    (out / ".seed_runs").mkdir(exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{stamp}-", dir=out / ".seed_runs"))


def record_files(args: argparse.Namespace, stamp: str, work: Path) -> list[SeedRun]:
    runs = []
    for index, seed in enumerate(args.seeds, 1):
        print(f"seed_runs: seed {seed} ({index}/{len(args.seeds)}) in {work}", file=sys.stderr, flush=True)
        runs.append(run_seed(args, seed, stamp, work))
        check_run(runs[-1])  # a broken seed ends it here: the record cannot be made anyway
    check_together(runs)
    summary = write_submission(args, runs, work)
    files = {run.log: args.out / f"train_seed{run.seed}.log" for run in runs}
    publish({**files, summary: args.out / "submission.json"})
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_options(args, dict(os.environ))
    except UsageError as error:
        print(f"seed_runs: {error}", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        work = make_work_folder(args.out, stamp)
    except OSError as error:
        print(f"seed_runs: --out {args.out}: cannot make a work folder ({error.strerror})", file=sys.stderr)
        return 2
    kept = "train_seed*.log and submission.json left as they were"
    try:
        runs = record_files(args, stamp, work)
    except SeedRunError as error:
        print(f"seed_runs: {error}; {kept} (the runs are in {work})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"seed_runs: interrupted; {kept} (the runs are in {work})", file=sys.stderr)
        return 130
    names = ", ".join(f"train_seed{run.seed}.log" for run in runs)
    print(f"seed_runs: wrote {names} and submission.json to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
