"""FMbSeg stage 2: the alignment loss against per-element loops written here from the formulas
of docs/algorithms.md §3.4, and the alignment module's contracts."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from ovss_label.backend.training.loss import ContrastiveLossConfig, contrastive_loss
from ovss_label.backend.training.model import AlignmentConfig, AlignmentModule

Vec = list[float]
OPTIONS = list(itertools.product(["present", "all"], ["with_positives", "all"]))
# Class 3 is absent; class 2 occurs once (patch 7): both edge cases in every comparison.
LABELS = [0, 0, 0, 1, 1, 1, 1, 2, 0, 1, 0, 1]
SINGLETON = 7


# --- the reference: plain Python over i, j, k -------------------------------------------------


def _dot(a: Vec, b: Vec) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _reference_terms(
    z: list[Vec], labels: list[int], protos: list[Vec], tau: float
) -> tuple[dict[int, float], dict[int, float]]:
    """({k: L_pt(k)} for classes in the batch, {i: L_pp(i)} for patches with a positive)."""
    m, k = len(z), len(protos)
    denominators = []
    for i in range(m):
        d = 0.0
        for j in range(m):
            if j != i:
                d += math.exp(_dot(z[i], z[j]) / tau)
        for kk in range(k):
            d += math.exp(_dot(z[i], protos[kk]) / tau)
        denominators.append(d)
    l_pt = {}
    for kk in range(k):
        members = [i for i in range(m) if labels[i] == kk]
        if members:
            logs = [
                math.log(math.exp(_dot(z[i], protos[kk]) / tau) / denominators[i]) for i in members
            ]
            l_pt[kk] = -sum(logs) / len(members)
    l_pp = {}
    for i in range(m):
        positives = [p for p in range(m) if p != i and labels[p] == labels[i]]
        if positives:
            logs = [math.log(math.exp(_dot(z[i], z[p]) / tau) / denominators[i]) for p in positives]
            l_pp[i] = -sum(logs) / len(positives)
    return l_pt, l_pp


def _reference_loss(
    z: list[Vec], labels: list[int], protos: list[Vec], cfg: ContrastiveLossConfig
) -> tuple[float, float, float]:
    l_pt, l_pp = _reference_terms(z, labels, protos, cfg.tau)
    pt = sum(l_pt.values()) / (len(l_pt) if cfg.text_average == "present" else len(protos))
    n_pp = len(l_pp) if cfg.patch_average == "with_positives" else len(z)
    pp = sum(l_pp.values()) / n_pp if n_pp else 0.0
    return cfg.w_pt * pt + cfg.w_pp * pp, pt, pp


def _inputs(
    seed: int = 0, m: int = 12, k: int = 4, d: int = 8, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    protos = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    return z.to(dtype), protos.to(dtype)


def _lists(t: torch.Tensor) -> list[Vec]:
    return [[float(x) for x in row] for row in t.double()]


# --- (a) values and gradients against the loops ----------------------------------------------


@pytest.mark.parametrize(("text_average", "patch_average"), OPTIONS)
@pytest.mark.parametrize(("tau", "w_pt", "w_pp"), [(0.1, 1.0, 1.0), (0.5, 0.3, 2.0)])
def test_loss_matches_the_loop(text_average, patch_average, tau, w_pt, w_pp):
    cfg = ContrastiveLossConfig(tau, text_average, patch_average, w_pt, w_pp)
    z, protos = _inputs()
    labels = torch.tensor(LABELS)
    expected = _reference_loss(_lists(z), LABELS, _lists(protos), cfg)
    got = contrastive_loss(z, labels, protos, cfg)
    for value, ref in zip(got, expected, strict=True):
        assert value.dtype == torch.float64 and value.ndim == 0
        assert abs(float(value) - ref) < 1e-6
    # float32, the training dtype: the same values to float32 precision.
    got32 = contrastive_loss(z.float(), labels, protos.float(), cfg)
    for value, ref in zip(got32, expected, strict=True):
        assert abs(float(value) - ref) < 1e-5


@pytest.mark.parametrize(("text_average", "patch_average"), OPTIONS)
def test_gradient_matches_finite_differences_of_the_loop(text_average, patch_average):
    cfg = ContrastiveLossConfig(0.1, text_average, patch_average, w_pt=0.7, w_pp=1.3)
    z, protos = _inputs(seed=1)
    z.requires_grad_(True)
    contrastive_loss(z, torch.tensor(LABELS), protos, cfg).total.backward()
    assert z.grad is not None
    # Central differences of the float loop; z is moved off the sphere, which the formula allows.
    h, zl, pl = 1e-6, _lists(z.detach()), _lists(protos)
    numeric = torch.zeros_like(z)
    for i, c in itertools.product(range(len(zl)), range(len(zl[0]))):
        plus = [row[:] for row in zl]
        minus = [row[:] for row in zl]
        plus[i][c] += h
        minus[i][c] -= h
        up = _reference_loss(plus, LABELS, pl, cfg)[0]
        down = _reference_loss(minus, LABELS, pl, cfg)[0]
        numeric[i, c] = (up - down) / (2 * h)
    torch.testing.assert_close(z.grad, numeric, atol=1e-6, rtol=0)


# --- (b) absent classes and singleton labels -------------------------------------------------


def test_absent_classes_drop_out_of_the_patch_text_mean():
    z, protos = _inputs(seed=2)
    labels = torch.tensor(LABELS)
    l_pt, _ = _reference_terms(_lists(z), LABELS, _lists(protos), 0.1)
    assert sorted(l_pt) == [0, 1, 2]  # class 3 has no term ...
    present = contrastive_loss(z, labels, protos, ContrastiveLossConfig(text_average="present"))
    every = contrastive_loss(z, labels, protos, ContrastiveLossConfig(text_average="all"))
    assert abs(float(present.patch_text) - sum(l_pt.values()) / 3) < 1e-9  # ... nor a share
    assert abs(float(every.patch_text) - sum(l_pt.values()) / 4) < 1e-9  # the literal 1/K
    # Its prototype still sits in every D(i): moving it changes the loss.
    moved = protos.clone()
    moved[3] = z[0]
    assert float(contrastive_loss(z, labels, moved).patch_text) != float(present.patch_text)


def test_a_unique_label_counts_for_patch_text_but_not_patch_patch():
    z, protos = _inputs(seed=3)
    labels = torch.tensor(LABELS)
    l_pt, l_pp = _reference_terms(_lists(z), LABELS, _lists(protos), 0.1)
    assert l_pt[2] > 0 and SINGLETON not in l_pp and len(l_pp) == len(LABELS) - 1
    lone = contrastive_loss(z, labels, protos)
    assert abs(float(lone.patch_patch) - sum(l_pp.values()) / (len(LABELS) - 1)) < 1e-9
    by_m = contrastive_loss(z, labels, protos, ContrastiveLossConfig(patch_average="all"))
    assert abs(float(by_m.patch_patch) - sum(l_pp.values()) / len(LABELS)) < 1e-9
    # The singleton's own L_pt(2) = −log(exp(z·t_2/τ)/D), computed directly.
    logits = torch.cat([z[SINGLETON] @ z.T, z[SINGLETON] @ protos.T]) / 0.1
    logits[SINGLETON] = -math.inf
    direct = float(torch.logsumexp(logits, 0) - z[SINGLETON] @ protos[2] / 0.1)
    assert abs(l_pt[2] - direct) < 1e-9


def test_all_unique_labels_and_a_single_patch():
    z, protos = _inputs(seed=4, m=4)
    z.requires_grad_(True)
    parts = contrastive_loss(z, torch.tensor([0, 1, 2, 3]), protos)
    parts.total.backward()
    assert float(parts.patch_patch.detach()) == 0.0
    assert float(parts.total.detach()) == float(parts.patch_text.detach())
    assert z.grad is not None and torch.isfinite(z.grad).all()
    one = z[:1].detach().requires_grad_(True)
    single = contrastive_loss(one, torch.tensor([2]), protos)
    single.total.backward()  # D(0) has only the prototypes; the patch sum is empty
    assert one.grad is not None and torch.isfinite(one.grad).all()
    ref = _reference_loss(_lists(one.detach()), [2], _lists(protos), ContrastiveLossConfig())
    assert abs(float(single.total.detach()) - ref[0]) < 1e-9


def test_bad_inputs_are_refused():
    z, protos = _inputs()
    with pytest.raises(ValueError, match="labels must lie"):
        contrastive_loss(z, torch.tensor([4, *LABELS[1:]]), protos)
    with pytest.raises(ValueError, match="int64"):
        contrastive_loss(z, torch.tensor(LABELS, dtype=torch.int32), protos)
    with pytest.raises(ValueError, match="prototypes are"):
        contrastive_loss(z, torch.tensor(LABELS), protos.float())
    with pytest.raises(ValueError, match="tau"):
        ContrastiveLossConfig(tau=0.0)
    with pytest.raises(ValueError, match="text_average"):
        ContrastiveLossConfig(text_average="some")  # type: ignore[arg-type]


# --- (c) stability ---------------------------------------------------------------------------


def test_small_tau_and_nearly_identical_vectors_stay_finite():
    g = torch.Generator().manual_seed(5)
    base = F.normalize(torch.randn(1, 16, generator=g), dim=1)
    z = F.normalize(base + 1e-3 * torch.randn(64, 16, generator=g), dim=1).requires_grad_(True)
    protos = F.normalize(base + 1e-3 * torch.randn(4, 16, generator=g), dim=1)
    labels = torch.randint(0, 4, (64,), generator=g)
    cfg = ContrastiveLossConfig(tau=0.01)
    assert torch.isinf((z @ z.T / cfg.tau).exp()).any()  # a naive exp overflows float32 here
    parts = contrastive_loss(z, labels, protos, cfg)
    parts.total.backward()
    assert all(torch.isfinite(p) for p in parts)
    assert z.grad is not None and torch.isfinite(z.grad).all()
    exact = contrastive_loss(z.detach().double(), labels, protos.double(), cfg).total
    assert abs(float(parts.total.detach()) - float(exact)) < 1e-4 * float(exact)


# --- (d) the module --------------------------------------------------------------------------

SMALL = AlignmentConfig(in_dim=32, out_dim=16, heads=4)


def _module(config: AlignmentConfig = SMALL, seed: int = 0) -> AlignmentModule:
    torch.manual_seed(seed)
    return AlignmentModule(config).eval()


def test_output_shape_and_unit_norm():
    out = _module()(torch.randn(3, 10, 32))
    assert out.shape == (3, 10, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 10))


def test_padding_makes_a_batched_image_equal_to_the_image_alone():
    module = _module()
    short, long_ = torch.randn(1, 7, 32), torch.randn(1, 10, 32)
    batch = torch.cat([torch.cat([short, 1e3 * torch.randn(1, 3, 32)], dim=1), long_])
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[0, 7:] = True  # loud garbage behind the mask must not leak into real tokens
    with torch.no_grad():
        out = module(batch, padding)
        torch.testing.assert_close(out[0, :7], module(short)[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(out[1], module(long_)[0], atol=1e-6, rtol=0)
    assert (out[0, 7:] == 0).all()


def test_bad_padding_is_refused():
    module, tokens = _module(), torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="real"):
        module(tokens, torch.tensor([[False] * 5, [True] * 5]))
    with pytest.raises(ValueError, match="bool"):
        module(tokens, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="tokens must be"):
        module(torch.randn(2, 5, 31))


def test_seeded_construction_is_deterministic():
    a, b, c = _module(seed=3), _module(seed=3), _module(seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.proj.weight, c.proj.weight)
    # nanoGPT init: N(0, 0.02) weights, zero biases
    assert float(a.attn.qkv.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert (a.attn.qkv.bias == 0).all()


def test_from_state_round_trip():
    module, tokens = _module(), torch.randn(2, 6, 32)
    config = json.loads(json.dumps(module.config_dict()))  # a checkpoint stores it as JSON
    rebuilt = AlignmentModule.from_state(config, module.state_dict()).eval()
    assert rebuilt.config == module.config
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens), module(tokens))
    with pytest.raises(ValueError, match="unknown"):
        AlignmentModule.from_state({**config, "depth": 2}, module.state_dict())


def test_parameter_count():
    c, h, o = 1024, 4096, 768
    # 3 LayerNorms + qkv + attention out + MLP in + MLP out + projection = 13,385,472
    norms, qkv, attn_out = 3 * 2 * c, c * 3 * c + 3 * c, c * c + c
    expected = norms + qkv + attn_out + (c * h + h) + (h * c + c) + (c * o + o)
    assert expected == 13_385_472
    assert AlignmentModule().num_parameters() == expected
    no_bias = AlignmentModule(AlignmentConfig(bias=False)).num_parameters()
    assert no_bias == 3 * c + c * 3 * c + c * c + 2 * c * h + c * o


def test_config_validation():
    with pytest.raises(ValueError, match="divide"):
        AlignmentConfig(in_dim=30, heads=4)
    with pytest.raises(ValueError, match="dropout"):
        AlignmentConfig(dropout=1.0)


# --- (e) it learns ---------------------------------------------------------------------------


def _synthetic_batch(
    g: torch.Generator, centers: torch.Tensor, images: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, 3, 16) tokens, one patch per class per image, noise 0.3 around the centres."""
    labels = torch.stack([torch.randperm(3, generator=g) for _ in range(images)])
    return centers[labels] + 0.3 * torch.randn(images, 3, 16, generator=g), labels


