"""Import directions between packages (docs/design.md §2).

The rules live in one place, the table "| package | folder | installed as | may import |" of
docs/design.md; this test reads that table, so the document and the check cannot drift apart. Every
Python file of every package is parsed (never imported) and each reference to a `dspark` module is
checked against the table: `import` / `from … import` statements (relative ones resolved), and any
string constant that names a module (`importlib.import_module("dspark.train.trainer")`, a dict of
runner paths, `"pkg://dspark.conf"`, `__import__(…)`). An f-string that starts with `dspark.` cannot be
resolved statically and counts as a reference to every package.
"""
import ast
import pathlib
import re
import tomllib

from conftest import REPO

DOC = pathlib.Path(REPO, "docs", "design.md")
HEADER = ["package", "folder", "installed as", "may import"]
NOT_PACKAGES = {"tests"}     # top-level folders with Python files that are not installed packages
MODULE = re.compile(r"(?:pkg://)?(dspark(?:\.[A-Za-z_]\w*)+)(?::[\w.]+)?")   # a whole string naming a module


def read_table(text: str) -> dict[str, dict]:
    """{package: {"folder", "installed", "may"}} from the design table; "may" is a set of packages."""
    rows, lines = {}, text.splitlines()
    starts = [i for i, l in enumerate(lines) if [c.strip() for c in l.strip().strip("|").split("|")] == HEADER]
    assert len(starts) == 1, f"docs/design.md needs exactly one table with the header | {' | '.join(HEADER)} |"
    for line in lines[starts[0] + 2:]:
        if not line.strip().startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, f"design table row must have 4 cells: {line!r}"
        pkg, folder, installed, may = (c.strip("`") if i < 3 else c for i, c in enumerate(cells))
        assert pkg not in rows, f"package {pkg} listed twice in the design table"
        if may in ("everything", "nothing"):
            names = may
        else:
            names = [n.strip() for n in may.split(",")]
            assert all(re.fullmatch(r"`\w+`", n) for n in names), \
                f"'may import' of {pkg} must be `everything`, `nothing` or `a`, `b`, …: {may!r}"
            names = {n.strip("`") for n in names}
        rows[pkg] = {"folder": folder, "installed": installed, "may": names}
    for pkg, row in rows.items():
        if row["may"] == "everything":
            row["may"] = set(rows)
        elif row["may"] == "nothing":
            row["may"] = set()
        unknown = row["may"] - set(rows)
        assert not unknown, f"{pkg} may import {sorted(unknown)}, which the design table does not list"
    return rows


TABLE = read_table(DOC.read_text())


def package_of(module: str, table: dict) -> str | None:
    """The package a dotted `dspark.…` module name belongs to: `dspark.models.x` → models, any other
    `dspark.x` → the package installed as `dspark` itself (cli); None for the bare namespace and
    for anything outside dspark."""
    parts = module.split(".")
    if parts[0] != "dspark" or len(parts) < 2:
        return None
    by_name = {row["installed"]: pkg for pkg, row in table.items()}
    return by_name.get(".".join(parts[:2]), by_name.get("dspark"))


def module_name(pkg: str, path: pathlib.Path) -> tuple[str, str]:
    """(module name, the package a relative import starts from) of a file of `pkg`."""
    rel = path.relative_to(pathlib.Path(REPO, TABLE[pkg]["folder"])).with_suffix("").parts
    parts = TABLE[pkg]["installed"].split(".") + list(rel)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def references(source: str, base: str):
    """(line, dotted module name or an f-string's text) of every dspark module `source` refers to."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                start = ".".join(up + ([node.module] if node.module else []))
            else:
                start = node.module
            yield node.lineno, start
            if start == "dspark" or (node.level and not node.module):
                yield from ((node.lineno, f"{start}.{a.name}") for a in node.names if a.name != "*")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = MODULE.fullmatch(node.value.strip())
            if m:
                yield node.lineno, m.group(1)
        elif isinstance(node, ast.JoinedStr) and node.values:
            head = node.values[0]
            if isinstance(head, ast.Constant) and re.match(r"(pkg://)?dspark\.", str(head.value)):
                yield node.lineno, "f-string " + ast.unparse(node)


def violations(pkg: str, source: str, base: str, where: str, table: dict = TABLE) -> list[str]:
    allowed = table[pkg]["may"] | {pkg}
    bad = []
    for line, ref in references(source, base):
        if ref.startswith("f-string "):
            if allowed != set(table):
                bad.append(f"{where}:{line} builds a dspark module name at run time ({ref[9:]}): unresolvable")
            continue
        other = package_of(ref, table)
        if other is not None and other not in allowed:
            bad.append(f"{where}:{line} ({pkg}) refers to {ref} ({other}); {pkg} may import "
                       f"{', '.join(sorted(table[pkg]['may'])) or 'nothing'}")
    return bad


def package_folders() -> set[str]:
    """Top-level folders that hold Python files (besides tests/)."""
    return {p.name + "/" for p in pathlib.Path(REPO).iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name not in NOT_PACKAGES and any(p.glob("*.py"))}


def test_design_table_lists_exactly_the_packages():
    listed = {row["folder"] for row in TABLE.values()}
    missing = sorted(f for f in listed if not pathlib.Path(REPO, f).is_dir())
    assert not missing, f"docs/design.md lists package folders that do not exist: {missing}"
    unlisted = sorted(package_folders() - listed)
    assert not unlisted, f"package folders missing from the docs/design.md table: {unlisted}"
    assert all(row["folder"] == f"{pkg}/" for pkg, row in TABLE.items()), "folder must be <package>/"
    with open(pathlib.Path(REPO, "pyproject.toml"), "rb") as f:
        dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    installed = {row["installed"]: row["folder"].rstrip("/") for row in TABLE.values()}
    assert installed == dirs, f"'installed as' column {installed} != pyproject package-dir {dirs}"


def test_import_directions():
    bad = []
    for pkg, row in TABLE.items():
        for f in sorted(pathlib.Path(REPO, row["folder"]).rglob("*.py")):
            name, base = module_name(pkg, f)
            as_pkg = "cli" if f.name == "__main__.py" else pkg   # `python -m dspark.<pkg>` entries are CLI
            bad += violations(as_pkg, f.read_text(), base, str(f.relative_to(REPO)))
    assert not bad, "imports against docs/design.md §2:\n" + "\n".join(bad)


def test_checker_sees_every_kind_of_reference():
    """The checker itself, on a made-up table and file (independent of the real rules)."""
    table = read_table("""
| package | folder | installed as | may import |
|---|---|---|---|
| `core` | `core/` | `dspark.core` | nothing |
| `train` | `train/` | `dspark.train` | `core` |
| `eval` | `eval/` | `dspark.eval` | `core` |
| `conf` | `conf/` | `dspark.conf` | nothing |
| `cli` | `cli/` | `dspark` | everything |
""")
    src = '''"""Docstring prose such as `accelerate launch -m dspark.train` is not a reference."""
import importlib
from dspark.core.errors import DSparkError
import dspark.train
from dspark.train.trainer import run
from dspark import train, guard
from ..train import losses
from .. import train as t
RUNNERS = {"train": "dspark.train.trainer", "cls": "dspark.train.sweep:SweepSummary"}
m = importlib.import_module("dspark.train.trainer")
c = "pkg://dspark.conf"
d = importlib.import_module(f"dspark.{name}")
'''
    bad = violations("eval", src, "dspark.eval", "x.py", table)
    assert not violations("cli", src, "dspark", "x.py", table)
    lines = sorted(int(b.split(":")[1].split()[0]) for b in bad)
    assert lines == [4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12], bad
