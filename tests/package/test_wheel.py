"""The wheel a user installs holds every module of the package and its licence.

CI builds the wheel and passes it as NPLLAMA_WHEEL with the source tree as NPLLAMA_SOURCE_TREE;
run from a checkout, the test builds a wheel of that checkout itself.
"""
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest


def source_tree() -> pathlib.Path:
    root = pathlib.Path(os.environ.get("NPLLAMA_SOURCE_TREE") or pathlib.Path(__file__).resolve().parents[2])
    if not (root / "setup.cfg").is_file() or not (root / "npllama").is_dir():
        pytest.fail(f"no npllama source tree at {root}: set NPLLAMA_SOURCE_TREE")
    return root


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    if os.environ.get("NPLLAMA_WHEEL"):
        return pathlib.Path(os.environ["NPLLAMA_WHEEL"])
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(source_tree())], check=True)
    return next(out.glob("*.whl"))


def test_wheel_holds_every_module_and_the_licence(wheel):
    root = source_tree()
    modules = {p.relative_to(root).as_posix() for p in (root / "npllama").rglob("*.py")
               if "__pycache__" not in p.parts}
    names = set(zipfile.ZipFile(wheel).namelist())
    assert modules, root
    assert modules <= names, sorted(modules - names)
    assert any(n.endswith(".dist-info/licenses/npllama/LICENSE") for n in names), sorted(names)


def test_installed_package_is_not_the_source_tree_in_ci():
    import npllama
    if not (os.environ.get("CI") and os.environ.get("NPLLAMA_SOURCE_TREE")):
        pytest.skip("only CI installs the wheel apart from the source tree (.ci/run)")
    assert not pathlib.Path(npllama.__file__).resolve().is_relative_to(source_tree()), npllama.__file__
