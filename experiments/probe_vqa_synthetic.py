"""Which part of "is the red circle left of the blue star?" does a model trained from scratch fail to learn? A probe,
not a test (docs/vqa-toy.md, "Why position needs the aid").

    python experiments/probe_vqa_synthetic.py                          # meter's text encoder + fusion: chance
    python experiments/probe_vqa_synthetic.py --arch single --preln    # a single-stream pre-LN transformer: chance too
    python experiments/probe_vqa_synthetic.py --arch single --preln --mix 1 --axis x --coords 1    # coordinates given
    python experiments/probe_vqa_synthetic.py --arch single --preln --mix 1 --axis x --text_coords 3   # ... in the words
    python experiments/probe_vqa_synthetic.py --ground 1               # meter + its grounding aid (meter.ToyMeter)

A synthetic world with nothing to see: each image is a 4 x 4 map of oracle tokens (one-hot colour and shape at the cell
of each of 2-3 objects, zeros elsewhere; 96 channels, as the oracle of probe_vqa_position.py), the questions are the
Shapes world's wording over the `shapes` word tokens: position questions "is the C S left of / above the C S?" (x
first, as data._relation: "left of" when the columns differ, else "above"), and otherwise colour, shape and existence
questions, which teach the fusion to find a named object. Fresh samples every step (no epochs); batch 64, AdamW with
warmup + cosine, METER's binary cross entropy; the val accuracy on 2000 position questions every 250 steps. One thread
(`OMP_NUM_THREADS=1`) runs 3000 meter steps in ~6 min.

--arch meter is meter.py's toy (its text encoder, image-token grid, co-attention fusion, poolers and VQA head) on the
oracle map; --arch single a plain single-stream transformer (torch's TransformerEncoderLayer, 4 layers of width 128)
over the text tokens and the 16 image tokens, pooled at the first token. --coords adds x and y as two channels of
each object's token; --text_coords adds each object's x to the embedding of the words that name it (what a word
would hold once it has fetched its object's position); --abs answers "is the subject in the left (top) half?"
instead; --where asks "is the C S on the left / at the top?" in place of the other questions.
"""
import argparse
import dataclasses
import os
import random
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat project files
import data  # noqa: E402
import meter  # noqa: E402
import train  # noqa: E402

C, S, G = data.COLORS, data.SHAPES, 4


