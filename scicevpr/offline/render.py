"""Vectorised street-view renderer behind the synthetic benchmark (numpy only, no GPU).

World model
-----------
A *street* is a straight line in UTM with a road, sidewalks and a continuous row of buildings on
each side (facade planes at ``x = +half_width_left`` and ``x = -half_width_right`` in street
coordinates: ``u`` along the street, ``x`` to its left). Buildings draw their look from a small
set of recurring *facade styles* and from a bank of *template runs* (identical groups of
buildings, chain shops included) that reappear at distant places: the perceptual aliasing of
real cities. What makes a place unique is the sequence: building widths and heights, signs (colour,
shape, glyph pattern), awnings, trees, lamp posts, crosswalks, road markings.

Camera
------
A pinhole camera at height ``CAMERA_HEIGHT`` at ``(u, x)``, looking along the street rotated by
``yaw`` (radians, 0 = towards +u), pitched by ``pitch`` (small angles, modelled as a shift of the
principal point). Walls and ground are ray-cast per column / per pixel; trees, lamps, vehicles and
pedestrians are depth-tested billboards.

Conditions
----------
``day``, ``dusk``, ``night`` (dark sky, lit windows/signs/lamps), ``fog`` (depth-dependent blend),
``rain`` (dark, wet, streaks), ``snow`` (white ground, bare trees, flakes), ``autumn`` (foliage
colour, low sun). Every image also draws its own sun position, exposure, white balance, window
lighting, clouds and occluders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

CONDITIONS = ("day", "dusk", "night", "fog", "rain", "snow", "autumn")

CAMERA_HEIGHT = 2.5  # m, a car-mounted camera
MAX_DISTANCE = 220.0  # m; beyond this the scene is horizon haze
STREET_MARGIN = 240.0  # m of buildings beyond both street ends, so views never run out of city
FOV_DEG = 80.0  # horizontal field of view


# ----------------------------------------------------------------------------------------------
# deterministic hashing (pattern details that must not depend on the RNG call order)
# ----------------------------------------------------------------------------------------------
def hash01(*keys) -> np.ndarray:
    """Vectorised integer hash of broadcastable int arrays -> float32 in [0, 1)."""
    with np.errstate(over="ignore"):
        h = np.uint32(2166136261)
        for k in keys:
            k = np.asarray(k).astype(np.int64).astype(np.uint32)
            h = (h ^ k) * np.uint32(16777619)
            h = h ^ (h >> np.uint32(15))
            h = h * np.uint32(2246822519)
            h = h ^ (h >> np.uint32(13))
    return (np.asarray(h) >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


# ----------------------------------------------------------------------------------------------
# world description
# ----------------------------------------------------------------------------------------------
WALL_PALETTE = np.array(
    [
        [0.80, 0.74, 0.62], [0.62, 0.30, 0.22], [0.72, 0.72, 0.70], [0.90, 0.88, 0.82],
        [0.55, 0.42, 0.32], [0.68, 0.76, 0.80], [0.82, 0.78, 0.52], [0.60, 0.68, 0.58],
        [0.45, 0.45, 0.48], [0.86, 0.64, 0.54], [0.74, 0.56, 0.40], [0.92, 0.84, 0.70],
    ],
    dtype=np.float32,
)
GLASS_PALETTE = np.array(
    [[0.20, 0.25, 0.30], [0.30, 0.38, 0.45], [0.15, 0.17, 0.20], [0.35, 0.40, 0.42], [0.22, 0.30, 0.28]],
    dtype=np.float32,
)

# Columns of a building table (one entry per building); colours are (n, 3).
_BUILDING_FIELDS = (
    "width", "gap", "height", "style", "wall", "trim", "glass", "floor_h", "spacing", "win_w", "win_h",
    "texture", "shop", "awning_on", "awning", "door", "sign_on", "sign_u0", "sign_w", "sign_z0", "sign_h",
    "sign_col", "sign_ink", "sign_seed", "ident",
)


@dataclass
class FacadeStyle:
    """A facade style recurring across the world (perceptual aliasing)."""

    wall: np.ndarray
    trim: np.ndarray
    glass: np.ndarray
    floor_h: float
    spacing: float
    win_w: float  # window width as a fraction of the column spacing
    win_h: float  # window height as a fraction of the floor height
    texture: int  # 0 plain, 1 brick courses, 2 vertical panels
    shop: bool  # ground-floor shop front


def make_styles(rng: np.random.Generator, n: int) -> list[FacadeStyle]:
    styles = []
    for k in range(n):
        wall = WALL_PALETTE[k % len(WALL_PALETTE)] * rng.uniform(0.92, 1.06) + rng.normal(0, 0.02, 3)
        trim = np.clip(wall * rng.choice([0.6, 0.75, 1.25]) + rng.normal(0, 0.02, 3), 0, 1)
        styles.append(
            FacadeStyle(
                wall=np.clip(wall, 0, 1).astype(np.float32),
                trim=trim.astype(np.float32),
                glass=GLASS_PALETTE[rng.integers(len(GLASS_PALETTE))],
                floor_h=float(rng.uniform(2.9, 3.8)),
                spacing=float(rng.uniform(1.8, 3.4)),
                win_w=float(rng.uniform(0.35, 0.7)),
                win_h=float(rng.uniform(0.4, 0.68)),
                texture=int(rng.integers(3)),
                shop=bool(rng.random() < 0.6),
            )
        )
    return styles


def _saturated_colour(rng: np.random.Generator) -> np.ndarray:
    hue = rng.random()
    h6 = hue * 6.0
    x = 1 - abs(h6 % 2 - 1)
    rgb = [(1, x, 0), (x, 1, 0), (0, 1, x), (0, x, 1), (x, 0, 1), (1, 0, x)][int(h6) % 6]
    v, s = rng.uniform(0.55, 0.95), rng.uniform(0.6, 1.0)
    return np.array([v * (1 - s + s * c) for c in rgb], dtype=np.float32)


def random_building(rng: np.random.Generator, styles: list[FacadeStyle]) -> dict:
    """One building's parameters (a row of the building table)."""
    si = int(rng.integers(len(styles)))
    st = styles[si]
    width = float(rng.uniform(7.0, 22.0))
    floors = int(rng.integers(2, 8))
    d = {
        "width": width,
        "gap": float(rng.choice([0.0, 0.0, rng.uniform(1.0, 3.5)])),
        "height": floors * st.floor_h + float(rng.uniform(0.6, 1.6)),
        "style": si,
        "wall": np.clip(st.wall + rng.normal(0, 0.025, 3), 0, 1).astype(np.float32),
        "trim": st.trim,
        "glass": st.glass,
        "floor_h": st.floor_h,
        "spacing": st.spacing,
        "win_w": st.win_w,
        "win_h": st.win_h,
        "texture": st.texture,
        "shop": st.shop,
        "awning_on": bool(st.shop and rng.random() < 0.55),
        "awning": _saturated_colour(rng),
        "door": float(rng.uniform(1.0, max(1.1, width - 1.0))),
        "sign_on": bool(rng.random() < 0.65),
        "sign_col": _saturated_colour(rng),
        "sign_ink": np.array([0.97, 0.97, 0.95] if rng.random() < 0.6 else [0.05, 0.05, 0.08], dtype=np.float32),
        "sign_seed": int(rng.integers(1 << 30)),
    }
    # Signs: a fascia above the shop front, or a tall blade sign higher up.
    if rng.random() < 0.65:
        sw = float(rng.uniform(2.5, min(10.0, width - 0.6)))
        d.update(sign_w=sw, sign_u0=float(rng.uniform(0.3, width - sw - 0.3 + 1e-3)), sign_h=float(rng.uniform(0.7, 1.2)))
        d["sign_z0"] = st.floor_h - 0.05 - d["sign_h"] if st.shop else st.floor_h + 0.15
    else:
        sh = float(rng.uniform(2.5, 5.0))
        d.update(sign_w=float(rng.uniform(0.8, 1.3)), sign_u0=float(rng.uniform(0.3, width - 1.6)), sign_h=sh)
        d["sign_z0"] = float(min(st.floor_h + 0.4, max(0.5, d["height"] - sh - 0.8)))
    return d


