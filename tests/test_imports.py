"""Import directions between stages (DESIGN §2): parse every module's imports and check the rules."""
import ast
import pathlib

from conftest import REPO

ALLOWED = {
    "core": set(),
    "models": {"core"},
    "inference": {"core", "models"},
    "data": {"core", "models", "inference"},
    "train": {"core", "models", "data", "inference"},
    "hub": {"core", "models"},
    "eval": {"core", "models", "inference", "data", "hub"},
}


def test_stage_import_directions():
    bad = []
    for stage, allowed in ALLOWED.items():
        for f in pathlib.Path(REPO, stage).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for n in names:
                    parts = n.split(".")
                    if parts[0] == "dspark" and len(parts) > 1 and parts[1] in ALLOWED:
                        if parts[1] != stage and parts[1] not in allowed:
                            bad.append(f"{f.relative_to(REPO)} imports {n}")
    assert not bad, bad
