"""Synthetic person renderer: the pixels of the synthetic SYSU-MM01 / RegDB / LLCM data sets.

A person is a small 2-D model in body coordinates (``u`` across, ``v`` down from the top of the
head, both in units of the person's stature). Every surface of the model is a :class:`Material`
with a visible colour and a hidden thermal emissivity drawn independently of each other. The
visible renderer fills surfaces with colours; the infrared renderer fills the same surfaces with
grey levels derived only from emissivity. What survives across modalities is therefore shape and
layout (body proportions, garment split, sleeves, pattern geometry, hair, carried objects), while
colour is visible-only: the same split between shared and modality-specific cues as real VI-ReID.

Per image the model is posed (view, flip, limb swing, lean), placed in an imperfect detector box
(scale, offset), drawn over a scene background, maybe partly occluded, and passed through camera
effects (blur, contrast, brightness, noise). All randomness comes from the caller's
``numpy.random.Generator``; how many numbers are drawn depends neither on the modality nor on any
colour, so one seed on a visible and an infrared camera of the same scene family yields a
spatially aligned pair (like RegDB's dual camera) and recolouring an identity leaves its infrared
images untouched.

Difficulty was tuned so identity dominates the per-image jitter without making the task trivial:
colour histograms match visible-to-visible but sit at chance across modalities, a crude row-edge
layout signature matches across modalities at several times chance (tests/unit/
test_synthetic_render.py), and a small 8-conv CNN trained for 150 s on one GPU with 100
identities (8 visible + 8 infrared images each, SYSU-like cameras, random-grayscale augmentation,
cross-entropy + triplet) reached infrared-to-visible rank-1 ~0.4 / mAP ~0.4 on 50 unseen identities
(chance 0.02).
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

__all__ = [
    "CameraProfile",
    "Garment",
    "IdentityAppearance",
    "Material",
    "Physique",
    "render_image",
    "sample_identity",
]

RGB = tuple[int, int, int]
Point = tuple[float, float]

SCENES = ("indoor", "outdoor", "night")
MODALITIES = ("visible", "infrared")
UPPER_PATTERNS = ("plain", "hstripes", "vstripes", "checks", "logo", "band")
LOWER_PATTERNS = ("plain", "hstripes", "vstripes", "checks")
LOWER_KINDS = ("trousers", "shorts", "skirt")
HAIR_STYLES = ("short", "long", "ponytail", "bald", "hat")
CARRY_KINDS = ("none", "backpack", "bag_left", "bag_right", "hand_left", "hand_right")
LOGO_SHAPES = ("disc", "square", "triangle", "diamond")

# Infrared grey level of a body surface is IR_FLOOR + (1 - IR_FLOOR) * emissivity: even a cold
# garment on a person stays at least as warm as a typical indoor/night background.
IR_FLOOR = 0.3
# Thermal background level ranges per scene (fractions of full scale).
_IR_SCENE_LEVEL = {"indoor": (0.12, 0.32), "outdoor": (0.22, 0.5), "night": (0.03, 0.2)}
# Domain separation so identity streams never coincide with image streams seeded alike.
_IDENTITY_STREAM = 0x5EED_1D


@dataclass(frozen=True)
class CameraProfile:
    """One camera of a synthetic data set; the layout writer sets these per camera."""

    cam: int  # camera number
    modality: str  # "visible" or "infrared"
    size: tuple[int, int]  # (height, width) of the output crop; each image varies within +-15 %
    contrast: float = 1.0  # multiplicative contrast around mid-grey
    brightness: float = 0.0  # additive, in [-0.3, 0.3] of full scale
    noise_std: float = 0.02  # sensor noise std (fraction of full scale)
    blur: float = 0.5  # typical gaussian blur radius in pixels (jittered per image)
    scene: str = "indoor"  # background family: "indoor" | "outdoor" | "night"

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"camera {self.cam}: modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.scene not in SCENES:
            raise ValueError(f"camera {self.cam}: scene must be one of {SCENES}, got {self.scene!r}")
        if len(self.size) != 2 or min(self.size) < 16:
            raise ValueError(f"camera {self.cam}: size must be (height, width) >= 16 px, got {self.size}")
        if not -0.3 <= self.brightness <= 0.3:
            raise ValueError(f"camera {self.cam}: brightness must be in [-0.3, 0.3], got {self.brightness}")
        if self.contrast <= 0 or self.noise_std < 0 or self.blur < 0:
            raise ValueError(f"camera {self.cam}: contrast must be > 0 and noise_std, blur >= 0")


@dataclass(frozen=True)
class Material:
    """A surface: visible colour and infrared emissivity in [0, 1], drawn independently."""

    color: RGB
    emissivity: float


@dataclass(frozen=True)
class Physique:
    """Body proportions as fractions of stature (modality-invariant)."""

    head_h: float
    head_w: float
    neck: float
    torso_len: float
    shoulder_w: float
    hip_w: float
    arm_w: float
    arm_len: float
    leg_w: float
    shoe_h: float


@dataclass(frozen=True)
class Garment:
    """A garment: base material plus a pattern drawn in an accent material."""

    base: Material
    accent: Material
    pattern: str  # one of UPPER_PATTERNS / LOWER_PATTERNS
    freq: int  # stripes or check cells across the garment's length
    duty: float  # fraction of each period covered by the accent
    length: float  # upper: hem as fraction of torso length; lower: fraction of leg covered
    logo_shape: str = "disc"
    logo_pos: Point = (0.0, 0.35)  # (u in half shoulder widths, v in torso lengths) from neck
    logo_size: float = 0.3  # in shoulder widths


@dataclass(frozen=True)
class IdentityAppearance:
    """Everything that makes one synthetic person that person."""

    pid: int
    body: Physique
    skin: Material
    hair: Material  # also the hat when hair_style == "hat"
    hair_style: str
    hair_volume: float  # fraction of the head's height covered from the top (front view)
    upper: Garment
    sleeve: float  # fraction of the arm covered by the upper garment (0 = sleeveless)
    lower: Garment
    lower_kind: str  # "trousers" | "shorts" | "skirt"
    shoes: Material
    carry: str  # one of CARRY_KINDS
    carry_item: Material
    carry_size: float


# --------------------------------------------------------------------------------------------
# identity sampling


def _choice(rng: np.random.Generator, probs: Sequence[float]) -> int:
    """Index drawn with the given (unnormalised) probabilities, one uniform draw."""
    x = rng.random() * sum(probs)
    for i, p in enumerate(probs):
        x -= p
        if x < 0:
            return i
    return len(probs) - 1


def _pick(rng: np.random.Generator, options: Sequence[str], probs: Sequence[float]) -> str:
    return options[_choice(rng, probs)]


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def _garment_colour(rng: np.random.Generator) -> RGB:
    # A third of real clothing is black/grey/white; the rest is saturated enough to be a cue.
    if rng.random() < 0.3:
        return _hsv(rng.random(), rng.uniform(0.0, 0.12), rng.uniform(0.08, 0.95))
    return _hsv(rng.random(), rng.uniform(0.45, 1.0), rng.uniform(0.35, 1.0))


def _distinct_colour(rng: np.random.Generator, other: RGB, min_dist: float = 110.0) -> RGB:
    for _ in range(50):
        c = _garment_colour(rng)
        if math.dist(c, other) >= min_dist:
            return c
    return (255 - other[0], 255 - other[1], 255 - other[2])


def _distinct_emissivity(rng: np.random.Generator, other: float, min_diff: float) -> float:
    # Adjacent surfaces must differ in emissivity or the layout would vanish in infrared.
    for _ in range(50):
        e = float(rng.random())
        if abs(e - other) >= min_diff:
            return e
    return 1.0 - other if abs(1.0 - 2 * other) >= min_diff else (other + 0.5) % 1.0


def _sample_garment(
    rng: np.random.Generator, patterns: Sequence[str], probs: Sequence[float], length: float, avoid_e: float | None
) -> Garment:
    base_c = _garment_colour(rng)
    base_e = float(rng.random()) if avoid_e is None else _distinct_emissivity(rng, avoid_e, 0.28)
    accent = Material(_distinct_colour(rng, base_c), _distinct_emissivity(rng, base_e, 0.35))
    return Garment(
        base=Material(base_c, base_e),
        accent=accent,
        pattern=_pick(rng, patterns, probs),
        freq=int(rng.integers(3, 8)),
        duty=float(rng.uniform(0.3, 0.55)),
        length=length,
        logo_shape=_pick(rng, LOGO_SHAPES, (1, 1, 1, 1)),
        logo_pos=(float(rng.uniform(-0.35, 0.35)), float(rng.uniform(0.25, 0.5))),
        logo_size=float(rng.uniform(0.25, 0.45)),
    )


_SKIN_TONES: tuple[RGB, ...] = ((255, 224, 196), (234, 192, 158), (205, 150, 112), (160, 108, 72), (105, 68, 45))
_HAIR_COLOURS: tuple[RGB, ...] = ((20, 16, 14), (60, 40, 25), (110, 75, 40), (200, 170, 110), (150, 150, 150))


def sample_identity(pid: int, seed: int) -> IdentityAppearance:
    """The appearance of person ``pid`` in the data set generated with ``seed``.

    Deterministic for ``(pid, seed)``: the same person every call.
    """
    rng = np.random.default_rng([_IDENTITY_STREAM, seed % 2**63, pid % 2**63])
    build = rng.uniform(0.85, 1.2)
    shoulder = rng.uniform(0.22, 0.29) * build
    head_h = rng.uniform(0.115, 0.15)
    body = Physique(
        head_h=head_h,
        head_w=head_h * rng.uniform(0.68, 0.85),
        neck=rng.uniform(0.015, 0.03),
        torso_len=rng.uniform(0.27, 0.34),
        shoulder_w=shoulder,
        hip_w=shoulder * rng.uniform(0.7, 0.95),
        arm_w=rng.uniform(0.05, 0.065) * build,
        arm_len=rng.uniform(0.36, 0.42),
        leg_w=rng.uniform(0.075, 0.095) * build,
        shoe_h=rng.uniform(0.025, 0.045),
    )
    skin_c = _SKIN_TONES[int(rng.integers(len(_SKIN_TONES)))]
    skin_c = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in skin_c)
    skin = Material(skin_c, float(rng.uniform(0.7, 1.0)))  # bare skin is the warmest surface
    if rng.random() < 0.12:  # dyed hair
        hair_c = _hsv(rng.random(), rng.uniform(0.5, 0.9), rng.uniform(0.4, 0.9))
    else:
        hair_c = _HAIR_COLOURS[int(rng.integers(len(_HAIR_COLOURS)))]
    hair = Material(hair_c, float(rng.uniform(0.05, 0.6)))
    hair_style = _pick(rng, HAIR_STYLES, (0.35, 0.25, 0.15, 0.1, 0.15))

    upper = _sample_garment(rng, UPPER_PATTERNS, (0.3, 0.2, 0.12, 0.13, 0.15, 0.1), float(rng.uniform(0.85, 1.4)), None)
    sleeve = (0.0, 0.35, 0.7, 1.0)[_choice(rng, (0.1, 0.35, 0.15, 0.4))]
    lower_kind = _pick(rng, LOWER_KINDS, (0.6, 0.2, 0.2))
    lower_len = {"trousers": (0.85, 1.0), "shorts": (0.3, 0.5), "skirt": (0.3, 0.85)}[lower_kind]
    lower = _sample_garment(rng, LOWER_PATTERNS, (0.55, 0.12, 0.18, 0.15), float(rng.uniform(*lower_len)), upper.base.emissivity)
    shoes = Material(_garment_colour(rng), float(rng.random()))
    carry = _pick(rng, CARRY_KINDS, (0.3, 0.3, 0.1, 0.1, 0.1, 0.1))
    carry_item = Material(_garment_colour(rng), float(rng.uniform(0.0, 0.7)))
    return IdentityAppearance(
        pid=pid,
        body=body,
        skin=skin,
        hair=hair,
        hair_style=hair_style,
        hair_volume=float(rng.uniform(0.3, 0.55)),
        upper=upper,
        sleeve=sleeve,
        lower=lower,
        lower_kind=lower_kind,
        shoes=shoes,
        carry=carry,
        carry_item=carry_item,
        carry_size=float(rng.uniform(0.75, 1.25)),
    )


# --------------------------------------------------------------------------------------------
# per-image randomness


@dataclass(frozen=True)
class _Shot:
    """Everything random about one image, drawn in a fixed order."""

    out_h: int
    out_w: int
    view: str  # "front" | "back" | "side" (side faces +u before the flip)
    flip: bool
    stature: float  # person height in pixels
    cx: float  # x of the person's axis at the feet, pixels
    top: float  # y of the top of the head, pixels
    lean: float
    stretch: float  # horizontal scale: detector boxes are resized to the camera aspect
    legs: tuple[float, float]  # leg angles (radians, + swings towards +u)
    arms: tuple[float, float]
    contrast: float
    brightness: float
    blur: float
    tint: tuple[float, float, float]


def _sample_shot(camera: CameraProfile, rng: np.random.Generator) -> _Shot:
    h0, w0 = camera.size
    g = rng.uniform(0.88, 1.12)
    out_h = round(h0 * g)
    out_w = round(w0 * float(np.clip(g * rng.uniform(0.95, 1.05), 0.87, 1.13)))
    u = rng.random()
    view = "front" if u < 0.4 else ("back" if u < 0.75 else "side")
    flip = bool(rng.random() < 0.5)
    stature = out_h * rng.uniform(0.74, 0.97)
    # Imperfect detector box: the person may be off-centre and a few percent cut at top/bottom.
    top = (out_h - stature) * rng.uniform(-0.15, 1.15)
    cx = out_w * (0.5 + rng.uniform(-0.1, 0.1))
    lean = rng.uniform(-0.04, 0.04)
    stretch = rng.uniform(1.1, 1.3)
    spread = rng.uniform(0.0, 0.12, size=2)
    swing = rng.uniform(0.1, 0.4)
    arm_out = rng.uniform(0.04, 0.25, size=2)
    arm_swing = rng.uniform(-0.45, 0.45)
    if view == "side":
        legs = (swing, -swing)
        arms = (-arm_swing, arm_swing)
    else:
        legs = (-spread[0], spread[1])
        arms = (-arm_out[0], arm_out[1])
    contrast = rng.uniform(0.9, 1.1)
    brightness = rng.uniform(-0.04, 0.04)
    blur = rng.uniform(0.6, 1.4)
    tint = rng.uniform(0.95, 1.05, size=3) * rng.uniform(0.9, 1.06)
    return _Shot(
        out_h=out_h,
        out_w=out_w,
        view=view,
        flip=flip,
        stature=stature,
        cx=cx,
        top=top,
        lean=lean,
        stretch=stretch,
        legs=(float(legs[0]), float(legs[1])),
        arms=(float(arms[0]), float(arms[1])),
        contrast=contrast,
        brightness=brightness,
        blur=blur,
        tint=(float(tint[0]), float(tint[1]), float(tint[2])),
    )


# --------------------------------------------------------------------------------------------
# drawing


class _Canvas:
    """A PIL image plus the material -> fill rule of one modality."""

    def __init__(self, width: int, height: int, infrared: bool) -> None:
        self.infrared = infrared
        self.size = (width, height)
        self.img = Image.new("L" if infrared else "RGB", self.size)
        self.draw = ImageDraw.Draw(self.img)

    def fill(self, mat: Material) -> int | RGB:
        if self.infrared:
            return round(255 * (IR_FLOOR + (1.0 - IR_FLOOR) * mat.emissivity))
        return mat.color

    def raw(self, color: RGB, level: float) -> int | RGB:
        """Fill for scene elements, which carry a colour and a thermal level of their own."""
        return round(255 * level) if self.infrared else color


def _muted(rng: np.random.Generator, v_lo: float, v_hi: float, s_hi: float = 0.15) -> RGB:
    # Scenes are greyish (walls, floors, asphalt) so that the person carries the colour cues.
    return _hsv(rng.random(), rng.uniform(0.0, s_hi), rng.uniform(v_lo, v_hi))


def _gradient(w: int, h: int, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    col = top[None, None, :] * (1 - t) + bottom[None, None, :] * t
    return np.broadcast_to(col, (h, w, col.shape[-1]))


def _background(canvas: _Canvas, scene: str, rng: np.random.Generator) -> None:
    """Scene clutter. Every element draws both a colour and a thermal level (fixed rng use)."""
    w, h = canvas.size
    lo, hi = _IR_SCENE_LEVEL[scene]
    v_lo, v_hi = (0.03, 0.3) if scene == "night" else (0.3, 0.9)
    # Two-tone gradient wall/sky above a floor/ground band.
    c = [np.array(_muted(rng, v_lo, v_hi), np.float32) for _ in range(3)]
    lv = rng.uniform(lo, hi, size=3).astype(np.float32)
    horizon = round(h * rng.uniform(0.55, 0.85))
    if canvas.infrared:
        arr = np.empty((h, w, 1), np.float32)
        arr[:horizon] = _gradient(w, horizon, lv[:1] * 255, lv[1:2] * 255)
        arr[horizon:] = lv[2] * 255
        canvas.img.paste(Image.fromarray(arr[..., 0].astype(np.uint8), "L"))
    else:
        arr = np.empty((h, w, 3), np.float32)
        arr[:horizon] = _gradient(w, horizon, c[0], c[1])
        arr[horizon:] = c[2]
        canvas.img.paste(Image.fromarray(arr.astype(np.uint8), "RGB"))
    d = canvas.draw
    for _ in range(int(rng.integers(2, 6))):
        kind = int(rng.integers(0, 3))
        x0, x1 = sorted(rng.uniform(-0.2, 1.2, size=2) * w)
        y0, y1 = sorted(rng.uniform(-0.1, 1.0, size=2) * h)
        color = _muted(rng, v_lo, v_hi, 0.2)
        # Occasionally a warm object (radiator, lamp, car engine) in the thermal image.
        level = rng.uniform(lo, hi) + (0.35 if rng.random() < 0.15 else 0.0)
        if scene == "night" and rng.random() < 0.3:
            color = _muted(rng, 0.8, 1.0, 0.3)  # a lit window or street lamp
        fill = canvas.raw(color, min(level, 0.95))
        if kind == 0:
            d.rectangle((x0, y0, x1, y1), fill=fill)
        elif kind == 1:
            d.ellipse((x0, y0, x1, y1), fill=fill)
        else:  # a pole or door frame
            xm = (x0 + x1) / 2
            d.rectangle((xm, y0, xm + max(2.0, w * 0.03), h), fill=fill)


class _Person:
    """Maps body coordinates to pixels and paints the posed model."""

    def __init__(self, ident: IdentityAppearance, shot: _Shot, canvas: _Canvas) -> None:
        self.id = ident
        self.b = ident.body
        self.shot = shot
        self.c = canvas
        self.wf = 0.62 if shot.view == "side" else 1.0
        self.v_sh = self.b.head_h + self.b.neck
        self.v_hip = self.v_sh + self.b.torso_len
        self.leg_len = 1.0 - self.v_hip - self.b.shoe_h * 0.5

    def px(self, u: float, v: float) -> Point:
        s = self.shot
        return (s.cx + s.stature * (s.stretch * u + s.lean * (v - 1.0)), s.top + s.stature * v)

    def poly(self, pts: Sequence[Point]) -> list[Point]:
        return [self.px(u, v) for u, v in pts]

    def box(self, u0: float, v0: float, u1: float, v1: float) -> list[Point]:
        return self.poly([(u0, v0), (u1, v0), (u1, v1), (u0, v1)])

    def ellipse(self, uc: float, vc: float, ru: float, rv: float, fill: int | RGB) -> None:
        x, y = self.px(uc, vc)
        s = self.shot.stature
        su = s * self.shot.stretch
        self.c.draw.ellipse((x - ru * su, y - rv * s, x + ru * su, y + rv * s), fill=fill)

    @staticmethod
    def limb(u: float, v: float, angle: float, length: float, w0: float, w1: float) -> list[Point]:
        """Quad along a limb from joint (u, v) at ``angle`` from vertical, tapering w0 -> w1."""
        du, dv = math.sin(angle), math.cos(angle)
        nu, nv = dv, -du
        b = (u + du * length, v + dv * length)
        return [
            (u - nu * w0 / 2, v - nv * w0 / 2),
            (u + nu * w0 / 2, v + nv * w0 / 2),
            (b[0] + nu * w1 / 2, b[1] + nv * w1 / 2),
            (b[0] - nu * w1 / 2, b[1] - nv * w1 / 2),
        ]

    # -- garments with patterns ----------------------------------------------------------------

    def garment(self, g: Garment, shapes: list[list[Point]], bounds: tuple[float, float, float, float], logo: bool) -> None:
        """Fill body-coordinate polygons with the garment's base and its pattern inside them."""
        d = self.c.draw
        px_shapes = [self.poly(s) for s in shapes]
        for s in px_shapes:
            d.polygon(s, fill=self.c.fill(g.base))
        u0, v0, u1, v1 = bounds
        period = (v1 - v0) / g.freq
        pattern: list[list[Point]] = []
        if g.pattern == "hstripes":
            pattern = [self.box(u0 - 0.1, v0 + (i + 0.5) * period, u1 + 0.1, v0 + (i + 0.5 + g.duty) * period) for i in range(g.freq)]
        elif g.pattern == "vstripes":
            n = max(2, math.ceil((u1 - u0) / period))
            pattern = [self.box(u0 + i * period, v0 - 0.05, u0 + (i + g.duty) * period, v1 + 0.05) for i in range(n)]
        elif g.pattern == "checks":
            n = max(2, math.ceil((u1 - u0) / period))
            pattern = [
                self.box(u0 + i * period, v0 + j * period, u0 + (i + 1) * period, v0 + (j + 1) * period)
                for i in range(n)
                for j in range(g.freq)
                if (i + j) % 2 == 0
            ]
        elif g.pattern == "band":
            vb = v0 + (v1 - v0) * (0.2 + 0.5 * g.logo_pos[1])
            pattern = [self.box(u0 - 0.1, vb, u1 + 0.1, vb + (v1 - v0) * 0.35 * g.duty)]
        elif g.pattern == "logo" and logo:
            self.logo(g)
            return
        if not pattern:
            return
        mask = Image.new("L", self.c.size, 0)
        md = ImageDraw.Draw(mask)
        for s in px_shapes:
            md.polygon(s, fill=255)
        pat = Image.new("L", self.c.size, 0)
        pd = ImageDraw.Draw(pat)
        for p in pattern:
            pd.polygon(p, fill=255)
        self.c.img.paste(self.c.fill(g.accent), (0, 0, *self.c.size), ImageChops.multiply(mask, pat))

    def logo(self, g: Garment) -> None:
        sw = self.b.shoulder_w * self.wf
        uc = g.logo_pos[0] * sw / 2
        vc = self.v_sh + g.logo_pos[1] * self.b.torso_len
        r = g.logo_size * sw / 2
        fill = self.c.fill(g.accent)
        if g.logo_shape == "disc":
            self.ellipse(uc, vc, r, r, fill)
        elif g.logo_shape == "square":
            self.c.draw.polygon(self.box(uc - r, vc - r, uc + r, vc + r), fill=fill)
        elif g.logo_shape == "triangle":
            self.c.draw.polygon(self.poly([(uc, vc - r), (uc + r, vc + r), (uc - r, vc + r)]), fill=fill)
        else:
            self.c.draw.polygon(self.poly([(uc, vc - r), (uc + r, vc), (uc, vc + r), (uc - r, vc)]), fill=fill)

    # -- body parts ------------------------------------------------------------------------------

    def arm(self, side: int, angle: float) -> None:
        b, ident = self.b, self.id
        u = side * max(0.0, (b.shoulder_w * self.wf - b.arm_w) / 2) if self.shot.view != "side" else 0.0
        v = self.v_sh + 0.01
        d = self.c.draw
        d.polygon(self.poly(self.limb(u, v, angle, b.arm_len, b.arm_w, b.arm_w * 0.8)), fill=self.c.fill(ident.skin))
        if ident.sleeve > 0:
            sl = self.limb(u, v - 0.005, angle, b.arm_len * ident.sleeve, b.arm_w * 1.15, b.arm_w * (1.15 - 0.3 * ident.sleeve))
            d.polygon(self.poly(sl), fill=self.c.fill(ident.upper.base))
        hu, hv = u + math.sin(angle) * b.arm_len, v + math.cos(angle) * b.arm_len
        self.ellipse(hu, hv, b.arm_w * 0.55, b.arm_w * 0.6, self.c.fill(ident.skin))

    def hand_point(self, side: int) -> Point:
        b = self.b
        angle = self.shot.arms[0 if side < 0 else 1]
        u = side * max(0.0, (b.shoulder_w * self.wf - b.arm_w) / 2) if self.shot.view != "side" else 0.0
        return (u + math.sin(angle) * b.arm_len, self.v_sh + 0.01 + math.cos(angle) * b.arm_len)

    def legs(self) -> None:
        b, ident, d = self.b, self.id, self.c.draw
        hw = b.hip_w * self.wf
        joints = [0.0, 0.0] if self.shot.view == "side" else [-(hw - b.leg_w) / 2, (hw - b.leg_w) / 2]
        covered = ident.lower.length if ident.lower_kind != "skirt" else 0.0
        garment_shapes: list[list[Point]] = []
        for (ju, angle) in zip(joints, self.shot.legs, strict=True):
            d.polygon(self.poly(self.limb(ju, self.v_hip, angle, self.leg_len, b.leg_w, b.leg_w * 0.75)), fill=self.c.fill(ident.skin))
            fu = ju + math.sin(angle) * self.leg_len
            fv = self.v_hip + math.cos(angle) * self.leg_len
            toe = b.leg_w * (0.9 if self.shot.view == "side" else 0.2)
            shoe = self.box(fu - b.leg_w * 0.55, fv - b.shoe_h * 0.6, fu + b.leg_w * 0.55 + toe, fv + b.shoe_h * 0.5)
            d.polygon(shoe, fill=self.c.fill(ident.shoes))
            if covered > 0:
                taper = b.leg_w * (1.12 - 0.3 * covered)
                garment_shapes.append(self.limb(ju, self.v_hip - 0.01, angle, self.leg_len * covered, b.leg_w * 1.12, taper))
        top = self.v_hip - 0.03
        if ident.lower_kind == "skirt":
            bottom = self.v_hip + ident.lower.length * self.leg_len
            flare = hw * (0.6 + 0.35 * ident.lower.length)
            garment_shapes.append([(-hw / 2, top), (hw / 2, top), (flare, bottom), (-flare, bottom)])
            bounds = (-flare, top, flare, bottom)
        else:
            garment_shapes.append([(-hw / 2, top), (hw / 2, top), (hw / 2, self.v_hip + 0.06), (-hw / 2, self.v_hip + 0.06)])
            bounds = (-hw / 2 - 0.1, top, hw / 2 + 0.1, self.v_hip + covered * self.leg_len)
        self.garment(ident.lower, garment_shapes, bounds, logo=False)

    def torso(self) -> None:
        b, ident = self.b, self.id
        sw, hw = b.shoulder_w * self.wf, b.hip_w * self.wf
        hem = self.v_sh + ident.upper.length * b.torso_len
        hem_w = hw * (1.0 + 0.25 * max(0.0, ident.upper.length - 1.0))  # coats flare a little
        slope = min(0.03, sw * 0.15)
        shape = [
            (-sw / 2, self.v_sh + slope),
            (-sw / 2 + slope, self.v_sh - 0.005),
            (sw / 2 - slope, self.v_sh - 0.005),
            (sw / 2, self.v_sh + slope),
            (hem_w / 2, hem),
            (-hem_w / 2, hem),
        ]
        # Neck first so the collar covers its base.
        nw = b.head_w * 0.4
        self.c.draw.polygon(self.box(-nw / 2, b.head_h * 0.8, nw / 2, self.v_sh + 0.01), fill=self.c.fill(ident.skin))
        self.garment(ident.upper, [shape], (-sw / 2, self.v_sh, sw / 2, hem), logo=self.shot.view == "front")

    def head(self) -> None:
        b, ident, view = self.b, self.id, self.shot.view
        hair, skin = self.c.fill(ident.hair), self.c.fill(ident.skin)
        ru, rv = b.head_w / 2, b.head_h / 2
        vc = b.head_h / 2
        x, y = self.px(0.0, vc)
        s = self.shot.stature
        su = s * self.shot.stretch
        bbox = (x - ru * su, y - rv * s, x + ru * su, y + rv * s)
        d = self.c.draw
        style = ident.hair_style
        if style == "bald":
            d.ellipse(bbox, fill=skin)
            return
        # Hair cap slightly larger than the skull, then the face as the chord below the hairline.
        self.ellipse(0.0, vc - rv * 0.06, ru * 1.08, rv * 1.06, hair)
        if view == "back":
            return
        # chord angles: PIL measures clockwise from 3 o'clock; 0..180 is the lower half.
        phi = math.degrees(math.asin(max(-0.95, min(0.95, 1.0 - 2.0 * ident.hair_volume))))
        shift = ru * 0.35 * su if view == "side" else 0.0
        fb = (bbox[0] + shift, bbox[1], bbox[2] + shift, bbox[3])
        d.chord(fb, -phi, 180 + phi, fill=skin)
        if style == "hat":
            d.polygon(self.box(-ru * 1.1, -0.02, ru * 1.1, rv * 0.7), fill=hair)
            brim = ru * (1.9 if view == "side" else 1.5)
            d.polygon(self.box(-ru * 1.2, rv * 0.55, brim, rv * 0.8), fill=hair)

    def hair_back(self, over_torso: bool) -> None:
        """Long hair / ponytail: behind the torso in front view, over it (under the head) otherwise."""
        b, ident, view = self.b, self.id, self.shot.view
        if (view != "front") != over_torso:
            return
        fill = self.c.fill(ident.hair)
        ru = b.head_w / 2
        if ident.hair_style == "long":
            u0, u1 = (-ru * 1.1, ru * 0.2) if view == "side" else (-ru * 1.05, ru * 1.05)
            self.c.draw.polygon(self.box(u0, b.head_h * 0.45, u1, self.v_sh + 0.18 * b.torso_len), fill=fill)
        elif ident.hair_style == "ponytail" and view == "side":
            self.ellipse(-ru * 1.15, b.head_h * 0.55, ru * 0.45, b.head_h * 0.3, fill)
        elif ident.hair_style == "ponytail" and view == "back":
            self.c.draw.polygon(self.box(-ru * 0.25, b.head_h * 0.5, ru * 0.25, self.v_sh + 0.1 * b.torso_len), fill=fill)

    def carry(self) -> None:
        """Carried object, drawn over the body."""
        ident, b, view = self.id, self.b, self.shot.view
        kind, k = ident.carry, ident.carry_size
        fill = self.c.fill(ident.carry_item)
        d = self.c.draw
        sw = b.shoulder_w * self.wf
        if kind == "backpack":
            v0, v1 = self.v_sh + 0.02, self.v_sh + b.torso_len * 0.8 * k
            if view == "back":
                d.polygon(self.box(-sw * 0.38 * k, v0, sw * 0.38 * k, v1), fill=fill)
            elif view == "front":
                for side in (-1, 1):
                    us = side * sw * 0.28
                    d.polygon(self.box(us - 0.018, self.v_sh - 0.004, us + 0.018, self.v_sh + b.torso_len * 0.55), fill=fill)
            else:
                d.polygon(self.box(-sw / 2 - 0.075 * k, v0, -sw / 2 + 0.02, v1), fill=fill)
        elif kind in ("bag_left", "bag_right"):
            side = -1 if kind == "bag_left" else 1
            hw = b.hip_w * self.wf
            bu = 0.0 if view == "side" else side * (hw / 2 + 0.045)
            bv = self.v_hip - 0.01
            if view != "side":
                strap = [(-side * sw * 0.4, self.v_sh), (bu, bv - 0.05)]
                d.line(self.poly(strap), fill=fill, width=max(1, round(0.014 * self.shot.stature)))
            d.polygon(self.box(bu - 0.055 * k, bv - 0.05 * k, bu + 0.055 * k, bv + 0.045 * k), fill=fill)
        elif kind in ("hand_left", "hand_right"):
            hu, hv = self.hand_point(-1 if kind == "hand_left" else 1)
            d.polygon(self.box(hu - 0.05 * k, hv, hu + 0.05 * k, hv + 0.11 * k), fill=fill)

    def paint(self) -> None:
        side_view = self.shot.view == "side"
        self.hair_back(over_torso=False)
        if side_view:
            self.arm(-1, self.shot.arms[0])  # far arm, hidden behind the torso in part
        self.legs()
        self.torso()
        if side_view:
            self.arm(1, self.shot.arms[1])
        else:
            self.arm(-1, self.shot.arms[0])
            self.arm(1, self.shot.arms[1])
        self.hair_back(over_torso=True)
        self.head()
        self.carry()