def make_templates(rng: np.random.Generator, styles: list[FacadeStyle], n: int) -> list[list[dict]]:
    """Runs of 2-3 buildings that reappear verbatim at distant places (chain shops, estates)."""
    return [[random_building(rng, styles) for _ in range(int(rng.integers(2, 4)))] for _ in range(n)]


@dataclass
class BuildingTable:
    """Buildings along one side of a street as column arrays, ordered by ``start``."""

    start: np.ndarray  # (n,) along-street coordinate where each facade begins, m
    cols: dict  # field -> (n,) or (n, 3) array

    @staticmethod
    def from_list(start: float, buildings: list[dict], ident0: int) -> BuildingTable:
        widths = np.array([b["width"] + b["gap"] for b in buildings])
        starts = start + np.concatenate([[0.0], np.cumsum(widths)[:-1]])
        cols = {}
        for k in _BUILDING_FIELDS:
            if k == "ident":
                cols[k] = np.arange(ident0, ident0 + len(buildings), dtype=np.int64)
            else:
                cols[k] = np.array([b[k] for b in buildings], dtype=np.float32 if not isinstance(buildings[0][k], (bool, np.bool_)) else bool)
        return BuildingTable(starts.astype(np.float64), cols)


@dataclass
class Street:
    """A straight street: geometry, buildings on both sides, street furniture."""

    street_id: int
    origin: np.ndarray  # (2,) UTM east, north of u = 0, x = 0
    angle: float  # direction of +u, radians counter-clockwise from east
    length: float  # m; cameras live in [0, length]
    half_width: tuple[float, float]  # (left, right) distance from centre line to the facades, m
    sidewalk: tuple[float, float]  # (left, right) sidewalk widths, m
    sides: tuple[BuildingTable, BuildingTable]  # (left, right)
    trees: dict  # u, side, radius, crown_z, conical, hue (n,)
    lamps: dict  # u, side, height (n,)
    crosswalks: np.ndarray  # (n,) u positions
    centre_line: int  # 0 dashed white, 1 double yellow, 2 none
    asphalt: np.ndarray = field(default_factory=lambda: np.array([0.3, 0.3, 0.32], dtype=np.float32))

    def utm(self, u, x) -> np.ndarray:
        """Street coordinates (u along, x to the left) -> UTM (..., 2) east/north."""
        u, x = np.asarray(u, dtype=np.float64), np.asarray(x, dtype=np.float64)
        c, s = math.cos(self.angle), math.sin(self.angle)
        return np.stack([self.origin[0] + u * c - x * s, self.origin[1] + u * s + x * c], axis=-1)

    def compass_heading(self, yaw: float) -> float:
        """Camera heading in degrees clockwise from north for a view with ``yaw`` (radians)."""
        return (90.0 - math.degrees(self.angle + yaw)) % 360.0


