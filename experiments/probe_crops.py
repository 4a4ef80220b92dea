"""Why the planted crops (85-95% of each side, at a random offset) escape curation: what separates a crop from its
original, against what separates two distinct clean images, under three measures.

    python experiments/probe_crops.py POOL_DIR [--unicl_ckpt out_noisy/ckpt.pt] [--n 3000]

1. pHash distance of the crop to its original, against each clean image's nearest distinct clean image.
2. The same with window hashes, a multi-crop variant not in engine.py: the crop's pHash against the best of a 5 x 5
   grid of 90% windows of the original (and each clean image against every window of the others).
3. With a checkpoint: the cosine of UniCL image embeddings, crop to original, against nearest distinct clean image.
For each, the fraction of crops found and of clean images given a false partner at a few thresholds.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat project files
import data  # noqa: E402
import engine  # noqa: E402
import unicl  # noqa: E402


def bits_of(images):
    return engine.hash_bits(torch.tensor([engine.to_signed(h) for h in engine.phashes(images)]))  # (N, 64)


def windows(image, scale=0.9, steps=5):
    w, h = image.size
    cw, ch = scale * w, scale * h
    return [image.crop((round((w - cw) * i / (steps - 1)), round((h - ch) * j / (steps - 1)),
                        round((w - cw) * i / (steps - 1) + cw), round((h - ch) * j / (steps - 1) + ch)))
            for j in range(steps) for i in range(steps)]


def report(name, crop_score, clean_score, thresholds, larger_is_closer):
    print(f"\n{name}: crop to its original, median {np.median(crop_score):.3f}; clean image to its nearest distinct "
          f"clean image, median {np.median(clean_score):.3f}")
    for t in thresholds:
        hit = (lambda s: s >= t) if larger_is_closer else (lambda s: s <= t)
        print(f"  threshold {t}: crops found {hit(crop_score).mean():.3f}, clean images with a false partner "
              f"{hit(clean_score).mean():.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pool", help="a folder written by python data.py --pool")
    parser.add_argument("--unicl_ckpt", default="")
    parser.add_argument("--n", type=int, default=3000, help="clean images compared (all pairs)")
    args = parser.parse_args()
    truth = [json.loads(line) for line in open(os.path.join(args.pool, "truth.jsonl"))]
    load = lambda r: data.load_image(os.path.join(args.pool, truth[r]["image"]), f"row {r}")
    crops = [t for t in truth if t["kind"] == "duplicate_crop"][:500]
    clean = [t["row"] for t in truth if t["kind"] == "clean"][:args.n]
    crop_images, originals = [load(t["row"]) for t in crops], [load(t["of"]) for t in crops]
    clean_images = [load(r) for r in clean]
    print(f"{len(crops)} crops, {len(clean)} clean images")

    full_crop, full_orig, full_clean = bits_of(crop_images), bits_of(originals), bits_of(clean_images)
    d = (64 - full_clean @ full_clean.T) / 2                                            # (n, n)
    d.fill_diagonal_(99)
    report("pHash distance", ((64 - (full_crop * full_orig).sum(1)) / 2).numpy(), d.min(1).values.numpy(),
           (4, 6, 8, 10), larger_is_closer=False)

    W = 25
    win_orig = torch.stack([bits_of(windows(im)) for im in originals])                 # (crops, W, 64)
    crop_d = ((64 - (win_orig * full_crop[:, None]).sum(-1)) / 2).min(1).values         # (crops,)
    win_clean = torch.cat([bits_of(windows(im)) for im in clean_images])               # (n * W, 64)
    dw = ((64 - full_clean @ win_clean.T) / 2).view(len(clean), len(clean), W).min(-1).values  # (n, n)
    dw.fill_diagonal_(99)
    report("window pHash distance (5 x 5 windows of 90%)", crop_d.numpy(), dw.min(1).values.numpy(), (4, 6, 8),
           larger_is_closer=False)

    if args.unicl_ckpt:
        model, _ = unicl.load_unicl(args.unicl_ckpt)[:2]
        tf = data.ImageTransform(model.cfg.img_size, train=False)
        emb = lambda ims: F.normalize(unicl.encode_images(model, ims, tf), dim=-1)
        ec, eo, ee = emb(crop_images), emb(originals), emb(clean_images)
        s = ee @ ee.T
        s.fill_diagonal_(-1)
        report("UniCL image-embedding cosine", (ec * eo).sum(1).numpy(), s.max(1).values.numpy(),
               (0.9, 0.95, 0.98, 0.99, 0.995), larger_is_closer=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
