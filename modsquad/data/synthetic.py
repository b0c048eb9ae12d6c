"""The built-in synthetic suite: procedurally rendered indoor scenes with exact labels, in the Taskonomy layout.

Each image is a room (a box with textured floor, walls, ceiling and windows) furnished with objects built from
boxes, spheres and cylinders, lit by a few point lights with shadows, and seen by a pinhole camera. Rays are cast
against all primitives at once (numpy arrays of shape [primitives, rays]), so depth, normals, curvature and classes
are exact rather than estimated. Every label is encoded with the task registry's `encode` and written as
`OUT/<domain>/<building>/point_<p>_view_<v>_domain_<domain>.<ext>`, so `TaskonomyDataset` reads it unchanged.

Like Taskonomy, a *building* is a family of scenes sharing a style (palette, floor and wall textures, light colour,
favoured room types) and splits are by building; a *point* is a room and a look-at target, and its *views* are
cameras placed around that target.

Domains: rgb, depth_euclidean, depth_zbuffer, normal, reshading, principal_curvature, edge_occlusion, edge_texture,
keypoints2d, segment_semantic, class_object, class_scene are computed exactly as their definitions say;
keypoints3d, segment_unsup2d and segment_unsup25d are proxies (see `PROXY_DOMAINS`). Taskonomy domains it cannot
make: point_info (camera json), room_layout, vanishing_point, fragmentation/nonfixated matches, mask_valid.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..core.atomic import atomic_write
from ..core.errors import DataError
from ..tasks.registry import IGNORE_INDEX, get_task
from .io import write_image

log = logging.getLogger(__name__)

INFO_FILE = "synth_info.json"
FORMAT_VERSION = 1
VIEWS_PER_POINT = 3

DOMAINS = ("rgb", "depth_euclidean", "depth_zbuffer", "normal", "reshading", "principal_curvature",
           "edge_occlusion", "edge_texture", "keypoints2d", "keypoints3d", "segment_semantic", "segment_unsup2d",
           "segment_unsup25d", "class_object", "class_scene")
#: Domains made by an approximation of Taskonomy's definition: keypoints3d is a Harris response on the normal map
#: (3-D corners) instead of NARF on the mesh; segment_unsup25d ranks surface patches (one per primitive face) by
#: depth, segment_unsup2d ranks patches of uniform texture phase by area, instead of graph-cut clusters.
PROXY_DOMAINS = ("keypoints3d", "segment_unsup2d", "segment_unsup25d")

#: The 16 indoor COCO classes of segment_semantic; class i has id i + 2 (0 = uncertain, 1 = background/room).
SEMANTIC_CLASSES = ("chair", "couch", "potted_plant", "bed", "dining_table", "toilet", "tv", "microwave", "oven",
                    "toaster", "sink", "refrigerator", "book", "clock", "vase", "teddy_bear")
CLASS_ID = {c: i + 2 for i, c in enumerate(SEMANTIC_CLASSES)}
#: ImageNet-1k index for each class (class_object soft labels).
IMAGENET_INDEX = {"chair": 559, "couch": 831, "potted_plant": 738, "bed": 564, "dining_table": 532, "toilet": 861,
                  "tv": 851, "microwave": 651, "oven": 827, "toaster": 859, "sink": 896, "refrigerator": 760,
                  "book": 921, "clock": 892, "vase": 883, "teddy_bear": 850}
#: Room types: Places365 index (class_scene soft labels) and the classes that furnish them.
ROOM_TYPES = {
    "bedroom": (52, ("bed", "chair", "clock", "book", "teddy_bear", "vase", "tv")),
    "living_room": (215, ("couch", "tv", "potted_plant", "chair", "vase", "book", "clock", "dining_table")),
    "kitchen": (203, ("refrigerator", "oven", "microwave", "toaster", "sink", "dining_table", "chair", "vase")),
    "bathroom": (45, ("toilet", "sink", "vase", "potted_plant", "clock")),
    "dining_room": (121, ("dining_table", "chair", "vase", "potted_plant", "clock", "book")),
    "home_office": (176, ("chair", "book", "tv", "clock", "potted_plant", "dining_table")),
    "childs_room": (89, ("teddy_bear", "bed", "book", "chair", "clock", "potted_plant")),
}
ROOM_NAMES = tuple(ROOM_TYPES)

#: Decoded principal_curvature = curvature [1/m] x this (so a sphere of radius 5 cm reads 1.0).
CURVATURE_SCALE = 0.05
#: Fixed light of the reshading domain, in camera frame (x right, y up, z towards the viewer).
RESHADING_LIGHT = np.array([0.4, 0.6, 1.0]) / np.linalg.norm([0.4, 0.6, 1.0])
INVALID_DEPTH_FILL = 50.0  # metres assumed behind windows when looking for depth discontinuities

TEX_PLAIN, TEX_STRIPES, TEX_CHECKER, TEX_NOISE = range(4)
_TEX = {"plain": TEX_PLAIN, "stripes": TEX_STRIPES, "checker": TEX_CHECKER, "noise": TEX_NOISE}
_BOX, _SPHERE, _CYL = "box", "sphere", "cylinder"

_PALETTES = {
    "wood": ((0.55, 0.35, 0.20), (0.70, 0.50, 0.30), (0.40, 0.25, 0.15)),
    "fabric": ((0.35, 0.40, 0.55), (0.60, 0.25, 0.25), (0.45, 0.50, 0.35), (0.55, 0.55, 0.55)),
    "bedding": ((0.85, 0.85, 0.90), (0.50, 0.60, 0.80), (0.85, 0.65, 0.70)),
    "white": ((0.92, 0.92, 0.90), (0.85, 0.87, 0.90)),
    "black": ((0.08, 0.08, 0.09), (0.15, 0.15, 0.17)),
    "metal": ((0.70, 0.72, 0.75), (0.55, 0.57, 0.60), (0.80, 0.20, 0.15)),
    "screen": ((0.15, 0.30, 0.55), (0.20, 0.45, 0.40)),
    "terracotta": ((0.70, 0.35, 0.20),),
    "green": ((0.20, 0.55, 0.20), (0.30, 0.45, 0.15)),
    "paper": ((0.75, 0.15, 0.15), (0.15, 0.30, 0.70), (0.85, 0.75, 0.20), (0.20, 0.55, 0.35)),
    "ceramic": ((0.20, 0.35, 0.75), (0.90, 0.90, 0.85), (0.85, 0.70, 0.20)),
    "fur": ((0.55, 0.38, 0.22), (0.75, 0.60, 0.40)),
}

_R_AXIS_Z = ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, -1.0, 0.0))  # part-local y = object z (discs facing out)


@dataclass(frozen=True)
class _Part:
    kind: str
    offset: tuple[float, float, float]  # object-local (y up from the floor); box/sphere centre, cylinder base
    size: tuple[float, ...]  # box half extents (3), sphere (r,), cylinder (r, h)
    palette: str
    texture: str = "plain"
    tilt: tuple | None = None  # object-local -> part-local rotation rows


def _legs(hx: float, hz: float, h: float, palette: str) -> list[_Part]:
    return [_Part(_BOX, (sx * hx, h / 2, sz * hz), (0.03, h / 2, 0.03), palette)
            for sx in (-1, 1) for sz in (-1, 1)]


_OBJECTS: dict[str, tuple[_Part, ...]] = {
    "chair": (_Part(_BOX, (0, 0.23, 0), (0.22, 0.23, 0.22), "wood", "stripes"),
              _Part(_BOX, (0, 0.70, -0.19), (0.22, 0.25, 0.03), "wood", "stripes")),
    "couch": (_Part(_BOX, (0, 0.22, 0), (0.90, 0.22, 0.42), "fabric", "noise"),
              _Part(_BOX, (0, 0.62, -0.34), (0.90, 0.20, 0.08), "fabric", "noise"),
              _Part(_BOX, (-0.84, 0.52, 0.04), (0.07, 0.10, 0.38), "fabric", "noise"),
              _Part(_BOX, (0.84, 0.52, 0.04), (0.07, 0.10, 0.38), "fabric", "noise")),
    "potted_plant": (_Part(_CYL, (0, 0, 0), (0.15, 0.30), "terracotta", "stripes"),
                     _Part(_SPHERE, (0, 0.55, 0), (0.27,), "green", "noise")),
    "bed": (_Part(_BOX, (0, 0.25, 0), (0.80, 0.25, 1.00), "bedding", "stripes"),
            _Part(_BOX, (0, 0.55, -1.02), (0.80, 0.55, 0.04), "wood", "noise"),
            _Part(_BOX, (0, 0.55, -0.78), (0.55, 0.06, 0.16), "white")),
    "dining_table": (_Part(_BOX, (0, 0.74, 0), (0.60, 0.03, 0.45), "wood", "noise"),
                     *_legs(0.54, 0.39, 0.71, "wood")),
    "toilet": (_Part(_CYL, (0, 0, 0), (0.20, 0.40), "white"),
               _Part(_BOX, (0, 0.62, -0.22), (0.20, 0.22, 0.08), "white")),
    "tv": (_Part(_BOX, (0, 0, 0.03), (0.55, 0.32, 0.03), "black"),
           _Part(_BOX, (0, 0, 0.062), (0.50, 0.28, 0.002), "screen", "noise")),
    "microwave": (_Part(_BOX, (0, 0.15, 0), (0.25, 0.15, 0.18), "metal"),
                  _Part(_BOX, (-0.05, 0.15, 0.182), (0.15, 0.10, 0.002), "black", "checker")),
    "oven": (_Part(_BOX, (0, 0.45, 0), (0.30, 0.45, 0.30), "metal"),
             _Part(_BOX, (0, 0.35, 0.302), (0.22, 0.20, 0.002), "black", "checker")),
    "toaster": (_Part(_BOX, (0, 0.10, 0), (0.14, 0.10, 0.08), "metal", "stripes"),),
    "sink": (_Part(_CYL, (0, 0, 0), (0.08, 0.75), "white"),
             _Part(_CYL, (0, 0.75, 0), (0.26, 0.14), "white")),
    "refrigerator": (_Part(_BOX, (0, 0.90, 0), (0.35, 0.90, 0.33), "white"),
                     _Part(_BOX, (0.25, 1.10, 0.345), (0.02, 0.25, 0.015), "black")),
    "book": (_Part(_BOX, (0, 0.03, 0), (0.12, 0.03, 0.17), "paper", "stripes"),
             _Part(_BOX, (0.01, 0.085, -0.01), (0.11, 0.025, 0.15), "paper", "stripes")),
    "clock": (_Part(_CYL, (0, 0, 0), (0.17, 0.05), "white", "checker", _R_AXIS_Z),),
    "vase": (_Part(_SPHERE, (0, 0.13, 0), (0.13,), "ceramic", "stripes"),
             _Part(_CYL, (0, 0.20, 0), (0.05, 0.20), "ceramic", "stripes")),
    "teddy_bear": (_Part(_SPHERE, (0, 0.20, 0), (0.20,), "fur", "noise"),
                   _Part(_SPHERE, (0, 0.50, 0), (0.13,), "fur", "noise"),
                   _Part(_SPHERE, (-0.10, 0.62, 0), (0.045,), "fur", "noise"),
                   _Part(_SPHERE, (0.10, 0.62, 0), (0.045,), "fur", "noise")),
}
_WALL_MOUNTED = {"tv": (1.0, 1.5), "clock": (1.6, 2.1)}  # centre height range on a wall
_ON_TABLE = ("microwave", "toaster", "book", "vase")


# --- scenes --------------------------------------------------------------------------------------------------


@dataclass
class Primitives:
    """All primitives of one kind as arrays. rot: [P, 3, 3] world->local, centre: [P, 3], size: [P, 3]
    (box half extents | sphere r | cylinder r, h), seg: [P] semantic id, pid: [P] global index, colour: [P, 3],
    texture: [P] texture code, freq: [P] texture frequency (1/m)."""

    kind: str
    rot: np.ndarray
    centre: np.ndarray
    size: np.ndarray
    seg: np.ndarray
    pid: np.ndarray
    colour: np.ndarray
    texture: np.ndarray
    freq: np.ndarray


@dataclass
class Scene:
    """A furnished room. Room spans [0, W] x [0, H] x [0, D] (y up); surfaces of the room have pid 0."""

    room: np.ndarray  # [3] W, H, D
    room_colour: np.ndarray  # [6, 3] for faces -x, +x, -y (floor), +y (ceiling), -z, +z
    room_texture: np.ndarray  # [6]
    room_freq: np.ndarray  # [6]
    windows: np.ndarray  # [K, 6]: face index, u0, u1, v0, v1, unused
    prims: list[Primitives]
    objects: list[dict]  # name, cls (semantic id), pos [3] (base), centre [3], foot (floor radius or None)
    lights: np.ndarray  # [L, 3]
    light_rgb: np.ndarray  # [L, 3] colour x intensity
    ambient: float
    room_type: str
    noise: np.ndarray  # [32, 32] value-noise table


@dataclass
class Camera:
    """A pinhole camera: position [3], cam->world rotation [3, 3] (columns right, up, back), horizontal fov."""

    position: np.ndarray
    rotation: np.ndarray
    fov_deg: float


def building_style(seed: int, building: int) -> dict:
    """The look shared by all rooms of a building (scene family)."""
    rng = np.random.default_rng([seed, building])
    wall = rng.uniform(0.55, 0.9, 3) * rng.uniform(0.85, 1.0)
    floor = np.array(_PALETTES["wood"][rng.integers(3)]) if rng.random() < 0.6 else rng.uniform(0.3, 0.8, 3)
    warm = rng.uniform(-1, 1)
    return {
        "wall": wall, "floor": floor, "ceiling": np.full(3, rng.uniform(0.85, 0.95)),
        "wall_texture": rng.choice(["plain", "noise", "stripes"], p=[0.4, 0.4, 0.2]),
        "floor_texture": rng.choice(["stripes", "checker", "noise"]),
        "light": np.array([1.0 + 0.12 * warm, 1.0, 1.0 - 0.15 * warm]),
        "rooms": tuple(rng.choice(ROOM_NAMES, size=3, replace=False)),
        "size": rng.uniform(3.5, 6.0),
    }


def _rot_y(theta: float) -> np.ndarray:
    """World -> object-local rotation whose local +z points along (sin theta, 0, cos theta)."""
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])


def _extent(part: _Part) -> tuple[float, float, float]:
    """Half widths along object x and z and the top height of an (untilted) part."""
    if part.kind == _BOX:
        return part.size[0], part.offset[1] + part.size[1], part.size[2]
    r = part.size[0]
    return r, part.offset[1] + (r if part.kind == _SPHERE else part.size[1]), r


def _footprint(parts: tuple[_Part, ...]) -> tuple[float, float]:
    """Radius of the circle on the floor that holds the object in any orientation, and its height."""
    ext = [(_extent(p), p.offset) for p in parts]
    radius = max(math.hypot(abs(o[0]) + ex, abs(o[2]) + ez) for (ex, _, ez), o in ext)
    return radius, max(top for (_, top, _), _ in ext)


def make_scene(seed: int, building: int, point: int) -> Scene:
    """Build the room of (building, point); deterministic in its arguments."""
    style = building_style(seed, building)
    rng = np.random.default_rng([seed, building, point, 1])
    room_type = style["rooms"][rng.integers(len(style["rooms"]))]
    w, d = style["size"] * rng.uniform(0.8, 1.25, 2)
    room = np.array([w, rng.uniform(2.5, 3.1), d])

    colours = np.stack([style["wall"], style["wall"], style["floor"], style["ceiling"], style["wall"], style["wall"]])
    colours = np.clip(colours * rng.uniform(0.93, 1.07, (6, 1)), 0, 1)
    wall_tex = _TEX[str(style["wall_texture"])]
    room_texture = np.array([wall_tex, wall_tex, _TEX[str(style["floor_texture"])], TEX_PLAIN, wall_tex, wall_tex])
    room_freq = np.array([2.0, 2.0, rng.uniform(1.5, 3.0), 1.0, 2.0, 2.0])

    windows = []
    for _ in range(rng.integers(0, 3)):
        face = int(rng.choice([0, 1, 4, 5]))
        length = room[2] if face < 2 else room[0]
        u0 = rng.uniform(0.3, length - 1.5)
        v0 = rng.uniform(0.8, 1.1)
        windows.append([face, u0, u0 + rng.uniform(0.7, 1.2), v0, v0 + rng.uniform(0.9, 1.3), 0])
    windows = np.array(windows, dtype=np.float64).reshape(-1, 6)

    classes = ROOM_TYPES[room_type][1]
    names = [classes[0]] + list(rng.choice(classes, size=rng.integers(2, 7)))
    parts_out = {k: [] for k in (_BOX, _SPHERE, _CYL)}
    objects: list[dict] = []
    table = None
    for name in names:
        parts = _OBJECTS[name]
        radius, height = _footprint(parts)
        placed = None
        for _ in range(30):
            if name in _WALL_MOUNTED:
                face = int(rng.choice([0, 1, 4, 5]))
                inward = {0: (1, 0, 0), 1: (-1, 0, 0), 4: (0, 0, 1), 5: (0, 0, -1)}[face]
                theta = math.atan2(inward[0], inward[2])
                pos = np.array([0.0 if face == 0 else w, rng.uniform(*_WALL_MOUNTED[name]), 0.0 if face == 4 else d])
                along = 2 if face < 2 else 0
                pos[along] = rng.uniform(radius + 0.2, room[along] - radius - 0.2)
                foot = None
            elif name in _ON_TABLE and table is not None and rng.random() < 0.7:
                theta = rng.uniform(0, 2 * math.pi)
                local = np.array([rng.uniform(-0.4, 0.4), 0.77, rng.uniform(-0.25, 0.25)])
                pos = table["centre_floor"] + table["rot"].T @ local
                foot = None
            else:
                theta = rng.uniform(0, 2 * math.pi)
                pos = np.array([rng.uniform(radius + 0.1, w - radius - 0.1), 0.0,
                                rng.uniform(radius + 0.1, d - radius - 0.1)])
                foot = radius
            if foot is None or all(o["foot"] is None or np.hypot(*(pos - o["pos"])[[0, 2]]) > foot + o["foot"] + 0.1
                                   for o in objects):
                placed = (pos, theta, foot)
                break
        if placed is None:
            continue
        pos, theta, foot = placed
        rot = _rot_y(theta)
        colour = {key: np.array(pal[rng.integers(len(pal))]) * rng.uniform(0.9, 1.1, 3)
                  for key, pal in _PALETTES.items()}
        for part in parts:
            prot = rot if part.tilt is None else np.array(part.tilt) @ rot
            parts_out[part.kind].append({
                "rot": prot, "centre": pos + rot.T @ np.array(part.offset, dtype=np.float64),
                "size": np.resize(np.array(part.size, dtype=np.float64), 3), "seg": CLASS_ID[name],
                "colour": np.clip(colour[part.palette], 0, 1), "texture": _TEX[part.texture],
                "freq": rng.uniform(6.0, 14.0)})
        centre = pos + rot.T @ np.array([0.0, height / 2, 0.0]) if name not in _WALL_MOUNTED else pos
        objects.append({"name": name, "cls": CLASS_ID[name], "pos": pos, "centre": centre, "foot": foot})
        if name == "dining_table" and table is None:
            table = {"centre_floor": pos, "rot": rot}

    prims, pid = [], 1
    for kind, plist in parts_out.items():
        if not plist:
            continue
        n = len(plist)
        prims.append(Primitives(
            kind, np.stack([p["rot"] for p in plist]), np.stack([p["centre"] for p in plist]),
            np.stack([p["size"] for p in plist]), np.array([p["seg"] for p in plist]), np.arange(pid, pid + n),
            np.stack([p["colour"] for p in plist]), np.array([p["texture"] for p in plist]),
            np.array([p["freq"] for p in plist])))
        pid += n

    n_lights = int(rng.integers(2, 4))
    lights = np.stack([rng.uniform(0.15, 0.85, n_lights) * w, np.full(n_lights, room[1] - 0.25),
                       rng.uniform(0.15, 0.85, n_lights) * d], axis=1)
    light_rgb = style["light"][None] * rng.uniform(0.7, 1.1, (n_lights, 1)) * (1.8 / n_lights)
    return Scene(room, colours, room_texture, room_freq, windows, prims, objects, lights, light_rgb,
                 float(rng.uniform(0.08, 0.16)), room_type, rng.random((32, 32)))


def make_camera(scene: Scene, seed: int, building: int, point: int, view: int) -> Camera:
    """A camera inside the room, outside every object, looking at the point's target object."""
    rng_target = np.random.default_rng([seed, building, point, 3])
    target_obj = scene.objects[rng_target.integers(len(scene.objects))] if scene.objects else None
    target = (target_obj["centre"] if target_obj else scene.room / 2) + rng_target.uniform(-0.15, 0.15, 3)
    rng = np.random.default_rng([seed, building, point, view, 2])
    w, h, d = scene.room
    pos, far = np.array([w / 2, 1.4, d / 2]), 3.5
    for attempt in range(60):
        cand = np.array([rng.uniform(0.3, w - 0.3), rng.uniform(1.0, min(1.8, h - 0.3)), rng.uniform(0.3, d - 0.3)])
        free = all(o["foot"] is None or np.hypot(*(cand - o["pos"])[[0, 2]]) > o["foot"] + 0.25
                   for o in scene.objects)
        if free and 1.2 < np.linalg.norm(cand - target) < (far if attempt < 40 else np.inf):
            pos = cand
            break
    forward = target - pos
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right = right / np.linalg.norm(right) if np.linalg.norm(right) > 1e-6 else np.array([1.0, 0.0, 0.0])
    up = np.cross(right, forward)
    return Camera(pos, np.stack([right, up, -forward], axis=1), float(rng.uniform(55.0, 75.0)))


