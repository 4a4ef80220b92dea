"""data.py: the Shapes world is deterministic and its annotations agree with its pixels; readers give clear errors
naming file, line and field; transforms are reproducible; tokenizers round-trip and fail clearly offline."""
import csv
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
import torch
from PIL import Image

import data
from data import (COLOR_RGB, COLORS, HELDOUT, MOTIONS, SHAPES, WORDS, DataError, ImageTextFile, ImageTransform,
                  ShapesVideo, ShapesWorld, TarShards, Tokenizer, compositions, get_tokenizer, load_image, to_tensor)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------
# the Shapes world

def fingerprint(sample: dict) -> str:
    """sha256 of the pixels and of every annotation of a sample."""
    annotations = {k: v for k, v in sample.items() if k not in ("image", "frames")}
    pixels = [sample["image"]] if "image" in sample else sample["frames"]
    h = hashlib.sha256(json.dumps(annotations, sort_keys=True).encode())
    for img in pixels:
        h.update(img.tobytes())
    return h.hexdigest()


def test_heldout_is_a_latin_diagonal():
    assert len(HELDOUT) == 6
    assert sorted(c for c, _ in HELDOUT) == sorted(COLORS) and sorted(s for _, s in HELDOUT) == sorted(SHAPES)
    assert len(compositions()) == 36 and set(compositions(heldout=True)) == HELDOUT
    assert set(compositions(heldout=False)) == set(compositions()) - HELDOUT


def test_deterministic_in_process():
    a, b = ShapesWorld("val", 64, seed=3), ShapesWorld("val", 64, seed=3)
    prints = [fingerprint(a[i]) for i in range(5)]
    assert prints == [fingerprint(b[i]) for i in range(5)]
    assert len(set(prints)) == 5  # samples differ from each other
    assert fingerprint(ShapesWorld("val", 64, seed=4)[0]) != prints[0]
    assert fingerprint(ShapesWorld("test", 64, seed=3)[0]) != prints[0]
    v = ShapesVideo("val", 48, num_frames=4)
    assert fingerprint(v[2]) == fingerprint(ShapesVideo("val", 48, num_frames=4)[2])


def test_deterministic_across_processes():
    # a fresh interpreter with a different string-hash salt must render the same bytes
    code = ("import sys, json; sys.path[:0] = sys.argv[1:]; import data, test_data;"
            "print(json.dumps([test_data.fingerprint(data.ShapesWorld('train', 64)[i]) for i in range(4)]"
            " + [test_data.fingerprint(data.ShapesVideo('train', 32, num_frames=3)[5])]))")
    env = dict(os.environ, PYTHONHASHSEED="12345", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code, ROOT, os.path.dirname(__file__)], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    here = [fingerprint(ShapesWorld("train", 64)[i]) for i in range(4)] + [
        fingerprint(ShapesVideo("train", 32, num_frames=3)[5])]
    assert json.loads(out) == here


@pytest.mark.parametrize("size", [16, 32, 57, 100, 256, 1024])
def test_any_size_scales_the_same_layout(size):
    ref, s = ShapesWorld("val", 64)[7], ShapesWorld("val", size)[7]
    assert s["image"].size == (size, size) and s["image"].mode == "RGB"
    assert len(s["objects"]) == len(ref["objects"])
    for o, r in zip(s["objects"], ref["objects"]):  # the layout is a function of (seed, split, index), not size
        assert o["category"] == r["category"] and o["color"] == r["color"]
        assert np.allclose(np.array(o["box"]) / size, np.array(r["box"]) / 64, atol=2e-3)
        assert all(0 <= v <= size for v in o["box"])


def test_heldout_compositions_never_in_train():
    names = [f"{c} {s}" for c, s in HELDOUT]
    for i in range(300):
        s = ShapesWorld("train", 32, ocr_prob=0)[i]
        assert not {(o["color"], o["category"]) for o in s["objects"]} & HELDOUT
        texts = [s["caption"], s["detailed_caption"], s["more_detailed_caption"]]
        texts += [q["question"] for q in s["qa"]] + [o["ref"] for o in s["objects"]]
        for text in texts:  # no training text names a held-out pair, not even a "no" question
            assert not any(re.search(rf"\b{n}", text) for n in names), text
    for i in range(200):
        clip = ShapesVideo("train", 32, num_frames=2)[i]
        assert not {(o["color"], o["category"]) for o in clip["objects"]} & HELDOUT
    seen = {(o["color"], o["category"]) for i in range(300) for o in ShapesWorld("val", 32, ocr_prob=0)[i]["objects"]}
    assert HELDOUT <= seen  # val renders every composition


