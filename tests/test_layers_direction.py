"""Imports point one way through ivl's parts, and no modules import each other while loading.

Read from the source (ast), so every module counts, the GPU-only ones included: kernels <- model <- data <-
teachers <- stages/callbacks <- serve <- what users run. An import inside a function is held to the direction too,
except the few named in ``DEFERRED_AGAINST`` with their reason; a cycle is looked for among the imports that run
when a module loads (not those inside functions or under ``TYPE_CHECKING``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"ivl": ROOT / "ivl", "ivl.kernels": ROOT / "kernels", "ivl.callbacks": ROOT / "callbacks"}

TIERS = [
    {"ivl", "ivl.errors", "ivl.cpu_threads", "ivl.cuda_allocator"},
    {"ivl.kernels"},
    {"ivl.model"},
    {"ivl.data"},
    {"ivl.teachers"},
    {"ivl.stages", "ivl.callbacks"},
    {"ivl.serve"},
    {"ivl.evaluate", "ivl.experiments", "ivl.bench", "ivl.convert", "lightning_app"},
]
"""Each part may import the parts of its own tier and of the tiers above it in this list."""

DEFERRED_AGAINST = {
    (
        "ivl.model.checkpoint",
        "ivl.data.processing",
    ): "InfiniteVL.save_pretrained writes the tokenizer and processor files beside the weights",
}
"""Imports against the direction, allowed inside a function only: (importer, imported) -> why."""


def modules() -> dict[str, Path]:
    found = {"lightning_app": ROOT / "lightning_app.py"}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = modules()


def part(module: str) -> str:
    """The part of ivl a module belongs to: ivl.model.mixers.gla -> ivl.model."""
    if module in ("ivl", "lightning_app"):
        return module
    return ".".join(module.split(".")[:2])


def rank(module: str) -> int:
    return next(i for i, tier in enumerate(TIERS) if part(module) in tier)


class Imports(ast.NodeVisitor):
    """(imported module, at load time) for every import of ivl's modules in one module."""

    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package = module, is_package
        self.found: list[tuple[str, bool]] = []
        self.deferred = 0  # inside a function or under TYPE_CHECKING

    def visit_FunctionDef(self, node):
        self.deferred += 1
        self.generic_visit(node)
        self.deferred -= 1

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_If(self, node):
        type_checking = isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        self.deferred += type_checking
        for child in node.body:
            self.visit(child)
        self.deferred -= type_checking
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node):
        for alias in node.names:
            self.add(alias.name)

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:  # relative: from the module's own package
            package = self.module.split(".")
            package = package if self.is_package else package[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self.add(submodule if submodule in MODULES else base)

    def add(self, name: str) -> None:
        if name in MODULES:
            self.found.append((name, self.deferred == 0))


def imports_of(module: str) -> list[tuple[str, bool]]:
    path = MODULES[module]
    visitor = Imports(module, path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(), str(path)))
    return visitor.found


IMPORTS = {module: imports_of(module) for module in MODULES}


def test_every_part_has_a_tier():
    assert {part(m) for m in MODULES} <= set().union(*TIERS)


def test_imports_point_down_the_tiers():
    against = []
    for module, found in IMPORTS.items():
        for imported, at_load in found:
            if rank(imported) <= rank(module):
                continue
            if at_load or (module, imported) not in DEFERRED_AGAINST:
                against.append(f"{module} imports {imported}" + ("" if at_load else " (in a function)"))
    assert not against, "imports against the direction:\n" + "\n".join(sorted(set(against)))


def test_the_model_never_imports_lightning_or_torch_distributed():
    for module, path in MODULES.items():
        if part(module) in ("ivl.model", "ivl.kernels"):
            tree = ast.parse(path.read_text())
            names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
            names += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
            assert not [
                n
                for n in names
                if n.split(".")[0] in ("lightning", "pytorch_lightning") or n.startswith("torch.distributed")
            ], module


def test_no_modules_import_each_other_while_loading():
    graph = {m: sorted({i for i, at_load in found if at_load and i != m}) for m, found in IMPORTS.items()}
    done, path, cycles = set(), [], []

    def visit(module):
        if module in path:
            cycles.append(" -> ".join(path[path.index(module) :] + [module]))
            return
        if module in done:
            return
        path.append(module)
        for imported in graph[module]:
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_the_imports_it_judges():
    """A check that found no imports would pass whatever the code did."""
    model = dict(IMPORTS["ivl.model.vlm"])
    assert model["ivl.model.checkpoint"] and model["ivl.model.training.losses"]
    assert ("ivl.data.processing", False) in IMPORTS["ivl.model.checkpoint"]
    assert ("ivl.model.config", False) in IMPORTS["ivl.model.mixers.base"]  # under TYPE_CHECKING
    assert sum(len(found) for found in IMPORTS.values()) > 300
