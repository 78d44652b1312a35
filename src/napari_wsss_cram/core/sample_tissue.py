"""Deterministic synthetic H&E-like tissue with exact pixel truth (the project's own sample data).

Real patient data cannot ship with the project, so this draws lung-adenocarcinoma-like tissue at roughly
WSSS4LUAD scale (40x, ~0.25 µm/px, nuclei 8-16 px):

- tumor (0): crowded large dark-purple nuclei in gland-like epithelial sheets around white lumens;
- stroma (1): pink fibrous bands with sparse elongated nuclei and a few lymphocyte clusters;
- normal lung (2): thin pink alveolar walls with small nuclei and red blood cells around large air spaces;
- background (3): white glass, and every white pixel inside tissue (lumens, air spaces).

Everything is a pure function of the *global* pixel position and the seed (hashed lattice noise, jittered
cell nuclei), so any region renders identically on its own: big slides are generated tile by tile in
bounded memory and streamed to a pyramidal OME-TIFF. Colours come from optical densities measured on the
real WSSS4LUAD validation images (nuclei OD ~ (1.25, 1.9, 0.9), stroma OD ~ (0.25, 0.78, 0.38)) mixed with
Beer-Lambert, so hue and darkness match real H&E.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

TUMOR, STROMA, NORMAL, BACKGROUND = 0, 1, 2, 3

#: Optical density per unit concentration (R, G, B), measured on real WSSS4LUAD images.
OD_GLASS = np.array([0.05, 0.09, 0.07], np.float32)
OD_HEMATOXYLIN = np.array([1.25, 1.90, 0.90], np.float32)
OD_EOSIN = np.array([0.13, 0.80, 0.36], np.float32)
OD_BLOOD = np.array([0.12, 1.25, 0.80], np.float32)

_MARGIN = 4  # rendering halo, so the final blur sees the same neighbours in every tile


# ---------------------------------------------------------------------------- hashing and noise
def _salt(*parts: int) -> int:
    h = 0x811C9DC5
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 0x01000193) & 0xFFFFFFFF
        h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    return h


def _hash2(iy: np.ndarray, ix: np.ndarray, salt: int) -> np.ndarray:
    """uint32 hash of integer lattice coordinates (broadcasting)."""
    with np.errstate(over="ignore"):
        h = (iy.astype(np.int64).astype(np.uint32) * np.uint32(0x9E3779B1)) ^ \
            (ix.astype(np.int64).astype(np.uint32) * np.uint32(0x85EBCA77)) ^ np.uint32(salt)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x2C1B3C6D)
        h ^= h >> np.uint32(12)
        h *= np.uint32(0x297A2D39)
        h ^= h >> np.uint32(15)
    return h


def _lattice(iy0: int, ix0: int, ny: int, nx: int, salt: int) -> np.ndarray:
    """Uniform [0, 1) values on lattice rows iy0.. and columns ix0.. ."""
    iy = np.arange(iy0, iy0 + ny)[:, None]
    ix = np.arange(ix0, ix0 + nx)[None, :]
    return (_hash2(iy, ix, salt) >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)


def _interp_weights(start: int, n: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Lattice node left of each pixel centre start..start+n, and the smoothstep weight of the node right of it."""
    g = (np.arange(start, start + n, dtype=np.float64) + 0.5) / scale
    i = np.floor(g).astype(np.int64)
    f = (g - i).astype(np.float32)
    return i, f * f * (3 - 2 * f)