def answer(question: str, objects: list[dict]) -> str:
    """Recompute a QA answer from the objects alone."""
    by_ref = {o["ref"]: o for o in objects}
    if question == "how many shapes are there?":
        return str(len(objects))
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return str(sum(o["category"] == m[1] for o in objects))
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (obj,) = [o for o in objects if o["category"] == m[1]]
        return obj["color"]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (obj,) = [o for o in objects if o["color"] == m[1]]
        return obj["category"]
    if m := re.fullmatch(r"what size is (.+)\?", question):
        return by_ref[m[1]]["size"]
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any((o["color"], o["category"]) == (m[1], m[2]) for o in objects) else "no"
    if m := re.fullmatch(r"is (.+) (left of|above) (.+)\?", question):
        a, b = by_ref[m[1]]["box"], by_ref[m[3]]["box"]
        if m[2] == "left of":
            assert a[2] < b[0] or b[2] < a[0], "ambiguous position question"
            return "yes" if a[2] < b[0] else "no"
        assert a[3] < b[1] or b[3] < a[1], "ambiguous position question"
        return "yes" if a[3] < b[1] else "no"
    raise AssertionError(f"unexpected question {question!r}")


@pytest.mark.parametrize("split,size", [("val", 64), ("train", 96)])
def test_annotations_agree_with_pixels_and_each_other(split, size):
    ds = ShapesWorld(split, size, ocr_prob=0.5)
    kinds = set()
    for i in range(120):
        s = ds[i]
        pixels = np.asarray(s["image"]).astype(int)  # (H, W, 3)
        objects = s["objects"]
        assert 1 <= len(objects) <= 3
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            xs, ys = o["polygon"][0::2], o["polygon"][1::2]
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert [min(xs), min(ys), max(xs), max(ys)] == o["box"]  # tight box of the polygon
            assert len(xs) >= (16 if o["category"] == "circle" else 3)
            centre = pixels[int((y0 + y1) / 2), int((x0 + x1) / 2)]  # every shape covers its box centre
            assert np.abs(centre - COLOR_RGB[o["color"]]).max() < 40, (i, o)
            assert o["color"] in o["ref"] and o["category"] in o["ref"]
        for a in objects:  # no two boxes overlap
            for b in objects:
                assert a is b or a["box"][2] < b["box"][0] or b["box"][2] < a["box"][0] or \
                    a["box"][3] < b["box"][1] or b["box"][3] < a["box"][1]
        assert len({o["ref"] for o in objects}) == len(objects)  # refs unique within the image
        for o in objects:
            assert f"{o['color']} {o['category']}" in s["caption"]
        assert s["detailed_caption"].count(".") == len(objects)
        for q in s["qa"]:
            assert q["answer"] == answer(q["question"], objects), q
            assert " " not in q["answer"]
            kinds.add(q["type"])
        for word in s["ocr"]:
            qx, qy = word["quad"][0::2], word["quad"][1::2]
            assert word["text"] in WORDS and word["text"] in s["more_detailed_caption"]
            assert qx[0] == qx[3] < qx[1] == qx[2] and qy[0] == qy[1] < qy[2] == qy[3]  # clockwise from top-left
            assert 0 <= min(qx) and max(qx) <= size and 0 <= min(qy) and max(qy) <= size
            for o in objects:  # words never cover shapes
                assert qx[1] < o["box"][0] or o["box"][2] < qx[0] or qy[2] < o["box"][1] or o["box"][3] < qy[0]
            ink = pixels[int(qy[0]):int(qy[2]) + 1, int(qx[0]):int(qx[1]) + 1]
            assert np.abs(ink - np.median(ink, axis=(0, 1))).max() > 50  # the word is really drawn there
        assert s["split"] == split and s["index"] == i
    assert kinds == {"count", "color", "shape", "size", "exist", "position"}


