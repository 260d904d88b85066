"""The blurred loop's full-resolution kernels (``kernels.blur_start``, ``kernels.blur_step``) against the
PyTorch composition they replace (``blur_upsample``, add, softmax, ``blur_pool``) in float64, and their place
in the mean-field loop."""

import math

import pytest
import torch
from convcrf_triton.kernels import blur_iteration
from test_kernels import RTOL, on_gpu_only, rel_err

from convcrf_triton import functional, kernels

# (B, C, H, W, blur): padding on one or both sides, a single pooled row/column, grids narrower than the
# three pooled columns the kernel reads (2 and 1), non-power-of-two blur,
# C from 1 to 150.
CASES = [
    (2, 5, 13, 11, 4),
    (1, 21, 16, 16, 4),
    (1, 3, 7, 9, 3),
    (2, 2, 1, 5, 2),
    (1, 1, 6, 3, 2),
    (1, 19, 30, 17, 8),
    (1, 150, 2, 5, 2),
    (1, 4, 5, 3, 4),
    *on_gpu_only(*[(c,) for c in [(1, 21, 512, 1024, 4), (2, 19, 250, 333, 3), (1, 150, 97, 131, 4),
                                  (3, 7, 301, 299, 8)]]),
]
OUTPUTS = [(True, True), (False, True), (False, False)]  # (pool, softmax)