def value_noise(y0: int, x0: int, h: int, w: int, scale: float, salt: int) -> np.ndarray:
    """Smooth value noise in [0, 1] with features of ``scale`` px, a pure function of global position.

    Separable smoothstep interpolation of hashed lattice values: two gathers (O(h w)). Dense interpolation
    matrices cost O(h w^2 / scale^2), a minute for the 4096 px sample slide that napari users wait for.
    """
    iy, fy = _interp_weights(y0, h, scale)
    ix, fx = _interp_weights(x0, w, scale)
    ly, lx = int(iy[0]), int(ix[0])
    lat = _lattice(ly, lx, int(iy[-1]) - ly + 2, int(ix[-1]) - lx + 2, salt)
    iy, ix = iy - ly, ix - lx
    fy = fy[:, None]
    rows = lat[iy] * (1 - fy) + lat[iy + 1] * fy
    return rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx


def noise_1d(t: np.ndarray, salt: int) -> np.ndarray:
    """Smooth 1-D value noise of a float field (unit feature size): fibres of random spacing and strength."""
    i = np.floor(t)
    f = (t - i).astype(np.float32)
    f = f * f * (3 - 2 * f)
    ii = i.astype(np.int64)
    zero = np.zeros(1, np.int64)
    a = (_hash2(ii, zero, salt) >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)
    b = (_hash2(ii + 1, zero, salt) >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)
    return a + (b - a) * f


def fbm(y0: int, x0: int, h: int, w: int, scale: float, salt: int, octaves: int = 3) -> np.ndarray:
    """Fractal value noise (octaves halving in scale), normalised to [0, 1]."""
    total = np.zeros((h, w), np.float32)
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        total += np.float32(amp) * value_noise(y0, x0, h, w, scale / 2 ** o, _salt(salt, o))
        norm += amp
        amp *= 0.5
    return total / np.float32(norm)


@dataclass(frozen=True)
class _CellParams:
    cell: int
    density: float
    radius: tuple[float, float]     # semi-major axis range, px
    elong: tuple[float, float]      # major / minor ratio range
    dark: tuple[float, float]       # hematoxylin concentration range
    jitter: float = 0.8


class _CellGrid:
    """Pixels of a region grouped by lattice cell: arrays of shape (ny, c, nx, c) with no gathers.

    Lattice parameters of the cell at offset (dy, dx) are plain slices broadcast over the cell's pixels.
    """

    def __init__(self, y0: int, x0: int, h: int, w: int, cell: int) -> None:
        self.y0, self.x0, self.h, self.w, self.c = y0, x0, h, w, cell
        self.cy0, self.cx0 = y0 // cell, x0 // cell
        self.ny = (y0 + h - 1) // cell - self.cy0 + 1
        self.nx = (x0 + w - 1) // cell - self.cx0 + 1
        c = cell
        self.ys = ((self.cy0 + np.arange(self.ny))[:, None, None, None] * c
                   + np.arange(c)[None, :, None, None]).astype(np.float32) + 0.5
        self.xs = ((self.cx0 + np.arange(self.nx))[None, None, :, None] * c
                   + np.arange(c)[None, None, None, :]).astype(np.float32) + 0.5

    def lattice(self, salt: int) -> np.ndarray:
        """Uniform values for cells (cy0-1 .. cy0+ny, cx0-1 .. cx0+nx): one ring of neighbours."""
        return _lattice(self.cy0 - 1, self.cx0 - 1, self.ny + 2, self.nx + 2, salt)

    def shifted(self, lattice: np.ndarray, dy: int, dx: int) -> np.ndarray:
        """The value of the neighbour cell (dy, dx), shaped (ny, 1, nx, 1) to broadcast over pixels."""
        sub = lattice[1 + dy: 1 + dy + self.ny, 1 + dx: 1 + dx + self.nx]
        return sub[:, None, :, None]

    def centres(self, salt: int, jitter: float) -> tuple[np.ndarray, np.ndarray]:
        jit = (1 - jitter) / 2
        rows = np.arange(self.cy0 - 1, self.cy0 + self.ny + 1, dtype=np.float32)[:, None]
        cols = np.arange(self.cx0 - 1, self.cx0 + self.nx + 1, dtype=np.float32)[None, :]
        cy = (rows + jit + jitter * self.lattice(_salt(salt, 0))) * self.c
        cx = (cols + jit + jitter * self.lattice(_salt(salt, 1))) * self.c
        return cy, cx

    def to_blocks(self, image: np.ndarray) -> np.ndarray:
        """A (h, w) array of the region, edge-padded to the cell-aligned area, as (ny, c, 1|nx, c)."""
        top, left = self.y0 - self.cy0 * self.c, self.x0 - self.cx0 * self.c
        bottom = self.ny * self.c - self.h - top
        right = self.nx * self.c - self.w - left
        padded = np.pad(image, ((top, bottom), (left, right)), mode="edge")
        return padded.reshape(self.ny, self.c, self.nx, self.c)

    def crop(self, blocks: np.ndarray) -> np.ndarray:
        top, left = self.y0 - self.cy0 * self.c, self.x0 - self.cx0 * self.c
        full = blocks.reshape(self.ny * self.c, self.nx * self.c)
        return full[top: top + self.h, left: left + self.w]


