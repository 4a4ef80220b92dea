"""The image-text relevance filter on a planted pool: how its scores split clean pairs from moved captions and
boilerplate, and why a short text is embedded through the prompt templates.

    python experiments/probe_relevance.py POOL_DIR CURATED_OUT --unicl_ckpt out_noisy/ckpt.pt

CURATED_OUT is the --out of an `engine.py curate` run on POOL_DIR/pool.jsonl with that checkpoint: the image
embeddings are read back from CURATED_OUT.parts. Prints the relevance percentiles per planted kind, moved captions
found and clean rows lost at several thresholds, and how often a clean image's own caption is the best of the
pool's distinct texts, with the texts read bare and read through the templates (engine.encode_texts).
"""
import argparse
import glob
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat project files
import engine  # noqa: E402
import unicl  # noqa: E402


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pool")
    parser.add_argument("curated")
    parser.add_argument("--unicl_ckpt", required=True)
    args = parser.parse_args()
    chunks = sorted(glob.glob(os.path.join(args.curated + ".parts", "chunk_*.pt")))
    f = engine.merge_features([torch.load(p, weights_only=True) for p in chunks])
    kind = np.array([json.loads(line)["kind"] for line in open(os.path.join(args.pool, "truth.jsonl"))])
    u = F.normalize(f["image_emb"], dim=-1)                                   # (N, D)
    sim = (u * F.normalize(f["text_emb"], dim=-1)).sum(1).numpy()             # (N,)
    print("relevance percentiles 1 / 5 / 50 / 95 per kind:")
    for k in sorted(set(kind)):
        print(f"  {k:22s} " + " / ".join(f"{v:.2f}" for v in np.percentile(sim[kind == k], [1, 5, 50, 95])))
    for t in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
        print(f"  --min_relevance {t}: moved captions found {(sim[kind == 'moved_caption'] < t).mean():.3f}, "
              f"boilerplate {(sim[kind == 'boilerplate'] < t).mean():.3f}, clean lost {(sim[kind == 'clean'] < t).mean():.4f}")

    model, tokenizer = unicl.load_unicl(args.unicl_ckpt)[:2]
    texts = sorted(set(f["caption"]))
    own = torch.tensor([texts.index(c) for c in f["caption"]])
    clean = torch.tensor(kind == "clean")
    bare_tokens, eot = unicl.tokenize(tokenizer, texts, model.cfg.context_length)
    for name, t in (("bare", model.encode_text(bare_tokens, eot)),
                    ("through the templates", engine.encode_texts(model, tokenizer, texts))):
        best = (u @ F.normalize(t, dim=-1).T).argmax(1)                      # (N,) the best of the distinct texts
        print(f"own caption is the best of {len(texts)} texts, read {name}: "
              f"{(best == own)[clean].float().mean():.3f} of clean images")


if __name__ == "__main__":
    main()
