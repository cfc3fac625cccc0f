"""tests/lint/import_contracts.py: the stdlib_only contract type that `make lint` uses for the supervisor."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict

import pytest

# Lint tools (the test extra): a distribution's package build runs these unit tests without them.
grimp = pytest.importorskip("grimp")
pytest.importorskip("importlinter")

from tests.lint.import_contracts import StdlibOnlyContract  # noqa: E402


def _check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modules: Dict[str, str]) -> Dict[str, object]:
    package = tmp_path / "stdlibonlypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, source in modules.items():
        (package / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("stdlibonlypkg", include_external_packages=True, cache_dir=None)
    contract = StdlibOnlyContract(name="test", session_options={"include_external_packages": "True"},
                                  contract_options={"source_modules": ["stdlibonlypkg.runner"]})
    check = contract.check(graph, verbose=False)
    return {"kept": check.kept, "imported": sorted(v["imported"] for v in check.metadata["violations"])}


def test_standard_library_imports_keep_the_contract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _check(tmp_path, monkeypatch, {
        "runner": "from __future__ import annotations\nimport json, os\nfrom collections import deque\n",
        "other": "import pytest\n",  # not a source module: not the contract's business
    })
    assert result == {"kept": True, "imported": []}


def test_third_party_and_project_imports_break_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "pytest" not in sys.stdlib_module_names
    result = _check(tmp_path, monkeypatch, {
        "runner": "import os\nimport pytest\nfrom stdlibonlypkg import other\n",
        "other": "",
    })
    assert result == {"kept": False, "imported": ["pytest", "stdlibonlypkg.other"]}
