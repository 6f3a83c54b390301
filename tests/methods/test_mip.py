"""MIP (methods.md section 5): tiny-ViT shapes, prompts, SIE, switches, losses by hand and by
gradcheck, configs, and a 2-process training run on synthetic data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reid_kernels import triplet_mining_loss_reference

from dist_reid.builders import build_loss, build_model
from dist_reid.config import load_config
from dist_reid.losses import LOSSES
from dist_reid.losses.mip import MIPLoss, msel_loss
from dist_reid.models import MODELS
from dist_reid.models.mip import MIP, jpm_groups, patch_grid, resize_pos_embed

REPO = Path(__file__).resolve().parents[2]
SIZE = (64, 32)
TINY = {"depth": 4, "embed_dim": 32, "num_heads": 2, "modality_prompts": 3, "instance_prompts": 2}
LABELS = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
MODS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
CAMS = torch.tensor([1, 2, 4, 5, 3, 6, 3, 6])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**options) -> MIP:
    torch.manual_seed(0)
    return MIP(num_classes=3, input_size=SIZE, **{**TINY, **options})


def test_registered_by_name():
    assert MODELS.get("mip") is MIP and LOSSES.get("mip") is MIPLoss


def test_patch_grid_and_position_embedding_resize():
    assert patch_grid((256, 128), 16, 12) == (21, 10)  # 210 patches, as in the code
    assert patch_grid((64, 32), 16, 12) == (5, 2)
    pos = torch.arange(1 + 16, dtype=torch.float32).reshape(1, 17, 1)
    out = resize_pos_embed(pos, (2, 2))
    assert out.shape == (1, 5, 1) and out[0, 0, 0] == 0  # CLS position kept as is
    # a 4x4 ramp resized to 2x2 (bilinear, half-pixel centres) averages each 2x2 block
    torch.testing.assert_close(out[0, 1:, 0], torch.tensor([3.5, 5.5, 11.5, 13.5]))


def test_jpm_groups_hand_computed():
    x = torch.arange(8, dtype=torch.float32).reshape(1, 8, 1)
    parts = jpm_groups(x, shift=2, shuffle_groups=2, parts=2)
    # roll by 2: 2..7,0,1; two groups [2,3,4,5] [6,7,0,1] interleaved: 2,6,3,7,4,0,5,1
    assert [p.flatten().tolist() for p in parts] == [[2, 6, 3, 7], [4, 0, 5, 1]]


def test_forward_shapes_train_and_test():
    model = tiny(iael=True)
    out = model(torch.randn(8, 3, *SIZE), MODS, CAMS)
    assert out["global"].shape == (8, 32) and out["local"].shape == (8, 4, 32)
    assert out["logits_global"].shape == (8, 3) and out["logits_local"].shape == (8, 4, 3)
    assert out["iael_logits"].shape == (8, 2, 3)  # depth 4 -> 2 prompted blocks
    # Every trainable parameter gets a gradient (DDP refuses unused ones; block 2 is skipped).
    sum(v.sum() for v in out.values()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert len(model.blocks) == 2 and len(tiny(skip_block=False).blocks) == 3
    model.eval()
    emb = model.embed(torch.randn(2, 3, *SIZE), "visible", torch.tensor([1, 2]))
    assert emb.shape == (2, 5 * 32)
    glob, _ = model._features(model._encode(torch.randn(2, 3, *SIZE), MODS[:2], CAMS[:2])[0])
    assert glob.shape == (2, 32)


def test_test_feature_is_pre_bn_global_and_quartered_locals():
    model = tiny().eval()
    x, cams = torch.randn(2, 3, *SIZE), torch.tensor([3, 6])
    emb = model.embed(x, "infrared", cams)
    glob, local = model._features(model._encode(x, torch.ones(2, dtype=torch.long), cams)[0])
    torch.testing.assert_close(emb, torch.cat([glob, *(local[:, k] / 4 for k in range(4))], 1))


def test_modality_and_camera_change_the_embedding():
    model = tiny(prompt_dropout=0.0).eval()
    x = torch.randn(2, 3, *SIZE)
    cams = torch.tensor([1, 1])
    vis, ir = model.embed(x, "visible", cams), model.embed(x, "infrared", cams)
    assert not torch.allclose(vis, ir)  # the modality prompt library is selected by the flag
    assert not torch.allclose(vis, model.embed(x, "visible", torch.tensor([2, 2])))  # SIE
    no_sie = tiny(sie_coef=0.0).eval()
    torch.testing.assert_close(
        no_sie.embed(x, "visible", cams), no_sie.embed(x, "visible", cams * 2)
    )
    no_prompts = tiny(modality_prompts=0).eval()
    torch.testing.assert_close(
        no_prompts.embed(x, "visible", cams), no_prompts.embed(x, "infrared", cams)
    )


def test_camera_and_size_errors_are_clear():
    model = tiny()
    with pytest.raises(ValueError, match="num_cameras"):
        model(torch.randn(2, 3, *SIZE), MODS[:2], torch.tensor([1, 7]))
    with pytest.raises(ValueError, match="camera ids of the batch"):
        model(torch.randn(2, 3, *SIZE), MODS[:2])
    with pytest.raises(ValueError, match=r"input_size.*\(32, 32\)"):
        model(torch.randn(2, 3, 32, 32), MODS[:2], CAMS[:2])
    with pytest.raises(ValueError, match="ipg_queries"):
        tiny(ipg_queries="random")


def test_switches_change_what_they_claim():
    zero, learn = tiny(), tiny(ipg_queries="learnable")
    assert not isinstance(zero.queries, torch.nn.Parameter) and not zero.queries.any()
    assert isinstance(learn.queries, torch.nn.Parameter) and learn.queries.shape == (2, 32)
    assert any(p is learn.queries for p in learn.lr_groups()["ipg"][0])
    assert tiny(instance_prompts=0).generator is None
    assert not hasattr(tiny(), "iael_necks") and len(tiny(iael=True).iael_necks) == 2
    x = torch.randn(2, 3, *SIZE)
    skip, run = tiny(drop_path=0.0).eval(), tiny(drop_path=0.0, skip_block=False).eval()
    assert run.load_state_dict(skip.state_dict(), strict=False).unexpected_keys == []  # + block 2
    assert not torch.allclose(skip.embed(x, "visible", CAMS[:2]), run.embed(x, "visible", CAMS[:2]))
    assert tiny(jpm=False).eval().embed(x, "visible", CAMS[:2]).shape == (2, 32)
    assert "iael_logits" not in tiny()(x, MODS[:2], CAMS[:2])


def test_lr_groups_follow_the_released_script():
    model = tiny(ipg_queries="learnable")
    groups = model.lr_groups()
    assert {k: m for k, (_, m) in groups.items()} == {
        "base": 1.0,
        "bias": 2.0,
        "ipg": 15.0,
        "prompts": 5.0,
    }
    ids = [id(p) for params, _ in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert [id(p) for p in groups["prompts"][0]] == [id(model.prompt_library)]


def test_pretrained_is_a_local_file_with_resized_position_embedding(tmp_path):
    import timm

    src = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=64, depth=4,
                            embed_dim=32, num_heads=2, num_classes=0)  # fmt: skip
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    model = tiny(pretrained=str(path))
    torch.testing.assert_close(model.patch_embed.weight, src.patch_embed.proj.weight)
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    torch.testing.assert_close(model.head_global[0].mlp.fc1.weight, src.blocks[3].mlp.fc1.weight)
    assert model.pos_embed.shape == (1, 1 + 10, 32)
    torch.testing.assert_close(model.pos_embed, resize_pos_embed(src.pos_embed.detach(), (5, 2)))
    # A ViT of another width fits under 90 % of the tensors: an error naming the first mismatch.
    wide = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=64, depth=4,
                             embed_dim=48, num_heads=2, num_classes=0)  # fmt: skip
    torch.save(wide.state_dict(), path)
    with pytest.raises(ValueError, match=r"cls_token \(file \(1, 1, 48\), model \(1, 1, 32\)\)"):
        tiny(pretrained=str(path))


# -- losses ------------------------------------------------------------------------------------
def test_msel_hand_computed():
    f = torch.tensor([[0.0], [2.0], [5.0], [9.0], [1.0], [3.0], [5.0], [9.0]])
    # id 0: v {0, 2}, ir {1, 3}; id 1: v {5, 9}, ir {5, 9}
    # v anchors: 0 -> intra 2, cross mean(1, 3) = 2 -> 0; 2 -> intra 2, cross mean(1, 1) = 1 -> 1
    #            5 -> intra 4, cross mean(0, 4) = 2 -> 4; 9 -> intra 4, cross mean(4, 0) = 2 -> 4
    # ir anchors: 1 -> intra 2, cross mean(1, 1) = 1 -> 1; 3 -> intra 2, cross mean(3, 1) = 2 -> 0
    #             5 -> 4; 9 -> 4.   0.5 * (9/4) + 0.5 * (9/4) = 2.25
    torch.testing.assert_close(msel_loss(f, LABELS, MODS, "torch"), torch.tensor(2.25))


def test_msel_gradcheck_float64():
    torch.manual_seed(0)
    f = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: msel_loss(a, LABELS, MODS, "torch"), (f,))


def _outputs(seed: int = 0, iael: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        "global": torch.randn(8, 4, generator=g),
        "logits_global": torch.randn(8, 3, generator=g),
        "local": torch.randn(8, 2, 4, generator=g),
        "logits_local": torch.randn(8, 2, 3, generator=g),
    }
    if iael:
        out["iael_logits"] = torch.randn(8, 3, 3, generator=g)
    return out


def test_loss_terms_match_the_code_weighting():
    out = _outputs(iael=True)
    loss = MIPLoss(kernels="torch")
    terms = loss(out, LABELS, MODS)
    assert set(terms) == {"id", "tri", "iael"}  # MSEL waits for epoch 10
    ce = lambda z: F.cross_entropy(z, LABELS)  # noqa: E731
    tri = lambda f: triplet_mining_loss_reference(f, LABELS, None, "hard")  # noqa: E731
    loc = out["local"]
    torch.testing.assert_close(
        terms["id"],
        0.5 * ce(out["logits_global"])
        + 0.25 * (ce(out["logits_local"][:, 0]) + ce(out["logits_local"][:, 1])),
    )
    torch.testing.assert_close(
        terms["tri"], 0.5 * tri(out["global"]) + 0.25 * (tri(loc[:, 0]) + tri(loc[:, 1]))
    )
    torch.testing.assert_close(
        terms["iael"], 0.5 * sum(ce(out["iael_logits"][:, i]) for i in range(3)) / 3
    )
    loss.set_epoch(10)
    terms = loss(out, LABELS, MODS)
    msel = lambda f: msel_loss(f, LABELS, MODS, "torch")  # noqa: E731
    torch.testing.assert_close(
        terms["msel"], 0.25 * msel(out["global"]) + 0.25 * (msel(loc[:, 0]) + msel(loc[:, 1])) / 2
    )
    assert "msel" not in MIPLoss(msel_weight=0.0, kernels="torch")(out, LABELS, MODS)
    assert "iael" not in loss(_outputs(), LABELS, MODS)


def test_loss_gradcheck_float64():
    # CE is torch's own (and identity_loss computes it in fp32): check the metric terms.
    fixed = _outputs(1)
    loss = MIPLoss(id_weight=0.0, msel_start_epoch=0, kernels="torch")

    def total(glob, local):
        return sum(loss({**fixed, "global": glob, "local": local}, LABELS, MODS).values())

    inputs = (fixed["global"].double().requires_grad_(), fixed["local"].double().requires_grad_())
    assert torch.autograd.gradcheck(total, inputs, fast_mode=True)


@pytest.mark.parametrize("dataset, cams", [("sysu", 6), ("regdb", 2), ("llcm", 9)])
def test_configs_build_the_released_recipe(dataset, cams):
    tiny_opts = [f"model.options.{k}={v}" for k, v in TINY.items()]
    cfg = load_config(
        REPO / f"configs/{dataset}/mip.yaml", ["data.root=x", "model.pretrained=null", *tiny_opts]
    )
    assert load_config(REPO / f"configs/{dataset}/mip.yaml", []).model.pretrained == "imagenet"
    assert (cfg.data.height, cfg.data.width) == (256, 128)
    assert cfg.optim.lr_mults == {"base": 1.0, "bias": 2.0, "ipg": 15.0, "prompts": 5.0}
    model = build_model(cfg, num_classes=4)
    assert model.grid == (21, 10) and model.sie.shape[0] == cams + 1
    assert not model.iael and build_loss(cfg).margin is None


@pytest.mark.slow
def test_two_process_training_loss_falls(synthetic_trees, tmp_path, two_process_probe):
    root, _ = synthetic_trees["sysu"]
    overrides = [
        f"data.root={root}",
        f"run.output_dir={tmp_path}",
        "run.name=ddp",
        "data.height=64",
        "data.width=32",
        "data.num_workers=0",
        "data.augment.random_erasing=0",
        *[f"model.options.{k}={v}" for k, v in TINY.items()],
        "model.options.iael=true",
        "loss.options.msel_start_epoch=0",
        "train.ids_per_batch=4",
        "train.instances_per_modality=2",
        "train.tensorboard=false",
        "train.kernels=torch",
        "optim.warmup_epochs=0",
    ]
    ranks = two_process_probe(str(REPO / "configs/sysu/mip.yaml"), 8, overrides)
    assert [r["batch"] for r in ranks] == [8, 8]


@pytest.mark.gpu
def test_cuda_kernels_match_the_torch_reference():
    model = tiny(iael=True).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(torch.randn(8, 3, *SIZE, device="cuda"), MODS.cuda(), CAMS.cuda())
    out = {k: v.float() for k, v in out.items()}  # as the trainer does
    labels, mods = LABELS.cuda(), MODS.cuda()
    fused = MIPLoss(msel_start_epoch=0, kernels="auto")(out, labels, mods)
    ref = MIPLoss(msel_start_epoch=0, kernels="torch")(out, labels, mods)
    assert fused.keys() == ref.keys() == {"id", "tri", "msel", "iael"}
    for key in ref:
        assert torch.isfinite(fused[key]), key
        torch.testing.assert_close(fused[key], ref[key], rtol=1e-4, atol=1e-4, msg=key)


def test_iael_switch_through_the_config():
    tiny_opts = [f"model.options.{k}={v}" for k, v in TINY.items()]
    cfg = load_config(
        REPO / "configs/sysu/mip.yaml",
        [
            "data.root=x",
            "data.height=64",
            "data.width=32",
            "model.pretrained=null",
            *tiny_opts,
            "model.options.iael=true",
        ],
    )
    model = build_model(cfg, num_classes=3)
    out = model(torch.randn(8, 3, 64, 32), MODS, CAMS)
    terms = build_loss(cfg)(out, LABELS, MODS)
    assert "iael" in terms and terms["iael"] > 0
