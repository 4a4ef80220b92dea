"""Why does the toy METER answer position questions ("is the red circle left of the blue star?") at chance? Probes, not
tests (docs/vqa-toy.md, "Why position needs the aid").

    python experiments/probe_vqa_position.py oracle                  # text encoder + fusion on oracle image tokens
    python experiments/probe_vqa_position.py oracle --absolute       # ... answer: is the subject in the left / top half?
    python experiments/probe_vqa_position.py oracle --symmetric      # ... is the pair's mean centre? (order-free)
    python experiments/probe_vqa_position.py oracle --types all      # ... trained on every question type, scored on position
    python experiments/probe_vqa_position.py oracle --preln --lr 3e-4 --image_pos_std 0.5 --text_pos_std 0.5 --layers 3
    python experiments/probe_vqa_position.py oracle --text_mlm 2000  # ... text encoder first MLM-trained on the world's texts
    python experiments/probe_vqa_position.py oracle --types all --image_pos_std 0.5 --roles   # ... word order given away
    python experiments/probe_vqa_position.py oracle --types all --image_pos_std 0.5 --add_where  # ... + "is A on the left?"
    python experiments/probe_vqa_position.py oracle --types all --image_pos_std 0.5 --ground 1   # ... + words name cells
    python experiments/probe_vqa_position.py full --init_from=out_u/ckpt.pt --max_iters=1500 --eval_interval=500 \\
        --val_size=500 --out_dir=out_pos                       # the real toy, position questions first
    python experiments/probe_vqa_position.py full --image_pos sincos|0.7 --layers 3 --stages 1 ...   # ... with changes
    python experiments/probe_vqa_position.py full --mix --image_pos sincos ...   # the recipe's question mix, with changes
    python experiments/probe_vqa_position.py order out_pos/ckpt.pt   # does a checkpoint read the question's word order?

`oracle` replaces CoSwin's map by the answer a perfect tower would give: a 4 x 4 map (--grid) of 96 channels, one-hot
colour, shape and size at the cell of each object's centre, zeros elsewhere; the toy's text encoder, learned image
position grid, co-attention fusion and VQA head are meter.py's, trained alone on precomputed tensors (batch 64, AdamW,
warmup + cosine, binary cross entropy as meter.compute_loss), with the val accuracy on 2000 val images' position
questions every 500 steps. `full` runs `train.py --stage vqa` with each training image asked a position question when it
has one (two or more shapes), else a question of any type; val questions too. `order` asks a checkpoint each position
question of 3000 training images and its mirror ("is B left of A?", the other answer when the two are apart) and
prints how often the two answers agree and how the yes-minus-no margins correlate: 1.0 / ~1 is a model that reads the
question as a bag of words.
"""
import argparse
import dataclasses
import math
import os
import random
import re
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat project files
import data  # noqa: E402
import meter  # noqa: E402
import probe_vqa_heldout  # noqa: E402  (load: a vqa checkpoint as trained)
import train  # noqa: E402

POSITION = re.compile(r"is (the .+?) (left of|above) (the .+)\?")


def position_first(questions, rng, pick=meter.pick_question):
    """A position question when the image has one, else any question as meter.pick_question draws it."""
    position = [q for q in questions if q["type"] == "position"]
    return rng.choice(position) if position else pick(questions, rng)


def oracle_map(objects, grid, channels=96, size=64):
    """(channels, grid, grid): one-hot colour, shape and size at the cell of each object's centre."""
    f = torch.zeros(channels, grid, grid)
    for o in objects:
        cy, cx = divmod(meter.centre_cell(o["box"], size, grid), grid)
        for k in (data.COLORS.index(o["color"]), len(data.COLORS) + data.SHAPES.index(o["category"]),
                  len(data.COLORS) + len(data.SHAPES) + data.SIZES.index(o["size"])):
            f[k, cy, cx] += 1
    return f


def ground_cells(q, objects, vocab, grid, size=64):
    """[(first token, end token, cell)] of a position question's two object phrases: the cell of each object's centre
    on the grid x grid map (row-major), for --ground; [] for other questions."""
    if q["type"] != "position":
        return []
    a, relation, b = POSITION.fullmatch(q["question"]).groups()
    out = []
    for prefix, ref in (("is", a), (f"is {a} {relation}", b)):
        start = len(prefix) + 1  # the character after "<prefix> "
        first, end = meter.phrase_tokens(q["question"], start, start + len(ref), vocab)
        box = next(o["box"] for o in objects if o["ref"] == ref)
        out.append((first, end, meter.centre_cell(box, size, grid)))
    return out