def test_twins_get_unique_refs():
    # images with two shapes of one composition exist and are told apart by size or position
    twins = [s for s in (ShapesWorld("val", 32, min_objects=3, ocr_prob=0)[i] for i in range(150))
             if len({(o["color"], o["category"]) for o in s["objects"]}) < len(s["objects"])]
    assert twins
    for s in twins:
        refs = [o["ref"] for o in s["objects"]]
        assert len(set(refs)) == len(refs)
        told_apart = r"the (small|large) \w+ \w+|the \w+ \w+ (on the left|on the right|at the top|at the bottom)"
        assert any(re.fullmatch(told_apart, r) for r in refs)


def test_index_and_argument_errors():
    ds = ShapesWorld("val", 32, n=5)
    assert len(ds) == 5 and len(list(ds)) == 5 and ds[-1]["index"] == 4
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(ValueError, match="split"):
        ShapesWorld("training")
    with pytest.raises(ValueError, match="size"):
        ShapesWorld("val", size=8)


def centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def test_video_motions_move_the_boxes_as_labelled():
    ds = ShapesVideo("val", 64, num_frames=6)
    for i in range(48):  # six clips of every motion
        clip = ds[i]
        motion = clip["motion"]
        assert clip["label"] == MOTIONS.index(motion) and len(clip["frames"]) == 6
        assert motion.split()[-1] in clip["caption"] or motion == "still"
        for o in clip["objects"]:
            boxes = o["boxes"]
            assert all(0 <= v <= 64 for b in boxes for v in b)
            cx = [centre(b)[0] for b in boxes]
            cy = [centre(b)[1] for b in boxes]
            area = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
            side = np.mean([max(b[2] - b[0], b[3] - b[1]) for b in boxes])
            steps = {"moving left": (np.diff(cx) < 0).all() and np.ptp(cy) < 0.1,
                     "moving right": (np.diff(cx) > 0).all() and np.ptp(cy) < 0.1,
                     "moving up": (np.diff(cy) < 0).all() and np.ptp(cx) < 0.1,
                     "moving down": (np.diff(cy) > 0).all() and np.ptp(cx) < 0.1,
                     "growing": (np.diff(area) > 0).all(),
                     "shrinking": (np.diff(area) < 0).all(),
                     # a shape turns about its middle: its box changes, the box centre moves little (a triangle's
                     # box centre by up to 0.23 of its side)
                     "rotating": o["category"] != "circle" and np.ptp(area) > 1
                     and max(np.ptp(cx), np.ptp(cy)) < 0.3 * side,
                     "still": all(b == boxes[0] for b in boxes)}
            assert steps[motion], (i, motion, boxes)
            if motion in ("moving left", "moving right", "moving up", "moving down"):
                assert max(np.ptp(cx), np.ptp(cy)) > 0.2 * 64  # a visible distance
        first, last = np.asarray(clip["frames"][0]), np.asarray(clip["frames"][-1])
        assert (first == last).all() == (motion == "still")


# ---------------------------------------------------------------------------------------------------------------
# readers for real data

def save_image(path, size=(20, 14), color=(200, 30, 30), fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def write_table(path, header, rows, delimiter):
    with open(path, "w", newline="") as f:
        if delimiter == ",":
            csv.writer(f).writerows([header, *rows])
        else:  # TSV caption files are plain: no quoting
            f.write("".join("\t".join(map(str, row)) + "\n" for row in [header, *rows]))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row) + "\n")


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl"])
def test_image_text_files_read_back(tmp_path, ext):
    save_image(tmp_path / "img" / "a.png")
    save_image(tmp_path / "img" / "b.jpg", size=(9, 30), color=(10, 200, 10))
    captions = ['a red, "quoted" square', "a green bar"]
    path = str(tmp_path / f"captions.{ext}")
    if ext == "jsonl":
        write_jsonl(path, [{"image": "img/a.png", "caption": captions[0]}, "\n",
                           {"image": "img/b.jpg", "caption": captions[1], "extra": 1}])
        lines = [1, 3]  # a blank line is skipped but still counted
    else:
        write_table(path, ["id", "image", "caption"], [[0, "img/a.png", captions[0]], [1, "img/b.jpg", captions[1]]],
                    "," if ext == "csv" else "\t")
        lines = [2, 3]
    ds = ImageTextFile(path)
    assert len(ds) == 2 and ds.skipped == []
    for i, (caption, line, size) in enumerate(zip(captions, lines, [(20, 14), (9, 30)])):
        s = ds[i]
        assert s["caption"] == caption and s["source"] == f"{path}:{line}"
        assert s["image"].mode == "RGB" and s["image"].size == size
    assert ds[0]["image"].getpixel((3, 3)) == (200, 30, 30)


