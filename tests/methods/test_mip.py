"""MIP (methods.md section 5): tiny-ViT shapes, prompts, SIE, switches, losses by hand and by
gradcheck, configs, and a 2-process training run on synthetic data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reid_kernels import triplet_mining_loss_reference

from dist_reid.builders import build_loss, build_model, schedule_options
from dist_reid.config import load_config
from dist_reid.engine.schedules import cosine_refine_lr, lr_schedule
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
    parts = jpm_groups(x, shift=2, shuffle_groups=2, parts=2, form="paper")
    # roll by 2: 2..7,0,1; two groups [2,3,4,5] [6,7,0,1] interleaved: 2,6,3,7,4,0,5,1
    assert [p.flatten().tolist() for p in parts] == [[2, 6, 3, 7], [4, 0, 5, 1]]


def _token_parts(n: int, shift: int, groups: int, form: str = "released") -> list[list[int]]:
    # patch tokens valued by their index in the CLS-prefixed sequence (CLS = 0): 1..n
    x = torch.arange(1, n + 1, dtype=torch.float32).reshape(1, n, 1)
    return [p.flatten().long().tolist() for p in jpm_groups(x, shift, groups, 4, form)]


@pytest.mark.parametrize(
    "n, shift, groups, expected",
    [
        (8, 2, 2, [[2, 6], [3, 7], [4, 8], [5, 1]]),
        (9, 5, 2, [[5, 1], [6, 2], [7, 3], [8, 4]]),  # odd: padded with a copy of token 3
        (12, 5, 3, [[5, 9, 1], [6, 10, 2], [7, 11, 3], [8, 12, 4]]),
    ],
)
def test_jpm_released_shift_matches_the_released_shuffle_unit(n, shift, groups, expected):
    # Figures from the released model/make_model.py shuffle_unit(features, shift, group) (begin=1)
    # on torch.arange(1 + n).reshape(1, 1 + n, 1), sliced into 4 parts of n // 4 tokens.
    assert _token_parts(n, shift, groups) == expected


def test_jpm_released_shift_on_the_real_grid():
    # Released shuffle_unit, 21 x 10 = 210 patch tokens (+ CLS), SHIFT_NUM 5, SHUFFLE_GROUP 2:
    # the sequence starts 5, 110, 6, 111 and ends 105, 210, 106, 1, 107, 2, 108, 3, 109, 4; each of
    # the 4 parts has 52 tokens, part k starting at tokens 5 + 26k, 110 + 26k.
    parts = _token_parts(210, 5, 2)
    assert [len(p) for p in parts] == [52] * 4
    assert [p[:4] for p in parts] == [
        [5 + 26 * k, 110 + 26 * k, 6 + 26 * k, 111 + 26 * k] for k in range(4)
    ]
    assert parts[3][-8:] == [105, 210, 106, 1, 107, 2, 108, 3]  # 109 and 4 fall past 4 x 52
    paper = _token_parts(210, 5, 2, "paper")  # roll by 5: starts 6, 111
    assert paper[0][:2] == [6, 111]
    assert all(a != b for a, b in zip(parts, paper, strict=True))  # no part is the same
    with pytest.raises(ValueError, match="jpm_shift_form"):
        _token_parts(8, 2, 2, "shifted")
    with pytest.raises(ValueError, match="jpm_shift"):
        tiny(jpm_shift=0)
    assert tiny().shift_form == "released" and tiny(jpm_shift_form="paper").shift_form == "paper"


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


def test_msel_starts_at_the_released_epoch():
    # Released processor.do_train: `for epoch in range(1, epochs + 1)` and MSEL is added when
    # `cfg.MODEL.MSEL and epoch >= cfg.MODEL.MSEL_EPOCH`; train.sh: MAX_EPOCHS 80, MSEL_EPOCH 10.
    cfg = load_config(REPO / "configs/sysu/mip.yaml", ["data.root=x"])
    assert cfg.train.epochs == 80
    loss, out = build_loss(cfg), _outputs()
    on = []
    for epoch in range(cfg.train.epochs):  # ours, 0-based; the released loop's epoch is + 1
        loss.set_epoch(epoch)
        on.append("msel" in loss(out, LABELS, MODS))
    released = [e >= 10 for e in range(1, 81)]
    assert on == released and on.index(True) == 9


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
        "train.trackers=[]",
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


# -- lr schedule -------------------------------------------------------------------------------
# Figures from the released solver (scheduler_factory.create_scheduler, SCHEDULER 'cosine-refine',
# i.e. timm-style CosineLRScheduler) for train.sh's SOLVER (BASE_LR 0.01, MAX_EPOCHS 80,
# COSINE_EPOCHS 30, MIN_INDEX 1e-5, WARMUP_EPOCHS 5 by default), stepped as do_train does
# (`scheduler.step(epoch)` at the start of epochs 1..80); keys are our 0-based epochs.
RELEASED_LR = {
    0: 0.00208,
    1: 0.00406,
    4: 0.009330133717652005,
    5: 0.009045094521025018,
    10: 0.007033712878546849,
    28: 2.749024925340141e-05,
    29: 0.001,
    30: 0.0009972609750746597,
    31: 0.0009890739096288991,
    59: 0.00010000000000000002,
    60: 9.9726097507466e-05,
    79: 2.5000750000000013e-05,
}
RELEASED_LR_SUM = 0.1429908544848035  # over the 80 epochs
# Per optimiser group of the released make_optimizer (base 1x, bias 2x, IPLR 15x, MPLR 5x).
RELEASED_GROUP_LR = {
    0: {"base": 0.00208, "bias": 0.00408, "ipg": 0.03008, "prompts": 0.010079999999999999},
    28: {
        "base": 2.749024925340141e-05,
        "bias": 5.488077241203441e-05,
        "ipg": 0.00041095757347426335,
        "prompts": 0.00013705234188793338,
    },
    29: {"base": 0.001, "bias": 0.002, "ipg": 0.015, "prompts": 0.005000000000000001},
}


def _preset_lrs(dataset: str = "sysu") -> list[float]:
    cfg = load_config(REPO / f"configs/{dataset}/mip.yaml", ["data.root=x"])
    return lr_schedule(epochs=cfg.train.epochs, lr=cfg.train.lr, **schedule_options(cfg))


def test_schedule_is_the_released_cosine_refine():
    lrs = _preset_lrs()
    assert len(lrs) == 80
    for epoch, lr in RELEASED_LR.items():
        assert lrs[epoch] == pytest.approx(lr, rel=1e-12, abs=0), epoch
    assert sum(lrs) == pytest.approx(RELEASED_LR_SUM, rel=1e-12)
    # The former step envelope (warm-up 5, x0.1 at 30 and 60) had 2.18x the integrated lr and
    # 1e-2 where the released cosine has reached 2.75e-5 (released epoch 29, our 28).
    envelope = [
        0.01 * ((e + 1) / 5 if e < 5 else 0.1 ** ((e >= 30) + (e >= 60))) for e in range(80)
    ]
    assert sum(envelope) / RELEASED_LR_SUM == pytest.approx(2.182, abs=1e-3)
    assert envelope[28] == 0.01
    # RegDB (BASE_LR 0.008): every value scales with the base lr (released run: sum 0.11439...).
    assert sum(_preset_lrs("regdb")) == pytest.approx(0.11439268358784284, rel=1e-12)


def test_schedule_edges_follow_the_released_formula():
    # after cycle_limit cycles: the undecayed floor min_lr_factor * lr
    assert (
        cosine_refine_lr(2 * 3 - 1, 1.0, 1.0, cycle_epochs=3, cycle_limit=2, min_lr_factor=0.1)
        == 0.1
    )
    # no warm-up: epoch 0 is t = 1 of the first cosine
    lr = cosine_refine_lr(0, 1.0, 1.0, warmup_epochs=0, cycle_epochs=4, min_lr_factor=0.0)
    assert lr == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError, match=r"optim\.schedule"):
        lr_schedule("cosine", 3, 0.1, warmup_epochs=0)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_trainer_schedules_each_group_as_released_and_resumes_it(synthetic_trees, tmp_path):
    from dist_reid.engine.build import build_trainer
    from dist_reid.engine.trainer import Trainer

    root, _ = synthetic_trees["sysu"]
    tiny_opts = [f"model.options.{k}={v}" for k, v in TINY.items()]
    overrides = [
        f"data.root={root}",
        f"run.output_dir={tmp_path}",
        "data.height=64",
        "data.width=32",
        "data.num_workers=0",
        "train.trackers=[]",
        "model.options.ipg_queries=learnable",
        "model.pretrained=null",
        *tiny_opts,
    ]
    cfg = load_config(REPO / "configs/sysu/mip.yaml", overrides)
    trainer = build_trainer(cfg)

    def lrs(t: Trainer) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in t.optimizer.param_groups}

    def check(got: dict[str, float], epoch: int) -> None:
        for name, lr in RELEASED_GROUP_LR[epoch].items():
            assert got[name] == pytest.approx(lr, rel=1e-12), (epoch, name)

    check(lrs(trainer), 0)
    for _ in range(28):
        trainer.scheduler.step()  # what fit() does at each epoch end
    trainer.epoch = 28
    check(lrs(trainer), 28)
    path = trainer.save("last.pt")
    resumed = build_trainer(cfg)
    resumed.load(path)
    assert lrs(resumed) == lrs(trainer)
    trainer.scheduler.step()
    resumed.scheduler.step()
    check(lrs(resumed), 29)
    assert lrs(resumed) == lrs(trainer)