def oracle(args):
    torch.manual_seed(args.seed)
    if args.preln:  # the same weights used pre-LN: x + f(LN(x)) in place of LN(x + f(x))
        def co_forward(self, x, x_mask, other, other_mask):
            h = self.self_norm.norm(x)
            x = x + self.self_attn(h, h, x_mask)
            x = x + self.cross_attn(self.cross_norm.norm(x), other, other_mask)
            return x + self.ffn(self.ffn_norm.norm(x))

        def enc_forward(self, x, mask):
            h = self.attn_norm.norm(x)
            x = x + self.attn(h, h, mask)
            return x + self.ffn(self.ffn_norm.norm(x))
        meter.CoAttentionLayer.forward, meter.EncoderLayer.forward = co_forward, enc_forward
    cfg = dataclasses.replace(meter.CONFIGS["toy"], image_positions=args.grid, image_pos_std=0.02, ground_weight=0.0,
                              fusion=meter.FusionConfig(layers=args.layers))
    vocab = meter.build_vocab(cfg)
    types = set(meter.QUESTION_TYPES if args.types == "all" else args.types.split(","))

    def build(split, n, types):  # -> (maps (Q, 96, g, g), input_ids, attention_mask, answer index (Q,), cells)
        world = data.ShapesWorld(split, size=64, n=n, seed=0, ocr_prob=0.0)
        maps, questions, answers, cells = [], [], [], []
        for i in range(n):
            s = world[i]
            m = oracle_map(s["objects"], args.grid)
            for q in s["qa"]:
                if q["type"] not in types:
                    continue
                answer = q["answer"]
                if (args.absolute or args.symmetric) and q["type"] == "position":
                    a, relation, b = POSITION.fullmatch(q["question"]).groups()
                    axis = 0 if relation == "left of" else 1
                    centre = {o["ref"]: (o["box"][axis] + o["box"][axis + 2]) / 2 for o in s["objects"]}
                    # absolute: the subject's own half, the other object ignored; symmetric: the pair's mean
                    # centre, the same answer for "A left of B" and "B left of A" (a bag of words can give it)
                    c = centre[a] if args.absolute else (centre[a] + centre[b]) / 2
                    answer = "yes" if c < 32 else "no"
                maps.append(m), questions.append(q["question"]), answers.append(vocab.answer_index[answer])
                cells.append(ground_cells(q, s["objects"], vocab, args.grid))
                if args.add_where and split == "train" and q["type"] == "position":  # and "is A on the left?"
                    a, relation, _ = POSITION.fullmatch(q["question"]).groups()
                    axis, side = (0, "on the left") if relation == "left of" else (1, "at the top")
                    obj = next(o for o in s["objects"] if o["ref"] == a)
                    maps.append(m), questions.append(f"is {a} {side}?"), cells.append([])
                    answers.append(vocab.answer_index["yes" if obj["box"][axis] + obj["box"][axis + 2] < 64 else "no"])
        ids, mask, _ = meter.encode_texts(questions, vocab, cfg)
        targets = torch.full(ids.shape, -100)
        for k, c in enumerate(cells):
            for start, end, cell in c:
                targets[k, start:end] = cell
        return torch.stack(maps), ids, mask, torch.tensor(answers), targets

    train_set, val_set = build("train", args.n, types), build("val", 2000, {"position"})
    answers = " (absolute answers)" if args.absolute else " (symmetric answers)" if args.symmetric else ""
    print(f"{len(train_set[0])} training questions ({', '.join(sorted(types))}), {len(val_set[0])} val position "
          f"questions{answers}", flush=True)
    model = meter.Meter(cfg, len(vocab.answers))
    model.image_encoder.forward_features = lambda x: [x]  # the oracle map is the tower's last map
    with torch.no_grad():
        if args.image_pos_std:
            model.image_pos.normal_(std=args.image_pos_std)
        if args.text_pos_std:
            model.text_encoder.pos_embed.weight.normal_(std=args.text_pos_std)
    if args.text_mlm:
        text_mlm(model.text_encoder, vocab, cfg, args)
    if args.roles:  # word order given away: the words after "left" / "above" get a learned "object" embedding
        relation_ids = torch.tensor([vocab.text.encode(w)[0] for w in (" left", " above")])
        role_embed = torch.nn.Embedding(2, cfg.text.width)
        torch.nn.init.normal_(role_embed.weight, std=args.role_std)
        model.role_embed = role_embed  # trained with the model
        encoder = model.text_encoder

        def with_roles(input_ids, attention_mask, forward=encoder.forward):
            after = torch.cumsum(torch.isin(input_ids, relation_ids).long(), 1) > 0      # (B, T) object words
            handle = encoder.embed_norm.register_forward_pre_hook(
                lambda module, inputs: (inputs[0] + role_embed(after.long()),))
            try:
                return forward(input_ids, attention_mask)
            finally:
                handle.remove()
        encoder.forward = with_roles
    if args.ground:
        ground_head = torch.nn.Linear(cfg.fusion.width, args.grid * args.grid)
        model.ground_head = ground_head  # trained with the model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    tcfg = train.TrainConfig(lr=args.lr, warmup_iters=100, max_iters=args.steps)

    @torch.no_grad()
    def val_accuracy():
        model.eval()
        right = sum((model(*[t[i:i + 500] for t in val_set[:3]])["vqa"].argmax(-1) == val_set[3][i:i + 500]).sum()
                    for i in range(0, len(val_set[0]), 500))
        model.train()
        return right.item() / len(val_set[0])

    g, start, losses, grounded = torch.Generator().manual_seed(args.seed), time.time(), [], []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = train.lr_at(step, tcfg)
        idx = torch.randint(len(train_set[0]), (64,), generator=g)
        x, _, pooled, _ = model.fuse(*[t[idx] for t in train_set[:3]])
        logits = model.vqa_head(pooled)
        target = F.one_hot(train_set[3][idx], len(vocab.answers)).float()
        loss = F.binary_cross_entropy_with_logits(logits, target) * target.shape[1]
        cells = train_set[4][idx]
        if args.ground and (cells != -100).any():  # each fused word of a position question's objects names its cell
            cell_logits = ground_head(x[cells != -100])
            loss = loss + args.ground * F.cross_entropy(cell_logits, cells[cells != -100])
            grounded.append((cell_logits.argmax(-1) == cells[cells != -100]).float().mean().item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 500 == 0:
            ground = f" | train cells right {sum(grounded) / len(grounded):.3f}" if grounded else ""
            print(f"step {step + 1} | train loss {sum(losses) / len(losses):.4f}{ground} | val position accuracy "
                  f"{val_accuracy():.3f} | {time.time() - start:.0f} s", flush=True)
            losses, grounded = [], []


def text_mlm(encoder, vocab, cfg, args):
    """The text encoder alone, BERT's MLM (15% of tokens masked) on the world's questions and captions."""
    world = data.ShapesWorld("train", size=64, n=args.n, seed=0, ocr_prob=0.0)
    texts = [t for i in range(args.n) for t in [q["question"] for q in world[i]["qa"]] + [world[i]["caption"]]]
    ids, mask, _ = meter.encode_texts(texts, vocab, cfg)
    head = torch.nn.Linear(encoder.cfg.width, encoder.cfg.vocab_size)
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.01)
    g, right = torch.Generator().manual_seed(args.seed), []
    for step in range(args.text_mlm):
        idx = torch.randint(len(texts), (128,), generator=g)
        picked = (torch.rand(ids[idx].shape, generator=g) < 0.15) & mask[idx].bool()
        picked[:, 0] = False
        logits = head(encoder(ids[idx].masked_fill(picked, vocab.mask_id), mask[idx])[picked])
        loss = F.cross_entropy(logits, ids[idx][picked])
        opt.zero_grad()
        loss.backward()
        opt.step()
        right.append((logits.argmax(-1) == ids[idx][picked]).float().mean().item())
        if (step + 1) % 500 == 0:
            print(f"text MLM step {step + 1} | loss {loss.item():.3f} | masked-token accuracy "
                  f"{sum(right[-100:]) / len(right[-100:]):.3f}", flush=True)


