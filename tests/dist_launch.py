"""Two gloo ranks on 127.0.0.1, each a fresh process running a worker script of this folder that
saves ``rank{r}.pt`` into a directory (tests/dist_worker.py, tests/dist_worker_above.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def two_ranks(script: str, args: list[str], outdir) -> list:
    """What each of the two ranks of ``script`` (run with ``args``) saved into ``outdir``; skips
    without the gloo backend, fails with a rank's log when it exits with an error."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, script), *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(2)]
