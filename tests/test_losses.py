"""InfoNCE / distillation math on tiny embeddings (see umarvel_lib/train/losses.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from umarvel_lib.models.reranker import DEFAULT_FUSION_WEIGHTS, fused_teacher, fusion_weights
from umarvel_lib.train.losses import (
    DistillKLLoss,
    InfoNCELoss,
    distill_kl,
    gather_with_grad,
    info_nce,
    info_nce_logits,
)


def _emb(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_info_nce_equals_hand_written_cross_entropy():
    q, c = _emb(5, 8, seed=1), _emb(5, 8, seed=2)
    tau = torch.tensor(0.05, dtype=torch.float64)
    want = 0.0
    for i in range(5):
        logits = [float(q[i] @ c[j]) / 0.05 for j in range(5)]
        m = max(logits)
        lse = m + math.log(sum(math.exp(v - m) for v in logits))
        want += lse - logits[i]
    want /= 5
    assert float(info_nce(q, c, tau)) == pytest.approx(want, rel=1e-10)


def test_info_nce_matches_mnrl_math():
    """sentence-transformers MultipleNegativesRankingLoss: CE(scale * cos_sim(a, p), arange), scale = 1/τ."""
    q, c = _emb(6, 4, seed=3) * 3.0, _emb(6, 4, seed=4) * 0.5  # MNRL normalises inside cos_sim
    tau = 0.05
    scale = 1 / tau
    cos = F.normalize(q, dim=-1) @ F.normalize(c, dim=-1).T
    mnrl = F.cross_entropy(cos * scale, torch.arange(6))
    ours = info_nce(
        F.normalize(q, dim=-1), F.normalize(c, dim=-1), torch.tensor(tau, dtype=torch.float64)
    )
    assert torch.allclose(ours, mnrl, atol=1e-12)


def test_symmetric_is_sum_of_both_directions():
    q, c = _emb(4, 8, seed=5), _emb(4, 8, seed=6)
    tau = torch.tensor(0.07, dtype=torch.float64)
    both = info_nce(q, c, tau, symmetric=True)
    assert torch.allclose(both, info_nce(q, c, tau) + info_nce(c, q, tau), atol=1e-12)
    lab = torch.arange(4)
    assert torch.allclose(
        both, F.cross_entropy(q @ c.T / tau, lab) + F.cross_entropy(c @ q.T / tau, lab), atol=1e-12
    )


def test_hard_negative_logits_shape_and_content():
    B, K, D = 3, 2, 8
    q, c, hn = _emb(B, D, seed=7), _emb(B, D, seed=8), _emb(B, K, D, seed=9)
    tau = torch.tensor(0.05, dtype=torch.float64)
    logits, labels = info_nce_logits(q, c, tau, hard_negatives=hn)
    assert logits.shape == (B, B * (1 + K))
    assert labels.tolist() == [0, 1, 2]
    # every query sees every positive and every hard negative of the batch (official block order)
    for i in range(B):
        for j in range(B):
            assert torch.isclose(logits[i, j], q[i] @ c[j] / tau)
            for k in range(K):
                assert torch.isclose(logits[i, B * (1 + k) + j], q[i] @ hn[j, k] / tau)
    # a hard negative identical to the positive makes the loss larger than without negatives
    assert info_nce(q, c, tau, hard_negatives=hn) > info_nce(q, c, tau)


def test_hard_negatives_only_label_zero():
    B, K, D = 4, 3, 8
    q, c, hn = _emb(B, D, seed=10), _emb(B, D, seed=11), _emb(B, K, D, seed=12)
    tau = torch.tensor(0.1, dtype=torch.float64)
    logits, labels = info_nce_logits(q, c, tau, hard_negatives=hn, hard_negatives_only=True)
    assert logits.shape == (B, 1 + K) and labels.tolist() == [0] * B
    want = torch.stack([torch.cat([(q[i] @ c[i]).view(1), hn[i] @ q[i]]) for i in range(B)]) / tau
    assert torch.allclose(logits, want)
    loss = info_nce(q, c, tau, hard_negatives=hn, hard_negatives_only=True)
    assert torch.allclose(loss, F.cross_entropy(want, torch.zeros(B, dtype=torch.long)))
    with pytest.raises(ValueError):
        info_nce(q, c, tau, hard_negatives_only=True)
    with pytest.raises(ValueError):
        info_nce(q, c, tau, hard_negatives=hn, hard_negatives_only=True, symmetric=True)


def test_tau_is_raw_and_gets_gradient():
    q, c = _emb(4, 8, seed=13), _emb(4, 8, seed=14)
    tau = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    loss = info_nce(q, c, tau)
    loss.backward()
    # d/dτ of CE(s/τ) = (1/τ²) Σ_i (s_ii - Σ_j p_ij s_ij) / B
    s = q @ c.T
    p = torch.softmax(s / 0.05, dim=1)
    want = (s.diag() - (p * s).sum(1)).mean() / 0.05**2
    assert torch.allclose(tau.grad, want)
    # no clamp: a tiny τ is used as is
    assert torch.allclose(
        info_nce_logits(q, c, torch.tensor(1e-4, dtype=torch.float64))[0], s / 1e-4
    )


def test_module_wrappers_and_gather_identity():
    q, c = _emb(4, 8, seed=15), _emb(4, 8, seed=16)
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x
    tau = torch.tensor(0.05, dtype=torch.float64)
    assert torch.equal(InfoNCELoss()(q, c, tau), info_nce(q, c, tau))
    assert torch.equal(InfoNCELoss(symmetric=True)(q, c, tau), info_nce(q, c, tau, symmetric=True))
    s, t = _emb(2, 5, seed=1), _emb(2, 5, seed=2)
    assert torch.equal(DistillKLLoss()(s, t, tau), distill_kl(s, t, tau))


def test_distill_kl_zero_when_equal_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(3, 50, generator=g, dtype=torch.float64) * 2 - 1
    tau = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    assert float(distill_kl(cos, cos.clone(), tau).detach()) == pytest.approx(0.0, abs=1e-12)
    other = torch.rand(3, 50, generator=g, dtype=torch.float64)
    loss = distill_kl(cos, other, tau)
    assert float(loss.detach()) > 0
    # equals torch's kl_div(batchmean) and τ only gets gradient through the student
    want = F.kl_div(
        F.log_softmax(cos / 0.05, -1), F.softmax(other / 0.05, -1), reduction="batchmean"
    )
    assert torch.allclose(loss, want)
    loss.backward()
    t2 = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    F.kl_div(
        F.log_softmax(cos / t2, -1), F.softmax(other / 0.05, -1), reduction="batchmean"
    ).backward()
    assert torch.allclose(tau.grad, t2.grad)


def test_distill_kl_mask_ignores_padding():
    g = torch.Generator().manual_seed(1)
    s, t = torch.rand(2, 6, generator=g), torch.rand(2, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    full = distill_kl(s, t, 0.1, mask=mask)
    row0 = distill_kl(s[:1, :4], t[:1, :4], 0.1) * 1
    row1 = distill_kl(s[1:], t[1:], 0.1)
    assert torch.allclose(full, (row0 + row1) / 2, atol=1e-6)
    assert torch.isfinite(full)


def test_fused_teacher_and_task_weights():
    cos = torch.tensor([[0.5, 0.2], [0.4, 0.1]])
    p = torch.tensor([[0.9, 0.1], [0.8, 0.3]])
    assert torch.allclose(fused_teacher(cos, p, 1.0), (cos + p) / 2)
    w = fusion_weights(["mscoco_task0", "webqa_task1"])
    assert w.tolist() == [0.5, 1.0]
    assert torch.allclose(
        fused_teacher(cos, p, w),
        torch.tensor([[0.5 + 0.45, 0.2 + 0.05], [0.4 + 0.8, 0.1 + 0.3]]) / 2,
    )
    assert fusion_weights(["mscoco_task3", "syn_mscoco_task3"]).tolist() == pytest.approx(
        [0.1, 0.1]
    )
    assert DEFAULT_FUSION_WEIGHTS["mscoco_task0"] == 0.5


# ------------------------------------------------------------------------------------------
# two CPU ranks (gloo): gathered loss and gradients equal the single-process full batch
# ------------------------------------------------------------------------------------------
_SHARDS = [(0, 3), (3, 8)]  # uneven on purpose (exercises the padding path)
_K = 2


def _dist_data():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(8, 6, generator=g, dtype=torch.float64),
        torch.randn(8, 6, generator=g, dtype=torch.float64),
        torch.randn(8, _K, 6, generator=g, dtype=torch.float64),
    )


def _dist_model():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5).double()
    tau = torch.nn.Parameter(torch.tensor(0.05, dtype=torch.float64))
    return lin, tau


def _dist_run(lin, tau, xq, xc, xh, mode):
    """One forward/backward of mode on the given (local or full) rows; returns loss."""
    from umarvel_lib.train.gradcache import grad_cache_step

    def enc(x):
        return F.normalize(lin(x), dim=-1)

    loss_mod = InfoNCELoss(symmetric=(mode == "symmetric"))
    if mode == "gradcache":
        B = xq.shape[0]

        def fn(q, c, h):
            return loss_mod(q, c, tau, hard_negatives=h.view(B, _K, -1))

        return grad_cache_step(enc, (xq, xc, xh.reshape(-1, 6)), fn, chunk_size=2)
    loss = loss_mod(enc(xq), enc(xc), tau, hard_negatives=enc(xh) if mode == "hn" else None)
    loss.backward()
    return loss.detach()


_MODES = ("plain", "symmetric", "hn", "gradcache")


def _gather_worker(rank, world, port, out_dir):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        xq, xc, xh = _dist_data()
        a, b = _SHARDS[rank]
        res = {}
        for mode in _MODES:
            lin, tau = _dist_model()
            loss = _dist_run(lin, tau, xq[a:b], xc[a:b], xh[a:b], mode)
            grads = [p.grad.clone() for p in lin.parameters()]
            for gr in grads:
                dist.all_reduce(gr)  # sum over ranks
            taus = [torch.zeros_like(tau.grad) for _ in range(world)]
            dist.all_gather(taus, tau.grad.clone())
            res[mode] = {"loss": loss, "grads": grads, "tau_grads": taus}
        if rank == 0:
            torch.save(res, os.path.join(out_dir, "res.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_two_ranks_equals_full_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    res = torch.load(tmp_path / "res.pt")
    xq, xc, xh = _dist_data()
    for mode in _MODES:
        lin, tau = _dist_model()
        if mode == "gradcache":  # reference for gradcache is plain hn training on the full batch
            loss = _dist_run(lin, tau, xq, xc, xh, "hn")
        else:
            loss = _dist_run(lin, tau, xq, xc, xh, mode)
        r = res[mode]
        assert torch.allclose(r["loss"], loss, atol=1e-10), mode
        for got, want in zip(r["grads"], [p.grad for p in lin.parameters()]):
            assert torch.allclose(got, want, atol=1e-10), mode  # Σ_ranks grad == full-batch grad
        for tg in r["tau_grads"]:
            assert torch.allclose(tg, tau.grad, atol=1e-10), mode  # τ: full gradient on every rank