def sincos_grid(dim, n):
    """(1, dim, n, n) 2D sine-cosine positions (MAE's): half the channels index the column, half the row."""
    freq = torch.exp(torch.arange(dim // 4) * -(math.log(10000.0) / (dim // 4)))
    angle = torch.arange(n, dtype=torch.float32)[:, None] * freq[None]          # (n, dim/4)
    axis = torch.cat([angle.sin(), angle.cos()], 1)                              # (n, dim/2)
    pos = torch.cat([axis[None].expand(n, n, -1), axis[:, None].expand(n, n, -1)], -1)  # (rows, cols, dim)
    return pos.permute(2, 0, 1)[None]


def full(args, rest):
    if not args.mix:
        meter.pick_question = position_first
    toy = dataclasses.replace(meter.CONFIGS["toy"], ground_weight=0.0, image_pos_std=0.02)  # the toy before its aid
    if args.layers:
        toy = dataclasses.replace(toy, fusion=meter.FusionConfig(layers=args.layers))
    if args.stages:
        toy = dataclasses.replace(toy, image_stages=args.stages, image_positions=4 if args.stages == 2 else 8)
    meter.CONFIGS["toy"] = toy
    if args.image_pos:
        init = meter.Meter.__init__

        def init_with_positions(self, cfg, num_answers=0):
            init(self, cfg, num_answers)
            with torch.no_grad():
                n, d = self.image_pos.shape[-1], self.image_pos.shape[1]
                if args.image_pos == "sincos":
                    self.image_pos.copy_(sincos_grid(d, n))
                else:
                    self.image_pos.normal_(std=float(args.image_pos))
        meter.Meter.__init__ = init_with_positions
    train.main(["--stage", "vqa", *rest])


@torch.no_grad()
def order(args):
    model, cfg = probe_vqa_heldout.load(args.ckpt)
    vocab = meter.build_vocab(cfg)
    ds = meter.ShapesVQA("train", cfg.img_size, 3000, seed=7)
    images, questions = [], []
    for i in range(len(ds)):
        s = ds[i]
        for q in s["questions"]:
            if q["type"] == "position" and len(questions) < 2000:
                a, relation, b = POSITION.fullmatch(q["question"]).groups()
                images += [s["image"]] * 2
                questions += [q["question"], f"is {b} {relation} {a}?"]
    yes, no = vocab.answer_index["yes"], vocab.answer_index["no"]
    margins = []
    for i in range(0, len(questions), 200):
        pixels = torch.stack([meter.preprocess(im, cfg.img_size) for im in images[i:i + 200]])
        ids, mask, _ = meter.encode_texts(questions[i:i + 200], vocab, cfg)
        logits = model(pixels, ids, mask)["vqa"]
        margins.append(logits[:, yes] - logits[:, no])
    m = torch.cat(margins)
    asked, mirror = m[0::2], m[1::2]
    same, yes_share = ((asked > 0) == (mirror > 0)).float().mean(), (m > 0).float().mean()
    print(f"{len(asked)} position questions and their mirrors: same answer {same:.3f}, 'yes' {yes_share:.3f}, "
          f"margin std {m.std():.3f}, margin correlation {torch.corrcoef(torch.stack([asked, mirror]))[0, 1]:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="probe", required=True)
    o = sub.add_parser("oracle")
    o.add_argument("--steps", type=int, default=3000)
    o.add_argument("--n", type=int, default=20000, help="training images")
    o.add_argument("--types", default="position", help="question types trained on, comma-separated, or 'all'")
    o.add_argument("--absolute", action="store_true", help="answer: is the subject in the left (top) half?")
    o.add_argument("--symmetric", action="store_true", help="answer: is the pair's mean centre in the left (top) half?")
    o.add_argument("--grid", type=int, default=4)
    o.add_argument("--layers", type=int, default=2)
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--preln", action="store_true")
    o.add_argument("--image_pos_std", type=float, default=0.0, help="0: meter's init (0.02)")
    o.add_argument("--text_pos_std", type=float, default=0.0, help="0: meter's init (0.02)")
    o.add_argument("--text_mlm", type=int, default=0, help="steps of text-only MLM first")
    o.add_argument("--roles", action="store_true", help="give word order away: a learned embedding on the words "
                   "after 'left' / 'above' (the object), so that a bag of words can answer")
    o.add_argument("--add_where", action="store_true", help="train on 'is A on the left / at the top?' too (one "
                   "object's half), beside each position question")
    o.add_argument("--ground", type=float, default=0.0, help="weight of an extra loss: each fused word of a position "
                   "question's two objects predicts its object's cell (a linear head)")
    o.add_argument("--role_std", type=float, default=0.02, help="init std of the --roles embedding")
    o.add_argument("--seed", type=int, default=0)
    f = sub.add_parser("full")
    f.add_argument("--image_pos", default="", help="'sincos' or a std for the image position grid's init")
    f.add_argument("--layers", type=int, default=0)
    f.add_argument("--stages", type=int, default=0, help="1: the 8 x 8 stage-1 map with an 8 x 8 grid")
    f.add_argument("--mix", action="store_true", help="the recipe's question draw, not position questions first")
    r = sub.add_parser("order")
    r.add_argument("ckpt")
    args, rest = p.parse_known_args()
    if args.probe == "full":
        return full(args, rest)
    if rest:
        p.error(f"unrecognised arguments {rest}")
    oracle(args) if args.probe == "oracle" else order(args)


if __name__ == "__main__":
    main()