def make_street(
    rng: np.random.Generator,
    street_id: int,
    origin,
    angle: float,
    length: float,
    styles: list[FacadeStyle],
    templates: list[list[dict]],
    template_prob: float = 0.3,
) -> Street:
    hw = (float(rng.uniform(8.5, 12.5)), float(rng.uniform(8.5, 12.5)))
    sw = (float(rng.uniform(2.5, 4.0)), float(rng.uniform(2.5, 4.0)))
    u0, u1 = -STREET_MARGIN, length + STREET_MARGIN
    sides = []
    for side in range(2):
        buildings: list[dict] = []
        u = 0.0
        while u < u1 - u0:
            if templates and rng.random() < template_prob:
                run = templates[int(rng.integers(len(templates)))]
                buildings += [dict(b) for b in run]
                u += sum(b["width"] + b["gap"] for b in run)
            else:
                b = random_building(rng, styles)
                buildings.append(b)
                u += b["width"] + b["gap"]
        sides.append(BuildingTable.from_list(u0, buildings, ident0=street_id * 100_000 + side * 50_000))
    # Trees come in runs with gaps; lamps at a regular spacing per side.
    tu, ts = [], []
    for side in range(2):
        u = u0 + rng.uniform(0, 20)
        while u < u1:
            if rng.random() < 0.5:  # a run of trees
                n, step = int(rng.integers(2, 7)), rng.uniform(7, 12)
                for k in range(n):
                    tu.append(u + k * step + rng.uniform(-1, 1))
                    ts.append(side)
                u += n * step
            u += rng.uniform(15, 50)
    nt = len(tu)
    trees = {
        "u": np.array(tu, dtype=np.float64),
        "side": np.array(ts, dtype=np.int64),
        "radius": rng.uniform(1.5, 3.0, nt),
        "crown_z": rng.uniform(4.0, 6.5, nt),
        "conical": rng.random(nt) < 0.3,
        "hue": rng.random(nt),
    }
    lu, ls, lh = [], [], []
    for side in range(2):
        if rng.random() < 0.85:
            spacing = rng.uniform(22, 38)
            h = rng.uniform(5.5, 8.0)
            for u in np.arange(u0 + rng.uniform(0, spacing), u1, spacing):
                lu.append(u)
                ls.append(side)
                lh.append(h)
    lamps = {"u": np.array(lu, dtype=np.float64), "side": np.array(ls, dtype=np.int64), "height": np.array(lh)}
    crosswalks = np.sort(rng.uniform(u0, u1, int(rng.integers(2, 6))))
    return Street(
        street_id=street_id,
        origin=np.asarray(origin, dtype=np.float64),
        angle=float(angle),
        length=float(length),
        half_width=hw,
        sidewalk=sw,
        sides=(sides[0], sides[1]),
        trees=trees,
        lamps=lamps,
        crosswalks=crosswalks,
        centre_line=int(rng.integers(3)),
        asphalt=np.array([0.3, 0.3, 0.32], dtype=np.float32) * np.float32(rng.uniform(0.8, 1.15)),
    )


# ----------------------------------------------------------------------------------------------
# conditions
# ----------------------------------------------------------------------------------------------
@dataclass
class Lighting:
    """Per-image lighting and weather, drawn from a condition."""

    condition: str
    sun_az: float  # sun azimuth relative to the street (radians)
    sun_el: float  # sun elevation (radians)
    ambient: float
    sun: float
    light_col: np.ndarray
    sky_top: np.ndarray
    sky_horizon: np.ndarray
    clouds: float
    fog_dist: float  # m, e-folding distance of the haze
    fog_col: np.ndarray
    window_lit: float  # probability that a window is lit
    emissive: float  # strength of lit windows, signs, lamps
    lamps_on: bool
    wet: bool
    snow: bool
    foliage: str  # summer, autumn, bare
    precipitation: str  # none, rain, snow
    noise: float
    exposure: np.ndarray  # per-channel gain (white balance + exposure)
    saturation: float


def draw_lighting(condition: str, rng: np.random.Generator) -> Lighting:
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")
    c = lambda *v: np.array(v, dtype=np.float32)
    base = dict(
        condition=condition,
        sun_az=float(rng.uniform(0, 2 * math.pi)),
        sun_el=math.radians(rng.uniform(25, 60)),
        ambient=0.55,
        sun=0.55,
        light_col=c(1.0, 1.0, 1.0),
        sky_top=c(0.30, 0.50, 0.85),
        sky_horizon=c(0.72, 0.82, 0.95),
        clouds=float(rng.uniform(0.0, 0.7)),
        fog_dist=700.0,
        fog_col=c(0.75, 0.82, 0.92),
        window_lit=0.0,
        emissive=0.0,
        lamps_on=False,
        wet=False,
        snow=False,
        foliage="summer",
        precipitation="none",
        noise=0.012,
        exposure=(rng.uniform(0.92, 1.08) * (1 + rng.normal(0, 0.03, 3))).astype(np.float32),
        saturation=1.0,
    )
    if condition == "dusk":
        base.update(
            sun_el=math.radians(rng.uniform(1, 7)), ambient=0.32, sun=0.45, light_col=c(1.0, 0.68, 0.45),
            sky_top=c(0.22, 0.18, 0.42), sky_horizon=c(1.0, 0.55, 0.30), fog_dist=500.0, fog_col=c(0.75, 0.52, 0.45),
            window_lit=0.25, emissive=0.7, lamps_on=True, clouds=float(rng.uniform(0.0, 0.4)),
        )
    elif condition == "night":
        base.update(
            sun=0.0, ambient=float(rng.uniform(0.06, 0.1)), light_col=c(0.65, 0.72, 1.0), sky_top=c(0.01, 0.01, 0.035),
            sky_horizon=c(0.06, 0.055, 0.10), clouds=0.0, fog_dist=350.0, fog_col=c(0.05, 0.05, 0.08),
            window_lit=float(rng.uniform(0.25, 0.5)), emissive=1.0, lamps_on=True, noise=0.03,
        )
    elif condition == "fog":
        base.update(
            ambient=0.7, sun=0.08, sky_top=c(0.74, 0.75, 0.77), sky_horizon=c(0.78, 0.79, 0.80), clouds=0.0,
            fog_dist=float(rng.uniform(14, 32)), fog_col=c(0.76, 0.77, 0.79), saturation=0.7,
        )
    elif condition == "rain":
        base.update(
            ambient=0.42, sun=0.04, sky_top=c(0.38, 0.40, 0.44), sky_horizon=c(0.55, 0.57, 0.60), clouds=0.0,
            fog_dist=float(rng.uniform(70, 140)), fog_col=c(0.5, 0.52, 0.55), wet=True, precipitation="rain",
            saturation=0.65, window_lit=0.1, emissive=0.4, noise=0.02,
        )
    elif condition == "snow":
        base.update(
            ambient=0.72, sun=0.1, sky_top=c(0.72, 0.74, 0.78), sky_horizon=c(0.86, 0.87, 0.90), clouds=0.0,
            fog_dist=float(rng.uniform(60, 120)), fog_col=c(0.85, 0.86, 0.89), snow=True, foliage="bare",
            precipitation="snow", saturation=0.8,
        )
    elif condition == "autumn":
        base.update(
            sun_el=math.radians(rng.uniform(12, 30)), light_col=c(1.0, 0.93, 0.8), foliage="autumn",
            sky_horizon=c(0.80, 0.82, 0.88),
        )
    return Lighting(**base)


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------
@dataclass
class Camera:
    u: float  # along the street, m
    x: float  # lateral, m, positive to the left of the street direction
    yaw: float  # radians relative to the street direction
    pitch: float = 0.0  # radians, positive up
    height: float = CAMERA_HEIGHT


