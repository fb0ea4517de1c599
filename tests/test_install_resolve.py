"""``pip install fimfast[triton]`` next to the CUDA build of torch must resolve.

torch's CUDA wheels pin the triton they were built with (torch 2.13.0: ``triton==3.7.1``); an
extra that pins another triton makes ``pip install torch==2.13.0 fimfast[triton]`` fail with
``ResolutionImpossible`` for exactly the users the extra is for. This test runs pip's resolver
on the requirements of ``fimfast[triton]`` (read from ``pyproject.toml``) together with
``torch==2.13.0`` against the public index: ``--isolated`` ignores this machine's pip
configuration (local wheel directories, CPU-only torch), ``--ignore-installed`` ignores the
environment, ``--dry-run --report`` reads metadata only (no wheel is downloaded). It takes about a
minute and is skipped, naming the reason, when the index cannot be reached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INDEX = "https://pypi.org/simple/"
TORCH = "torch==2.13.0"


def _index_reachable() -> str | None:
    """None when the public index answers, else why not."""
    try:
        with urllib.request.urlopen(INDEX + "triton/", timeout=10) as r:
            r.read(64)
        return None
    except Exception as exc:
        return f"{INDEX} cannot be reached ({type(exc).__name__}: {exc})"


def _requirements(extra: str) -> list[str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"][extra])


@pytest.mark.timeout(600)
@pytest.mark.skipif(tomllib is None, reason="reading pyproject.toml needs tomllib (Python 3.11+)")
def test_triton_extra_resolves_with_cuda_torch(tmp_path):
    reason = _index_reachable()
    if reason is not None:
        pytest.skip(reason)
    reqs = _requirements("triton")
    assert any(r.split(";")[0].strip().startswith("triton") for r in reqs), reqs
    report = tmp_path / "report.json"
    cmd = [
        sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check",
        "--dry-run", "--ignore-installed", "--quiet", "--index-url", INDEX,
        "--report", str(report), TORCH, *reqs,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    out = proc.stdout + proc.stderr
    assert "ResolutionImpossible" not in out, (
        f"fimfast[triton] ({reqs}) conflicts with {TORCH}:\n{out}"
    )
    assert proc.returncode == 0, f"pip failed ({proc.returncode}):\n{out}"
    chosen = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert chosen.get("torch") == "2.13.0", chosen
    # the resolver took the CUDA wheel's own triton, not a CPU-only torch without one
    assert chosen.get("triton") == "3.7.1", chosen
    assert any(name.startswith("nvidia-") for name in chosen), chosen
