"""Mutation testing of chosen banner sections of one source file (standard library only).

    python tools/mutation_pass.py src/trainer.py --sections OPTIMISER "TRAINING LOOP" \\
        --tests tests/test_optimizer.py tests/test_model.py --json mutation.json
    python tools/mutation_pass.py src/trainer.py --sections OPTIMISER --list   # mutants only

A section is the code under a banner of three comment lines (a rule of dashes, the
title, another rule) up to the next banner; --sections names it by the title's leading
words ("RUNTIME" finds "RUNTIME: devices, ranks, logging"). Each mutant changes one line
of the section: an operator swapped, a comparison flipped, a constant changed, a return
value dropped, a statement replaced by `pass`, min and max exchanged, and so on. Strings
(docstrings and log messages included), comments and type annotations are left alone.

The repository is copied once to a temporary folder and every mutant is tested there,
never in the working tree: write the mutant, run
`python -m pytest -x -q -p no:cacheprovider <tests>`, put the original back. A mutant is
killed when the tests fail, survives when they pass, and counts as timed out (killed,
reported apart) when they run past the timeout; one that does not compile is skipped.
The unmutated tests run first: they must pass, and they set the default timeout.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

BANNER_RULE = re.compile(r"^#\s*-{10,}\s*$")
BANNER_TITLE = re.compile(r"^#\s*(\S.*?)\s*$")

# Calls whose arguments are only messages: mutating them tests the wording, not the logic.
MESSAGE_CALLS = {"print", "log", "debug", "info", "warning", "warn", "error", "exception"}

BINARY_SWAPS: dict[type, tuple[str, str]] = {
    ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*"),
    ast.FloorDiv: ("//", "/"), ast.Mod: ("%", "//"), ast.Pow: ("**", "*"),
    ast.LShift: ("<<", ">>"), ast.RShift: (">>", "<<"), ast.BitAnd: ("&", "|"), ast.BitOr: ("|", "&"),
}
AUGMENTED_SWAPS = {op: (old + "=", new + "=") for op, (old, new) in BINARY_SWAPS.items()}
COMPARISON_SWAPS: dict[type, tuple[str, str]] = {
    ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
    ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.Is: ("is", "is not"), ast.IsNot: ("is not", "is"),
    ast.In: ("in", "not in"), ast.NotIn: ("not in", "in"),
}
BOOLEAN_SWAPS: dict[type, tuple[str, str]] = {ast.And: ("and", "or"), ast.Or: ("or", "and")}
DROPPED_UNARY: dict[type, str] = {ast.Not: "not", ast.USub: "-", ast.Invert: "~"}
FUNCTION_SWAPS = {"min": "max", "max": "min", "any": "all", "all": "any"}


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2."""


# -----------------------------------------------------------------------------
# Sections
# -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Section:
    title: str
    first_line: int  # the banner's first rule (1-based)
    last_line: int  # the line before the next banner, or the file's last line

    def contains(self, line: int) -> bool:
        return self.first_line <= line <= self.last_line


def source_lines(text: str) -> list[str]:
    """Lines as the ast numbers them: split on "\n" only (str.splitlines also splits on \f and others)."""
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def find_sections(lines: list[str]) -> list[Section]:
    """Every banner section of a file, in file order."""
    starts: list[tuple[int, str]] = []
    for index in range(len(lines) - 2):
        title = BANNER_TITLE.match(lines[index + 1])
        if BANNER_RULE.match(lines[index]) and BANNER_RULE.match(lines[index + 2]) and title \
                and not BANNER_RULE.match(lines[index + 1]):
            starts.append((index + 1, title.group(1)))
    ends = [line - 1 for line, _ in starts[1:]] + [len(lines)]
    return [Section(title, first, last) for (first, title), last in zip(starts, ends)]


def title_words(text: str) -> list[str]:
    return re.findall(r"[A-Z0-9]+", text.upper())


