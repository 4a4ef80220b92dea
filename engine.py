"""
The data side of Florence: curating web image-text pairs (Florence section 2.1).

Florence starts from ~3B web image-text pairs and keeps 900M (FLD-900M) with filters "similar to ALIGN": hash-based
near-duplicate removal, small-image removal and image-text relevance; identical texts share one UniCL label
(unicl.text_label), so a text repeated over many images can stay (`--max_share 0`) where ALIGN drops it. This file
applies those filters to any source the UniCL stage reads and writes what survives in the same format:

    python engine.py curate --data pool/pool.jsonl --out pool/curated.jsonl [--unicl_ckpt out/ckpt.pt]
    torchrun --nproc_per_node=8 engine.py curate --data 'shards/*.tar' --out curated --unicl_ckpt ckpt.pt

Read top to bottom: the 64-bit perceptual hash -> per-row features (size, hash, UniCL embeddings), computed in
chunks that are saved as they finish and split over processes -> the filters, decided globally -> writing OUT and
OUT.removed.jsonl -> scoring the filters against a planted pool's truth file (data.py --pool) -> the command line.
It imports data.py and unicl.py; no stage file imports it.
"""
import argparse
import csv
import datetime
import functools
import io
import json
import math
import os
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import data
import unicl


# ----------------------------------------------------------------------------------------------------------------------
# 1. The perceptual hash (pHash). The image is reduced to 32x32 grey levels (Lanczos), transformed by a 2-D DCT-II, and
# the 8x8 lowest frequencies are compared with their median: 64 bits, one per coefficient, set where it is larger. This
# is the `imagehash` package's phash bit for bit (first coefficient = most significant bit). It resizes and transforms
# one image at a time (Pillow, then scipy); here both are matrix products over a batch of same-size images: Pillow's
# Lanczos resize in its own fixed-point integers, then the 8 needed rows of the DCT matrix.

HASH_SIDE, HASH_BITS = 32, 64
_k, _n = np.arange(8)[:, None], np.arange(HASH_SIDE)[None, :]
DCT_ROWS = 2 * np.cos(np.pi * _k * (2 * _n + 1) / (2 * HASH_SIDE))  # (8, 32): scipy's unnormalised DCT-II, rows 0..7
PRECISION_BITS = 22  # Pillow's fixed point for 8-bit resampling (32 - 8 - 2)


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


@functools.lru_cache(maxsize=None)
def lanczos_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of Pillow's Lanczos resampling along one axis, as the integers it computes with
    (its precompute_coeffs + normalize_coeffs_8bpc: a window of 3 x the scale around each output pixel's centre,
    weights summing to 1, rounded to 22 fractional bits). The same double operations in the same order, so the same
    integers; they are held as float64, where every sum of the resize is an exact integer (< 2^53)."""
    scale = size_in / size_out
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    m = np.zeros((size_out, size_in))
    for xx in range(size_out):
        center = (xx + 0.5) * scale
        xmin, xmax = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), size_in)
        ws = []
        for x in range(xmax - xmin):
            t = (x + xmin - center + 0.5) / filterscale
            ws.append(_sinc(t) * _sinc(t / 3) if -3.0 <= t < 3.0 else 0.0)
        total = sum(ws)
        for x, w in enumerate(ws):
            w = w / total if total != 0.0 else w
            m[xx, xmin + x] = int(w * (1 << PRECISION_BITS) + (0.5 if w >= 0 else -0.5))
    return m


def _fixed_point_to_uint8(s: np.ndarray) -> np.ndarray:
    """Pillow's clip8: round the fixed-point sums to 8-bit pixels (in place; powers of two keep it exact)."""
    s += 1 << PRECISION_BITS - 1
    s *= 1.0 / (1 << PRECISION_BITS)
    return np.clip(np.floor(s, out=s), 0, 255, out=s)