def _building_lookup(table: BuildingTable, u: np.ndarray):
    """Building index, local coordinate and inside-flag for along-street positions ``u``."""
    b = np.searchsorted(table.start, u, side="right") - 1
    b = np.clip(b, 0, len(table.start) - 1)
    lu = u - table.start[b]
    inside = (lu >= 0) & (lu < table.cols["width"][b])
    return b, lu, inside


def _heights_at(table: BuildingTable, u: np.ndarray) -> np.ndarray:
    """Roof height at along-street positions (0 in gaps between buildings)."""
    b, _, inside = _building_lookup(table, u)
    return np.where(inside, table.cols["height"][b], 0.0)


def _facade(table, b, lu, inside, z, fp, light: Lighting, image_key: int):
    """Albedo (H, W, 3) and emission (H, W, 3) of facade points.

    b, lu, inside, fp: (W,) per column (building, local u, inside a building, footprint m/px);
    z: (H, W) height of each pixel's hit point on the wall.
    """
    C = table.cols
    g = lambda k: C[k][b]
    width, fh, sp = g("width")[None], g("floor_h")[None], g("spacing")[None]
    wall, trim, glass = g("wall")[None], g("trim")[None], g("glass")[None]  # (1, W, 3)
    height = g("height")[None]
    lu2 = lu[None]
    fl = np.floor(z / fh)
    fz = z / fh - fl
    ncol = np.maximum(1.0, np.floor((width - 1.2) / sp))
    margin = (width - ncol * sp) / 2
    cc = (lu2 - margin) / sp
    ci = np.floor(cc)
    cf = cc - ci
    col_ok = (ci >= 0) & (ci < ncol)
    ww, wh = g("win_w")[None], g("win_h")[None]
    upper = (fl >= 1) & (z < height - 1.0)
    win = col_ok & (np.abs(cf - 0.5) < ww / 2) & (np.abs(fz - 0.55) < wh / 2) & upper
    frame = col_ok & (np.abs(cf - 0.5) < ww / 2 + 0.06) & (np.abs(fz - 0.55) < wh / 2 + 0.05) & upper & ~win
    sill = frame & (fz < 0.55 - wh / 2)

    alb = np.broadcast_to(wall, z.shape + (3,)).copy()
    # Wall texture: brick courses or panels, faded with distance.
    tex = g("texture")[None]
    brick = (tex == 1) & ((z / 0.3) % 1.0 < 0.14)
    panel = (tex == 2) & (np.abs(cf - 0.0) < 0.04)
    alb[brick | panel] *= 0.85
    # Cornice band and a darker plinth.
    cornice = z > height - 0.5
    alb[cornice] = np.broadcast_to(trim, alb.shape)[cornice]
    alb[z < 0.4] *= 0.7
    alb[frame] = np.broadcast_to(trim, alb.shape)[frame]
    wkey = np.broadcast_to(g("ident")[None], z.shape)
    curtain = hash01(wkey, fl, ci) > 0.75
    gl = glass * (0.75 + 0.5 * fz[..., None])
    gl = np.where(curtain[..., None], np.float32([0.78, 0.72, 0.6]) * 0.8, gl)
    alb[win] = gl[win]
    # Ground floor: shop front or plain wall with a door; awning; sign.
    ground = fl < 1
    shop = g("shop")[None].astype(bool) & ground & (z > 0.5) & (z < fh - 0.8) & (lu2 > 0.5) & (lu2 < width - 0.5)
    door = ground & (np.abs(lu2 - g("door")[None]) < 0.6) & (z < 2.2)
    alb[shop] = np.broadcast_to(glass * 1.1, alb.shape)[shop]
    alb[door] = np.float32([0.25, 0.17, 0.12])
    awning = g("awning_on")[None].astype(bool) & ground & (z > fh - 0.8) & (z < fh - 0.25) & (lu2 > 0.3) & (lu2 < width - 0.3)
    stripe = ((lu2 / 0.5) % 1.0 < 0.5) & awning
    alb[awning] = np.broadcast_to(g("awning")[None], alb.shape)[awning]
    alb[stripe] = alb[stripe] * 0.4 + 0.55
    su0, sw, sz0, sh = g("sign_u0")[None], g("sign_w")[None], g("sign_z0")[None], g("sign_h")[None]
    sign = g("sign_on")[None].astype(bool) & (lu2 >= su0) & (lu2 < su0 + sw) & (z >= sz0) & (z < sz0 + sh)
    # Glyph blocks: a text-like pattern unique to the sign (wide signs: a row; blade signs: a column).
    horiz = sw > sh
    along = np.where(horiz, (lu2 - su0) / 0.42, (sz0 + sh - z) / 0.42)
    across = np.where(horiz, (z - sz0) / sh, (lu2 - su0) / sw)
    gi = np.floor(along)
    glyph = sign & (hash01(np.broadcast_to(g("sign_seed")[None], z.shape), gi) > 0.3)
    glyph &= (np.abs(across - 0.5) < 0.28) & ((along - gi) > 0.12) & (gi >= 1) & (along < np.where(horiz, sw, sh) / 0.42 - 1)
    alb[sign] = np.broadcast_to(g("sign_col")[None], alb.shape)[sign]
    alb[glyph] = np.broadcast_to(g("sign_ink")[None], alb.shape)[glyph]
    if light.snow:
        snowy = sill | cornice & (z > height - 0.15) | (awning & (z > fh - 0.4))
        alb[snowy] = 0.92
    # Gaps between buildings: a dark alley.
    gap = ~np.broadcast_to(inside[None], z.shape)
    alb[gap] = np.broadcast_to(wall * 0.3, alb.shape)[gap]

    # Emission: lit windows and shop fronts (per image), glowing signs.
    emi = np.zeros_like(alb)
    if light.emissive > 0:
        lit = win & (hash01(wkey, fl, ci, image_key) < light.window_lit)
        warmth = hash01(wkey, fl, ci, 7)[..., None]
        lamp = np.float32([1.0, 0.82, 0.5]) * (0.55 + 0.45 * warmth) + np.float32([0.0, 0.08, 0.3]) * (1 - warmth)
        emi[lit] = lamp[lit] * light.emissive
        shop_lit = shop & (hash01(wkey, image_key) < 0.7)
        emi[shop_lit] = np.float32([1.0, 0.9, 0.7]) * 0.8 * light.emissive
        emi[sign] = alb[sign] * 0.9 * light.emissive
        emi[gap] = 0.0

    # Far away: fade the detail to the facade's mean colour (a cheap mip-map).
    detail = np.clip((0.6 - fp) / 0.4, 0.0, 1.0)[None, :, None]  # (1, W, 1)
    wf = (ww * wh * 0.8)[..., None]
    mean = wall * (1 - wf) + glass * wf
    mean = np.where(gap[..., None], wall * 0.3, mean)
    alb = alb * detail + mean * (1 - detail)
    if light.emissive > 0:
        mean_emi = np.float32([1.0, 0.85, 0.55]) * light.window_lit * wf * light.emissive
        emi = emi * detail + np.where(gap[..., None], 0.0, mean_emi) * (1 - detail)
    return alb, emi


