"""PDM: prototype-driven multi-feature generation (Li et al., ICASSP 2025; methods.md section 2).

Two-stream ResNet -> (code only: phase augmentation, SNA, MFA blocks) -> MFGM after stage
``mfgm_after`` (generated feature maps concatenated along the batch) -> remaining stage -> PLM
(m learnable prototypes, positional embedding sized from the feature map) -> global feature
``F_g`` and ``F = [p_1 .. p_m, F_g]``, each with its own BNNeck head.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dist_reid.models.layers import BNNeck, backbone_head_groups
from dist_reid.models.resnet import INFRARED, VISIBLE, TwoStreamResNet

TEST_MODES = ("simple", "official")
MFGM_VARIANTS = ("official", "paper")
MFA_PNL_FORMS = ("released", "intended")
MFGM_INITS = ("released", "ours")


def _down(size: int) -> int:
    """Output size of a stride-2 conv/pool with ``padding = kernel // 2`` (ResNet's downsamplers)."""
    return (size - 1) // 2 + 1


def feature_map_size(input_size: Sequence[int], downsamples: int) -> tuple[int, int]:
    """(h, w) of a ResNet map after ``downsamples`` stride-2 steps from an (H, W) input."""
    h, w = int(input_size[0]), int(input_size[1])
    for _ in range(downsamples):
        h, w = _down(h), _down(w)
    return h, w


def _stage_channels(stage: nn.Sequential) -> int:
    block = stage[-1]
    return (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features


def phase_only(x: torch.Tensor) -> torch.Tensor:
    """Phase-only reconstruction ``Re(IFFT2(exp(i * angle(FFT2(x)))))`` per image and channel."""
    spectrum = torch.fft.fft2(x.float())
    return torch.fft.ifft2(torch.exp(1j * torch.angle(spectrum))).real.to(x.dtype)


class SimAM(nn.Module):
    """Parameter-free SimAM attention (the official code's "SNA", code only):
    ``x * sigmoid(d / (4 (v + lambda)) + 0.5)`` with ``d = (x - mean)^2``, ``v = sum d / (hw - 1)``."""

    def __init__(self, lam: float = 1e-4) -> None:
        super().__init__()
        self.lam = lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = max(x.shape[2] * x.shape[3] - 1, 1)
        d = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2)
        v = d.sum(dim=(2, 3), keepdim=True) / n
        return x * torch.sigmoid(d / (4 * (v + self.lam)) + 0.5)


class _CrossChannelNL(nn.Module):
    """DEEN's CNL: channel-affinity non-local from the shallower map into the deeper one.
    The (c, c) affinity is divided by c, as in the released code. The output BN starts at zero
    so the block starts as the identity on the deeper map."""

    def __init__(self, high: int, low: int, downsample: bool) -> None:
        super().__init__()
        stride = 2 if downsample else 1
        self.g = nn.Conv2d(low, low, 1)
        self.theta = nn.Conv2d(high, low, 1)
        self.phi = nn.Conv2d(low, low, 1, stride=stride)
        self.out = nn.Sequential(nn.Conv2d(low, high, 1, stride=stride), nn.BatchNorm2d(high))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        b, c = low.shape[:2]
        g = self.g(low).flatten(2)  # (b, c, n_low)
        theta = self.theta(high).flatten(2)  # (b, c, n_high)
        phi = self.phi(low).flatten(2)  # (b, c, n_high)
        affinity = torch.bmm(theta, phi.transpose(1, 2)) / c  # (b, c, c)
        y = torch.bmm(affinity, g).reshape(b, c, *low.shape[2:])
        return self.out(y) + high


