"""Mutation testing, section by section: each module of the trainer (and the log reader)
is mutated alone by mutmut and judged by its own test file, as the tests mirror the source.

    OMP_NUM_THREADS=1 python tools/mutation_sections.py OUT [section ...]

For each section, a copy of the project in OUT/<section> gets a [tool.mutmut] table that
mutates that module and selects its test file; `mutmut run` runs there (OUT/<section>.log)
and its verdicts go to OUT/<section>.json. A file OUT/<section>.only (one mutant name a
line) limits the run to those mutants, e.g. the survivors of an earlier pass, which is how
new tests are measured without running every mutant again. The last line per section:
mutants, killed (a timeout counts as killed), survived, not reached by any test.
Standard library only; mutmut itself is in requirements-dev.txt. On two cores a section
took from half a minute (shards, 94 mutants) to about 18 minutes (training, 587) and
91 minutes (main, 401: its mutants run whole runs); the whole trainer is about
7,000 mutants, several hours.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SECTIONS = {name: (f"src/trainer/{name}.py", f"tests/test_{name}.py") for name in (
    "settings", "files", "shards", "runtime", "data", "model", "optimizer", "artifact", "evaluation", "training", "main")}
SECTIONS["submission"] = ("tools/submission.py", "tests/test_submission.py")

# Besides the shipped-file tests (they run train_gpt.py, which holds no mutant), one test
# cannot run under mutmut: it torch.compiles the model, and mutmut wraps every function.
# A mutant's process first collects its test file and builds that file's fixtures, which
# mutmut's time limit (15 times the tests' own time, plus timeout_constant seconds) does
# not count: with its default of 1 s, mutants that never hang were said to time out.
DESELECTED = ["-m", "not packed", "--deselect=tests/test_training.py::test_every_timed_path_compiles_once_and_matches_eager"]


def section_config(module: str, tests: str) -> str:
    """The [tool.mutmut] table for one section (appended to the copy's pyproject.toml)."""
    selection = json.dumps([tests, *DESELECTED])
    return f"""
[tool.mutmut]
source_paths = ["src/", "tools/"]
only_mutate = ["{module}"]
pytest_add_cli_args_test_selection = {selection}
pytest_add_cli_args = ["-p", "no:cacheprovider"]
also_copy = ["tools/", "data/tokenizers/", "data/smoke/", "docs/", "pytest.ini", "train_gpt.py", "README.md",
             "requirements.txt", "requirements-dev.txt"]
process_isolation = "forkserver"
timeout_constant = 30.0
"""


def verdicts(results: str) -> dict[str, str]:
    """`mutmut results --all true` as {mutant: status}."""
    pairs = (line.strip().rsplit(": ", 1) for line in results.splitlines() if ": " in line)
    return {name: status for name, status in pairs}


def summary(name: str, statuses: dict[str, str], seconds: float) -> str:
    counts = Counter(statuses.values())
    killed = counts["killed"] + counts["timeout"]
    total = sum(counts.values())
    share = f"{100 * killed / total:.1f}%" if total else "-"
    return (f"{name}: {total} mutants, {killed} killed ({share}), {counts['survived']} survived, "
            f"{counts['no tests']} not reached, {seconds:.0f}s")


def run_section(name: str, out: Path) -> str:
    module, tests = SECTIONS[name]
    work = out / name
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "mutants", "__pycache__", "logs"))
    pyproject = (work / "pyproject.toml").read_text(encoding="utf-8")
    start = pyproject.find("[tool.mutmut]")
    (work / "pyproject.toml").write_text((pyproject[:start] if start >= 0 else pyproject) + section_config(module, tests),
                                         encoding="utf-8")
    only = out / f"{name}.only"
    names = only.read_text(encoding="utf-8").split() if only.exists() else []
    started = time.time()
    with open(out / f"{name}.log", "w", encoding="utf-8") as log:
        subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(os.cpu_count() or 1), *names],
                       cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - started
    results = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                             capture_output=True, text=True).stdout
    statuses = verdicts(results)
    (out / f"{name}.json").write_text(json.dumps({"seconds": seconds, "statuses": statuses}, indent=0), encoding="utf-8")
    return summary(name, {n: s for n, s in statuses.items() if not names or n in names}, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the copies, logs and verdicts")
    parser.add_argument("sections", nargs="*", metavar="section", help=f"default: all ({', '.join(SECTIONS)})")
    args = parser.parse_args(argv)
    if unknown := [name for name in args.sections if name not in SECTIONS]:
        parser.error(f"no section {', '.join(unknown)}: one of {', '.join(SECTIONS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.sections or SECTIONS:
        print(run_section(name, args.out.resolve()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
