"""Write constraints.txt: the one dependency set the test suite runs and `palign[vllm]` installs.

    python .ci/lock.py          # (make lock) resolves '.[test,vllm,ray,slurm]' with pip, writes constraints.txt

pip resolves the project with every extra at once (`--dry-run --ignore-installed --report`, metadata
only), so the versions it picks satisfy vLLM's pins (transformers<5.21, numba's numpy, ...) and the
tests' alike. The file pins every package of that resolution but the ones that differ by machine:
torch and what ships with its CUDA build (torchaudio, torchvision, triton, nvidia-*, cuda-*), which
the Makefile installs first (the CPU build of torch==2.13.0 here; vLLM brings torch 2.14's CUDA
build on a GPU machine), and the build tools (pip, setuptools, wheel). The Makefile's install and
the README's GPU install both read it (`pip install -c constraints.txt ...`);
tests/integration/test_dependencies.py checks that the suite's environment is this set.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = "test,vllm,ray,slurm"
BY_MACHINE = re.compile(r"^(torch|torchaudio|torchvision|triton|nvidia-.*|cuda-.*|pip|setuptools|wheel|palign)$")


def resolve() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--dry-run",
                "--ignore-installed",
                "--report",
                str(report),
                f"{ROOT}[{EXTRAS}]",
            ],
            check=True,
        )
        installs = json.loads(report.read_text())["install"]
    return {re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(): item["metadata"]["version"] for item in installs}


def main() -> None:
    pins = {name: version for name, version in resolve().items() if not BY_MACHINE.match(name)}
    lines = [
        f"# written by .ci/lock.py (make lock) from pyproject.toml's [{EXTRAS}]: the suite's and palign[vllm]'s",
        "# versions; torch (and its CUDA companions) and the build tools are installed per machine, see the script",
    ]
    lines += [f"{name}=={pins[name]}" for name in sorted(pins)]
    (ROOT / "constraints.txt").write_text("\n".join(lines) + "\n")
    print(f"constraints.txt: {len(pins)} packages (vllm {pins.get('vllm')}, transformers {pins.get('transformers')})")


if __name__ == "__main__":
    main()
