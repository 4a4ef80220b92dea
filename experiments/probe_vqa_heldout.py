"""Where do the toy METER's answers on images with a held-out colour-shape pair go wrong? Probes, not tests
(docs/vqa-toy.md, "What limits it").

    python experiments/probe_vqa_heldout.py answers out_vqa/ckpt.pt       # right answers per type, by whether the question
                                                                   # names the held-out object (its colour or shape)
    python experiments/probe_vqa_heldout.py tower out_u/ckpt.pt out_vqa/ckpt.pt   # linear probe of each tower's shapes
    python experiments/probe_vqa_heldout.py frozen --init_from=out_u/ckpt.pt --eval_interval=1000 --out_dir=out_frz
                                                                   # train.py --stage vqa, every tower stage frozen

`tower` fits a logistic regression (Adam, 500 full-batch steps) on a tower's mean-pooled last map of 3000 single-object
training images (seen pairs only) to the object's shape (and its colour), and scores it on 3000 single-object val
images, apart for seen and held-out pairs: how much of a held-out pair's shape the tower's features still carry. A
UniCL checkpoint is read as meter.build_model(--init_from=) reads it; a vqa checkpoint as trained.
"""
import collections
import dataclasses
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat project files
import data  # noqa: E402
import meter  # noqa: E402
import train  # noqa: E402


def load(path):
    """A vqa checkpoint as trained, or the toy with a UniCL checkpoint's tower -> (model in eval mode, config)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("train_config", {}).get("stage") == "vqa":
        cfg = meter.MeterConfig(**{**ckpt["stage_config"], "init_from": ""})
        model = meter.build_model(cfg, meter.build_vocab(cfg))
        model.load_state_dict(ckpt["model"])
    else:
        cfg = dataclasses.replace(meter.CONFIGS["toy"], init_from=path)
        model = meter.build_model(cfg, meter.build_vocab(cfg))
    return model.eval(), cfg


@torch.no_grad()
def answers(path):
    model, cfg = load(path)
    vocab = meter.build_vocab(cfg)
    val = meter.ShapesVQA("val", cfg.img_size, 2000, seed=0)
    rows = [(val.world[i], val[i]) for i in range(len(val))]
    predicted = meter.answer(model, vocab, cfg, [s["image"] for _, s in rows],
                             [s["questions"][0]["question"] for _, s in rows])
    right = collections.defaultdict(list)
    for p, (world, s) in zip(predicted, rows):
        q = s["questions"][0]
        if not s["heldout"]:
            right[(q["type"], "seen image")].append(p == q["answers"][0])
            continue
        held = [o for o in world["objects"] if (o["color"], o["category"]) in data.HELDOUT]
        names = any(o["color"] in q["question"] or o["category"] in q["question"] for o in held)
        right[(q["type"], "names the held-out object" if names else "held-out image, other object")].append(
            p == q["answers"][0])
    print(f"{sum(p == s['questions'][0]['answers'][0] for p, (_, s) in zip(predicted, rows)) / len(rows):.4f} "
          f"right over {len(rows)} val questions")
    for key in sorted(right):
        print(f"{key[0]:9s} {key[1]:30s} {sum(right[key]) / len(right[key]):.3f} of {len(right[key])}")


@torch.no_grad()
def pooled_features(model, split, n):
    world = data.ShapesWorld(split, size=64, n=n, seed=0, min_objects=1, max_objects=1, ocr_prob=0.0)
    feats, shape, colour, heldout = [], [], [], []
    for i in range(0, n, 200):
        samples = [world[j] for j in range(i, min(n, i + 200))]
        pixels = torch.stack([meter.preprocess(s["image"], 64) for s in samples])
        feats.append(model.image_encoder.forward_features(pixels)[-1].mean((2, 3)))     # (b, C)
        for s in samples:
            o = s["objects"][0]
            shape.append(data.SHAPES.index(o["category"]))
            colour.append(data.COLORS.index(o["color"]))
            heldout.append((o["color"], o["category"]) in data.HELDOUT)
    return torch.cat(feats), torch.tensor(shape), torch.tensor(colour), torch.tensor(heldout)


def tower(paths):
    for path in paths:
        model, _ = load(path)
        x_train, shape_train, colour_train, _ = pooled_features(model, "train", 3000)
        x_val, shape_val, colour_val, heldout = pooled_features(model, "val", 3000)
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6
        x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
        for name, y_train, y_val in (("shape", shape_train, shape_val), ("colour", colour_train, colour_val)):
            torch.manual_seed(0)
            probe = torch.nn.Linear(x_train.shape[1], 6)
            opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
            for _ in range(500):
                loss = F.cross_entropy(probe(x_train), y_train)
                opt.zero_grad()
                loss.backward()
                opt.step()
            right = probe(x_val).argmax(1) == y_val
            print(f"{path}: {name} of seen pairs {right[~heldout].float().mean():.3f}, of held-out pairs "
                  f"{right[heldout].float().mean():.3f} ({int(heldout.sum())} images)")


def frozen(rest):
    build = meter.build_model

    def build_frozen(cfg, vocab):
        model = build(cfg, vocab)
        if cfg.init_path:
            model.freeze(model.image_encoder)
        return model
    meter.build_model = build_frozen
    train.main(["--stage", "vqa", *rest])


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("answers", "tower", "frozen"):
        sys.exit(__doc__)
    mode, rest = sys.argv[1], sys.argv[2:]
    answers(rest[0]) if mode == "answers" else tower(rest) if mode == "tower" else frozen(rest)
