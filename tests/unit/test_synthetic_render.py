"""The synthetic person renderer: deterministic, honest about modality, and learnable.

Retrieval thresholds below were chosen from measurements with these exact seeds (numbers in the
comments); the seeds are fixed, so the tests are deterministic, and the margins are there so that
harmless changes to the renderer do not break them while a real regression (colour leaking into
infrared, identity drowned by per-image jitter) does.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from PIL import Image

from dist_reid.data.synthetic.render import (
    CameraProfile,
    IdentityAppearance,
    Material,
    render_image,
    sample_identity,
)

VIS = CameraProfile(1, "visible", (128, 64), scene="indoor")
VIS_OUT = CameraProfile(4, "visible", (256, 128), contrast=1.1, brightness=0.05, scene="outdoor")
IR = CameraProfile(2, "infrared", (128, 64), contrast=0.8, noise_std=0.03, blur=0.8, scene="night")
IR_INDOOR = CameraProfile(
    3, "infrared", (192, 80), contrast=0.8, noise_std=0.03, blur=0.8, scene="indoor"
)
PROFILES = [
    VIS,
    VIS_OUT,
    IR,
    IR_INDOOR,
    CameraProfile(
        5, "visible", (120, 48), contrast=0.7, brightness=-0.15, noise_std=0.04, scene="night"
    ),
    CameraProfile(
        6, "infrared", (288, 144), contrast=0.75, noise_std=0.0, blur=0.0, scene="outdoor"
    ),
]

NUM_IDS = 30
SHOTS = 4


def _render(pid: int, camera: CameraProfile, seed: int, id_seed: int = 11) -> np.ndarray:
    return np.asarray(
        render_image(sample_identity(pid, id_seed), camera, np.random.default_rng(seed))
    )


# ---------------------------------------------------------------- determinism


def test_sample_identity_is_deterministic_and_differs_across_pids_and_seeds():
    a = sample_identity(5, 3)
    assert a == sample_identity(5, 3)
    assert a != sample_identity(6, 3)
    assert a != sample_identity(5, 4)
    # Different people differ in many respects, not just one field.
    assert len({sample_identity(p, 3).upper for p in range(20)}) == 20
    assert len({sample_identity(p, 3).body for p in range(20)}) == 20


@pytest.mark.parametrize("camera", [VIS, IR], ids=["visible", "infrared"])
def test_render_is_deterministic_for_a_seed(camera):
    a = _render(3, camera, seed=42)
    b = _render(3, camera, seed=42)
    c = _render(3, camera, seed=43)
    assert a.dtype == np.uint8 and np.array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_render_ignores_global_random_state():
    np.random.seed(0)
    random.seed(0)
    a = _render(1, VIS, seed=9)
    np.random.seed(12345)
    random.seed(12345)
    np.random.random(10)
    b = _render(1, VIS, seed=9)
    assert np.array_equal(a, b)


def test_rng_use_does_not_depend_on_modality():
    # Same scene family and size, no noise: the draws match, so one seed gives an aligned
    # visible/infrared pair (what a RegDB-like dual camera needs).
    vis = CameraProfile(1, "visible", (128, 64), noise_std=0.0, scene="night")
    ir = CameraProfile(2, "infrared", (128, 64), noise_std=0.0, scene="night")
    ident = sample_identity(2, 0)
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    a, b = render_image(ident, vis, r1), render_image(ident, ir, r2)
    assert a.size == b.size
    assert r1.random() == r2.random()


# ---------------------------------------------------------------- output format


@pytest.mark.parametrize("camera", PROFILES, ids=lambda c: f"{c.modality}-{c.size[0]}x{c.size[1]}")
def test_mode_and_size_within_jitter(camera):
    h0, w0 = camera.size
    sizes = set()
    for seed in range(25):
        img = render_image(sample_identity(seed % 7, 1), camera, np.random.default_rng(seed))
        assert img.mode == "RGB"
        w, h = img.size
        assert 0.85 * h0 <= h <= 1.15 * h0 and 0.85 * w0 <= w <= 1.15 * w0, (img.size, camera.size)
        sizes.add(img.size)
        if camera.modality == "infrared":
            arr = np.asarray(img)
            assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(
                arr[..., 0], arr[..., 2]
            )
    assert len(sizes) > 5  # the size really is jittered per image


def test_visible_images_have_colour():
    arr = _render(0, VIS, seed=0).astype(int)
    assert (
        np.abs(arr[..., 0] - arr[..., 1]).mean() > 3 or np.abs(arr[..., 1] - arr[..., 2]).mean() > 3
    )


def test_camera_brightness_and_contrast_are_honoured():
    base = dict(cam=1, modality="visible", size=(128, 64), noise_std=0.0)
    dark = _render(4, CameraProfile(**base, brightness=-0.2), seed=3).astype(float)
    bright = _render(4, CameraProfile(**base, brightness=0.2), seed=3).astype(float)
    flat = _render(4, CameraProfile(**base, contrast=0.5), seed=3).astype(float)
    punchy = _render(4, CameraProfile(**base, contrast=1.5), seed=3).astype(float)
    assert bright.mean() - dark.mean() > 0.3 * 255 * 0.9
    assert punchy.std() > 2 * flat.std()


def test_bad_camera_profile_is_rejected():
    with pytest.raises(ValueError, match="modality"):
        CameraProfile(1, "thermal", (128, 64))
    with pytest.raises(ValueError, match="scene"):
        CameraProfile(1, "visible", (128, 64), scene="beach")
    with pytest.raises(ValueError, match="brightness"):
        CameraProfile(1, "visible", (128, 64), brightness=0.5)


# ---------------------------------------------------------------- modality honesty


def _recolour(obj, rng: np.random.Generator):
    """Copy of an identity with every colour replaced and every emissivity kept."""
    if isinstance(obj, Material):
        return dataclasses.replace(obj, color=tuple(int(c) for c in rng.integers(0, 256, size=3)))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _recolour(getattr(obj, f.name), rng) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    return obj


def test_infrared_ignores_colour_visible_does_not():
    for pid in range(5):
        ident = sample_identity(pid, 0)
        other = _recolour(ident, np.random.default_rng(pid))
        assert (
            isinstance(other, IdentityAppearance)
            and other != ident
            and other.upper.base.color != ident.upper.base.color
        )
        assert other.upper.base.emissivity == ident.upper.base.emissivity
        for camera in (IR, IR_INDOOR):
            a = render_image(ident, camera, np.random.default_rng(100 + pid))
            b = render_image(other, camera, np.random.default_rng(100 + pid))
            assert np.array_equal(np.asarray(a), np.asarray(b))
        a = render_image(ident, VIS, np.random.default_rng(100 + pid))
        b = render_image(other, VIS, np.random.default_rng(100 + pid))
        assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_emissivity_drives_infrared():
    ident = sample_identity(0, 0)
    up = ident.upper
    cold = dataclasses.replace(
        ident, upper=dataclasses.replace(up, base=dataclasses.replace(up.base, emissivity=0.0))
    )
    warm = dataclasses.replace(
        ident, upper=dataclasses.replace(up, base=dataclasses.replace(up.base, emissivity=1.0))
    )
    a = np.asarray(render_image(cold, IR, np.random.default_rng(1))).astype(float)
    b = np.asarray(render_image(warm, IR, np.random.default_rng(1))).astype(float)
    assert b.mean() > a.mean() + 5  # the garment is a large part of the image


# ---------------------------------------------------------------- retrieval with handcrafted features


@pytest.fixture(scope="module")
def gallery() -> dict[str, list[Image.Image]]:
    """NUM_IDS identities x SHOTS images on a visible and on an infrared camera."""
    ids = [sample_identity(p, 2024) for p in range(NUM_IDS)]
    out: dict[str, list[Image.Image]] = {"visible": [], "infrared": []}
    for p, ident in enumerate(ids):
        for k in range(SHOTS):
            out["visible"].append(render_image(ident, VIS, np.random.default_rng([1, p, k])))
            out["infrared"].append(render_image(ident, IR, np.random.default_rng([2, p, k])))
    return out


LABELS = np.repeat(np.arange(NUM_IDS), SHOTS)
CHANCE = 1.0 / NUM_IDS


def _rank1(q: np.ndarray, g: np.ndarray, same_set: bool) -> float:
    sim = q @ g.T
    if same_set:
        np.fill_diagonal(sim, -np.inf)  # a query must not find itself
    return float(np.mean(LABELS[sim.argmax(1)] == LABELS))


def _auc(q: np.ndarray, g: np.ndarray) -> float:
    """P(similarity of a same-identity pair > that of a different-identity pair); 0.5 = chance."""
    sim = q @ g.T
    same = LABELS[:, None] == LABELS[None, :]
    pos, neg = np.sort(sim[same]), sim[~same]
    below = np.searchsorted(pos, neg, side="left").sum()  # (pos, neg) pairs with pos < neg
    return float(1.0 - below / (pos.size * neg.size))


def _colour_hist(img: Image.Image, bins: int = 4) -> np.ndarray:
    # 4x4x4 RGB histogram, L1-normalised, square-rooted (Hellinger) so the cosine is not ruled
    # by the single biggest (background) bin, then L2-normalised.
    q = np.asarray(img).reshape(-1, 3).astype(np.int64) // (256 // bins)
    h = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins**3).astype(float)
    h = np.sqrt(h / h.sum())
    return h / np.linalg.norm(h)


def _edge_rows(img: Image.Image) -> np.ndarray:
    # Layout signature: per-row strength of horizontal edges (garment split, hem, stripes, bag,
    # shoes) in the central columns, plus its spectrum (stripe frequency, shift-tolerant). The
    # edge strength is the largest change over the colour channels, so a hue change counts as
    # much as a brightness change; edge sign and levels are discarded, so visible and infrared
    # images are compared alike.
    g = np.asarray(img.resize((32, 64), Image.BILINEAR), float)[:, 6:26]
    p = np.abs(np.diff(g, axis=0)).max(axis=2).mean(axis=1)
    parts = [np.sqrt(p), np.abs(np.fft.rfft(p - p.mean()))[1:20]]
    parts = [(x - x.mean()) / (np.linalg.norm(x - x.mean()) + 1e-9) for x in parts]
    return np.concatenate(parts) / np.sqrt(2)


def test_colour_histograms_match_within_visible_only(gallery):
    vis = np.stack([_colour_hist(im) for im in gallery["visible"]])
    ir = np.stack([_colour_hist(im) for im in gallery["infrared"]])
    v2v, v2i, i2v = _rank1(vis, vis, True), _rank1(vis, ir, False), _rank1(ir, vis, False)
    auc = _auc(ir, vis)
    print(
        f"colour hist rank-1 v->v {v2v:.3f} v->i {v2i:.3f} i->v {i2v:.3f} auc {auc:.3f} chance {CHANCE:.3f}"
    )
    # Measured here: v->v 0.700, v->i 0.042, i->v 0.033, cross-modal AUC ~0.50. Over ten other
    # identity seeds: v->v 0.58..0.78 (mean 0.69), v->i and i->v 0.00..0.05, AUC 0.49..0.51.
    # Colour identifies a person among visible images, and says nothing across modalities.
    assert v2v > 0.5
    assert v2i < 3 * CHANCE and i2v < 3 * CHANCE
    assert abs(auc - 0.5) < 0.05


def test_a_modality_invariant_layout_cue_exists(gallery):
    vis = np.stack([_edge_rows(im) for im in gallery["visible"]])
    ir = np.stack([_edge_rows(im) for im in gallery["infrared"]])
    v2i, i2v, auc = _rank1(vis, ir, False), _rank1(ir, vis, False), _auc(ir, vis)
    print(f"layout rank-1 v->i {v2i:.3f} i->v {i2v:.3f} auc {auc:.3f}")
    # Measured here: rank-1 v->i 0.267, i->v 0.250 (chance 0.033), AUC 0.649. Over ten other
    # identity seeds: rank-1 0.13..0.32 (mean 0.22), AUC 0.62..0.70. A crude handcrafted layout
    # signature already matches across modalities; a CNN does much better (see render.py).
    assert min(v2i, i2v) > 2.5 * CHANCE
    assert auc > 0.58


def _torso_minus_legs(img: Image.Image) -> float:
    """Mean grey level of a torso band minus that of a leg band (central columns)."""
    g = np.asarray(img.convert("L"), float)
    h, w = g.shape
    cols = slice(int(0.3 * w), int(0.7 * w))
    return float(
        g[int(0.25 * h) : int(0.42 * h), cols].mean() - g[int(0.62 * h) : int(0.8 * h), cols].mean()
    )


def test_infrared_layout_follows_emissivity_not_colour():
    emis, lum, ir = [], [], []
    for pid in range(120):
        ident = sample_identity(pid, 505)
        if ident.lower_kind != "trousers":  # legs fully covered, so the leg band is the garment
            continue
        up, lo = ident.upper.base, ident.lower.base
        emis.append(up.emissivity - lo.emissivity)
        lum.append(
            np.dot(up.color, (0.299, 0.587, 0.114)) - np.dot(lo.color, (0.299, 0.587, 0.114))
        )
        shots = [render_image(ident, IR, np.random.default_rng([3, pid, k])) for k in range(2)]
        ir.append(np.mean([_torso_minus_legs(im) for im in shots]))
    r_emis, r_lum = np.corrcoef(emis, ir)[0, 1], np.corrcoef(lum, ir)[0, 1]
    print(
        f"n={len(ir)} corr(IR torso-legs, emissivity diff) {r_emis:.3f}, with luminance diff {r_lum:.3f}"
    )
    # Measured here: n=81, 0.655 and 0.050; over ten identity seeds 0.56..0.80 and -0.11..0.13.
    assert len(ir) >= 50
    assert r_emis > 0.45
    assert abs(r_lum) < 0.3
