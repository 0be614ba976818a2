"""tools/mutation_pass.py: sections by banner, the mutants it makes, the runner on a tiny project."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tools import mutation_pass
import pytest

from conftest import ROOT

RULE = "# " + "-" * 77

SOURCE = textwrap.dedent(f'''\
    """Module docstring: a + b stays as it is."""

    {RULE}
    # HELPERS
    {RULE}

    def outside(a, b):
        return a + b

    {RULE}
    # ARITHMETIC: the part under test
    {RULE}

    def add(a: int, b: int = 2) -> int:
        """Adds a + b (a docstring, never mutated)."""
        total = a + b  # a comment: a - b
        print(f"adding {{a + b}}")
        return total

    def smaller(a, b):
        if a < b and not a == 0:
            return min(a, b)
        return True
''')


def line_of(source: str, text: str) -> int:
    return next(number for number, line in enumerate(source.splitlines(), 1) if text in line)


def mutants_of(source: str, *titles: str) -> list[mutation_pass.Mutant]:
    found = mutation_pass.find_sections(mutation_pass.source_lines(source))
    sections = mutation_pass.select_sections(found, list(titles), Path("example.py"))
    return mutation_pass.generate_mutants(source, sections)


def test_sections_are_found_by_the_leading_words_of_their_banner_titles():
    sections = mutation_pass.find_sections(mutation_pass.source_lines(SOURCE))
    assert [s.title for s in sections] == ["HELPERS", "ARITHMETIC: the part under test"]
    arithmetic = mutation_pass.select_sections(sections, ["arithmetic"], Path("example.py"))[0]
    assert arithmetic.first_line == line_of(SOURCE, "# ARITHMETIC") - 1
    assert arithmetic.last_line == len(SOURCE.splitlines())
    assert sections[0].last_line == arithmetic.first_line - 1


def test_an_unknown_section_names_the_file_and_the_sections_it_has():
    sections = mutation_pass.find_sections(mutation_pass.source_lines(SOURCE))
    with pytest.raises(mutation_pass.UsageError, match=r"'OPTIMISER' not found in example.py; .*'HELPERS', "
                                                         r"'ARITHMETIC: the part under test'"):
        mutation_pass.select_sections(sections, ["OPTIMISER"], Path("example.py"))


def test_mutants_change_one_line_inside_the_chosen_section_only():
    mutants = mutants_of(SOURCE, "ARITHMETIC")
    section_start = line_of(SOURCE, "# ARITHMETIC")
    original_lines = SOURCE.splitlines()
    for mutant in mutants:
        assert mutant.line > section_start
        changed = [n for n, (old, new) in enumerate(zip(original_lines, mutant.source.splitlines()), 1) if old != new]
        assert changed == [mutant.line] and len(mutant.source.splitlines()) == len(original_lines)
        assert original_lines[mutant.line - 1].strip() == mutant.original
    found = {(m.line, m.mutated) for m in mutants}
    total_line = line_of(SOURCE, "total = a + b")
    assert (total_line, "total = a - b  # a comment: a - b") in found
    assert (total_line, "pass") in found
    assert (line_of(SOURCE, "def add"), "def add(a: int, b: int = 3) -> int:") in found
    compare_line = line_of(SOURCE, "if a < b")
    assert {(compare_line, "if a <= b and not a == 0:"), (compare_line, "if a < b or not a == 0:"),
            (compare_line, "if a < b and a == 0:"), (compare_line, "if a < b and not a != 0:"),
            (compare_line, "if a < b and not a == 1:")} <= found
    assert (line_of(SOURCE, "return min"), "return max(a, b)") in found
    assert (line_of(SOURCE, "return min"), "return None") in found
    assert (line_of(SOURCE, "return True"), "return False") in found
    assert (line_of(SOURCE, "return total"), "return None") in found


def test_docstrings_comments_messages_and_annotations_are_not_mutated():
    mutants = mutants_of(SOURCE, "ARITHMETIC")
    untouched = [line_of(SOURCE, '"""Adds'), line_of(SOURCE, "print(")]
    assert not [m for m in mutants if m.line in untouched]
    assert not [m for m in mutants if "int" not in m.mutated and m.line == line_of(SOURCE, "def add")]
    assert all("# a comment: a - b" in m.mutated for m in mutants
               if m.line == line_of(SOURCE, "total =") and m.mutated != "pass")


def test_all_sections_when_none_are_named():
    lines = {m.line for m in mutants_of(SOURCE)}
    assert line_of(SOURCE, "return a + b") in lines and line_of(SOURCE, "total = a + b") in lines


PROJECT_SOURCE = textwrap.dedent(f'''\
    {RULE}
    # CALC
    {RULE}

    def double(x):
        return x * 2

    def negate(x):
        return -x
''')

PROJECT_TEST = textwrap.dedent('''\
    import calc

    def test_double():
        assert calc.double(3) == 6
''')


def test_the_runner_kills_a_tested_mutant_and_reports_an_untested_one(tmp_path):
    (tmp_path / "calc.py").write_text(PROJECT_SOURCE)
    (tmp_path / "test_calc.py").write_text(PROJECT_TEST)
    report_path = tmp_path / "report.json"
    command = [sys.executable, str(ROOT / "tools" / "mutation_pass.py"), str(tmp_path / "calc.py"),
               "--root", str(tmp_path), "--sections", "CALC", "--tests", "test_calc.py",
               "--only-lines", "6-9", "--json", str(report_path), "--workers", "2"]  # leaves the `def` lines out
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    outcome = {(m["line"], m["mutated"]): m["status"] for m in report["mutants"]}
    assert outcome[(6, "return x / 2")] == "killed"
    assert outcome[(6, "return x * 3")] == "killed"
    assert outcome[(6, "return None")] == "killed"
    assert outcome[(9, "return x")] == "survived"  # no test calls negate
    assert outcome[(9, "return None")] == "survived"
    assert "line 9: return -x -> return x" in result.stdout
    assert report["complete"] and report["totals"] == {"mutants": 5, "killed": 3, "timeout": 0, "survived": 2,
                                                       "skipped": 0, "pending": 0}
    assert (tmp_path / "calc.py").read_text() == PROJECT_SOURCE  # the working tree is never touched


def test_a_bad_section_is_one_line_on_stderr(tmp_path):
    (tmp_path / "calc.py").write_text(PROJECT_SOURCE)
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "mutation_pass.py"), str(tmp_path / "calc.py"),
                             "--root", str(tmp_path), "--sections", "MODEL"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "section 'MODEL' not found" in result.stderr
