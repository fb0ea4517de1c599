"""Adversarial checks, sixth round: ``fimfast run`` and ``fimfast demo`` with a backend that
cannot run here. docs/cli.md says errors in the values are checked before any training; an
unavailable ``--backend`` was refused only once the network was trained (19 s on digits_mlp).
It is now refused first, naming the flag."""

from __future__ import annotations

import pytest

import fimfast
from fimfast import cli
from fimfast.experiments import Experiment, register, unregister

MISSING = [b for b, v in fimfast.available_backends().items() if not v["available"]]


@pytest.mark.skipif(not MISSING, reason="every backend runs here")
@pytest.mark.parametrize("command", ["run", "demo"])
def test_an_unavailable_backend_is_refused_before_training(tmp_path, capsys, command):
    def prepare(*a, **k):
        raise AssertionError("the experiment was prepared (trained) before the check")

    register(Experiment("untrained", "test", prepare, num_classes=10), replace=True)
    try:
        args = (["run", "untrained"] if command == "run" else
                ["demo", "--experiment", "untrained"])
        code = cli.main([*args, "--backend", MISSING[0], "--out", str(tmp_path)])
        assert code == 2
        err = capsys.readouterr().err
        assert "argument --backend:" in err and MISSING[0] in err and "unavailable" in err
        assert not list(tmp_path.iterdir())
    finally:
        unregister("untrained")
