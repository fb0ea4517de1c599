"""kronfluence's EKFAC factor fitting as a peer in benchmarks/bench_structured.py.

kronfluence (Grosse et al., 2023's EKFAC for influence functions) fits, for every tracked
nn.Linear / nn.Conv2d, the activation and pseudo-gradient covariances (``fit_covariance_matrices``:
the KFAC factors, with MC-sampled labels when ``use_empirical_fisher=False``), their
eigendecomposition, and the eigenvalue-corrected diagonal (``fit_lambda_matrices``: the EKFAC
refit). Each stage writes its factors to safetensors files under ``output_dir``; those writes are
part of its cost as a user sees it, and are timed here. Not timed: kronfluence frees memory
before and after every stage with ``gc.collect()`` (``kronfluence.utils.state.release_memory``),
whose cost depends on the whole process's heap (1.8 s per call in the benchmark process, which
holds transformers and the peers), not on the Fisher; it is replaced by a no-op here. Modules it
tracks are the Linear/Conv2d layers whose weight is trainable in the benchmark's model
(``get_influence_tracked_modules``).
"""

from __future__ import annotations

import logging
import tempfile

import torch
from torch import nn


def calls(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict:
    """``{"kronfluence.kfac_mc": covariance fit, "kronfluence.ekfac_refit": lambda fit}``; the
    eigendecomposition between them runs once, untimed (as NNGeometry's basis is)."""
    import copy

    import kronfluence.computer.computer as kc
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    kc.release_memory = lambda: None  # see the module docstring
    model = copy.deepcopy(model)
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad]

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return nn.functional.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return names

    task = Classification()
    model = prepare_model(model, task)
    out = tempfile.mkdtemp(prefix="kronfluence_")
    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    an = Analyzer("bench", model, task, cpu=True, disable_tqdm=True, output_dir=out)
    ds = TensorDataset(X, y)
    args = FactorArguments(strategy="ekfac", use_empirical_fisher=False)
    B = X.shape[0]
    state = {}

    def cov():
        an.fit_covariance_matrices("f", ds, per_device_batch_size=B, factor_args=args,
                                   overwrite_output_dir=True)

    def lam():
        if "eig" not in state:  # the eigenbasis, untimed (the warm-up call builds it)
            cov()
            an.perform_eigendecomposition("f", factor_args=args, overwrite_output_dir=True)
            state["eig"] = True
        an.fit_lambda_matrices("f", ds, per_device_batch_size=B, factor_args=args,
                               overwrite_output_dir=True)

    return {"kronfluence.kfac_mc": cov, "kronfluence.ekfac_refit": lam}
