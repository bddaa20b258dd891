"""One dependency set: constraints.txt (written by .ci/lock.py from pyproject.toml's extras, vLLM's
pins included) is what the suite runs and what `pip install -c constraints.txt -e '.[vllm]'` installs
on a GPU machine; torch and its CUDA companions are the only packages installed per machine."""

from __future__ import annotations

import re
from importlib import metadata

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import PROJECT_ROOT

BY_MACHINE = re.compile(r"^(torch|torchaudio|torchvision|triton|nvidia-.*|cuda-.*|pip|setuptools|wheel|palign)$")


def pins() -> dict[str, str]:
    lines = (PROJECT_ROOT / "constraints.txt").read_text().splitlines()
    found = {}
    for line in lines:
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            found[canonicalize_name(name)] = version
    return found


def test_every_installed_package_of_the_set_has_its_pinned_version():
    wrong = {}
    for name, version in pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # vLLM's own stack is installed on GPU machines only
        if installed != version:
            wrong[name] = f"{installed} installed, {version} pinned"
    assert not wrong, f"the environment is not constraints.txt's set (make install): {wrong}"


def test_the_set_holds_every_requirement_of_the_project_and_its_extras():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pinned = pins()
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if BY_MACHINE.match(name):
            assert name not in pinned  # installed per machine (the Makefile's torch, vLLM's on a GPU)
            continue
        assert name in pinned, f"{requirement} is not in constraints.txt: run make lock"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject.toml's {requirement}: run make lock"
        )
    # the suite runs the transformers vLLM is pinned against (vLLM 0.33: transformers>=5.16.1,<5.21)
    assert pinned["vllm"].startswith("0.33.") and Requirement("transformers>=5.16.1,<5.21").specifier.contains(
        pinned["transformers"]
    )
