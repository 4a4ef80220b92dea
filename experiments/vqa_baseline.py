"""A standard VQA model on the same data at the same budget, beside `python train.py --stage vqa`. A comparison, not a
test.

    OMP_NUM_THREADS=1 python experiments/vqa_baseline.py            # 15 one-thread minutes, accuracy every 3 minutes
    python experiments/vqa_baseline.py --minutes 5 --eval_every 1

A small BatchNorm CNN (64 px -> an 8 x 8 map of 128 channels, each cell a token with a learned position), a 2-layer
bidirectional transformer over the question's tokens (meter.encode_texts: the toy's word tokens, learned positions),
and 2 pre-LN fusion layers in which the question tokens attend to the map cells, then to each other, then an MLP; the
first question token -> MLP -> one logit per answer. Everything the toy METER sees is reused from meter.py: the same
training images in the same order (train.py's global_batch_indices), the same question per sample (meter.collate with
train.py's per-sample generators), the same loss (meter.compute_loss: binary cross entropy against the soft scores,
summed over answers), the same batch, lr, warmup and cosine (meter.TRAIN["toy"], train.lr_at), and the same scoring
(meter.evaluate on the same val questions). No augmentation: a flip would change the answers of position questions.
The loop is experiments/budget.py's: a wall-clock budget or --max_steps (evaluation time not counted), accuracy against
minutes and samples.
"""
import argparse
import collections
import dataclasses
import os
import random
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat project files
import budget  # noqa: E402
import meter  # noqa: E402
import train  # noqa: E402


def block(c_in, c_out):  # halves the map: stride-2 conv then a 3x3 conv, each BN + ReLU
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                         nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class MLP(nn.Sequential):
    def __init__(self, d_in, d_hidden, d_out):
        super().__init__(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class Layer(nn.Module):
    """Pre-LN: optional cross-attention to `context`, self-attention (padded keys ignored), MLP; each residual."""

    def __init__(self, d, heads, cross):
        super().__init__()
        self.cross = nn.MultiheadAttention(d, heads, batch_first=True) if cross else None
        self.ln_q, self.ln_c = (nn.LayerNorm(d), nn.LayerNorm(d)) if cross else (None, None)
        self.ln1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2, self.mlp = nn.LayerNorm(d), MLP(d, 4 * d, d)

    def forward(self, x, pad, context=None):
        if self.cross is not None:  # every image cell is real: no key mask
            q, c = self.ln_q(x), self.ln_c(context)
            x = x + self.cross(q, c, c, need_weights=False)[0]
        h = self.ln1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class CnnVQA(nn.Module):
    def __init__(self, num_answers, vocab_size, context_length, d=128, heads=4, text_layers=2, fusion_layers=2):
        super().__init__()
        self.cnn = nn.Sequential(block(3, 32), block(32, 64), block(64, d))   # 64 px -> 8 x 8 cells
        # learned cell positions: "left of" needs where a cell is, which padding alone tells only at the borders
        self.img_pos = nn.Parameter(torch.randn(64, d) * 0.02)
        self.tok = nn.Embedding(vocab_size, d)
        self.pos = nn.Parameter(torch.randn(context_length, d) * 0.02)
        nn.init.normal_(self.tok.weight, std=0.02)
        self.text = nn.ModuleList(Layer(d, heads, cross=False) for _ in range(text_layers))
        self.fusion = nn.ModuleList(Layer(d, heads, cross=True) for _ in range(fusion_layers))
        self.head = nn.Sequential(nn.LayerNorm(d), MLP(d, 2 * d, num_answers))

    def forward(self, images, input_ids, attention_mask):
        cells = self.cnn(images).flatten(2).transpose(1, 2)                  # (B, 64, d)
        cells = cells + self.img_pos[:cells.shape[1]]
        pad = attention_mask == 0                                            # True where a key is padding
        x = self.tok(input_ids) + self.pos[:input_ids.shape[1]]
        for layer in self.text:
            x = layer(x, pad)
        for layer in self.fusion:
            x = layer(x, pad, cells)
        return {"vqa": self.head(x[:, 0])}  # the begin token; meter.compute_loss / meter.evaluate read "vqa"


def question_only(train_ds, val, n, answer_types):
    """Per question type, the most common answer of n training images' questions (drawn as training draws them),
    scored on the val questions: what the question alone is worth."""
    counts = collections.defaultdict(collections.Counter)
    for i in range(min(n, len(train_ds))):
        q = meter.pick_question(train_ds[i]["questions"], random.Random(f"prior/{i}"))
        counts[q["type"]][q["answers"][0]] += 1
    guess = {t: c.most_common(1)[0][0] for t, c in counts.items()}
    scores = collections.defaultdict(list)
    for s in val:
        for q in s["questions"]:
            scores[q["type"]].append(meter.vqa_accuracy(guess.get(q["type"], "yes"), q["answers"]))
    out = {"vqa_acc": sum(map(sum, scores.values())) / sum(map(len, scores.values()))}
    out.update({f"acc_{t}": sum(scores[t]) / len(scores[t]) for t in answer_types if scores[t]})
    return out, guess


def main():
    toy = meter.TRAIN["toy"]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget (evaluation not counted)")
    p.add_argument("--eval_every", type=float, default=3.0, help="minutes of training between evaluations")
    p.add_argument("--batch_size", type=int, default=toy["batch_size"])
    p.add_argument("--lr", type=float, default=toy["lr"])
    p.add_argument("--max_steps", type=int, default=toy["max_iters"], help="the cosine's length, and a stop")
    p.add_argument("--train_size", type=int, default=meter.CONFIGS["toy"].train_size)
    p.add_argument("--val_size", type=int, default=meter.CONFIGS["toy"].val_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the budget is one-thread minutes)")
    p.add_argument("--log", default="", help="append each evaluation to this metrics.jsonl (docs/curves.py)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = dataclasses.replace(meter.CONFIGS["toy"], train_size=args.train_size, val_size=args.val_size)
    tcfg = train.TrainConfig(stage="vqa", **{**toy, "batch_size": args.batch_size, "lr": args.lr,
                                             "max_iters": args.max_steps, "seed": args.seed})
    vocab = meter.build_vocab(cfg)
    train_ds, val_ds = meter.build_datasets(cfg, args.seed)  # ShapesVQA train / val, as train.py builds them
    val = [val_ds[i] for i in range(len(val_ds))]            # rendered once, scored at every evaluation

    prior, guess = question_only(train_ds, val, 5000, meter.QUESTION_TYPES)
    print(f"question only (most common training answer per type: {guess}) | {budget.fmt(prior)}", flush=True)
    model = CnnVQA(len(vocab.answers), vocab.text.n_vocab, cfg.context_length).train()
    print(f"CNN + question transformer + cross-attention: {sum(q.numel() for q in model.parameters()) / 1e6:.3f}M "
          f"parameters, batch {tcfg.batch_size}, {args.threads} thread(s)", flush=True)

    def batch_loss(step, idx):
        rngs = [random.Random(f"{args.seed}/{step}/{k}") for k in range(len(idx))]  # train.py's question draw
        return meter.compute_loss(model, meter.collate([train_ds[i] for i in idx], vocab, cfg, rngs))[0]

    budget.train_on_budget(model, tcfg, len(train_ds), batch_loss,
                           lambda: train.evaluate(meter, model, val, vocab, cfg), args.minutes, args.eval_every,
                           {"question_only_acc": round(prior["vqa_acc"], 4)}, log=args.log)


if __name__ == "__main__":
    main()
