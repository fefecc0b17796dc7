"""What a new user installs: the README's test command is the one CI runs, and constraints.txt pins every declared
requirement at a version its range allows (a range widened or a dependency added without recompiling it fails here)."""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _readme_test_command() -> str:
    (line,) = [line for line in (ROOT / "README.md").read_text().splitlines()
               if line.startswith("pip install") and line.split("#")[0].rstrip().endswith("python -m pytest")]
    return line.split("#")[0].strip()


def _pins() -> dict[str, str]:
    """constraints.txt's `name==version` lines whose markers hold on this interpreter."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith(("#", " ")):
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate():
                (specifier,) = requirement.specifier
                pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def test_ci_runs_the_readmes_test_command():
    ci_commands = [re.sub(r" -q\b", "", line) for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert any(_readme_test_command() in line for line in ci_commands)
    assert "-c constraints.txt" in _readme_test_command()


def _declared(extras=("optimize", "test", "docs")) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [line for extra in extras for line in project["optional-dependencies"][extra]]
    return [requirement for requirement in map(Requirement, lines) if canonicalize_name(requirement.name) != "skin-ray"]


@pytest.mark.parametrize("requirement", [requirement for requirement in _declared()  # those that apply here
                                         if requirement.marker is None or requirement.marker.evaluate({"extra": "test"})],
                         ids=str)
def test_constraints_pin_every_declared_requirement_within_its_range(requirement):
    pinned = _pins().get(canonicalize_name(requirement.name))
    assert pinned is not None, f"{requirement.name} is not in constraints.txt: recompile it (its first lines say how)"
    assert requirement.specifier.contains(pinned, prereleases=True), f"{requirement.name}=={pinned} is outside {requirement}"


def _imported_modules(folder: Path) -> set[str]:
    """The top-level modules that the Python files under `folder` import, the standard library's and its own left out."""
    import ast
    import sys

    imported = set()
    # skin_ray/testing.py holds the tests' and benchmarks' helpers and needs the test extra; nothing shipped imports it.
    for path in (path for path in folder.rglob("*.py") if path.relative_to(ROOT).as_posix() != "skin_ray/testing.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    own = {path.stem for path in folder.rglob("*.py")} | {"skin_ray"}
    return imported - own - set(sys.stdlib_module_names)


@pytest.mark.parametrize("folder, extras", [("skin_ray", ("optimize",)), ("tests", ("optimize", "test"))])
def test_every_module_imported_is_declared(folder, extras):
    """A module imported only because a declared package happens to pull it in breaks when that package stops
    pulling it: the README's command on a fresh machine then fails where CI, with older installs, passed."""
    from importlib.metadata import packages_distributions

    declared = {canonicalize_name(requirement.name) for requirement in _declared(extras)} | {"kserve"}  # --no-deps
    distributions = packages_distributions()
    undeclared = {module: distributions.get(module) for module in _imported_modules(ROOT / folder)
                  if not declared & {canonicalize_name(name) for name in distributions.get(module, [])}}
    assert not undeclared, f"imported under {folder}/, not declared in pyproject.toml: {undeclared}"