def _ground(street: Street, ug, xg, fp, light: Lighting):
    """Albedo of ground points (flat arrays): road with markings, crosswalks, sidewalks, curbs."""
    hwl, hwr = street.half_width
    swl, swr = street.sidewalk
    road_l, road_r = hwl - swl, -(hwr - swr)
    n = ug.shape[0]
    alb = np.empty((n, 3), dtype=np.float32)
    road = (xg < road_l) & (xg > road_r)
    noise = hash01(np.floor(ug * 2), np.floor(xg * 2), street.street_id)
    alb[:] = street.asphalt * (0.92 + 0.16 * noise[:, None])
    side = ~road
    alb[side] = np.float32([0.58, 0.56, 0.52]) * (0.93 + 0.1 * noise[side, None])
    tiles = side & (((ug / 1.5) % 1.0 < 0.05) | ((np.abs(xg) / 1.5) % 1.0 < 0.05))
    alb[tiles] *= 0.85
    curb = (np.abs(xg - road_l) < 0.25) | (np.abs(xg - road_r) < 0.25)
    alb[curb] = 0.7
    centre = 0.5 * (road_l + road_r)
    detail = np.clip((0.8 - fp) / 0.5, 0.0, 1.0)
    mark = np.zeros(n, dtype=bool)
    if street.centre_line == 0:
        mark |= (np.abs(xg - centre) < 0.09) & ((ug / 9.0) % 1.0 < 0.45)
    elif street.centre_line == 1:
        mark |= np.abs(np.abs(xg - centre) - 0.15) < 0.07
    mark |= road & ((np.abs(xg - (road_l - 0.5)) < 0.08) | (np.abs(xg - (road_r + 0.5)) < 0.08))
    mark_col = np.float32([0.85, 0.72, 0.2]) if street.centre_line == 1 else np.float32([0.9, 0.9, 0.88])
    for cw in street.crosswalks:
        mark |= road & (np.abs(ug - cw) < 2.0) & ((xg / 0.9) % 1.0 < 0.5)
    w = detail[mark][:, None]
    alb[mark] = mark_col * w + alb[mark] * (1 - w)
    if light.snow:
        # Two wheel tracks per lane (lane centres at a quarter of the road width from the centre).
        lane_off = np.abs(np.abs(xg - centre) - 0.25 * (road_l - road_r))
        tracks = road & (np.abs(lane_off - 0.8) < 0.22)
        snow_col = np.float32([0.9, 0.91, 0.94]) * (0.95 + 0.05 * noise[:, None])
        alb = np.where(tracks[:, None], alb * 0.6 + 0.3, snow_col)
    elif light.wet:
        alb *= 0.6
    return alb


@dataclass
class _Buffers:
    albedo: np.ndarray  # (H, W, 3)
    shade: np.ndarray  # (H, W) light reaching the surface
    emission: np.ndarray  # (H, W, 3)
    depth: np.ndarray  # (H, W) forward depth, inf = sky

    def paint(self, sl, mask, colour, shade, F, emission=0.0):
        """Write a sprite's pixels (``mask`` within the box ``sl``) where it is nearer than the scene."""
        mask = mask & (self.depth[sl] > F)
        if mask.any():
            self.albedo[sl][mask] = np.broadcast_to(colour, mask.shape + (3,))[mask]
            self.shade[sl][mask] = shade
            self.emission[sl][mask] = np.broadcast_to(np.asarray(emission, dtype=np.float32), mask.shape + (3,))[mask]
            self.depth[sl][mask] = F
        return mask


@dataclass
class _Grid:
    """World coordinates of the pixels in a billboard's screen box."""

    sl: tuple  # (row slice, column slice)
    px: np.ndarray  # (1, w) lateral offset from the billboard's axis, m
    pz: np.ndarray  # (h, 1) height above the ground, m
    jc: float  # screen column of the axis
    row: object  # height (m) -> screen row
    f: float  # focal length, px


