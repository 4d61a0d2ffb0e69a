"""GradCache gives the gradients of plain full-batch training (model parameters and τ)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from umarvel_lib.train.gradcache import GradCache, RandContext, grad_cache_step, split_inputs
from umarvel_lib.train.losses import info_nce


class TinyEmbedder(nn.Module):
    def __init__(self, d_in=6, d_out=5, p=0.3):
        super().__init__()
        self.l1, self.drop, self.l2 = nn.Linear(d_in, 16), nn.Dropout(p), nn.Linear(16, d_out)
        self.tau = nn.Parameter(torch.tensor(0.05))

    def forward(self, x):
        if isinstance(x, dict):
            x = x["x"]
        if isinstance(x, list):
            x = torch.stack(x)
        return F.normalize(self.l2(self.drop(torch.tanh(self.l1(x)))), dim=-1)


def _setup(p=0.3, B=7, K=0, seed=0):
    torch.manual_seed(seed)
    model = TinyEmbedder(p=p).double()
    g = torch.Generator().manual_seed(seed + 1)
    xq = torch.randn(B, 6, generator=g, dtype=torch.float64)
    xc = torch.randn(B, 6, generator=g, dtype=torch.float64)
    xh = torch.randn(B * K, 6, generator=g, dtype=torch.float64) if K else None
    return model, xq, xc, xh


def _loss_fn(model, K=0, symmetric=False):
    def fn(q, c, h=None):
        hn = h.view(q.shape[0], K, -1) if h is not None else None
        return info_nce(q, c, model.tau, hard_negatives=hn, symmetric=symmetric)

    return fn


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _reference(model, inputs, chunk, loss_fn, seed):
    """Plain training: every chunk forwarded *with* graph in the same order, one full-batch loss."""
    model.zero_grad()
    torch.manual_seed(seed)
    embs = [torch.cat([model(ch) for ch in split_inputs(x, chunk)]) for x in inputs]
    loss = loss_fn(*embs)
    loss.backward()
    return loss.detach(), _grads(model), torch.get_rng_state()


def _cached(model, inputs, chunk, loss_fn, seed, **kw):
    model.zero_grad()
    torch.manual_seed(seed)
    loss = grad_cache_step(model, inputs, loss_fn, chunk, **kw)
    return loss, _grads(model), torch.get_rng_state()


# chunk >= batch: every stream is one chunk and grad_cache_step takes its plain single-forward path
@pytest.mark.parametrize(
    "K,symmetric,chunk",
    [(0, False, 3), (0, True, 2), (2, False, 4), (3, False, 1), (0, True, 7), (2, False, 64)],
)
def test_gradcache_equals_full_batch_with_dropout(K, symmetric, chunk):
    model, xq, xc, xh = _setup(p=0.3, K=K)
    inputs = (xq, xc) if not K else (xq, xc, xh)
    lf = _loss_fn(model, K, symmetric)
    l_ref, g_ref, rng_ref = _reference(model, inputs, chunk, lf, seed=123)
    l_gc, g_gc, rng_gc = _cached(model, inputs, chunk, lf, seed=123)
    assert torch.allclose(l_ref, l_gc, atol=1e-10)
    assert g_ref.keys() == g_gc.keys()
    for n in g_ref:
        assert torch.allclose(g_ref[n], g_gc[n], atol=1e-5, rtol=0), n
        assert torch.allclose(g_ref[n], g_gc[n], atol=1e-10), n  # float64: essentially exact
    assert g_gc["tau"].abs() > 0
    # the RNG is left where plain training leaves it (resume/determinism downstream)
    assert torch.equal(rng_ref, rng_gc)


def test_gradcache_equals_single_forward_without_dropout():
    model, xq, xc, _ = _setup(p=0.0, B=8)
    lf = _loss_fn(model)
    model.zero_grad()
    loss = lf(model(xq), model(xc))
    loss.backward()
    g_full = _grads(model)
    l_gc, g_gc, _ = _cached(model, (xq, xc), 3, lf, seed=0)
    assert torch.allclose(loss.detach(), l_gc, atol=1e-10)
    for n in g_full:
        assert torch.allclose(g_full[n], g_gc[n], atol=1e-10), n


def test_rng_replay_is_what_makes_dropout_match():
    model, xq, xc, _ = _setup(p=0.5)
    lf = _loss_fn(model)
    _, g_ref, _ = _reference(model, (xq, xc), 3, lf, seed=7)
    _, g_bad, _ = _cached(model, (xq, xc), 3, lf, seed=7, replay_rng=False)
    assert not all(torch.allclose(g_ref[n], g_bad[n], atol=1e-5) for n in g_ref)


def test_gradcache_accumulates_and_takes_list_and_dict_inputs():
    model, xq, xc, _ = _setup(p=0.2, B=6)
    lf = _loss_fn(model)
    _, g_ref, _ = _reference(model, (xq, xc), 4, lf, seed=3)
    gc = GradCache([model, model], lf, chunk_size=4)
    model.zero_grad()
    torch.manual_seed(3)
    gc(list(xq), {"x": xc})  # a list of items and a dict of tensors
    for n in g_ref:
        assert torch.allclose(g_ref[n], model.get_parameter(n).grad, atol=1e-10), n
    # gradients accumulate (caller zeroes them), as with loss.backward()
    torch.manual_seed(3)
    gc(list(xq), {"x": xc})
    for n in g_ref:
        assert torch.allclose(2 * g_ref[n], model.get_parameter(n).grad, atol=1e-10), n


def test_split_inputs_and_rand_context():
    assert split_inputs([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    parts = split_inputs({"a": torch.arange(5), "b": list("abcde")}, 3)
    assert [p["b"] for p in parts] == [list("abc"), list("de")]
    with pytest.raises(ValueError):
        split_inputs({"a": torch.arange(5), "b": [1]}, 2)
    torch.manual_seed(0)
    ctx = RandContext()
    a = torch.rand(3)
    with ctx:
        b = torch.rand(3)
    c = torch.rand(3)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_python_and_numpy_randomness_in_encode_is_replayed():
    """A collate that samples (e.g. random instructions) sees the same draws in both passes."""
    import random

    import numpy as np

    model, xq, xc, _ = _setup(p=0.0, B=6)

    def enc(x):
        shift = random.random() + float(np.random.rand())
        return model(x + shift)

    lf = _loss_fn(model)

    def reference():
        model.zero_grad()
        random.seed(5), np.random.seed(5)
        embs = [torch.cat([enc(ch) for ch in split_inputs(x, 4)]) for x in (xq, xc)]
        lf(*embs).backward()
        return _grads(model), random.random()

    g_ref, nxt_ref = reference()
    model.zero_grad()
    random.seed(5), np.random.seed(5)
    grad_cache_step(enc, (xq, xc), lf, 4)
    for n in g_ref:
        assert torch.allclose(g_ref[n], model.get_parameter(n).grad, atol=1e-10), n
    assert random.random() == nxt_ref
