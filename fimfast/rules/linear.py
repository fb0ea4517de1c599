"""Rules for linear maps: ``nn.Linear`` and Hugging Face's ``Conv1D`` (GPT-2's projections)."""

from __future__ import annotations

from fimfast.hooks import Call, Use
from fimfast.rules.base import Rule, UseKind, _linear_terms, trainable


class LinearRule(Rule):
    """``nn.Linear``: ``W`` gets ``Outer(G, x)``, ``b`` gets ``sum_t G``; sequence inputs share
    the weight over their tokens (``T > 1``).

    The engine gives the logits layer of this rule a closed form (``closed_form_head``) that
    reads ``call.data["x"]`` as the input of ``F.linear(x, weight, bias)``: a subclass for a
    module that computes anything else sets ``closed_form_head = False`` (or subclasses
    :class:`~fimfast.rules.Rule` instead)."""

    name = "linear"
    takes_functions = True  # its terms tell uses apart by position or kind
    transposed = False  # weight stored (out, in)
    closed_form_head = True  # the logits layer's squares need no backward column

    def capture(self, cap, module, x, y):
        w, b = module.weight, module.bias

        def build():
            return [
                Use(p, UseKind.OUTER, transposed=self.transposed) if p is w else Use(p, UseKind.VEC)
                for p in trainable(cap, w, b)
            ]

        uses, internal, key = cap.uses_of(module, self, (w, b), build)
        tap, out = cap.tap(y, lead=y.dim() - 1, key=(id(module), 0))
        cap.record(Call(module, self, [tap], uses, {"x": x.detach()}), internal, key)
        return out

    def terms(self, call, grads):
        return _linear_terms(call, grads[0], call.taps[0], call.data, "x", call.uses)


class HFConv1DRule(LinearRule):
    """Hugging Face ``Conv1D`` (GPT-2's projections): a Linear layer whose weight is stored
    ``(in, out)``, ``y = x @ W + b``; its squared products are formed transposed."""

    name = "hf_conv1d"
    transposed = True
