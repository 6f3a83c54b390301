"""PDM (methods.md section 2): model shapes and switches, every loss term by hand and by
gradcheck, configs, and a 2-process training run on synthetic data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_layout_path_is_sync_free,
    awkward_layouts,
    cuda_syncs_raise,
    loss_terms_and_grads,
    sampler_layout_labels,
    tiny_run_overrides,
)
from reid_kernels import BatchLayout, dispatch, triplet_mining_loss_reference

from dist_reid.builders import build_loss, build_model, check_method
from dist_reid.config import load_config
from dist_reid.config.schema import ConfigError
from dist_reid.engine.build import build_optimizer
from dist_reid.losses import LOSSES
from dist_reid.losses.pdm import (
    CPM_FORMS,
    DCS_FORMS,
    PDMLoss,
    ch_loss,
    cpm_loss,
    dcs_loss,
    ort_loss,
)
from dist_reid.models import MODELS
from dist_reid.models.pdm import (
    MFA,
    PDM,
    PLM,
    MFGMBranch,
    SimAM,
    feature_map_size,
    phase_only,
)

REPO = Path(__file__).resolve().parents[2]
SIZE = (64, 32)
LABELS = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])  # sampler layout: P=2, K=2 visible then infrared
MODS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**options) -> PDM:
    torch.manual_seed(0)
    return PDM(num_classes=3, backbone="resnet18", input_size=SIZE, **options)


def test_registered_by_name():
    assert MODELS.get("pdm") is PDM and LOSSES.get("pdm") is PDMLoss


@pytest.mark.parametrize("after, channels", [(3, 512), (2, 256)])
def test_forward_shapes_train_and_test(after, channels):
    model = tiny(mfgm_after=after)
    out = model(torch.randn(8, 3, *SIZE), MODS)
    n = 8 * 3  # original + 2 MFGM branches stacked along the batch
    positions = 4 * 2  # 64x32 / 16
    assert out["global"].shape == (n, channels)
    assert out["feature"].shape == (n, 11 * channels)
    assert out["logits_global"].shape == out["logits_feature"].shape == (n, 3)
    assert out["prototype_logits"].shape == (n, 10, positions)
    # F = [p_1 .. p_m, F_g]: its last C entries are the global feature.
    torch.testing.assert_close(out["feature"][:, -channels:], out["global"])
    # Every trainable parameter gets a gradient (DDP refuses unused ones).
    sum(v.sum() for v in out.values()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    model.eval()
    assert model.embed(torch.randn(2, 3, *SIZE), "visible").shape == (2, channels)
    model.test_mode = "official"
    emb = model.embed(torch.randn(2, 3, *SIZE), "infrared")
    assert emb.shape == (2, 3 * 12 * channels)
    # 6 unit-norm chunks: the evaluator's cosine ranks as the sum of 6 cosine matrices.
    chunks = emb.split([channels, 11 * channels] * 3, dim=1)
    for c in chunks:
        torch.testing.assert_close(c.norm(dim=1), torch.ones(2))


def test_official_test_score_equals_sum_of_cosines():
    model = tiny(test_mode="official").eval()
    q, g = (
        model.embed(torch.randn(3, 3, *SIZE), "infrared"),
        model.embed(torch.randn(4, 3, *SIZE), "visible"),
    )
    c = 512
    widths = [c, 11 * c] * 3
    summed = sum(a @ b.T for a, b in zip(q.split(widths, 1), g.split(widths, 1), strict=True))
    cos = F.normalize(q, dim=1) @ F.normalize(g, dim=1).T
    torch.testing.assert_close(cos * 6, summed)


def test_feature_map_size_and_input_mismatch_fails_fast():
    assert feature_map_size((384, 192), 4) == (24, 12)
    assert feature_map_size((288, 144), 4) == (18, 9)
    model = tiny()
    assert model.plm.pos_embed.shape == (8, 512)
    with pytest.raises(ValueError, match=r"input_size.*\(32, 16\)"):
        model(torch.randn(2, 3, 32, 16), MODS[:2])


def test_builder_sizes_positional_embedding_from_data_size():
    cfg = load_config(
        REPO / "configs/sysu/pdm.yaml",
        [
            "data.root=x",
            "model.backbone=resnet18",
            "data.height=96",
            "data.width=48",
            "model.pretrained=null",
        ],
    )
    model = build_model(cfg, num_classes=5)
    assert model.plm.pos_embed.shape == (6 * 3, 512)


def test_switches_change_structure():
    base = tiny()
    assert tiny(num_prototypes=4).plm.prototypes.shape == (4, 512)
    assert tiny(num_prototypes=4).neck_feature.bn.num_features == 5 * 512
    assert tiny(mfgm_branches=1)(torch.randn(4, 3, *SIZE), MODS[2:6])["global"].shape[0] == 8
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(tiny(mfa=False)) < count(base)
    assert tiny(mfa=False).mfa is None and len(base.mfa) == 3 and len(tiny(mfgm_after=2).mfa) == 2
    assert (
        base.mfgm[0].proj.in_channels == 64
        and tiny(mfgm_variant="paper").mfgm[0].proj.in_channels == 128
    )
    assert tiny(sna=False).sna is None


def test_phase_augmentation_only_while_training():
    x = torch.randn(4, 3, *SIZE)
    on, off = tiny(phase_aug=True, dropout=0.0), tiny(phase_aug=False, dropout=0.0)
    off.load_state_dict(on.state_dict())
    on.eval(), off.eval()
    torch.testing.assert_close(on.embed(x, "visible"), off.embed(x, "visible"))
    on.train(), off.train()
    assert not torch.allclose(on(x, MODS[:4])["global"], off(x, MODS[:4])["global"])


def test_phase_only_of_constant_image_is_a_delta():
    # A constant image's spectrum is pure DC (phase 0), other bins have angle 0: all-ones spectrum.
    out = phase_only(torch.full((1, 1, 4, 4), 3.0))
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 0, 0] = 1.0
    torch.testing.assert_close(out, expected)


def test_simam_hand_computed():
    x = torch.tensor([[[[1.0, 3.0]]]])  # mean 2, d = [1, 1], v = 2 / 1
    lam = 1e-4
    e = 1.0 / (4 * (2.0 + lam)) + 0.5
    expected = x * torch.sigmoid(torch.tensor(e))
    torch.testing.assert_close(SimAM(lam)(x), expected)


def test_plm_hand_computed():
    plm = PLM(channels=2, num_prototypes=1, positions=2)
    with torch.no_grad():
        plm.prototypes.copy_(torch.tensor([[1.0, 0.0]]))
        plm.pos_embed.copy_(torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]))
    x = torch.tensor([[[[0.0, 0.0]], [[2.0, 4.0]]]])  # (1, C=2, h=1, w=2): tokens (0,2), (0,4)
    local, logits = plm(x)
    # logits = P.(I+E) = [0, log 3]; S = [0.5, 0.75]; p = (0.5*(0,2) + 0.75*(0,4)) / 2 = (0, 2)
    torch.testing.assert_close(logits, torch.tensor([[[0.0, math.log(3.0)]]]))
    torch.testing.assert_close(local, torch.tensor([[[0.0, 2.0]]]))


# -- fidelity to the released modules (model_pdm.py) -----------------------------------------
# Recipe of the pinned figures below, run outside this project on the released module: every
# parameter and buffer, in sorted order of the released state-dict names (num_batches_tracked
# skipped), drawn from numpy default_rng(seed) as standard_normal(shape) * 0.2, BN running_var
# as 0.5 + random(shape); inputs from default_rng(input_seed).standard_normal; eval mode; the
# output's sum, norm and flat entries [0], [numel // 2], [-1].


def _fill_from_released_names(module: torch.nn.Module, names: dict[str, str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    state = module.state_dict()
    for released in sorted(names):
        ours = names[released]
        shape = tuple(state[ours].shape)
        if released.endswith("running_var"):
            value = 0.5 + rng.random(shape)
        else:
            value = rng.standard_normal(shape) * 0.2
        state[ours] = torch.tensor(value, dtype=torch.float32)
    module.load_state_dict(state)


def _mfa_names() -> dict[str, str]:
    names = {}
    for rel, ours in (("CNL", "cnl"), ("PNL", "pnl")):
        for a, b in (("g", "g"), ("theta", "theta"), ("phi", "phi"), ("W.0", "out.0")):
            for p in ("weight", "bias"):
                names[f"{rel}.{a}.{p}"] = f"{ours}.{b}.{p}"
        for p in ("weight", "bias", "running_mean", "running_var"):
            names[f"{rel}.W.1.{p}"] = f"{ours}.out.1.{p}"
    return names


def _figures(t: torch.Tensor) -> list[float]:
    flat = t.flatten()
    return [
        t.sum().item(),
        t.norm().item(),
        flat[0].item(),
        flat[flat.numel() // 2].item(),
        flat[-1].item(),
    ]


# Released MFA_block(high=32, low=16, flag) (CNL then PNL), params seed 10 + flag, inputs
# x_h (2, 32, 6, 4) then x_l (2, 16, hl, wl) from one default_rng(20 + flag).
RELEASED_MFA = {
    # flag: (x_l size, CNL figures, PNL(x_h, x_l) figures, MFA figures)
    0: (
        (6, 4),
        [
            -129.6537628173828,
            40.51335525512695,
            -0.46506717801094055,
            0.3024321496486664,
            0.8738650679588318,
        ],
        [
            -90.49566650390625,
            41.19170379638672,
            -0.3116645812988281,
            0.5412606596946716,
            0.4328494966030121,
        ],
        [
            -95.23841857910156,
            42.06474304199219,
            -0.44644391536712646,
            0.42107293009757996,
            0.37451380491256714,
        ],
    ),
    1: (
        (12, 8),
        [
            22.45215606689453,
            39.495506286621094,
            0.2697436809539795,
            0.04956187307834625,
            -1.1649999618530273,
        ],
        [
            -80.38252258300781,
            38.43723678588867,
            0.6175392270088196,
            0.5062403082847595,
            -1.0000743865966797,
        ],
        [
            -65.89383697509766,
            40.69490051269531,
            0.5277850031852722,
            0.331432580947876,
            -1.2102450132369995,
        ],
    ),
}


@pytest.mark.parametrize("flag", [0, 1])
def test_mfa_matches_the_released_block(flag):
    low_size, cnl, pnl, mfa = RELEASED_MFA[flag]
    rng = np.random.default_rng(20 + flag)
    x_h = torch.tensor(rng.standard_normal((2, 32, 6, 4)), dtype=torch.float32)
    x_l = torch.tensor(rng.standard_normal((2, 16, *low_size)), dtype=torch.float32)
    outs = {}
    for form in ("released", "intended"):
        block = MFA(32, 16, downsample=bool(flag), pnl=form).eval()
        _fill_from_released_names(block, _mfa_names(), 10 + flag)
        with torch.no_grad():
            outs[form] = (block.cnl(x_h, x_l), block.pnl(x_h, x_l), block(x_h, x_l))
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # noqa: E731
    got = outs["released"]
    close(_figures(got[0]), cnl)
    close(_figures(got[1]), pnl)
    close(_figures(got[2]), mfa)
    # The intended pixel non-local is another function of the same weights.
    assert abs(_figures(outs["intended"][1])[0] - pnl[0]) > 0.5


def test_released_pnl_folds_positions_into_channels():
    """Hand check of the fold: with identity-like 1x1 convs, 'channels' are position blocks."""
    pnl = MFA(4, 4, downsample=False, pnl="released").pnl  # inter = 2, fold 2 maps into 4 rows
    x = torch.randn(1, 2, 2, 2)  # (b, inter, h, w): 8 values -> 4 rows of 2
    assert pnl._tokens(x).shape == (1, 2, 4)
    torch.testing.assert_close(pnl._tokens(x)[0].T, x.reshape(4, 2))
    with pytest.raises(ValueError, match="mfa_pnl=released"):
        pnl._tokens(torch.randn(1, 2, 3, 1))  # 6 values do not fold into 4 rows


# Released MFGM(64) (two branches FC1x/SC1, FC2x/SC2), params seed 30, input (2, 64, 6, 4) from
# default_rng(31); figures of the two generated maps (out[2:4], out[4:6]).
RELEASED_MFGM = [
    [
        83.87211608886719,
        80.34033966064453,
        0.3534740209579468,
        1.7523164749145508,
        0.905574381351471,
    ],
    [
        -362.3049011230469,
        82.38888549804688,
        -2.1064915657043457,
        -1.7227703332901,
        1.3473283052444458,
    ],
]


def _mfgm_names(branch: int) -> dict[str, str]:
    k = branch + 1
    return {
        f"FC{k}1.weight": "dilated.0.weight",
        f"FC{k}2.weight": "dilated.1.weight",
        f"FC{k}3.weight": "dilated.2.weight",
        f"SC{k}.ca.se.0.weight": "ca.mlp.0.weight",
        f"SC{k}.ca.se.2.weight": "ca.mlp.2.weight",
        f"SC{k}.sa.conv.weight": "sa.conv.weight",
        f"SC{k}.sa.conv.bias": "sa.conv.bias",
        f"FC{k}.weight": "proj.weight",
        f"FC{k}.bias": "proj.bias",
    }


def test_mfgm_matches_the_released_module():
    torch.manual_seed(0)
    branches = [MFGMBranch(64, init="released").eval() for _ in range(2)]
    # Both branches draw from one stream in the released name order (FC1*, FC2*, SC1*, SC2*).
    rng = np.random.default_rng(30)
    names = {**_mfgm_names(0), **_mfgm_names(1)}
    states = [b.state_dict() for b in branches]
    for released in sorted(names):
        branch = 0 if released[2] == "1" else 1
        state = states[branch]
        value = rng.standard_normal(tuple(state[names[released]].shape)) * 0.2
        tensor = torch.tensor(value, dtype=torch.float32)
        if released.endswith("sa.conv.weight"):
            tensor = tensor.flip(1)  # released input channels (max, mean); ours (mean, max)
        state[names[released]] = tensor
    for b, state in zip(branches, states, strict=True):
        b.load_state_dict(state)
    x = torch.tensor(np.random.default_rng(31).standard_normal((2, 64, 6, 4)), dtype=torch.float32)
    with torch.no_grad():
        for b, expected in zip(branches, RELEASED_MFGM, strict=True):
            torch.testing.assert_close(_figures(b(x)), expected, rtol=1e-4, atol=1e-4)


# Std of the released MFGM(256)'s two generated maps at init (torch.manual_seed(seed) before
# building it, input default_rng(seed).standard_normal((2, 256, 24, 12)), eval mode), over
# seeds 0..39: mean and sample sd. (MFGM(1024): mean 0.9378 over seeds 0..7, sd 0.0099.)
RELEASED_MFGM_STD = (0.9388530492782593, 0.013662434663091366)


def test_mfgm_generated_std_at_init_matches_the_released_statistic():
    mean, sd = RELEASED_MFGM_STD
    seeds = range(16)
    band = 4 * sd / len(seeds) ** 0.5  # 4 standard errors of a 16-seed mean
    stats = {}
    for init in ("released", "ours"):
        stds = []
        for seed in seeds:
            torch.manual_seed(seed)
            branches = [MFGMBranch(256, init=init).eval() for _ in range(2)]
            rng = np.random.default_rng(seed)
            x = torch.tensor(rng.standard_normal((2, 256, 24, 12)), dtype=torch.float32)
            with torch.no_grad():
                stds.append(torch.cat([b(x) for b in branches]).std().item())
        stats[init] = float(np.mean(stds))
    assert abs(stats["released"] - mean) < band, (stats, mean, band)
    assert stats["ours"] < (mean - band) / 3  # PyTorch's default init: maps start far smaller
    assert MFGMBranch(8, init="ours").proj.bias is None


# -- losses ------------------------------------------------------------------------------------
def _cpm_inputs():
    labels = torch.tensor([0, 1, 0, 1])
    mods = torch.tensor([0, 0, 1, 1])
    feats = torch.tensor([[0.0], [10.0], [1.0], [11.0]])  # v: 0, 10; ir: 1, 11
    gen = torch.tensor([[0.5], [10.5], [1.5], [11.5]])  # v+: 0.5, 10.5; ir+: 1.5, 11.5
    return feats, gen, labels, mods


def test_cpm_code_form_hand_computed():
    # v+ direction: [|1-.5| - |0-.5| + .2]_+ = .2 per id, other hinges 0 -> .5 * .2
    # ir+ direction: [|0-1.5| - |1-1.5| + .2]_+ = 1.2 per id -> .5 * 1.2;  total 0.7
    f, g, y, m = _cpm_inputs()
    torch.testing.assert_close(cpm_loss(f, g, y, m, 0.2, "code", "torch"), torch.tensor(0.7))


def test_cpm_paper_form_hand_computed():
    labels, mods = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])
    f = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # v: 0, 1; ir: 2, 3
    g = torch.tensor([[0.5], [1.5], [2.5], [3.5]])  # v+: .5, 1.5; ir+: 2.5, 3.5
    # v+: j=0: [|2-.5| - |0-.5| - |0-1| + .2] = .2 ; j=1: [|3-1.5| - .5 - 1 + .2] = .2 -> mean .2
    # ir+: j=0: [|0-2.5| - |2-2.5| - |2-3| + .2] = 1.2 ; j=1: [|1-3.5| - .5 - 1 + .2] = 1.2 -> 1.2
    torch.testing.assert_close(
        cpm_loss(f, g, labels, mods, 0.2, "paper", "torch"), torch.tensor(1.4)
    )


def test_ch_loss_hand_computed():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), -math.log(3.0)]]])  # S: [.5,.5], [.75,.25]
    torch.testing.assert_close(ch_loss(logits, "code", "torch"), torch.tensor(-0.25))
    raw = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    torch.testing.assert_close(ch_loss(raw, "cosine", "torch"), torch.tensor(1 / math.sqrt(2)))


def test_dcs_loss_hand_computed():
    f = torch.tensor([[0.0], [2.0], [10.0], [10.0]])
    y = torch.tensor([0, 0, 1, 1])
    # pull: (|0-1| - .01 + |2-1| - .01 + 0 + 0) / 4 = .495; push: [20 - 9]_+ = 11
    for form in ("paper", "code"):
        torch.testing.assert_close(
            dcs_loss(f, y, 0.01, 20.0, form, 1, "torch"), torch.tensor(11.495)
        )
    torch.testing.assert_close(dcs_loss(f, y, 0.01, 0.7, "paper", 1, "torch"), torch.tensor(0.495))


def test_dcs_anchor_stride_differs_from_paper_form():
    f = torch.tensor([[0.0], [0.0], [1.0], [1.0], [3.0], [3.0]])
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    # centroid gaps 1, 3, 2; rho2 4: paper = mean(3, 1, 2) = 2.
    torch.testing.assert_close(dcs_loss(f, y, 0.0, 4.0, "paper", 4, "torch"), torch.tensor(2.0))
    # code, stride 4: anchors rows 0 (id 0: mean(3, 1) = 2) and 4 (id 2: mean(1, 2) = 1.5)
    torch.testing.assert_close(dcs_loss(f, y, 0.0, 4.0, "code", 4, "torch"), torch.tensor(1.75))


def test_ort_loss_hand_computed():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    torch.testing.assert_close(ort_loss([a, b], form="normalized"), torch.tensor(1 / 3))
    torch.testing.assert_close(ort_loss([a * 3, b], form="released"), torch.tensor(6 / 3))
    with pytest.raises(ValueError, match="ort_form"):
        ort_loss([a, b], form="cosine")


# Reference figures of the released L_ort: the lines of `embed_net.forward` (model_pdm.py,
# training branch) run outside this project on xp = rows of [original; generated 1; generated 2]
# (3N rows, viewed (3N, C, 1, 1)), float64, from numpy default_rng(seed):
# seed 0 and 1: rng.random((3 * 64, 2048)) (non-negative, norm ~26: pre-BN pooled features);
# seed 2: rng.standard_normal((3 * 5, 7)). "grad" is the norm of d loss / d xp over all rows.
RELEASED_ORT = [
    # (seed, n, c, kind, released loss, grad norm, cosine form)
    (0, 64, 2048, "uniform", 170.59674369402242, 1.540210683913481, 0.2497213260217077),
    (1, 64, 2048, "uniform", 170.31125708534532, 1.5384854882335308, 0.2498675535387954),
    (2, 5, 7, "normal", 0.04047955799866719, 0.5232691835073598, -0.006725094046370354),
]


@pytest.mark.parametrize("seed, n, c, kind, value, grad_norm, cosine", RELEASED_ORT)
def test_ort_loss_matches_the_released_figures(seed, n, c, kind, value, grad_norm, cosine):
    rng = np.random.default_rng(seed)
    a = rng.random((3 * n, c)) if kind == "uniform" else rng.standard_normal((3 * n, c))
    x = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    loss = ort_loss([x[n : 2 * n], x[2 * n :]], form="released")
    loss.backward()
    torch.testing.assert_close(loss.item(), value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad.norm().item(), grad_norm, rtol=1e-12, atol=1e-12)
    normalized = ort_loss([x[n : 2 * n], x[2 * n :]], form="normalized")
    torch.testing.assert_close(normalized.item(), cosine, rtol=1e-12, atol=1e-12)
    # Through the loss module: the official default is the released form.
    glob = x.detach()
    out = {"global": glob, "feature": glob}
    terms = PDMLoss(
        id_weight=0, triplet_weight=0, cpm_weight=0, ch_weight=0, dcs_weight=0, kernels="torch"
    )(out, torch.arange(n), torch.zeros(n, dtype=torch.long))
    torch.testing.assert_close(terms["ort"].item(), 0.01 * value, rtol=1e-12, atol=1e-12)


def test_loss_terms_gradcheck_float64():
    torch.manual_seed(0)
    f = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    for form in ("code", "paper"):
        assert torch.autograd.gradcheck(
            lambda a, b, form=form: cpm_loss(a, b, LABELS, MODS, 2.0, form, "torch", False), (f, g)
        )
        assert torch.autograd.gradcheck(
            lambda a, form=form: dcs_loss(a, LABELS, 0.01, 3.0, form, 4, "torch"), (f,)
        )
    # The code form's stop-gradient: only the cross-modal distance carries gradient in hinge 1.
    fd = f.detach().requires_grad_()
    cpm_loss(fd, g.detach(), LABELS, MODS, 100.0, "code", "torch").backward()
    fn = fd.grad.clone()
    fd.grad = None
    cpm_loss(fd, g.detach(), LABELS, MODS, 100.0, "code", "torch", False).backward()
    assert not torch.allclose(fn, fd.grad)
    s = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    for form in ("code", "cosine"):
        assert torch.autograd.gradcheck(lambda a, form=form: ch_loss(a, form, "torch"), (s,))
    assert torch.autograd.gradcheck(lambda a, b: ort_loss([a, b]), (f, g))


def test_pdm_loss_assembles_weighted_terms():
    model = tiny()
    out = model(torch.randn(8, 3, *SIZE), MODS)
    loss = PDMLoss(kernels="torch")
    terms = loss(out, LABELS, MODS)
    assert set(terms) == {"id", "tri", "cpm", "ch", "dcs", "ort"}
    y3 = LABELS.repeat(3)
    ce = F.cross_entropy(out["logits_global"], y3) + F.cross_entropy(out["logits_feature"], y3)
    torch.testing.assert_close(terms["id"], ce)
    torch.testing.assert_close(
        terms["tri"], triplet_mining_loss_reference(out["global"], y3, 0.3, "hard")
    )
    cpm = sum(
        cpm_loss(x[:8], x[8 * s : 8 * (s + 1)], LABELS, MODS, 0.2, "code", "torch")
        for x in (out["global"], out["feature"])
        for s in (1, 2)
    )
    torch.testing.assert_close(terms["cpm"], 0.4 * cpm)
    torch.testing.assert_close(
        terms["ch"], 0.25 * ch_loss(out["prototype_logits"], "code", "torch")
    )
    torch.testing.assert_close(
        terms["ort"], 0.01 * ort_loss([out["global"][8:16], out["global"][16:]])
    )
    paper = PDMLoss(
        cpm_form="paper",
        ch_form="cosine",
        ch_weight=1.0,
        dcs_form="paper",
        ort_weight=0.0,
        kernels="torch",
    )
    assert "ort" not in paper(out, LABELS, MODS)
    r = out["prototype_logits"]
    cos = F.cosine_similarity(r[:, :, None], r[:, None, :], dim=3)  # (N, m, m)
    iu = torch.triu_indices(10, 10, offset=1)
    torch.testing.assert_close(paper(out, LABELS, MODS)["ch"], cos[:, iu[0], iu[1]].mean())
    assert terms["ch"] <= 0  # the code form is a negated distance


# -- the sampler's layout: the same terms without host syncs ------------------------------------
LAYOUTS = awkward_layouts()
PAPER_FORMS = {"cpm_form": "paper", "ch_form": "cosine", "dcs_form": "paper", "ort_weight": 0.0}


def _layout_outputs(layout: BatchLayout, sets: int = 3, dtype=torch.float64) -> dict:
    g = torch.Generator().manual_seed(layout.rows)
    n, d = sets * layout.rows, 5
    return {
        "global": torch.randn(n, d, generator=g, dtype=dtype),
        "feature": torch.randn(n, d, generator=g, dtype=dtype),
        "logits_global": torch.randn(n, 60, generator=g, dtype=dtype),
        "logits_feature": torch.randn(n, 60, generator=g, dtype=dtype),
        "prototype_logits": torch.randn(n, 3, 4, generator=g, dtype=dtype),
    }


def _pdm_terms(loss: PDMLoss, outputs: dict, labels, mods):
    """The terms and the gradients of their sum w.r.t. the two feature outputs."""
    terms, grads = loss_terms_and_grads(loss, outputs, labels, mods)
    return terms, (grads["global"], grads["feature"])


@pytest.mark.parametrize("forms", [{}, PAPER_FORMS], ids=["official", "paper"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_sampler_layout_gives_the_same_terms_and_gradients(layout, forms):
    """Float64: with the layout (slot-order segments, no unique) every term and gradient equals
    the general path's, for awkward P/K and both halves first; the official forms included."""
    labels, mods = sampler_layout_labels(layout, seed=layout.rows)
    outputs = _layout_outputs(layout)
    want, want_grads = _pdm_terms(PDMLoss(kernels="torch", **forms), outputs, labels, mods)
    got, got_grads = _pdm_terms(
        PDMLoss(kernels="torch", batch_layout=layout, **forms), outputs, labels, mods
    )
    assert got.keys() == want.keys() and {"cpm", "dcs"} <= set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)
    # The term functions directly, on one set and on all three (dcs sees the repeated labels).
    n, glob = layout.rows, outputs["global"]
    for form in CPM_FORMS:
        torch.testing.assert_close(
            cpm_loss(glob[:n], glob[n : 2 * n], labels, mods, 0.2, form, "torch", layout=layout),
            cpm_loss(glob[:n], glob[n : 2 * n], labels, mods, 0.2, form, "torch"),
        )
    for form in DCS_FORMS:
        y3 = labels.repeat(3)
        torch.testing.assert_close(
            dcs_loss(glob, y3, 0.01, 3.0, form, 3, "torch", layout=layout),
            dcs_loss(glob, y3, 0.01, 3.0, form, 3, "torch"),
        )


