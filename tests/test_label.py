"""Folder labelling with florence2.py --images: the JSON lines and their batch-size invariance, resuming after a
real kill and after a torn last line, bad images, the COCO file a detector reads, --dtype, and the flag errors.
A one-step toy checkpoint (random weights, the real file layout) keeps it fast."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import dyhead
import florence2 as f2
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    train.main(["--stage", "florence2", "--max_iters=1", "--batch_size=2", "--val_size=0", f"--out_dir={out}"])
    return str(out / "ckpt.pt")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Eight Shapes-world val images saved as PNG files -> (folder, samples by file name)."""
    folder = tmp_path_factory.mktemp("shapes")
    world = data.ShapesWorld("val", n=8, size=96, seed=0)
    samples = {}
    for i in range(len(world)):
        samples[f"s{i}.png"] = world[i]
        world[i]["image"].save(folder / f"s{i}.png")
    return folder, samples


def label(ckpt, images, out, *flags):
    f2.main(["--ckpt", ckpt, "--images", str(images), "--out", str(out), "--num_beams", "1", *flags])
    return out.read_text()


def test_lines_hold_each_image_once_and_match_single_image_generation(ckpt, shapes, tmp_path):
    folder, samples = shapes
    text = label(ckpt, folder, tmp_path / "one.jsonl", "--task", "<OD>", "--max_new_tokens", "40", "--batch_size", "1")
    lines = [json.loads(line) for line in text.splitlines()]
    assert [os.path.basename(r["file"]) for r in lines] == sorted(samples)  # every image once, in sorted order
    model, tokenizer, style, size = f2.load_for_inference(ckpt)
    for r in lines:
        image = Image.open(r["file"])
        assert (r["width"], r["height"], r["task"]) == (96, 96, "<OD>") and "text" not in r
        answer, = f2.generate_answers(model, tokenizer, [(image, "<OD>", None)], size, style, 40)
        assert r["answer"] == f2.post_process(answer, "<OD>", image.size)["<OD>"]
    # batch size changes nothing but speed; a task with a text input keeps it in its lines
    assert label(ckpt, folder, tmp_path / "four.jsonl", "--task", "<OD>", "--max_new_tokens", "40",
                 "--batch_size", "3") == text
    grounded = label(ckpt, folder, tmp_path / "g.jsonl", "--task", "<CAPTION_TO_PHRASE_GROUNDING>", "--text",
                     "a red circle", "--max_new_tokens", "8")
    assert all(json.loads(line)["text"] == "a red circle" for line in grounded.splitlines())


def test_kill_mid_run_then_rerun_gives_the_uninterrupted_lines(ckpt, shapes, tmp_path):
    """SIGKILL while the second batch is generating (the random model writes to the token limit, so a batch takes
    a while), rerun: the same lines as a run never stopped, none twice."""
    folder, samples = shapes
    flags = ["--task", "<CAPTION>", "--max_new_tokens", "511", "--batch_size", "2"]
    whole = label(ckpt, folder, tmp_path / "whole.jsonl", *flags)
    out = tmp_path / "killed.jsonl"
    cmd = [sys.executable, "florence2.py", "--ckpt", ckpt, "--images", str(folder), "--out", str(out),
           "--num_beams", "1", *flags]
    run = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out.exists() and out.read_text().count("\n") >= 2) and run.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    partial = out.read_text()
    assert 2 <= partial.count("\n") < len(samples) and whole.startswith(partial), "the kill did not land mid-run"
    assert label(ckpt, folder, out, *flags) == whole


def test_torn_last_line_is_cut_and_redone(ckpt, shapes, tmp_path, capsys):
    folder, _ = shapes
    flags = ["--task", "<OD>", "--max_new_tokens", "20", "--batch_size", "4"]
    whole = label(ckpt, folder, tmp_path / "whole.jsonl", *flags)
    out = tmp_path / "torn.jsonl"
    lines = whole.splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # a kill in the middle of a write
    capsys.readouterr()
    assert label(ckpt, folder, out, *flags) == whole
    err = capsys.readouterr().err
    assert "cut a torn last line" in err and "3 of 8 images already labelled, 5 to go" in err


