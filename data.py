"""
Samples for every stage: the Shapes world, readers for real image-text data, image transforms, tokenizers.

Florence learns from web image-text pairs (FLD-900M) and Florence-2 from the FLD-5B annotations of its data
engine; neither is something a laptop can download. So by default every stage learns from a procedural world
rendered here (section 1 below): a few coloured shapes on a textured background, deterministic from
(seed, split, index), carrying every annotation the papers' tasks need (captions at three levels of detail,
boxes, polygons, referring expressions, question-answer pairs, OCR words with quads, moving shapes for video).
Six colour-shape compositions never appear in the training split, so zero-shot generalisation is measured on
compositions the model has truly never been told about.

This file yields raw samples (PIL images + annotation dicts in pixels); each stage file turns them into tensors.
It imports no project file.

  1. the Shapes world            ShapesWorld, ShapesVideo
  2. readers for real data       ImageTextFile (csv/tsv/jsonl), TarShards (webdataset), load_image, DataError
  3. image transforms            ImageTransform, resize, center_crop, random_resized_crop, hflip, to_tensor
  4. tokenizers on tiktoken      Tokenizer, get_tokenizer
  5. released weights            read_safetensors, read_weights_folder (transformers model folders)
  6. boxes and COCO files         box_iou, coco_instances (shared by the detector, Florence-2 and the demo)
  7. a noisy web pool            write_pool (Shapes pairs with planted duplicates, tiny images, moved
                                 captions and boilerplate, and a truth file naming each)

`python data.py --out shapes.png` draws a grid of samples with their annotations; `--bench` times rendering.
"""
import csv
import functools
import glob
import hashlib
import io
import json
import math
import os
import random
import struct
import sys
import tarfile
import time

import numpy as np
import tiktoken
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

# ----------------------------------------------------------------------------------------------------------------
# 1. The Shapes world

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
SPLITS = ("train", "val", "test")
# saturated and far apart in RGB, so no colour is confusable with another or with the grey backgrounds
COLOR_RGB = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (35, 75, 225),
             "yellow": (245, 215, 30), "purple": (150, 50, 200), "orange": (250, 130, 20)}
# object extent (longer side of its box) as a fraction of the image side
SIZE_RANGE = {"small": (0.15, 0.25), "large": (0.30, 0.45)}
# a latin diagonal: every colour and every shape is held out exactly once, so each colour and each shape is
# still seen in training (5 of 6 times), only these pairings are new at test time
HELDOUT = frozenset((COLORS[i], SHAPES[(i + 1) % len(SHAPES)]) for i in range(len(COLORS)))
WORDS = ("CAT", "DOG", "SUN", "SKY", "BOX", "MAP", "KEY", "FOX", "HAT", "CUP", "PEN", "BUS", "OWL", "ZOO", "JAR",
         "INK")  # the OCR vocabulary: short uppercase words that are legible at 64 px
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


def compositions(heldout: bool | None = None) -> list[tuple[str, str]]:
    """All (color, shape) pairs in a fixed order; heldout=True only the held-out ones, False only the seen ones."""
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    return pairs if heldout is None else [p for p in pairs if (p in HELDOUT) == heldout]