def _inputs(case, seed):
    """Unary logits ``u``, their float64 log-sum-exp, per-class unary factors ``a`` (either sign, as a trained
    ``unary_weight - w`` can be), per-class message weights ``w`` and a pooled message ``M``."""
    B, C, H, W, s = case
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, C, H, W, generator=g) * 3
    a = torch.rand(C, generator=g) * 2 - 0.5
    w = torch.rand(C, generator=g) + 0.1
    M = torch.randn(B, C, -(-H // s), -(-W // s), generator=g) * 3
    return u, torch.logsumexp(u.double(), 1, keepdim=True), a, w, M


def _logits(u, lse, a, w, M, s):
    """``Z = a · (u - lse) + w · upsample(M)`` in float64."""
    up = functional.blur_upsample(M.double(), s, *u.shape[-2:])
    return a.double().view(1, -1, 1, 1) * (u.double() - lse) + w.double().view(1, -1, 1, 1) * up


def _step(device, u, lse, a, w, M, s, **kw):
    """``kernels.blur_step`` on ``device``."""
    return kernels.blur_step(*(t.float().to(device) for t in (u, lse, torch.stack([a, w]), M)), s, **kw)


@pytest.mark.parametrize("pool,softmax", OUTPUTS, ids=["pooled-probabilities", "probabilities", "logits"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_blur_step_matches_composition(case, pool, softmax, device):
    B, C, H, W, s = case
    u, lse, a, w, M = _inputs(case, B * 1000 + C * 10 + s)
    Z = _logits(u, lse, a, w, M, s)
    want = torch.softmax(Z, 1) if softmax else Z
    if pool:
        want = functional.blur_pool(want, s)
    got = _step(device, u, lse, a, w, M, s, pool=pool, softmax=softmax)
    assert got.shape == want.shape and got.dtype == torch.float32
    # Probabilities are judged on the logits' scale (softmax is 1-Lipschitz in the max norm): the bilinear
    # source index is float32 arithmetic, as in PyTorch's float32 upsampling (1e-7 of an index of ~1000).
    scale = Z.abs().max() if softmax else want.abs().max()
    assert ((got.cpu().double() - want).abs().max() / scale).item() < RTOL


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("pool", [True, False], ids=["pooled", "full"])
def test_blur_step_logits_far_below_zero(pool, device):
    """Every class's logits below -500 (ConvCRF's first pass on log-probabilities through a wide window): the
    probabilities are exact, and nothing overflows on the way, not even in the interpreter's padding classes
    (C = 3 in a block of 4), whose exponentials are never stored (numpy's overflow warnings are errors here)."""
    case = (1, 3, 9, 10, 4)
    u, lse, a, w, M = _inputs(case, 17)
    M = M - 1000.0
    Z = _logits(u, lse, a, w, M, 4)
    want = torch.softmax(Z, 1)
    if pool:
        want = functional.blur_pool(want, 4)
    got = _step(device, u, lse, a, w, M, 4, pool=pool, softmax=True)
    assert Z.max() < -100 and ((got.cpu().double() - want).abs().max() / Z.abs().max()).item() < RTOL


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log-softmax"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_blur_start_matches_composition(case, log, device):
    """The set-up: the unary's log-sum-exp and the first iteration's pooled (log-)probabilities."""
    B, C, H, W, s = case
    u, want_lse, *_ = _inputs(case, B * 1000 + C * 10 + s + 1)
    lse, pooled = kernels.blur_start(u.to(device), s, log=log)
    assert lse.shape == (B, 1, H, W) and lse.dtype == torch.float32
    assert pooled.shape == (B, C, -(-H // s), -(-W // s)) and pooled.dtype == torch.float32
    scale = u.abs().max().item()
    assert (lse.cpu().double() - want_lse).abs().max().item() / scale < RTOL
    L = u.double() - want_lse
    want = functional.blur_pool(L if log else L.exp(), s)
    assert (pooled.cpu().double() - want).abs().max().item() / scale < RTOL


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log-softmax"])
@pytest.mark.parametrize("case", CASES[:3] + CASES[6:], ids=lambda c: "x".join(map(str, c[:4])))
def test_mean_field_start_matches_composition(case, log, device):
    """Blur 1's set-up: the first (log-)probabilities and the unary term ``a · log_softmax(u)``."""
    B, C, H, W, s = case
    u, lse, a, *_ = _inputs(case, B * 1000 + C * 10 + s + 2)
    Q, term = kernels.mean_field_start(u.to(device), a.to(device), log=log)
    L = u.double() - lse
    assert Q.shape == term.shape == u.shape and Q.dtype == term.dtype == torch.float32
    scale = u.abs().max().item()
    assert (Q.cpu().double() - (L if log else L.exp())).abs().max().item() / scale < RTOL
    assert (term.cpu().double() - a.double().view(1, -1, 1, 1) * L).abs().max().item() / scale < RTOL


def test_blur_step_output_dtype_and_errors():
    u, M = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 2, 2)
    lse, a, aw = torch.logsumexp(u, 1, keepdim=True), torch.ones(3), torch.tensor([[1.0] * 3, [0.5] * 3])
    got = kernels.blur_step(u, lse, aw, M, 4, pool=False, softmax=False, out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert kernels.blur_start(u.double(), 4)[1].dtype == torch.float64
    with pytest.raises(ValueError, match="blur must be an int >= 2"):
        kernels.blur_step(u, lse, aw, M, 1, pool=True, softmax=True)
    with pytest.raises(ValueError, match="blur must be an int >= 2"):
        kernels.blur_start(u, 1)
    with pytest.raises(ValueError, match=r"message must be the pooled grid \(1, 3, 4, 4\)"):
        kernels.blur_step(u, lse, aw, M, 2, pool=True, softmax=True)
    with pytest.raises(ValueError, match=r"lse must be the unary's per-pixel log-sum-exp \(1, 1, 8, 8\)"):
        kernels.blur_step(u, lse[:, :, :4], aw, M, 4, pool=True, softmax=True)
    with pytest.raises(ValueError, match=r"factors must hold the classes' .*, shape \(2, 3\), got \(3,\)"):
        kernels.blur_step(u, lse, a, M, 4, pool=True, softmax=True)
    with pytest.raises(ValueError, match="needs softmax=True"):
        kernels.blur_step(u, lse, aw, M, 4, pool=True, softmax=False)
    with pytest.raises(ValueError, match="must be 4-D"):
        kernels.blur_step(u[0], lse, aw, M, 4, pool=True, softmax=True)
    with pytest.raises(ValueError, match="must be 4-D"):
        kernels.blur_start(u[0], 4)
    assert [t.dtype for t in kernels.mean_field_start(u.double(), a)] == [torch.float64] * 2
    with pytest.raises(ValueError, match=r"a must hold the classes' .*, shape \(3,\), got \(1, 3, 1, 1\)"):
        kernels.mean_field_start(u, a.view(1, 3, 1, 1))
    with pytest.raises(ValueError, match="must be 4-D"):
        kernels.mean_field_start(u[0], a)


def _counting(monkeypatch):
    """The keyword arguments of every blur_step call, after a ``("start", log)`` entry for each blur_start call."""
    calls = []
    step, start = kernels.blur_step, kernels.blur_start
    monkeypatch.setattr(kernels, "blur_step", lambda *a, **kw: calls.append(kw) or step(*a, **kw))
    monkeypatch.setattr(kernels, "blur_start", lambda *a, **kw: calls.append(("start", kw["log"])) or start(*a, **kw))
    return calls


# The whole blurred model: one blur_step per iteration for inference with one merged Gaussian, the composed
# PyTorch path otherwise; both against the float64 reference backend.
MODEL_CASES = [
    dict(filter_size=5, blur=2, mode="convcrf", final_softmax=False),
    dict(filter_size=3, blur=4, mode="textbook", final_softmax=True, compat=True, per_class=True),
    dict(filter_size=7, blur=3, mode="textbook", final_softmax=False, storage="bfloat16"),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_blurred_mean_field_runs_one_blur_step_per_iteration(case, monkeypatch, device, every_call):
    case = dict(case)
    g = torch.Generator().manual_seed(case["filter_size"] * 10 + case["blur"])
    B, C, H, W = 2, 5, 14, 19
    unary = (torch.randn(B, C, H, W, generator=g) * 2).to(device)
    image = (torch.rand(B, 3, H, W, generator=g) * 255).to(device)
    if case.pop("compat", False):
        case["compat_matrix"] = (torch.randn(C, C, generator=g) * 0.1).to(device)
    if case.pop("per_class", False):
        case["weight"] = (torch.rand(1, C, 1, 1, generator=g) + 0.2).to(device)
    storage = case.pop("storage", "float32")
    calls = _counting(monkeypatch)
    with torch.no_grad():
        got = functional.mean_field(unary, image, num_iter=3, backend="triton", storage=storage, **case)
    assert calls[0] == ("start", case["mode"] == "convcrf")
    outputs = [(c["pool"], c["softmax"]) for c in calls[1:]]
    assert outputs == [(True, True), (True, True), (False, case["final_softmax"])]
    ref = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    want = functional.mean_field(unary.double(), image.double(), num_iter=3, backend="torch", **ref)
    if storage == "float32":
        assert rel_err(got, want) < RTOL
    else:  # the message pass reads bfloat16: compare with the same storage through the composed path
        monkeypatch.setattr(blur_iteration, "BLUR_STEP", False)
        with torch.no_grad():
            composed = functional.mean_field(unary, image, num_iter=3, backend="triton", storage=storage, **case)
        assert len(calls) == 4 and rel_err(got, composed) < 1e-4


@pytest.mark.parametrize("why", ["norm", "grad", "switched-off"])
def test_blurred_mean_field_composes_where_blur_step_does_not_apply(why, monkeypatch):
    g = torch.Generator().manual_seed(3)
    unary, image = torch.randn(1, 3, 9, 10, generator=g), torch.rand(1, 3, 9, 10, generator=g) * 255
    weight = torch.tensor(0.4, requires_grad=why == "grad")
    if why == "switched-off":
        monkeypatch.setattr(blur_iteration, "BLUR_STEP", False)
    calls = _counting(monkeypatch)
    kw = dict(filter_size=3, blur=2, num_iter=2, norm="sym" if why == "norm" else "none")
    got = functional.mean_field(unary, image, weight=weight, backend="triton", **kw)
    assert calls == []
    want = functional.mean_field(unary.double(), image.double(), weight=weight.detach().double(), backend="torch", **kw)
    assert rel_err(got.detach(), want) < RTOL


def test_blur_step_one_class_at_a_time(monkeypatch, device):
    """The GPU's class loop (one class per iteration) under the interpreter too, which otherwise takes every
    class at once: a ragged last block of the interpreter's class tile as well."""
    case = (2, 5, 9, 14, 3)
    u, lse, a, w, M = _inputs(case, 11)
    Z = _logits(u, lse, a, w, M, 3)
    for block_c in (1, 2):
        monkeypatch.setattr(blur_iteration, "INTERPRETER_MAX_BLOCK_C", block_c)
        got = _step(device, u, lse, a, w, M, 3, pool=True, softmax=True)
        assert rel_err(got.cpu(), functional.blur_pool(torch.softmax(Z, 1), 3)) < RTOL
        got_lse, got_log = kernels.blur_start(u.to(device), 3, log=True)
        assert rel_err(got_lse.cpu(), lse) < RTOL
        assert rel_err(got_log.cpu(), functional.blur_pool(u.double() - lse, 3)) < RTOL


@pytest.mark.parametrize("which", range(len(blur_iteration.TUNE_CONFIGS)), ids=lambda i: f"config-{i}")
def test_blur_kernels_with_each_config(which, monkeypatch, device):
    """Each of the tuner's configs, which the GPU test run (CONVCRF_AUTOTUNE=0: the first config) would not take
    and the interpreter's one large tile of every class neither: forced in turn (on the GPU as the tuner's only
    config, under the interpreter as its tile), the step at blur 4 (a thread's 16 pixels a whole cell in the
    first configs; every class at once in the one-pass ones) and 3 (cells narrower than their tile), and blur 1's
    set-up."""
    cfg = blur_iteration.TUNE_CONFIGS[which]
    kinds = [(c.kwargs["BLOCK_PIXELS"] // (32 * c.num_warps), c.kwargs["BLOCK_C"]) for c in blur_iteration.TUNE_CONFIGS]
    if device.type != "cuda" and kinds.index(kinds[which]) < which:
        pytest.skip("under the interpreter (no layouts) the first config of each kind (pixels a thread, one pass)")
    case = (2, 21, 130, 257, 4) if device.type == "cuda" else (1, 5, 19, 27, 4)
    u, lse, a, w, _ = _inputs(case, 5)
    monkeypatch.setenv("CONVCRF_AUTOTUNE", "1")  # the GPU test run's 0 would prune to the first config
    monkeypatch.setattr(blur_iteration, "INTERPRETER_CONFIG", cfg)
    # Twice: with one config triton launches it unpruned (a one-pass config's BLOCK_C = 0 as it is); with two
    # the pruning maps it as in a tuned launch, and the tuner picks between the two copies.
    monkeypatch.setattr(blur_iteration._blur_step_tuned, "configs", [cfg, cfg])
    monkeypatch.setattr(blur_iteration._blur_step_tuned, "cache", {})
    B, C, H, W, _ = case
    for blur in (4, 3, 1):
        if blur > 1:
            M = torch.randn(B, C, -(-H // blur), -(-W // blur), generator=torch.Generator().manual_seed(blur)) * 3
            for pool, softmax in OUTPUTS if blur == 4 else OUTPUTS[:1]:
                Z = _logits(u, lse, a, w, M, blur)
                want = torch.softmax(Z, 1) if softmax else Z
                want = functional.blur_pool(want, blur) if pool else want
                got = _step(device, u, lse, a, w, M, blur, pool=pool, softmax=softmax)
                assert rel_err(got.cpu(), want) < RTOL, (blur, pool, softmax)
            for log in (False, True) if blur == 4 else (True,):
                flag = torch.zeros(1, device=device)
                got_lse, got_q = kernels.blur_start(u.to(device), blur, log=log, nonfinite=flag)
                assert rel_err(got_lse.cpu(), lse) < RTOL
                L = u.double() - lse
                assert rel_err(got_q.cpu(), functional.blur_pool(L if log else L.exp(), blur)) < RTOL
                assert flag.item() == 0
            assert _flags_nonfinite(lambda u, flag, blur=blur: kernels.blur_start(u, blur, nonfinite=flag), u, device)
        else:
            flag = torch.zeros(1, device=device)
            got_q, got_term = kernels.mean_field_start(u.to(device), a.to(device), nonfinite=flag)
            assert rel_err(got_q.cpu(), (u.double() - lse).exp()) < RTOL
            assert rel_err(got_term.cpu(), a.double().view(1, -1, 1, 1) * (u.double() - lse)) < RTOL
            assert flag.item() == 0
            assert _flags_nonfinite(lambda u, flag: kernels.mean_field_start(u, a.to(device), nonfinite=flag), u,
                                    device)


def _flags_nonfinite(start, u, device) -> bool:
    """Whether the set-up ``start(u, flag)`` sets its flag for a NaN, an Inf and a -Inf, each in one class of one
    pixel (the last pixel, in a cell the image's edge cuts; the first; one in the middle: other programs)."""
    B, C, H, W = u.shape
    for where, value in [((B - 1, C - 2, H - 1, W - 1), math.nan), ((0, 0, 0, 0), math.inf),
                         ((B - 1, C - 1, H // 2, W // 2), -math.inf)]:
        bad = u.clone()
        bad[where] = value
        flag = torch.zeros(1, device=device)
        start(bad.to(device), flag)
        if flag.item() != 1:
            return False
    return True