def test_sampler_layout_refuses_a_batch_that_breaks_it():
    layout = BatchLayout(2, 2)
    outputs = _layout_outputs(layout)
    loss = PDMLoss(kernels="torch", batch_layout=layout)
    with pytest.raises(ValueError, match="layout"):  # checked on the first batch
        loss(outputs, LABELS, 1 - MODS)
    with pytest.raises(ValueError, match="layout"):
        cpm_loss(outputs["global"], outputs["global"][:8], LABELS, MODS, layout=layout)
    with pytest.raises(ValueError, match="layout"):
        dcs_loss(outputs["feature"][:7], LABELS[:7], layout=layout)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("forms", [{}, PAPER_FORMS], ids=["official", "paper"])
def test_sampler_layout_reads_no_value_on_the_host(backend, forms):
    """The CPU stand-in for "no host sync": after the first (checked) batch, the whole loss,
    forward and backward, calls none of the ops that sync on a GPU; without the layout it does."""
    if backend == "triton" and not dispatch.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 was not set before import")
    layout = BatchLayout(3, 2, infrared_first=True)
    labels, mods = sampler_layout_labels(layout)
    outputs = _layout_outputs(layout, dtype=torch.float32)
    assert_layout_path_is_sync_free(
        PDMLoss(kernels=backend, batch_layout=layout, **forms),
        PDMLoss(kernels=backend, **forms),
        outputs,
        labels,
        mods,
        grad_keys=("global", "feature"),
    )


