"""Imports point one way: features <- recommender <- training (DESIGN.md, "The shape").

Also: only ``recommender/service.py`` imports ``bentoml``; only ``training/`` imports
``mlflow``. Every ``import``/``from … import`` is checked wherever it sits (module level, inside
functions, under ``if TYPE_CHECKING``), relative imports are resolved, and
``importlib.import_module("…")`` / ``__import__("…")`` with a literal name count too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("features", "recommender", "training")

# package -> top-level packages it must never import
LAYER_BANS = {
    "features": {"recommender", "training"},
    "recommender": {"training"},
}
BENTOML_HOME = "recommender/service.py"
MLFLOW_HOME = "training"


def _module_package(rel: Path) -> list[str]:
    """Dotted package parts a file's relative imports are resolved against."""
    return list(rel.parent.parts)


def _imports(path: Path, rel: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute dotted module) for every import in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))
    package = _module_package(rel)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield node.lineno, module
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if (
                name in ("import_module", "__import__")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                yield node.lineno, first.value


def import_violations(root: Path) -> tuple[list[str], int]:
    """Every forbidden import under ``root``'s packages, as 'file:line: …', and the file count."""
    problems: list[str] = []
    n_files = 0
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            n_files += 1
            try:
                found = list(_imports(path, rel))
            except SyntaxError as err:
                problems.append(f"{rel.as_posix()}:{err.lineno}: cannot be parsed ({err.msg})")
                continue
            for line, module in found:
                top = module.split(".")[0]
                where = f"{rel.as_posix()}:{line}: imports {module!r}"
                if top in LAYER_BANS.get(package, ()):
                    problems.append(f"{where}, but {package} sits below {top}")
                if top == "bentoml" and rel.as_posix() != BENTOML_HOME:
                    problems.append(f"{where}; only {BENTOML_HOME} may import bentoml")
                if top == "mlflow" and package != MLFLOW_HOME:
                    problems.append(f"{where}; only {MLFLOW_HOME}/ may import mlflow")
    return problems, n_files


def test_imports_point_one_way():
    problems, n_files = import_violations(REPO)
    assert n_files >= 5, f"the walker found only {n_files} files under {REPO}"
    assert not problems, "import rules broken (DESIGN.md):\n" + "\n".join(problems)


def test_walker_sees_this_repository():
    rels = set()
    for package in PACKAGES:
        rels |= {p.relative_to(REPO).as_posix() for p in (REPO / package).rglob("*.py")}
    assert "features/validate.py" in rels
    assert "training/cli.py" in rels


# --- the walker itself catches what it should ----------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    for package in PACKAGES:
        (root / package).mkdir(exist_ok=True)
    return root


BAD_TREE = {
    "features/__init__.py": "",
    "features/up.py": "import numpy\n\n\ndef f():\n    from recommender import model\n",
    "features/sub/__init__.py": "",
    "features/sub/rel.py": "from ...training.cli import main\n",
    "features/dyn.py": "import importlib\nimportlib.import_module('training.cli')\n",
    "features/serve.py": "import bentoml\n",
    "recommender/__init__.py": "from . import model\n",
    "recommender/model.py": "from features import catalog\nimport training.cli as cli\n",
    "recommender/rel.py": "from ..training import fit\n",
    "recommender/service.py": "import bentoml\nfrom bentoml.io import JSON\n",
    "recommender/track.py": "if True:\n    import mlflow.sklearn\n",
    "training/__init__.py": "",
    "training/pipeline.py": "import mlflow\nimport bentoml\nfrom recommender import model\n",
}

EXPECTED = {
    "features/up.py:5: imports 'recommender'",
    "features/sub/rel.py:1: imports 'training.cli'",
    "features/dyn.py:2: imports 'training.cli'",
    "features/serve.py:1: imports 'bentoml'",
    "recommender/model.py:2: imports 'training.cli'",
    "recommender/rel.py:1: imports 'training'",
    "recommender/track.py:2: imports 'mlflow.sklearn'",
    "training/pipeline.py:2: imports 'bentoml'",
}


def test_walker_detects_violations(tmp_path):
    problems, n_files = import_violations(_tree(tmp_path, BAD_TREE))
    assert n_files == len(BAD_TREE)
    found = {p.split(",")[0].split(";")[0] for p in problems}
    assert found == EXPECTED
    assert len(problems) == len(EXPECTED)


CLEAN_TREE = {
    "features/__init__.py": "",
    "features/validate.py": "import numpy\nfrom features.catalog import parse_plan\n",
    "recommender/model.py": "from features import catalog\nfrom . import ranking\n",
    "recommender/service.py": "import bentoml\nfrom bentoml.io import JSON\n",
    "training/pipeline.py": "import mlflow\nfrom recommender import model\nimport features\n",
    "training/register.py": "def f():\n    import mlflow.pyfunc\n",
}


def test_walker_passes_a_clean_tree(tmp_path):
    problems, n_files = import_violations(_tree(tmp_path, CLEAN_TREE))
    assert n_files == len(CLEAN_TREE)
    assert problems == []


def test_walker_reports_unparsable_files(tmp_path):
    problems, _ = import_violations(_tree(tmp_path, {"features/broken.py": "def (:\n"}))
    assert len(problems) == 1 and problems[0].startswith("features/broken.py:1: cannot be parsed")


@pytest.mark.parametrize(
    ("rel", "source", "module"),
    [
        ("recommender/a.py", "from . import b", "recommender"),
        ("recommender/a.py", "from .b import c", "recommender.b"),
        ("recommender/x/a.py", "from ..b import c", "recommender.b"),
        ("recommender/__init__.py", "from .b import c", "recommender.b"),
        ("features/a.py", "__import__('mlflow')", "mlflow"),
    ],
)
def test_relative_and_dynamic_imports_are_resolved(tmp_path, rel, source, module):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source, encoding="utf-8")
    assert [m for _, m in _imports(path, Path(rel))] == [module]
