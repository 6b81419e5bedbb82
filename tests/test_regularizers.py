import math

import pytest
import torch
from torch import nn

from botaclip_core.errors import CatalogError, WeightsError
from botaclip_core.models import Adapter
from botaclip_core.regularizers import (
    L2SP,
    NoRegularizer,
    SimilarityPreservation,
    build_regularizer,
)


def test_l2sp_is_zero_at_init_and_distance_to_identity() -> None:
    adapter = Adapter(4)
    reg = L2SP(adapter)
    assert reg().item() == 0.0
    with torch.no_grad():
        adapter.weight[0, 1] += 0.5
        adapter.weight[2, 2] -= 0.25
        adapter.bias[3] = 2.0
    expected = 0.5**2 + 0.25**2 + 2.0**2
    assert reg().item() == pytest.approx(expected)
    direct = (adapter.weight - torch.eye(4)).pow(2).sum() + adapter.bias.pow(2).sum()
    assert reg().item() == pytest.approx(direct.item())


def test_l2sp_gradient_points_back_to_start() -> None:
    adapter = Adapter(3)
    reg = L2SP(adapter)
    with torch.no_grad():
        adapter.weight.add_(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    reg().backward()
    assert adapter.weight.grad is not None
    torch.testing.assert_close(adapter.weight.grad, 2 * (adapter.weight.detach() - torch.eye(3)))
    # one gradient step reduces the penalty
    before = reg().item()
    with torch.no_grad():
        adapter.weight -= 0.1 * adapter.weight.grad
    assert reg().item() < before


def test_l2sp_ignores_frozen_parameters_and_is_not_a_submodule() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    net[0].requires_grad_(False)
    reg = L2SP(net)
    assert list(reg.parameters()) == []
    with torch.no_grad():
        net[0].weight.add_(1.0)  # frozen: not penalised
        net[1].bias.add_(torch.tensor([1.0, -2.0]))
    assert reg().item() == pytest.approx(5.0)
    net[1].requires_grad_(False)
    assert reg().item() == 0.0


def test_l2sp_explicit_reference_state() -> None:
    lin = nn.Linear(2, 2)
    ref = {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}
    expected = lin.weight.detach().pow(2).sum() + lin.bias.detach().pow(2).sum()
    assert L2SP(lin, ref)().item() == pytest.approx(expected.item())
    with pytest.raises(WeightsError, match="'bias'"):
        L2SP(lin, {"weight": torch.zeros(2, 2)})
    with pytest.raises(WeightsError, match=r"\(3, 2\)"):
        L2SP(lin, {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)})


def naive_similarity(adapted: torch.Tensor, frozen: torch.Tensor) -> float:
    def cos(u: list[float], v: list[float]) -> float:
        dot = sum(x * y for x, y in zip(u, v, strict=True))
        return dot / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))

    a, f = adapted.tolist(), frozen.tolist()
    n = len(a)
    total = sum((cos(a[i], a[j]) - cos(f[i], f[j])) ** 2 for i in range(n) for j in range(n))
    return total / (n * n)


def test_similarity_matches_naive() -> None:
    gen = torch.Generator().manual_seed(0)
    frozen = torch.randn(5, 6, generator=gen)
    adapted = torch.randn(5, 4, generator=gen)  # widths may differ
    value = SimilarityPreservation()(adapted, frozen)
    assert value.item() == pytest.approx(naive_similarity(adapted, frozen), abs=1e-6)


def test_similarity_zero_for_identity_adapter_and_positive_after_change() -> None:
    gen = torch.Generator().manual_seed(1)
    frozen = torch.randn(8, 4, generator=gen)
    adapter = Adapter(4)
    reg = SimilarityPreservation()
    assert reg(adapter(frozen), frozen).item() == pytest.approx(0.0, abs=1e-7)
    # a rotation and a uniform scale preserve cosines
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen))
    assert reg(3.0 * frozen @ q, frozen).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        adapter.weight.copy_(torch.diag(torch.tensor([5.0, 1.0, 0.1, 1.0])))
    assert reg(adapter(frozen), frozen).item() > 1e-3


def test_similarity_gradient_reduces_penalty_and_skips_frozen() -> None:
    gen = torch.Generator().manual_seed(2)
    frozen = torch.randn(6, 4, generator=gen).requires_grad_(True)
    adapted = torch.randn(6, 4, generator=gen).requires_grad_(True)
    reg = SimilarityPreservation()
    value = reg(adapted, frozen)
    value.backward()
    assert frozen.grad is None
    assert adapted.grad is not None
    with torch.no_grad():
        stepped = adapted - 0.05 * adapted.grad
    assert reg(stepped, frozen).item() < value.item()


def test_similarity_needs_both_inputs() -> None:
    with pytest.raises(CatalogError, match="frozen"):
        SimilarityPreservation()(torch.randn(2, 3))


def test_build_regularizer() -> None:
    adapter = Adapter(3)
    assert isinstance(build_regularizer("l2sp", module=adapter), L2SP)
    assert isinstance(build_regularizer("similarity"), SimilarityPreservation)
    none = build_regularizer("none")
    assert isinstance(none, NoRegularizer)
    assert none(torch.randn(2, 3), torch.randn(2, 3)).item() == 0.0
    with pytest.raises(CatalogError, match="module="):
        build_regularizer("l2sp")
    with pytest.raises(CatalogError, match="'similarity'"):
        build_regularizer("dropout")


def test_uniform_call_signature() -> None:
    adapter = Adapter(3)
    frozen = torch.randn(4, 3)
    for name in ("l2sp", "similarity", "none"):
        reg = build_regularizer(name, module=adapter)
        assert reg(adapter(frozen), frozen).item() == pytest.approx(0.0, abs=1e-6)
