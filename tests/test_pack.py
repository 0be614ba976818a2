"""tools/pack.py: the shipped file is the joined, stripped, packed source; the same bytes on
every Python; the joining rules hold; --check catches a stale file."""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from tools import pack
from trainer.artifact import running_code
from conftest import ROOT

SHIPPED_BUDGET = 40_000  # bytes of code, which count against the 16 MB like the weights


@pytest.fixture(scope="module")
def packed_now() -> tuple[str, str]:
    """pack_trainer() of the source as it is (packing takes about half a second)."""
    return pack.pack_trainer()


@pytest.mark.packed
def test_the_shipped_file_is_the_packed_source_and_counts_its_own_bytes(packed_now):
    shipped = (ROOT / "train_gpt.py").read_text()
    source_sha256, packed = packed_now
    assert shipped == packed, "run python tools/pack.py"
    assert shipped.count("\n") == 3 and len(shipped.encode()) <= SHIPPED_BUDGET
    assert running_code().shipped_bytes == len(shipped.encode())
    assert running_code().shipped_sha256 == hashlib.sha256(shipped.encode()).hexdigest()
    assert running_code().source_sha256 == source_sha256
    unpacked = pack.unpack_program(shipped)
    tree = ast.parse(unpacked)
    assert not [node for node in ast.walk(tree) if pack.docstring_of(node)]
    assert "\n#" not in unpacked and f'SOURCE_SHA256="{source_sha256}"' in unpacked


def test_pack_check_says_when_a_generated_file_is_stale(tmp_path, monkeypatch, capsys, packed_now):
    for name in ("train_gpt.py", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.setattr(pack, "pack_trainer", lambda: packed_now)
    monkeypatch.setattr(pack, "SHIPPED", tmp_path / "train_gpt.py")
    monkeypatch.setattr(pack, "README", tmp_path / "README.md")
    assert pack.main(["--check"]) == 0
    (tmp_path / "README.md").write_text((tmp_path / "README.md").read_text().replace("| `SEED` | `1337`", "| `SEED` | `7`"))
    assert pack.main(["--check"]) == 1
    assert "stale: README.md" in capsys.readouterr().err
    assert pack.main([]) == 0 and pack.main(["--check"]) == 0
    assert (tmp_path / "README.md").read_text() == (ROOT / "README.md").read_text()


def test_strip_keeps_the_code_and_drops_docs_comments_and_annotations():
    source = ('"""doc"""\nfrom __future__ import annotations\nimport dataclasses\nTABLE: dict[str, int] = {"a": 1}\n'
              'def f(x: int, *rest: str, flag: bool = True, **more: float) -> int:\n    """doc"""\n    y: int = x  # note\n'
              '    name = "f"\n    return y if flag else len(f"{name!r:>{x}} {rest}")\n'
              'class C(Exception):\n    """only a doc"""\n'
              '@dataclasses.dataclass\nclass D:\n    size: float = 2.0\n    def g(self) -> float:\n'
              '        return (self.size +\n                1)\n')
    stripped = pack.strip(source)
    assert "import" not in stripped  # top-level imports are gathered by the join
    namespace: dict = {"dataclasses": __import__("dataclasses")}
    exec("from __future__ import annotations\n" + stripped, namespace)
    assert namespace["f"](3) == 3 and namespace["f"](3, flag=False) == len(f"{'f'!r:>3} ()")
    assert namespace["D"]().size == 2.0 and namespace["D"]().g() == 3.0 and issubclass(namespace["C"], Exception)
    for gone in ("doc", "note", "int", "str", "bool", "float) ->", "dict["):
        assert gone not in stripped, gone
    assert "size:float=2.0" in stripped  # a dataclass keeps its fields


def fake_package(tmp_path, modules: dict[str, str]):
    package = tmp_path / "trainer"
    package.mkdir()
    (package / "__init__.py").write_text(f"MODULES = {tuple(modules)!r}\n")
    for name, text in modules.items():
        (package / f"{name}.py").write_text(text)
    return package


@pytest.mark.parametrize("modules, message", [
    ({"a": "from trainer.b import g\ndef f():\n    return g()\n", "b": "def g():\n    return 1\n"},
     "a.py imports g from trainer.b: only names an earlier module defines"),
    ({"a": "def f():\n    return 1\n", "b": "def f():\n    return 2\n"}, "f is defined by both a.py and b.py"),
    ({"a": "def f():\n    return 1\n", "b": "import trainer.a\n"}, "b.py: `import trainer...` cannot be joined"),
    ({"a": "X = 1\n", "b": "from trainer.a import X as Y\n"}, "b.py imports X from trainer.a: only names"),
], ids=["later_module", "defined_twice", "module_import", "renamed"])
def test_the_joining_rules_are_enforced(tmp_path, monkeypatch, modules, message):
    monkeypatch.setattr(pack, "PACKAGE", fake_package(tmp_path, modules))
    with pytest.raises(pack.PackError, match=message):
        pack.pack_trainer()


def runs(python: str) -> bool:
    return shutil.which(python) is not None and subprocess.run([python, "-c", "pass"], capture_output=True).returncode == 0


PYTHONS = [python for python in ("python3.10", "python3.11", "python3.12", "python3.13") if runs(python)]


@pytest.mark.skipif(len(PYTHONS) < 2, reason="needs at least two of Python 3.10-3.13")
def test_every_python_packs_the_same_bytes():
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    hashes = {python: subprocess.run([python, "-c", "import sys; sys.argv[1:] = ['--hash']; "
                                      "from tools import pack; pack.main()"],
                                     capture_output=True, text=True, env=environ, cwd=ROOT).stdout for python in PYTHONS}
    assert len(set(hashes.values())) == 1 and all(hashes.values()), hashes


def test_a_traceback_from_a_packed_file_shows_source_lines_not_the_blob(tmp_path):
    script = tmp_path / "packed.py"
    script.write_text(pack.pack_program("def inner(x):\n return 1/x\ndef outer():\n return inner(0)\nouter()\n"))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 1 and "ZeroDivisionError" in result.stderr
    assert "return 1/x" in result.stderr and "packed.py (unpacked)\", line 2, in inner" in result.stderr
    assert len(result.stderr) < 1500 and "b85decode(\"" not in result.stderr


def test_a_missing_package_is_one_line_before_anything_else(tmp_path):
    (tmp_path / "brotli.py").write_text("raise ModuleNotFoundError(\"No module named 'brotli'\", name='brotli')\n")
    result = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "error: the Python package 'brotli' is not installed: pip install -r requirements.txt\n"
