"""Package discovery. ivl's code is ivl/ plus two top-level folders, kernels/ and callbacks/, that install as
ivl.kernels and ivl.callbacks. pyproject.toml's ``packages.find`` cannot rename what it finds, so the rename is
spelled out here; every package under the three folders is found, none is listed by hand. Everything else about
the distribution is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

FOLDERS = {"ivl": "ivl", "ivl.kernels": "kernels", "ivl.callbacks": "callbacks"}


def packages_in(package: str, folder: str) -> list[str]:
    found = find_namespace_packages(folder, exclude=["*__pycache__*"])
    return [package] + [f"{package}.{name}" for name in found]


setup(
    packages=[name for package, folder in FOLDERS.items() for name in packages_in(package, folder)],
    package_dir={package: folder for package, folder in FOLDERS.items() if package != folder},
)