def select_sections(sections: list[Section], requested: list[str] | None, source: Path) -> list[Section]:
    """The sections whose titles start with the requested words (all of them when none are requested)."""
    if not sections:
        raise UsageError(f"{source} has no banner sections (a '# ----' rule, '# TITLE', another rule)")
    if not requested:
        return sections
    existing = ", ".join(repr(section.title) for section in sections)
    chosen: list[Section] = []
    for request in requested:
        words = title_words(request)
        matches = [s for s in sections if words and title_words(s.title)[:len(words)] == words]
        exact = [s for s in matches if title_words(s.title) == words]
        matches = exact or matches  # "MODEL" is the section MODEL even beside one called "MODEL EXPORT"
        if not matches:
            raise UsageError(f"section {request!r} not found in {source}; its sections are: {existing}")
        if len(matches) > 1:
            raise UsageError(f"section {request!r} matches several sections of {source}: "
                             + ", ".join(repr(s.title) for s in matches))
        if matches[0] not in chosen:
            chosen.append(matches[0])
    return chosen


# -----------------------------------------------------------------------------
# Mutant generation
# -----------------------------------------------------------------------------

@dataclass(frozen=True)
class LineEdit:
    """Replace bytes [start, end) of one line (ast columns are UTF-8 byte offsets)."""
    line: int
    start: int
    end: int
    replacement: str
    kind: str


@dataclass
class Mutant:
    id: int
    section: str
    line: int
    kind: str
    original: str  # the whole line, stripped
    mutated: str
    source: str = field(repr=False, default="")  # the whole mutated file


def call_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def is_message_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and call_name(node) in MESSAGE_CALLS


def mutated_number(value: int | float) -> int | float:
    """0 -> 1, 1 -> 0, other ints n -> n + 1; 0.0 -> 1.0, other floats x -> 2x."""
    if isinstance(value, int):
        return {0: 1, 1: 0}.get(value, value + 1)
    return 1.0 if value == 0.0 else value * 2