def _billboard(cam: Camera, f: float, H: int, W: int, F: float, L: float, half_w: float, top: float):
    """Screen box of a camera-facing billboard at forward depth F, left offset L; None if unseen."""
    if F < 0.8:
        return None
    tan_p = math.tan(cam.pitch)
    jc = W / 2 - f * L / F
    row = lambda z: H / 2 - f * ((z - cam.height) / F - tan_p)
    j0, j1 = int(math.floor(jc - f * half_w / F)), int(math.ceil(jc + f * half_w / F))
    i0, i1 = int(math.floor(row(top))), int(math.ceil(row(0.0)))
    j0, j1, i0, i1 = max(j0, 0), min(j1, W), max(i0, 0), min(i1, H)
    if j1 <= j0 or i1 <= i0:
        return None
    px = ((np.arange(j0, j1) + 0.5 - jc) * F / f)[None, :]
    pz = cam.height + F * ((H / 2 - (np.arange(i0, i1)[:, None] + 0.5)) / f + tan_p)
    return _Grid((slice(i0, i1), slice(j0, j1)), px, pz, jc, row, f)


BARK = np.float32([0.3, 0.22, 0.15])


def _draw_tree(bufs: _Buffers, g: _Grid, light: Lighting, F: float, r: float, cz: float, conical: bool, hue: float, key: int):
    trunk = (np.abs(g.px) < 0.18) & (g.pz < cz)
    if conical:
        crown = (g.pz > cz - r) & (np.abs(g.px) < r * 0.8 * (1 - (g.pz - (cz - r)) / (2.4 * r)))
    else:
        crown = (g.px / r) ** 2 + ((g.pz - cz) / (r * 1.1)) ** 2 < 1
    leafy = hash01(np.floor(g.px / 0.25 + 1000), np.floor(g.pz / 0.25 + 1000), key)  # (h, w) leaf clumps
    if light.foliage == "bare":
        crown &= leafy > 0.72
        ccol = np.float32([0.85, 0.86, 0.88]) if light.snow else np.float32([0.32, 0.26, 0.2])
    else:
        crown &= leafy > 0.08
        ccol = np.float32([0.85, 0.45 + 0.35 * hue, 0.1]) if light.foliage == "autumn" else np.float32([0.18 + 0.15 * hue, 0.42 + 0.12 * hue, 0.15])
    colour = np.where(crown[..., None], ccol * (0.7 + 0.5 * leafy[..., None]), BARK)
    bufs.paint(g.sl, trunk | crown, colour, light.ambient + light.sun * 0.6, F)


def _draw_lamp(bufs: _Buffers, g: _Grid, light: Lighting, F: float, height: float):
    f = g.f
    pole = (np.abs(g.px) < max(0.07, 0.6 * F / f)) & (g.pz < height)
    head = (np.abs(g.px) < 0.45) & (np.abs(g.pz - height) < 0.18)
    glow_col = np.float32([1.0, 0.9, 0.65]) * 1.2 * light.emissive if light.lamps_on else 0.0
    emission = np.where(head[..., None], glow_col, np.float32(0.0))
    bufs.paint(g.sl, pole | head, np.float32(0.18), light.ambient + light.sun * 0.5, F, emission)
    if light.lamps_on:  # an additive halo around the head, not depth-tested
        H, W = bufs.depth.shape
        gi, gj, rad = g.row(height), g.jc, max(2.0, 2.2 * f / F)
        y0, y1 = int(max(0, gi - 3 * rad)), int(min(H, gi + 3 * rad + 1))
        x0, x1 = int(max(0, gj - 3 * rad)), int(min(W, gj + 3 * rad + 1))
        if y1 > y0 and x1 > x0:
            yy = np.arange(y0, y1)[:, None] + 0.5 - gi
            xx = np.arange(x0, x1)[None, :] + 0.5 - gj
            halo = np.exp(-(xx**2 + yy**2) / (2 * rad**2)).astype(np.float32)
            bufs.emission[y0:y1, x0:x1] += halo[..., None] * np.float32([0.5, 0.42, 0.25]) * light.emissive


def _draw_vehicle(bufs: _Buffers, g: _Grid, light: Lighting, F: float, half_w: float, vh: float, colour: np.ndarray):
    px, pz = g.px, g.pz
    body = (np.abs(px) < half_w) & (pz >= 0.15) & (pz < vh)
    wheels = (np.abs(np.abs(px) - half_w * 0.7) < 0.3) & (pz < 0.45)
    glass = body & (pz > vh * 0.55) & (pz < vh * 0.9) & (np.abs(px) < half_w * 0.85)
    lamps = body & (np.abs(np.abs(px) - half_w * 0.78) < 0.14) & (np.abs(pz - vh * 0.42) < 0.09)
    col = np.broadcast_to(colour, body.shape + (3,)).copy()
    col[glass] = np.float32([0.1, 0.12, 0.15])
    col[wheels] = 0.05
    col[lamps] = np.float32([0.7, 0.1, 0.08])
    emission = np.where(lamps[..., None], np.float32([1.0, 0.15, 0.1]) * light.emissive, np.float32(0.0))
    bufs.paint(g.sl, body | wheels, col, light.ambient + light.sun * 0.5, F, emission)


def _draw_person(bufs: _Buffers, g: _Grid, light: Lighting, F: float, height: float, top: np.ndarray, bottom: np.ndarray):
    px, pz = g.px, g.pz
    torso = (np.abs(px) < 0.24) & (pz > height * 0.45) & (pz < height * 0.85)
    legs = (np.abs(np.abs(px) - 0.1) < 0.08) & (pz < height * 0.45)
    head = (px**2 + (pz - height * 0.93) ** 2) < 0.11**2
    col = np.where(torso[..., None], top, bottom)
    col = np.where(head[..., None], np.float32([0.75, 0.58, 0.45]), col)
    bufs.paint(g.sl, torso | legs | head, col, light.ambient + light.sun * 0.5, F)


