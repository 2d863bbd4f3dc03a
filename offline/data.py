"""Tasks and image-caption pairs for the offline pipeline.

A *task* is what one LoRA expert is trained on: a stable name, a one-line description (the text the
service is later queried with) and a list of (image, caption) pairs.

Sources:

* ``synthetic_family`` - 8 colours x 6 shapes of small generated images (DESIGN.md, "A synthetic
  task family that shows the method working"). Related tasks share words and visual features on
  purpose, so that retrieval and generation have something to exploit.
* ``folder_tasks``, ``coco_tasks``, ``csv_tasks`` - real data on disk.

Loaders never crash a long job on one bad file: unreadable images are logged, recorded in a
``LoadReport`` and skipped; tasks left without pairs are dropped and reported. Problems with the
whole input (a missing root folder, malformed JSON, a CSV without the required columns) still raise,
because nothing useful can be loaded from it.

Pure Python/PIL/numpy on purpose: this module must not import torch, fastapi or redis.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from offline.phrasing import build_phrasings

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})


@dataclass(frozen=True)
class Pair:
    image: Image.Image  # RGB, fully loaded
    caption: str


@dataclass
class Task:
    name: str  # stable, filesystem-safe id, e.g. "red-circle"
    description: str  # e.g. "a photo of a red circle"
    pairs: list[Pair]
    # Other build-side wordings of the description (offline/phrasing.py), the description first; empty when the
    # data has none. The transfer router and the domain gate are fitted and validated on them.
    phrasings: tuple[str, ...] = ()


@dataclass
class LoadReport:
    """What a loader skipped, so that a long job can report it instead of crashing."""

    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


# --------------------------------------------------------------------------------------------------
# Synthetic family
# --------------------------------------------------------------------------------------------------

# Saturated shape colours, chosen to be far apart in RGB and from every background below.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (130, 40, 170),
    "pink": (245, 130, 190),
    "cyan": (40, 210, 220),
}
# Muted backgrounds, none close to a shape colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "beige": (215, 200, 170),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
# Half-extent of a shape as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.11, "large": 0.20}
# Shape centre as a fraction of the image side; quadrant centres keep large shapes inside the image.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
# Every word of the family's captions (the vocabulary offline/phrasing.py builds on).
FAMILY_WORDS: tuple[str, ...] = (*COLOURS, *SHAPES, *SIZES, *POSITIONS, *BACKGROUNDS)

_SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges for almost no cost
_JITTER = 0.03  # random shift of the centre, as a fraction of the side, so no two images coincide
_NOISE = 10  # light uniform pixel noise, +-10 of 255: texture without hiding the shape


def _polygon(cx: float, cy: float, radii: Iterable[float], start_deg: float = -90.0) -> list[tuple[float, float]]:
    """Vertices at equal angular steps around (cx, cy), one per radius."""
    radii = list(radii)
    step = 2 * math.pi / len(radii)
    start = math.radians(start_deg)
    angles = [start + i * step for i in range(len(radii))]
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles, strict=True)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    """Draw one shape of half-extent r centred at (cx, cy)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = 0.85 * r  # a full-r square looks much bigger than the circle of the same r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, [1.15 * r] * 3), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [1.1 * r, 0.45 * r] * 5), fill=fill)
    elif shape == "cross":
        w = 0.33 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(0.4 * r)))
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _pick(rng: np.random.Generator, options: dict[str, object]) -> str:
    """A uniformly random key of options (cheaper than rng.choice, which builds an array)."""
    keys = list(options)
    return keys[int(rng.integers(len(keys)))]


def _synthetic_pair(colour: str, shape: str, image_size: int, rng: np.random.Generator) -> Pair:
    """One random image of a coloured shape and the caption that describes it."""
    size, position, bg = (_pick(rng, options) for options in (SIZES, POSITIONS, BACKGROUNDS))

    side = image_size * _SUPERSAMPLE
    fx, fy = POSITIONS[position]
    cx, cy = (np.array([fx, fy]) + rng.uniform(-_JITTER, _JITTER, size=2)) * side
    radius = SIZES[size] * rng.uniform(0.9, 1.1) * side

    canvas = Image.new("RGB", (side, side), BACKGROUNDS[bg])
    _draw_shape(ImageDraw.Draw(canvas), shape, float(cx), float(cy), float(radius), COLOURS[colour])
    pixels = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.int16)
    noise = rng.integers(-_NOISE, _NOISE + 1, size=pixels.shape, dtype=np.int16)
    image = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))

    return Pair(image=image, caption=f"a {size} {colour} {shape} at the {position} on a {bg} background")