class EditFinder(ast.NodeVisitor):
    """Collects the one-line edits of a module, skipping strings, annotations and messages."""

    def __init__(self, lines: list[bytes]):
        self.lines = lines
        self.edits: list[LineEdit] = []

    # --- helpers -------------------------------------------------------------

    def add(self, line: int, start: int, end: int, replacement: str, kind: str) -> None:
        self.edits.append(LineEdit(line, start, end, replacement, kind))

    def swap_between(self, left: ast.AST, right: ast.AST, old: str, new: str, kind: str) -> None:
        """Swap the operator written between two operands on the same line."""
        if left.end_lineno != right.lineno:
            return
        line = self.lines[right.lineno - 1]
        gap = line[left.end_col_offset:right.col_offset].decode()
        core = gap.strip(" \t()")
        if " ".join(core.split()) != old:  # anything else between them: not a plain operator
            return
        at = left.end_col_offset + len(gap[:gap.index(core)].encode())
        self.add(right.lineno, at, at + len(core.encode()), new, kind)

    def replace_node(self, node: ast.AST, replacement: str, kind: str) -> None:
        if node.lineno == node.end_lineno:
            self.add(node.lineno, node.col_offset, node.end_col_offset, replacement, kind)

    def is_whole_line(self, statement: ast.stmt) -> bool:
        """True when the statement is alone on its one line (a trailing comment allowed)."""
        if statement.lineno != statement.end_lineno:
            return False
        line = self.lines[statement.lineno - 1]
        before, after = line[:statement.col_offset], line[statement.end_col_offset:].strip()
        return not before.strip() and (not after or after.startswith(b"#"))

    def delete_statement(self, statement: ast.stmt) -> None:
        if self.is_whole_line(statement):
            end = len(self.lines[statement.lineno - 1].rstrip(b"\r\n"))
            self.add(statement.lineno, statement.col_offset, end, "pass", "statement -> pass")

    # --- what is not mutated -------------------------------------------------

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        pass  # f-strings are messages; their inner positions are unreliable before 3.12

    def visit_arg(self, node: ast.arg) -> None:
        pass  # an argument's annotation

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for default in [*node.args.defaults, *node.args.kw_defaults]:
            if default is not None:
                self.visit(default)
        for decorator in node.decorator_list:
            self.visit(decorator)
        for statement in node.body:  # node.returns, the return annotation, is skipped
            self.visit(statement)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.delete_statement(node)
            self.visit(node.target)
            self.visit(node.value)

    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, ast.Constant) or is_message_call(node.value):
            return  # docstrings, bare strings and log/print lines
        self.delete_statement(node)
        self.generic_visit(node)

    # --- mutations -----------------------------------------------------------

    def visit_Assign(self, node: ast.Assign) -> None:
        self.delete_statement(node)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.delete_statement(node)
        if type(node.op) in AUGMENTED_SWAPS:
            old, new = AUGMENTED_SWAPS[type(node.op)]
            self.swap_between(node.target, node.value, old, new, f"{old} -> {new}")
        self.generic_visit(node)

    def visit_Return(self, node: ast.Return) -> None:
        value = node.value
        if value is not None and not (isinstance(value, ast.Constant) and value.value is None):
            self.replace_node(value, "None", "return value -> None")
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if type(node.op) in BINARY_SWAPS:
            old, new = BINARY_SWAPS[type(node.op)]
            self.swap_between(node.left, node.right, old, new, f"{old} -> {new}")
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        for op, left, right in zip(node.ops, [node.left, *node.comparators], node.comparators):
            old, new = COMPARISON_SWAPS[type(op)]
            self.swap_between(left, right, old, new, f"{old} -> {new}")
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        old, new = BOOLEAN_SWAPS[type(node.op)]
        for left, right in zip(node.values, node.values[1:]):
            self.swap_between(left, right, old, new, f"{old} -> {new}")
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        symbol = DROPPED_UNARY.get(type(node.op))
        operand = node.operand
        if symbol and node.lineno == operand.lineno:
            prefix = self.lines[node.lineno - 1][node.col_offset:operand.col_offset].decode()
            kept = prefix[len(symbol):].lstrip() if prefix.startswith(symbol) else None
            if kept is not None:
                self.add(node.lineno, node.col_offset, operand.col_offset, kept, f"drop {symbol}")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, bool):
            self.replace_node(node, str(not value), f"{value} -> {not value}")
        elif isinstance(value, (int, float)):
            new = mutated_number(value)
            self.replace_node(node, repr(new), f"{value!r} -> {new!r}")

    def visit_Call(self, node: ast.Call) -> None:
        if is_message_call(node):
            return
        name = call_name(node)
        if isinstance(node.func, ast.Name) and name in FUNCTION_SWAPS:
            self.replace_node(node.func, FUNCTION_SWAPS[name], f"{name} -> {FUNCTION_SWAPS[name]}")
        self.generic_visit(node)


def apply_edit(lines: list[bytes], edit: LineEdit) -> bytes:
    line = lines[edit.line - 1]
    return line[:edit.start] + edit.replacement.encode() + line[edit.end:]


def generate_mutants(source: str, sections: list[Section]) -> list[Mutant]:
    """One mutant per edit on a line inside the sections, in line order, duplicates removed."""
    byte_lines = source.encode().splitlines(keepends=True)
    finder = EditFinder(byte_lines)
    finder.visit(ast.parse(source))
    mutants: list[Mutant] = []
    seen: set[tuple[int, bytes]] = set()
    for edit in sorted(finder.edits, key=lambda e: (e.line, e.start, e.end, e.kind)):
        section = next((s for s in sections if s.contains(edit.line)), None)
        new_line = apply_edit(byte_lines, edit)
        if section is None or new_line == byte_lines[edit.line - 1] or (edit.line, new_line) in seen:
            continue
        seen.add((edit.line, new_line))
        new_source = b"".join(byte_lines[:edit.line - 1] + [new_line] + byte_lines[edit.line:]).decode()
        mutants.append(Mutant(id=len(mutants) + 1, section=section.title, line=edit.line, kind=edit.kind,
                              original=byte_lines[edit.line - 1].decode().strip(),
                              mutated=new_line.decode().strip(), source=new_source))
    return mutants


