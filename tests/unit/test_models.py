"""AGW building blocks against their formulas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_reid.config import load_config
from dist_reid.models import create_model
from dist_reid.models.layers import BNNeck, GeM, NonLocal
from dist_reid.models.resnet import TwoStreamResNet

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_non_local_equals_the_explicit_affinity_formula():
    torch.manual_seed(0)
    block = NonLocal(6, 3).double()
    torch.nn.init.normal_(block.out[1].weight)  # leave the zero-init identity regime
    x = torch.randn(2, 6, 5, 3, dtype=torch.float64)
    b, _, h, w = x.shape
    theta = block.theta(x).reshape(b, 3, -1).transpose(1, 2)  # (b, N, c')
    phi = block.phi(x).reshape(b, 3, -1)  # (b, c', N)
    g = block.g(x).reshape(b, 3, -1).transpose(1, 2)  # (b, N, c')
    f = theta @ phi / (h * w)  # the N x N affinity the reference builds
    y = (f @ g).transpose(1, 2).reshape(b, 3, h, w)
    expected = block.out(y) + x
    torch.testing.assert_close(block(x), expected)


def test_non_local_starts_as_identity():
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(NonLocal(8, 4)(x), x)


def test_gem_is_the_generalised_mean():
    x = torch.rand(2, 3, 4, 5) + 0.1
    torch.testing.assert_close(GeM(3.0)(x), (x**3).mean(dim=(2, 3)) ** (1 / 3))


def test_bnneck_has_a_frozen_zero_shift():
    neck = BNNeck(16, 5)
    assert not neck.bn.bias.requires_grad and torch.count_nonzero(neck.bn.bias) == 0
    assert neck.classifier.bias is None and neck.classifier.weight.std() < 0.01


def test_each_modality_uses_only_its_own_stem():
    torch.manual_seed(0)
    net = TwoStreamResNet("resnet18", non_local=(0, 0, 0, 0)).eval()
    images = torch.randn(4, 3, 64, 32)
    modalities = torch.tensor([0, 0, 1, 1])
    before = net(images, modalities)
    with torch.no_grad():
        net.infrared_stem[0].weight.mul_(2)
    after = net(images, modalities)
    torch.testing.assert_close(after[:2], before[:2])  # visible rows untouched
    assert not torch.allclose(after[2:], before[2:])


def test_last_stride_one_keeps_resolution_and_embed_matches_forward():
    torch.manual_seed(0)
    model = create_model("agw", num_classes=7, backbone="resnet18").eval()
    assert model.backbone(torch.randn(2, 3, 64, 32), torch.tensor([0, 1])).shape[-2:] == (4, 2)
    images = torch.randn(3, 3, 64, 32)
    out = model(images, torch.ones(3, dtype=torch.long))
    assert out["logits"].shape == (3, 7) and out["features"].shape == (3, 512)
    torch.testing.assert_close(model.embed(images, "infrared"), out["bn_features"])


# Released figures: AGW's released model.py (mangye16/Cross-Modal-Re-ID-baseline), run outside
# this project with torch 2.14 CPU: sum(p.numel() for p in Non_local(C).parameters()) gives 3587
# for C = 512 and 7171 for C = 1024 (inter_channels = 1), and embed_net(395, no_local="on")
# (ResNet-50, built without downloading weights) holds 28687 parameters in its NL_2 (2 blocks,
# after residual blocks 2, 3) and NL_3 (3 blocks, after 3, 4, 5) lists.
RELEASED_NON_LOCAL = {512: 3587, 1024: 7171}
RELEASED_AGW_NON_LOCAL_TOTAL = 28687


def _non_local_blocks(net: torch.nn.Module) -> list[NonLocal]:
    return [m for m in net.modules() if isinstance(m, NonLocal)]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _half_width_block(c: int) -> int:
    """C/2 inter-channels: g, theta, phi (C -> C/2, with bias), W (C/2 -> C, with bias), BN."""
    inter = c // 2
    return 3 * (c * inter + inter) + (inter * c + c) + 2 * c


def test_non_local_width_official_is_the_released_module():
    net = TwoStreamResNet("resnet50", non_local_width="official")
    blocks = _non_local_blocks(net)
    assert [b.inter for b in blocks] == [1] * 5
    channels = [b.g.in_channels for b in blocks]
    assert channels == [512, 512, 1024, 1024, 1024]
    assert [_count(b) for b in blocks] == [RELEASED_NON_LOCAL[c] for c in channels]
    assert sum(_count(b) for b in blocks) == RELEASED_AGW_NON_LOCAL_TOTAL
    # Placement as released: after residual blocks 2, 3 of stage 2 and 3, 4, 5 of stage 3.
    for stage, after in ((net.stages[1], (2, 3)), (net.stages[2], (3, 4, 5))):
        kinds = [isinstance(m, NonLocal) for m in stage]
        residual_before = [sum(not k for k in kinds[:i]) - 1 for i, k in enumerate(kinds) if k]
        assert tuple(residual_before) == after


def test_non_local_width_half_and_the_agw_parameter_difference():
    half = TwoStreamResNet("resnet50", non_local_width="half")
    official = TwoStreamResNet("resnet50", non_local_width="official")
    blocks = _non_local_blocks(half)
    assert [b.inter for b in blocks] == [256, 256, 512, 512, 512]
    assert [_count(b) for b in blocks] == [_half_width_block(b.g.in_channels) for b in blocks]
    want = 2 * _half_width_block(512) + 3 * _half_width_block(1024)
    assert _count(half) - _count(official) == want - RELEASED_AGW_NON_LOCAL_TOTAL == 7_329_777


def test_agw_defaults_to_the_released_non_local_width():
    blocks = _non_local_blocks(create_model("agw", num_classes=3, backbone="resnet18"))
    assert blocks and all(b.inter == 1 for b in blocks)
    with pytest.raises(ValueError, match="non_local_width"):
        create_model("agw", num_classes=3, backbone="resnet18", non_local_width="quarter")


@pytest.mark.parametrize("method", ["agw", "icre", "emif"])
def test_agw_family_presets_follow_the_released_code(method):
    cfg = load_config(CONFIGS / f"sysu/{method}.yaml", ["data.root=/data/x"])
    assert cfg.model.options["non_local_width"] == "official"
    assert cfg.loss.options["wrt_form"] == "official"