@pytest.mark.parametrize(
    "options, key",
    [
        ({"cpm_form": "x"}, "cpm_form"),
        ({"ch_form": "x"}, "ch_form"),
        ({"dcs_form": "x"}, "dcs_form"),
        ({"ort_form": "x"}, "ort_form"),
    ],
)
def test_bad_loss_options_name_the_key(options, key):
    with pytest.raises(ValueError, match=key):
        PDMLoss(**options)


def test_bad_model_option_names_the_key():
    with pytest.raises(ValueError, match="test_mode"):
        tiny(test_mode="fast")
    with pytest.raises(ValueError, match="mfgm_init"):
        tiny(mfgm_init="kaiming")
    with pytest.raises(ValueError, match="mfa_pnl"):
        tiny(mfa_pnl="paper")
    cfg = load_config(
        REPO / "configs/sysu/pdm.yaml",
        ["data.root=x", "model.pretrained=null", "model.options.prototypes=3"],
    )
    with pytest.raises(ConfigError, match=r"model\.options\.prototypes"):
        build_model(cfg, num_classes=3)


def test_lr_groups_cover_all_parameters_once():
    model = tiny()
    groups = model.lr_groups()
    ids = [id(p) for params, _ in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups["head"][1] == 1.0 and groups["backbone"][1] == groups["plm"][1] == 0.1
    plm = [*model.plm.parameters(), *model.neck_feature.parameters()]
    assert {id(p) for p in plm} == {id(p) for p in groups["plm"][0]}
    assert list(groups) == ["backbone", "plm", "head"]  # head last: its lr is the one logged
    assert tiny(plm=False).lr_groups()["plm"] == ([], 0.1)


@pytest.mark.parametrize("dataset", ["sysu", "regdb", "llcm"])
def test_configs_use_the_official_preset(dataset):
    cfg = load_config(
        REPO / f"configs/{dataset}/pdm.yaml",
        ["data.root=x", "model.backbone=resnet18", "model.pretrained=null"],
    )
    assert cfg.model.options["phase_aug"] and cfg.model.options["mfa"]
    assert cfg.model.options["mfgm_after"] == (2 if dataset == "regdb" else 3)
    loss = build_loss(cfg)
    assert loss.cpm_form == "code" and loss.w["ort"] == 0.01 and loss.ort_form == "released"
    model = build_model(cfg, num_classes=3)
    assert model.mfgm[0].proj.bias is not None and model.mfgm[0].sa.conv.bias is not None
    assert {blk.pnl.form for blk in model.mfa} == {"released"}


def test_paper_preset_turns_the_code_extras_off(tmp_path):
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text(
        f"_base_: [{REPO}/configs/datasets/sysu.yaml, {REPO}/configs/base/pdm_paper.yaml]\n"
    )
    cfg = load_config(cfg_file, ["data.root=x"])
    o = cfg.model.options
    assert not (o["phase_aug"] or o["sna"] or o["mfa"]) and o["mfgm_variant"] == "paper"
    assert cfg.loss.options["ort_weight"] == 0.0 and cfg.train.epochs == 150
    # No init in the paper: the code's; MFA and L_ort are off, their forms inert.
    assert o["mfgm_init"] == "released" and cfg.loss.options["ort_form"] == "normalized"


@pytest.mark.slow
def test_two_process_training_loss_falls(synthetic_trees, tmp_path, two_process_probe):
    root, _ = synthetic_trees["sysu"]
    overrides = tiny_run_overrides(
        root,
        tmp_path,
        "ddp",
        "data.augment.random_erasing=0",
        "model.backbone=resnet18",
        "train.lr=0.05",
        "optim.warmup_epochs=0",
        eval_subset=False,
    )
    ranks = two_process_probe(str(REPO / "configs/sysu/pdm.yaml"), 6, overrides)
    assert [r["batch"] for r in ranks] == [8, 8]


@pytest.mark.gpu
def test_cuda_kernels_match_the_torch_reference():
    model = tiny().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(torch.randn(8, 3, *SIZE, device="cuda"), MODS.cuda())
    out = {k: v.float() for k, v in out.items()}  # as the trainer does
    labels, mods = LABELS.cuda(), MODS.cuda()
    fused = PDMLoss(kernels="auto")(out, labels, mods)
    ref = PDMLoss(kernels="torch")(out, labels, mods)
    assert fused.keys() == ref.keys()
    for key in ref:
        assert torch.isfinite(fused[key]), key
        torch.testing.assert_close(fused[key], ref[key], rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.gpu
@pytest.mark.parametrize("forms", [{}, PAPER_FORMS], ids=["official", "paper"])
def test_cuda_layout_path_has_no_host_sync_and_matches(forms):
    layout = BatchLayout(8, 4)
    labels, mods = (t.cuda() for t in sampler_layout_labels(layout))
    outputs = {k: v.cuda() for k, v in _layout_outputs(layout, dtype=torch.float32).items()}
    loss = PDMLoss(kernels="auto", batch_layout=layout, **forms)
    _pdm_terms(loss, outputs, labels, mods)  # checks the layout and compiles the kernels
    with cuda_syncs_raise():
        terms, grads = _pdm_terms(loss, outputs, labels, mods)
    want, want_grads = _pdm_terms(PDMLoss(kernels="torch", **forms), outputs, labels, mods)
    for key in want:
        torch.testing.assert_close(terms[key], want[key], rtol=1e-4, atol=1e-4, msg=key)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_num_prototypes_switch_through_the_config():
    cfg = load_config(
        REPO / "configs/sysu/pdm.yaml",
        [
            "data.root=x",
            "model.backbone=resnet18",
            "model.pretrained=null",
            "model.options.num_prototypes=6",
        ],
    )
    model = build_model(cfg, num_classes=4)
    assert model.plm.prototypes.shape == (6, 512)
    assert model.neck_feature.classifier.in_features == 7 * 512


def test_plm_switch_off_is_the_baseline_without_head_b():
    """``plm: false`` (the paper's Table II baseline rows): F = F_g, one head, every parameter
    trained, the id term is head A's CE alone, and L_ch on such a model is refused by name."""
    model = tiny(plm=False)
    assert model.plm is None and model.neck_feature is None
    out = model(torch.randn(8, 3, *SIZE), MODS)
    assert set(out) == set(model.output_keys) == {"global", "feature", "logits_global"}
    torch.testing.assert_close(out["feature"], out["global"])
    terms = PDMLoss(ch_weight=0.0, kernels="torch")(out, LABELS, MODS)
    y3 = LABELS.repeat(3)
    torch.testing.assert_close(terms["id"], F.cross_entropy(out["logits_global"], y3))
    sum(terms.values()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    model.eval().test_mode = "official"
    emb = model.embed(torch.randn(2, 3, *SIZE), "visible")
    assert emb.shape == (2, 3 * 512)  # one unit-norm BN(F_g) chunk per feature set
    for chunk in emb.split(512, dim=1):
        torch.testing.assert_close(chunk.norm(dim=1), torch.ones(2))
    base = [
        "data.root=x",
        "model.backbone=resnet18",
        "model.pretrained=null",
        "model.options.plm=false",
    ]
    cfg = load_config(REPO / "configs/sysu/pdm.yaml", base)
    with pytest.raises(ConfigError, match=r"prototype_logits"):
        check_method(build_model(cfg, num_classes=3), build_loss(cfg), cfg)
    # The preset's lr_mults name the ``plm`` group; with PLM off it is empty and left out.
    cfg = load_config(REPO / "configs/sysu/pdm.yaml", [*base, "loss.options.ch_weight=0"])
    assert cfg.optim.lr_mults["plm"] == 0.1
    optimizer = build_optimizer(build_model(cfg, num_classes=3), cfg)
    assert [g["name"] for g in optimizer.param_groups] == ["backbone", "head"]