def test_image_root_and_custom_fields(tmp_path):
    save_image(tmp_path / "pics" / "x.png")
    path = str(tmp_path / "meta" / "list.jsonl")
    os.makedirs(os.path.dirname(path))
    write_jsonl(path, [{"file": "x.png", "text": "hello"}])
    ds = ImageTextFile(path, image_root=tmp_path / "pics", image_field="file", caption_field="text")
    assert ds[0]["caption"] == "hello"


def bad_file(tmp_path, case):
    """A listing file with one bad record; returns (path, expected message start, expected words)."""
    save_image(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[:300])
    good = ["ok.png", "fine"]
    csv_path, jsonl_path = str(tmp_path / "captions.csv"), str(tmp_path / "captions.jsonl")
    if case == "missing image":
        write_table(csv_path, ["image", "caption"], [good, ["img/gone.jpg", "x"]], ",")
        return csv_path, f"{csv_path}:3: field 'image': cannot open", ["gone.jpg", "No such file"]
    if case == "corrupt image":
        write_table(csv_path, ["image", "caption"], [good, good, ["corrupt.png", "x"]], ",")
        return csv_path, f"{csv_path}:4: field 'image': cannot open", ["corrupt.png"]
    if case == "truncated image":
        write_jsonl(jsonl_path, [{"image": "truncated.jpg", "caption": "x"}])
        return jsonl_path, f"{jsonl_path}:1: field 'image': cannot open", ["truncated"]
    if case == "empty caption":
        write_table(csv_path, ["image", "caption"], [good, ["ok.png", "   "]], ",")
        return csv_path, f"{csv_path}:3: field 'caption' is empty", []
    if case == "missing column":
        write_table(csv_path, ["image", "text"], [good], ",")
        return csv_path, f"{csv_path}:1: field 'caption' is not a column", ["image, text"]
    if case == "short row":
        with open(csv_path, "w") as f:
            f.write("image,caption\nok.png,fine\nok.png\n")
        return csv_path, f"{csv_path}:3: field 'caption' is missing", []
    if case == "malformed csv":
        with open(csv_path, "w") as f:
            f.write('image,caption\nok.png,fine\nok.png,"bad "quote" here"\n')
        return csv_path, f"{csv_path}:3: malformed CSV", []
    if case == "malformed json":
        write_jsonl(jsonl_path, [{"image": "ok.png", "caption": "fine"}, '{"image": "ok.png", "caption": \n'])
        return jsonl_path, f"{jsonl_path}:2: malformed JSON", []
    if case == "json field missing":
        write_jsonl(jsonl_path, [{"image": "ok.png"}])
        return jsonl_path, f"{jsonl_path}:1: field 'caption' is missing", []
    if case == "json field not text":
        write_jsonl(jsonl_path, [{"image": "ok.png", "caption": 3}])
        return jsonl_path, f"{jsonl_path}:1: field 'caption' must be a string", []
    raise ValueError(case)


BAD_ROWS = ["empty caption", "missing column", "short row", "malformed csv", "malformed json", "json field missing",
            "json field not text"]
BAD_IMAGES = ["missing image", "corrupt image", "truncated image"]


@pytest.mark.parametrize("case", BAD_ROWS + BAD_IMAGES)
def test_bad_input_names_file_line_and_field(tmp_path, case):
    path, start, words = bad_file(tmp_path, case)
    with pytest.raises(DataError) as err:
        ds = ImageTextFile(path)  # bad rows fail here ...
        [ds[i] for i in range(len(ds))]  # ... bad images when opened
    message = str(err.value)
    assert message.startswith(start), message
    assert all(w in message for w in words), message
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("case", [c for c in BAD_ROWS if c != "missing column"] + BAD_IMAGES)
def test_skip_bad_counts_skips(tmp_path, case):
    path, start, _ = bad_file(tmp_path, case)
    ds = ImageTextFile(path, skip_bad=True)
    samples = [ds[i] for i in range(len(ds))]
    assert len(ds.skipped) == 1 and ds.skipped[0].startswith(start)
    assert samples.count(None) == (1 if case in BAD_IMAGES else 0)
    assert all(s["caption"] == "fine" for s in samples if s is not None)