def compiles(source: str, filename: str) -> bool:
    try:
        compile(source, filename, "exec")
    except (SyntaxError, ValueError):
        return False
    return True


# -----------------------------------------------------------------------------
# Running the tests
# -----------------------------------------------------------------------------

@dataclass
class Outcome:
    status: str  # "killed", "timeout", "survived" or "skipped"
    seconds: float = 0.0
    returncode: int | None = None
    killed_by: str | None = None  # the first FAILED/ERROR line of pytest's summary
    reason: str | None = None  # the first "E ..." line of the failure: which assertion failed


def repository_files(root: Path) -> list[Path]:
    """Tracked and untracked-but-not-ignored files (git's view), else everything but caches."""
    if (root / ".git").exists() and shutil.which("git"):
        listing = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                                  "--exclude-standard"], capture_output=True, check=True).stdout
        return [Path(name) for name in listing.decode().split("\0") if name and (root / name).is_file()]
    skipped = {".git", "__pycache__", ".pytest_cache"}
    return [path.relative_to(root) for path in root.rglob("*")
            if path.is_file() and not skipped & set(path.relative_to(root).parts)]


def copy_repository(root: Path, destination: Path, relative_source: Path) -> None:
    """The repository's files, and the mutated file even where git ignores it."""
    for relative in {*repository_files(root), relative_source}:
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / relative, target)


def failure_reason(output: str) -> str | None:
    match = re.search(r"^E\s+(\S.*)$", output, re.MULTILINE)
    return match.group(1).strip()[:300] if match else None


def first_failure(output: str) -> str | None:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:300]
    return None


class Interrupted(Exception):
    """The pass is being stopped: the test run in progress says nothing about its mutant."""


class RunningTests:
    """The pytest processes in flight, so that stopping the pass (Ctrl-C, SIGTERM) ends them too."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.processes: set[subprocess.Popen] = set()
        self.stopping = False

    def start(self, command: list[str], workdir: Path, log) -> subprocess.Popen:
        with self.lock:
            if self.stopping:
                raise Interrupted()
            # a new process group: a timeout or a stop can end the tests' own children too
            # no .pyc files: a same-size mutant written within the second could reuse a stale one
            process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
            self.processes.add(process)
            return process

    def finish(self, process: subprocess.Popen) -> None:
        with self.lock:
            self.processes.discard(process)
        if self.stopping:
            raise Interrupted()

    def stop_all(self) -> None:
        with self.lock:
            self.stopping = True
            for process in self.processes:
                kill_group(process)


RUNNING = RunningTests()


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone


def run_pytest(workdir: Path, tests: list[str], timeout: float | None, log_path: Path) -> Outcome:
    """Run `pytest -x` on the tests in workdir; the outcome as if a mutant were in place."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = RUNNING.start(command, workdir, log)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(process)
            process.wait()
            RUNNING.finish(process)
            return Outcome("timeout", time.perf_counter() - started, None)
        RUNNING.finish(process)
    seconds = time.perf_counter() - started
    if returncode == 0:
        return Outcome("survived", seconds, 0)
    output = log_path.read_text(errors="replace")
    return Outcome("killed", seconds, returncode, first_failure(output), failure_reason(output))


def try_mutant(mutant: Mutant, workdir: Path, relative_source: Path, original: str, tests: list[str],
                timeout: float | None) -> Outcome:
    """Write the mutant into the scratch copy, run the tests there, put the original back."""
    target = workdir / relative_source
    if not compiles(mutant.source, str(target)):
        return Outcome("skipped")
    try:
        target.write_text(mutant.source)
        return run_pytest(workdir, tests, timeout, workdir.parent / f"{workdir.name}.log")
    finally:
        target.write_text(original)


