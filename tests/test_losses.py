import math

import pytest
import torch

from botaclip_core.errors import CatalogError, InputDataError
from botaclip_core.losses import InfoNCELoss, SigmoidLoss, build_loss


def unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def naive_infonce(img: torch.Tensor, rel: torch.Tensor, scale: float) -> float:
    a = [unit(row) for row in img.tolist()]
    b = [unit(row) for row in rel.tolist()]
    n = len(a)
    logits = [
        [scale * sum(x * y for x, y in zip(a[i], b[j], strict=True)) for j in range(n)]
        for i in range(n)
    ]
    image_to_releve = 0.0
    releve_to_image = 0.0
    for i in range(n):
        row = logits[i]
        col = [logits[j][i] for j in range(n)]
        image_to_releve += -row[i] + math.log(sum(math.exp(v) for v in row))
        releve_to_image += -col[i] + math.log(sum(math.exp(v) for v in col))
    return (image_to_releve / n + releve_to_image / n) / 2


def naive_sigmoid(img: torch.Tensor, rel: torch.Tensor, scale: float, bias: float) -> float:
    a = [unit(row) for row in img.tolist()]
    b = [unit(row) for row in rel.tolist()]
    n = len(a)
    total = 0.0
    for i in range(n):
        for j in range(n):
            logit = scale * sum(x * y for x, y in zip(a[i], b[j], strict=True)) + bias
            label = 1.0 if i == j else -1.0
            total += math.log(1.0 + math.exp(-label * logit))
    return total / n


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)


def test_infonce_matches_naive(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    img, rel = pair
    loss = InfoNCELoss(init_temperature=0.07)
    expected = naive_infonce(img, rel, 1 / 0.07)
    assert torch.allclose(loss(img, rel), torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_sigmoid_matches_naive(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    img, rel = pair
    loss = SigmoidLoss(init_temperature=10.0, init_bias=-10.0)
    expected = naive_sigmoid(img, rel, 10.0, -10.0)
    assert torch.allclose(loss(img, rel), torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_sigmoid_other_init(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    img, rel = pair
    loss = SigmoidLoss(init_temperature=3.0, init_bias=0.5)
    expected = naive_sigmoid(img, rel, 3.0, 0.5)
    assert torch.allclose(loss(img, rel), torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_initial_parameters() -> None:
    assert InfoNCELoss(0.07).logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    sig = SigmoidLoss()
    assert sig.logit_scale.item() == pytest.approx(math.log(10.0))
    assert sig.logit_bias.item() == pytest.approx(-10.0)


@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_gradients_reach_temperature_and_inputs(
    name: str, pair: tuple[torch.Tensor, torch.Tensor]
) -> None:
    img = pair[0].clone().requires_grad_(True)
    loss = build_loss(name)
    loss(img, pair[1]).backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad != 0
    assert img.grad is not None and img.grad.abs().sum() > 0
    if name == "sigmoid":
        assert loss.logit_bias.grad is not None and loss.logit_bias.grad != 0


@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_aligned_pairs_score_better_than_random(name: str) -> None:
    gen = torch.Generator().manual_seed(1)
    img = torch.randn(16, 8, generator=gen)
    loss = build_loss(name)
    aligned = loss(img, img * 2.0)  # same directions: cosine 1 on the diagonal
    shuffled = loss(img, torch.randn(16, 8, generator=gen))
    assert aligned < shuffled


def test_scale_is_clamped_at_100(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    img, rel = pair
    loss = InfoNCELoss(init_temperature=1e-4)
    assert loss.scale.item() == pytest.approx(100.0)
    expected = naive_infonce(img, rel, 100.0)
    assert torch.allclose(loss(img, rel), torch.tensor(expected), atol=1e-4, rtol=1e-5)


def test_logits_orientation() -> None:
    img = torch.eye(3)
    rel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    logits = InfoNCELoss(init_temperature=1.0).logits(img, rel)
    # image 0 matches relevé 1
    assert logits[0, 1].item() == pytest.approx(1.0)
    assert logits[0, 0].item() == pytest.approx(0.0)


def test_build_loss_unknown_name() -> None:
    with pytest.raises(CatalogError, match="infonce"):
        build_loss("triplet")


def test_build_loss_passes_options() -> None:
    loss = build_loss("infonce", init_temperature=0.5)
    assert loss.logit_scale.item() == pytest.approx(math.log(2.0))


def test_mismatched_batches() -> None:
    with pytest.raises(InputDataError, match=r"\(4, 5\)"):
        InfoNCELoss()(torch.randn(4, 5), torch.randn(3, 5))


def test_bad_temperature() -> None:
    with pytest.raises(CatalogError, match="init_temperature must be > 0, got 0.0"):
        SigmoidLoss(init_temperature=0.0)