def test_missing_column_is_fatal_even_when_skipping(tmp_path):
    path, start, _ = bad_file(tmp_path, "missing column")
    with pytest.raises(DataError, match="field 'caption'"):
        ImageTextFile(path, skip_bad=True)


def test_unsupported_extension_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"captions\.txt: unsupported file type '\.txt'.*\.csv, \.tsv, \.jsonl"):
        ImageTextFile(tmp_path / "captions.txt")
    with pytest.raises(DataError, match="no such file"):
        ImageTextFile(tmp_path / "nope.csv")


def make_shard(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def image_bytes(fmt, color=(0, 0, 255), size=(12, 10)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def test_tar_shards_read_back(tmp_path):
    make_shard(tmp_path / "shard-000.tar", {"k0.jpg": image_bytes("JPEG"), "k0.txt": b"a blue box",
                                           "k0.json": b"{}", "sub/k1.png": image_bytes("PNG", (255, 0, 0)),
                                           "sub/k1.txt": "caf\u00e9 \n".encode()})
    make_shard(tmp_path / "shard-001.tar", {"v1.2/a.webp": image_bytes("WEBP"), "v1.2/a.txt": b"dotted folder"})
    ds = TarShards(str(tmp_path / "shard-*.tar"))
    assert len(ds) == 3 and ds.skipped == []
    got = [ds[i] for i in range(3)]
    assert [g["caption"] for g in got] == ["a blue box", "caf\u00e9", "dotted folder"]
    assert got[1]["source"] == f"{tmp_path / 'shard-000.tar'}:sub/k1"
    assert got[1]["image"].getpixel((1, 1)) == (255, 0, 0)
    assert got[2]["source"].endswith("shard-001.tar:v1.2/a")  # webdataset key: up to the first dot of the name
    assert all(g["image"].size == (12, 10) and g["image"].mode == "RGB" for g in got)
    assert len(TarShards([tmp_path / "shard-001.tar"])) == 1


def test_tar_shards_bad_members(tmp_path):
    shard = str(tmp_path / "bad.tar")
    make_shard(shard, {"k0.jpg": image_bytes("JPEG"), "k0.txt": b"ok", "k1.jpg": image_bytes("JPEG"),
                       "k2.txt": b"no image", "k3.png": b"garbage", "k3.txt": b"corrupt", "k4.png":
                       image_bytes("PNG"), "k4.txt": b"  "})
    with pytest.raises(DataError, match=re.escape(f"{shard}:k1: missing field 'txt'")):
        TarShards(shard)
    ds = TarShards(shard, skip_bad=True)
    assert len(ds) == 2 and len(ds.skipped) == 3
    assert any(m.startswith(f"{shard}:k2: missing field 'jpg") for m in ds.skipped)
    assert any(m == f"{shard}:k4: field 'txt' is empty" for m in ds.skipped)
    assert ds[0]["caption"] == "ok" and ds[1] is None and len(ds.skipped) == 4
    assert ds.skipped[-1].startswith(f"{shard}:k3: field 'png': cannot decode")
    strict = TarShards(shard, skip_bad=True)
    strict.skip_bad = False
    with pytest.raises(DataError, match=re.escape(f"{shard}:k3: field 'png'")):
        strict[1]
    (tmp_path / "notatar.tar").write_bytes(b"hello" * 200)
    with pytest.raises(DataError, match="notatar.tar: cannot read"):
        TarShards([tmp_path / "notatar.tar"])
    with pytest.raises(DataError, match="no tar shards match"):
        TarShards(str(tmp_path / "none-*.tar"))


def test_load_image_converts_every_mode_to_rgb(tmp_path):
    palette = Image.new("P", (5, 4))
    palette.info["transparency"] = 0
    for i, img in enumerate([Image.new("L", (5, 4), 7), Image.new("RGBA", (5, 4), (1, 2, 3, 0)), palette,
                             Image.new("1", (5, 4), 1), Image.new("I;16", (5, 4), 300)]):
        img.save(tmp_path / f"{i}.png")
        out = load_image(str(tmp_path / f"{i}.png"), "here")
        assert out.mode == "RGB" and out.size == (5, 4)
    assert load_image(image_bytes("PNG"), "x").getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(DataError, match="^here: cannot decode image bytes"):
        load_image(b"nope", "here")


def test_load_image_composites_transparency_on_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1), (10, 20, 30, 0))  # fully transparent: its hidden colour must not show
    rgba.putpixel((1, 0), (10, 20, 30, 255))  # opaque
    rgba.putpixel((2, 0), (200, 0, 0, 128))  # half: halfway to white
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 40, 50, 60])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # palette index 0 (black) is transparent
    la = Image.new("LA", (1, 1), (0, 0))
    for i, img in enumerate([rgba, palette, la]):
        img.save(tmp_path / f"{i}.png")
    out = load_image(str(tmp_path / "0.png"), "here")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (10, 20, 30)
    assert out.getpixel((2, 0)) == pytest.approx((227, 127, 127), abs=1)
    out = load_image(str(tmp_path / "1.png"), "here")
    assert (out.getpixel((0, 0)), out.getpixel((1, 0))) == ((255, 255, 255), (40, 50, 60))
    assert load_image((tmp_path / "2.png").read_bytes(), "here").getpixel((0, 0)) == (255, 255, 255)


