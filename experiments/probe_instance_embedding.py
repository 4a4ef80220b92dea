"""Can an embedding find the crops that pHash and the toy's UniCL miss? A small CNN trained for 600 steps (~90 s) with
SimCLR's contrastive loss on the pool's own clean images, where each image's two views are random 80-100% crops with
brightness and JPEG changes: it learns what stays the same under copying (this image, not its class). Then the planted
crops against their originals, and clean images against their nearest distinct clean image, as in probe_crops.py.

    python experiments/probe_instance_embedding.py POOL_DIR [--steps 600]

The 3000 clean images it is scored on are held out of its training. Not in engine.py (yet): an instance-level
embedding is what its embedding pass needs, and this measures whether a toy can have one.
"""
import argparse
import io
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageEnhance

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat project files
import data  # noqa: E402

SIDE = 48


def view(image, rng):
    """A copy as the web makes them: a crop of 80-100% of each side, maybe brighter or darker, maybe JPEG'd."""
    w, h = image.size
    f = rng.uniform(0.8, 1.0)
    cw, ch = round(w * f), round(h * f)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    if rng.random() < 0.3:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.randint(30, 70))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image.resize((SIDE, SIDE), Image.BILINEAR)


def batch(images):
    pixels = np.stack([np.asarray(im.resize((SIDE, SIDE), Image.BILINEAR), dtype=np.float32) / 255 for im in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)                                   # (B, 3, 48, 48)


def encoder():
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(3, 32, 2), *block(32, 64, 2), *block(64, 128, 2), *block(128, 128, 1),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(512, 128))        # a 2x2 grid keeps layout


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pool", help="a folder written by python data.py --pool")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    truth = [json.loads(line) for line in open(os.path.join(args.pool, "truth.jsonl"))]
    load = lambda r: data.load_image(os.path.join(args.pool, truth[r]["image"]), f"row {r}")
    clean = [t["row"] for t in truth if t["kind"] == "clean"]
    held_out, train_rows = clean[:3000], clean[3000:11000]
    images = [load(r) for r in train_rows]
    model = encoder()
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=1e-4)
    start = time.time()
    for step in range(args.steps):  # SimCLR: each view's positive is the other view of its image, 0.1 temperature
        picked = rng.sample(images, args.batch)
        z = F.normalize(model(batch([view(im, rng) for im in picked] + [view(im, rng) for im in picked])), dim=-1)
        logits = z @ z.T / 0.1                                                             # (2B, 2B)
        logits.fill_diagonal_(-1e9)
        target = torch.cat([torch.arange(args.batch, 2 * args.batch), torch.arange(args.batch)])
        loss = F.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    crops = [t for t in truth if t["kind"] == "duplicate_crop"][:500]
    with torch.no_grad():
        embed = lambda ims: torch.cat([F.normalize(model(batch(ims[k:k + 256])), dim=-1)
                                       for k in range(0, len(ims), 256)])
        crop, original = embed([load(t["row"]) for t in crops]), embed([load(t["of"]) for t in crops])
        held = embed([load(r) for r in held_out])
    pair = (crop * original).sum(1).numpy()
    nearest = held @ held.T
    nearest.fill_diagonal_(-1)
    nearest = nearest.max(1).values.numpy()
    print(f"{len(crops)} crops against 3000 held-out clean images: crop to original median {np.median(pair):.3f}, "
          f"clean image to its nearest distinct clean image median {np.median(nearest):.3f}")
    for t in (0.8, 0.85, 0.9, 0.95):
        print(f"  cosine >= {t}: crops found {(pair >= t).mean():.3f}, clean images with a false partner "
              f"{(nearest >= t).mean():.4f}")


if __name__ == "__main__":
    main()