def test_a_few_sgd_steps_align_patches_with_their_prototypes():
    # About 0.3 s on 2 CPU cores, plus ~1.5 s if this is the process's first torch.optim
    # optimizer (torch imports torch._dynamo then). No wall-clock assert: it would flake.
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(3, 16, generator=g)
    protos = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    module = AlignmentModule(AlignmentConfig(in_dim=16, out_dim=8, heads=2))
    held_out = [_synthetic_batch(g, centers) for _ in range(10)]

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            losses, hits = [], 0
            for x, y in held_out:
                z = module(x)
                losses.append(float(contrastive_loss(z.flatten(0, 1), y.flatten(), protos).total))
                hits += int(((z @ protos.T).argmax(-1) == y).sum())
        return sum(losses) / len(losses), hits / (6 * len(held_out))

    # Two patches per class per batch: with n per class the loss cannot drop below ≈ 2·log n
    # (both terms, at perfect alignment), so small batches leave room for a 50 % cut.
    loss_before, _ = evaluate()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    for _ in range(100):
        x, y = _synthetic_batch(g, centers)
        loss = contrastive_loss(module(x).flatten(0, 1), y.flatten(), protos).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss_after, accuracy = evaluate()
    assert loss_after <= 0.5 * loss_before, (loss_before, loss_after)
    assert accuracy >= 0.9