def sample(rng, position, args):
    """-> (oracle map (96, G, G), question, answer, [(first char, end char, x, cell)] of the named objects)."""
    while True:
        n = rng.choice([2, 3]) if position else rng.choice([1, 2, 3])
        kinds = rng.sample([(c, s) for c in range(len(C)) for s in range(len(S))], n)
        objs = [dict(c=c, s=s, row=cell // G, col=cell % G) for (c, s), cell in zip(kinds, rng.sample(range(G * G), n))]
        m = torch.zeros(96, G, G)
        for o in objs:
            m[o["c"], o["row"], o["col"]] = m[len(C) + o["s"], o["row"], o["col"]] = 1
            m[20, o["row"], o["col"]] = args.coords * (o["col"] - 1.5)  # --coords: x and y as channels
            m[21, o["row"], o["col"]] = args.coords * (o["row"] - 1.5)
        name = lambda o: f"the {C[o['c']]} {S[o['s']]}"  # noqa: E731
        a = rng.choice(objs)
        if position:
            pairs = [(p, q) for p in objs for q in objs if p is not q and
                     ((p["col"] != q["col"] and args.axis != "y") or (p["row"] != q["row"] and args.axis != "x"))]
            if not pairs:
                continue
            a, b = rng.choice(pairs)
            by_x = a["col"] != b["col"] and args.axis != "y"
            relation, yes = ("left of", a["col"] < b["col"]) if by_x else ("above", a["row"] < b["row"])
            if args.abs:
                yes = a["col"] < G / 2 if by_x else a["row"] < G / 2
            question, answer = f"is {name(a)} {relation} {name(b)}?", "yes" if yes else "no"
            spans = [(3, 3 + len(name(a)), a), (len(question) - 1 - len(name(b)), len(question) - 1, b)]
        elif rng.random() < args.where:
            left = rng.random() < 0.5
            question = f"is {name(a)} {'on the left' if left else 'at the top'}?"
            answer = "yes" if (a["col"] if left else a["row"]) < G / 2 else "no"
            spans = [(3, 3 + len(name(a)), a)]
        else:
            kind, spans = rng.randrange(3), []
            if kind == 0 and sum(o["s"] == a["s"] for o in objs) == 1:
                question, answer = f"what color is the {S[a['s']]}?", C[a["c"]]
            elif kind < 2 and sum(o["c"] == a["c"] for o in objs) == 1:
                question, answer = f"what shape is the {C[a['c']]} object?", S[a["s"]]
            else:
                c, s = (a["c"], a["s"]) if rng.random() < 0.5 else (rng.randrange(len(C)), rng.randrange(len(S)))
                question = f"is there {data._a(C[c] + ' ' + S[s])}?"
                answer = "yes" if any((o["c"], o["s"]) == (c, s) for o in objs) else "no"
        return m, question, answer, [(i, j, o["col"] - 1.5, o["row"] * G + o["col"]) for i, j, o in spans]


def batch(rng, n, args, vocab, cfg, position_share):
    """-> maps, input_ids, attention_mask, answers, token x (B, T) of the named words, token cell (-100 if none)."""
    rows = [sample(rng, rng.random() < position_share, args) for _ in range(n)]
    ids, mask, _ = meter.encode_texts([r[1] for r in rows], vocab, cfg)
    xs, cells = torch.zeros(ids.shape), torch.full(ids.shape, -100)
    for b, (_, question, _, spans) in enumerate(rows):
        for start, end, x, cell in spans:
            first, last = meter.phrase_tokens(question, start, end, vocab)
            xs[b, first:last], cells[b, first:last] = x, cell
    answers = torch.tensor([vocab.answer_index[r[2]] for r in rows])
    return torch.stack([r[0] for r in rows]), ids, mask, answers, xs, cells


class Single(nn.Module):
    """A single-stream transformer (ViLT's layout) over [text tokens; image tokens], pooled at the first token."""

    def __init__(self, args, vocab_size, answers, d=128):
        super().__init__()
        self.args = args
        self.tok, self.img = nn.Embedding(vocab_size, d), nn.Linear(96, d)
        self.text_pos = nn.Parameter(torch.randn(1, 40, d) * args.text_pos_std)
        self.image_pos = nn.Parameter(torch.randn(1, G * G, d) * args.grid_std)
        self.modality = nn.Parameter(torch.randn(2, d) * 0.02)
        self.x_dir = nn.Parameter(torch.randn(d) / d ** 0.5)  # --text_coords: the direction a word's x is added along
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, 0.0, activation="gelu", batch_first=True, norm_first=args.preln)
        self.layers = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(),
                                  nn.Linear(2 * d, answers))

    def forward(self, maps, ids, mask, xs):
        x = self.tok(ids) + self.text_pos[:, :ids.shape[1]] + self.modality[0] + \
            self.args.text_coords * xs[..., None] * self.x_dir                          # (B, T, d)
        y = self.img(maps.flatten(2).transpose(1, 2)) + self.image_pos + self.modality[1]   # (B, G*G, d)
        keep = torch.cat([mask.bool(), torch.ones(y.shape[:2], dtype=torch.bool)], 1)    # (B, T + G*G)
        return self.head(self.layers(torch.cat([x, y], 1), src_key_padding_mask=~keep)[:, 0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=["meter", "single"], default="meter")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--mix", type=float, default=0.5, help="share of position questions in a batch")
    p.add_argument("--axis", choices=["both", "x", "y"], default="both")
    p.add_argument("--abs", action="store_true", help="answer: is the subject in the left (top) half?")
    p.add_argument("--where", type=float, default=0.0, help="share of the other questions asked as 'is A on the left?'")
    p.add_argument("--grid_std", type=float, default=0.02, help="init std of the image tokens' learned positions")
    p.add_argument("--text_pos_std", type=float, default=0.02, help="--arch single: of the text positions")
    p.add_argument("--preln", action="store_true", help="--arch single: pre-LN layers")
    p.add_argument("--coords", type=float, default=0.0, help="x and y as two channels of each object's token")
    p.add_argument("--text_coords", type=float, default=0.0, help="--arch single: each object's x in its words")
    p.add_argument("--ground", type=float, default=0.0, help="--arch meter: meter.ToyMeter's aid with this weight")
    p.add_argument("--ground_layer", type=int, default=0, help="... on this fusion layer's text tokens")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = dataclasses.replace(meter.CONFIGS["toy"], image_positions=G, image_pos_std=args.grid_std,
                              ground_weight=args.ground)
    vocab = meter.build_vocab(cfg)
    val = batch(random.Random(1234), 2000, args, vocab, cfg, 1.0)
    if args.arch == "meter":
        model = (meter.ToyMeter if args.ground else meter.Meter)(cfg, len(vocab.answers))
        model.image_encoder.forward_features = lambda maps: [maps]  # the oracle map is the tower's last map

        def forward(maps, ids, mask, xs):  # -> (VQA logits, the aid's cell logits of --ground_layer's text tokens)
            x, _, pooled, texts = model.fuse(maps, ids, mask)
            cells = model.ground_aid.head(texts[args.ground_layer]) if args.ground else None
            return model.head_outputs(x, pooled)["vqa"], cells
    else:
        model = single = Single(args, cfg.text.vocab_size, len(vocab.answers))
        forward = lambda maps, ids, mask, xs: (single(maps, ids, mask, xs), None)  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    tcfg = train.TrainConfig(lr=args.lr, warmup_iters=100, max_iters=args.steps)
    rng, start, losses, grounded = random.Random(args.seed), time.time(), [], []
    print(f"{vars(args)} | {sum(q.numel() for q in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = train.lr_at(step, tcfg)
        maps, ids, mask, answers, xs, cells = batch(rng, args.batch, args, vocab, cfg, args.mix)
        logits, aid_logits = forward(maps, ids, mask, xs)
        target = F.one_hot(answers, len(vocab.answers)).float()
        loss = F.binary_cross_entropy_with_logits(logits, target) * target.shape[1]
        if args.ground:
            loss = loss + args.ground * meter.ground_loss(aid_logits, cells)
            grounded.append((aid_logits[cells != -100].argmax(-1) == cells[cells != -100]).float().mean().item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            model.eval()
            with torch.no_grad():
                right = sum((forward(*[t[i:i + 500] for t in (*val[:3], val[4])])[0].argmax(-1) ==
                             val[3][i:i + 500]).sum().item() for i in range(0, 2000, 500))
            model.train()
            ground = f" | named words' cells right {sum(grounded[-250:]) / 250:.2f}" if grounded else ""
            print(f"step {step + 1} | train loss {sum(losses[-250:]) / 250:.3f}{ground} | val position accuracy "
                  f"{right / 2000:.3f} | {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
