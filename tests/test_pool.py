"""data.write_pool: the truth file names every planted row correctly, the planted noise is what its kind says,
ImageTextFile reads the pool, and the pool is deterministic."""
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import data
from data import POOL_KINDS, ImageTextFile, write_pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, NOISE = 400, 0.3


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    summary = write_pool(folder, N, NOISE, seed=0, size=64, progress=False)
    return folder, summary, _lines(folder / "pool.jsonl"), _lines(folder / "truth.jsonl")


def _image(folder, row):
    return Image.open(os.path.join(folder, row["image"]))


def _class_of(caption):
    words = caption.split()
    return f"{words[-2]} {words[-1]}"  # "a large red circle" -> "red circle"


def test_truth_covers_every_row_and_counts(pool):
    folder, summary, rows, truth = pool
    assert len(rows) == len(truth) == N
    assert [t["row"] for t in truth] == list(range(N))
    assert [t["image"] for t in truth] == [r["image"] for r in rows]
    assert all(os.path.isfile(os.path.join(folder, r["image"])) for r in rows)
    planted = round(NOISE * N)
    share, extra = divmod(planted, len(POOL_KINDS))
    expected = {k: share + (i < extra) for i, k in enumerate(POOL_KINDS)}
    counts = Counter(t["kind"] for t in truth)
    assert {k: counts[k] for k in POOL_KINDS} == expected
    assert counts["clean"] == N - planted
    assert summary["kinds"] == {"clean": N - planted, **expected} and summary["rows"] == N
    # jpeg copies are stored as the encoder's bytes, everything else as PNG
    for t in truth:
        assert t["image"].endswith(".jpg" if t["kind"] == "duplicate_jpeg" else ".png")


def test_uneven_split_goes_to_the_first_kinds(tmp_path):
    summary = write_pool(tmp_path, 163, 0.3, progress=False)  # 49 planted: 6 each, one extra for the first kind
    assert [summary["kinds"][k] for k in POOL_KINDS] == [7] + [6] * 7
    assert Counter(t["kind"] for t in _lines(tmp_path / "truth.jsonl"))["duplicate_exact"] == 7


def test_duplicates_point_to_distinct_clean_originals(pool):
    folder, _, rows, truth = pool
    duplicates = [t for t in truth if t["kind"].startswith("duplicate")]
    assert duplicates
    assert all(t["of"] is None for t in truth if not t["kind"].startswith("duplicate"))
    originals = [t["of"] for t in duplicates]
    assert len(set(originals)) == len(originals)  # each clean row is copied at most once
    for t in duplicates:
        assert truth[t["of"]]["kind"] == "clean"
        assert rows[t["row"]]["caption"] == rows[t["of"]]["caption"]
        assert t["class"] == truth[t["of"]]["class"]


def test_duplicates_are_what_their_kind_says(pool):
    folder, _, _, truth = pool
    for t in truth:
        if not t["kind"].startswith("duplicate"):
            continue
        copy, original = _image(folder, t), _image(folder, truth[t["of"]])
        (w, h), (ow, oh) = copy.size, original.size
        if t["kind"] == "duplicate_exact":
            assert np.array_equal(np.asarray(copy), np.asarray(original))
        elif t["kind"] == "duplicate_jpeg":
            assert copy.format == "JPEG" and copy.size == original.size
            assert not np.array_equal(np.asarray(copy.convert("RGB")), np.asarray(original))
        elif t["kind"] == "duplicate_resize":
            assert (w, h) != (ow, oh)
            assert 0.5 * ow - 1 <= w <= 2 * ow + 1 and 0.5 * oh - 1 <= h <= 2 * oh + 1
        elif t["kind"] == "duplicate_crop":
            for side, original_side in ((w, ow), (h, oh)):  # 5-15% smaller, give or take a rounded pixel
                assert 0.05 * original_side - 1 <= original_side - side <= 0.15 * original_side + 1
            # the crop's pixels are the original's at some offset
            a, b = np.asarray(copy), np.asarray(original)
            assert any(np.array_equal(a, b[y:y + h, x:x + w]) for y in range(oh - h + 1) for x in range(ow - w + 1))
        elif t["kind"] == "duplicate_brightness":
            assert copy.size == original.size
            ratio = np.asarray(copy, dtype=float).mean() / np.asarray(original, dtype=float).mean()
            assert 0.75 < ratio < 0.95 or 1.05 < ratio < 1.25


