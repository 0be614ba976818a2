"""Pack the readable trainer (src/trainer/) into the one shipped train_gpt.py, and keep the
README's settings table in step with the settings.

    python tools/pack.py           # write train_gpt.py and the README's settings table
    python tools/pack.py --check   # exit 1 when either is stale
    python tools/pack.py --hash    # print the shipped file's sha256 and size

Joining: the modules are read in the package's reading order (trainer.MODULES). Each may
import only names that an earlier module defines (checked here, which is what makes the
order hold); those imports are dropped and the modules' own imports gathered at the top,
the third-party ones behind one line that names a missing package. Stripping: comments,
docstrings, and the annotations of functions and of their variables go (dataclass fields
keep theirs); every logical line becomes one line with minimal spaces. The strip works on
the tokens of the source, so the shipped bytes are the same on every Python from 3.10 to
3.13. Packing: LZMA2, base85, and three lines that unpack, register the unpacked text for
tracebacks and run it. Standard library only: this runs on a Python without torch.
"""

from __future__ import annotations

import argparse
import ast
import base64
import bisect
import hashlib
import io
import lzma
import sys
import tokenize

from tools import ROOT
from trainer.files import write_atomic
from trainer.settings import RunError

PACKAGE = ROOT / "src" / "trainer"
SHIPPED = ROOT / "train_gpt.py"
README = ROOT / "README.md"
TABLE_START, TABLE_END = "<!-- settings table: written by tools/pack.py -->", "<!-- end of settings table -->"
HEADER = "import lzma as L,base64 as B,linecache as C,sys,traceback as T\n"
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "pb": 0}]  # text has no 4-byte alignment


class PackError(ValueError):
    """The readable source breaks a rule the shipped file relies on."""


# ---------------------------------------------------------------------------------------
# Stripping one module
# ---------------------------------------------------------------------------------------

def docstring_of(node: ast.AST) -> ast.Expr | None:
    body = getattr(node, "body", None)
    if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0]
    return None