def _occluder(canvas: _Canvas, scene: str, rng: np.random.Generator) -> None:
    """Sometimes something stands between camera and person (pole, passer-by, bench)."""
    w, h = canvas.size
    present = rng.random() < 0.2
    kind = int(rng.integers(0, 3))
    a, b_ = rng.uniform(0.0, 1.0, size=2)
    lo, hi = _IR_SCENE_LEVEL[scene]
    color = _muted(rng, 0.05 if scene == "night" else 0.2, 0.35 if scene == "night" else 0.85, 0.3)
    fill = canvas.raw(color, rng.uniform(lo, hi + 0.1))
    if not present:
        return
    if kind == 0:  # pole
        x = a * w
        canvas.draw.rectangle((x, 0, x + w * (0.05 + 0.1 * b_), h), fill=fill)
    elif kind == 1:  # block entering from one side
        cover = w * (0.15 + 0.2 * b_)
        x0, x1 = (0.0, cover) if a < 0.5 else (w - cover, float(w))
        canvas.draw.rectangle((x0, h * 0.3 * b_, x1, h), fill=fill)
    else:  # low block covering the feet/legs
        canvas.draw.rectangle((0, h * (1.0 - 0.15 - 0.2 * b_), w, h), fill=fill)


def render_image(identity: IdentityAppearance, camera: CameraProfile, rng: np.random.Generator) -> Image.Image:
    """One crop of this person seen by this camera.

    Mode "RGB" always; on infrared cameras the three channels are equal (single-channel
    intensity stored as 3 channels, as real SYSU IR JPEGs). Pixels depend only on
    ``(identity, camera, rng state)``.
    """
    infrared = camera.modality == "infrared"
    shot = _sample_shot(camera, rng)
    canvas = _Canvas(shot.out_w, shot.out_h, infrared)
    _background(canvas, camera.scene, rng)
    _Person(identity, shot, canvas).paint()
    _occluder(canvas, camera.scene, rng)

    img = canvas.img
    if shot.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    radius = camera.blur * shot.blur
    if radius > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    # tint, contrast and brightness fused into one per-channel affine map (one pass over pixels).
    contrast = camera.contrast * shot.contrast
    gain = np.full(1 if infrared else 3, contrast / 255.0, np.float32)
    if not infrared:
        gain *= np.asarray(shot.tint, np.float32)  # illumination colour / exposure
    offset = np.float32(0.5 - 0.5 * contrast + camera.brightness + shot.brightness)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr.reshape(*arr.shape[:2], -1) * gain + offset
    if camera.noise_std > 0:
        noise = rng.standard_normal(arr.shape, dtype=np.float32)
        noise *= np.float32(camera.noise_std)
        arr += noise
    np.clip(arr * np.float32(255.0) + np.float32(0.5), 0.0, 255.0, out=arr)
    out = arr.astype(np.uint8)
    if infrared:
        out = np.repeat(out, 3, axis=2)
    return Image.fromarray(out, "RGB")
