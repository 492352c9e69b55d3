"""The import contract between the packages, read from the source (no imports executed).

Layers, lowest first; a package may import only itself and the packages it lists:

    identity             content fingerprints; nothing of the project, no torch at import
    dataprocess          raw corpora -> records; no torch, nothing else of the project at import
    qwen, visual         the LLM and the vision towers
    dataset              dataprocess, qwen
    model                qwen, visual (the network and its checkpoint format; never dataset/)
    runtime              everything above (the run layer: training, inference, applications)

Every package may also import `identity`. Imports under `if TYPE_CHECKING:` serve annotations only and are not counted. The
`dataprocess` subcommands that need the model stack (`stats`, `features`) import it inside the
function that runs them, so importing `dataprocess` never imports torch; those deferred imports
may reach qwen, visual and dataset, never model or runtime.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("identity", "dataprocess", "dataset", "visual", "qwen", "model", "runtime")
ALLOWED = {
    "identity": {"identity"},
    "dataprocess": {"dataprocess", "identity"},
    "qwen": {"qwen", "identity"},
    "visual": {"visual", "identity"},
    "dataset": {"dataset", "dataprocess", "qwen", "identity"},
    "model": {"model", "qwen", "visual", "identity"},
    "runtime": set(PROJECT),
}
NO_TORCH = ("identity", "dataprocess")  # importable anywhere without loading the model stack
DEFERRED_ALLOWED = {**ALLOWED, "dataprocess": {"dataprocess", "qwen", "visual", "dataset"}}
MODEL_STACK = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "open_clip")
# The merge command's first name: `python -m model.merge` runs `runtime.merge` (documented there).
EXCEPTIONS = {("model/merge.py", "runtime")}


def _imports(tree: ast.Module):
    """(top-level module name, at import time?) for every import statement."""
    deferred_nodes, type_only = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            deferred_nodes.update(id(n) for n in ast.walk(node) if n is not node)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            type_only.update(id(n) for n in ast.walk(node))  # annotations only, never run
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            yield name.split(".")[0], id(node) not in deferred_nodes


def violations(root: Path) -> list[str]:
    """Every import that breaks the contract, as 'file: imports X' lines."""
    found = []
    for package in PROJECT:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=relative)
            for name, at_import in _imports(tree):
                allowed = ALLOWED[package] if at_import else DEFERRED_ALLOWED[package]
                when = "at import" if at_import else "in a function"
                if name in PROJECT and name not in allowed and (relative, name) not in EXCEPTIONS:
                    found.append(f"{relative}: imports {name} {when}")
                if package in NO_TORCH and at_import and name in MODEL_STACK:
                    found.append(f"{relative}: imports {name} at import ({package} has no torch)")
    return found


def test_the_packages_keep_their_layers():
    assert violations(ROOT) == []


def test_a_planted_violation_is_caught(tmp_path):
    for package in PROJECT:
        (tmp_path / package).mkdir()
    (tmp_path / "model" / "vlm.py").write_text("import qwen\nfrom dataset.collator import X\n")
    (tmp_path / "dataprocess" / "build.py").write_text(
        "import json\nimport torch\n\ndef stats():\n    from model import builder\n"
    )
    (tmp_path / "qwen" / "chat.py").write_text("from runtime.inference import InferenceSession\n")
    (tmp_path / "dataset" / "ok.py").write_text("from qwen import QWenTokenizer\n")
    (tmp_path / "identity" / "digest.py").write_text("import torch\nfrom visual import tower\n")
    assert violations(tmp_path) == [
        "identity/digest.py: imports torch at import (identity has no torch)",
        "identity/digest.py: imports visual at import",
        "dataprocess/build.py: imports torch at import (dataprocess has no torch)",
        "dataprocess/build.py: imports model in a function",
        "qwen/chat.py: imports runtime at import",
        "model/vlm.py: imports dataset at import",
    ]


def test_importing_dataprocess_or_identity_does_not_import_torch():
    import subprocess
    import sys

    modules = sorted(
        p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
        for package in NO_TORCH
        for p in (ROOT / package).rglob("*.py")
    )
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules)
    code += f"print(sorted(m for m in sys.modules if m.split('.')[0] in {MODEL_STACK!r}))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
