"""AGW building blocks against their formulas."""

from __future__ import annotations

import torch

from dist_reid.models import create_model
from dist_reid.models.layers import BNNeck, GeM, NonLocal
from dist_reid.models.resnet import TwoStreamResNet


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