def test_tiny_moved_and_boilerplate(pool):
    folder, _, rows, truth = pool
    for t in truth:
        caption = rows[t["row"]]["caption"]
        if t["kind"] == "tiny":
            assert 16 <= min(_image(folder, t).size) and max(_image(folder, t).size) <= 24
            assert _class_of(caption) == t["class"]
        elif t["kind"] == "moved_caption":
            assert _class_of(caption) != t["class"] and caption.split()[-1] in data.SHAPES
        elif t["kind"] in ("clean",) or t["kind"].startswith("duplicate"):
            assert _class_of(caption) == t["class"]
            assert _image(folder, t).size == (64, 64) or t["kind"] in ("duplicate_resize", "duplicate_crop")
    boilerplate = Counter(rows[t["row"]]["caption"] for t in truth if t["kind"] == "boilerplate")
    assert boilerplate and all(len(text.split()) >= 3 and text in data.BOILERPLATE for text in boilerplate)
    assert len(boilerplate) == max(1, sum(boilerplate.values()) // 1000)  # so each text is shared by many rows
    clean = {rows[t["row"]]["caption"] for t in truth if t["kind"] != "boilerplate"}
    assert not clean & set(boilerplate)


def test_distinct_rows_show_distinct_images(pool):
    # tiny, moved and boilerplate rows use ShapesWorld indices no other row uses: no pixel copy of another row
    folder, _, _, truth = pool
    seen = {}
    for t in truth:
        if t["kind"] in ("clean", "tiny", "moved_caption", "boilerplate"):
            key = _image(folder, t).tobytes()
            assert key not in seen, (t, seen.get(key))
            seen[key] = t["row"]


def test_readable_by_image_text_file(pool):
    folder, _, rows, truth = pool
    ds = ImageTextFile(folder / "pool.jsonl")
    assert len(ds) == N
    assert ds[0]["caption"] == rows[0]["caption"]
    assert ds[0]["image"].mode == "RGB"
    jpeg = next(i for i, r in enumerate(rows) if r["image"].endswith(".jpg"))
    assert ds[jpeg]["image"].size == (64, 64)
    clean = ImageTextFile(folder / "clean.jsonl")  # the clean rows only, in pool order
    assert [clean.items[i][0] for i in range(len(clean))] == [ds.items[t["row"]][0] for t in truth
                                                            if t["kind"] == "clean"]


def test_suggested_command(pool):
    folder, summary, rows, truth = pool
    shared = Counter(r["caption"] for r, t in zip(rows, truth) if t["kind"] != "boilerplate")
    assert summary["max_share"] == -(-3 * max(shared.values()) // 2)  # ceil(1.5 * largest count)
    assert summary["min_side"] == 32
    assert summary["command"] == (f"python engine.py curate --data {folder / 'pool.jsonl'} --out "
                                  f"{folder / 'curated.jsonl'} --min_side 32 --max_share {summary['max_share']}")


def test_deterministic(pool, tmp_path):
    folder, _, _, truth = pool
    write_pool(tmp_path, N, NOISE, seed=0, size=64, progress=False)
    for name in ("pool.jsonl", "truth.jsonl"):
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes()
    for t in truth[:3] + [next(t for t in truth if t["kind"] == "duplicate_jpeg")]:
        assert (tmp_path / t["image"]).read_bytes() == (folder / t["image"]).read_bytes()
    other = tmp_path / "seed1"
    write_pool(other, N, NOISE, seed=1, size=64, progress=False)
    assert (other / "truth.jsonl").read_bytes() != (folder / "truth.jsonl").read_bytes()


def test_too_much_noise_is_refused(tmp_path):
    with pytest.raises(ValueError, match="8/13"):
        write_pool(tmp_path, 100, 0.9, progress=False)


def test_command_line(tmp_path):
    out = subprocess.run([sys.executable, "data.py", "--pool", str(tmp_path), "--n", "160", "--noise", "0.25"],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "python engine.py curate" in out.stdout and "clean 120" in out.stdout
    assert len(_lines(tmp_path / "truth.jsonl")) == 160
