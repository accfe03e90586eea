"""dvc.yaml's dependency lists cannot drift from the code: every project file a stage's command
imports, directly or through any chain of imports (lazy ones inside functions too), is a
declared dependency of that stage, and no Python file is declared that the stage never imports."""
import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT
from stages.pipeline import MAIN, SWEEP, stages_of

PACKAGES = ("svdcore", "stages")  # what a stage's command can import from the project
PIPELINES = (MAIN, SWEEP)


def module_file(name: str) -> Path | None:
    """The project file of module `name` (a module or a package's __init__), or None."""
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """The absolute names of the project modules `path` imports anywhere in its body."""
    package = ".".join(path.relative_to(ROOT).parent.parts)  # what `from .x import` is relative to
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {name for name in found if name.split(".")[0] in PACKAGES and module_file(name)}


def closure(module: str) -> set[Path]:
    """Every project file importing `module` runs: its own, its packages' __init__ files, and
    the same for everything they import."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported_modules(path))
    return seen


def stages():
    """(pipeline, stage name, its root-relative deps, the module its command runs)."""
    for pipeline in PIPELINES:
        spec = stages_of(pipeline)
        base = (pipeline.parent / spec[next(iter(spec))].get("wdir", ".")).resolve()
        for name, stage in spec.items():
            wdir = (pipeline.parent / stage.get("wdir", ".")).resolve()
            assert wdir == base == ROOT, f"{pipeline.name}:{name}: commands run from the repository root"
            module = re.match(r"python -m ([\w.]+)", stage["cmd"])
            assert module, f"{pipeline.name}:{name}: expected `python -m <module> ...`, got {stage['cmd']!r}"
            deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
            yield pipeline.relative_to(ROOT).as_posix(), name, deps, module.group(1)


STAGES = list(stages())
FIX = "python tests/test_dvc_deps.py rewrites the lists"


@pytest.mark.parametrize("pipeline,name,deps,module", STAGES, ids=[f"{p}:{n}" for p, n, _, _ in STAGES])
def test_a_stage_depends_on_exactly_the_project_code_it_imports(pipeline, name, deps, module):
    code = {path.relative_to(ROOT).as_posix() for path in closure(module)}
    covered = lambda file: any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)  # noqa: E731
    missing = sorted(file for file in code if not covered(file))
    assert not missing, f"{pipeline}:{name} imports these but does not depend on them: {missing} ({FIX})"
    declared = {d for d in deps if d.endswith(".py")}
    unused = sorted(declared - code)
    assert not unused, f"{pipeline}:{name} depends on these but never imports them: {unused} ({FIX})"


def test_the_closure_follows_lazy_and_relative_imports():
    """The walk itself: a stage reaches svdcore through `from svdcore.x import` and svdcore's own
    `from .y import`, including an import inside a function."""
    files = {p.relative_to(ROOT).as_posix() for p in closure("stages.truncate_and_update")}
    assert {"stages/__init__.py", "svdcore/__init__.py", "svdcore/compress.py", "svdcore/decompose.py",
            "svdcore/errors.py"} <= files
    # svdcore/__init__.py's own relative imports run for every stage that imports svdcore
    assert "svdcore/lowrank.py" in {p.relative_to(ROOT).as_posix() for p in closure("stages.compute_spectra")}
    assert "bench/common.py" not in files and "tests/conftest.py" not in files


def rewrite_deps(pipeline: Path) -> None:
    """Replace the Python files of every stage's deps list in `pipeline` by its import closure (the
    command's module first, then stages/, then svdcore/), keeping the other entries and comments."""
    spec = {"stages": stages_of(pipeline)}
    lines, out, stage, i = pipeline.read_text().split("\n"), [], None, 0
    while i < len(lines):
        line = lines[i]
        named = re.match(r"^  ([\w-]+):\s*$", line)
        if named and named.group(1) in spec["stages"]:
            stage = named.group(1)
        out.append(line)
        i += 1
        if stage and line == "    deps:":
            kept = []
            while i < len(lines) and lines[i].startswith(("      - ", "      #")):
                if not lines[i].split("#")[0].strip().removeprefix("- ").endswith(".py"):
                    kept.append(lines[i])
                i += 1
            module = re.match(r"python -m ([\w.]+)", spec["stages"][stage]["cmd"]).group(1)
            entry = module.replace(".", "/") + ".py"
            code = sorted(p.relative_to(ROOT).as_posix() for p in closure(module))
            ordered = [entry] + [c for c in code if c.startswith("stages/") and c != entry] + \
                [c for c in code if c.startswith("svdcore/")]
            out += [f"      - {c}" for c in ordered] + kept
    pipeline.write_text("\n".join(out))


if __name__ == "__main__":
    for path in PIPELINES:
        rewrite_deps(path)
