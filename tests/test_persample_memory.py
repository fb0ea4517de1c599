"""Peak memory of an EXACT step against one training step, and the chunking that bounds it.

By default the fast path back-propagates as many output columns at once as fit what one training
step of the model holds at its peak (fimfast/chunks.py, ``fast_columns``), streaming the squares
where that is one column (fimfast/persample/stream.py): a step of EXACT then stays
within about twice the training step's peak tensor memory, and any chunking gives the same
estimate as one backward of every column. The peak is the tensor storage live at once, from the
profiler's allocation events (benchmarks/memory.py, ``TensorPeakMeter``): exact and repeatable,
unlike the resident set.

The models here are small: the columns of any of them fit the 4 MiB every step may take
(``chunks.SMALL_BYTES``), so the bound is tested with that floor at zero
(:func:`_no_small_floor`), and the floor itself by :func:`test_small_models_run_one_backward`.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from oracle import rel_error
from tolerances import DET_REL_F64
from torch import nn

import fimfast
from fimfast import chunks
from fimfast.persample import engine as engine_mod

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.memory import TensorPeakMeter  # noqa: E402


def _chunking(model, x, dtype_bytes: int, streamed: bool) -> int:
    """``fast_columns`` of the MLP of :func:`_mlp` by hand: per column ``e R C + 4 (sum|tap| +
    max|tap|)`` against ``8 max(P, sum|tap|) - 8 sum|tap|``; streamed ``e R C + 8 max|tap|``
    against ``4 P + 8 sum|tap|``."""
    N = x.shape[0]
    P = sum(p.numel() for p in model.parameters())
    taps, top = N * (256 + 128), N * 256
    if streamed:
        return max(1, (4 * P + 8 * taps) // (dtype_bytes * N * 10 + 8 * top))
    return max(1, (8 * max(P, taps) - 8 * taps) // (dtype_bytes * N * 10 + 4 * (taps + top)))


def test_default_chunks_plain_where_several_columns_fit(monkeypatch):
    """The MLP's 9 columns, 2 per plain backward: five plain chunks spread as 2, 2, 2, 2, 1 (no
    streaming, no add taps); the estimate of one backward of every column."""
    model, x, y = _mlp(torch.float64)
    assert _chunking(model, x, 8, False) == 2
    sizes = _count_backwards(monkeypatch)
    est = fimfast.DiagFisher(model, "exact", reduction="sum")
    est.step((x, y))
    assert sizes == [2, 2, 2, 2, 1] and not est._persample.add_taps
    sizes.clear()
    one = fimfast.DiagFisher(model, "exact", reduction="sum", class_chunk=9)
    one.step((x, y))
    assert sizes == [9] and not one._persample.add_taps
    assert rel_error(dict(est.result().items()), dict(one.result().items())) <= DET_REL_F64


def _deep_chunking(streamed: bool) -> int:
    """``fast_columns`` of :func:`_deep_tanh` by hand (float32, 512 rows, 7 taps of 64)."""
    model, x, _ = _deep_tanh()
    P = sum(p.numel() for p in model.parameters())
    top = 512 * 64
    taps = 7 * top
    if streamed:
        return max(1, (4 * P + 8 * taps) // (4 * 512 * 10 + 8 * top))
    return max(1, (8 * max(P, taps) - 8 * taps) // (4 * 512 * 10 + 4 * (taps + top)))


def test_default_streams_batches_where_one_plain_column_fits(monkeypatch):
    """Seven hidden layers: one column per plain backward (every tap's gradient held), 6 streamed
    (none held): two streamed backward passes of 5 and 4 columns, the next forward tapping by
    adds; without streaming of several columns, nine of one. Both equal one backward of every
    column."""
    assert (_deep_chunking(False), _deep_chunking(True)) == (1, 6)
    model, x, y = _deep_tanh()
    model.double()
    x = x.double()
    sizes = _count_backwards(monkeypatch)
    est = fimfast.DiagFisher(model, "exact", reduction="sum")
    est.step((x, y))
    assert sizes == [5, 4] and est._persample.add_taps
    sizes.clear()
    single = fimfast.DiagFisher(model, "exact", reduction="sum")
    single._persample.stream_batched = False
    single.step((x, y))
    assert sizes == [1] * 9
    one = fimfast.DiagFisher(model, "exact", reduction="sum", class_chunk=9)
    one.step((x, y))
    for e in (est, single):
        assert rel_error(dict(e.result().items()), dict(one.result().items())) <= DET_REL_F64


def test_a_batch_that_cannot_stream_runs_again_unstreamed(monkeypatch):
    """A streamed batched backward that fails (an operator torch cannot batch with hooks) leaves
    nothing of its squares: the fast groups run again, one column per backward, and the estimate
    is exact."""
    from fimfast.persample import stream

    model, x, y = _deep_tanh()
    model.double()
    x = x.double()
    real = stream.backward
    calls = []

    def failing(flat, handles, cot, retain, on_grad):
        calls.append(cot.shape[0])
        if len(calls) == 2:  # the second chunk, after the first added its squares
            raise stream.Unbatched("no batching rule")
        return real(flat, handles, cot, retain, on_grad)

    monkeypatch.setattr(stream, "backward", failing)
    est = fimfast.DiagFisher(model, "exact", reduction="sum")
    est.step((x, y))
    assert calls == [5, 4] + [1] * 9 and not est._persample.stream_batched
    one = fimfast.DiagFisher(model, "exact", reduction="sum", class_chunk=9)
    one.step((x, y))
    assert rel_error(dict(est.result().items()), dict(one.result().items())) <= DET_REL_F64


def test_hooks_in_a_batched_backward_see_its_gradients():
    from fimfast.persample import stream

    assert stream.batched_hooks_work()


@pytest.fixture(autouse=True)
def _no_small_floor(monkeypatch, request):
    """The training-step bound alone (``SMALL_BYTES`` at zero), except where a test asks for
    the floor."""
    if "small_floor" not in request.keywords:
        monkeypatch.setattr(chunks, "SMALL_BYTES", 0)


@pytest.mark.small_floor
def test_small_models_run_one_backward(monkeypatch):
    """With the floor, the MLP's 9 columns (about 1.4 MiB at once) run in one plain backward,
    equal to the bounded chunking; a budget below the floor still binds; and the floor binds
    no more than 4 MiB of columns (a column of 1.5 MiB against a training bound of none: two
    per backward)."""
    model, x, y = _mlp(torch.float64)
    sizes = _count_backwards(monkeypatch)
    est = fimfast.DiagFisher(model, "exact", reduction="sum")
    est.step((x, y))
    assert sizes == [9]
    sizes.clear()
    monkeypatch.setattr(chunks, "SMALL_BYTES", 0)
    bounded = fimfast.DiagFisher(model, "exact", reduction="sum")
    bounded.step((x, y))
    assert sizes == [2, 2, 2, 2, 1]
    assert rel_error(dict(est.result().items()), dict(bounded.result().items())) <= DET_REL_F64
    monkeypatch.setattr(chunks, "SMALL_BYTES", 4 << 20)
    monkeypatch.setenv("FIMFAST_MEMORY_BUDGET_MB", "1")
    assert chunks.fast_columns(torch.zeros(64, 10), [Tap(64, 2048), Tap(64, 2048)], None,
                               None, 10) == 1
    monkeypatch.delenv("FIMFAST_MEMORY_BUDGET_MB")
    per_col = 4 * 640 + 4 * (2 * 64 * 2048 + 64 * 2048)  # about 1.5 MiB
    assert chunks.fast_columns(torch.zeros(64, 10), [Tap(64, 2048), Tap(64, 2048)], None,
                               None, 10) == (4 << 20) // per_col == 2
    # a training step of less than 1 MiB (4 max(P, sum|tap|) bytes: here 1 MiB less 512
    # bytes) is small: its columns may take twice the floor
    per_col = 4 * 640 + 4 * (2 * 64 * 2047 + 64 * 2047)
    assert chunks.fast_columns(torch.zeros(64, 10), [Tap(64, 2047), Tap(64, 2047)], None,
                               None, 10) == (8 << 20) // per_col == 5


class _BiasKV(nn.Module):
    """Linear, ``MultiheadAttention(add_bias_kv=True)`` with a residual, mean over tokens, a
    Linear classifier: the ``mha_bias_kv`` workload of benchmarks/bench_recurrent.py, smaller."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True, add_bias_kv=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(torch.tanh(a + h).mean(1))


@pytest.mark.small_floor
def test_small_step_runs_its_columns_in_one_backward(monkeypatch):
    """A model whose training step holds far less than 1 MiB runs its 9 columns in one batched
    backward where they take more than ``SMALL_BYTES`` (set to two thirds of them here), not
    less than twice that; the sums are those of three chunks of 3."""
    torch.manual_seed(0)
    model = _BiasKV().double()
    x, y = torch.randn(6, 5, 8, dtype=torch.float64), torch.randint(0, 10, (6,))
    # per column: the (6, 10) cotangent, the taps (input layer 480, packed projections 1440,
    # bias_k and bias_v 96 each, output projection 480) and the largest tap once
    u = 8 * 60 + 4 * (480 + 1440 + 2 * 96 + 480 + 1440)
    monkeypatch.setattr(chunks, "SMALL_BYTES", 9 * u * 2 // 3)  # 6 columns: chunks of 5 and 4
    assert 4 * max(sum(p.numel() for p in model.parameters()), 2592) < 9 * u * 2 // 3 // 4
    sizes = _count_backwards(monkeypatch)
    est = fimfast.DiagFisher(model, "exact", reduction="sum")
    est.step((x, y))
    assert sizes == [9]
    sizes.clear()
    chunked = fimfast.DiagFisher(model, "exact", reduction="sum", class_chunk=4)
    chunked.step((x, y))
    assert sizes == [3, 3, 3]
    assert rel_error(dict(est.result().items()), dict(chunked.result().items())) <= DET_REL_F64


class Tap:
    def __init__(self, *shape):
        self.shape = shape


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(196, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                          nn.Linear(128, 10)).to(dtype)
    x = torch.randn(64, 196, dtype=dtype)
    y = torch.randint(0, 10, (64,))
    return model, x, y


def _peak(fn) -> float:
    m = TensorPeakMeter()
    m.begin()
    out = fn()
    peak = m.end()
    del out
    return peak


def _train_and_step_peaks(model, est, train, step) -> tuple[float, float]:
    """Peak tensor memory of a training step and of ``step``, after two warm rounds of each
    (plans, probes and taps settle)."""
    for _ in range(2):
        train()
        step()
    model.zero_grad(set_to_none=True)
    est.reset()
    t = max(_peak(train) for _ in range(2))
    model.zero_grad(set_to_none=True)
    e = max(_peak(step) for _ in range(2))
    return t, e


def _count_backwards(monkeypatch) -> list[int]:
    """Patch the fast path's batched backward to record each chunk's number of columns."""
    sizes: list[int] = []
    batched, streamed = engine_mod._tap_grads, engine_mod._stream

    def counting(rows, taps, cot, *a):
        sizes.append(cot.shape[0])
        return batched(rows, taps, cot, *a)

    def counting_stream(rows, calls, groups, cot, *a):
        sizes.append(cot.shape[0])
        return streamed(rows, calls, groups, cot, *a)

    monkeypatch.setattr(engine_mod, "_tap_grads", counting)
    monkeypatch.setattr(engine_mod, "_stream", counting_stream)
    return sizes


def test_exact_step_peak_within_twice_a_training_step():
    model, x, y = _mlp()

    def train():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    est = fimfast.DiagFisher(model, "exact", reduction="sum")

    def exact():
        est.reset()
        est.step((x, y))

    t, e = _train_and_step_peaks(model, est, train, exact)
    assert e <= 2.0 * t, (e, t)
    # every column in one backward holds them all at once: well over the bound
    big = fimfast.DiagFisher(model, "exact", reduction="sum", class_chunk=9)
    for _ in range(2):
        big.reset()
        big.step((x, y))
    big.reset()
    assert _peak(lambda: big.step((x, y))) > 2.0 * t


def test_default_chunks_are_bounded_by_a_training_step(monkeypatch):
    """float32: 2 columns per plain backward: 2, 2, 2, 2, 1."""
    model, x, y = _mlp()
    assert _chunking(model, x, 4, False) == 2
    sizes = _count_backwards(monkeypatch)
    est = fimfast.DiagFisher(model, "exact", reduction="sum")
    est.step((x, y))
    assert sizes == [2, 2, 2, 2, 1]


def test_default_chunks_are_the_largest_within_twice_a_training_step(monkeypatch):
    """MLP 784-512-256-10, 128 samples (workload (a) of benchmarks/workloads.py): the parameters
    outweigh the layer outputs, so 5 of the 9 columns fit per plain backward (chunks of 5 and 4)
    within twice the training step's peak; the next larger chunking, one backward of all 9,
    does not fit. Both give the same estimate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    sizes = _count_backwards(monkeypatch)

    def train():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    runs = {}
    for chunk in (None, 9):
        est = fimfast.DiagFisher(model, "exact", reduction="sum", class_chunk=chunk)

        def exact(est=est):
            est.reset()
            est.step((x, y))

        sizes.clear()
        t, e = _train_and_step_peaks(model, est, train, exact)
        runs[chunk] = (sizes[-2:] if chunk is None else sizes[-1:], e / t, est.result())
    assert runs[None][0] == [5, 4] and runs[9][0] == [9]
    assert runs[None][1] <= 2.0 < runs[9][1], (runs[None][1], runs[9][1])
    assert rel_error(dict(runs[None][2].items()), dict(runs[9][2].items())) <= 1e-5


@pytest.mark.parametrize("budget_mb", ["0.0001", "100000"])
def test_the_smaller_budget_wins(monkeypatch, budget_mb):
    """``FIMFAST_MEMORY_BUDGET_MB`` below a training step's peak chunks further; above it, the
    training step's peak is the bound."""
    model, x, y = _mlp(torch.float64)
    sizes = _count_backwards(monkeypatch)
    est = fimfast.DiagFisher(model, "exact", reduction="sum")
    est.step((x, y))
    default = list(sizes)
    ref = fimfast.DiagFisher(model, "exact", reduction="sum", class_chunk=9)  # one backward
    ref.step((x, y))
    monkeypatch.setenv("FIMFAST_MEMORY_BUDGET_MB", budget_mb)
    sizes.clear()
    est2 = fimfast.DiagFisher(model, "exact", reduction="sum")
    est2.step((x, y))
    if budget_mb == "0.0001":
        assert sizes == [1] * 9
    else:
        assert sizes == default
    assert rel_error(dict(est2.result().items()), dict(ref.result().items())) <= DET_REL_F64


def test_fast_columns_counts_the_step_parameters():
    class Tap:
        def __init__(self, *shape):
            self.shape = shape

    flat = torch.zeros(4, 3)
    taps = [Tap(4, 100), Tap(4, 50)]
    per_col = 4 * 12 + 4 * (600 + 400)
    assert chunks.fast_columns(flat, taps, None, None, 10**4, budget=2**30) == (
        (8 * 10**4 - 8 * 600) // per_col
    )
    streamed = 4 * 12 + 8 * 400  # no tap gradient held to the end
    assert chunks.fast_columns(flat, taps, None, None, 10**4, budget=2**30, streamed=True) == (
        (4 * 10**4 + 8 * 600) // streamed
    )


def _deep_tanh():
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(32, 64)]
    for _ in range(6):
        layers += [nn.Tanh(), nn.Linear(64, 64)]
    layers += [nn.Tanh(), nn.Linear(64, 10)]
    return nn.Sequential(*layers), torch.randn(512, 32), torch.randint(0, 10, (512,))


def test_one_column_backward_streams_its_squares():
    """With one column per backward, each call's squares are formed as its gradients arrive and
    the gradients dropped: the 7 hidden layers' column gradients (0.9 MB here) are never all
    alive at once. Measured: 1.96x the training step streamed, 2.55x when every tap's gradient
    is kept to the end of the backward."""
    model, x, y = _deep_tanh()

    def train():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    est = fimfast.DiagFisher(model, "exact", reduction="sum", class_chunk=1)

    def exact():
        est.reset()
        est.step((x, y))

    t, e = _train_and_step_peaks(model, est, train, exact)
    assert est._persample.add_taps  # the next forward taps by adds
    assert e <= 2.2 * t, (e, t)


@pytest.mark.parametrize("per_backward", [1, 3])
@pytest.mark.parametrize("name", ["relu_mlp", "cnn", "encoder", "tied", "token_lm"])
def test_streamed_steps_match_one_backward(monkeypatch, name, per_backward):
    """Three steps streamed with ``per_backward`` columns per backward (the first with direct
    taps where the model allows, the next ones with add taps; 3: one batched backward of 3
    columns with hooks, fimfast/persample/stream.py) sum to three times the estimate of one
    backward of every column, in float64."""
    from cases import make_case

    monkeypatch.setattr(engine_mod, "_columns", lambda *a: (per_backward, True))
    case = make_case(name).to(torch.float64)
    kw = dict(likelihood=case.likelihood, reduction="sum")
    streamed = fimfast.DiagFisher(case.model, "exact", **kw)
    sizes = _count_backwards(monkeypatch)
    for _ in range(3):
        streamed.step(case.batch)
    assert streamed._persample.add_taps and max(sizes) <= per_backward
    assert (max(sizes) > 1) == (per_backward > 1)  # several columns in one streamed backward
    monkeypatch.undo()
    ref = fimfast.DiagFisher(case.model, "exact", class_chunk=10**6, **kw)
    ref.step(case.batch)
    want = {k: 3 * v for k, v in ref.result().items()}
    assert rel_error(dict(streamed.result().items()), want) <= DET_REL_F64
    assert not streamed._persample.last_plan.generic


def test_tensor_peak_meter_counts_live_storage():
    """Hand-computed peaks: 2 MiB live, then 4 MiB at once, everything freed; a tensor allocated
    before the meter started and freed inside is not subtracted (the profiler does not report
    it): an upper bound then."""
    before = torch.ones(2**18)  # 1 MiB, allocated before the meter starts

    def calls():
        a = torch.empty(2**19)  # 2 MiB
        b = torch.empty(2**19)  # 4 MiB live
        del a, b
        c = torch.empty(2**18)  # 1 MiB
        return c

    assert _peak(calls) == 4.0
    holder = [before]
    del before

    def frees_first():
        holder.clear()  # -1 MiB, not seen
        return torch.empty(2**19)  # +2 MiB

    assert _peak(frees_first) == 2.0  # 1.0 if the earlier tensor's free were subtracted


def test_tensor_peak_meter_leaves_out_frees_of_older_storage():
    """Storage an earlier window allocated (so the profiler knows its size) and a later window
    frees is not subtracted either: 2.0, not 1.0."""
    m = TensorPeakMeter()
    m.begin()
    held = torch.ones(2**18)  # 1 MiB
    assert m.end() == 1.0

    def frees_first():
        nonlocal held
        held = None  # -1 MiB, reported with its size this time
        return torch.empty(2**19)  # +2 MiB

    assert _peak(frees_first) == 2.0


def _side_task(n: int) -> torch.Tensor:
    a = torch.ones(n)
    b = torch.ones(n)  # 8 MiB live at once for n = 2**20
    return a.sum() + b.sum()


def _forked(n: int) -> torch.Tensor:
    return torch.jit.wait(torch.jit.fork(_side_task, n))


def test_tensor_peak_meter_counts_only_the_calling_thread():
    """A task forked onto torch's inter-op pool runs on another thread that the profiler follows
    (its allocations are reported): its 8 MiB are not counted, the caller's 2 MiB are."""
    with warnings.catch_warnings():  # TorchScript's fork is what runs on the inter-op pool
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            forked = torch.jit.script(_forked)
        except Exception as exc:  # noqa: BLE001 - a torch without TorchScript
            pytest.skip(f"TorchScript unavailable: {exc}")

    def calls():
        a = torch.empty(2**19)  # 2 MiB on the calling thread
        s = forked(2**20)  # 8 MiB allocated and freed on an inter-op thread
        del a
        return s

    assert _peak(calls) == 2.0


class _Switch(nn.Module):
    """Modifies its hidden layer's output in place only when ``inplace`` is set."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.inplace = False

    def forward(self, x):
        h = self.a(x)
        if self.inplace:
            h.mul_(torch.tanh(h))
        else:
            h = h * torch.tanh(h)
        return self.head(torch.tanh(self.b(h)))


def test_streamed_steps_tap_by_adds_and_stay_exact_when_outputs_change_in_place():
    """After a step with one column per backward, every output is tapped by an add (nothing
    direct, nothing held): an output modified in place later keeps its parameters on the fast
    path, and every step equals the generic path."""
    torch.manual_seed(0)
    m = _Switch().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0, 2])
    est = fimfast.DiagFisher(m, "exact", class_chunk=1)
    ref = fimfast.DiagFisher(m, "exact")
    ref._persample.use_rules = False
    for inplace in (False, False, True, True):
        m.inplace = inplace
        for e in (est, ref):
            e.reset()
            e.step((x, y))
        eng = est._persample
        assert eng.add_taps and not eng.last_plan.generic
        assert all(not t.direct and t.keep is None for c in eng.last_plan.calls for t in c.taps)
        assert rel_error(dict(est.result().items()), dict(ref.result().items())) <= DET_REL_F64


def test_bench_summary_takes_ratios_per_round():
    """benchmarks/bench_exact_memory.py: time ratios are per round (each call over the floor of
    its own round), memory ratios over the floor's step."""
    from benchmarks.bench_exact_memory import summarize

    res = {
        "memory": {"floor": {"step_tensor_mb": 2.0}, "exact": {"step_tensor_mb": 3.0,
                                                              "call_tensor_mb": 5.0}},
        "time": {"cpu_ms": {"floor": [1.0, 4.0, 2.0], "exact": [3.0, 8.0, 2.0]}},
    }
    row = summarize(res)["exact"]
    assert row["step_tensor_x_floor"] == 1.5 and row["call_tensor_x_floor"] == 2.5
    assert row["cpu_ratio"] == {"median": 2.0, "min": 1.0, "max": 3.0}  # not 3 / 2 = 1.5


def test_batched_grads_equal_autograd_grad():
    """``stream.batched_grads`` (one engine call, no ``autograd.grad`` wrappers) against
    ``torch.autograd.grad(..., is_grads_batched=True)``: the same gradients bit for bit, ``None``
    for an input the outputs do not reach, and the graph kept for a second call."""
    from fimfast.persample import stream

    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    unused = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    h = x @ w
    z = torch.tanh(h) @ w.t()
    cot = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    got = stream.batched_grads(z, [h, w, unused], cot, True)
    want = torch.autograd.grad(z, [h, w, unused], cot, is_grads_batched=True, allow_unused=True,
                               retain_graph=True)
    assert got[2] is None and want[2] is None
    for a, b in zip(got[:2], want[:2]):
        assert a.shape == b.shape and torch.equal(a, b)
    again = stream.batched_grads(z, [w], cot[:1], False)
    assert torch.equal(again[0], want[1][:1])
