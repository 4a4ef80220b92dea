"""Near-duplicate removal on real photographs: the pictures scikit-image ships, each with the five planted copies of
data.py --pool (exact, JPEG at quality 30-70, resized 0.5-2x, cropped to 85-95%, brightness +-20%), curated by
engine.py with the pHash pass alone and with the UniCL embedding pass added. Prints each copy kind's recall and every
pair of distinct pictures called duplicates (there should be none), and the pHash distances behind them.

    python experiments/curation_photos.py [--unicl_ckpt out_noisy/ckpt.pt] [--hash_distance 6] [--embed_similarity 0.95]

Needs scikit-image (a test-only dependency). The two chessboards are one picture in two modes and are left out.
"""
import argparse
import glob
import json
import os
import random
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat project files
import data  # noqa: E402
import engine  # noqa: E402

KINDS = ("duplicate_exact", "duplicate_jpeg", "duplicate_resize", "duplicate_crop", "duplicate_brightness")


def photo_pool(folder, seed=0):
    """Write the photos and their copies as folder/pool.jsonl; -> the rows' (photo, kind)."""
    import skimage.data
    paths = sorted(p for p in glob.glob(os.path.join(os.path.dirname(skimage.data.__file__), "*"))
                   if p.endswith((".png", ".jpg")) and "chessboard" not in p)
    rows, listing = [], []
    for k, path in enumerate(paths):
        name = os.path.splitext(os.path.basename(path))[0]
        image = data.to_rgb(data.Image.open(path))
        rng = random.Random(f"{seed}-{name}")
        for kind in ("original",) + KINDS:
            copy, encoded = (image, None) if kind == "original" else data._duplicate(kind, image, rng)
            file = f"{name}_{kind}.{'jpg' if encoded else 'png'}"
            if encoded:
                open(os.path.join(folder, file), "wb").write(encoded)
            else:
                copy.save(os.path.join(folder, file))
            rows.append((name, kind))
            listing.append({"image": file, "caption": f"a photo of {name}"})
    with open(os.path.join(folder, "pool.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in listing)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unicl_ckpt", default="", help="a UniCL checkpoint: also run the embedding pass")
    parser.add_argument("--hash_distance", type=int, default=engine.CurateConfig.hash_distance)
    parser.add_argument("--embed_similarity", type=float, default=0.95)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = photo_pool(folder)
        photos = sorted({p for p, _ in rows})
        print(f"{len(photos)} pictures x 6 rows (the original and {len(KINDS)} copies)")
        loose = dict(min_side=0, max_aspect=0, min_words=0, max_words=0, max_share=0, min_relevance=0)
        runs = [("pHash", {})]
        if args.unicl_ckpt:
            runs.append(("pHash + embedding", dict(unicl_ckpt=args.unicl_ckpt, embed_similarity=args.embed_similarity)))
        for title, extra in runs:
            cfg = engine.CurateConfig(data=os.path.join(folder, "pool.jsonl"), out=os.path.join(folder, "out.jsonl"),
                                      hash_distance=args.hash_distance, **loose, **extra)
            with open(os.devnull, "w") as quiet:
                stdout, sys.stdout = sys.stdout, quiet
                try:
                    result = engine.curate(cfg)
                finally:
                    sys.stdout = stdout
            gone = {r["row"]: r for r in result["removed"]}
            wrong = [(rows[r][0], rows[rec["duplicate_of"]["row"]][0], rec["filter"]) for r, rec in gone.items()
                     if "duplicate_of" in rec and rows[rec["duplicate_of"]["row"]][0] != rows[r][0]]
            print(f"\n{title} (hash distance <= {args.hash_distance}"
                  f"{f', embedding cosine >= {args.embed_similarity}' if extra else ''}):")
            for kind in KINDS:  # one row of a photo's pair goes: the copy, or the original in the copy's place
                found = sum(any(rows[r] == (p, kind) or (rows[r] == (p, "original") and
                                rows[gone[r]["duplicate_of"]["row"]] == (p, kind)) for r in gone) for p in photos)
                print(f"  {kind:22s} recall {found / len(photos):.3f} ({found}/{len(photos)})")
            print(f"  distinct pictures called duplicates: {len(wrong)}" + "".join(f"\n    {a} ~ {b} ({how})"
                                                                             for a, b, how in wrong))
        # the distances behind it: each copy kind to its original, and the nearest distinct picture's original
        parts = sorted(glob.glob(os.path.join(folder, "out.jsonl.parts", "chunk_*.pt")))
        f = engine.merge_features([torch.load(p, weights_only=True) for p in parts])
        bits = engine.hash_bits(f["hash"])
        dist = (64 - bits @ bits.T) / 2                                        # (N, N) Hamming distances
        orig = [i for i, (_, k) in enumerate(rows) if k == "original"]
        for kind in KINDS:
            d = [dist[i, orig[photos.index(p)]].item() for i, (p, k) in enumerate(rows) if k == kind]
            print(f"  pHash distance, {kind} to its original: median {np.median(d):.0f}, max {max(d):.0f}")
        same = torch.tensor([[rows[i][0] == rows[j][0] for j in range(len(rows))] for i in range(len(rows))])
        print(f"  pHash distance between rows of distinct pictures: min {dist[~same].min().item():.0f}")


if __name__ == "__main__":
    main()
