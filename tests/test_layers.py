"""The package's layers: imports go one way (model <- data <- evaluation <- train <- commands), no cycles,
and the model library (with the API and export loading) works without Lightning imported."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fineregion_pl"
LAYERS = ["model", "data", "evaluation", "train", "commands"]  # each may import only the ones before it
LEAVES = {"fineregion_pl", "fineregion_pl._moved", "fineregion_pl.lightning_private", "fineregion_pl.api"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every ``fineregion_pl`` module a file imports, at any depth of the file (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fineregion_pl"):
            submodules = [f"{node.module}.{a.name}" for a in node.names if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").is_file()]
            found.update(submodules or [node.module])
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("fineregion_pl"))
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_imports_go_one_way():
    wrong = []
    for module, imported in import_graph().items():
        own = layer(module)
        for target in imported:
            theirs = layer(target)
            if own is not None and theirs is not None and theirs > own:
                wrong.append(f"{module} ({LAYERS[own]}) imports {target} ({LAYERS[theirs]})")
            if own is not None and theirs is None and target not in LEAVES:
                wrong.append(f"{module} imports {target}, which belongs to no layer")
    assert not wrong, "\n".join(wrong)


def test_the_leaf_modules_import_no_layer():
    graph = import_graph()
    for leaf in ("fineregion_pl.lightning_private", "fineregion_pl._moved"):
        assert not graph[leaf], graph[leaf]
    assert graph["fineregion_pl.api"] <= {"fineregion_pl.model.captioner"}


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in graph:
                continue
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_nothing_imports_the_verb_table():
    importers = [m for m, imported in import_graph().items() if "fineregion_pl.commands.cli" in imported and m != "fineregion_pl.__main__"]
    assert not importers


def run_python(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_model_library_imports_without_lightning():
    out = run_python(
        "import json, sys, fineregion_pl.model, fineregion_pl.model.captioner, fineregion_pl.api, fineregion_pl.model.transforms;"
        "print(json.dumps({'lightning': sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))}))"
    )
    assert out["lightning"] == []


@pytest.mark.slow
def test_describe_through_the_api_and_load_an_export_without_lightning(stage2_checkpoint, tmp_path):
    from fineregion_pl.commands.export import export

    exported = export(ckpt_path=str(stage2_checkpoint), out=str(tmp_path / "export"))
    code = f"""
import json, sys
from PIL import Image
from fineregion_pl.api import RegionCaptioner
image = Image.new("RGB", (64, 48), "white")
boxes = [[2, 2, 30, 30], [20, 10, 60, 40]]
a = RegionCaptioner.from_checkpoint({str(stage2_checkpoint)!r}).describe(image, boxes)
b = RegionCaptioner.from_pretrained({str(exported)!r}).describe(image, boxes)
print(json.dumps({{"a": a, "b": b, "lightning": [m for m in sys.modules if m.startswith(("lightning", "pytorch_lightning"))]}}))
"""
    out = run_python(code)
    assert out["lightning"] == []
    assert [r["region_id"] for r in out["a"]] == [0, 1] and all(isinstance(r["caption"], str) for r in out["a"])
    assert out["a"] == out["b"]  # the export describes exactly as the checkpoint does