def test_bad_images_are_listed_and_the_good_ones_labelled(ckpt, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    good = {"rgb.jpg": ((50, 40), "RGB"), "gray.png": ((64, 64), "L"), "rgba.png": ((30, 70), "RGBA"),
            "tiny.png": ((1, 1), "RGB"), "wide.png": ((4000, 300), "RGB")}
    for name, (size, mode) in good.items():
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(folder / name)
    (folder / "empty.png").write_bytes(b"")
    (folder / "corrupt.jpg").write_bytes(b"this is not an image")
    whole = (folder / "rgb.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.txt").write_text("not an image extension: not looked at")
    text = label(ckpt, folder, tmp_path / "l.jsonl", "--task", "<CAPTION>", "--max_new_tokens", "8",
                 "--batch_size", "3")
    lines = {os.path.basename(r["file"]): r for r in map(json.loads, text.splitlines())}
    assert {name: (r["width"], r["height"]) for name, r in lines.items()} == {n: s for n, (s, _) in good.items()}
    err = capsys.readouterr().err
    assert "3 unreadable images skipped" in err and "notes.txt" not in err
    for name in ("empty.png", "corrupt.jpg", "truncated.jpg"):
        assert re.search(rf"\n  --images: cannot open '[^']*{name}'", err), (name, err)
    # a rerun retries only the bad ones (a fixed file gets labelled) and writes no good one again
    label(ckpt, folder, tmp_path / "l.jsonl", "--task", "<CAPTION>", "--max_new_tokens", "8")
    assert (tmp_path / "l.jsonl").read_text() == text
    assert "5 of 8 images already labelled, 3 to go" in capsys.readouterr().err


def test_coco_file_is_read_by_the_detector_and_scores_the_true_boxes(ckpt, shapes, tmp_path, monkeypatch):
    """A model that answers each image's true <OD> target: the COCO file must give back the true boxes, read by
    dyhead's reader, its images found beside it, and its annotations scored as results by dyhead.coco_eval."""
    folder, samples = shapes
    truth = {s["image"].tobytes(): f2.shapes_target(s, "<OD>", random.Random(0))[1] for s in samples.values()}

    def perfect(model, tokenizer, examples, *args, **kwargs):
        return [truth[image.tobytes()] for image, _, _ in examples]
    monkeypatch.setattr(f2, "generate_answers", perfect)
    out = tmp_path / "coco" / "labels.json"
    out.parent.mkdir()
    f2.main(["--ckpt", ckpt, "--images", str(folder / "*.png"), "--task", "<OD>", "--format", "coco",
             "--out", str(out)])
    assert (tmp_path / "coco" / "labels.jsonl").read_text().count("\n") == len(samples)  # the resumable lines
    coco, skipped = dyhead.read_coco(str(out))
    assert skipped == [] and [c["name"] for c in coco["categories"]] == sorted({
        o["category"] for s in samples.values() for o in s["objects"]})
    cats = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    images = dyhead.CocoImages(str(out))
    assert len(images) == len(samples)
    for i in range(len(images)):
        row = images[i]  # its objects' labels index the categories sorted by id
        sample = samples[os.path.basename(images.images[i]["file_name"])]
        assert row["image"].tobytes() == sample["image"].tobytes()
        got = sorted((cats[o["label"]], o["box"]) for o in row["objects"])
        want = sorted((o["category"], o["box"]) for o in sample["objects"])
        assert [g[0] for g in got] == [w[0] for w in want]
        assert np.allclose([g[1] for g in got], [w[1] for w in want], atol=1.1)  # whole pixels (post_process truncates)
    # the true boxes as ground truth (image ids 1.. in the file's order, category ids 1.. in name order) and the
    # file's annotations as results: every true box found at IoU 0.5
    files = [os.path.basename(im["file_name"]) for im in sorted(coco["images"], key=lambda im: im["id"])]
    truths = [[(o["box"], cats.index(o["category"]) + 1) for o in samples[f]["objects"]] for f in files]
    gt = data.coco_instances([{"width": 96, "height": 96}] * len(files), truths,
                             [{"id": k} for k in range(1, len(cats) + 1)])
    stats = dyhead.coco_eval(gt, coco["annotations"])
    assert stats["AP50"] == pytest.approx(1.0)


def test_labels_scored_end_to_end_against_data_py_ground_truth(ckpt, tmp_path, monkeypatch, capsys):
    """The README's chain: python data.py --images DIR --coco (images + ground truth), florence2.py --images DIR
    --format coco, python dyhead.py GT LABELS. A model that answers the true <OD> target scores AP50 1; one that
    moves every box by half the image scores ~0; boxes of a name the ground truth lacks are counted and left out."""
    folder = tmp_path / "val96"
    out = subprocess.run([sys.executable, "data.py", "--size", "96", "--n", "6", "--images", str(folder), "--coco",
                          "--out", str(tmp_path / "grid.png")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    gt_path = folder / "instances.json"
    world = data.ShapesWorld("val", 96)
    truth = {world[i]["image"].tobytes(): f2.shapes_target(world[i], "<OD>", random.Random(0))[1] for i in range(6)}
    shift = {"value": 0}

    def answers(model, tokenizer, examples, *args, **kwargs):
        texts = [truth[image.tobytes()] for image, _, _ in examples]
        return [re.sub(r"<loc_(\d+)>", lambda m: f"<loc_{(int(m[1]) + shift['value']) % 1000}>", t) for t in texts]
    monkeypatch.setattr(f2, "generate_answers", answers)
    results = {}
    for name, offset in (("right", 0), ("moved", 500)):
        shift["value"] = offset
        labels = tmp_path / f"{name}.json"
        f2.main(["--ckpt", ckpt, "--images", str(folder), "--task", "<OD>", "--format", "coco", "--out", str(labels)])
        capsys.readouterr()
        score = subprocess.run([sys.executable, "dyhead.py", str(gt_path), str(labels)], cwd=ROOT,
                               capture_output=True, text=True)
        assert score.returncode == 0, score.stderr
        results[name] = dict(zip(score.stdout.split()[::3], map(float, score.stdout.split()[1::3])))
    assert results["right"]["AP50"] == pytest.approx(1.0) and results["moved"]["AP50"] < 0.1, results
    gt, labelled = json.loads(gt_path.read_text()), json.loads((tmp_path / "right.json").read_text())
    missing = labelled["categories"][0]["name"]  # a name the ground truth lacks: its boxes are left out, counted
    gt["categories"] = [c for c in gt["categories"] if c["name"] != missing]
    found, unknown = dyhead.detections_for(gt, labelled, folder, tmp_path)
    n_missing = sum(a["category_id"] == labelled["categories"][0]["id"] for a in labelled["annotations"])
    assert unknown == {missing: n_missing} and len(found) == len(labelled["annotations"]) - n_missing > 0
    gt["images"] = gt["images"][1:]
    with pytest.raises(ValueError, match="val_0.png' is not in the ground truth's images"):
        dyhead.detections_for(gt, labelled, folder, tmp_path)


def test_dtype_casts_the_model_and_eval_only_autocasts(ckpt, shapes, tmp_path, monkeypatch):
    folder, _ = shapes
    seen, real = [], f2.generate_answers

    def spy(model, *args, **kwargs):
        seen.append(next(model.parameters()).dtype)
        return real(model, *args, **kwargs)
    monkeypatch.setattr(f2, "generate_answers", spy)
    text = label(ckpt, folder, tmp_path / "bf16.jsonl", "--task", "<OD>", "--max_new_tokens", "12",
                 "--dtype", "bfloat16", "--batch_size", "4")
    assert seen == [torch.bfloat16] * 2 and text.count("\n") == 8
    monkeypatch.setattr(f2, "evaluate", lambda *a: {"autocast_bf16": float(
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)})
    metrics = train.main(["--eval_only", "--dtype=bfloat16", "--val_size=2", f"--out_dir={os.path.dirname(ckpt)}",
                          "--device=cpu"])
    assert metrics == {"autocast_bf16": 1.0}
    assert train.main(["--eval_only", "--val_size=2", f"--out_dir={os.path.dirname(ckpt)}",
                       "--device=cpu"]) == {"autocast_bf16": 0.0}


@pytest.mark.parametrize("flags, message", [
    (["--images", "EMPTY", "--task", "<OD>"], "no image files found"),
    (["--images", "EMPTY/*.jpg", "--task", "<OD>"], "no image files found"),
    (["--images", "IMGS", "--task", "<DETECT>"], "unknown task '<DETECT>'"),
    (["--images", "IMGS", "--task", "<CAPTION_TO_PHRASE_GROUNDING>"], "needs a text input"),
    (["--images", "IMGS", "--task", "<CAPTION>", "--format", "coco"], "--format coco needs a box task"),
    (["--images", "IMGS", "--task", "<OD>", "--format", "coco", "--out", "x.jsonl"], "writes a .json file"),
    (["--image", "IMGS/s0.png", "--task", "<OD>", "--format", "coco"], "--format coco labels a folder"),
    (["--images", "IMGS", "--task", "<OD>", "--batch_size", "0"], "must be at least 1"),
    (["--images", "IMGS", "--image", "IMGS/s0.png", "--task", "<OD>"], "not allowed with argument"),
    (["--images", "IMGS", "--task", "<OD>", "--out", "BAD.jsonl"], r"BAD.jsonl:2: not a labels line"),
])
def test_flag_errors_say_what_is_wrong(ckpt, shapes, tmp_path, capsys, flags, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "BAD.jsonl").write_text('{"file": "a.png", "task": "<OD>", "answer": {}}\n{"file": \n{}\n')
    swap = {"EMPTY": str(tmp_path / "EMPTY"), "IMGS": str(shapes[0]), "BAD.jsonl": str(tmp_path / "BAD.jsonl")}
    flags = [re.sub(r"^(EMPTY|IMGS|BAD\.jsonl)", lambda m: swap[m.group(1)], f) for f in flags]
    with pytest.raises(SystemExit) as stop:
        f2.main(["--ckpt", ckpt, *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err