def along_last(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(..., n) @ m.T for m (k, n) -> (..., k), as one matrix product over the whole batch."""
    return (x.reshape(-1, x.shape[-1]) @ m.T).reshape(*x.shape[:-1], m.shape[0])


def _resize_passes(x: np.ndarray, side: int, vertical_first: bool) -> np.ndarray:
    for axis in ((1, 2) if vertical_first else (2, 1)):
        if axis == 2 and x.shape[2] != side:
            x = _fixed_point_to_uint8(along_last(x, lanczos_matrix(x.shape[2], side)))              # (B, H, side)
        if axis == 1 and x.shape[1] != side:
            x = x.transpose(0, 2, 1)                                                                # (B, W, H)
            x = _fixed_point_to_uint8(along_last(x, lanczos_matrix(x.shape[2], side)))              # (B, W, side)
            x = x.transpose(0, 2, 1)                                                                # (B, side, W)
    return x


@functools.lru_cache(maxsize=None)
def _pass_order(h: int, w: int, side: int) -> str:
    """Which pass Pillow runs first for an (h, w) image: "h" or "v" (its choice is a cost rule of its own, which has
    changed between versions), read off one probe image of that size; "pillow" if neither order gives its pixels."""
    probe = (np.arange(h * w, dtype=np.int64) * 2654435761 % 251).astype(np.uint8).reshape(h, w)  # any busy pattern
    want = np.asarray(Image.fromarray(probe).resize((side, side), Image.LANCZOS))
    for order in ("h", "v"):
        if np.array_equal(_resize_passes(probe[None].astype(np.float64), side, order == "v")[0], want):
            return order
    return "pillow"


def resize_grey(grey: np.ndarray, side: int = HASH_SIDE) -> np.ndarray:
    """(B, H, W) uint8 grey images of one size -> (B, side, side) float64 holding Pillow's `resize((side, side),
    LANCZOS)` exactly: two passes, each rounded to 8 bits (an axis already `side` long is left alone)."""
    order = _pass_order(grey.shape[1], grey.shape[2], side)
    if order == "pillow":
        return np.stack([np.asarray(Image.fromarray(g).resize((side, side), Image.LANCZOS)) for g in grey]) * 1.0
    return _resize_passes(grey.astype(np.float64), side, order == "v")


def phashes(images) -> list[int]:
    """PIL images -> their 64-bit perceptual hashes as unsigned ints (equal to int(str(imagehash.phash(im)), 16))."""
    # Pillow's luma, (299 R + 587 G + 114 B) / 1000, as (H, W) uint8 arrays
    grey = [np.frombuffer(im.convert("L").tobytes(), np.uint8).reshape(im.height, im.width) for im in images]
    small = np.empty((len(grey), HASH_SIDE, HASH_SIDE))
    by_shape = {}
    for i, g in enumerate(grey):
        by_shape.setdefault(g.shape, []).append(i)
    for shape, idx in by_shape.items():  # batches of one image size, at most 2^24 pixels (128 MB as float64)
        step = max(1, (1 << 24) // (shape[0] * shape[1]))
        for part in (idx[k:k + step] for k in range(0, len(idx), step)):
            small[part] = resize_grey(np.stack([grey[i] for i in part]))                          # (b, 32, 32)
    low = along_last(along_last(small, DCT_ROWS).transpose(0, 2, 1), DCT_ROWS)  # (B, 8 x-freq, 8 y-freq): DCT of x, y
    low = low.transpose(0, 2, 1).reshape(len(grey), 64)                # (B, 64): row-major over (y-freq, x-freq)
    bits = low > np.median(low, axis=1, keepdims=True)                # (B, 64)
    return [int.from_bytes(row.tobytes(), "big") for row in np.packbits(bits, axis=1)]  # (B, 8) bytes -> int


def phash(image) -> int:
    return phashes([image])[0]


def hash_bits(hashes: torch.Tensor) -> torch.Tensor:
    """(N,) int64 hashes (unsigned 64-bit values stored signed) -> (N, 64) float +-1, so that the Hamming distance of
    two rows is (64 - a.b) / 2 and a whole block of distances is one matrix product."""
    shifts = torch.arange(HASH_BITS - 1, -1, -1)
    return ((hashes[:, None] >> shifts) & 1).float() * 2 - 1         # (N, 64)


def to_signed(h: int) -> int:
    return h - (1 << 64) if h >= 1 << 63 else h


# ----------------------------------------------------------------------------------------------------------------------
# 2. Per-row features. Each row of the input is read once: whether its image decodes, its size, its hash and, with a
# UniCL checkpoint, its image and text embeddings. Rows are cut into chunks; process r of R takes chunks r, r + R, ...
# and saves each finished chunk under OUT.parts/, so a killed run resumes where it stopped (with any number of
# processes), and a rerun with other thresholds only decides again. Only these features travel between processes.

@dataclass
class CurateConfig:
    data: str = ""                  # a --data source of the UniCL stage: .csv / .tsv / .jsonl, or .tar shards
    out: str = ""                   # same family as data: a file of the same type, or a folder of .tar shards
    image_root: str = ""            # folder the image paths of a listing are relative to (default: its folder)
    unicl_ckpt: str = ""            # a train.py UniCL checkpoint: enables the embedding filters
    truth: str = ""                 # a data.py --pool truth file: score every filter against it
    # filters (ALIGN's published rules as defaults; 0 turns a rule off, -1 the hash rule, where 0 = exact copies)
    min_side: int = 200             # shorter image side, pixels
    max_aspect: float = 3.0         # longer side / shorter side
    min_words: int = 3              # words of the text
    max_words: int = 20
    hash_distance: int = 6          # near-duplicate images: Hamming distance of their pHashes; -1 = off
    embed_similarity: float = 0.0   # near-duplicate images: cosine of UniCL image embeddings; off unless given,
                                    # as its threshold belongs to the model (docs/curation.md)
    max_share: int = 10             # a text on more images than this is boilerplate
    min_relevance: float = 0.28     # with a checkpoint: image-text cosine below this is irrelevant (LAION's CLIP
                                    # threshold; 0 = off)
    keep_fraction: float = 0.0      # instead: keep this fraction of the rows, the most relevant (0 = off)
    # work
    chunk: int = 512                # rows per saved chunk
    batch_size: int = 128           # images per UniCL forward pass
    device: str = ""                # "" = cuda if available else cpu


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Texts -> (N, D) embeddings, each read as the UniCL model was trained to read it: in stage one a short text only
    ever appears inside a prompt template (unicl.augment_text), so it is embedded as the mean over the templates, as
    zero-shot class names are (CLIP's prompt ensemble); a longer text as itself."""
    cfg, device = model.cfg, next(model.parameters()).device
    short = [unicl.templated(t, cfg) for t in texts]
    prompts = [p for t, s in zip(texts, short) for p in ([tpl.format(t) for tpl in unicl.TEMPLATES] if s else [t])]
    tokens, eot = unicl.tokenize(tokenizer, prompts, cfg.context_length)
    emb = torch.cat([model.encode_text(tokens[i:i + 512].to(device), eot[i:i + 512].to(device)).float().cpu()
                     for i in range(0, len(prompts), 512)])                      # (P, D)
    sizes = torch.tensor([len(unicl.TEMPLATES) if s else 1 for s in short])
    owner = torch.repeat_interleave(torch.arange(len(texts)), sizes)             # (P,) the text of each prompt
    mean = torch.zeros(len(texts), emb.shape[1]).index_add_(0, owner, emb) / sizes[:, None]
    return F.normalize(mean, dim=-1)                                             # (N, D)


@torch.no_grad()
def chunk_features(ds, rows: range, model=None, tokenizer=None, batch_size: int = 128) -> dict:
    """Features of rows `rows` of ds. An image that does not decode is marked ok=False with its error (its message is
    the one ds.skipped gains, which curate empties before any chunk)."""
    samples, errors = [], []
    for i in rows:
        samples.append(ds[i])
        errors.append(ds.skipped.pop() if ds.skipped else None)  # a bad image reads as None, its message here
    good = [s for s in samples if s is not None]
    hashes = iter(phashes([s["image"] for s in good]))
    out = {"rows": list(rows), "ok": [s is not None for s in samples], "error": errors,
           "source": [ds.source(i) for i in rows],
           "caption": [s["caption"] if s else "" for s in samples],
           "size": [s["image"].size if s else (0, 0) for s in samples],
           "bytes": [_file_bytes(ds, i) for i in rows],
           "hash": [to_signed(next(hashes)) if s else 0 for s in samples]}
    if model is not None:
        device = next(model.parameters()).device
        transform = data.ImageTransform(model.cfg.img_size, train=False)
        d = model.cfg.embed_dim
        image_emb, text_emb = torch.zeros(len(samples), d), torch.zeros(len(samples), d)
        idx = [k for k, s in enumerate(samples) if s is not None]
        if idx:
            image_emb[idx] = unicl.encode_images(model, [samples[k]["image"] for k in idx], transform, batch_size).cpu()
            text_emb[idx] = encode_texts(model, tokenizer, [samples[k]["caption"] for k in idx])
        out["image_emb"], out["text_emb"] = image_emb.half(), text_emb.half()
    return out


def _file_bytes(ds, i: int) -> int:
    """The encoded image's size: of two copies at the same resolution, the one with more bytes per pixel is the one
    compressed less (a PNG over its JPEG re-encoding)."""
    if isinstance(ds, data.TarShards):
        return ds.items[i][4]
    return os.path.getsize(ds.items[i][0]) if os.path.isfile(ds.items[i][0]) else 0


def _fingerprint(cfg: CurateConfig, ds, device: str) -> dict:
    """What the saved features depend on: the listing or shards (path, size, modification time), the checkpoint, the
    chunking and where the embeddings are computed (fp16 rounding differs between devices). A rerun whose
    fingerprint differs starts over; images edited in place behind an unchanged listing are not noticed."""
    files = sorted({item[0] for item in ds.items}) if isinstance(ds, data.TarShards) else [cfg.data]
    files += [cfg.unicl_ckpt] if cfg.unicl_ckpt else []
    stats = [[os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime] for p in files]
    return {"files": stats, "image_root": cfg.image_root, "rows": len(ds), "chunk": cfg.chunk,
            "device": device if cfg.unicl_ckpt else "", "batch_size": cfg.batch_size if cfg.unicl_ckpt else 0}


def _save_atomic(obj, path: str):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill leaves the old file or the new one, never half of one


def compute_features(cfg: CurateConfig, ds, model=None, tokenizer=None, rank: int = 0, world: int = 1) -> list[dict]:
    """This process's chunks, computed or read back from OUT.parts/ (with the UniCL model, if given, on this process's
    device). Prints a progress line with an ETA."""
    parts, n = cfg.out.rstrip("/") + ".parts", len(ds)
    device = cfg.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    meta_path, meta = os.path.join(parts, "meta.json"), _fingerprint(cfg, ds, device.split(":")[0])
    if rank == 0:
        os.makedirs(parts, exist_ok=True)
        try:
            old = json.load(open(meta_path))
        except (OSError, ValueError):
            old = None
        for name in os.listdir(parts):  # features of another input or model do not apply; a torn write never does
            if old != meta or ".tmp" in name:
                os.remove(os.path.join(parts, name))
        if old != meta:
            with open(meta_path + ".tmp", "w") as f:
                json.dump(meta, f)
            os.replace(meta_path + ".tmp", meta_path)
    if world > 1:
        dist.barrier()
    model = model.to(device) if model is not None else None
    mine = list(range(rank, math.ceil(n / cfg.chunk), world))
    todo = [c for c in mine if not os.path.isfile(os.path.join(parts, f"chunk_{c:06d}.pt"))]
    start, done_rows, last = time.time(), 0, 0.0
    todo_rows = sum(min(cfg.chunk, n - c * cfg.chunk) for c in todo)
    for c in todo:
        rows = range(c * cfg.chunk, min(n, (c + 1) * cfg.chunk))
        features = chunk_features(ds, rows, model, tokenizer, cfg.batch_size)
        _save_atomic(features, os.path.join(parts, f"chunk_{c:06d}.pt"))
        done_rows += len(rows)
        now = time.time()
        if rank == 0 and (now - last > 5 or done_rows == todo_rows):
            rate = done_rows / (now - start)
            eta = (todo_rows - done_rows) / rate
            print(f"features: {done_rows}/{todo_rows} rows of process {rank} of {world} ({rate:.0f} rows/s, "
                  f"ETA {int(eta // 60)}:{int(eta % 60):02d})", flush=True)
            last = now
    if rank == 0 and len(todo) < len(mine):
        print(f"features: {len(mine) - len(todo)} of {len(mine)} chunks read back from {parts}", flush=True)
    return [torch.load(os.path.join(parts, f"chunk_{c:06d}.pt"), weights_only=True) for c in mine]


def merge_features(chunks: list[dict]) -> dict:
    """Chunks (any order, from any processes) -> one dict over all rows in row order; lists become arrays."""
    chunks = sorted(chunks, key=lambda ch: ch["rows"][0] if ch["rows"] else 0)
    out = {key: [v for ch in chunks for v in ch[key]] for key in ("rows", "ok", "error", "source", "caption")}
    out["size"] = np.array([s for ch in chunks for s in ch["size"]], dtype=np.int64).reshape(-1, 2)  # (N, 2) w, h
    out["bytes"] = np.array([b for ch in chunks for b in ch["bytes"]], dtype=np.int64)
    out["hash"] = torch.tensor([h for ch in chunks for h in ch["hash"]], dtype=torch.int64)
    if chunks and "image_emb" in chunks[0]:
        for key in ("image_emb", "text_emb"):
            out[key] = torch.cat([ch[key] for ch in chunks]).float()  # (N, D)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 3. The filters, in the order they apply; each sees only the rows the ones before it kept: size, aspect, word count,
# duplicates, then shared text (so a copy's text is not counted twice), then relevance last (so a kept fraction is a
# fraction of the otherwise clean rows). Of a group of duplicates the largest image is kept, at equal
# sizes the larger file (compressed less), then the first row: a resized-down, cropped or JPEG'd copy goes.

def near_duplicate_pairs(x: torch.Tensor, threshold: float, block: int = 4096):
    """x (N, D) rows; -> (i, j) pairs, i < j, whose dot product is >= threshold. Computed in (block, block) tiles, so
    memory stays at one tile whatever N (time grows as N^2: at web scale one would first bucket the rows)."""
    pairs = []
    for a in range(0, len(x), block):
        for b in range(a, len(x), block):
            sim = x[a:a + block] @ x[b:b + block].T                         # (block, block)
            i, j = torch.nonzero(sim >= threshold, as_tuple=True)
            i, j = i + a, j + b
            keep = i < j
            pairs.append(torch.stack([i[keep], j[keep]], 1))
    return torch.cat(pairs) if pairs else torch.zeros(0, 2, dtype=torch.long)


def greedy_duplicates(pairs: torch.Tensor, n: int) -> dict[int, int]:
    """Pairs (i, j), i < j, over items ranked best first -> {removed item: the kept item it duplicates}. Walking the
    ranking, a kept item removes every later neighbour not yet removed; so each removed item names a kept item it is
    itself close to (no chains), and the result depends only on the ranking."""
    removed = {}
    for i, j in pairs[torch.argsort(pairs[:, 0] * n + pairs[:, 1])].tolist():
        if i not in removed and j not in removed:
            removed[j] = i
    return removed


def decide(f: dict, cfg: CurateConfig) -> tuple[np.ndarray, list[dict], list[tuple]]:
    """Features of all rows -> (keep (N,) bool, removed records, table rows (filter, seen, removed))."""
    n = len(f["rows"])
    alive = np.array(f["ok"], dtype=bool)
    removed, table = [], [("unreadable image", n, int((~alive).sum()))]
    removed += [{"row": int(r), "source": f["source"][r], "filter": "unreadable image", "error": f["error"][r]}
                for r in np.flatnonzero(~alive)]
    w, h, size = f["size"][:, 0], f["size"][:, 1], f["bytes"]
    words = np.array([len(c.split()) for c in f["caption"]])

    def drop(name, mask, details=lambda r: {}):
        mask = mask & alive
        table.append((name, int(alive.sum()), int(mask.sum())))
        for r in np.flatnonzero(mask):
            removed.append({"row": int(r), "source": f["source"][r], "filter": name, **details(r)})
        alive[mask] = False

    def dedup(name, x, threshold, detail, key=None):
        order = sorted(np.flatnonzero(alive), key=lambda r: (-int(w[r]) * int(h[r]), -int(size[r]), r))  # best first
        of, first = {}, {}
        if key is not None:  # rows with the same key (an identical hash) go to the best of them at once
            for r in order:
                if key[r] in first:
                    of[r] = first[key[r]]
                else:
                    first[key[r]] = r
            order = [r for r in order if r not in of]
        idx = torch.tensor(order, dtype=torch.long)
        dups = greedy_duplicates(near_duplicate_pairs(x[idx], threshold), len(order))
        of.update({order[j]: order[i] for j, i in dups.items()})
        for r in of:  # a row sent to its identical twin, which a better row then removed, goes to that row
            while of[r] in of:
                of[r] = of[of[r]]
        duplicate = np.zeros(n, dtype=bool)
        duplicate[list(of)] = True
        drop(name, duplicate, lambda r: {
            "duplicate_of": {"row": int(of[r]), "source": f["source"][of[r]]}, **detail(r, of[r])})

    if cfg.min_side:
        drop("small image", np.minimum(w, h) < cfg.min_side, lambda r: {"size": [int(w[r]), int(h[r])]})
    if cfg.max_aspect:
        drop("aspect ratio", np.maximum(w, h) > cfg.max_aspect * np.maximum(np.minimum(w, h), 1),
             lambda r: {"size": [int(w[r]), int(h[r])]})
    if cfg.min_words or cfg.max_words:
        drop("word count", (words < cfg.min_words) | ((words > cfg.max_words) if cfg.max_words else False),
             lambda r: {"words": int(words[r])})
    if cfg.hash_distance >= 0:
        bits = hash_bits(f["hash"])                                           # (N, 64) +-1
        drop_distance = lambda r, k: {"distance": int((HASH_BITS - bits[r] @ bits[k]).item() // 2)}
        dedup("duplicate image (hash)", bits, HASH_BITS - 2 * cfg.hash_distance - 0.5, drop_distance,
              key=f["hash"].tolist())
    if cfg.embed_similarity and "image_emb" in f:
        u = F.normalize(f["image_emb"], dim=-1)                               # (N, D)
        dedup("duplicate image (embedding)", u, cfg.embed_similarity,
              lambda r, k: {"similarity": round(float(u[r] @ u[k]), 4)})
    if cfg.max_share:
        counts = {}
        for r in np.flatnonzero(alive):
            counts[f["caption"][r]] = counts.get(f["caption"][r], 0) + 1
        shared = np.array([counts.get(c, 0) > cfg.max_share for c in f["caption"]])
        drop("shared text", shared, lambda r: {"images": counts[f["caption"][r]]})
    if (cfg.min_relevance or cfg.keep_fraction) and "image_emb" in f:
        sim = (F.normalize(f["image_emb"], dim=-1) * F.normalize(f["text_emb"], dim=-1)).sum(1).numpy()  # (N,)
        if cfg.keep_fraction:  # the fraction is of the rows that reach this filter
            live = np.flatnonzero(alive)
            cut = np.sort(sim[live])[::-1][max(0, round(cfg.keep_fraction * len(live)) - 1)] if len(live) else 0
            low = sim < cut
        else:
            low = sim < cfg.min_relevance
        drop("image-text relevance", low, lambda r: {"similarity": round(float(sim[r]), 4)})
    return alive, removed, table


# ----------------------------------------------------------------------------------------------------------------------
# 4. Writing OUT in the input's format: a listing keeps each kept row as it was (all its fields; image paths rewritten
# only when OUT sits in another folder and there is no --image_root); tar shards keep every member of a kept sample.
# Everything is written to a temporary name first and renamed, so OUT is either complete or absent.

SHARD_SAMPLES = 10000


def _replace(tmp: str, final: str):
    if os.path.isdir(final) and os.path.isdir(tmp):
        old = f"{final}.old{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def write_listing(ds: data.ImageTextFile, keep_rows: list[int], cfg: CurateConfig):
    ext = os.path.splitext(cfg.data)[1].lower()
    src_dir, out_dir = os.path.dirname(os.path.abspath(cfg.data)), os.path.dirname(os.path.abspath(cfg.out))
    move = not cfg.image_root and src_dir != out_dir

    def new_path(p):  # a path relative to the input's folder, made relative to OUT's
        return os.path.relpath(os.path.join(src_dir, p), out_dir) if move and not os.path.isabs(p) else p

    lines = {int(ds.items[r][2].rsplit(":", 1)[1]) for r in keep_rows}  # 1-based line numbers of kept rows
    text = data._read_text(cfg.data)
    out = io.StringIO()
    if ext == ".jsonl":
        for number, line in enumerate(text.split("\n"), 1):
            if number in lines:
                if move:
                    row = json.loads(line)
                    row[ds.image_field] = new_path(row[ds.image_field])
                    line = json.dumps(row, ensure_ascii=False)
                out.write(line + "\n")
    else:
        delimiter = ds.FORMATS[ext]
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True,
                            quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        header = next(reader)
        col = header.index(ds.image_field)
        writer = csv.writer(out, delimiter=delimiter, lineterminator="\n") if delimiter == "," else None
        rows = [header]
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:
                continue  # a malformed row was skipped by the reader too
            if reader.line_num in lines:
                row[col] = new_path(row[col])
                rows.append(row)
        for row in rows:  # TSV is unquoted: fields hold no tab or newline, so a plain join is exact
            writer.writerow(row) if writer else out.write("\t".join(row) + "\n")
    tmp = f"{cfg.out}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(out.getvalue())
    _replace(tmp, cfg.out)


def write_shards(ds: data.TarShards, keep_rows: list[int], cfg: CurateConfig):
    """Every member of each kept sample (image, text and any others), in input order, SHARD_SAMPLES samples a shard."""
    keep = {(ds.items[r][0], ds.items[r][1]) for r in keep_rows}  # (shard, key)
    tmp = f"{cfg.out.rstrip('/')}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    written, out = 0, None
    for shard in dict.fromkeys(ds.items[r][0] for r in keep_rows):
        with tarfile.open(shard, "r:") as src:
            samples = {}  # key -> its members, in the order the shard holds them
            for m in src:
                folder, name = os.path.split(m.name)
                key = os.path.join(folder, name.partition(".")[0])
                if m.isfile() and (shard, key) in keep:
                    samples.setdefault(key, []).append(m)
            for members in samples.values():
                if written % SHARD_SAMPLES == 0:
                    if out:
                        out.close()
                    out = tarfile.open(os.path.join(tmp, f"{written // SHARD_SAMPLES:06d}.tar"), "w")
                for m in members:
                    out.addfile(m, src.extractfile(m))
                written += 1
    if out:
        out.close()
    _replace(tmp, cfg.out.rstrip("/"))


def write_removed(removed: list[dict], skipped: list[str], path: str):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        for message in skipped:  # rows the reader could not parse: no row number, the message names file and line
            fh.write(json.dumps({"row": None, "filter": "bad row", "error": message}, ensure_ascii=False) + "\n")
        for rec in sorted(removed, key=lambda rec: rec["row"]):
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Scoring against a planted pool (data.py --pool): a planted duplicate counts as found when the copy is removed, or
# when its original is removed as the copy's duplicate (one of the two goes either way); every other planted row when
# it is removed. A clean row counts as lost when it is removed, unless it is an original removed for its own copy.

def score(truth_path: str, removed: list[dict], n_rows: int) -> dict:
    truth = [json.loads(line) for line in open(truth_path) if line.strip()]
    if len(truth) != n_rows:
        raise SystemExit(f"error: --truth {truth_path!r} has {len(truth)} rows, the data {n_rows}")
    by_row = {rec["row"]: rec for rec in removed if rec["row"] is not None}
    copy_of = {t["of"]: t["row"] for t in truth if t["of"] is not None}  # original -> its planted copy

    def found(t):
        if t["row"] in by_row:
            return by_row[t["row"]]["filter"]
        rec = by_row.get(t["of"]) if t["of"] is not None else None
        return rec["filter"] if rec and rec.get("duplicate_of", {}).get("row") == t["row"] else None

    def stands_in(r):  # an original removed as its own copy's duplicate
        return r in copy_of and by_row[r].get("duplicate_of", {}).get("row") == copy_of[r]

    kinds = {}
    for t in truth:
        k = kinds.setdefault(t["kind"], {"rows": 0, "removed": 0, "by": {}})
        k["rows"] += 1
        by = found(t) if t["kind"] != "clean" else (by_row[t["row"]]["filter"] if t["row"] in by_row
                                                    and not stands_in(t["row"]) else None)
        if by:
            k["removed"] += 1
            k["by"][by] = k["by"].get(by, 0) + 1
    filters = {}
    for rec in by_row.values():
        good = truth[rec["row"]]["kind"] != "clean" or stands_in(rec["row"])
        fl = filters.setdefault(rec["filter"], {"removed": 0, "planted": 0})
        fl["removed"] += 1
        fl["planted"] += good
    return {"kinds": kinds, "filters": filters}


def print_score(s: dict):
    print(f"{'planted kind':24s} {'rows':>6s} {'removed':>8s} {'recall':>7s}  by")
    for name, k in s["kinds"].items():  # for the clean rows, the "recall" is the share lost
        by = ", ".join(f"{f} {c}" for f, c in sorted(k["by"].items(), key=lambda kv: -kv[1]))
        print(f"{name:24s} {k['rows']:6d} {k['removed']:8d} {k['removed'] / max(k['rows'], 1):7.3f}  "
              f"{'(clean removed) ' if name == 'clean' else ''}{by}")
    print(f"{'filter':28s} {'removed':>8s} {'planted':>8s} {'precision':>9s}")
    for name, fl in s["filters"].items():
        print(f"{name:28s} {fl['removed']:8d} {fl['planted']:8d} {fl['planted'] / max(fl['removed'], 1):9.3f}")


# ----------------------------------------------------------------------------------------------------------------------
# 6. The command. One process, or torchrun: every process reads its chunks, process 0 gathers the features (never the
# images), decides and writes; OUT is the same whatever the number of processes.

def open_inputs(cfg: CurateConfig):
    """-> (the input dataset, the UniCL model and tokenizer or None, None), after every check that can fail before
    hours of work: the flags, the checkpoint, and an OUT that cannot overwrite what the run reads (the input, its
    shards, the checkpoint) or a folder of something else."""
    def fail(message):
        raise SystemExit(f"error: {message}")

    if not cfg.data or not cfg.out:
        fail("curate needs --data IN and --out OUT")
    if cfg.chunk < 1 or cfg.batch_size < 1 or not 0 <= cfg.keep_fraction <= 1:
        fail("--chunk and --batch_size must be >= 1, --keep_fraction in [0, 1]")
    model = tokenizer = None
    try:
        ds = data.open_image_text(cfg.data, cfg.image_root or None, skip_bad=True)  # bad rows: ds.skipped
        if cfg.unicl_ckpt:
            model, tokenizer, _ = unicl.load_unicl(cfg.unicl_ckpt)
    except (data.DataError, FileNotFoundError, ValueError) as e:
        fail(e)
    out = os.path.abspath(cfg.out.rstrip("/"))
    read = [cfg.data] if isinstance(ds, data.ImageTextFile) else sorted({item[0] for item in ds.items})
    for path in read + ([cfg.unicl_ckpt] if cfg.unicl_ckpt else []):
        if os.path.abspath(path) == out or os.path.abspath(path).startswith(out + os.sep):
            fail(f"--out {cfg.out!r} would overwrite {path!r}, which this run reads")
    ext = os.path.splitext(cfg.data)[1].lower()
    if isinstance(ds, data.ImageTextFile) and os.path.splitext(out)[1].lower() != ext:
        fail(f"--out {cfg.out!r}: the input is a {ext} file, so OUT must be one too")
    if isinstance(ds, data.TarShards):
        if os.path.splitext(out)[1].lower() in (".tar", *data.ImageTextFile.FORMATS):
            fail(f"--out {cfg.out!r}: the input is tar shards, so OUT is a folder to write them to")
        if os.path.isdir(out) and any(not (n.endswith(".tar") and n[:-4].isdigit()) for n in os.listdir(out)):
            fail(f"--out {cfg.out!r} is a folder holding other files than curated shards: name another")
    return ds, model, tokenizer


def curate(cfg: CurateConfig) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # only features (small tensors, lists) travel, and gloo moves them on any machine; the processes wait for each
        # other while the slowest computes its chunks and while process 0 writes OUT: hours at scale, hence the timeout
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=2))
    rank = dist.get_rank() if world > 1 else 0
    ds, model, tokenizer = open_inputs(cfg)
    bad_rows = list(ds.skipped)
    ds.skipped.clear()
    chunks = compute_features(cfg, ds, model, tokenizer, rank, world)
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(chunks, gathered, dst=0)
        chunks = [c for part in gathered for c in part] if rank == 0 else None
    result = {}
    if rank == 0:
        f = merge_features(chunks)
        keep, removed, table = decide(f, cfg)
        keep_rows = np.flatnonzero(keep).tolist()
        (write_shards if isinstance(ds, data.TarShards) else write_listing)(ds, keep_rows, cfg)
        write_removed(removed, bad_rows, cfg.out.rstrip("/") + ".removed.jsonl")
        table = [("bad row", len(ds) + len(bad_rows), len(bad_rows))] + table
        print(f"{'filter':28s} {'seen':>8s} {'removed':>8s} {'kept':>8s}")
        for name, seen, gone in table:
            print(f"{name:28s} {seen:8d} {gone:8d} {seen - gone:8d}")
        unreadable = bad_rows + [r["error"] for r in removed if r["filter"] == "unreadable image"]
        if unreadable:
            print(f"{len(unreadable)} rows could not be read, e.g.:\n  " + "\n  ".join(unreadable[:3]))
        print(f"wrote {cfg.out}: {len(keep_rows)} of {len(ds) + len(bad_rows)} rows; "
              f"removed rows in {cfg.out.rstrip('/')}.removed.jsonl")
        result = {"kept": keep_rows, "removed": removed, "table": table}
        if cfg.truth:
            result["score"] = score(cfg.truth, removed, len(ds))
            print_score(result["score"])
    if world > 1:
        dist.barrier()
    return result


def parse_args(argv) -> CurateConfig:
    parser = argparse.ArgumentParser(prog="engine.py", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("curate", help="filter image-text pairs (Florence section 2.1)")
    for fl in fields(CurateConfig):
        p.add_argument(f"--{fl.name}", type=type(fl.default), default=fl.default)
    args = vars(parser.parse_args(argv))
    args.pop("command")
    return CurateConfig(**args)


if __name__ == "__main__":
    curate(parse_args(sys.argv[1:]))