# ---------------------------------------------------------------------------------------------------------------
# image transforms

def test_to_tensor_normalises():
    mean = tuple(round(m * 255) for m in data.CLIP_MEAN)
    x = to_tensor(Image.new("RGB", (7, 5), mean))
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32 and x.abs().max() < 0.01
    white = to_tensor(Image.new("L", (2, 2), 255), data.IMAGENET_MEAN, data.IMAGENET_STD)
    expected = (1 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    assert torch.allclose(white[:, 0, 0], expected)


def test_eval_transform_keeps_the_centre():
    # a 300x100 image: red in the middle third, blue on both sides; eval keeps only the centre square
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    img.paste((255, 0, 0), (100, 0, 200, 100))
    x = ImageTransform(32)(img)
    red = to_tensor(Image.new("RGB", (1, 1), (255, 0, 0)))[:, 0, 0]
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[:, 2:-2, 2:-2], red[:, None, None].expand(3, 28, 28), atol=0.05)


def test_train_transform_is_reproducible_with_a_seeded_rng():
    img = ShapesWorld("val", 96)[0]["image"]
    t = ImageTransform(48, train=True, scale=(0.3, 1.0), hflip=True)
    a, b = t(img, random.Random(1)), t(img, random.Random(1))
    assert a.shape == (3, 48, 48) and torch.equal(a, b)
    outs = [t(img, random.Random(s)) for s in range(6)]
    assert len({hashlib.sha256(o.numpy().tobytes()).hexdigest() for o in outs}) == 6


def test_hflip_mirrors():
    img = ShapesWorld("val", 40)[3]["image"]
    t = ImageTransform(40, train=True, scale=(1, 1), ratio=(1, 1), hflip=True)
    plain = to_tensor(img)
    outs = [t(img, random.Random(s)) for s in range(12)]
    flipped = [torch.allclose(o, plain.flip(-1), atol=1e-5) for o in outs]
    same = [torch.allclose(o, plain, atol=1e-5) for o in outs]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)


@pytest.mark.parametrize("mode,size", [("L", (30, 20)), ("RGBA", (20, 30)), ("P", (25, 25)), ("1", (8, 9)),
                                       ("RGB", (1, 1)), ("RGB", (4000, 300)), ("CMYK", (10, 10))])
@pytest.mark.parametrize("train", [False, True])
def test_transforms_take_any_mode_and_size(mode, size, train):
    img = Image.new(mode, size)
    x = ImageTransform(24, train=train, scale=(0.9, 1.0), ratio=(1.0, 1.0))(img, random.Random(0))
    assert x.shape == (3, 24, 24) and torch.isfinite(x).all()


# ---------------------------------------------------------------------------------------------------------------
# tokenizers

