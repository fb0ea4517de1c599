"""Rule for ``nn.Embedding``: per-sample segment sums of the output gradients by token id."""

from __future__ import annotations

from fimfast.hooks import Call, Use
from fimfast.rules.base import Rows, Rule, UseKind, front, trainable


class EmbeddingRule(Rule):
    """``nn.Embedding`` (``padding_idx``, ``max_norm``): per-sample segment sum of the output
    gradients by token id; ``padding_idx`` tokens do not count."""

    name = "embedding"

    def accepts(self, module):
        # scale_grad_by_freq divides by counts over the whole batch: not a per-sample gradient
        return not module.scale_grad_by_freq

    def capture(self, cap, module, x, y):
        uses = [Use(p, UseKind.ROWS) for p in trainable(cap, module.weight)]
        N = cap.batch_size
        if cap.expand_broadcast and N is not None and N > 1 and x.dim() >= 2 and x.shape[0] == 1:
            # a lookup shared by the batch (position ids (1, T), as in BERT and GPT-2): the
            # gradient at its (1, T, d) output is summed over the samples. Expanded to the batch
            # (a stride-0 view) it gives every broadcasting consumer the same values, and the tap
            # per-sample gradients; otherwise the table would take the generic path (one
            # backward per row: 40 s instead of 0.3 s for MiniLM, B=32). A forward that fails
            # with the expanded output is run again without (see fimfast.persample.Engine).
            x = x.expand(N, *x.shape[1:])
            y = y.expand(N, *y.shape[1:])
            cap.expanded += 1
        elif (
            cap.expand_flat and N is not None and N > 1 and x.dim() == 1 and y.dim() == 2
            and x.shape[0] != N  # ids (N,): one id per sample, already batched
        ):
            # ids of shape (T,) (nanoGPT's positions): the (T, d) output broadcasts over the
            # batch; expanded to (N, T, d) it gains a dimension, which a consumer indexing or
            # reducing over the first dimension would read differently: the engine checks the
            # logits of the first forward that does this against the model's own
            x = x.unsqueeze(0).expand(N, -1)
            y = y.unsqueeze(0).expand(N, -1, -1)
            cap.expanded += 1
            cap.expanded_flat += 1
        tap, out = cap.tap(y, lead=y.dim() - 1, key=(id(module), 0))
        cap.record(Call(module, self, [tap], uses, {"ids": x.detach()}))
        return out

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None]
        tap = call.taps[0]
        if "front" not in call.data:
            ids = front(call.data["ids"], tap.bdim, tap.lead)  # (N, S)
            pi = call.module.padding_idx
            call.data["front"] = (ids.long(), None if pi is None else ids != pi)
        ids, keep = call.data["front"]
        Qe = front(G, tap.bdim, tap.lead, extra=1)
        return [Rows(ids, keep, Qe)]