def spans_to_strip(tree: ast.Module) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """(spans dropped outright, annotation spans whose ':' or '->' goes too, spans replaced
    by `pass`), each ((line, col), (end_line, end_col)) as tokenize counts them."""
    def span(node: ast.AST) -> tuple:
        return (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset)

    dropped, annotations, to_pass = [], [], []
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and docstring_of(node):
            (to_pass if len(node.body) == 1 and not isinstance(node, ast.Module) else dropped).append(span(node.body[0]))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            for argument in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg, arguments.kwarg]:
                if argument is not None and argument.annotation is not None:
                    annotations.append(span(argument.annotation))
            if node.returns is not None:
                annotations.append(span(node.returns))
            for inner in ast.walk(node):  # `x: T = v` inside a function is just `x = v`
                if isinstance(inner, ast.AnnAssign) and inner.value is not None:
                    annotations.append(span(inner.annotation))
    for node in tree.body:  # and at module level too (only a class's fields need theirs)
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            annotations.append(span(node.annotation))
    dropped += [span(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    return dropped, annotations, to_pass


def token_text(tokens: list[tokenize.TokenInfo], index: int, lines: list[str]) -> tuple[str, int]:
    """The source text of the token at `index` and the index after it; an f-string that
    Python 3.12+ splits into pieces comes back whole, as older Pythons give it."""
    token = tokens[index]
    if tokenize.tok_name[token.type] != "FSTRING_START":
        return token.string, index + 1
    depth, end = 0, index
    while True:
        name = tokenize.tok_name[tokens[end].type]
        depth += {"FSTRING_START": 1, "FSTRING_END": -1}.get(name, 0)
        if depth == 0:
            break
        end += 1
    (row, col), (end_row, end_col) = token.start, tokens[end].end
    text = lines[row - 1][col:] + "".join(lines[row:end_row - 1]) + lines[end_row - 1][:end_col] if end_row > row \
        else lines[row - 1][col:end_col]
    return text, end + 1


class Spans:
    """Source spans that never overlap (docstrings, annotations, imports), sorted once so
    that finding the one holding a position is a binary search: stripping stays linear in
    the module's size (mutmut's copies of the modules are some 30 times longer)."""

    def __init__(self, spans: list[tuple]):
        self.spans = sorted(spans)
        self.starts = [span[0] for span in self.spans]

    def holding(self, position: tuple[int, int]) -> tuple | None:
        index = bisect.bisect_right(self.starts, position) - 1
        return self.spans[index] if index >= 0 and position < self.spans[index][1] else None


def strip(source: str) -> str:
    """The module as one line per logical line, with minimal spaces and one space per
    indent level, without comments, docstrings, top-level imports or function annotations."""
    dropped, annotations, to_pass = spans_to_strip(ast.parse(source))
    skipped, annotations, to_pass = Spans(dropped + annotations), Spans(annotations), Spans(to_pass)
    lines = source.splitlines(keepends=True)
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    output, current, depth, index, passed = [], [], 0, 0, set()
    while index < len(tokens):
        token = tokens[index]
        name = tokenize.tok_name[token.type]
        if name in ("INDENT", "DEDENT"):
            depth += 1 if name == "INDENT" else -1
            index += 1
            continue
        if name == "NEWLINE":
            if current:
                output.append(" " * depth + "".join(current))
            current, index = [], index + 1
            continue
        if name in ("NL", "COMMENT", "ENCODING", "ENDMARKER") or skipped.holding(token.start):
            index += 1
            continue
        if (span := to_pass.holding(token.start)) is not None:
            if span not in passed:
                passed.add(span)
                current.append("pass")
            index += 1
            continue
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if token.string in (":", "->") and following is not None and annotations.holding(following.start):
            index += 1
            continue
        text, index = token_text(tokens, index, lines)
        if current and (current[-1][-1].isalnum() or current[-1][-1] == "_") and (text[0].isalnum() or text[0] == "_"):
            current.append(" ")
        current.append(text)
    return "\n".join(output) + "\n"


# ---------------------------------------------------------------------------------------
# Joining the modules
# ---------------------------------------------------------------------------------------

def reading_order() -> list[str]:
    """trainer.MODULES, read from the package's __init__.py without importing it."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["MODULES"]:
            return list(ast.literal_eval(node.value))
    raise PackError(f"{PACKAGE / '__init__.py'}: no MODULES tuple")


def defined_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        for target in node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []:
            names.update(t.id for t in ast.walk(target) if isinstance(t, ast.Name))
    return names


def imported(node: ast.Import | ast.ImportFrom) -> list[tuple[str, str]]:
    """(module, `name [as alias]`) per name; module "" for plain `import x`."""
    return [("" if isinstance(node, ast.Import) else node.module, a.name + (f" as {a.asname}" if a.asname else ""))
            for a in node.names]


def import_lines(names: set[tuple[str, str]]) -> list[str]:
    """One `import a,b` line and one `from m import x,y` line per module."""
    plain = sorted(name for module, name in names if not module)
    lines = [f"import {','.join(plain)}"] if plain else []
    for module in sorted({module for module, _ in names if module}):
        lines.append(f"from {module} import {','.join(sorted(n for m, n in names if m == module))}")
    return lines


def gather(sources: dict[str, str]) -> tuple[list[str], list[str]]:
    """Check that each module imports only names earlier modules define and that no name is
    defined twice; returns the standard-library and the third-party import lines."""
    defined: dict[str, str] = {}
    stdlib, third_party = set(), set()
    for module, source in sources.items():
        tree = ast.parse(source)
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "trainer":
                for alias in node.names:
                    if defined.get(alias.name) != node.module.removeprefix("trainer.") or alias.asname:
                        raise PackError(f"{module}.py imports {alias.name} from {node.module}: only names an earlier "
                                        "module defines may be imported, under their own name")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                top = node.names[0].name if isinstance(node, ast.Import) else node.module
                if top.split(".")[0] == "trainer":
                    raise PackError(f"{module}.py: `import trainer...` cannot be joined; use `from trainer.x import name`")
                (stdlib if top.split(".")[0] in sys.stdlib_module_names else third_party).update(imported(node))
        for name in defined_names(tree):
            if name in defined:
                raise PackError(f"{name} is defined by both {defined[name]}.py and {module}.py")
            defined[name] = module
    return import_lines(stdlib), import_lines(third_party)


def source_digest(sources: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"# {module}.py\n{text}" for module, text in sources.items()).encode()).hexdigest()


def join_trainer(sources: dict[str, str]) -> str:
    """The one program the shipped file runs."""
    stdlib, third_party = gather(sources)
    first, *rest = sources
    parts = ["from __future__ import annotations", *stdlib, strip(sources[first]).rstrip("\n"),
             "try:", *(" " + line for line in third_party),
             "except ModuleNotFoundError as missing:", " sys.exit(missing_package(missing.name))"]
    parts += [strip(sources[module]).rstrip("\n") for module in rest]
    parts.append('if __name__=="__main__":sys.exit(run_cli(sys.argv[1:]))')
    program = "\n".join(parts) + "\n"
    if program.count('SOURCE_SHA256=""') != 1:
        raise PackError('the source must assign SOURCE_SHA256 = "" exactly once (the pack step fills it in)')
    return program.replace('SOURCE_SHA256=""', f'SOURCE_SHA256="{source_digest(sources)}"')


def pack_program(program: str) -> str:
    """The three-line self-extracting form of a program."""
    payload = lzma.compress(program.encode(), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    encoded = base64.b85encode(payload).decode("ascii")  # base85 has no quote or backslash
    return (HEADER + f'S=L.decompress(B.b85decode("{encoded}"),format=L.FORMAT_RAW,filters=[{{"id":L.FILTER_LZMA2}}]).decode()\n'
            'N=__file__+" (unpacked)";C.cache[N]=(len(S),None,S.splitlines(True),N);sys.excepthook=T.print_exception;'
            'exec(compile(S,N,"exec"))\n')


def unpack_program(packed: str) -> str:
    """The program a packed file runs."""
    encoded = packed.split('B.b85decode("', 1)[1].split('")', 1)[0]
    return lzma.decompress(base64.b85decode(encoded), format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]).decode()


def pack_trainer() -> tuple[str, str]:
    """(the readable source's sha256, the shipped file's text) of src/trainer/ as it is now."""
    sources = {module: (PACKAGE / f"{module}.py").read_text(encoding="utf-8") for module in reading_order()}
    return source_digest(sources), pack_program(join_trainer(sources))


# ---------------------------------------------------------------------------------------
# The README's settings table
# ---------------------------------------------------------------------------------------

def settings_markdown() -> str:
    from trainer.settings import PROFILES, settings_table  # standard library only

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = [f"| variable | {' | '.join(f'`{name}`' for name in PROFILES)} | allowed | meaning |",
            "| --- |" + " --- |" * (len(PROFILES) + 2)]
    rows += [f"| `{variable}` | {' | '.join(f'`{cell(v)}`' for v in values)} | {cell(allowed)} | {cell(meaning)} |"
             for variable, *values, allowed, meaning in settings_table()]
    return "\n".join(rows)


def readme_with_table(readme: str) -> str:
    if readme.count(TABLE_START) != 1 or readme.count(TABLE_END) != 1:
        raise PackError(f"{README.name}: needs one '{TABLE_START}' line and one '{TABLE_END}' line")
    before, rest = readme.split(TABLE_START)
    _, after = rest.split(TABLE_END)
    return f"{before}{TABLE_START}\n{settings_markdown()}\n{TABLE_END}{after}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that train_gpt.py and the README are fresh")
    parser.add_argument("--hash", action="store_true", help="print the shipped file's sha256 and size, write nothing")
    args = parser.parse_args(argv)
    try:
        source_sha256, packed = pack_trainer()
        if args.hash:
            print(f"{hashlib.sha256(packed.encode()).hexdigest()} {len(packed.encode())}")
            return 0
        readme = README.read_text(encoding="utf-8")
        fresh = {SHIPPED: packed, README: readme_with_table(readme)}
    except (PackError, SyntaxError, OSError, RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        stale = [path.name for path, text in fresh.items() if not path.exists() or path.read_text(encoding="utf-8") != text]
        if stale:
            print(f"stale: {', '.join(stale)}: run python tools/pack.py and commit", file=sys.stderr)
            return 1
        print(f"{SHIPPED.name} is fresh ({len(packed.encode())} bytes); the README's settings table too")
        return 0
    for path, text in fresh.items():
        write_atomic(path, text.encode())
    print(f"wrote {SHIPPED.name}: {len(packed.encode())} shipped bytes (source {source_sha256[:16]}); README settings table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