def _collect_sprites(street: Street, cam: Camera, rng: np.random.Generator, occluders: float):
    """(forward depth, draw function, (left offset, half width, top, *draw args)) of every billboard."""
    cy, sy = math.cos(cam.yaw), math.sin(cam.yaw)

    def rel(u, x):
        du, dx = u - cam.u, x - cam.x
        return du * cy + dx * sy, -du * sy + dx * cy  # forward, left

    hwl, hwr = street.half_width
    road_l, road_r = hwl - street.sidewalk[0], -(hwr - street.sidewalk[1])
    out = []
    tr = street.trees
    for k in np.flatnonzero(np.abs(tr["u"] - cam.u) < MAX_DISTANCE * 0.6):
        F, L = rel(tr["u"][k], road_l + 1.0 if tr["side"][k] == 0 else road_r - 1.0)
        r, cz = float(tr["radius"][k]), float(tr["crown_z"][k])
        out.append((F, _draw_tree, (L, r, cz + 1.2 * r, r, cz, bool(tr["conical"][k]), float(tr["hue"][k]), int(k))))
    lp = street.lamps
    for k in np.flatnonzero(np.abs(lp["u"] - cam.u) < MAX_DISTANCE * 0.6):
        F, L = rel(lp["u"][k], road_l + 0.4 if lp["side"][k] == 0 else road_r - 0.4)
        out.append((F, _draw_lamp, (L, 0.6, float(lp["height"][k]) + 0.3, float(lp["height"][k]))))
    # Occluders: a fresh draw per image (they are not part of the place).
    for _ in range(rng.poisson(2.2 * occluders)):
        F, L = rel(cam.u + cy * rng.uniform(5, 60), rng.uniform(road_r + 1.2, road_l - 1.2))
        half_w, vh = (1.3, 3.2) if rng.random() < 0.15 else (0.9, 1.5)
        colour = _saturated_colour(rng) if rng.random() < 0.4 else np.full(3, rng.uniform(0.1, 0.9), dtype=np.float32)
        out.append((F, _draw_vehicle, (L, half_w, vh, half_w, vh, colour)))
    for _ in range(rng.poisson(2.0 * occluders)):
        u = cam.u + cy * rng.uniform(3, 35)
        x = road_l + rng.uniform(0.5, street.sidewalk[0] - 0.3) if rng.random() < 0.5 else road_r - rng.uniform(0.5, street.sidewalk[1] - 0.3)
        F, L = rel(u, x)
        height = rng.uniform(1.6, 1.9)
        out.append((F, _draw_person, (L, 0.3, height, height, _saturated_colour(rng) * 0.7, np.full(3, rng.uniform(0.1, 0.5), dtype=np.float32))))
    return out


