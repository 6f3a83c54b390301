"""ICRE (Zhang et al., arXiv 2512.04522) as a **reconstruction** (methods.md section 3).

Only the abstract and figure captions are public and no code was released, so this is our
design built from what is known: a dual-stream backbone, MPFR (multi-scale fusion of the
shared stages 2-4 with a learned mask per scale), SDCE (cross-attention of the deep tokens
onto the fused shallow map, then self-attention, then an FFN) and a BNNeck head. It makes no
claim of parity with the paper; every guessed detail is a constructor switch (below, and the
README section "Methods: ICRE and EMIF (reconstructions)").
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from dist_reid.models.layers import BNNeck, GeM, backbone_head_groups
from dist_reid.models.resnet import INFRARED, VISIBLE, TwoStreamResNet


class MPFR(nn.Module):
    """Multi-scale fusion of stages 2-4 (guessed internals, methods.md 3.1 [I]).

    Each scale: 1x1 conv + BN + ReLU to ``channels``, resampled to the stage-4 grid
    (``resample``: ``"avgpool"`` = adaptive average pooling, ``"bilinear"``), weighted by its own
    spatial mask ``sigmoid(conv3x3(.))`` (one channel); the weighted maps are summed.
    """

    def __init__(self, in_channels: tuple[int, ...], channels: int, resample: str) -> None:
        super().__init__()
        if resample not in {"avgpool", "bilinear"}:
            raise ValueError(
                f"model.options.mpfr_resample must be 'avgpool' or 'bilinear', got {resample!r}"
            )
        self.resample = resample
        self.proj = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(True)
            )
            for c in in_channels
        )
        self.masks = nn.ModuleList(nn.Conv2d(channels, 1, 3, padding=1) for _ in in_channels)

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``maps``: stage outputs (shallow to deep); returns (fused map, masks (B, S, H, W))."""
        size = maps[-1].shape[-2:]
        fused, masks = None, []
        for x, proj, mask_conv in zip(maps, self.proj, self.masks, strict=True):
            y = proj(x)
            if y.shape[-2:] != size:
                if self.resample == "avgpool":
                    y = F.adaptive_avg_pool2d(y, size)
                else:
                    y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            mask = torch.sigmoid(mask_conv(y))
            masks.append(mask)
            fused = mask * y if fused is None else fused + mask * y
        return fused, torch.cat(masks, dim=1)


class SDCE(nn.Module):
    """Cross-attention (deep tokens query the fused shallow tokens), self-attention, FFN.

    Each stage is residual with LayerNorm before it (``norm="pre"``; ``"post"`` puts it after).
    ``layer_scale``: each residual branch is multiplied by a learned per-channel scale starting
    at this value (CaiT's LayerScale); ``None`` adds the branches unscaled.
    ``layers`` repeats the three-stage cascade; heads, depth, FFN width and norm placement are
    guesses (methods.md 3.1: "start with 8 heads and 1 layer per stage").
    """

    def __init__(
        self,
        dim: int,
        shallow_dim: int,
        heads: int,
        layers: int,
        ffn_ratio: float,
        norm: str,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        if norm not in {"post", "pre"}:
            raise ValueError(f"model.options.sdce_norm must be 'post' or 'pre', got {norm!r}")
        if layers < 1 or heads < 1 or dim % heads:
            raise ValueError(
                f"model.options.sdce_heads={heads} must divide the feature width {dim} and "
                f"sdce_layers={layers} must be >= 1"
            )
        self.pre = norm == "pre"
        hidden = max(1, round(dim * ffn_ratio))
        self.cross = nn.ModuleList(
            nn.MultiheadAttention(dim, heads, kdim=shallow_dim, vdim=shallow_dim, batch_first=True)
            for _ in range(layers)
        )
        self.self_attn = nn.ModuleList(
            nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(layers)
        )
        self.ffn = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            for _ in range(layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3 * layers))
        self.scales = (
            nn.ParameterList(
                nn.Parameter(torch.full((dim,), float(layer_scale))) for _ in range(3 * layers)
            )
            if layer_scale is not None
            else None
        )

    def _block(self, x: torch.Tensor, i: int, fn) -> torch.Tensor:
        """Residual stage ``i``: its norm, its branch ``fn``, its LayerScale if any."""
        norm = self.norms[i]
        scale = self.scales[i] if self.scales is not None else 1.0
        return x + scale * fn(norm(x)) if self.pre else norm(x + scale * fn(x))

    def forward(self, deep: torch.Tensor, shallow: torch.Tensor) -> torch.Tensor:
        """``deep`` (B, L, dim), ``shallow`` (B, L', shallow_dim) -> (B, L, dim)."""
        x = deep
        for i, (cross, self_attn, ffn) in enumerate(
            zip(self.cross, self.self_attn, self.ffn, strict=True)
        ):
            x = self._block(
                x, 3 * i, lambda q, a=cross: a(q, shallow, shallow, need_weights=False)[0]
            )
            x = self._block(x, 3 * i + 1, lambda q, a=self_attn: a(q, q, q, need_weights=False)[0])
            x = self._block(x, 3 * i + 2, ffn)
        return x


