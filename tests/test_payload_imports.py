"""The payload folder (hf_longclip/models/) is what `save_pretrained` copies next to the weights for
``trust_remote_code`` loading: its files may import only torch, transformers (plus huggingface_hub, whose ``@strict``
transformers' own configurations use), the standard library and siblings of that folder."""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest

PAYLOAD = Path(__file__).resolve().parents[1] / "hf_longclip" / "models"
ALLOWED_PACKAGES = {"torch", "transformers", "huggingface_hub"}


def payload_import_violations(folder: Path) -> list[str]:
    """Every import in `folder`'s Python files that a saved model could not resolve without hf_longclip installed."""
    siblings = {path.stem for path in folder.glob("*.py")}
    allowed = ALLOWED_PACKAGES | set(sys.stdlib_module_names)
    violations = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
                bad = [name for name in names if name.split(".")[0] not in allowed]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    bad = [] if (node.module or "").split(".")[0] in allowed else [node.module]
                elif node.level == 1:
                    targets = [node.module] if node.module else [alias.name for alias in node.names]
                    bad = ["." + t for t in targets if t.split(".")[0] not in siblings]
                else:
                    bad = ["." * node.level + (node.module or "")]
            else:
                continue
            violations += [f"{path.name}:{node.lineno} imports {name}" for name in bad]
    return violations


def test_payload_files_import_only_torch_transformers_stdlib_and_siblings():
    assert len(list(PAYLOAD.glob("modeling_*.py"))) >= 5
    assert payload_import_violations(PAYLOAD) == []


@pytest.mark.parametrize(
    "line, reported",
    [
        ("from hf_longclip.cli import main", "imports hf_longclip.cli"),
        ("import hf_longclip.data", "imports hf_longclip.data"),
        ("from ..cli import main", "imports ..cli"),
        ("from .helpers_not_here import x", "imports .helpers_not_here"),
        ("import numpy", "imports numpy"),
    ],
)
def test_the_rule_catches_a_payload_file_importing_outside(tmp_path, line, reported):
    folder = tmp_path / "models"
    shutil.copytree(PAYLOAD, folder, ignore=shutil.ignore_patterns("__pycache__"))
    target = folder / "modeling_finelip.py"
    target.write_text(target.read_text(encoding="utf-8") + f"\n{line}\n", encoding="utf-8")
    violations = payload_import_violations(folder)
    assert len(violations) == 1 and violations[0].startswith("modeling_finelip.py:") and reported in violations[0]