def render(street: Street, cam: Camera, light: Lighting, size: int, rng: np.random.Generator, occluders: float = 1.0, image_key: int = 0) -> np.ndarray:
    """Render one (size, size, 3) uint8 RGB view.

    ``occluders`` scales the expected number of vehicles and pedestrians; ``image_key`` seeds
    per-image details (which windows are lit).
    """
    H = W = int(size)
    f = (W / 2) / math.tan(math.radians(FOV_DEG) / 2)
    xc = (np.arange(W) + 0.5 - W / 2) / f  # (W,) screen x (right positive)
    yc = (H / 2 - (np.arange(H) + 0.5)) / f + math.tan(cam.pitch)  # (H,) screen y (up positive)
    phi = cam.yaw - np.arctan(xc)  # (W,) horizontal ray angle in street coordinates
    cphi, sphi = np.cos(phi), np.sin(phi)
    norm = np.sqrt(1 + xc**2)  # horizontal distance per unit forward depth
    hwl, hwr = street.half_width

    # --- walls: one hit per column ------------------------------------------------------------
    with np.errstate(divide="ignore", invalid="ignore"):
        t_left = np.where(sphi > 1e-6, (hwl - cam.x) / sphi, np.inf)
        t_right = np.where(sphi < -1e-6, (-hwr - cam.x) / sphi, np.inf)
    side = np.where(t_left < t_right, 0, 1)  # (W,)
    t_wall = np.minimum(t_left, t_right)
    F_wall = t_wall / norm  # forward depth
    valid = t_wall < MAX_DISTANCE
    u_wall = np.where(valid, cam.u + t_wall * cphi, cam.u)
    # Footprint of one pixel on the wall (m): vertical F/f, horizontal |du/dj|.
    du = np.abs(np.gradient(u_wall)) if W > 1 else np.zeros(W)
    fp = np.maximum(F_wall / f, np.where(valid, du, 1e3))

    z = cam.height + F_wall[None, :] * yc[:, None]  # (H, W) height of the wall hit point
    b = np.zeros(W, dtype=np.int64)
    lu = np.zeros(W)
    inside = np.zeros(W, dtype=bool)
    roof = np.zeros(W)
    for s in range(2):
        m = valid & (side == s)
        if m.any():
            bs, ls, ins = _building_lookup(street.sides[s], u_wall[m])
            b[m], lu[m], inside[m] = bs, ls, ins
            hts = street.sides[s].cols["height"][bs]
            # gap (alley): the lower neighbour's height
            nxt = np.minimum(bs + 1, len(street.sides[s].start) - 1)
            roof[m] = np.where(ins, hts, np.minimum(hts, street.sides[s].cols["height"][nxt]))
    wall_px = valid[None, :] & (z >= 0) & (z < roof[None, :])  # (H, W)

    albedo = np.zeros((H, W, 3), dtype=np.float32)
    emission = np.zeros((H, W, 3), dtype=np.float32)
    shade = np.zeros((H, W), dtype=np.float32)  # light reaching each pixel (ambient + sun)
    depth = np.full((H, W), np.inf, dtype=np.float32)  # forward depth, inf = sky

    sun_h = math.cos(light.sun_el)
    sdir_u, sdir_x = math.cos(light.sun_az), math.sin(light.sun_az)
    street_w = hwl + hwr
    for s in range(2):
        cols = np.flatnonzero(valid & (side == s))
        if cols.size == 0:
            continue
        tbl = street.sides[s]
        zz = z[:, cols]
        a, e = _facade(tbl, b[cols], lu[cols], inside[cols], zz, fp[cols], light, image_key)
        # Sun on this wall: the left wall (normal -x) is lit when the sun is to the right (x < 0).
        facing = max(0.0, -sdir_x if s == 0 else sdir_x)
        lit = np.full(zz.shape, light.ambient + light.sun * sun_h * facing, dtype=np.float32)
        if facing > 0.05 and light.sun > 0:
            # Shadow cast by the opposite row: the ray to the sun crosses the street and must clear it.
            run = street_w / max(1e-3, abs(sdir_x))
            u_opp = u_wall[cols] + run * sdir_u
            h_opp = _heights_at(street.sides[1 - s], u_opp)
            rise = run * math.tan(light.sun_el)
            shadowed = (zz + rise) < h_opp[None, :]
            lit[shadowed] = light.ambient
        m = wall_px[:, cols]
        sub_a, sub_e, sub_s, sub_d = albedo[:, cols], emission[:, cols], shade[:, cols], depth[:, cols]
        sub_a[m], sub_e[m], sub_s[m] = a[m], e[m], lit[m]
        sub_d[m] = np.broadcast_to(F_wall[cols][None, :], m.shape)[m]
        albedo[:, cols], emission[:, cols], shade[:, cols], depth[:, cols] = sub_a, sub_e, sub_s, sub_d

    # --- ground: per pixel below the horizon and below the walls -------------------------------
    below = yc[:, None] < 0
    ground_px = below & ~wall_px
    F_g = np.where(below, cam.height / np.maximum(-yc[:, None], 1e-9), np.inf) * np.ones((1, W))
    ground_px &= F_g * norm[None, :] < MAX_DISTANCE
    if ground_px.any():
        ii, jj = np.nonzero(ground_px)
        Fg = F_g[ii, jj]
        tg = Fg * norm[jj]
        ug = cam.u + tg * cphi[jj]
        xg = cam.x + tg * sphi[jj]
        fpg = Fg * Fg / (cam.height * f)  # grazing footprint along the ray
        albedo[ii, jj] = _ground(street, ug, xg, fpg, light)
        g_lit = np.full(ii.shape, light.ambient + light.sun * math.sin(light.sun_el), dtype=np.float32)
        if light.sun > 0 and abs(sdir_x) > 0.02:
            # Shadow of the buildings on the sun side: does the ray to the sun clear their roofs?
            toward_left = sdir_x > 0
            dist = np.where(toward_left, hwl - xg, xg + hwr) / abs(sdir_x)
            u_hit = ug + dist * sdir_u
            h_side = _heights_at(street.sides[0 if toward_left else 1], u_hit)
            g_lit[dist * math.tan(light.sun_el) < h_side] = light.ambient
        shade[ii, jj] = g_lit
        depth[ii, jj] = Fg

    # --- billboards: trees, lamp posts, vehicles, pedestrians (painted back to front) -----------
    bufs = _Buffers(albedo, shade, emission, depth)
    for F, draw, args in sorted(_collect_sprites(street, cam, rng, occluders), key=lambda t: -t[0]):
        grid = _billboard(cam, f, H, W, F, args[0], args[1], args[2])
        if grid is not None:
            draw(bufs, grid, light, F, *args[3:])

    # --- compose: light, sky, haze, weather, camera ---------------------------------------------
    img = albedo * (shade[..., None] * light.light_col) + emission  # (H, W, 3)
    sky = ~np.isfinite(depth)
    el = np.clip(yc[:, None] / norm[None, :], -0.2, 1.0)  # (H, W) tan of elevation, roughly
    t = np.clip(el / 0.6, 0, 1)[..., None]
    sky_col = light.sky_horizon * (1 - t) + light.sky_top * t
    if light.clouds > 0:
        az = phi[None, :]
        cl = (
            np.sin(az * 5.0 + rng.uniform(0, 6.3)) * np.sin(el * 9.0 + rng.uniform(0, 6.3))
            + 0.6 * np.sin(az * 11.0 + el * 7.0 + rng.uniform(0, 6.3))
            + 0.4 * np.sin(az * 23.0 - el * 17.0 + rng.uniform(0, 6.3))
        )
        cover = np.clip((cl - (1.0 - 2 * light.clouds)) * 0.8, 0, 1)[..., None].astype(np.float32)
        sky_col = sky_col * (1 - cover) + np.float32([0.93, 0.93, 0.95]) * cover * (0.6 + 0.4 * light.ambient)
    img = np.where(sky[..., None], sky_col, img)
    trans = np.exp(-np.where(sky, np.inf, depth) / light.fog_dist)[..., None]  # 0 for sky
    img = np.where(sky[..., None], img * (1 - np.float32(light.fog_dist < 100)) + light.fog_col * np.float32(light.fog_dist < 100), img * trans + light.fog_col * (1 - trans))
    if light.saturation != 1.0:
        grey = img.mean(axis=-1, keepdims=True)
        img = grey + (img - grey) * light.saturation
    if light.precipitation == "rain":
        n = int(H * W / 110)
        length = max(4, int(0.05 * H))
        y = rng.integers(0, H, n)
        x = rng.integers(0, W, n)
        slope = rng.uniform(-0.25, 0.05)
        streak = np.zeros((H, W), dtype=np.float32)
        for k in range(length):
            np.add.at(streak, (np.clip(y + k, 0, H - 1), np.clip((x + slope * k).astype(np.int64), 0, W - 1)), 0.18)
        img = img * 0.85 + np.minimum(streak, 0.5)[..., None] * np.float32([0.8, 0.82, 0.85])
    elif light.precipitation == "snow":
        n = int(H * W / 90)
        y = rng.integers(0, H, n)
        x = rng.integers(0, W, n)
        flakes = np.zeros((H, W), dtype=np.float32)
        np.add.at(flakes, (y, x), rng.uniform(0.4, 1.0, n).astype(np.float32))
        big = rng.random(n) < 0.3
        for dy, dx in ((0, 1), (1, 0), (1, 1)):
            np.add.at(flakes, (np.clip(y[big] + dy, 0, H - 1), np.clip(x[big] + dx, 0, W - 1)), 0.6)
        flakes = np.minimum(flakes, 1.0)[..., None]
        img = img * (1 - flakes) + flakes * 0.95
    img = img * light.exposure
    if light.noise > 0:
        img = img + rng.normal(0, light.noise, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