def synthetic_family(n_pairs: int = 80, image_size: int = 32, seed: int = 0) -> list[Task]:
    """48 tasks "<colour>-<shape>", each with n_pairs random images of that coloured shape.

    Deterministic given the arguments. Each task draws from its own generator seeded with
    (seed, task index), so a task's pairs do not depend on the other tasks.
    """
    if n_pairs < 0 or image_size < 8:
        raise ValueError(f"need n_pairs >= 0 and image_size >= 8, got {n_pairs}, {image_size}")
    tasks = []
    for index, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        rng = np.random.default_rng([seed, index])
        pairs = [_synthetic_pair(colour, shape, image_size, rng) for _ in range(n_pairs)]
        phrasings = build_phrasings(colour, shape)  # the library template first
        tasks.append(Task(name=f"{colour}-{shape}", description=phrasings[0], pairs=pairs, phrasings=phrasings))
    return tasks


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def split_tasks(tasks: list[Task], n_unseen: int, seed: int) -> tuple[list[Task], list[Task]]:
    """(seen, unseen): n_unseen tasks held out, chosen by seed.

    The choice depends only on the set of task names and the seed (not on the input order), so
    loaders that list tasks in a different order still agree. Both lists keep the input order.
    """
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError("task names must be unique to split them")
    if not 0 <= n_unseen <= len(tasks):
        raise ValueError(f"n_unseen={n_unseen} out of range for {len(tasks)} tasks")
    unseen_names = set(random.Random(seed).sample(sorted(names), n_unseen))
    seen = [t for t in tasks if t.name not in unseen_names]
    unseen = [t for t in tasks if t.name in unseen_names]
    return seen, unseen


def split_pairs(task: Task, n_test: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, test): n_test of the task's pairs held out, chosen by seed and the task's name.

    Mixing in the name gives each task a different split under one seed. Both lists keep the
    original pair order.
    """
    if not 0 <= n_test <= len(task.pairs):
        raise ValueError(f"n_test={n_test} out of range for task {task.name!r} with {len(task.pairs)} pairs")
    # A str seed is hashed with SHA-512 by `random`, so it is stable across runs and PYTHONHASHSEED.
    test_idx = set(random.Random(f"{seed}:{task.name}").sample(range(len(task.pairs)), n_test))
    train = [p for i, p in enumerate(task.pairs) if i not in test_idx]
    test = [p for i, p in enumerate(task.pairs) if i in test_idx]
    return train, test


# --------------------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------------------


def _skip(report: LoadReport | None, path: str | Path, reason: str) -> None:
    """Record and log something a loader had to leave out."""
    logger.warning("skipping %s: %s", path, reason)
    if report is not None:
        report.skipped.append((str(path), reason))


def _load_image(path: Path, report: LoadReport | None) -> Image.Image | None:
    """The image at path as a fully decoded RGB image, or None (reported) if it cannot be read."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file must fail here, not in a training step
            return img.convert("RGB")
    # PIL raises many types for bad input (OSError, SyntaxError, ValueError, struct.error,
    # DecompressionBombError...); any of them means "this one file is unusable", never "stop the job".
    except Exception as exc:  # noqa: BLE001
        _skip(report, path, f"{type(exc).__name__}: {exc}")
        return None


class _ImageCache:
    """Loads each path once: datasets often have several captions per image."""

    def __init__(self, report: LoadReport | None) -> None:
        self._report = report
        self._images: dict[Path, Image.Image | None] = {}

    def get(self, path: Path) -> Image.Image | None:
        if path not in self._images:
            self._images[path] = _load_image(path, self._report)
        return self._images[path]


def _words(label: str) -> str:
    """A label as words for a prompt: underscores and repeated spaces become single spaces."""
    return " ".join(label.replace("_", " ").split())


