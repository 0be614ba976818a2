"""tools/mutation_sections.py: every section with its own tests, the table mutmut reads, the
summary line."""

from __future__ import annotations

import pytest

from tools import mutation_sections
from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def test_every_module_is_a_section_with_its_own_test_file():
    modules = {path.stem for path in (ROOT / "src" / "trainer").glob("[a-z]*.py")}
    assert set(mutation_sections.SECTIONS) == modules | {"submission"}
    for module, tests in mutation_sections.SECTIONS.values():
        assert (ROOT / module).is_file() and (ROOT / tests).is_file()


def test_the_table_mutates_one_module_and_selects_its_tests():
    table = tomllib.loads(mutation_sections.section_config("src/trainer/model.py", "tests/test_model.py"))["tool"]["mutmut"]
    assert table["only_mutate"] == ["src/trainer/model.py"]
    assert table["pytest_add_cli_args_test_selection"][:3] == ["tests/test_model.py", "-m", "not packed"]
    assert table["source_paths"] == ["src/", "tools/"] and table["process_isolation"] == "forkserver"
    assert table["timeout_constant"] == 30.0


def test_the_summary_counts_timeouts_as_killed():
    statuses = mutation_sections.verdicts("    trainer.model.x_a__mutmut_1: killed\n    trainer.model.x_a__mutmut_2: timeout\n"
                                          "    trainer.model.x_b__mutmut_1: survived\n    trainer.model.x_c__mutmut_1: no tests\n")
    assert mutation_sections.summary("model", statuses, 61.2) == \
        "model: 4 mutants, 2 killed (50.0%), 1 survived, 1 not reached, 61s"
    assert mutation_sections.summary("model", {}, 0) == "model: 0 mutants, 0 killed (-), 0 survived, 0 not reached, 0s"