def run_mutants(mutants: list[Mutant], snapshot: Path, relative_source: Path, tests: list[str], timeout: float | None,
                workers: int, scratch: Path, outcomes: dict[int, Outcome],
                on_result: Callable[[Mutant, Outcome], None]) -> None:
    """Test every mutant, `workers` at a time, each in a worker's own copy of `snapshot` (the
    copy the unmutated tests passed in, so edits to the working tree during the pass never
    reach a mutant's tests); fills outcomes."""
    original = (snapshot / relative_source).read_text()
    copies: queue.Queue[Path] = queue.Queue()
    for index in range(workers):
        shutil.copytree(snapshot, scratch / f"repo{index}")
        copies.put(scratch / f"repo{index}")
    lock = threading.Lock()

    def work(mutant: Mutant) -> None:
        workdir = copies.get()
        try:
            outcome = try_mutant(mutant, workdir, relative_source, original, tests, timeout)
        except Interrupted:
            return
        finally:
            copies.put(workdir)
        with lock:
            outcomes[mutant.id] = outcome
            on_result(mutant, outcome)

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for future in [pool.submit(work, mutant) for mutant in mutants]:
            future.result()
    except BaseException:  # Ctrl-C or SIGTERM: end the tests in flight, start no more
        RUNNING.stop_all()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_baseline(root: Path, relative_source: Path, tests: list[str], scratch: Path) -> float:
    """The unmutated tests must pass in a scratch copy; returns how long they took."""
    workdir = scratch / "baseline"
    copy_repository(root, workdir, relative_source)
    outcome = run_pytest(workdir, tests, None, scratch / "baseline.log")
    if outcome.status != "survived":
        tail = "".join((scratch / "baseline.log").read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise UsageError(f"the selected tests fail without any mutant (pytest exit {outcome.returncode}); "
                         f"fix them first. Last lines:\n{tail}")
    return outcome.seconds


# -----------------------------------------------------------------------------
# Reporting
# -----------------------------------------------------------------------------

STATUSES = ("killed", "timeout", "survived", "skipped")


def tally(mutants: list[Mutant], outcomes: dict[int, Outcome]) -> dict[str, int]:
    counts = {"mutants": len(mutants), **{status: 0 for status in STATUSES}, "pending": 0}
    for mutant in mutants:
        counts[outcomes[mutant.id].status if mutant.id in outcomes else "pending"] += 1
    return counts


def build_report(args: argparse.Namespace, source_text: str, sections: list[Section], mutants: list[Mutant],
                 outcomes: dict[int, Outcome], baseline_s: float | None, timeout: float | None,
                 elapsed_s: float, complete: bool) -> dict:
    mutants = sorted(mutants, key=lambda m: m.id)
    return {
        "source": str(args.source), "source_sha256": sha256(source_text), "tests": pytest_targets(args),
        "timeout_s": timeout, "baseline_s": baseline_s,
        "elapsed_s": round(elapsed_s, 1), "complete": complete, "totals": tally(mutants, outcomes),
        "sections": [{**asdict(section), **tally([m for m in mutants if m.section == section.title], outcomes)}
                     for section in sections],
        "mutants": [{**{key: value for key, value in asdict(mutant).items() if key != "source"},
                     **(asdict(outcomes[mutant.id]) if mutant.id in outcomes else {"status": "pending"})}
                    for mutant in mutants],
    }


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def mutant_key(mutant: dict) -> tuple:
    return mutant["line"], mutant["kind"], mutant["original"], mutant["mutated"]


def previous_outcomes(path: Path, source_text: str, tests: list[str],
                      mutants: list[Mutant]) -> tuple[dict[int, Outcome], float]:
    """Outcomes already in a report of the same source and tests (keyed by this run's mutant ids), and its time."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"--resume: cannot read the report {path} ({error})") from None
    if report.get("source_sha256") != sha256(source_text) or report.get("tests") != tests:
        raise UsageError(f"--resume: {path} is a report of another source text or another --tests selection")
    done = {mutant_key(m): m for m in report.get("mutants", []) if m.get("status") in STATUSES}
    fields = ("status", "seconds", "returncode", "killed_by", "reason")
    outcomes = {mutant.id: Outcome(**{key: done[mutant_key(asdict(mutant))].get(key) for key in fields})
                for mutant in mutants if mutant_key(asdict(mutant)) in done}
    return outcomes, float(report.get("elapsed_s", 0.0))


def format_counts(counts: dict[str, int]) -> str:
    untested = f", {counts['pending']} not tested yet" if counts["pending"] else ""
    return (f"{counts['mutants']} mutants: {counts['killed']} killed, {counts['timeout']} timed out, "
            f"{counts['survived']} survived, {counts['skipped']} skipped{untested}")


def print_summary(report: dict) -> None:
    print()
    for section in report["sections"]:
        print(f"{section['title']} (lines {section['first_line']}-{section['last_line']}): {format_counts(section)}")
    totals = report["totals"]
    tested = totals["killed"] + totals["timeout"] + totals["survived"]
    score = f"{100 * (totals['killed'] + totals['timeout']) / tested:.1f}%" if tested else "n/a"
    print(f"total: {format_counts(totals)}; mutation score {score}; {report['elapsed_s']:.0f}s")
    survivors = [m for m in report["mutants"] if m["status"] == "survived"]
    if survivors:
        print(f"\nsurvivors ({len(survivors)}):")
        for mutant in survivors:
            print(f"line {mutant['line']}: {mutant['original']} -> {mutant['mutated']}")


def write_json(path: Path, report: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=1) + "\n")
    temporary.replace(path)  # a reader never sees half a report


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

def parse_line_range(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text.strip())
    if not match:
        raise UsageError(f"--only-lines {text!r}: expected A-B or A (line numbers)")
    first, last = int(match.group(1)), int(match.group(2) or match.group(1))
    if first > last:
        raise UsageError(f"--only-lines {text!r}: the first line is after the last")
    return first, last


def repository_root(source: Path, given: Path | None) -> Path:
    if given is not None:
        if not given.is_dir():
            raise UsageError(f"--root {given}: not a directory")
        root = given.resolve()
    else:
        root = next((p for p in source.parents if (p / ".git").exists()), None)
        if root is None:
            raise UsageError(f"{source} is not inside a git repository; pass --root")
    if root not in source.parents:
        raise UsageError(f"{source} is not inside the repository root {root}")
    return root


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the file to mutate, e.g. src/trainer.py")
    parser.add_argument("--sections", nargs="+", metavar="TITLE",
                        help="banner titles or their leading words (default: every section)")
    parser.add_argument("--tests", nargs="+", default=[], metavar="TARGET",
                        help="pytest targets, run in this order (default: the whole suite)")
    parser.add_argument("--deselect", action="append", default=[], metavar="NODEID",
                        help="a test to leave out, e.g. tests/test_training.py::test_x (repeatable)")
    parser.add_argument("--max", type=int, metavar="N", help="test only the first N mutants")
    parser.add_argument("--only-lines", metavar="A-B", help="only mutants on lines A to B")
    parser.add_argument("--workers", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--timeout", type=float, metavar="S",
                        help="seconds per mutant (default: twice the unmutated run plus 30 s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the report here (rewritten as it goes)")
    parser.add_argument("--shuffle", type=int, metavar="SEED",
                        help="test the mutants in a random order (with --max: a random sample)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the outcomes already in the --json report and test only the rest")
    parser.add_argument("--root", type=Path, help="the repository to copy (default: the source's git root)")
    parser.add_argument("--list", action="store_true", help="print the mutants and stop")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise UsageError(f"--workers {args.workers}: must be at least 1")
    if args.max is not None and args.max < 1:
        raise UsageError(f"--max {args.max}: must be at least 1")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be positive")
    if args.resume and not args.json:
        raise UsageError("--resume needs --json PATH, the report to continue")
    if not args.source.is_file():
        raise UsageError(f"{args.source}: no such file")
    return args


def pytest_targets(args: argparse.Namespace) -> list[str]:
    return [*args.tests, *(f"--deselect={node}" for node in args.deselect)]


def chosen_mutants(args: argparse.Namespace, source_text: str, sections: list[Section]) -> list[Mutant]:
    mutants = generate_mutants(source_text, sections)
    if args.only_lines:
        first, last = parse_line_range(args.only_lines)
        mutants = [m for m in mutants if first <= m.line <= last]
    if args.shuffle is not None:  # a sample of the whole file, not just its first lines
        mutants = random.Random(args.shuffle).sample(mutants, len(mutants))
    return mutants[:args.max] if args.max else mutants


def progress_printer(total: int) -> Callable[[Mutant, Outcome], None]:
    done = iter(range(1, total + 1))

    def show(mutant: Mutant, outcome: Outcome) -> None:
        by = f"  [{outcome.killed_by}]" if outcome.killed_by else ""
        print(f"[{next(done)}/{total}] {outcome.status:8} {outcome.seconds:6.1f}s  line {mutant.line}: "
              f"{mutant.original} -> {mutant.mutated}{by}", flush=True)
    return show


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    source = args.source.resolve()
    root = repository_root(source, args.root)
    source_text = source.read_text()
    sections = select_sections(find_sections(source_lines(source_text)), args.sections, args.source)
    mutants = chosen_mutants(args, source_text, sections)
    if args.list:
        for mutant in mutants:
            note = "" if compiles(mutant.source, str(source)) else "  (does not compile)"
            print(f"{mutant.id:4} line {mutant.line} [{mutant.kind}]: {mutant.original} -> {mutant.mutated}{note}")
        print(f"{len(mutants)} mutants")
        return 0
    if not mutants:
        raise UsageError("no mutants in the chosen sections and lines")

    outcomes: dict[int, Outcome] = {}
    earlier_s = 0.0  # time spent by the run that --resume continues
    if args.resume and args.json.exists():
        outcomes, earlier_s = previous_outcomes(args.json, source_text, pytest_targets(args), mutants)
    to_test = [m for m in mutants if m.id not in outcomes]
    baseline_s: float | None = None
    timeout = args.timeout
    show = progress_printer(len(to_test))

    def report(complete: bool) -> dict:
        return build_report(args, source_text, sections, mutants, outcomes, baseline_s, timeout,
                            earlier_s + time.perf_counter() - started, complete)

    def record(mutant: Mutant, outcome: Outcome) -> None:
        show(mutant, outcome)
        if args.json:  # rewritten after every mutant: a stopped pass keeps what it learnt
            write_json(args.json, report(complete=False))

    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="mutation_pass_") as scratch:
        try:
            if to_test:
                baseline_s = round(run_baseline(root, source.relative_to(root), pytest_targets(args), Path(scratch)), 1)
                timeout = timeout or round(2 * baseline_s + 30)
                print(f"{len(to_test)} of {len(mutants)} mutants to test in {len(sections)} section(s); unmutated "
                      f"tests pass in {baseline_s:.0f}s; timeout {timeout:.0f}s per mutant", flush=True)
                run_mutants(to_test, Path(scratch) / "baseline", source.relative_to(root), pytest_targets(args), timeout,
                            args.workers, Path(scratch), outcomes, record)
        except KeyboardInterrupt:
            interrupted = True
    final = report(complete=not interrupted)
    if args.json:
        write_json(args.json, final)
    print_summary(final)
    if interrupted:
        print("stopped early: the summary and report cover the mutants tested so far; "
              "--resume with the same --json continues", file=sys.stderr)
        return 130
    return 0


def raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt()


def entry_point() -> int:
    try:
        return main()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(entry_point())