def camera_rays(cam: Camera, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit ray directions in world [N, 3] and camera frame [N, 3] (N = size * size, row-major), and
    cos(angle to the optical axis) [N] that turns euclidean depth into z-buffer depth."""
    f = 0.5 * size / math.tan(math.radians(cam.fov_deg) / 2)
    c = (np.arange(size) + 0.5 - size / 2) / f
    x, y = np.meshgrid(c, -c)
    dirs = np.stack([x, y, -np.ones_like(x)], axis=-1).reshape(-1, 3)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return dirs @ cam.rotation.T, dirs, -dirs[:, 2]


# --- ray casting -------------------------------------------------------------------------------------------------

_EPS = 1e-6


def _to_local(pr: Primitives, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """o, d: [N, 3] world -> [P, 3, N] in each primitive's frame (component-major for fast elementwise math)."""
    lo = np.matmul(pr.rot, o.T) - np.matmul(pr.rot, pr.centre[:, :, None])
    return lo, np.matmul(pr.rot, d.T)


def _intersect(pr: Primitives, lo: np.ndarray, ld: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest positive hit distance [P, N] (inf on a miss) and a part code [P, N] (cylinder: 0 side, 1 cap)."""
    size = pr.size[:, :, None]
    ox, oy, oz = lo[:, 0], lo[:, 1], lo[:, 2]
    dx, dy, dz = ld[:, 0], ld[:, 1], ld[:, 2]
    if pr.kind == _BOX:
        inv = 1.0 / np.where(np.abs(ld) < 1e-12, 1e-12, ld)
        t1, t2 = (-size - lo) * inv, (size - lo) * inv
        lo_t, hi_t = np.minimum(t1, t2), np.maximum(t1, t2)
        tn = np.maximum(np.maximum(lo_t[:, 0], lo_t[:, 1]), lo_t[:, 2])
        tf = np.minimum(np.minimum(hi_t[:, 0], hi_t[:, 1]), hi_t[:, 2])
        return np.where((tn <= tf) & (tn > _EPS), tn, np.inf), np.zeros(tn.shape, dtype=np.int8)
    if pr.kind == _SPHERE:
        b = ox * dx + oy * dy + oz * dz
        disc = b * b - (ox * ox + oy * oy + oz * oz - size[:, 0] ** 2)
        t = -b - np.sqrt(np.maximum(disc, 0.0))
        return np.where((disc >= 0) & (t > _EPS), t, np.inf), np.zeros(t.shape, dtype=np.int8)
    r, h = size[:, 0], size[:, 1]
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    disc = b * b - a * (ox * ox + oz * oz - r * r)
    ts = (-b - np.sqrt(np.maximum(disc, 0.0))) / np.maximum(a, 1e-12)
    ys = oy + ts * dy
    t_side = np.where((disc >= 0) & (a > 1e-12) & (ts > _EPS) & (ys >= 0) & (ys <= h), ts, np.inf)
    inv_y = 1.0 / np.where(np.abs(dy) < 1e-12, 1e-12, dy)
    t_cap = np.full_like(t_side, np.inf)
    for plane in (0.0, h):
        tc = (plane - oy) * inv_y
        xc, zc = ox + tc * dx, oz + tc * dz
        t_cap = np.minimum(t_cap, np.where((tc > _EPS) & (xc * xc + zc * zc <= r * r), tc, np.inf))
    return np.minimum(t_side, t_cap), (t_cap < t_side).astype(np.int8)


def _room_hit(room: np.ndarray, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exit distance [N] from inside the room box and the face hit [N] (0 -x, 1 +x, 2 floor, 3 ceiling, 4 -z, 5 +z)."""
    inv = 1.0 / np.where(np.abs(d) < 1e-12, 1e-12, d)
    tmax = np.maximum(-o * inv, (room - o) * inv)
    axis = tmax.argmin(1)
    t = tmax[np.arange(len(o)), axis]
    face = 2 * axis + (d[np.arange(len(o)), axis] > 0)
    return t, face


RAY_CHUNK = 1 << 15  # rays per batch, bounding the [primitives, 3, rays] temporaries at large image sizes


def cast(scene: Scene, o: np.ndarray, d: np.ndarray) -> dict[str, np.ndarray]:
    """Primary hits for rays o, d: [N, 3]. Returns t [N], pid [N] (0 = room), code [N] (room face or part)."""
    if len(o) > RAY_CHUNK:
        parts = [cast(scene, o[i:i + RAY_CHUNK], d[i:i + RAY_CHUNK]) for i in range(0, len(o), RAY_CHUNK)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    t, code = _room_hit(scene.room, o, d)
    pid = np.zeros(len(o), dtype=np.int64)
    rays = np.arange(len(o))
    for pr in scene.prims:
        tp, cp = _intersect(pr, *_to_local(pr, o, d))
        best = tp.argmin(0)
        tb = tp[best, rays]
        closer = tb < t
        t = np.where(closer, tb, t)
        pid = np.where(closer, pr.pid[best], pid)
        code = np.where(closer, cp[best, rays], code)
    return {"t": t, "pid": pid, "code": code}


def occluded(scene: Scene, o: np.ndarray, d: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """True where an object lies on the segment o + t d, 0 < t < dist (shadow rays; the room never occludes)."""
    if len(o) > RAY_CHUNK:
        return np.concatenate([occluded(scene, o[i:i + RAY_CHUNK], d[i:i + RAY_CHUNK], dist[i:i + RAY_CHUNK])
                               for i in range(0, len(o), RAY_CHUNK)])
    out = np.zeros(len(o), dtype=bool)
    for pr in scene.prims:
        tp, _ = _intersect(pr, *_to_local(pr, o, d))
        out |= (tp < dist[None]).any(0)
    return out


def _surface(scene: Scene, o: np.ndarray, d: np.ndarray, hit: dict) -> dict[str, np.ndarray]:
    """World normals [N, 3], texture coordinates [N, 2], principal curvatures [N, 2], colour [N, 3],
    texture code [N], frequency [N], semantic id [N] and surface-patch id [N] at the hit points."""
    n = len(o)
    p = o + hit["t"][:, None] * d
    normal, uv = np.zeros((n, 3)), np.zeros((n, 2))
    curv, colour = np.zeros((n, 2)), np.zeros((n, 3))
    texture, freq = np.zeros(n, dtype=np.int64), np.zeros(n)
    seg, patch = np.ones(n, dtype=np.int64), hit["pid"] * 8 + hit["code"]

    room = hit["pid"] == 0
    face = hit["code"][room]
    axis = face // 2
    nr = np.zeros((room.sum(), 3))
    nr[np.arange(len(face)), axis] = np.where(face % 2 == 1, -1.0, 1.0)  # pointing into the room
    normal[room] = nr
    pr_ = p[room]
    uv[room] = np.stack([np.where(axis == 0, pr_[:, 2], pr_[:, 0]), np.where(axis == 1, pr_[:, 2], pr_[:, 1])], 1)
    colour[room], texture[room], freq[room] = scene.room_colour[face], scene.room_texture[face], scene.room_freq[face]

    for pr in scene.prims:
        sel = np.nonzero((hit["pid"] >= pr.pid[0]) & (hit["pid"] <= pr.pid[-1]))[0]
        if not len(sel):
            continue
        k = hit["pid"][sel] - pr.pid[0]
        rot, size = pr.rot[k], pr.size[k]
        lp = np.einsum("mij,mj->mi", rot, p[sel] - pr.centre[k])
        if pr.kind == _BOX:
            ax = np.abs(lp / size).argmax(1)
            ln = np.zeros_like(lp)
            ln[np.arange(len(sel)), ax] = np.sign(lp[np.arange(len(sel)), ax])
            u_ax, v_ax = (ax + 1) % 3, (ax + 2) % 3
            luv = np.stack([lp[np.arange(len(sel)), u_ax], lp[np.arange(len(sel)), v_ax]], 1)
            patch[sel] = hit["pid"][sel] * 8 + 2 * ax + (ln.sum(1) > 0)
        elif pr.kind == _SPHERE:
            r = size[:, 0]
            ln = lp / r[:, None]
            luv = np.stack([np.arctan2(ln[:, 2], ln[:, 0]) * r, np.arcsin(np.clip(ln[:, 1], -1, 1)) * r], 1)
            curv[sel] = (1.0 / r)[:, None]
        else:
            r = size[:, 0]
            cap = hit["code"][sel] == 1
            ln = np.where(cap[:, None], np.array([0.0, 1.0, 0.0]) * np.sign(lp[:, 1:2] - size[:, 1:2] / 2),
                          np.stack([lp[:, 0], np.zeros(len(sel)), lp[:, 2]], 1) / r[:, None])
            luv = np.where(cap[:, None], lp[:, [0, 2]],
                           np.stack([np.arctan2(lp[:, 2], lp[:, 0]) * r, lp[:, 1]], 1))
            curv[sel, 0] = np.where(cap, 0.0, 1.0 / r)
        normal[sel] = np.einsum("mji,mj->mi", rot, ln)
        uv[sel], colour[sel], texture[sel], freq[sel] = luv, pr.colour[k], pr.texture[k], pr.freq[k]
        seg[sel] = pr.seg[k]
    return {"p": p, "normal": normal, "uv": uv, "curv": curv, "colour": colour, "texture": texture, "freq": freq,
            "seg": seg, "patch": patch}


def _in_window(scene: Scene, p: np.ndarray, hit: dict) -> np.ndarray:
    """True where a ray left the room through a window (no geometry, so no depth: Taskonomy's 65535)."""
    out = np.zeros(len(p), dtype=bool)
    for face, u0, u1, v0, v1, _ in scene.windows:
        u = p[:, 2] if face < 2 else p[:, 0]
        out |= (hit["pid"] == 0) & (hit["code"] == int(face)) & (u >= u0) & (u <= u1) & (p[:, 1] >= v0) & (
            p[:, 1] <= v1)
    return out


def _pattern(uv: np.ndarray, texture: np.ndarray, freq: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Procedural texture value in [0, 1] per point: plain, stripes, checker or bilinear value noise."""
    s = uv * freq[:, None]
    stripes = 0.5 + 0.5 * np.tanh(4.0 * np.sin(2 * np.pi * s[:, 0] / 2))
    checker = ((np.floor(s[:, 0]) + np.floor(s[:, 1])) % 2).astype(np.float64)
    g = s * 1.5
    i0 = np.floor(g).astype(np.int64)
    fr = g - i0
    size = noise.shape[0]

    def lattice(di: int, dj: int) -> np.ndarray:
        return noise[(i0[:, 0] + di) % size, (i0[:, 1] + dj) % size]

    fx, fy = fr[:, 0], fr[:, 1]
    nz = (lattice(0, 0) * (1 - fx) + lattice(1, 0) * fx) * (1 - fy) + (lattice(0, 1) * (1 - fx)
                                                                       + lattice(1, 1) * fx) * fy
    return np.select([texture == TEX_STRIPES, texture == TEX_CHECKER, texture == TEX_NOISE],
                     [stripes, checker, nz], 0.5)


# --- 2-D label maps ------------------------------------------------------------------------------------------------


def _harris(channels: np.ndarray, k: float = 0.05) -> np.ndarray:
    """Harris corner response of a multi-channel image [C, H, W] (structure tensor summed over channels)."""
    sxx = syy = sxy = 0.0
    for ch in channels.astype(np.float32):
        ix = cv2.Sobel(ch, cv2.CV_32F, 1, 0, ksize=3) / 8
        iy = cv2.Sobel(ch, cv2.CV_32F, 0, 1, ksize=3) / 8
        sxx, syy, sxy = sxx + ix * ix, syy + iy * iy, sxy + ix * iy
    sxx, syy, sxy = (cv2.GaussianBlur(a, (0, 0), 1.0) for a in (sxx, syy, sxy))
    return sxx * syy - sxy * sxy - k * (sxx + syy) ** 2


def _heatmap(response: np.ndarray, scale: float) -> np.ndarray:
    r = np.maximum(response, 0.0) / scale
    return cv2.GaussianBlur((r / (1.0 + r)).astype(np.float32), (0, 0), 0.8)


def _texture_edges(grey: np.ndarray) -> np.ndarray:
    """Canny-like edges of an image [H, W]: Gaussian blur, Sobel magnitude, non-maximum suppression, soft threshold."""
    g = cv2.GaussianBlur(grey.astype(np.float32), (0, 0), 1.0)
    gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3) / 8, cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3) / 8
    mag = np.hypot(gx, gy)
    sector = (np.round(np.arctan2(gy, gx) / (np.pi / 4)) % 4).astype(np.int64)  # 0 -, 1 \, 2 |, 3 /
    pad = np.pad(mag, 1, mode="edge")
    h, w = mag.shape

    def sh(dy: int, dx: int) -> np.ndarray:
        return pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    n1 = np.choose(sector, [sh(0, 1), sh(1, 1), sh(1, 0), sh(1, -1)])
    n2 = np.choose(sector, [sh(0, -1), sh(-1, -1), sh(-1, 0), sh(-1, 1)])
    thin = np.where((mag >= n1) & (mag >= n2), mag, 0.0)
    return np.clip((thin - 0.01) / 0.08, 0.0, 1.0).astype(np.float32)


def _occlusion_edges(depth: np.ndarray, pid: np.ndarray) -> np.ndarray:
    """Occlusion boundaries [H, W]: neighbouring pixels on different surfaces with a relative depth jump > 3 %."""
    edge = np.zeros(depth.shape, dtype=bool)
    for axis in (0, 1):
        d0, d1 = np.moveaxis(depth, axis, 0)[:-1], np.moveaxis(depth, axis, 0)[1:]
        p0, p1 = np.moveaxis(pid, axis, 0)[:-1], np.moveaxis(pid, axis, 0)[1:]
        jump = (p0 != p1) & (np.abs(d0 - d1) > 0.03 * np.minimum(d0, d1))
        e = np.moveaxis(edge, axis, 0)
        e[:-1] |= jump & (d0 < d1)  # mark the occluding (nearer) side
        e[1:] |= jump & (d1 < d0)
    soft = cv2.GaussianBlur(edge.astype(np.float32), (0, 0), 0.8)
    return np.clip(soft / 0.45, 0.0, 1.0)


def _rank_values(ids: np.ndarray, key: np.ndarray, valid: np.ndarray, descending: bool) -> np.ndarray:
    """Map region ids [N] to 8-bit-friendly values in [0, 1]: regions ordered by mean `key`, 16 levels."""
    out = np.zeros(ids.shape, dtype=np.float32)
    if not valid.any():
        return out
    uniq, inv = np.unique(ids[valid], return_inverse=True)
    mean = np.bincount(inv, key[valid]) / np.bincount(inv)
    order = np.argsort(-mean if descending else mean, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    out[valid] = ((rank[inv] % 16) * 16 + 8) / 255.0
    return out


def _soft_labels(scene: Scene, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """class_object [1000] from the visible area of each object class (plus a little for classes in the room but
    out of view), class_scene [365] from the room type and how typical the visible classes are of each room."""
    area = np.bincount(seg.ravel().clip(0), minlength=18)[2:18].astype(np.float64)
    present = np.zeros(16)
    for o in scene.objects:
        present[o["cls"] - 2] = 1.0
    share = 0.9 * area / max(area.sum(), 1.0) + 0.1 * present / max(present.sum(), 1.0)
    obj = np.zeros(1000, dtype=np.float32)
    for i, name in enumerate(SEMANTIC_CLASSES):
        obj[IMAGENET_INDEX[name]] += share[i]
    typical = np.array([sum(area[CLASS_ID[c] - 2] for c in ROOM_TYPES[r][1]) for r in ROOM_NAMES])
    typical = typical / typical.sum() if typical.sum() > 0 else np.full(len(ROOM_NAMES), 1 / len(ROOM_NAMES))
    scene_p = np.zeros(365, dtype=np.float32)
    for r, p in zip(ROOM_NAMES, 0.25 * typical, strict=True):
        scene_p[ROOM_TYPES[r][0]] += p
    scene_p[ROOM_TYPES[scene.room_type][0]] += 0.75
    return obj / obj.sum(), scene_p / scene_p.sum()


def render_view(scene: Scene, cam: Camera, size: int) -> dict[str, np.ndarray]:
    """Render every domain of one view in its decoded form (what `TaskSpec.decode` returns for the files).

    Returns rgb float [3, S, S] in [0, 1], valid bool [S, S] (False through windows), depth_* [1, S, S] metres,
    normal [3, S, S] camera-frame unit vectors (0 where invalid), reshading [3, S, S], principal_curvature
    [2, S, S] (x CURVATURE_SCALE), edge_*/keypoints* [1, S, S] in [0, 1], segment_semantic long [S, S]
    (IGNORE_INDEX where invalid), segment_unsup* [1, S, S], class_object [1000], class_scene [365].
    """
    d, d_cam, cos_axis = camera_rays(cam, size)
    o = np.broadcast_to(cam.position, d.shape)
    hit = cast(scene, o, d)
    surf = _surface(scene, o, d, hit)
    valid = ~_in_window(scene, surf["p"], hit)

    n = surf["normal"]
    pattern = _pattern(surf["uv"], surf["texture"], surf["freq"], scene.noise)
    albedo = surf["colour"] * (0.65 + 0.35 * pattern[:, None])
    light = np.full((len(d), 3), scene.ambient)
    origin = surf["p"] + 1e-4 * n
    for pos, rgb in zip(scene.lights, scene.light_rgb, strict=True):
        to_l = pos - surf["p"]
        dist = np.linalg.norm(to_l, axis=1)
        ldir = to_l / dist[:, None]
        lam = np.maximum((n * ldir).sum(1), 0.0)
        lit = valid & (lam > 0)
        vis = np.zeros(len(d))
        idx = np.nonzero(lit)[0]
        vis[idx] = ~occluded(scene, origin[idx], ldir[idx], dist[idx])
        light += (lam * vis / (1.0 + 0.08 * dist * dist))[:, None] * rgb
    sky = np.array([0.75, 0.85, 1.0]) * (0.85 + 0.15 * d[:, 1:2].clip(0, 1))
    rgb = np.where(valid[:, None], albedo * light, sky)
    rgb = np.clip(rgb, 0.0, 1.0) ** (1 / 2.2)

    shape = (size, size)
    n_cam = n @ cam.rotation  # world -> camera frame (rotation is orthonormal)
    n_cam[~valid] = 0.0
    depth = np.where(valid, hit["t"], 0.0)
    seg = np.where(valid, surf["seg"], IGNORE_INDEX).reshape(shape)
    grey = (rgb @ np.array([0.299, 0.587, 0.114])).reshape(shape)
    pid_map = np.where(valid, hit["pid"], -1).reshape(shape)
    depth_fill = np.where(valid, hit["t"], INVALID_DEPTH_FILL).reshape(shape)
    normal_img = n_cam.T.reshape(3, *shape)
    unsup25 = _rank_values(surf["patch"], hit["t"], valid, descending=False)
    ids2 = surf["patch"] * 2 + (pattern > 0.5)  # patches split by texture phase
    inv2 = np.unique(ids2, return_inverse=True)[1]
    unsup2 = _rank_values(ids2, np.bincount(inv2)[inv2].astype(np.float64), valid, descending=True)
    class_object, class_scene = _soft_labels(scene, seg)
    shading = np.where(valid, np.clip(n_cam @ RESHADING_LIGHT, 0.0, 1.0), 0.0).reshape(shape)
    curv = np.where(valid[:, None], np.clip(surf["curv"] * CURVATURE_SCALE, -1.0, 1.0), 0.0)
    return {
        "rgb": rgb.T.reshape(3, *shape).astype(np.float32),
        "valid": valid.reshape(shape),
        "depth_euclidean": depth.reshape(1, *shape).astype(np.float32),
        "depth_zbuffer": (depth * cos_axis).reshape(1, *shape).astype(np.float32),
        "normal": normal_img.astype(np.float32),
        "reshading": np.repeat(shading[None], 3, axis=0).astype(np.float32),
        "principal_curvature": curv.T.reshape(2, *shape).astype(np.float32),
        "edge_occlusion": _occlusion_edges(depth_fill, pid_map)[None],
        "edge_texture": _texture_edges(grey)[None],
        "keypoints2d": _heatmap(_harris(grey[None]), 5e-5)[None],
        "keypoints3d": _heatmap(_harris(normal_img), 2e-3)[None],
        "segment_semantic": seg.astype(np.int64),
        "segment_unsup2d": unsup2.reshape(1, *shape),
        "segment_unsup25d": unsup25.reshape(1, *shape),
        "class_object": class_object,
        "class_scene": class_scene,
    }


def render_sample(seed: int, building: int, point: int, view: int, size: int) -> dict[str, np.ndarray]:
    """Render one image of the suite exactly as `synthesize` writes it (before 8/16-bit quantisation)."""
    scene = make_scene(seed, building, point)
    return render_view(scene, make_camera(scene, seed, building, point, view), size)


# --- writing the suite ----------------------------------------------------------------------------------------


def encode_domain(domain: str, labels: dict[str, np.ndarray]) -> np.ndarray:
    """The array stored on disk for `domain` (through the task registry's encoder, as the loader decodes it)."""
    value = labels[domain]
    if domain == "rgb":
        return np.clip(np.round(value.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
    spec = get_task(domain)
    if domain.startswith("depth_"):
        return spec.encode(value, labels["valid"])
    return spec.encode(value)


def file_name(point: int, view: int, domain: str) -> str:
    ext = "png" if domain == "rgb" else get_task(domain).file_ext
    return f"point_{point}_view_{view}_domain_{domain}.{ext}"


def building_name(index: int) -> str:
    return f"synth{index:03d}"


def split_buildings(names: list[str]) -> dict[str, list[str]]:
    """Building-level split, about 70/15/15 with at least one building in each of train, val and test."""
    n = len(names)
    n_eval = max(1, round(0.15 * n))
    return {"train": names[:n - 2 * n_eval], "val": names[n - 2 * n_eval:n - n_eval], "test": names[n - n_eval:]}


def _render_job(job: tuple) -> int:
    """Render and write the views of one (building, point); returns the number of images written."""
    out, seed, b, p, n_views, size, domains = job
    scene = make_scene(seed, b, p)
    out = Path(out)
    for v in range(n_views):
        labels = render_view(scene, make_camera(scene, seed, b, p, v), size)
        for dom in domains:
            path = out / dom / building_name(b) / file_name(p, v, dom)
            arr = encode_domain(dom, labels)
            if path.suffix == ".npy":
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, arr)
            else:
                write_image(path, arr)
    return n_views


def _init_worker() -> None:
    cv2.setNumThreads(1)


def _pool_context():
    """Fresh "spawn" workers (forking a process that already runs torch or OpenMP threads can deadlock), except
    when the main script cannot be re-imported by a spawned child (`python - < script`), where fork is the only
    way."""
    main_file = getattr(sys.modules["__main__"], "__file__", None)
    if main_file and not Path(main_file).exists() and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


@dataclass
class SynthSummary:
    """What `synthesize` wrote (or found already written)."""

    root: str
    images: int
    size: int
    seed: int
    buildings: list[str]
    splits: dict[str, list[str]]
    domains: list[str]
    seconds: float
    views_per_point: int = VIEWS_PER_POINT
    reused: bool = False
    version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)


def synthesize(out: str | Path, images: int = 256, size: int = 128, seed: int = 0, buildings: int | None = None,
               workers: int = 1, domains: tuple[str, ...] | list[str] | None = None) -> SynthSummary:
    """Render `images` views of `size` x `size` into `out` in the Taskonomy layout, with `out/splits/*.txt`.

    Deterministic in (images, size, seed, buildings) whatever `workers` is. If `out` already holds a suite made
    with the same settings it is reused; one made with other settings is replaced; any other non-empty folder is
    refused (DataError) so that nothing of the user's is deleted.
    """
    out = Path(out)
    if images < 1 or size < 16:
        raise DataError(f"synthesize: need images >= 1 and size >= 16, got images={images}, size={size}")
    domains = tuple(domains or DOMAINS)
    bad = [d for d in domains if d not in DOMAINS]
    if bad:
        raise DataError(f"synthesize: cannot make domain(s) {', '.join(bad)}; it makes {', '.join(DOMAINS)}")
    if "rgb" not in domains:
        domains = ("rgb", *domains)
    n_b = buildings or max(3, min(8, images // 16))
    if n_b < 3 or n_b > images:
        raise DataError(f"synthesize: buildings must be between 3 and images ({images}), got {n_b}")
    names = [building_name(b) for b in range(n_b)]
    splits = split_buildings(names)
    settings = {"images": images, "size": size, "seed": seed, "buildings": names,
                "domains": sorted(domains), "version": FORMAT_VERSION}

    info_path = out / INFO_FILE
    if info_path.is_file():
        try:
            old = json.loads(info_path.read_text())
        except (OSError, ValueError):
            old = {}
        if {k: old.get(k) for k in settings} == settings:
            return SynthSummary(str(out), images, size, seed, names, splits, list(domains), 0.0, reused=True)
        for d in DOMAINS + ("splits",):
            shutil.rmtree(out / d, ignore_errors=True)
        info_path.unlink()
    elif out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty and holds no synthetic suite ({INFO_FILE}); choose a new folder")

    t0 = time.perf_counter()
    jobs = []
    for b in range(n_b):
        count = images // n_b + (b < images % n_b)
        for p in range(math.ceil(count / VIEWS_PER_POINT)):
            jobs.append((str(out), seed, b, p, min(VIEWS_PER_POINT, count - p * VIEWS_PER_POINT), size, domains))
    out.mkdir(parents=True, exist_ok=True)
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_init_worker) as ex:
            written = sum(ex.map(_render_job, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        written = sum(map(_render_job, jobs))
    (out / "splits").mkdir(exist_ok=True)
    for split, bs in splits.items():  # atomic, like the info file that marks the suite complete (written last)
        text = "".join(f"{b}\n" for b in bs)
        atomic_write(out / "splits" / f"{split}.txt", lambda tmp, text=text: tmp.write_text(text))
    seconds = time.perf_counter() - t0
    summary = SynthSummary(str(out), written, size, seed, names, splits, list(domains), seconds)
    info = asdict(summary) | settings | {"classes": list(SEMANTIC_CLASSES), "proxy_domains": list(PROXY_DOMAINS)}
    atomic_write(info_path, lambda tmp: tmp.write_text(json.dumps(info, indent=1)))
    log.info("synthesized %d images of %dx%d in %.1f s into %s", written, size, size, seconds, out)
    return summary