def _slug(label: str, taken: set[str]) -> str:
    """A filesystem-safe, unique task name for label (e.g. "traffic light" -> "traffic-light")."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", label.strip()).strip("-.") or "task"
    name, n = base, 2
    while name in taken:  # distinct labels can share a slug ("a b" and "a-b")
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def _empty_task(label: str, taken: set[str]) -> Task:
    """A new task for a dataset label: slug name, "a photo of a <label>" description, no pairs yet."""
    return Task(name=_slug(label, taken), description=f"a photo of a {_words(label)}", pairs=[])


def _nonempty_tasks(tasks: list[Task], report: LoadReport | None, where: str | Path) -> list[Task]:
    """Drop (and report) tasks whose every pair was skipped."""
    for task in tasks:
        if not task.pairs:
            _skip(report, where, f"task {task.name!r} has no loadable pairs; dropped")
    return [t for t in tasks if t.pairs]


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


def folder_tasks(root: Path, report: LoadReport | None = None) -> list[Task]:
    """One task per sub-folder of root: root/<class>/*.jpg|jpeg|png|webp.

    The task name is the folder name; description and every caption are "a photo of a <class>"
    (underscores read as spaces). Folders and files are read in sorted order for reproducibility.
    Files with other suffixes and hidden entries are ignored; unreadable images are skipped and
    reported, as are folders left without images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {root} does not exist")
    tasks = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        description = f"a photo of a {_words(folder.name)}"
        pairs = []
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            image = _load_image(path, report)
            if image is not None:
                pairs.append(Pair(image=image, caption=description))
        if not pairs:
            _skip(report, folder, "no loadable images; task dropped")
            continue
        tasks.append(Task(name=folder.name, description=description, pairs=pairs))
    return tasks


def coco_tasks(captions_json: Path, images_dir: Path, report: LoadReport | None = None) -> list[Task]:
    """Tasks from a COCO-captions-style JSON.

    Expected: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}, each
    annotation giving one (image, caption) pair with the image at images_dir/file_name.

    Grouping (our choice, since COCO captions carry no task notion):
    * if the JSON has non-empty "categories" [{"id", "name"}] and annotations carry "category_id",
      there is one task per category, named by a slug of the category name and described
      "a photo of a <name>"; annotations without a known category_id are skipped and reported;
    * otherwise all pairs form a single task named after the JSON file's stem, described
      "a photo of a <stem>" (underscores read as spaces).

    Bad annotations (unknown image, empty caption) and unreadable images are skipped and reported.
    Each image file is loaded once however many captions it has.
    """
    captions_json, images_dir = Path(captions_json), Path(images_dir)
    data = json.loads(captions_json.read_text(encoding="utf-8"))
    files = {img["id"]: img["file_name"] for img in data.get("images", [])}
    annotations = data.get("annotations", [])
    categories = {c["id"]: c["name"] for c in data.get("categories") or []}
    by_category = bool(categories) and any("category_id" in a for a in annotations)

    # One Task per category (or the single file task), in first-seen order.
    taken: set[str] = set()
    tasks: dict[object, Task] = {}

    def task_for(key: object, label: str) -> Task:
        if key not in tasks:
            tasks[key] = _empty_task(label, taken)
        return tasks[key]

    cache = _ImageCache(report)
    for i, ann in enumerate(annotations):
        where = f"{captions_json}#annotations[{i}]"
        caption = str(ann.get("caption") or "").strip()
        if not caption:
            _skip(report, where, "empty or missing caption")
            continue
        if ann.get("image_id") not in files:
            _skip(report, where, f"unknown image_id {ann.get('image_id')!r}")
            continue
        if by_category and ann.get("category_id") not in categories:
            _skip(report, where, f"unknown or missing category_id {ann.get('category_id')!r}")
            continue
        if by_category:
            task = task_for(ann["category_id"], categories[ann["category_id"]])
        else:
            task = task_for(None, captions_json.stem)
        image = cache.get(images_dir / files[ann["image_id"]])
        if image is not None:
            task.pairs.append(Pair(image=image, caption=caption))
    return _nonempty_tasks(list(tasks.values()), report, captions_json)


def csv_tasks(path: Path, report: LoadReport | None = None) -> list[Task]:
    """Tasks from a CSV with header image,caption,task (other columns are ignored).

    Image paths are relative to the CSV's folder (absolute paths also work). One task per distinct
    "task" value, in first-seen order, named by a slug of it and described "a photo of a <task>"
    (underscores read as spaces). Rows with an empty field and unreadable images are skipped and
    reported; each image file is loaded once however many rows use it.
    """
    path = Path(path)
    taken: set[str] = set()
    tasks: dict[str, Task] = {}
    cache = _ImageCache(report)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"image", "caption", "task"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing CSV columns {sorted(missing)}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            image_rel, caption, label = ((row.get(k) or "").strip() for k in ("image", "caption", "task"))
            if not (image_rel and caption and label):
                _skip(report, where, "row has an empty image, caption or task field")
                continue
            if label not in tasks:
                tasks[label] = _empty_task(label, taken)
            image = cache.get(path.parent / image_rel)
            if image is not None:
                tasks[label].pairs.append(Pair(image=image, caption=caption))
    return _nonempty_tasks(list(tasks.values()), report, path)
