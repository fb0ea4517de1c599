"""Every Triton kernel compiles for sm_80 and sm_90 without a GPU, fits the SM, and never spills.

:mod:`fimfast.ops.triton.aot` records the launches of every launcher on CPU inputs and compiles
each specialisation with ``triton.compile(..., target=GPUTarget("cuda", cc, 32))``. The test
compiles the covering subset (per kernel, every combination of constexpr values and ``num_warps``
once, with the widest input dtypes: 98 specialisations for sm_80 and 101 for sm_90 out of 169 and
172; about 190 s of compilation, 3-4 min on a quiet 2-core machine); ``python -m
fimfast.ops.triton.aot`` compiles the full matrix. It runs in a subprocess because the AOT path
needs ``TRITON_INTERPRET`` unset, which the other tests set.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_MODULES = ("accumulate", "core_topk", "lm_head_probe", "probe_logit_grad", "shared_sq",
                  "sq_matmul")  # fmt: skip


def _kernel_names() -> set[str]:
    """The launched kernels (``@triton.jit`` functions named ``_*_kernel``) of the triton backend,
    read from the sources so the interpreter's function objects are not needed."""
    names = set()
    for mod in KERNEL_MODULES:
        with open(os.path.join(ROOT, "fimfast", "ops", "triton", f"{mod}.py")) as f:
            src = f.read()
        for name in re.findall(r"@triton\.jit[^\n]*\ndef (_\w+_kernel)\(", src):
            names.add(f"fimfast.ops.triton.{mod}:{name}")
    return names


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "fimfast.ops.triton.aot", "--subset", "--quiet", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert out.exists(), f"the AOT run wrote no report ({proc.returncode}):\n{proc.stderr}"
    rep = json.loads(out.read_text())
    rep["_returncode"] = proc.returncode
    rep["_stderr"] = proc.stderr
    return rep


@pytest.mark.timeout(1800)
def test_every_kernel_compiles_for_sm80_and_sm90(report):
    assert not report["launcher_errors"], report["launcher_errors"]
    compiled = {(r["kernel"], r["cc"]) for r in report["records"]}
    expected = _kernel_names()
    assert len(expected) == 8, expected  # the parse above found the kernels
    for cc in (80, 90):
        missing = {k for k in expected if (k, cc) not in compiled}
        assert not missing, f"kernels never launched by their launcher for sm_{cc}: {missing}"
    bad = [
        f"sm_{r['cc']} {r['kernel']} {r['constexprs']}: {'; '.join(r['problems'])}"
        for r in report["records"]
        if r["problems"]
    ]
    assert not bad, "\n".join(bad)
    assert report["_returncode"] == 0, report["_stderr"]


@pytest.mark.timeout(1800)
def test_subset_compiles_the_combinations_that_once_spilled(report):
    """The covering subset reaches the specialisations that spilled on sm_80 while every one of
    their constexpr values compiled cleanly in other specs: ``mc`` over the column-block loop in
    float32, and both ``lm_head_probe`` kernels in ``dg`` mode without a bias at d = 32."""
    for cc in (80, 90):
        got = {(r["kernel"].split(":")[1], c) for r in report["records"] if r["cc"] == cc
               for c in r["cases"]}  # fmt: skip
        for kernel, case in [
            ("_probe_logit_grad_kernel", "probe_logit_grad mc float32 C=50000"),
            ("_rows_kernel", "lm_head_probe dg float32 d=32 bias=False"),
            ("_weight_kernel", "lm_head_probe dg float32 d=32 bias=False"),
        ]:
            assert (kernel, case) in got, f"sm_{cc}: {kernel} of {case!r} is not compiled"


@pytest.mark.timeout(1800)
def test_resource_usage_is_read_from_the_cubins(report):
    for r in report["records"]:
        assert r["n_regs"] > 0, r  # a kernel uses registers: a zero means cuobjdump was misread
        assert r["num_warps"] in (1, 2, 4, 8, 16, 32), r
        assert r["shared"] == r["dynamic_shared"] + r["static_shared"], r
    # the tiled GEMMs stage their tiles in shared memory on both targets
    for r in report["records"]:
        if r["kernel"].endswith(":_sq_matmul_kernel"):
            assert r["shared"] > 0, r
    for target in report["per_target"].values():
        assert 0 < target["specs_compiled"] <= target["specs_full_matrix"]
    # float64 tl.dot needs sm_90: on sm_80 those launchers take the torch path and launch nothing
    no80 = report["per_target"]["sm_80"]["cases_without_launch"]
    assert "sq_matmul float64" in no80 and "sq_matmul float64" not in (
        report["per_target"]["sm_90"]["cases_without_launch"]
    )


def test_problems_flags_spills_shared_memory_and_errors():
    from fimfast.ops.triton.aot import SHARED_LIMIT, problems

    ok = {"cc": 90, "n_spills": 0, "local_bytes": 0, "shared": 1024, "n_regs": 64, "num_warps": 4}
    assert problems(ok) == []
    assert "8 bytes of spill stores" in problems({**ok, "n_spills": 8, "spill_loads": 8})[0]
    over = problems({**ok, "cc": 80, "shared": SHARED_LIMIT[80] + 1})
    assert over and "sm_80 has 166912" in over[0]
    assert problems({**ok, "shared": SHARED_LIMIT[80] + 1}) == []  # fits sm_90's 227 KiB
    assert "does not compile" in problems({**ok, "error": "CompilationError: x"})[0]
    assert "register file" in problems({**ok, "n_regs": 255, "num_warps": 32})[0]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_float64_dot_launchers_take_the_torch_path_before_sm90(monkeypatch):
    """On sm_80 (float64 tl.dot does not compile) the float64 GEMM launchers return the torch
    reference's result and launch no kernel; float32 still runs its kernel."""
    import torch

    from fimfast.ops import torch_ref
    from fimfast.ops.triton import arch, shared_sq, sq_matmul

    launched = []
    # the ops launch through torch.library.wrap_triton, which takes only kernels: spy on the
    # kernels' class (InterpretedFunction under the interpreter) instead of replacing them
    spied = (sq_matmul._sq_matmul_kernel, shared_sq._shared_sq_kernel)
    cls = type(spied[0])
    getitem = cls.__getitem__

    def spy(kernel, grid):
        if any(kernel is k for k in spied):
            launched.append(kernel)
        return getitem(kernel, grid)

    monkeypatch.setattr(cls, "__getitem__", spy)
    g, a = torch.randn(40, 5, dtype=torch.float64), torch.randn(40, 7, dtype=torch.float64)
    G, A = torch.randn(3, 6, 5, dtype=torch.float64), torch.randn(3, 6, 7, dtype=torch.float64)
    monkeypatch.setattr(arch, "TARGET_CC", (8, 0))
    assert not arch.fp64_dot(torch.device("cpu"))
    torch.testing.assert_close(sq_matmul.sq_matmul_triton(g, a), torch_ref.sq_matmul_torch(g, a),
                               rtol=0, atol=0)
    torch.testing.assert_close(shared_sq.shared_sq_triton(G, A), torch_ref.shared_sq_torch(G, A),
                               rtol=0, atol=0)
    assert launched == []
    sq_matmul.sq_matmul_triton(g.float(), a.float())
    assert len(launched) == 1
    monkeypatch.setattr(arch, "TARGET_CC", (9, 0))
    out = sq_matmul.sq_matmul_triton(g, a)
    assert len(launched) == 2
    truth = (g * g).T @ (a * a)
    torch.testing.assert_close(out, truth, rtol=1e-12, atol=0)
