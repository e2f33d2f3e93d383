"""The distribution: no folder of the repository poses as another package, and the wheel holds the whole library.

kernels/ and callbacks/ sit at the top of the repository and install as ivl.kernels and ivl.callbacks. Python puts
the working directory (or a script's folder) first on sys.path, so run from the repository root they are visible
under their bare names too: as folders without ``__init__.py`` they are only namespace portions there, which a
regular package of the same name anywhere on the path always wins over (transformers imports names from the Hugging
Face ``kernels`` package).
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
TOP_LEVEL_FOLDERS = ["kernels", "callbacks"]
ENTRY_POINTS = ["ivl.experiments", "ivl.evaluate", "ivl.serve", "ivl.convert", "ivl.bench", "ivl.data.demo"]


IMPORT_ALL = "import importlib, sys; [importlib.import_module(name) for name in sys.argv[1:]]; print('ok')"


def packages_in_checkout() -> set[str]:
    """Every folder of Python files under ivl/, kernels/ and callbacks/, named as it installs (independently of
    the build's own discovery in setup.py)."""
    found = {"ivl"}
    for folder, package in (("ivl", "ivl"), ("kernels", "ivl.kernels"), ("callbacks", "ivl.callbacks")):
        for path in (ROOT / folder).rglob("*.py"):
            found.add(".".join([package, *path.parent.relative_to(ROOT / folder).parts]))
    return found


def run(args, cwd, env=None, timeout=300):
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{' '.join(map(str, args))} in {cwd}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.parametrize("name", TOP_LEVEL_FOLDERS)
def test_an_installed_package_of_the_same_name_wins_from_the_repository_root(name, tmp_path):
    """A regular package called like a top-level folder, installed later on sys.path than the working directory,
    is what ``import <name>`` gives when Python runs from the repository root."""
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("ORIGIN = 'installed'\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = f"import sys, {name}; assert sys.path[0] == '', sys.path[:2]; print({name}.ORIGIN, {name}.__file__)"
    assert run([sys.executable, "-c", code], cwd=ROOT, env=env).split()[0] == "installed"


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed("kernels"), reason="Hugging Face's kernels is not installed (transformers < 5.25)")
def test_the_installed_kernels_distribution_is_what_import_kernels_gives_from_the_repository_root():
    """The real case: transformers (>= 5.25) imports names from Hugging Face's ``kernels``; from the repository
    root that import, transformers' use of it and ivl's own kernels all work in one process."""
    code = (
        "import importlib.metadata, pathlib, kernels; "
        "files = importlib.metadata.distribution('kernels').locate_file(''); "
        "assert pathlib.Path(kernels.__file__).is_relative_to(files), (kernels.__file__, files); "
        "import transformers.integrations.hub_kernels, ivl.data.processing; "
        "from ivl.kernels.gated_delta import gated_delta_rule; "
        "from ivl.callbacks.mlflow import MLflowTracking; print(kernels.__file__)"
    )
    assert "site-packages" in run([sys.executable, "-c", code], cwd=ROOT)


def _not_source(folder: str, names: list[str]) -> list[str]:
    at_top = Path(folder) == ROOT
    return [
        name
        for name in names
        if name in ("__pycache__", "node_modules", ".ivl-cache")
        or name.endswith(".egg-info")
        or (at_top and name in (".git", ".venv", "build", "runs", "data", "teachers", "wheels"))
    ]


def test_every_entry_point_answers_from_the_repository_root():
    """The working directory (or the script's folder, for lightning_app.py) first on sys.path, as a user runs them."""
    commands = [[sys.executable, "lightning_app.py", "--help"]] + [
        [sys.executable, "-m", m, "--help"] for m in ENTRY_POINTS
    ]
    with ThreadPoolExecutor(2) as pool:
        helps = list(pool.map(lambda command: run(command, cwd=ROOT), commands))
    assert all("usage" in text.lower() for text in helps)
    assert run([sys.executable, "-c", IMPORT_ALL, *sorted(packages_in_checkout())], cwd=ROOT) == "ok\n"


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """The wheel built from this checkout, installed without its dependencies into a fresh virtual environment
    that borrows this one's dependencies (its site-packages as a plain path entry: no editable hook comes along)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # from a copy: setuptools writes build/ into the tree it builds, and files left there would reach later wheels
    shutil.copytree(ROOT, tmp / "src", ignore=_not_source)
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(tmp / "src")],
        cwd=tmp,
        timeout=600,
    )
    wheel = next((tmp / "dist").glob("ivl-*.whl"))
    venv.create(tmp / "venv", with_pip=False)
    python = tmp / "venv" / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).strip())
    borrowed = [p for p in sys.path if p.endswith("site-packages")]
    (site / "borrowed.pth").write_text("\n".join(borrowed) + "\n")
    run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        cwd=tmp,
        timeout=300,
    )
    outside = tmp / "elsewhere"
    outside.mkdir()
    return wheel, python, outside


def test_the_wheel_installs_every_entry_point_from_outside_the_repository(wheel_env):
    wheel, python, outside = wheel_env
    where = run([str(python), "-c", "import ivl; print(ivl.__file__)"], cwd=outside).strip()
    assert not Path(where).is_relative_to(ROOT), f"ivl imported from the checkout: {where}"
    with ThreadPoolExecutor(2) as pool:
        helps = list(pool.map(lambda module: run([str(python), "-m", module, "--help"], cwd=outside), ENTRY_POINTS))
    assert all("usage" in text.lower() for text in helps)


def test_the_wheel_holds_every_package_and_the_page(wheel_env):
    """Every package of the checkout is in the wheel and imports from it, and the served page is there."""
    wheel, python, outside = wheel_env
    expected = packages_in_checkout()
    names = zipfile.ZipFile(wheel).namelist()
    assert "ivl/serve/page.html" in names
    packages = {".".join(Path(name).parent.parts) for name in names if name.endswith(".py")}
    assert expected <= packages, sorted(expected - packages)
    assert run([str(python), "-c", IMPORT_ALL, *sorted(expected)], cwd=outside) == "ok\n"


def test_the_wheel_registers_the_lmms_eval_model(wheel_env):
    pytest.importorskip("lmms_eval")
    wheel, python, outside = wheel_env
    code = (
        "import importlib.metadata as m; points = [p for p in m.entry_points(group='lmms_eval.models') "
        "if p.name == 'ivl']; print(points[0].load().__module__, points[0].load()().model_id)"
    )
    assert run([str(python), "-c", code], cwd=outside).split() == ["ivl.evaluate.lmms", "ivl"]
