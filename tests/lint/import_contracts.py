"""An import-linter contract type for a rule its own types cannot state: "only the standard library".

A forbidden contract lists what may not be imported; this one lists what may (the standard library of
the Python running the check, `sys.stdlib_module_names`), so a new third-party import or an import of
gpujobd itself breaks it without anyone having named it first. Registered in pyproject.toml
([tool.importlinter] contract_types); lint-imports puts the checkout on sys.path, so `tests.lint`
imports from there.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Set

from grimp import ImportGraph
from importlinter import Contract, ContractCheck, fields, output
from importlinter.domain.helpers import module_expressions_to_modules


def stdlib_names() -> Set[str]:
    names = getattr(sys, "stdlib_module_names", None)
    if names is None:
        raise RuntimeError("the stdlib_only contract needs Python 3.10 or newer (sys.stdlib_module_names)")
    return set(names)


class StdlibOnlyContract(Contract):
    """source_modules (as packages) import nothing but the standard library, directly.

    Indirect imports need no check: a module of the standard library never imports a project's module.
    """

    type_name = "stdlib_only"

    source_modules = fields.SetField(subfield=fields.ModuleExpressionField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        stdlib = stdlib_names()
        sources = module_expressions_to_modules(graph, self.source_modules, as_packages=True)  # type: ignore[arg-type]
        source_names = {module.name for module in sources}
        violations: List[Dict[str, Any]] = []
        for importer in sorted(source_names):
            for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                if imported.split(".")[0] in stdlib or imported in source_names:
                    continue
                details = graph.get_import_details(importer=importer, imported=imported)
                violations.append({"importer": importer, "imported": imported,
                                   "lines": [(d["line_number"], d["line_contents"]) for d in details]})
        return ContractCheck(kept=not violations, metadata={"violations": violations})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for violation in check.metadata["violations"]:
            output.print_error(f"{violation['importer']} imports {violation['imported']}, which is not "
                               "part of the standard library:", bold=False)
            for line_number, contents in violation["lines"]:
                output.indent_cursor()
                output.print_error(f"l.{line_number}: {contents}", bold=False)
            output.new_line()