def _nuclei(y0: int, x0: int, h: int, w: int, p: _CellParams, salt: int,
            angle: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Jittered-grid elliptic nuclei: (coverage alpha, darkness, normalised radial distance) per pixel.

    Each lattice cell holds at most one nucleus whose parameters are hashed from the cell index, so
    nuclei straddling tile borders are identical in both tiles. ``angle`` (h, w) orients them (fibres).
    """
    g = _CellGrid(y0, x0, h, w, p.cell)
    lat_y, lat_x = g.centres(salt, p.jitter)
    present = g.lattice(_salt(salt, 2)) < p.density
    a = p.radius[0] + (p.radius[1] - p.radius[0]) * g.lattice(_salt(salt, 3))
    b = a / (p.elong[0] + (p.elong[1] - p.elong[0]) * g.lattice(_salt(salt, 4)))
    theta = g.lattice(_salt(salt, 5)) * np.float32(np.pi)
    cos_l, sin_l = np.cos(theta), np.sin(theta)
    dark = p.dark[0] + (p.dark[1] - p.dark[0]) * g.lattice(_salt(salt, 6))
    inv_a2 = (1.0 / (a * a)).astype(np.float32)
    inv_b2 = (1.0 / (b * b)).astype(np.float32)
    absent = np.where(present, 0.0, 1e9).astype(np.float32)  # pushes empty cells out of reach
    if angle is not None:
        cos_p, sin_p = g.to_blocks(np.cos(angle)), g.to_blocks(np.sin(angle))
    shape = (g.ny, p.cell, g.nx, p.cell)
    best = np.full(shape, np.inf, np.float32)
    best_dark = np.zeros(shape, np.float32)
    best_b = np.ones(shape, np.float32)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            vy = g.ys - g.shifted(lat_y, dy, dx)
            vx = g.xs - g.shifted(lat_x, dy, dx)
            if angle is None:
                ct, st = g.shifted(cos_l, dy, dx), g.shifted(sin_l, dy, dx)
            else:
                ct, st = cos_p, sin_p
            u = vx * ct + vy * st
            v = vy * ct - vx * st
            d = u * u * g.shifted(inv_a2, dy, dx) + v * v * g.shifted(inv_b2, dy, dx) \
                + g.shifted(absent, dy, dx)
            closer = d < best
            np.copyto(best, d, where=closer)
            np.copyto(best_dark, np.broadcast_to(g.shifted(dark, dy, dx), shape), where=closer)
            np.copyto(best_b, np.broadcast_to(g.shifted(b, dy, dx), shape), where=closer)
    radial = np.sqrt(np.minimum(g.crop(best), 4.0))
    alpha = np.clip((1.0 - radial) * g.crop(best_b) + 0.5, 0.0, 1.0)  # ~1 px soft edge
    return alpha, g.crop(best_dark), radial


def _worley(y0: int, x0: int, h: int, w: int, cell: int, salt: int,
            warp: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distances to the nearest and second-nearest jittered cell points (alveoli), optionally with
    the pixel positions displaced by ``warp`` (dy, dx) so the walls curve."""
    g = _CellGrid(y0, x0, h, w, cell)
    lat_y, lat_x = g.centres(salt, 0.8)
    ys, xs = g.ys, g.xs
    if warp is not None:
        ys, xs = ys + g.to_blocks(warp[0]), xs + g.to_blocks(warp[1])
    shape = (g.ny, cell, g.nx, cell)
    f1 = np.full(shape, np.inf, np.float32)
    f2 = np.full(shape, np.inf, np.float32)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            d = np.hypot(ys - g.shifted(lat_y, dy, dx), xs - g.shifted(lat_x, dy, dx))
            f2 = np.where(d < f1, f1, np.minimum(f2, d))
            f1 = np.minimum(f1, d)
    return g.crop(f1), g.crop(f2)


# ---------------------------------------------------------------------------- tissue renderers
# Each returns stain concentrations (hematoxylin, eosin, blood) and a tissue mask for a region.
Stains = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


#: Gland field thresholds: lumen above, epithelium between, fibrous septa (stroma) below.
_LUMEN, _SEPTA = 0.60, 0.36


def _gland(y0: int, x0: int, h: int, w: int, salt: int) -> np.ndarray:
    """Gland-forming field of the tumor: lumens are its peaks, epithelium rings them, stroma in the troughs."""
    gland = fbm(y0, x0, h, w, 46.0, _salt(salt, 1), octaves=3)
    gland += 0.06 * value_noise(y0, x0, h, w, 7.0, _salt(salt, 2))
    return gland


@functools.lru_cache(maxsize=2)
def _gland_swatch(salt: int, period: int) -> np.ndarray:
    return _gland(0, 0, period, period, salt)


def _tumor(y0: int, x0: int, h: int, w: int, salt: int) -> Stains:
    gland = _gland(y0, x0, h, w, salt)
    lumen = gland > _LUMEN
    near = np.clip(1.0 - np.abs(gland - _LUMEN) / 0.10, 0, 1)  # apical rim around lumens
    hem = 0.14 + 0.10 * value_noise(y0, x0, h, w, 9.0, _salt(salt, 3))
    eos = 0.45 + 0.30 * value_noise(y0, x0, h, w, 5.0, _salt(salt, 4)) - 0.2 * near
    gy, gx = np.gradient(gland)
    towards_lumen = np.arctan2(gy, gx).astype(np.float32)  # columnar cells point at the lumen
    alpha, dark, radial = _nuclei(y0, x0, h, w, _CellParams(11, 0.8, (4.5, 7.0), (1.3, 2.0), (0.8, 1.2)),
                                  _salt(salt, 5), angle=towards_lumen)
    chromatin = 0.75 + 0.5 * value_noise(y0, x0, h, w, 2.2, _salt(salt, 6))
    vesicular = 0.7 + 0.3 * radial  # paler centres, darker membrane: large atypical nuclei
    alpha = alpha * ~lumen
    hem = hem * (1 - alpha) + alpha * dark * chromatin * vesicular
    eos = np.where(lumen, 0.03, eos * (1 - 0.6 * alpha))
    hem = np.where(lumen, 0.0, hem)
    return hem, eos, np.zeros_like(hem), ~lumen


def _fibre_field(y0: int, x0: int, h: int, w: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """Stream function of wavy parallel fibres and the local fibre direction."""
    phi = 2 * np.pi * _lattice(0, 0, 1, 1, _salt(salt, 1))[0, 0]
    ys = np.arange(y0, y0 + h, dtype=np.float64)[:, None]
    xs = np.arange(x0, x0 + w, dtype=np.float64)[None, :]
    psi = xs * np.cos(phi) + ys * np.sin(phi) + 90.0 * fbm(y0, x0, h, w, 140.0, _salt(salt, 2), octaves=2)
    gy, gx = np.gradient(psi)
    direction = (np.arctan2(gy, gx) + np.pi / 2).astype(np.float32)  # fibres run along iso-lines of psi
    return psi, direction


def _stroma(y0: int, x0: int, h: int, w: int, salt: int) -> Stains:
    psi, direction = _fibre_field(y0, x0, h, w, salt)
    warp = 3.0 * value_noise(y0, x0, h, w, 16.0, _salt(salt, 3))
    # Intensity as random 1-D noise across the fibre direction: bundles of irregular width and strength.
    streak = noise_1d(psi / 5.0 + warp, _salt(salt, 10))
    fine = noise_1d(psi / 2.5 + 2.0 * warp, _salt(salt, 11))
    density = 0.55 + 0.6 * fbm(y0, x0, h, w, 40.0, _salt(salt, 4), octaves=2)
    eos = (0.40 + 1.1 * (0.6 * streak + 0.4 * fine) ** 1.5) * density
    gaps = fbm(y0, x0, h, w, 26.0, _salt(salt, 5), octaves=2)
    eos = eos * np.clip(1.0 - (gaps - 0.62) * 4.0, 0.25, 1.0)
    clefts = noise_1d(psi / 11.0 + 1.5 * warp, _salt(salt, 12))  # thin pale cracks between bundles
    eos = eos * np.clip((clefts - 0.05) * 12.0, 0.3, 1.0)
    hem = 0.05 + 0.03 * streak
    fib_a, fib_d, _ = _nuclei(y0, x0, h, w, _CellParams(24, 0.35, (6.0, 9.0), (2.8, 4.0), (0.9, 1.3)),
                              _salt(salt, 6), angle=direction)
    lymph_zone = value_noise(y0, x0, h, w, 90.0, _salt(salt, 7)) > 0.7
    ly_a, ly_d, _ = _nuclei(y0, x0, h, w, _CellParams(12, 0.55, (3.5, 4.8), (1.0, 1.2), (1.3, 1.7)),
                            _salt(salt, 8))
    ly_a = ly_a * lymph_zone
    alpha = np.maximum(fib_a, ly_a)
    dark = np.where(ly_a > fib_a, ly_d, fib_d)
    hem = hem * (1 - alpha) + alpha * dark
    eos = eos * (1 - 0.5 * alpha)
    return hem, eos, np.zeros_like(hem), np.ones((h, w), bool)


def _normal(y0: int, x0: int, h: int, w: int, salt: int) -> Stains:
    warp = (12.0 * (value_noise(y0, x0, h, w, 45.0, _salt(salt, 7)) - 0.5),
            12.0 * (value_noise(y0, x0, h, w, 45.0, _salt(salt, 8)) - 0.5))
    f1, f2 = _worley(y0, x0, h, w, 70, _salt(salt, 1), warp)
    thickness = 2.5 + 5.5 * fbm(y0, x0, h, w, 35.0, _salt(salt, 2), octaves=2)
    wall = np.clip((thickness - (f2 - f1)) / 1.5, 0, 1)
    eos = wall * (0.45 + 0.35 * value_noise(y0, x0, h, w, 6.0, _salt(salt, 3)))
    hem = wall * 0.05
    alpha, dark, _ = _nuclei(y0, x0, h, w, _CellParams(16, 0.6, (3.5, 6.0), (1.0, 2.2), (1.0, 1.4)),
                             _salt(salt, 4))
    alpha = alpha * np.clip((thickness + 4.0 - (f2 - f1)) / 2.0, 0, 1)  # nuclei sit on the walls
    blood_zone = value_noise(y0, x0, h, w, 60.0, _salt(salt, 5)) > 0.66
    rbc, _, rbc_r = _nuclei(y0, x0, h, w, _CellParams(9, 0.35, (3.0, 3.8), (1.0, 1.15), (1.0, 1.0)),
                            _salt(salt, 6))
    rbc = rbc * blood_zone * (1 - alpha)
    blood = rbc * (0.55 + 0.45 * rbc_r)  # biconcave: paler centre
    hem = hem * (1 - alpha) + alpha * dark
    eos = eos * (1 - alpha) * (1 - rbc)
    tissue = (wall > 0.35) | (alpha > 0.5) | (rbc > 0.5)
    return hem, eos, blood, tissue


_RENDERERS = {TUMOR: _tumor, STROMA: _stroma, NORMAL: _normal}


# ---------------------------------------------------------------------------- layout and rendering
@dataclass(frozen=True)
class TissueLayout:
    """Where each class lies: smooth random class scores, argmax, plus fine noise for ragged borders.

    ``bias`` adds to the (tumor, stroma, normal, background) scores; ``slide_radius`` > 0 fades tissue
    out towards the corners of a ``slide_size`` square, like a tissue section on glass.
    """

    seed: int
    region_scale: float = 150.0
    bias: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    slide_size: int = 0
    slide_radius: float = 0.0
    #: When set, each class's texture repeats with this period (rendered once, then copied): ~3x faster
    #: for the 16k-32k benchmark slides, with faint seams every ``texture_period`` px.
    texture_period: int | None = None

    def class_map(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        scores = np.empty((4, h, w), np.float32)
        for k in range(4):
            s = fbm(y0, x0, h, w, self.region_scale, _salt(self.seed, 100 + k), octaves=3)
            s += 0.12 * value_noise(y0, x0, h, w, 9.0, _salt(self.seed, 200 + k))
            scores[k] = s + self.bias[k]
        if self.slide_radius > 0:
            c = self.slide_size / 2.0
            ry = (np.arange(y0, y0 + h, dtype=np.float32)[:, None] - c) / self.slide_radius
            rx = (np.arange(x0, x0 + w, dtype=np.float32)[None, :] - c) / self.slide_radius
            scores[BACKGROUND] += 1.5 * np.clip(np.hypot(ry, rx) - 0.8, 0, None)
        return scores.argmax(0).astype(np.uint8)


@functools.lru_cache(maxsize=6)
def _swatch(salt: int, k: int, period: int) -> Stains:
    return _RENDERERS[k](0, 0, period, period, salt)


def _periodic_texture(salt: int, k: int, period: int, y0: int, x0: int, h: int, w: int) -> Stains:
    swatch = _swatch(salt, k, period)
    sel = np.ix_(np.arange(y0, y0 + h) % period, np.arange(x0, x0 + w) % period)
    return tuple(a[sel] for a in swatch)  # type: ignore[return-value]


def render_region(layout: TissueLayout, y0: int, x0: int, h: int, w: int,
                  posterize: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Render ``uint8 (h, w, 3)`` RGB and its ``uint8 (h, w)`` truth (0 tumor .. 3 background) at (y0, x0).

    A pure function of the layout and the region: adjacent regions join seamlessly.
    ``posterize`` > 1 rounds colours to multiples of it (PNGs ~2x smaller; hardly visible up to 8).
    """
    m = _MARGIN
    Y, X, H, W = y0 - m, x0 - m, h + 2 * m, w + 2 * m
    classes = layout.class_map(Y, X, H, W)
    tumor = classes == TUMOR
    if tumor.any():  # fibrous septa between glands are stroma, in truth and in look
        salt = _salt(layout.seed, TUMOR)
        if layout.texture_period:
            period = layout.texture_period
            sel = np.ix_(np.arange(Y, Y + H) % period, np.arange(X, X + W) % period)
            gland = _gland_swatch(salt, period)[sel]
        else:
            gland = _gland(Y, X, H, W, salt)
        classes[tumor & (gland < _SEPTA)] = STROMA
    hem = np.zeros((H, W), np.float32)
    eos = np.zeros((H, W), np.float32)
    blood = np.zeros((H, W), np.float32)
    tissue = np.zeros((H, W), bool)
    for k, render in _RENDERERS.items():
        where = classes == k
        if not where.any():
            continue
        if layout.texture_period:
            kh, ke, kb, kt = _periodic_texture(_salt(layout.seed, k), k, layout.texture_period, Y, X, H, W)
        else:
            kh, ke, kb, kt = render(Y, X, H, W, _salt(layout.seed, k))
        hem[where], eos[where], blood[where], tissue[where] = kh[where], ke[where], kb[where], kt[where]
    hem = ndimage.gaussian_filter(hem, 0.7)
    eos = ndimage.gaussian_filter(eos, 0.7)
    blood = ndimage.gaussian_filter(blood, 0.7)
    grain = 0.06 * (value_noise(Y, X, H, W, 1.3, _salt(layout.seed, 900)) - 0.5)
    od = (OD_GLASS[:, None, None] + OD_HEMATOXYLIN[:, None, None] * hem + OD_EOSIN[:, None, None] * eos
          + OD_BLOOD[:, None, None] * blood) * (1.0 + grain)
    rgb = np.clip(255.0 * np.exp(-od), 0, 255)
    if posterize > 1:
        rgb = np.round(rgb / posterize) * posterize
    rgb = np.clip(rgb, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    labels = np.where(tissue, classes, BACKGROUND).astype(np.uint8)
    return np.ascontiguousarray(rgb[m:-m, m:-m]), np.ascontiguousarray(labels[m:-m, m:-m])


# ---------------------------------------------------------------------------- patches
#: Class sets drawn for patches (tumor, stroma, normal), roughly WSSS4LUAD-like: mixtures are common.
_PATCH_MIXES: tuple[tuple[tuple[int, ...], float], ...] = (
    ((TUMOR, STROMA), 0.30), ((TUMOR,), 0.14), ((STROMA,), 0.14), ((NORMAL,), 0.10),
    ((STROMA, NORMAL), 0.12), ((TUMOR, NORMAL), 0.05), ((TUMOR, STROMA, NORMAL), 0.15),
)


def image_labels(mask: np.ndarray, min_fraction: float = 0.05, num_classes: int = 3) -> list[int]:
    """WSSS4LUAD protocol: 1 for each tissue class covering >= ``min_fraction`` of the tissue pixels."""
    counts = np.bincount(mask.ravel(), minlength=256)[:num_classes].astype(np.float64)
    tissue = counts.sum()
    if tissue == 0:
        return [0] * num_classes
    return [int(c / tissue >= min_fraction) for c in counts]


def make_patch(seed: int, size: int | tuple[int, int] = 224,
               classes_present: tuple[int, ...] | None = None, posterize: int = 1,
               ) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic patch ``(rgb, mask)``; ``classes_present`` biases the layout towards those classes."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(_salt(seed, 7))
    if classes_present is None:
        mixes, weights = zip(*_PATCH_MIXES, strict=True)
        classes_present = mixes[rng.choice(len(mixes), p=np.array(weights) / sum(weights))]
    bias = [(0.15 if k in classes_present else -0.6) + rng.normal(0, 0.04) for k in range(3)]
    bias.append(float(rng.uniform(-0.45, -0.1)))
    layout = TissueLayout(seed=_salt(seed, 11), region_scale=float(rng.uniform(110, 190)), bias=tuple(bias))
    oy, ox = (int(v) for v in rng.integers(0, 1 << 20, 2))  # a random place in the endless layout
    return render_region(layout, oy, ox, h, w, posterize=posterize)


def patch_name(index: int, labels: list[int], prefix: str = "sample") -> str:
    """WSSS4LUAD training naming: ``sample0001-[1, 0, 1].png``."""
    return f"{prefix}{index:04d}-[{', '.join(str(v) for v in labels)}].png"


# ---------------------------------------------------------------------------- slide
