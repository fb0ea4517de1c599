"""Diagonal Laplace approximation of a classifier's posterior from a Fisher diagonal.

At a trained solution ``theta_MAP`` of the log-likelihood of ``n`` training samples under a
Gaussian prior ``N(mu_0, diag(1/p_0))``, the Laplace approximation with the Fisher (= the
generalised Gauss-Newton matrix, for a softmax likelihood) in place of the Hessian is

    q(theta) = N(theta_MAP, diag(1 / P)),   P = H / T + p_0,   H = sum_n diag F_n

with ``T`` the temperature (``T < 1`` sharpens the posterior, as in a tempered likelihood).
``H`` is the Fisher **summed** over the training data: a ``reduction="mean"`` estimate is
multiplied by its row count (or by ``n_data`` when the Fisher was estimated on a subset).

Predictives for a test input ``x`` with logits ``f(x)``:

* ``pred_type="glm"`` (the linearised model ``f(x; theta) ~ f(x; theta_MAP) + J (theta -
  theta_MAP)``, Immer et al. 2021): ``f ~ N(f_mu, Sigma)`` with ``Sigma = J diag(1/P) J^T``
  ``(C, C)`` per input, then

  * ``link_approx="probit"``: ``softmax(f_mu / sqrt(1 + pi/8 diag Sigma))`` (MacKay's probit
    approximation, per class);
  * ``link_approx="mc"``: the mean of ``softmax(f)`` over samples of ``f``.
* ``pred_type="nn"``: the mean of ``softmax(f(x; theta_s))`` over parameter samples ``theta_s``.

The conventions (``prior_precision``, ``temperature``, ``H`` as a sum, the probit constant) are
those of laplace-torch's ``DiagLaplace``; given the same diagonal both give the same predictive
(tested). The Jacobians ``J`` are formed with ``torch.func`` in chunks of rows (memory: rows x
classes x parameters per chunk), so the GLM predictive is for moderate parameter counts; restrict
it to a subnetwork (the last layer, adapters) by making only those parameters trainable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fimfast.diagfim import DiagFIM
from fimfast.entries import check_entries

__all__ = ["DiagLaplace"]

PRED_TYPES = ("glm", "nn")
LINK_APPROX = ("probit", "mc")


def _logits(model: nn.Module, x: Any) -> torch.Tensor:
    if isinstance(x, Mapping):
        out = model(**x)
    elif isinstance(x, (tuple, list)):
        out = model(*x)
    else:
        out = model(x)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return (N, C) logits for the predictive; got {got}")
    return out


def _rows(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    if isinstance(x, Mapping):
        return next(v for v in x.values() if isinstance(v, torch.Tensor)).shape[0]
    return x[0].shape[0]


def _take(x: Any, sl: slice) -> Any:
    if isinstance(x, torch.Tensor):
        return x[sl]
    if isinstance(x, Mapping):
        return {k: v[sl] if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    return type(x)(v[sl] if isinstance(v, torch.Tensor) else v for v in x)


class DiagLaplace:
    """Diagonal Laplace posterior ``N(theta_MAP, diag(1 / (H / T + p_0)))`` of a classifier.

    Args:
        model: the trained classifier (its current parameters are ``theta_MAP``, copied).
        fisher: Fisher diagonal of the training data at ``theta_MAP`` (a :class:`DiagFIM`, e.g.
            ``fimfast.diag_fisher(model, train_loader, "exact")``). Its parameters that are
            trainable in ``model`` are the random ones; every other parameter stays at its value.
        prior_precision: ``p_0 > 0``: a number, a mapping ``{param_name: number or tensor}`` (per
            tensor or per coordinate), or a flat tensor of one entry per random coordinate.
        temperature: ``T > 0``.
        n_data: the number of training samples the posterior conditions on. ``None``: the
            Fisher's own rows (a ``"sum"`` Fisher is used as is, a ``"mean"`` one multiplied by its
            ``meta["count"]``). Given: ``H = n_data * (Fisher per row)``, for a Fisher estimated
            on a subset of the training data (needs ``meta["reduction"]`` and ``meta["count"]``).
            A ``"sum"`` Fisher with ``ema`` (one batch's scale) is refused.
        prior_mean: ``mu_0`` (a number; only the marginal likelihood uses it).

    Example:
        >>> F = fimfast.diag_fisher(model, train_loader, "exact", reduction="sum")
        >>> la = DiagLaplace(model, F, prior_precision=1.0)
        >>> probs = la.predictive(x_test)                  # GLM + probit
        >>> thetas = la.sample(16)                         # (16, P) parameter draws
    """

    def __init__(
        self,
        model: nn.Module,
        fisher: DiagFIM,
        prior_precision: float | Mapping[str, Any] | torch.Tensor = 1.0,
        temperature: float = 1.0,
        n_data: int | None = None,
        prior_mean: float = 0.0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if not isinstance(fisher, DiagFIM):
            raise TypeError(f"fisher must be a DiagFIM; got {type(fisher).__name__}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"temperature must be a number > 0; got {temperature!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be a number > 0; got {temperature!r}")
        self.model = model
        self.temperature = float(temperature)
        self.prior_mean = float(prior_mean)
        named = dict(model.named_parameters())
        for n in fisher:
            if n not in named or tuple(named[n].shape) != tuple(fisher[n].shape):
                raise ValueError(f"fisher[{n!r}] is not a parameter of model with its shape")
        self.names = [n for n in fisher if named[n].requires_grad]
        if not self.names:
            raise ValueError("no parameter of fisher is trainable (requires_grad) in model")
        self._shapes = [tuple(named[n].shape) for n in self.names]
        self._sizes = [named[n].numel() for n in self.names]
        self.n_params = sum(self._sizes)
        ref = named[self.names[0]]
        self.dtype, self.device = ref.dtype, ref.device
        scale = self._h_scale(fisher, n_data)
        self.H = torch.cat([fisher[n].reshape(-1).to(ref) for n in self.names]) * scale
        for n in self.names:
            check_entries(fisher[n].detach(), f"fisher[{n!r}]",
                          negative="fisher has negative entries; a Fisher diagonal is >= 0")
        self.n_data = n_data if n_data is not None else fisher.meta.get("count")
        self.mean = torch.cat([named[n].detach().reshape(-1) for n in self.names]).clone()
        self.prior_precision = prior_precision

    @staticmethod
    def _h_scale(fisher: DiagFIM, n_data: int | None) -> float:
        red, count = fisher.meta.get("reduction"), fisher.meta.get("count")
        if red == "sum" and fisher.meta.get("ema") is not None:
            raise ValueError(
                f"fisher is an exponential average (ema={fisher.meta['ema']!r}) of per-batch "
                "sums: the scale of one batch, not of the training data; estimate it with "
                "reduction='mean' (a Fisher per row, scaled by its count or n_data) or without ema"
            )
        if n_data is not None:
            if isinstance(n_data, bool) or not isinstance(n_data, int) or n_data < 1:
                raise ValueError(f"n_data must be an integer >= 1; got {n_data!r}")
            if red == "mean":
                return float(n_data)
            if red == "sum" and count:
                return n_data / float(count)
            raise ValueError(
                "n_data rescales the Fisher per row, which needs fisher.meta['reduction'] "
                f"('sum' or 'mean') and meta['count']; got reduction={red!r}, count={count!r}"
            )
        if red == "mean":
            if not count:
                raise ValueError(
                    "fisher has reduction='mean' but no meta['count']: pass n_data (the number "
                    "of training samples) to turn it into the sum the posterior needs"
                )
            return float(count)
        return 1.0  # a sum over the training data (or no metadata: taken as the sum)

    # -- prior and posterior ------------------------------------------------------------------ #
    @property
    def prior_precision(self) -> torch.Tensor:
        """``p_0`` per random coordinate, ``(P,)``."""
        return self._prior

    @prior_precision.setter
    def prior_precision(self, value: float | Mapping[str, Any] | torch.Tensor) -> None:
        if isinstance(value, Mapping):
            parts = []
            for n, shape, size in zip(self.names, self._shapes, self._sizes):
                if n not in value:
                    raise ValueError(f"prior_precision lacks an entry for {n!r}")
                v = torch.as_tensor(value[n], dtype=self.dtype, device=self.device)
                parts.append(v.expand(shape).reshape(-1) if v.numel() == 1 else v.reshape(-1))
                if parts[-1].numel() != size:
                    raise ValueError(f"prior_precision[{n!r}] must be a number or {shape}")
            prior = torch.cat(parts)
        elif isinstance(value, torch.Tensor):
            if value.numel() not in (1, self.n_params):
                raise ValueError(
                    f"prior_precision must have 1 or {self.n_params} entries; got "
                    f"{tuple(value.shape)}"
                )
            prior = value.detach().to(self.H).reshape(-1).expand(self.n_params).clone()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            prior = torch.full_like(self.H, float(value))
        else:
            raise TypeError(
                "prior_precision must be a number, a mapping or a tensor; got "
                f"{type(value).__name__}"
            )
        if not bool((prior > 0).all()):
            raise ValueError("prior_precision must be > 0 everywhere")
        self._prior = prior

    @property
    def posterior_precision(self) -> torch.Tensor:
        """``P = H / T + p_0``, ``(P,)``."""
        return self.H / self.temperature + self._prior

    @property
    def posterior_variance(self) -> torch.Tensor:
        """``1 / P``, ``(P,)``."""
        return 1.0 / self.posterior_precision

    def to_dict(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat ``(P,)`` vector as ``{param_name: tensor shaped like the parameter}``."""
        out, i = {}, 0
        for n, shape, size in zip(self.names, self._shapes, self._sizes):
            out[n] = vec[i : i + size].reshape(shape)
            i += size
        return out

    def posterior(self) -> DiagFIM:
        """The posterior variance as a :class:`DiagFIM` keyed by parameter name."""
        return DiagFIM(self.to_dict(self.posterior_variance), {"kind": "laplace_variance"})

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None):
        """Parameter draws ``theta_MAP + eps / sqrt(P)``, ``eps ~ N(0, I)``: ``(n_samples, P)``
        (:meth:`to_dict` turns one into named tensors)."""
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1; got {n_samples!r}")
        eps = torch.randn(
            n_samples, self.n_params, dtype=self.dtype, device=self.device, generator=generator
        )
        return self.mean + eps * self.posterior_variance.sqrt()

    def log_marginal_likelihood(
        self, log_likelihood: float | torch.Tensor, prior_precision: Any = None
    ) -> torch.Tensor:
        """Laplace evidence ``log p(D) ~ log p(D | theta_MAP) / T - 0.5 (log det P - log det p_0
        + (theta_MAP - mu_0)^T p_0 (theta_MAP - mu_0))``.

        Args:
            log_likelihood: ``log p(D | theta_MAP)``, minus the summed cross-entropy over the
                ``n_data`` training samples.
            prior_precision: evaluate at this prior precision (and keep it).
        """
        if prior_precision is not None:
            self.prior_precision = prior_precision
        d = self.mean - self.prior_mean
        log_det_ratio = self.posterior_precision.log().sum() - self._prior.log().sum()
        scatter = (d * self._prior * d).sum()
        return torch.as_tensor(log_likelihood).to(self.H) / self.temperature - 0.5 * (
            log_det_ratio + scatter
        )

    # -- predictives -------------------------------------------------------------------------- #
    def _params(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n] for n in self.names}

    def functional_variance(
        self, x: Any, chunk_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean logits ``f_mu (N, C)`` and their covariance ``J diag(1/P) J^T`` ``(N, C, C)``
        under the linearised model, Jacobians formed ``chunk_size`` rows at a time."""
        var = self.posterior_variance
        n = _rows(x)
        params = {k: v.detach() for k, v in self._params().items()}

        def f(p: dict[str, torch.Tensor], xb: Any) -> tuple[torch.Tensor, torch.Tensor]:
            out = _logits_functional(self.model, p, xb)
            return out, out

        if chunk_size is None:
            with torch.no_grad():
                c = _logits(self.model, _take(x, slice(0, 1))).shape[-1]
            # Jacobian chunk of about 64 MiB: rows * C * P * itemsize
            item = torch.finfo(self.dtype).bits // 8
            chunk_size = max(1, (64 << 20) // max(1, c * self.n_params * item))
        mus, vars_ = [], []
        for start in range(0, n, chunk_size):
            xb = _take(x, slice(start, start + chunk_size))
            jac, mu = torch.func.jacrev(f, has_aux=True)(params, xb)
            J = torch.cat([jac[k].flatten(start_dim=2) for k in self.names], dim=-1)  # (n, C, P)
            vars_.append(torch.einsum("ncp,p,nkp->nck", J, var, J))
            mus.append(mu.detach())
        return torch.cat(mus), torch.cat(vars_)

    @torch.no_grad()
    def _nn_predictive(self, x: Any, n_samples: int, generator) -> torch.Tensor:
        params = self._params()
        saved = {k: v.detach().clone() for k, v in params.items()}
        probs = None
        try:
            for theta in self.sample(n_samples, generator):
                for k, v in self.to_dict(theta).items():
                    params[k].copy_(v)
                p = torch.softmax(_logits(self.model, x), -1)
                probs = p if probs is None else probs + p
        finally:
            for k, v in saved.items():
                params[k].copy_(v)
        return probs / n_samples

    def predictive(
        self,
        x: Any,
        pred_type: str = "glm",
        link_approx: str = "probit",
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Posterior predictive class probabilities ``(N, C)`` for inputs ``x``.

        Args:
            x: a tensor, a tuple of the model's positional inputs, or a mapping of keyword inputs.
            pred_type: ``"glm"`` (linearised model) or ``"nn"`` (parameter samples; ``"mc"``).
            link_approx: for ``"glm"``: ``"probit"`` (deterministic) or ``"mc"``.
            n_samples: draws for the Monte Carlo predictives.
            generator: random source of the draws.
            chunk_size: rows per Jacobian chunk (``"glm"``).
        """
        if pred_type not in PRED_TYPES:
            raise ValueError(f"pred_type must be one of {PRED_TYPES}; got {pred_type!r}")
        if link_approx not in LINK_APPROX:
            raise ValueError(f"link_approx must be one of {LINK_APPROX}; got {link_approx!r}")
        if pred_type == "nn":
            return self._nn_predictive(x, n_samples, generator)
        mu, var = self.functional_variance(x, chunk_size)
        if link_approx == "probit":
            kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8.0 * var.diagonal(dim1=1, dim2=2))
            return torch.softmax(kappa * mu, dim=-1)
        # f = mu + L eps with L L^T = Sigma; a tiny relative jitter keeps the Cholesky factor
        # defined where Sigma is rank-deficient (fewer random parameters than classes)
        jitter = 1e-10 * var.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        eye = torch.eye(var.shape[-1], dtype=var.dtype, device=var.device)
        L = torch.linalg.cholesky(var + jitter[:, None, None] * eye)
        eps = torch.randn(
            n_samples, *mu.shape, dtype=mu.dtype, device=mu.device, generator=generator
        )
        f = mu + torch.einsum("nck,snk->snc", L, eps)
        return torch.softmax(f, -1).mean(0)

    __call__ = predictive


def _logits_functional(model: nn.Module, params: dict[str, torch.Tensor], x: Any):
    if isinstance(x, Mapping):
        args, kwargs = (), dict(x)
    elif isinstance(x, (tuple, list)):
        args, kwargs = tuple(x), {}
    else:
        args, kwargs = (x,), {}
    out = torch.func.functional_call(model, params, args, kwargs)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out
