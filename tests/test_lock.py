"""constraints.txt, the lock README's commands install through, still satisfies pyproject.toml's ranges and says how
it was made."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).parents[1]
LOCKED_EXTRAS = ("dev", "gpu", "science")  # eval (lmms-eval) is installed without its dependencies


def pins() -> dict[str, list[Version]]:
    """Every ``name==version`` line of the lock (a universal lock may pin a name twice, under markers)."""
    found: dict[str, list[Version]] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (version,) = [spec.version for spec in requirement.specifier if spec.operator == "=="]
            found.setdefault(canonicalize_name(requirement.name), []).append(Version(version))
    return found


def test_every_requirement_of_pyproject_is_locked_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [
        *project["dependencies"],
        *(r for extra in LOCKED_EXTRAS for r in project["optional-dependencies"][extra]),
    ]
    locked = pins()
    for text in wanted:
        requirement = Requirement(text)
        versions = locked.get(canonicalize_name(requirement.name))
        assert versions, f"{requirement.name} is in pyproject.toml but not in constraints.txt: refresh the lock"
        for version in versions:
            assert requirement.specifier.contains(version, prereleases=True), (
                f"constraints.txt pins {requirement.name}=={version}, outside pyproject's {requirement}"
            )


def test_the_lock_names_the_command_that_refreshes_it_and_the_docs_give_the_same():
    header = (ROOT / "constraints.txt").read_text().splitlines()[:2]
    command = header[1].lstrip("#").strip()
    assert command.startswith("echo torch==") and "uv pip compile pyproject.toml" in command, header
    assert command in (ROOT / "CONTRIBUTING.md").read_text()


def test_a_run_names_its_lock_and_the_installed_versions_that_differ_from_it(tmp_path):
    import importlib.metadata

    from ivl.callbacks.mlflow import lock_tags

    installed = importlib.metadata.version("packaging")
    lock = tmp_path / "constraints.txt"
    lock.write_text(
        f"packaging=={installed}\n    # via x\npyyaml==0.0.1\nnot-installed-here==1.0\n"
        "einops==0.0.1 ; python_version < '3'\n"
    )
    tags = lock_tags(lock)
    assert tags["lock"].startswith("constraints.txt sha256:")
    assert tags["lock_differs"] == f"pyyaml {importlib.metadata.version('pyyaml')} (locked ==0.0.1)"
    lock.write_text(f"packaging=={installed}\n")
    assert lock_tags(lock)["lock_differs"] == "none"
    assert lock_tags(tmp_path / "absent.txt") == {"lock": "none (not run from a checkout)"}