class ICRE(nn.Module):
    """ICRE reconstruction: two-stream ResNet -> MPFR(stages 2-4) -> SDCE -> GeM -> BNNeck.

    ``forward`` returns ``{"features": pre-BN GeM feature of the enhanced map, "bn_features",
    "logits", "masks": MPFR masks (B, 3, H, W)}``; ``embed`` the test feature.

    Guessed choices (switches; methods.md 3.1 [I]):

    * ``mpfr_channels`` (512): common width of the fused shallow map (C' in methods.md).
    * ``mpfr_resample`` (``"avgpool"`` | ``"bilinear"``): how stages 2-3 reach the stage-4 grid.
    * ``sdce_heads`` (8), ``sdce_layers`` (1), ``sdce_ffn_ratio`` (1.0, FFN hidden = ratio x
      width), ``sdce_norm`` (``"pre"`` | ``"post"``; pre-norm keeps the residual stream on the
      scale of the ReLU stage-4 map, which GeM expects; post-norm ends on a LayerNorm output).
    * ``sdce_layer_scale`` (1e-5; None = off): LayerScale on SDCE's residual branches, so the
      randomly initialised attention starts as the identity on the backbone map. Unscaled
      branches stalled learning from random init (README, *Every method learns*: identity loss
      4.86 instead of 4.20 after 114 steps), and SDCE is random even on an ImageNet backbone.
    * ``use_mpfr`` / ``use_sdce`` (True): ablation switches; without both the head pools the
      stage-4 map (the AGW-style baseline); without MPFR, SDCE attends to stage 4 itself. MPFR
      only feeds SDCE, so ``use_mpfr`` without ``use_sdce`` is refused.
    * ``test_feature`` (``"bn"`` | ``"pool"``): BN feature (cosine) or the pre-BN one.
    * ``non_local`` (False): AGW's non-local blocks in the backbone (not mentioned by ICRE).
      ``non_local_width`` (``"official"``: AGW's released width of 1 inter-channel |
      ``"half"``: C/2).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        pretrained: str | os.PathLike[str] | None = None,
        last_stride: int = 1,
        non_local: bool = False,
        non_local_width: str = "official",
        mpfr_channels: int = 512,
        mpfr_resample: str = "avgpool",
        sdce_heads: int = 8,
        sdce_layers: int = 1,
        sdce_ffn_ratio: float = 1.0,
        sdce_norm: str = "pre",
        sdce_layer_scale: float | None = 1e-5,
        use_mpfr: bool = True,
        use_sdce: bool = True,
        gem_p: float = 3.0,
        test_feature: str = "bn",
    ) -> None:
        super().__init__()
        if use_mpfr and not use_sdce:
            raise ValueError(
                "model.options.use_mpfr=true needs use_sdce=true (MPFR's map only feeds SDCE)"
            )
        if test_feature not in {"bn", "pool"}:
            raise ValueError(
                f"model.options.test_feature must be 'bn' or 'pool', got {test_feature!r}"
            )
        self.backbone = TwoStreamResNet(
            backbone,
            pretrained,
            last_stride,
            (0, 2, 3, 0) if non_local else (0, 0, 0, 0),
            non_local_width,
        )
        dim = self.backbone.out_channels
        # torchvision ResNets double the width per stage: stages 2-4 have dim/4, dim/2, dim.
        stage_channels = (dim // 4, dim // 2, dim)
        self.mpfr = MPFR(stage_channels, mpfr_channels, mpfr_resample) if use_mpfr else None
        shallow_dim = mpfr_channels if use_mpfr else dim
        self.sdce = (
            SDCE(
                dim,
                shallow_dim,
                sdce_heads,
                sdce_layers,
                sdce_ffn_ratio,
                sdce_norm,
                sdce_layer_scale,
            )
            if use_sdce
            else None
        )
        self.pool = GeM(gem_p)
        self.neck = BNNeck(dim, num_classes)
        self.test_feature = test_feature
        self.out_dim = dim

    def lr_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        """``backbone`` (pretrained, 0.1x as in AGW) and ``head`` (MPFR, SDCE, BNNeck: 1x)."""
        return backbone_head_groups(self, backbone=self.backbone.parameters())

    def _enhanced(
        self, images: torch.Tensor, modalities: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled enhanced feature (pre-BN) and the MPFR masks (None without MPFR)."""
        x = self.backbone.stems(images, modalities)
        stages = []
        for stage in self.backbone.stages:
            x = stage(x)
            stages.append(x)
        deep = stages[-1]
        masks = None
        if self.sdce is None:
            out = deep
        else:
            if self.mpfr is not None:
                shallow, masks = self.mpfr(stages[1:])
            else:
                shallow = deep
            b, c, h, w = deep.shape
            tokens = self.sdce(deep.flatten(2).transpose(1, 2), shallow.flatten(2).transpose(1, 2))
            out = tokens.transpose(1, 2).reshape(b, c, h, w)
        return self.pool(out), masks

    batch_fields: tuple[str, ...] = ()

    @property
    def output_keys(self) -> tuple[str, ...]:
        return ("features", "bn_features", "logits") + (("masks",) if self.mpfr is not None else ())

    def forward(self, images: torch.Tensor, modalities: torch.Tensor) -> dict[str, torch.Tensor]:
        features, masks = self._enhanced(images, modalities)
        bn_features, logits = self.neck(features)
        out = {"features": features, "bn_features": bn_features, "logits": logits}
        if masks is not None:
            out["masks"] = masks
        return out

    @torch.no_grad()
    def embed(self, images: torch.Tensor, modality: str) -> torch.Tensor:
        code = VISIBLE if modality == "visible" else INFRARED
        modalities = torch.full((images.shape[0],), code, device=images.device)
        features, _ = self._enhanced(images, modalities)
        return self.neck.bn(features) if self.test_feature == "bn" else features