def _rng(kind: str, seed: int, split: str, index: int) -> random.Random:
    # a stable hash (not Python's salted hash()) so a sample is the same in every process and on every run
    digest = hashlib.blake2b(f"{kind}/{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _unit_outline(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Centre a polygon's box on the origin and scale its longer side to 2, so extent d means a box of side d."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    cx, cy, half = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(max(xs) - min(xs), max(ys) - min(ys)) / 2
    return tuple(((x - cx) / half, (y - cy) / half) for x, y in points)


def _ring(n: int, radii: tuple[float, ...], start_deg: float) -> list[tuple[float, float]]:
    # n points round the origin, radius cycling through `radii` (a star alternates outer and inner points)
    return [(radii[k % len(radii)] * math.cos(math.radians(start_deg + 360 * k / n)),
             radii[k % len(radii)] * math.sin(math.radians(start_deg + 360 * k / n))) for k in range(n)]


# every shape drawn as a filled polygon, so the drawn pixels, the box and the polygon annotation agree exactly
UNIT_OUTLINES = {
    "circle": _unit_outline(_ring(24, (1.0,), 0)),
    "square": _unit_outline([(-1, -1), (1, -1), (1, 1), (-1, 1)]),
    "triangle": _unit_outline([(0, -1), (1, 1), (-1, 1)]),
    "star": _unit_outline(_ring(10, (1.0, 0.45), -90)),
    "hexagon": _unit_outline(_ring(6, (1.0,), 0)),
    # narrower than a square turned 45 degrees, so a rotating square never looks like a diamond
    "diamond": _unit_outline([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]),
}


def _outline(shape: str, cx: float, cy: float, extent: float, angle: float = 0.0) -> list[tuple[float, float]]:
    """The polygon of a shape with its box centred at (cx, cy) and box side `extent`, turned clockwise by `angle`
    degrees about the mean of its corners (a triangle turns about its middle, not about its box centre)."""
    c, s, r = math.cos(math.radians(angle)), math.sin(math.radians(angle)), extent / 2
    points = UNIT_OUTLINES[shape]
    mx, my = sum(x for x, _ in points) / len(points), sum(y for _, y in points) / len(points)
    return [(cx + r * (mx + (x - mx) * c - (y - my) * s), cy + r * (my + (x - mx) * s + (y - my) * c))
            for x, y in points]


def _bounds(points) -> list[float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return [min(xs), min(ys), max(xs), max(ys)]


def _apart(a, b, gap: float) -> bool:
    # two boxes (x0, y0, x1, y1) separated by at least `gap` along some axis
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _hash_noise(h: int, w: int, ox: int, oy: int) -> np.ndarray:
    """Per-pixel noise in [-1, 1] from an integer hash of the pixel coordinates: exact integer arithmetic, so the
    same pixels on every machine (a numpy Generator's stream is not promised to stay the same across versions)."""
    y = np.arange(oy, oy + h, dtype=np.uint32)[:, None]
    x = np.arange(ox, ox + w, dtype=np.uint32)[None, :]
    v = x * np.uint32(374761393) + y * np.uint32(668265263)  # (h, w), wraps mod 2^32 on purpose
    v = (v ^ (v >> np.uint32(13))) * np.uint32(1274126177)
    return ((v >> np.uint32(24)).astype(np.float32) - 127.5) / 127.5


def _background(rng: random.Random, res: int) -> tuple[np.ndarray, str, bool]:
    """A low-contrast, low-saturation texture: grey-ish, so it is never confused with the saturated object colours.
    Returns the (res, res, 3) uint8 pixels, a description for the long caption, and whether it is dark."""
    dark = rng.random() < 0.5
    base = rng.uniform(55, 90) if dark else rng.uniform(150, 185)
    rgb = np.array([base + rng.uniform(-6, 6) for _ in range(3)], dtype=np.float32)
    kind = rng.choice(("noisy", "gradient", "striped"))
    dx, dy = rng.choice(((1, 0), (0, 1), (1, 1), (1, -1)))  # integer directions keep the maths exact
    y = np.arange(res)[:, None]
    x = np.arange(res)[None, :]
    texture = _hash_noise(res, res, rng.randrange(1 << 16), rng.randrange(1 << 16)) * (12 if kind == "noisy" else 4)
    if kind == "gradient":  # a linear ramp of +-15 grey levels along the direction
        x, y = x.astype(np.float32), y.astype(np.float32)
        ramp = (x * dx + y * dy) / (res * (abs(dx) + abs(dy)))  # (res, res) in [0, 1), or (-0.5, 0.5) when dy < 0
        texture = texture + 30 * (ramp - (0.5 if dy >= 0 else 0.0))
    elif kind == "striped":  # bands a few percent of the image wide
        period = max(2, round(res * rng.uniform(0.05, 0.12)))
        band = (x * dx + y * dy) // period % 2  # (res, res) integers 0 / 1
        texture = texture + (16 * band - 8).astype(np.float32)  # +-8; integer floor division is ~10x faster
    pixels = np.empty((res, res, 3), dtype=np.uint8)
    for c in range(3):  # one channel at a time: ~2x faster than clipping the (res, res, 3) float array, same values
        pixels[..., c] = np.clip(texture + rgb[c], 0, 255)
    return pixels, f"{'dark' if dark else 'light'} {kind}", dark


@functools.lru_cache(maxsize=None)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)  # Pillow's built-in font: nothing to download


def _supersample(size: int) -> int:
    # draw small images 2-4x larger and box-filter down: anti-aliased edges keep a 10 px star a star
    return min(4, max(1, math.ceil(128 / size)))


def _where(box, size: float) -> str:
    """Where a box's centre falls on a 3x3 grid of the image, as a phrase: "at the top left", "in the center"."""
    col = min(2, int(3 * (box[0] + box[2]) / 2 / size))
    row = min(2, int(3 * (box[1] + box[3]) / 2 / size))
    return (("at the top left", "at the top", "at the top right"),
            ("on the left", "in the center", "on the right"),
            ("at the bottom left", "at the bottom", "at the bottom right"))[row][col]


def join_phrases(parts: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words  # "an orange circle"


def phrase(count: int, words: str) -> str:
    """(1, "large red circle") -> "a large red circle"; (2, ...) -> "two large red circles". Public: florence2
    names the caption's phrases with it."""
    return _a(words) if count == 1 else f"{NUMBER_WORDS[count]} {words}s"


def _relation(a: dict, b: dict) -> str | None:
    """'left of' / 'right of' / 'above' / 'below' when the boxes are apart along that axis, else None."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["box"], b["box"]
    if ax1 < bx0 or bx1 < ax0:
        return "left of" if ax1 < bx0 else "right of"
    if ay1 < by0 or by1 < ay0:
        return "above" if ay1 < by0 else "below"
    return None


def _referring_expressions(objects: list[dict]) -> None:
    """Give each object a `ref` unique within the image: "the red circle", else "the large red circle", else by
    position ("the red circle on the left"). At most two objects share a composition (see _layout)."""
    for obj in objects:
        twins = [o for o in objects if (o["color"], o["category"]) == (obj["color"], obj["category"])]
        name = f"{obj['color']} {obj['category']}"
        if len(twins) == 1:
            obj["ref"] = f"the {name}"
        elif twins[0]["size"] != twins[1]["size"]:
            obj["ref"] = f"the {obj['size']} {name}"
        else:  # same size too: boxes never overlap, so they are apart along x or along y
            other = twins[1] if obj is twins[0] else twins[0]
            side = {"left of": "on the left", "right of": "on the right", "above": "at the top",
                    "below": "at the bottom"}[_relation(obj, other)]
            obj["ref"] = f"the {name} {side}"


def _questions(rng: random.Random, objects: list[dict], allowed: list[tuple[str, str]]) -> list[dict]:
    """Question-answer pairs that are unambiguous for this image; single-word answers. Negative existence
    questions ask only about `allowed` compositions, so training questions never name a held-out pair."""
    qa = [{"question": "how many shapes are there?", "answer": str(len(objects)), "type": "count"}]
    present = {(o["color"], o["category"]) for o in objects}
    for shape in SHAPES:
        of_shape = [o for o in objects if o["category"] == shape]
        if len(of_shape) == 1:
            qa.append({"question": f"what color is the {shape}?", "answer": of_shape[0]["color"], "type": "color"})
        if of_shape or rng.random() < 0.1:  # sometimes ask about an absent shape: answer 0
            qa.append({"question": f"how many {shape}s are there?", "answer": str(len(of_shape)), "type": "count"})
    for color in COLORS:
        of_color = [o for o in objects if o["color"] == color]
        if len(of_color) == 1:
            qa.append({"question": f"what shape is the {color} object?", "answer": of_color[0]["category"],
                       "type": "shape"})
    for obj in objects:
        if obj["size"] not in obj["ref"]:
            qa.append({"question": f"what size is {obj['ref']}?", "answer": obj["size"], "type": "size"})
    color, shape = rng.choice(sorted(present))
    qa.append({"question": f"is there {_a(color)} {shape}?", "answer": "yes", "type": "exist"})
    absent = [p for p in allowed if p not in present]
    if absent:
        color, shape = rng.choice(absent)
        qa.append({"question": f"is there {_a(color)} {shape}?", "answer": "no", "type": "exist"})
    pairs = [(a, b) for a in objects for b in objects if a is not b and _relation(a, b)]
    for a, b in rng.sample(pairs, min(2, len(pairs))):
        relation = _relation(a, b)
        asked = {"left of": "left of", "right of": "left of", "above": "above", "below": "above"}[relation]
        qa.append({"question": f"is {a['ref']} {asked} {b['ref']}?", "answer": "yes" if relation == asked else "no",
                   "type": "position"})
    return qa


class ShapesWorld:
    """Map-style dataset of single images of 1-3 shapes with every annotation the stages use.
    `ds[i]` is rendered on the fly, deterministically from (seed, split, i); coordinates are pixels of the returned
    image, x right and y down."""

    def __init__(self, split: str = "train", size: int = 64, n: int = 10000, seed: int = 0, min_objects: int = 1,
                 max_objects: int = 3, ocr_prob: float = 0.3):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
        if size < 16:
            raise ValueError(f"image size {size} is too small to draw shapes: use 16 px or more")
        if not 1 <= min_objects <= max_objects <= 6:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 6, got {min_objects}, {max_objects}")
        self.split, self.size, self.n, self.seed = split, size, n, seed
        self.min_objects, self.max_objects, self.ocr_prob = min_objects, max_objects, ocr_prob
        # the held-out rule: a training image never contains a held-out composition, so no training text names one
        self.allowed = compositions(heldout=False) if split == "train" else compositions()

    def __len__(self) -> int:
        return self.n

    def _layout(self, rng: random.Random, count: int) -> list[dict]:
        """Place `count` shapes inside the image with boxes at least 3% of the side apart (no overlap). A large
        shape that does not fit is tried small; if even that fails the whole layout is drawn again."""
        size, margin, gap = self.size, 0.02 * self.size, 0.03 * self.size
        for _ in range(100):
            objects = []
            for _ in range(count):
                color, shape = rng.choice(self.allowed)
                while sum((o["color"], o["category"]) == (color, shape) for o in objects) >= 2:
                    color, shape = rng.choice(self.allowed)  # at most two twins, so refs stay simple
                # the drawn size, then "small" if that does not fit (dict.fromkeys drops a repeated "small")
                for size_name in dict.fromkeys((rng.choice(SIZES), "small")):
                    obj = self._place(rng, shape, color, size_name, objects, margin, gap)
                    if obj:
                        objects.append(obj)
                        break
                else:
                    break
            if len(objects) == count:
                return objects
        raise RuntimeError(f"cannot place {count} shapes in a {size} px image")

    def _place(self, rng, shape, color, size_name, placed, margin, gap) -> dict | None:
        for _ in range(20):
            extent = self.size * rng.uniform(*SIZE_RANGE[size_name])
            x0, y0, x1, y1 = _bounds(_outline(shape, 0, 0, extent))
            cx = rng.uniform(margin - x0, self.size - margin - x1)
            cy = rng.uniform(margin - y0, self.size - margin - y1)
            polygon = [(round(x, 2), round(y, 2)) for x, y in _outline(shape, cx, cy, extent)]
            box = _bounds(polygon)
            if all(_apart(box, o["box"], gap) for o in placed):
                return {"category": shape, "color": color, "size": size_name, "box": box, "points": polygon}
        return None

    def _words(self, rng: random.Random, objects: list[dict], ss: int) -> list[dict]:
        """1-2 words in free space (never over a shape), each with its ink box as a clockwise quad from top-left."""
        size, margin, gap = self.size, 0.02 * self.size, 0.03 * self.size
        if rng.random() >= self.ocr_prob:
            return []
        words, taken = [], [o["box"] for o in objects]
        for text in rng.sample(WORDS, rng.choice((1, 2))):
            font = _font(max(4, round(rng.uniform(0.12, 0.17) * size * ss)))
            left, top, right, bottom = font.getbbox(text)  # ink box relative to the drawing origin, render pixels
            w, h = (right - left) / ss, (bottom - top) / ss
            for _ in range(20):
                if w > size - 2 * margin:
                    break
                x0, y0 = rng.uniform(margin, size - margin - w), rng.uniform(margin, size - margin - h)
                box = [round(x0, 2), round(y0, 2), round(x0 + w, 2), round(y0 + h, 2)]
                if all(_apart(box, t, gap) for t in taken):
                    taken.append(box)
                    words.append({"text": text, "box": box, "font": font, "origin": (x0 * ss - left, y0 * ss - top)})
                    break
        return sorted(words, key=lambda wd: (wd["box"][1], wd["box"][0]))  # reading order: top to bottom

    def __getitem__(self, index: int) -> dict:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        index %= self.n
        rng, size, ss = _rng("image", self.seed, self.split, index), self.size, _supersample(self.size)
        pixels, background, dark = _background(rng, size * ss)
        objects = self._layout(rng, rng.randint(self.min_objects, self.max_objects))
        objects.sort(key=lambda o: (o["box"][0] + o["box"][2], o["box"][1]))  # left to right: captions follow it
        words = self._words(rng, objects, ss)

        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for obj in objects:
            draw.polygon([(x * ss, y * ss) for x, y in obj["points"]], fill=COLOR_RGB[obj["color"]])
        for word in words:
            draw.text(word["origin"], word["text"], font=word["font"], fill=(235, 235, 235) if dark else (20, 20, 20))
        if ss > 1:
            image = image.reduce(ss)

        for obj in objects:
            obj["polygon"] = [v for point in obj.pop("points") for v in point]  # flat x0, y0, x1, y1, ...
        _referring_expressions(objects)
        described = [f"{o['size']} {o['color']} {o['category']}" for o in objects]
        groups = list(dict.fromkeys(described))
        caption = join_phrases([phrase(described.count(g), g) for g in groups])
        sentences = [f"A {d} {_where(o['box'], size)}." for d, o in zip(described, objects)]
        relations = [f"{a['ref'].capitalize()} is {_relation(a, b)} {b['ref']}." for a, b in zip(objects, objects[1:])]
        count = len(objects)
        long = [f"There {'is' if count == 1 else 'are'} {NUMBER_WORDS[count]} shape{'s' * (count > 1)} on a "
                f"{background} background."] + sentences + relations
        if len(words) == 1:
            long.append(f'The word "{words[0]["text"]}" is written {_where(words[0]["box"], size)}.')
        elif words:
            quoted = [f'"{w["text"]}"' for w in words]
            long.append(f"The words {join_phrases(quoted)} are written in the image.")
        return {
            "image": image,
            "caption": caption,
            "detailed_caption": " ".join(sentences),
            "more_detailed_caption": " ".join(long),
            "objects": objects,
            "qa": _questions(rng, objects, self.allowed),
            "ocr": [{"text": w["text"], "quad": [w["box"][0], w["box"][1], w["box"][2], w["box"][1],
                                                 w["box"][2], w["box"][3], w["box"][0], w["box"][3]]} for w in words],
            "split": self.split,
            "index": index,
        }


MOTIONS = ("moving left", "moving right", "moving up", "moving down", "growing", "shrinking", "rotating", "still")
_STEP = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1)}


class ShapesVideo:
    """Map-style dataset of short clips: one or two shapes on a still background, all doing the same motion, for
    the video adapter (Florence section 3.4). The motion cycles with the index, so any range of indices is balanced
    over MOTIONS. Same held-out rule as ShapesWorld."""

    def __init__(self, split: str = "train", size: int = 64, num_frames: int = 8, n: int = 10000, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
        if size < 16 or num_frames < 2:
            raise ValueError(f"need size >= 16 and num_frames >= 2, got {size}, {num_frames}")
        self.split, self.size, self.num_frames, self.n, self.seed = split, size, num_frames, n, seed
        self.allowed = compositions(heldout=False) if split == "train" else compositions()

    def __len__(self) -> int:
        return self.n

    def _track(self, rng: random.Random, motion: str, color: str, shape: str, placed: list[dict]) -> dict | None:
        """One shape's polygon in every frame; its boxes over the whole clip stay inside the image and apart from
        the other shape's."""
        size, margin, gap, frames = self.size, 0.02 * self.size, 0.03 * self.size, self.num_frames
        for _ in range(30):
            size_name = {"growing": "small", "shrinking": "large"}.get(motion) or rng.choice(SIZES)
            extent = size * rng.uniform(*SIZE_RANGE[size_name])
            ux, uy = _STEP.get(motion, (0, 0))
            travel = size * rng.uniform(0.25, 0.4)  # over the whole clip, for the four translations
            grow = {"growing": rng.uniform(0.6, 1.0), "shrinking": -rng.uniform(0.4, 0.55)}.get(motion, 0.0)
            turn = rng.choice((-1, 1)) * rng.uniform(30, 50) if motion == "rotating" else 0.0  # degrees
            ts = [t / (frames - 1) for t in range(frames)]
            # polygons relative to the start centre, then the whole track is placed at once
            track = [_outline(shape, ux * travel * t, uy * travel * t, extent * (1 + grow * t), turn * t) for t in ts]
            x0, y0, x1, y1 = _bounds([p for polygon in track for p in polygon])
            if x1 - x0 > size - 2 * margin or y1 - y0 > size - 2 * margin:
                continue
            cx, cy = rng.uniform(margin - x0, size - margin - x1), rng.uniform(margin - y0, size - margin - y1)
            span = [x0 + cx, y0 + cy, x1 + cx, y1 + cy]
            if all(_apart(span, o["span"], gap) for o in placed):
                polygons = [[(x + cx, y + cy) for x, y in polygon] for polygon in track]
                return {"category": shape, "color": color, "size": size_name, "span": span, "polygons": polygons}
        return None

    def __getitem__(self, index: int) -> dict:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        index %= self.n
        rng, size, ss = _rng("video", self.seed, self.split, index), self.size, _supersample(self.size)
        motion = MOTIONS[index % len(MOTIONS)]
        pixels, _, _ = _background(rng, size * ss)
        # a turning circle looks still, so "rotating" clips use the other shapes
        choices = [p for p in self.allowed if motion != "rotating" or p[1] != "circle"]
        objects = []
        for color, shape in rng.sample(choices, rng.choice((1, 2))):
            obj = self._track(rng, motion, color, shape, objects)
            if obj is None and not objects:
                raise RuntimeError(f"cannot place a {motion} shape in a {size} px clip")
            objects += [obj] if obj else []
        objects.sort(key=lambda o: o["span"][0] + o["span"][2])  # left to right, as in ShapesWorld

        background = Image.fromarray(pixels)
        frames = []
        for t in range(self.num_frames):
            frame = background.copy()
            draw = ImageDraw.Draw(frame)
            for obj in objects:
                draw.polygon([(x * ss, y * ss) for x, y in obj["polygons"][t]], fill=COLOR_RGB[obj["color"]])
            frames.append(frame.reduce(ss) if ss > 1 else frame)
        names = join_phrases([_a(f"{o['color']} {o['category']}") for o in objects])
        return {
            "frames": frames,
            "motion": motion,
            "label": MOTIONS.index(motion),
            "caption": f"{names} {'standing still' if motion == 'still' else motion}",
            "objects": [{"category": o["category"], "color": o["color"], "size": o["size"],
                         "boxes": [[round(v, 2) for v in _bounds(polygon)] for polygon in o["polygons"]]}
                        for o in objects],
            "split": self.split,
            "index": index,
        }


# ----------------------------------------------------------------------------------------------------------------
# 2. Readers for real image-text data. Web data is dirty; a bad record must say where it is and what is wrong
# ("captions.csv:12: field 'caption' is empty"), never surface as a deep traceback from inside a DataLoader.

class DataError(ValueError):
    """A bad input record. The message starts with "<file>:<line>:" (or "<shard>:<key>:") and names the field;
    problems with a whole file (missing, unsupported type, unreadable tar) start with "<file>:" alone."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB. Transparency (an alpha band, or a palette / colour-key "transparency") is composited onto
    white, as the transformers image processors do: plain conversion would keep the colour hidden under alpha 0,
    often black, so a transparent logo would come out on black."""
    if {"A", "a"} & set(img.getbands()) or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path, where: str) -> Image.Image:
    """Open an image file (a path, or the raw bytes of one), apply its EXIF rotation and return it fully decoded as
    RGB (transparency composited onto white, see to_rgb), so a corrupt or truncated file fails here, with `where`
    ("file:line: field 'image'") in the message."""
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as img:
            return to_rgb(ImageOps.exif_transpose(img))
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        what = "cannot decode image bytes" if isinstance(path, bytes) else f"cannot open '{path}'"
        raise DataError(f"{where}: {what}: {getattr(e, 'strerror', None) or e}") from e


def _image_or_skip(reader, source, where: str):
    """load_image for a reader's sample; with reader.skip_bad a bad image gives None and its message is kept in
    reader.skipped instead of raising."""
    try:
        return load_image(source, where)
    except DataError as e:
        if not reader.skip_bad:
            raise
        reader.skipped.append(str(e))
        return None


def _read_text(path: str) -> str:
    # decode the whole file first so that bad UTF-8 is reported with its line number
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text: {e.reason}") from e


class ImageTextFile:
    """(image, caption) pairs listed in a .csv or .tsv file (a header row names the fields) or a .jsonl file (one
    JSON object per line). Rows are validated when the file is read; images are opened lazily by `ds[i]`.
    Image paths are relative to `image_root`, or else to the listing file's folder. With skip_bad=True a bad row is
    dropped and a bad image makes `ds[i]` return None; every skip is appended to `ds.skipped` (inside DataLoader
    workers that list is the worker's copy: count the None samples in the collate function instead)."""
    FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None}  # extension -> column delimiter (None: JSON lines)

    def __init__(self, path, image_root=None, image_field: str = "image", caption_field: str = "caption",
                 skip_bad: bool = False):
        self.path, self.image_field, self.caption_field, self.skip_bad = str(path), image_field, caption_field, skip_bad
        self.image_root = str(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
        self.skipped: list[str] = []
        ext = os.path.splitext(self.path)[1].lower()
        if ext not in self.FORMATS:
            raise DataError(f"{self.path}: unsupported file type '{ext}': use one of {', '.join(self.FORMATS)}")
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: no such file")
        rows = self._json_rows() if ext == ".jsonl" else self._table_rows(self.FORMATS[ext])
        self.items = []  # (image path, caption, "file:line")
        for where, row in rows:
            try:
                if isinstance(row, str):  # a row that could not be parsed: the reason
                    raise DataError(f"{where}: {row}")
                self.items.append(self.validate(row, where))
            except DataError as e:
                if not skip_bad:
                    raise
                self.skipped.append(str(e))

    def _table_rows(self, delimiter: str):
        # TSV caption files are not quoted (a caption may start with a quote); CSV follows the usual quoting rules
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(io.StringIO(_read_text(self.path), newline=""), delimiter=delimiter, quoting=quoting,
                            strict=True)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise DataError(f"{self.path}:1: malformed header row: {e}") from e
        if header is None:
            raise DataError(f"{self.path}:1: empty file: expected a header row naming the fields")
        for field in (self.image_field, self.caption_field):
            if field not in header:
                raise DataError(f"{self.path}:1: field '{field}' is not a column of the header "
                                f"(columns: {', '.join(header)})")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # bad quoting; the reader goes on at the next line
                yield f"{self.path}:{reader.line_num}", f"malformed {'CSV' if delimiter == ',' else 'TSV'}: {e}"
                continue
            where = f"{self.path}:{reader.line_num}"
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                missing = f"field '{header[len(row)]}' is missing: " if len(row) < len(header) else ""
                yield where, f"{missing}{len(row)} values but {len(header)} columns in the header"
            else:
                yield where, dict(zip(header, row))

    def _json_rows(self):
        # split on newlines only: str.splitlines would also split inside strings holding U+2028
        for number, line in enumerate(_read_text(self.path).split("\n"), 1):
            where = f"{self.path}:{number}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, f"malformed JSON: {e.msg} at column {e.colno}"
                continue
            yield where, row if isinstance(row, dict) else f"expected a JSON object, found {type(row).__name__}"

    def validate(self, row: dict, where: str) -> tuple[str, str, str]:
        """A parsed row -> (image path, caption, where), or DataError. Subclasses override it to check and keep
        more fields (florence2.TaskFile); whatever it returns as the caption comes back in ds[i]["caption"]."""
        for field in (self.image_field, self.caption_field):
            value = row.get(field)
            if value is None:
                raise DataError(f"{where}: field '{field}' is missing")
            if not isinstance(value, str):
                raise DataError(f"{where}: field '{field}' must be a string, found {type(value).__name__}")
            if not value.strip():
                raise DataError(f"{where}: field '{field}' is empty")
        return os.path.join(self.image_root, row[self.image_field]), row[self.caption_field].strip(), where

    def __len__(self) -> int:
        return len(self.items)

    def source(self, index: int) -> str:
        """Where sample `index` comes from: "file:line"."""
        return self.items[index][2]

    def __getitem__(self, index: int) -> dict | None:
        path, caption, where = self.items[index]
        image = _image_or_skip(self, path, f"{where}: field '{self.image_field}'")
        return None if image is None else {"image": image, "caption": caption, "source": where}


class TarShards:
    """Image-text pairs in webdataset tar shards: members `key.jpg` (or jpeg/png/webp) + `key.txt`, where the key
    is the member path up to the first dot of its file name. `paths` is a list of shards or a glob pattern. Members
    are indexed once (standard library tarfile); `ds[i]` then reads one image by seeking to its offset, so shards
    must be plain, uncompressed .tar files. skip_bad and `skipped` as in ImageTextFile."""
    IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

    def __init__(self, paths, skip_bad: bool = False):
        self.skip_bad, self.skipped = skip_bad, []
        if isinstance(paths, (str, os.PathLike)):
            shards = sorted(glob.glob(str(paths)))
            if not shards:
                raise DataError(f"{paths}: no tar shards match this path or pattern")
        else:
            shards = [str(p) for p in paths]
        self.items = []  # (shard, key, image extension, byte offset, byte size, caption)
        for shard in shards:
            try:
                self.items += self._index(shard)
            except DataError as e:
                if not skip_bad:
                    raise
                self.skipped.append(str(e))

    def _index(self, shard: str) -> list[tuple]:
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        captions: dict[str, bytes] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    folder, name = os.path.split(m.name)
                    stem, _, ext = name.partition(".")
                    key = os.path.join(folder, stem)
                    members.setdefault(key, {})[ext.lower()] = m
                    if ext.lower() == "txt":
                        captions[key] = tar.extractfile(m).read()
        except (OSError, tarfile.TarError) as e:
            raise DataError(f"{shard}: cannot read as an uncompressed tar file: {e}") from e
        items = []
        for key, files in members.items():
            try:
                ext = next((e for e in self.IMAGE_EXTS if e in files), None)
                if ext is None:
                    raise DataError(f"{shard}:{key}: missing field '{'|'.join(self.IMAGE_EXTS)}' (no image member)")
                if "txt" not in files:
                    raise DataError(f"{shard}:{key}: missing field 'txt'")
                try:
                    caption = captions[key].decode("utf-8-sig").strip()
                except UnicodeDecodeError as e:
                    raise DataError(f"{shard}:{key}: field 'txt' is not UTF-8 text: {e.reason}") from e
                if not caption:
                    raise DataError(f"{shard}:{key}: field 'txt' is empty")
                items.append((shard, key, ext, files[ext].offset_data, files[ext].size, caption))
            except DataError as e:
                if not self.skip_bad:
                    raise
                self.skipped.append(str(e))
        return items

    def __len__(self) -> int:
        return len(self.items)

    def source(self, index: int) -> str:
        """Where sample `index` comes from: "shard:key"."""
        shard, key = self.items[index][:2]
        return f"{shard}:{key}"

    def __getitem__(self, index: int) -> dict | None:
        shard, key, ext, offset, size, caption = self.items[index]
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        image = _image_or_skip(self, data, f"{self.source(index)}: field '{ext}'")
        return None if image is None else {"image": image, "caption": caption, "source": self.source(index)}


# ----------------------------------------------------------------------------------------------------------------
# 3. Image transforms (Pillow + numpy; no torchvision at runtime)

def open_image_text(spec: str, image_root=None, skip_bad: bool = False):
    """A --data value -> dataset: one .csv/.tsv/.jsonl file, or webdataset .tar shards given as a
    glob or a comma-separated list."""
    paths = [p for p in spec.split(",") if p.strip()]
    if paths and all(p.endswith(".tar") or any(c in p for c in "*?[") for p in paths):
        return TarShards(paths[0] if len(paths) == 1 else paths, skip_bad=skip_bad)
    if len(paths) == 1:
        return ImageTextFile(paths[0], image_root=image_root, skip_bad=skip_bad)
    raise DataError(f"{spec}: give one .csv/.tsv/.jsonl file, or .tar shards as a glob or a comma-separated list")


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's pixel statistics, used by UniCL/Florence towers
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # ImageNet's, used by DaViT / Florence-2
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(img: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """PIL image (any mode) -> normalised float tensor (3, H, W)."""
    x = torch.from_numpy(np.array(to_rgb(img), dtype=np.float32))  # (H, W, 3) in 0..255
    x = x.permute(2, 0, 1).div_(255)  # (3, H, W) in 0..1
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def resize(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size`, keeping the aspect ratio."""
    w, h = img.size
    scale = size / min(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_resized_crop(img: Image.Image, size: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                        rng: random.Random | None = None) -> Image.Image:
    """Inception-style crop: a random region covering `scale` of the area with aspect ratio in `ratio` (sampled
    log-uniformly), resized to size x size. After 10 misses, fall back to the largest central crop in range."""
    rng = rng or random
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            break
    else:  # the whole image, trimmed to the nearest allowed aspect ratio
        aspect = min(max(w / h, ratio[0]), ratio[1])
        cw, ch = min(w, max(1, round(h * aspect))), min(h, max(1, round(w / aspect)))
        left, top = (w - cw) // 2, (h - ch) // 2
    return img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))


def hflip(img: Image.Image) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


class ImageTransform:
    """PIL image of any size and mode -> normalised tensor (3, size, size).
    eval: resize the shorter side, center crop. train: random resized crop and, if hflip, a coin-flip mirror.
    All randomness comes from `rng`, so a caller that seeds one per sample gets the same augmentation every run
    (without one, the global `random` module is used)."""

    def __init__(self, size: int, train: bool = False, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), hflip: bool = False,
                 mean=CLIP_MEAN, std=CLIP_STD):
        self.size, self.train, self.scale, self.ratio, self.hflip = size, train, scale, ratio, hflip
        self.mean, self.std = mean, std

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        img = to_rgb(img)
        if self.train:
            rng = rng or random
            img = random_resized_crop(img, self.size, self.scale, self.ratio, rng)
            if self.hflip and rng.random() < 0.5:
                img = hflip(img)
        else:
            img = center_crop(resize(img, self.size), self.size)
        return to_tensor(img, self.mean, self.std)


# ----------------------------------------------------------------------------------------------------------------
# 4. Tokenizers on tiktoken. The toy configs use raw bytes (259 ids, works offline, no file); the paper-scale
# configs name a BPE encoding. Florence-2 adds its <loc_*> and task tokens with add_special_tokens.

# GPT-2's pre-tokenisation split; with byte-only ranks it only chunks the text, every byte is still one token
_BYTES_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _with_special(encoding: tiktoken.Encoding, tokens) -> tiktoken.Encoding:
    """The encoding plus the special tokens it lacks, with ids appended after its last id (the way tiktoken's
    README extends an encoding: reuse its pattern, ranks and special tokens)."""
    special = dict(encoding._special_tokens)
    for token in tokens:
        if token not in special:
            special[token] = max([encoding.max_token_value, *special.values()]) + 1
    if len(special) == len(encoding._special_tokens):
        return encoding
    return tiktoken.Encoding(encoding.name, pat_str=encoding._pat_str, mergeable_ranks=encoding._mergeable_ranks,
                             special_tokens=special)


class Tokenizer:
    """A tiktoken encoding with begin/end/padding tokens. Special-token strings inside a text are encoded as their
    single id (task prompts like "<OD>" and "<loc_12>" rely on this)."""

    def __init__(self, encoding: tiktoken.Encoding, bos: str = "<|startoftext|>", eos: str = "<|endoftext|>",
                 pad: str = "<|pad|>"):
        self.encoding = _with_special(encoding, (bos, eos, pad))  # reuses any the encoding already has
        self.bos, self.eos, self.pad = bos, eos, pad
        special = self.encoding._special_tokens
        self.bos_id, self.eos_id, self.pad_id = special[bos], special[eos], special[pad]
        self.n_vocab = self.encoding.n_vocab
        self.special_tokens = tuple(sorted(special, key=special.get))
        self._special_ids = frozenset(special.values())

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.encoding.encode(text, allowed_special="all")
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # a tensor, an array or a list
        return self.encoding.decode([i for i in ids if not (skip_special and i in self._special_ids)])

    def token_id(self, token: str) -> int:
        special = self.encoding._special_tokens
        if token not in special:
            raise KeyError(f"{token!r} is not a special token of this tokenizer ({len(special)} special tokens, "
                           f"e.g. {', '.join(self.special_tokens[:5])}); add it with add_special_tokens")
        return special[token]

    def add_special_tokens(self, tokens: list[str]) -> "Tokenizer":
        """A new tokenizer with `tokens` appended as special tokens (ones already present keep their id)."""
        return Tokenizer(_with_special(self.encoding, tokens), self.bos, self.eos, self.pad)


# Every word the Shapes world writes (captions, questions, referring expressions, OCR words, video captions). A
# pretrained BPE vocabulary like RoBERTa's gives each common English word one token; the "shapes" tokenizer does the
# same for this world, so a toy text encoder reads words rather than first assembling them from letters.
SHAPES_WORDS = (
    *COLORS, *SHAPES, *(s + "s" for s in SHAPES), *SIZES, *NUMBER_WORDS, *WORDS,
    "a", "an", "the", "A", "The", "There", "is", "are", "there", "how", "many", "what", "color", "shape", "shapes",
    "size", "object", "of", "left", "right", "above", "below", "top", "bottom", "center", "at", "in", "on", "and",
    "dark", "light", "noisy", "gradient", "striped", "background", "word", "words", "written", "image",
    "moving", "up", "down", "growing", "shrinking", "rotating", "still", "standing", '"')


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str = "bytes") -> Tokenizer:
    """"bytes": 256 byte ids + bos/eos/pad = 259, built in code. "shapes": the 256 bytes, then one id per Shapes-world
    word with and without its leading space (tiktoken looks a whole pre-tokenised piece up before merging bytes, so a
    known word is one token and any other text falls back to bytes). Any other name is a tiktoken encoding ("gpt2",
    "cl100k_base", ...), whose BPE file tiktoken downloads once and caches (in TIKTOKEN_CACHE_DIR if set).
    Offline and not cached, the download fails at once at the DNS lookup (0.3 s measured here) and we turn that
    into an error saying how to provide the file."""
    if name == "bytes":
        ranks = {bytes([i]): i for i in range(256)}
        return Tokenizer(tiktoken.Encoding("bytes", pat_str=_BYTES_PATTERN, mergeable_ranks=ranks, special_tokens={}))
    if name == "shapes":
        ranks = {bytes([i]): i for i in range(256)}
        for word in dict.fromkeys(SHAPES_WORDS):
            for piece in (word.encode(), b" " + word.encode()):
                ranks.setdefault(piece, len(ranks))  # "a" and "A" are bytes already
        return Tokenizer(tiktoken.Encoding("shapes", pat_str=_BYTES_PATTERN, mergeable_ranks=ranks, special_tokens={}))
    if name not in tiktoken.list_encoding_names():
        raise ValueError(f"unknown tokenizer {name!r}: use 'bytes', 'shapes' or one of "
                         f"{tiktoken.list_encoding_names()}")
    try:
        encoding = tiktoken.get_encoding(name)
    except Exception as e:  # requests' ConnectionError, a hash mismatch of a partial download, ...
        raise RuntimeError(
            f"cannot load the tiktoken encoding {name!r} ({type(e).__name__}: {e}). tiktoken downloads its file on "
            f"first use: run once with network access, or copy the cached file (its name is the sha1 of the "
            f"download URL) from a machine that has it into a folder and set TIKTOKEN_CACHE_DIR to that folder. "
            f"The default 'bytes' tokenizer needs no file.") from e
    return Tokenizer(encoding)


# ----------------------------------------------------------------------------------------------------------------
# Released weights (transformers model folders), read without extra dependencies: florence2.py and meter.py load them

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """A .safetensors file is: 8-byte little-endian header length n, n bytes of JSON header
    {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw buffers."""
    if sys.byteorder != "little":
        raise RuntimeError("read_safetensors assumes a little-endian machine")
    with open(path, "rb") as f:
        data = bytearray(os.path.getsize(path))
        f.readinto(data)
    if len(data) < 8:
        raise ValueError(f"{path}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError(f"{path}: header length {n} runs past the end of the file")
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
        begin, end = info["data_offsets"]
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize or 8 + n + end > len(data):
            raise ValueError(f"{path}: tensor {name!r} has a bad byte range {begin}..{end}")
        tensors[name] = (torch.frombuffer(data, dtype=dtype, count=count, offset=8 + n + begin).reshape(shape)
                         if count else torch.empty(shape, dtype=dtype))
    return tensors


def read_weights_folder(folder):
    """The weights of a transformers model folder: model.safetensors, else pytorch_model.bin."""
    safetensors, pickle = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(safetensors):
        return read_safetensors(safetensors)
    if os.path.isfile(pickle):
        return torch.load(pickle, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder!r} holds neither model.safetensors nor pytorch_model.bin "
                            f"(sharded checkpoints are not supported)")


# ----------------------------------------------------------------------------------------------------------------
# 6. Boxes and COCO instances files: the detector (dyhead.py), Florence-2's metrics and labeller (florence2.py) and
# the demo below all score and write boxes the same way.

def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of every pair of (x0, y0, x1, y1) boxes: (N, 4), (M, 4) -> (N, M). Same floating-point operations, in the
    same order, as torchvision.ops.box_iou and its NMS kernel, so a threshold test gives the same answer bit for bit.
    Two boxes of zero area give 0 / 0 = NaN, which fails every threshold test, as in torchvision."""
    if boxes1.dim() != 2 or boxes1.shape[-1] != 4 or boxes2.dim() != 2 or boxes2.shape[-1] != 4:
        raise ValueError(f"boxes must be (N, 4) and (M, 4), got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
    x1, y1, x2, y2 = boxes1.T.contiguous()[:, :, None]                                        # 4 x (N, 1)
    X1, Y1, X2, Y2 = boxes2.T.contiguous()[:, None, :]                                        # 4 x (1, M)
    # one coordinate at a time: contiguous (N, M) maps are several times faster than broadcasting (N, M, 2) pairs
    inter = (torch.min(x2, X2) - torch.max(x1, X1)).clamp(min=0) * (torch.min(y2, Y2) - torch.max(y1, Y1)).clamp(min=0)
    return inter / ((x2 - x1) * (y2 - y1) + (X2 - X1) * (Y2 - Y1) - inter)                    # (N, M)


def coco_instances(images: list[dict], objects: list[list], categories: list[dict]) -> dict:
    """A COCO instances dict, as pycocotools and dyhead.coco_eval read it.

    images: one dict per image with at least "width" and "height" (other keys, e.g. "file_name", are kept); image
    ids are 1, 2, ... in order. objects: per image, a list of (box (x0, y0, x1, y1), category_id) or
    (box, category_id, extra) with extra a dict of more keys for the annotation (e.g. a "score"); annotation ids are
    1, 2, ... in order, bbox is x, y, w, h and area the box's. categories: [{"id", ...}] as they are."""
    out_images, annotations = [], []
    for image_id, (image, objs) in enumerate(zip(images, objects), 1):
        out_images.append({"id": image_id, **image})
        for box, category_id, *extra in objs:
            x0, y0, x1, y1 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                                **(extra[0] if extra else {})})
    return {"images": out_images, "annotations": annotations, "categories": list(categories)}


# ----------------------------------------------------------------------------------------------------------------
# 7. A noisy web pool: Shapes-world image-text pairs with planted web noise and a truth file (Florence section 2.1
# curates such pools). A curation step is only testable against noise whose every instance is known, so each
# planted row is listed in truth.jsonl with its kind and, for a duplicate, the row it copies.

POOL_KINDS = ("duplicate_exact", "duplicate_jpeg", "duplicate_resize", "duplicate_crop", "duplicate_brightness",
              "tiny", "moved_caption", "boilerplate")
# texts a web page puts under any picture: none names a shape, so a caption filter can only catch them by repetition
BOILERPLATE = ("click here to enlarge the picture", "image may contain art and shapes", "stock photo of the day",
               "no description available for this image", "photo courtesy of the author",
               "view larger image in a new window", "product image for illustration only",
               "free download high resolution wallpaper", "share this picture with your friends",
               "scroll down for more photos", "thumbnail of the uploaded file", "see the full gallery here",
               "image may be subject to copyright", "untitled photo from my camera roll",
               "posted by admin in uncategorized", "picture of the week winner", "this image has been resized",
               "click to see full size", "related posts you may like", "all rights reserved do not copy")


def _illuminate(image: Image.Image, rng: random.Random, light: float) -> Image.Image:
    """Add a smooth field of 4 random plane waves (up to 2 cycles per image, +-2 * light grey levels) to every
    channel. Web photos carry such low-frequency structure; flat Shapes backgrounds alone would give distinct images
    the same 64-bit perceptual hash. Coordinates are fractions of the side, so a tiny image gets the same kind of
    field as a full-size one."""
    w, h = image.size
    x = ((np.arange(w) + 0.5) / w)[None, :]  # (1, w) in (0, 1)
    y = ((np.arange(h) + 0.5) / h)[:, None]  # (h, 1)
    field = np.zeros((h, w))
    for _ in range(4):
        fx, fy, phase = rng.uniform(-2, 2), rng.uniform(-2, 2), rng.uniform(0, 2 * math.pi)
        field = field + np.cos(2 * math.pi * (fx * x + fy * y) + phase)  # (h, w)
    pixels = np.asarray(image, dtype=np.float64) + (field * light / 2)[:, :, None]  # (h, w, 3)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _class(sample: dict) -> str:
    obj = sample["objects"][0]  # pool images hold one object
    return f"{obj['color']} {obj['category']}"


def _duplicate(kind: str, image: Image.Image, rng: random.Random) -> tuple[Image.Image, bytes | None]:
    """A near copy of `image` as the web makes them; JPEG copies also return their encoded bytes, which are what
    gets written (decoding and re-encoding as PNG would store the same pixels, but not the same file)."""
    w, h = image.size
    if kind == "duplicate_jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=rng.randint(30, 70))
        return Image.open(io.BytesIO(buffer.getvalue())), buffer.getvalue()
    if kind == "duplicate_resize":
        while True:  # a factor that rounds back to the same size would plant an exact duplicate under this name
            factor = rng.uniform(0.5, 2.0)
            new = (max(1, round(w * factor)), max(1, round(h * factor)))
            if new != (w, h):
                return image.resize(new, Image.Resampling.BICUBIC), None
    if kind == "duplicate_crop":
        cw, ch = round(w * rng.uniform(0.85, 0.95)), round(h * rng.uniform(0.85, 0.95))
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        return image.crop((x0, y0, x0 + cw, y0 + ch)), None
    if kind == "duplicate_brightness":
        factor = rng.uniform(0.8, 0.9) if rng.random() < 0.5 else rng.uniform(1.1, 1.2)
        return ImageEnhance.Brightness(image).enhance(factor), None
    return image.copy(), None  # duplicate_exact


def _pool_counts(n: int, noise: float) -> dict[str, int]:
    """Rows per kind: round(noise * n) planted rows over the 8 kinds as evenly as possible, remainders first."""
    planted = round(noise * n)
    share, extra = divmod(planted, len(POOL_KINDS))
    counts = {"clean": n - planted, **{k: share + (i < extra) for i, k in enumerate(POOL_KINDS)}}
    copies = sum(counts[k] for k in POOL_KINDS if k.startswith("duplicate"))
    if not 0 <= noise <= 1 or copies > counts["clean"]:
        raise ValueError(f"noise {noise} plants {copies} duplicates but leaves {counts['clean']} clean rows to copy "
                         f"(each clean row is copied at most once): use 0 <= noise <= 8/13 (about 0.61)")
    return counts


def write_pool(folder, n: int, noise: float, seed: int = 0, size: int = 64, light: float = 30.0,
               progress: bool = True) -> dict:
    """Write an n-row image-text pool into `folder`: images/NNNNNN.png (.jpg for JPEG duplicates), pool.jsonl
    ({"image", "caption"}, readable by ImageTextFile), clean.jsonl (its clean rows only: what a perfect curation
    keeps) and, last, truth.jsonl ({"row", "image", "kind", "of", "class"} per row: what was planted where).
    Deterministic from (seed, n, noise, size, light). Returns {"rows", "kinds", "command", "max_share",
    "min_side"}; "command" is a curation command line sized to this pool."""
    counts = _pool_counts(n, noise)
    plan = _rng("pool", seed, "plan", n)
    # (kind, ShapesWorld index or None, entry of the original or None), before shuffling
    entries = [("clean", k, None) for k in range(counts["clean"])]
    copies = [k for k in POOL_KINDS if k.startswith("duplicate") for _ in range(counts[k])]
    originals = plan.sample(range(counts["clean"]), len(copies))  # each clean row is copied at most once
    entries += [(kind, None, of) for kind, of in zip(copies, originals)]
    fresh = counts["clean"]  # distinct images take ShapesWorld indices no other row uses
    for kind in ("tiny", "moved_caption", "boilerplate"):
        entries += [(kind, fresh + j, None) for j in range(counts[kind])]
        fresh += counts[kind]
    texts = BOILERPLATE[:min(len(BOILERPLATE), max(1, counts["boilerplate"] // 4000))]  # each text on many rows
    order = list(range(n))
    plan.shuffle(order)  # order[row] = entry; a duplicate may come before or after its original
    row_of = {entry: row for row, entry in enumerate(order)}

    world = ShapesWorld("train", size=size, n=max(1, fresh), seed=seed, min_objects=1, max_objects=1, ocr_prob=0.0)
    small = {}  # side -> ShapesWorld for the tiny rows

    def clean(row: int, index: int, shapes: ShapesWorld = world) -> tuple[Image.Image, dict]:
        # a row's own light rng, so a duplicate re-renders its original's pixels exactly
        sample = shapes[index]
        return _illuminate(sample["image"], _rng("pool-light", seed, "pool", row), light), sample

    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    truth_path = os.path.join(folder, "truth.jsonl")
    if os.path.exists(truth_path):
        os.remove(truth_path)  # truth.jsonl marks a finished pool: an old one must not vouch for a half-written one
    pool_rows, truth_rows, boilerplate_seen = [], [], 0
    start = last = time.perf_counter()
    for row, entry in enumerate(order):
        kind, index, of = entries[entry]
        rng, encoded, of_row = _rng("pool", seed, "pool", row), None, None
        if kind == "clean":
            image, sample = clean(row, index)
            caption, true = sample["caption"], _class(sample)
        elif kind.startswith("duplicate"):
            of_row = row_of[of]
            original, sample = clean(of_row, entries[of][1])
            image, encoded = _duplicate(kind, original, rng)
            caption, true = sample["caption"], _class(sample)
        elif kind == "tiny":
            side = rng.randint(16, 24)  # ShapesWorld draws nothing smaller than 16 px
            if side not in small:
                small[side] = ShapesWorld("train", size=side, n=max(1, fresh), seed=seed, min_objects=1,
                                          max_objects=1, ocr_prob=0.0)
            image, sample = clean(row, index, small[side])
            caption, true = sample["caption"], _class(sample)
        else:
            image, sample = clean(row, index)
            true = _class(sample)
            if kind == "moved_caption":  # the caption of a clean image showing another colour or shape
                donor = world[rng.randrange(counts["clean"])]
                while _class(donor) == true:
                    donor = world[rng.randrange(counts["clean"])]
                caption = donor["caption"]
            else:  # boilerplate: texts dealt out in turn, so each is shared by as many rows as possible
                caption = texts[boilerplate_seen % len(texts)]
                boilerplate_seen += 1
        name = f"images/{row:06d}.{'jpg' if encoded is not None else 'png'}"
        if encoded is not None:
            with open(os.path.join(folder, name), "wb") as f:
                f.write(encoded)
        else:
            image.save(os.path.join(folder, name))
        pool_rows.append({"image": name, "caption": caption})
        truth_rows.append({"row": row, "image": name, "kind": kind, "of": of_row, "class": true})
        now = time.perf_counter()
        if progress and now - last >= 2:
            last, eta = now, round((now - start) / (row + 1) * (n - row - 1))
            print(f"pool {row + 1}/{n} rows, ETA {eta // 60}:{eta % 60:02d}", flush=True)

    clean_rows = [p for p, t in zip(pool_rows, truth_rows) if t["kind"] == "clean"]  # what a perfect curation keeps
    for name, rows in (("pool.jsonl", pool_rows), ("clean.jsonl", clean_rows), ("truth.jsonl", truth_rows)):
        # truth.jsonl last: it marks the pool complete
        path = os.path.join(folder, name)
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)

    # ALIGN drops texts shared by more than 10 images; Shapes has only 60 training captions, so the threshold sits
    # above the world's own repetition and below a boilerplate text's
    shared = {}
    for pool_row, truth_row in zip(pool_rows, truth_rows):
        if truth_row["kind"] != "boilerplate":
            shared[pool_row["caption"]] = shared.get(pool_row["caption"], 0) + 1
    max_share, min_side = math.ceil(1.5 * max(shared.values(), default=0)), size // 2  # tiny rows are <= 24 px
    command = (f"python engine.py curate --data {os.path.join(folder, 'pool.jsonl')} "
               f"--out {os.path.join(folder, 'curated.jsonl')} --min_side {min_side} --max_share {max_share}")
    if progress:
        print(f"wrote {n} rows to {folder} in {time.perf_counter() - start:.1f} s: " +
              ", ".join(f"{kind} {count}" for kind, count in counts.items()))
        if counts["boilerplate"] and counts["boilerplate"] // len(texts) <= max_share:
            print(f"note: each boilerplate text is on about {counts['boilerplate'] // len(texts)} rows, not more "
                  f"than max_share {max_share}: a share filter cannot tell it from a Shapes caption")
        if size // 2 <= 24:
            print(f"note: at --size {size} the tiny rows (16-24 px) are not below min_side {min_side}")
        print(f"curate it with:\n  {command}")
    return {"rows": n, "kinds": counts, "command": command, "max_share": max_share, "min_side": min_side}


# ----------------------------------------------------------------------------------------------------------------
# demo: python data.py --out shapes.png   (a grid of samples with their boxes, polygons and OCR quads drawn)
#       python data.py --pool DIR --n 20000 --noise 0.3   (a noisy web pool, section 7)

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Draw Shapes-world samples with their annotations, time them, or "
                                                 "write a noisy web pool of them.")
    parser.add_argument("--out", default="shapes.png", help="grid PNG to write")
    parser.add_argument("--split", default="val", choices=SPLITS)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 128; 64 with --pool)")
    parser.add_argument("--n", type=int, default=None, help="samples in the grid, a video clip fills a row "
                                                           "(default 8); rows of the pool (default 20000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bench", action="store_true", help="time rendering instead of drawing a grid")
    parser.add_argument("--images", default="", help="also write each sample's plain image to this folder as "
                                                     "SPLIT_INDEX.png (inputs for python florence2.py --image)")
    parser.add_argument("--coco", action="store_true", help="with --images: also write DIR/instances.json, their "
                                                           "COCO ground truth (the 6 shapes are categories 1-6)")
    parser.add_argument("--pool", default="", metavar="DIR", help="write a noisy web pool of --n rows into DIR "
                                                                  "(pool.jsonl, truth.jsonl, images/) and exit")
    parser.add_argument("--noise", type=float, default=0.3, help="with --pool: fraction of planted noisy rows")
    parser.add_argument("--light", type=float, default=30.0, help="with --pool: strength of the illumination "
                                                                  "field, grey levels")
    args = parser.parse_args()

    if args.pool:  # the pool's own defaults: a curation-sized pool of small images
        write_pool(args.pool, 20000 if args.n is None else args.n, args.noise, args.seed,
                   64 if args.size is None else args.size, args.light)
        raise SystemExit
    args.size = 128 if args.size is None else args.size
    args.n = 8 if args.n is None else args.n

    if args.bench:
        for size in (64, 224):
            for name, ds, count in (("image", ShapesWorld(args.split, size), 1000),
                                    ("video 8 frames", ShapesVideo(args.split, size), 200)):
                ds[0]  # warm the font cache
                start = time.perf_counter()
                for i in range(count):
                    ds[i]
                print(f"{size:4d} px {name}: {(time.perf_counter() - start) / count * 1e3:.2f} ms per sample")
        raise SystemExit

    ds, video, cols = ShapesWorld(args.split, args.size, seed=args.seed), ShapesVideo(args.split, args.size), 4
    rows = math.ceil(args.n / cols)
    grid = Image.new("RGB", (cols * args.size, (rows + 1) * args.size), "white")
    for i in range(args.n):
        sample = ds[i]
        if args.images:
            os.makedirs(args.images, exist_ok=True)
            sample["image"].save(os.path.join(args.images, f"{args.split}_{i}.png"))
        tile = sample["image"].copy()
        draw = ImageDraw.Draw(tile)
        for obj in sample["objects"]:
            draw.polygon(obj["polygon"], outline=(255, 255, 255))
            draw.rectangle(obj["box"], outline=(0, 0, 0))
        for word in sample["ocr"]:
            draw.polygon(word["quad"], outline=(0, 200, 255))
        grid.paste(tile, ((i % cols) * args.size, (i // cols) * args.size))
        print(f"[{i}] {sample['caption']}\n    {sample['more_detailed_caption']}\n    refs: "
              f"{[o['ref'] for o in sample['objects']]}\n    qa: "
              f"{'; '.join(q['question'] + ' ' + q['answer'] for q in sample['qa'])}")
    clip = video[args.n % len(MOTIONS)]
    for t in range(0, video.num_frames, 2):  # every other frame of one clip along the last row
        frame = clip["frames"][t].copy()
        for obj in clip["objects"]:
            ImageDraw.Draw(frame).rectangle(obj["boxes"][t], outline=(0, 0, 0))
        grid.paste(frame, (t // 2 * args.size, rows * args.size))
    print(f"[video] {clip['caption']}")
    grid.save(args.out)
    print(f"wrote {args.out}")
    if args.images and args.coco:  # the ground truth that florence2.py --images --format coco output is scored on
        coco = coco_instances([{"file_name": f"{args.split}_{i}.png", "width": args.size, "height": args.size}
                               for i in range(args.n)],
                              [[(o["box"], SHAPES.index(o["category"]) + 1) for o in ds[i]["objects"]]
                               for i in range(args.n)],
                              [{"id": k + 1, "name": name} for k, name in enumerate(SHAPES)])
        with open(os.path.join(args.images, "instances.json"), "w") as f:
            json.dump(coco, f)
        print(f"wrote {os.path.join(args.images, 'instances.json')}: {len(coco['annotations'])} boxes")