def test_bytes_tokenizer_round_trip():
    tok = get_tokenizer()
    assert tok.n_vocab == 259 and (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    assert tok.special_tokens == ("<|startoftext|>", "<|endoftext|>", "<|pad|>")
    text = "A large red circle.\n  Caf\u00e9 \u2014 \u6f22\u5b57 \U0001F600 'tis"
    ids = tok.encode(text)
    assert ids == list(text.encode()) and tok.decode(ids) == text
    ids = tok.encode("hi<|endoftext|>", bos=True, eos=True)
    assert ids == [256, ord("h"), ord("i"), 257, 257]
    assert tok.decode(ids) == "hi" and tok.decode(torch.tensor(ids), skip_special=False) == \
        "<|startoftext|>hi<|endoftext|><|endoftext|>"


def test_add_special_tokens():
    tok = get_tokenizer()
    loc = [f"<loc_{i}>" for i in range(1000)]
    big = tok.add_special_tokens(["<OD>", *loc, "<OD>", "<|pad|>"])
    assert big.n_vocab == 259 + 1001 and tok.n_vocab == 259  # the original is unchanged
    assert big.token_id("<OD>") == 259 and big.token_id("<loc_999>") == 1259 and big.pad_id == 258
    assert big.encode("<OD>x<loc_5>") == [259, ord("x"), 265]
    assert big.decode([259, ord("x"), 265], skip_special=False) == "<OD>x<loc_5>"
    assert big.add_special_tokens(["<OD>"]).n_vocab == big.n_vocab
    with pytest.raises(KeyError, match="<OCR>.*add_special_tokens"):
        big.token_id("<OCR>")


def test_tokenizer_reuses_an_encodings_own_special_tokens():
    # a small BPE with one merge and its own end-of-text token, as a named encoding would have
    ranks = {bytes([i]): i for i in range(256)} | {b"ab": 256}
    enc = tiktoken.Encoding("tiny", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 257})
    tok = Tokenizer(enc)
    assert tok.eos_id == 257 and (tok.bos_id, tok.pad_id) == (258, 259) and tok.n_vocab == 260
    assert tok.encode("abc", eos=True) == [256, ord("c"), 257]


def test_named_encoding_missing_offline_says_what_to_do(tmp_path, monkeypatch):
    # simulate no network (so the test means the same with or without one) and an empty cache
    def no_network(url):
        raise ConnectionError(f"cannot reach {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "r50k_base", raising=False)
    with pytest.raises(RuntimeError, match="'r50k_base'.*ConnectionError.*TIKTOKEN_CACHE_DIR"):
        get_tokenizer("r50k_base")
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt5'.*bytes.*gpt2"):
        get_tokenizer("gpt5")


def test_named_encoding_for_real(tmp_path, monkeypatch):
    # whatever this machine's network: either gpt2 loads with bos/pad appended after its own end-of-text, or the
    # error is the helpful one (offline, tiktoken fails at the DNS lookup at once: no hang)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)
    get_tokenizer.cache_clear()
    try:
        tok = get_tokenizer("gpt2")
    except RuntimeError as e:
        assert "TIKTOKEN_CACHE_DIR" in str(e) and "network" in str(e)
    else:
        assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.n_vocab) == (50256, 50257, 50258, 50259)
        assert tok.decode(tok.encode("hello world", bos=True, eos=True)) == "hello world"
    finally:
        get_tokenizer.cache_clear()


def test_shapes_tokenizer_gives_each_world_word_one_token():
    """Every word the Shapes world writes (captions at three lengths, questions, referring expressions, OCR words,
    video captions) is one token, as a pretrained BPE gives common words; other text falls back to bytes and every
    text decodes back to itself."""
    tok, byte_tok = get_tokenizer("shapes"), get_tokenizer("bytes")
    texts = []
    for s in (data.ShapesWorld("train", n=60, size=64, seed=3)[i] for i in range(60)):
        texts += [s["caption"], s["detailed_caption"], s["more_detailed_caption"], *(q["question"] for q in s["qa"])]
    texts += [data.ShapesVideo("train", 32, n=16)[i]["caption"] for i in range(16)]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        spelt = [(a, b) for a, b in zip(ids, ids[1:]) if max(a, b) < 256 and chr(a).isalpha() and chr(b).isalpha()]
        assert not spelt, (text, [tok.decode([i]) for i in ids])  # two letter bytes in a row: a word not in the list
    words = sum(len(tok.encode(t)) for t in texts) / sum(len(byte_tok.encode(t)) for t in texts)
    assert words < 0.3, words  # about a quarter of the byte tokens
    assert tok.encode("hexagons nearby") == tok.encode("hexagons") + byte_tok.encode(" nearby")
    assert tok.n_vocab == 256 + 2 * len(set(data.SHAPES_WORDS)) - 3 + 3  # "a", "A", '"' are bytes; bos/eos/pad
