"""MIP: modality- and instance-aware visual prompts on a TransReID-style ViT (Wu et al., ICMR
2024; methods.md section 5).

A timm ViT (``pretrained``: ``imagenet`` = the jx ViT-B/16 weights MIP loads, a local file, or
None = random init) with an overlapping patch embedding, position embedding resized to the patch grid and SIE camera embedding. Before each of
blocks ``0 .. depth-3`` the tokens become ``[CLS; modality prompts; instance prompts; patches]``:
modality prompts come from a per-modality, per-layer library through a shared projection;
instance prompts come from one shared generator block fed ``[queries; current patches]``. Block
``depth-2`` is skipped (code), two copies of the last block + norm form the global head and the
JPM local head.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from dist_reid.models.layers import BNNeck
from dist_reid.models.pretrained import load_backbone_weights, pretrained_state
from dist_reid.models.resnet import INFRARED, VISIBLE

QUERY_MODES = ("zero", "learnable")
TEST_FEATURES = ("before", "after")
IAEL_POOLS = ("block", "mean")
JPM_SHIFT_FORMS = ("released", "paper")


def patch_grid(input_size: Sequence[int], patch: int, stride: int) -> tuple[int, int]:
    """(rows, cols) of an overlapping patch embedding (kernel ``patch``, ``stride``, no pad)."""
    h, w = int(input_size[0]), int(input_size[1])
    if h < patch or w < patch:
        raise ValueError(f"input {h}x{w} is smaller than one {patch}x{patch} patch")
    return (h - patch) // stride + 1, (w - patch) // stride + 1


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """(1, prefix + G, D) -> (1, prefix + rows*cols, D): bilinear resize of the patch part
    (a square source grid, as in ImageNet checkpoints, or already the target size)."""
    head, body = pos[:, :prefix], pos[:, prefix:]
    if body.shape[1] == grid[0] * grid[1]:
        return pos
    side = math.isqrt(body.shape[1])
    if side * side != body.shape[1]:
        raise ValueError(f"cannot resize a position embedding of {body.shape[1]} patches")
    body = body.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    body = F.interpolate(body, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([head, body.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)


def jpm_groups(
    patches: torch.Tensor, shift: int, shuffle_groups: int, parts: int, form: str = "released"
) -> list[torch.Tensor]:
    """TransReID's jigsaw patch module: roll the patch tokens, interleave them into
    ``shuffle_groups`` groups, then cut into ``parts`` equal slices.

    ``form``: ``released`` (the released ``shuffle_unit``, which slices the CLS-prefixed sequence
    from ``shift``, so the patches roll by ``shift - 1``; a token count not divisible by the
    groups is padded with the rolled sequence's second-to-last token; slices of ``n // parts``)
    or ``paper`` (roll by ``shift``; trailing tokens that do not fill a group are dropped).
    """
    if form not in JPM_SHIFT_FORMS:
        raise ValueError(
            f"model.options.jpm_shift_form must be one of {JPM_SHIFT_FORMS}, got {form!r}"
        )
    b, n, d = patches.shape
    if form == "released":
        if shift < 1:
            raise ValueError(
                f"model.options.jpm_shift must be >= 1 with the released form, got {shift}"
            )
        x = torch.roll(patches, shifts=-(shift - 1), dims=1)
        if n % shuffle_groups:
            x = torch.cat([x, x[:, -2:-1]], dim=1)
        if x.shape[1] % shuffle_groups:
            raise ValueError(
                f"{n} patch tokens (+1 pad) do not split into {shuffle_groups} JPM shuffle groups"
            )
        usable, size = x.shape[1], n // parts
    else:
        x = torch.roll(patches, shifts=-shift, dims=1)
        usable = (n // shuffle_groups) * shuffle_groups
        x, size = x[:, :usable], usable // parts
    x = x.reshape(b, shuffle_groups, -1, d).transpose(1, 2).reshape(b, usable, d)
    if size < 1:
        raise ValueError(f"{n} patch tokens cannot be cut into {parts} JPM parts")
    return [x[:, k * size : (k + 1) * size] for k in range(parts)]


class MIP(nn.Module):
    """``forward(images, modalities, cams)`` returns ``global`` (B, D) and ``local`` (B, parts, D)
    pre-BN features, ``logits_global`` (B, C) and ``logits_local`` (B, parts, C), and with
    ``iael`` ``iael_logits`` (B, prompted layers, C). ``embed`` returns the test feature.

    Switches (``model.options``; defaults = the released script):

    * ``depth``/``embed_dim``/``num_heads``: ViT size (ViT-B/16: 12/768/12; tests use tiny ones);
      ``stride`` (12) of the 16x16 overlapping patch embedding; ``drop_path`` (0.1);
    * ``num_cameras``/``sie_coef`` (3.0; 0 disables SIE): camera embedding added to all tokens;
    * ``modality_prompts`` (16 tokens per layer; 0 disables the library), ``prompt_scale`` (20:
      uniform init in +-0.0625*scale), ``prompt_dropout`` (0.1);
    * ``instance_prompts`` (16; 0 disables the generator), ``ipg_queries``: ``zero`` (code
      default, ``BUG_REFINE=False``) or ``learnable`` (paper);
    * ``skip_block`` (code: block depth-2 is never run; False runs it without prompts);
    * ``jpm`` with ``jpm_parts`` (4), ``jpm_shift`` (5), ``jpm_groups`` (2) and
      ``jpm_shift_form``: ``released`` (the code's roll by ``shift - 1``) or ``paper`` (``shift``);
    * ``iael`` (paper figure: on; released script: off) with ``iael_pool`` ``block`` (a copy of
      the last block over ``[0; prompts]``) or ``mean``;
    * ``test_feature``: ``before`` (code: pre-BN ``[global, local/parts...]``) or ``after`` (BN).

    The modality flag and the camera id are needed at test time too (the evaluator passes both).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "vit_base_patch16_224",
        pretrained: str | os.PathLike[str] | None = None,
        input_size: Sequence[int] = (256, 128),
        depth: int = 12,
        embed_dim: int = 768,
        num_heads: int = 12,
        patch_size: int = 16,
        stride: int = 12,
        drop_path: float = 0.1,
        num_cameras: int = 6,
        sie_coef: float = 3.0,
        modality_prompts: int = 16,
        prompt_scale: float = 20.0,
        prompt_dropout: float = 0.1,
        instance_prompts: int = 16,
        ipg_queries: str = "zero",
        skip_block: bool = True,
        jpm: bool = True,
        jpm_parts: int = 4,
        jpm_shift: int = 5,
        jpm_groups: int = 2,
        jpm_shift_form: str = "released",
        iael: bool = False,
        iael_pool: str = "block",
        test_feature: str = "before",
    ) -> None:
        super().__init__()
        for key, value, allowed in (
            ("ipg_queries", ipg_queries, QUERY_MODES),
            ("test_feature", test_feature, TEST_FEATURES),
            ("iael_pool", iael_pool, IAEL_POOLS),
            ("jpm_shift_form", jpm_shift_form, JPM_SHIFT_FORMS),
        ):
            if value not in allowed:
                raise ValueError(f"model.options.{key} must be one of {allowed}, got {value!r}")
        if depth < 3:
            raise ValueError(
                f"model.options.depth must be >= 3 (prompted blocks + head), got {depth}"
            )
        if num_cameras < 1:
            raise ValueError(f"model.options.num_cameras must be >= 1, got {num_cameras}")
        if jpm and jpm_shift_form == "released" and jpm_shift < 1:
            raise ValueError(
                f"model.options.jpm_shift must be >= 1 with jpm_shift_form=released, got {jpm_shift}"
            )
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.grid = patch_grid(self.input_size, patch_size, stride)
        vit = timm.create_model(
            backbone,
            pretrained=False,
            img_size=self.input_size,
            patch_size=patch_size,
            depth=depth,
            embed_dim=embed_dim,
            num_heads=num_heads,
            drop_path_rate=drop_path,
            num_classes=0,
        )
        # Made before the checkpoint loads: the generator starts random, as in the code.
        self.generator = copy.deepcopy(vit.blocks[0]) if instance_prompts else None
        if self.generator is not None:
            self.generator.apply(_init_vit_weights)
        ckpt_pos = _load_vit(vit, pretrained, backbone, self.grid) if pretrained else None
        d = embed_dim
        self.patch_embed = nn.Conv2d(3, d, patch_size, stride=stride)
        self.patch_embed.load_state_dict(vit.patch_embed.proj.state_dict())
        self.cls_token = vit.cls_token
        if ckpt_pos is not None:
            self.pos_embed = nn.Parameter(ckpt_pos)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], d))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.pos_drop = vit.pos_drop
        self.sie_coef = sie_coef
        self.num_cameras = num_cameras
        self.sie = nn.Parameter(torch.zeros(num_cameras + 1, 1, d)) if sie_coef else None
        if self.sie is not None:
            nn.init.trunc_normal_(self.sie, std=0.02)
        self.prompted = depth - 2
        # Block depth-2 exists only when it runs: DDP refuses parameters that get no gradient.
        self.blocks = nn.ModuleList(vit.blocks[: depth - 2 if skip_block else depth - 1])
        self.skip_block = skip_block
        last = vit.blocks[depth - 1]
        self.head_global = nn.Sequential(copy.deepcopy(last), copy.deepcopy(vit.norm))
        self.jpm = jpm
        self.head_local = (
            nn.Sequential(copy.deepcopy(last), copy.deepcopy(vit.norm)) if jpm else None
        )
        self.parts, self.shift, self.shuffle = jpm_parts, jpm_shift, jpm_groups
        self.shift_form = jpm_shift_form
        self.num_modality = modality_prompts
        if modality_prompts:
            bound = 0.0625 * prompt_scale
            self.prompt_library = nn.Parameter(
                torch.empty(2, self.prompted, modality_prompts, d).uniform_(-bound, bound)
            )
            self.prompt_proj = nn.Linear(d, d)
            nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
            nn.init.zeros_(self.prompt_proj.bias)
            self.prompt_drop = nn.Dropout(prompt_dropout)
        self.num_instance = instance_prompts
        if instance_prompts:
            queries = torch.zeros(instance_prompts, d)
            if ipg_queries == "learnable":
                nn.init.trunc_normal_(queries, std=0.02)
                self.queries = nn.Parameter(queries)
            else:
                self.register_buffer("queries", queries, persistent=False)
        self.iael = bool(iael and instance_prompts)
        self.iael_pool = iael_pool
        if self.iael:
            self.iael_head = (
                nn.Sequential(copy.deepcopy(last), copy.deepcopy(vit.norm))
                if iael_pool == "block"
                else None
            )
            self.iael_necks = nn.ModuleList(BNNeck(d, num_classes) for _ in range(self.prompted))
        self.neck_global = BNNeck(d, num_classes)
        self.neck_local = nn.ModuleList(
            BNNeck(d, num_classes) for _ in range(jpm_parts if jpm else 0)
        )
        self.test_feature = test_feature
        self.embed_dim = d

    def lr_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        """Released script: base lr, biases 2x, the instance prompt generator (and learnable
        queries) 15x, the modality prompt library 5x (``optim.lr_mults`` overrides)."""
        ipg = list(self.generator.parameters()) if self.generator is not None else []
        if isinstance(getattr(self, "queries", None), nn.Parameter):
            ipg.append(self.queries)
        prompts = [self.prompt_library] if self.num_modality else []
        taken = {id(p) for p in ipg + prompts}
        rest = [(n, p) for n, p in self.named_parameters() if id(p) not in taken]
        return {
            "base": ([p for n, p in rest if not n.endswith("bias")], 1.0),
            "bias": ([p for n, p in rest if n.endswith("bias")], 2.0),
            "ipg": (ipg, 15.0),
            "prompts": (prompts, 5.0),
        }

    def _tokens(self, images: torch.Tensor, cams: torch.Tensor | None) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.input_size:
            raise ValueError(
                f"MIP was built for input {self.input_size} (data.height/width, "
                f"model.options.input_size) but got images of {tuple(images.shape[-2:])}"
            )
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if self.sie is not None:
            if cams is None:
                raise ValueError("MIP with SIE (sie_coef > 0) needs the camera ids of the batch")
            cams = cams.long()
            if bool((cams < 0).any()) or bool((cams > self.num_cameras).any()):
                raise ValueError(
                    f"camera ids {sorted(set(cams.tolist()))} outside 0..{self.num_cameras} "
                    "(model.options.num_cameras)"
                )
            x = x + self.sie_coef * self.sie[cams]
        return self.pos_drop(x)

    def _encode(
        self, images: torch.Tensor, modalities: torch.Tensor, cams: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``[CLS; patches]`` after the prompted blocks, and the per-layer instance prompts."""
        x = self._tokens(images, cams)
        b = x.shape[0]
        cls, patches = x[:, :1], x[:, 1:]
        instance_per_layer = []
        for layer in range(self.prompted):
            extra = []
            if self.num_modality:
                lib = self.prompt_library[:, layer][modalities.long()]  # (B, T_m, D)
                extra.append(self.prompt_drop(self.prompt_proj(lib)))
            if self.num_instance:
                queries = self.queries.to(patches.dtype).expand(b, -1, -1)
                inst = self.generator(torch.cat([queries, patches], dim=1))[:, : self.num_instance]
                instance_per_layer.append(inst)
                extra.append(inst)
            out = self.blocks[layer](torch.cat([cls, *extra, patches], dim=1))
            cls, patches = out[:, :1], out[:, 1 + sum(e.shape[1] for e in extra) :]
        x = torch.cat([cls, patches], dim=1)
        if not self.skip_block:
            x = self.blocks[self.prompted](x)
        return x, instance_per_layer

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        glob = self.head_global(x)[:, 0]
        if not self.jpm:
            return glob, None
        cls = x[:, :1]
        parts = jpm_groups(x[:, 1:], self.shift, self.shuffle, self.parts, self.shift_form)
        local = torch.stack([self.head_local(torch.cat([cls, p], dim=1))[:, 0] for p in parts], 1)
        return glob, local

    batch_fields: tuple[str, ...] = ("cams",)  # SIE's camera embedding

    @property
    def output_keys(self) -> tuple[str, ...]:
        jpm = ("local", "logits_local") if self.jpm else ()
        return ("global", "logits_global", *jpm) + (("iael_logits",) if self.iael else ())

    def forward(
        self, images: torch.Tensor, modalities: torch.Tensor, cams: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        x, instance = self._encode(images, modalities, cams)
        glob, local = self._features(x)
        _, logits = self.neck_global(glob)
        out = {"global": glob, "logits_global": logits}
        if local is not None:
            out["local"] = local
            out["logits_local"] = torch.stack(
                [neck(local[:, k])[1] for k, neck in enumerate(self.neck_local)], dim=1
            )
        if self.iael:
            logits_iael = []
            for layer, prompts in enumerate(instance):
                if self.iael_head is not None:
                    zero = prompts.new_zeros(prompts.shape[0], 1, prompts.shape[2])
                    pooled = self.iael_head(torch.cat([zero, prompts], dim=1))[:, 0]
                else:
                    pooled = prompts.mean(dim=1)
                logits_iael.append(self.iael_necks[layer](pooled)[1])
            out["iael_logits"] = torch.stack(logits_iael, dim=1)
        return out

    @torch.no_grad()
    def embed(
        self, images: torch.Tensor, modality: str, cams: torch.Tensor | None = None
    ) -> torch.Tensor:
        code = VISIBLE if modality == "visible" else INFRARED
        modalities = torch.full((images.shape[0],), code, device=images.device)
        glob, local = self._features(self._encode(images, modalities, cams)[0])
        after = self.test_feature == "after"
        feats = [self.neck_global.bn(glob) if after else glob]
        if local is not None:
            for k, neck in enumerate(self.neck_local):
                part = neck.bn(local[:, k]) if after else local[:, k]
                feats.append(part / self.parts)
        return torch.cat(feats, dim=1)


def _init_vit_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _load_vit(
    vit: nn.Module, pretrained: str | os.PathLike[str], backbone: str, grid: tuple[int, int]
) -> torch.Tensor | None:
    """``model.pretrained`` (``imagenet`` or a local file) into ``vit``, except its position
    embedding, which is returned resized to the overlapping ``grid``; counts are logged and a
    file that fits under 90 % of the tensors is an error."""
    found = pretrained_state(pretrained, backbone)
    if found is None:
        return None
    source, state = found
    pos = state.get("pos_embed")
    if pos is not None and pos.shape[-1] == vit.pos_embed.shape[-1]:
        pos = resize_pos_embed(pos, grid, vit.pos_embed.shape[1] - vit.patch_embed.num_patches)
    else:
        pos = None  # absent or another width: counted as a mismatch below
    load_backbone_weights(vit, state, source, handled=("pos_embed",) if pos is not None else ())
    return pos