class _CrossPixelNL(nn.Module):
    """DEEN's PNL: pixel-affinity non-local, deeper-map queries over shallower-map keys.

    ``form="intended"``: tokens are the map positions, each a ``low // reduction``-channel vector.
    ``form="released"`` (the released code): the ``low // reduction``-channel maps are read,
    row-major, as ``low`` "channels" of ``positions * (low // reduction) / low`` entries, so
    consecutive position blocks are folded into channels before the affinity; the result is
    unfolded the same way.
    """

    def __init__(self, high: int, low: int, reduction: int = 2, form: str = "released") -> None:
        super().__init__()
        if form not in MFA_PNL_FORMS:
            raise ValueError(f"model.options.mfa_pnl must be one of {MFA_PNL_FORMS}, got {form!r}")
        inter = max(low // reduction, 1)
        self.form, self.low, self.inter = form, low, inter
        self.g = nn.Conv2d(low, inter, 1)
        self.theta = nn.Conv2d(high, inter, 1)
        self.phi = nn.Conv2d(low, inter, 1)
        self.out = nn.Sequential(nn.Conv2d(inter, high, 1), nn.BatchNorm2d(high))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(b, inter, h, w) -> (b, tokens, width) in the chosen layout."""
        b = x.shape[0]
        if self.form == "intended":
            return x.flatten(2).transpose(1, 2)
        if x[0].numel() % self.low:
            raise ValueError(
                "model.options.mfa_pnl=released folds a "
                f"{tuple(x.shape[1:])} map into {self.low} channels, which does not divide it; "
                "use another input size or mfa_pnl=intended"
            )
        return x.reshape(b, self.low, -1).transpose(1, 2)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        b = high.shape[0]
        g = self._tokens(self.g(low))  # (b, t_low, d)
        theta = self._tokens(self.theta(high))  # (b, t_high, d)
        phi = self._tokens(self.phi(low)).transpose(1, 2)  # (b, d, t_low)
        affinity = torch.bmm(theta, phi) / phi.shape[-1]  # (b, t_high, t_low)
        y = torch.bmm(affinity, g).transpose(1, 2).reshape(b, self.inter, *high.shape[2:])
        return self.out(y) + high


class MFA(nn.Module):
    """DEEN's multi-level feature aggregation (code only in PDM): CNL then PNL."""

    def __init__(self, high: int, low: int, downsample: bool, pnl: str = "released") -> None:
        super().__init__()
        self.cnl = _CrossChannelNL(high, low, downsample)
        self.pnl = _CrossPixelNL(high, low, form=pnl)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return self.pnl(self.cnl(high, low), low)


class _ChannelAttention(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        return torch.sigmoid(avg + mx)


class _SpatialAttention(nn.Module):
    def __init__(self, kernel: int = 49, bias: bool = False) -> None:
        super().__init__()
        # Input channels: (mean, max) over channels.
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class MFGMBranch(nn.Module):
    """One MFGM generator branch: dilated 3x3 convs (dilation 1, 2, 3; C -> C/4) then attention.

    ``variant="official"``: convs averaged, residual CBAM (channel then spatial), ReLU, 1x1 conv.
    ``variant="paper"``: convs summed, ``conv1x1(ReLU([CA(f) * f, SA(f) * f]))`` (concatenation).

    ``init="released"`` (the released code): Kaiming-normal (fan-in) dilated and 1x1 convs, and
    biases on the 1x1 conv and the spatial-attention conv; the generated maps start with about
    the input's spread. ``init="ours"``: PyTorch's default init and no biases (maps start ~6x
    smaller).
    """

    def __init__(
        self,
        channels: int,
        variant: str = "official",
        sa_kernel: int = 49,
        init: str = "released",
    ) -> None:
        super().__init__()
        if init not in MFGM_INITS:
            raise ValueError(f"model.options.mfgm_init must be one of {MFGM_INITS}, got {init!r}")
        mid = max(channels // 4, 1)
        released = init == "released"
        self.variant = variant
        self.dilated = nn.ModuleList(
            nn.Conv2d(channels, mid, 3, padding=d, dilation=d, bias=False) for d in (1, 2, 3)
        )
        self.ca = _ChannelAttention(mid)
        self.sa = _SpatialAttention(sa_kernel, bias=released)
        in_proj = mid if variant == "official" else 2 * mid
        self.proj = nn.Conv2d(in_proj, channels, 1, bias=released)
        if released:
            for conv in (*self.dilated, self.proj):
                nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [conv(x) for conv in self.dilated]
        if self.variant == "official":
            f = (outs[0] + outs[1] + outs[2]) / 3
            g = f * self.ca(f)
            g = g * self.sa(g)
            return self.proj(F.relu(g + f))
        f = outs[0] + outs[1] + outs[2]
        return self.proj(F.relu(torch.cat([f * self.ca(f), f * self.sa(f)], dim=1)))


class PLM(nn.Module):
    """Prototype learning: ``S = sigmoid(P (I + E)^T)`` (N, m, n); ``p_k = (1/n) sum_j S_kj I_j``.

    ``E`` has one row per map position, so it is sized from the feature map at construction.
    """

    def __init__(self, channels: int, num_prototypes: int, positions: int) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, channels))
        self.pos_embed = nn.Parameter(torch.empty(positions, channels))
        nn.init.kaiming_normal_(self.prototypes)
        nn.init.kaiming_normal_(self.pos_embed)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, h, w) -> (local features (N, m, C), response logits (N, m, n))."""
        tokens = x.flatten(2).transpose(1, 2)  # (N, n, C)
        logits = torch.einsum("mc,bnc->bmn", self.prototypes, tokens + self.pos_embed)
        local = torch.bmm(torch.sigmoid(logits), tokens) / tokens.shape[1]
        return local, logits


class PDM(nn.Module):
    """PDM model. ``forward`` returns, over all ``S = 1 + mfgm_branches`` feature sets stacked
    along the batch ([original; generated 1; ...], each in the input order):

    * ``global`` (S*N, C) pre-BN average-pooled ``F_g``; ``feature`` (S*N, (m+1)C) pre-BN ``F``;
    * ``logits_global`` / ``logits_feature``: the two BNNeck heads;
    * ``prototype_logits`` (S*N, m, n): ``P (I + E)^T`` before the sigmoid (for L_ch).

    Switches (``model.options``; ``pdm_official`` vs ``pdm_paper`` presets):

    * ``phase_aug`` / ``phase_weight``: train-time ``x + 0.8 * phase_only(x)`` (code only);
    * ``sna``: SimAM after the stems (code only); ``mfa``: DEEN MFA blocks (code only);
    * ``mfgm_variant``: ``official`` (averaged convs, residual sequential CBAM) or ``paper``
      (summed convs, concatenated CA/SA); ``mfgm_branches`` (code: 2); ``mfgm_after``: 3
      (SYSU/LLCM: PLM on stage 4) or 2 (the code's RegDB variant: PLM on stage 3, no layer4);
    * ``mfgm_init``: ``released`` (Kaiming convs, conv biases) or ``ours`` (PyTorch default);
    * ``mfa_pnl``: ``released`` (the code's PNL, positions folded into channels) or ``intended``
      (a true pixel non-local);
    * ``num_prototypes`` (m, paper: 10); ``dropout`` after MFGM (code: 0.01);
    * ``plm``: ``False`` drops PLM and head B (the paper's Table II baseline rows): ``F = F_g``,
      no ``logits_feature`` / ``prototype_logits`` (so ``L_ch`` must be off);
    * ``test_mode``: ``simple`` = BN(F_g) of the original set; ``official`` = the per-set
      L2-normalised BN(F_g) and BN(F) of all S sets, concatenated. The evaluator's cosine on
      this concatenation ranks exactly as the code's sum of 2S cosine matrices (every chunk has
      unit norm); with ``eval.flip`` the flipped average is renormalised as a whole, a small
      deviation from the code's unnormalised per-chunk sum.

    ``input_size`` (H, W) comes from ``data.height/width``; the PLM positional embedding is
    sized from it and a batch of another size is refused.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        pretrained: str | os.PathLike[str] | None = None,
        input_size: Sequence[int] = (384, 192),
        num_prototypes: int = 10,
        mfgm_branches: int = 2,
        mfgm_after: int = 3,
        mfgm_variant: str = "official",
        mfgm_init: str = "released",
        mfa_pnl: str = "released",
        dropout: float = 0.01,
        phase_aug: bool = True,
        phase_weight: float = 0.8,
        sna: bool = True,
        mfa: bool = True,
        last_stride: int = 1,
        test_mode: str = "simple",
        plm: bool = True,
    ) -> None:
        super().__init__()
        if test_mode not in TEST_MODES:
            raise ValueError(
                f"model.options.test_mode must be one of {TEST_MODES}, got {test_mode!r}"
            )
        if mfgm_variant not in MFGM_VARIANTS:
            raise ValueError(
                f"model.options.mfgm_variant must be one of {MFGM_VARIANTS}, got {mfgm_variant!r}"
            )
        for key, value, allowed in (
            ("mfgm_init", mfgm_init, MFGM_INITS),
            ("mfa_pnl", mfa_pnl, MFA_PNL_FORMS),
        ):
            if value not in allowed:
                raise ValueError(f"model.options.{key} must be one of {allowed}, got {value!r}")
        if mfgm_after not in (2, 3):
            raise ValueError(f"model.options.mfgm_after must be 2 or 3, got {mfgm_after!r}")
        if num_prototypes < 1 or mfgm_branches < 0:
            raise ValueError(
                "model.options.num_prototypes must be >= 1 and mfgm_branches >= 0, got "
                f"{num_prototypes} and {mfgm_branches}"
            )
        if len(input_size) != 2:
            raise ValueError(
                f"model.options.input_size must be (height, width), got {input_size!r}"
            )
        self.backbone = TwoStreamResNet(backbone, pretrained, last_stride, (0, 0, 0, 0))
        stages = list(self.backbone.stages)
        channels = [stages[0][0].conv1.in_channels] + [_stage_channels(s) for s in stages]
        self.mfgm_after = mfgm_after
        self.num_stages = 4 if mfgm_after == 3 else 3
        # The RegDB variant has no layer4; dropping it keeps DDP free of gradient-less parameters.
        self.backbone.stages = nn.Sequential(*stages[: self.num_stages])
        self.sna = SimAM() if sna else None
        # MFA after layer1..3 (after layer1..2 in the RegDB variant, which has no MFA3).
        self.mfa = (
            nn.ModuleList(
                MFA(channels[i + 1], channels[i], downsample=i > 0, pnl=mfa_pnl)
                for i in range(self.num_stages - 1)
            )
            if mfa
            else None
        )
        gen_channels = channels[mfgm_after]
        self.mfgm = nn.ModuleList(
            MFGMBranch(gen_channels, mfgm_variant, init=mfgm_init) for _ in range(mfgm_branches)
        )
        self.dropout = nn.Dropout(dropout)
        out_channels = channels[self.num_stages]
        downsamples = 4 if (self.num_stages == 3 or last_stride == 1) else 5
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.map_size = feature_map_size(self.input_size, downsamples)
        self.neck_global = BNNeck(out_channels, num_classes)
        if plm:
            positions = self.map_size[0] * self.map_size[1]
            self.plm = PLM(out_channels, num_prototypes, positions)
            self.neck_feature = BNNeck((num_prototypes + 1) * out_channels, num_classes)
        else:
            self.plm = self.neck_feature = None
        self.phase_aug, self.phase_weight = phase_aug, phase_weight
        self.test_mode = test_mode
        self.num_sets = 1 + mfgm_branches
        self.out_channels = out_channels

    def lr_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        """The code trains head A (global BNNeck + classifier) at lr and every other parameter,
        PLM and head B included, at 0.1 lr. PLM and head B form their own group ``plm`` (0.1,
        as released) so ``optim.lr_mults`` can set them apart from the backbone; it is empty
        with ``plm=False``, so one ``lr_mults`` serves both settings."""
        groups = backbone_head_groups(self, head=self.neck_global.parameters())
        backbone, mult = groups["backbone"]
        plm = [] if self.plm is None else [*self.plm.parameters(), *self.neck_feature.parameters()]
        ids = {id(p) for p in plm}
        # head last: the trainer logs the last group's lr as the epoch lr
        return {
            "backbone": ([p for p in backbone if id(p) not in ids], mult),
            "plm": (plm, mult),
            "head": groups["head"],
        }

    def _maps(self, images: torch.Tensor, modalities: torch.Tensor, generate: bool) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.input_size:
            raise ValueError(
                f"PDM was built for input {self.input_size} (data.height/width, "
                f"model.options.input_size) but got images of {tuple(images.shape[-2:])}"
            )
        if self.training and self.phase_aug:
            images = images + self.phase_weight * phase_only(images)
        x = self.backbone.stems(images, modalities)
        if self.sna is not None:
            x = self.sna(x)
        for i in range(self.num_stages):
            shallow = x
            x = self.backbone.stages[i](x)
            if self.mfa is not None and i < len(self.mfa):
                x = self.mfa[i](x, shallow)
            if i + 1 == self.mfgm_after:
                if generate and len(self.mfgm):
                    x = torch.cat([x, *(branch(x) for branch in self.mfgm)], dim=0)
                x = self.dropout(x)
        if tuple(x.shape[-2:]) != self.map_size:
            raise ValueError(f"PDM feature map {tuple(x.shape[-2:])} != expected {self.map_size}")
        return x

    def _features(
        self, maps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        glob = maps.mean(dim=(2, 3))
        if self.plm is None:
            return glob, glob, None
        local, logits = self.plm(maps)
        return glob, torch.cat([local.flatten(1), glob], dim=1), logits

    batch_fields: tuple[str, ...] = ()

    @property
    def output_keys(self) -> tuple[str, ...]:
        keys = ("global", "feature", "logits_global")
        return keys + (("logits_feature", "prototype_logits") if self.plm is not None else ())

    def forward(self, images: torch.Tensor, modalities: torch.Tensor) -> dict[str, torch.Tensor]:
        glob, feature, logits = self._features(self._maps(images, modalities, generate=True))
        _, logits_global = self.neck_global(glob)
        outputs = {"global": glob, "feature": feature, "logits_global": logits_global}
        if self.plm is not None:
            outputs["logits_feature"] = self.neck_feature(feature)[1]
            outputs["prototype_logits"] = logits
        return outputs

    @torch.no_grad()
    def embed(self, images: torch.Tensor, modality: str) -> torch.Tensor:
        code = VISIBLE if modality == "visible" else INFRARED
        modalities = torch.full((images.shape[0],), code, device=images.device)
        if self.test_mode == "simple":
            maps = self._maps(images, modalities, generate=False)
            return self.neck_global.bn(maps.mean(dim=(2, 3)))
        glob, feature, _ = self._features(self._maps(images, modalities, generate=True))
        n = images.shape[0]
        chunks = []
        for s in range(glob.shape[0] // n):
            rows = slice(s * n, (s + 1) * n)
            chunks.append(F.normalize(self.neck_global.bn(glob[rows]), dim=1))
            if self.plm is not None:
                chunks.append(F.normalize(self.neck_feature.bn(feature[rows]), dim=1))
        return torch.cat(chunks, dim=1)


__all__ = ["MFA", "PDM", "PLM", "MFGMBranch", "SimAM", "feature_map_size", "phase_only"]
