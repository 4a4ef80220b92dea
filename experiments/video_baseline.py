"""A small 3D CNN on the same clips at the same budget, beside `python train.py --stage video`. A comparison, not a
test.

    OMP_NUM_THREADS=1 python experiments/video_baseline.py            # 15 one-thread minutes, top-1 every 3 minutes
    python experiments/video_baseline.py --minutes 8 --eval_every 2 --threads 2

Four blocks of two 3x3x3 conv-BN-ReLU (16, 32, 64, 128 channels; each block after the first halves T, H and W), global
average pooling, a linear layer: C3D's plan (Tran et al. 2015) at toy size. Everything the toy Video CoSwin sees is
reused from video.py and train.py: the same training clips in the same order (train.py's global_batch_indices), the
same per-clip sampling and augmentation (video.collate with train.py's per-sample generators), the same loss
(video.compute_loss), the same batch, lr, warmup and cosine (video.TRAIN["toy"], train.lr_at) and the same scoring
(video.evaluate on the same val clips: top-1 and per class). The loop is experiments/budget.py's: a wall-clock budget or
--max_steps (evaluation time not counted), top-1 against minutes and samples.
"""
import argparse
import os
import random
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat project files
import budget  # noqa: E402
import train  # noqa: E402
import video  # noqa: E402


def block(c_in, c_out, stride):
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm3d(c_out), nn.ReLU(),
                         nn.Conv3d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm3d(c_out), nn.ReLU())


class Small3DCNN(nn.Module):
    def __init__(self, num_classes, widths=(16, 32, 64, 128)):
        super().__init__()
        layers, c = [], 3
        for i, w in enumerate(widths):
            layers.append(block(c, w, 1 if i == 0 else 2))
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, clips):  # (B, 3, T, H, W) -> (B, classes)
        return self.head(self.features(clips).mean(dim=(2, 3, 4)))


def main():
    toy = video.TRAIN["toy"]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget (evaluation not counted)")
    p.add_argument("--eval_every", type=float, default=3.0, help="minutes of training between evaluations")
    p.add_argument("--batch_size", type=int, default=toy["batch_size"])
    p.add_argument("--lr", type=float, default=toy["lr"])
    p.add_argument("--max_steps", type=int, default=toy["max_iters"], help="the cosine's length, and a stop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the budget is one-thread minutes)")
    p.add_argument("--log", default="", help="append each evaluation to this metrics.jsonl (docs/curves.py)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = video.CONFIGS["toy"]
    tcfg = train.TrainConfig(stage="video", **{**toy, "batch_size": args.batch_size, "lr": args.lr,
                                               "max_iters": args.max_steps, "seed": args.seed})
    classes = video.build_vocab(cfg)
    train_ds, val_ds = video.build_datasets(cfg, args.seed)  # ShapesVideo train / val, as train.py builds them
    val = [val_ds[i] for i in range(len(val_ds))]             # rendered once, scored at every evaluation
    cache = {}
    model = Small3DCNN(len(classes)).train()
    print(f"3D CNN: {sum(q.numel() for q in model.parameters()) / 1e6:.3f}M parameters, batch {tcfg.batch_size}, "
          f"{args.threads} thread(s)", flush=True)

    def batch_loss(step, idx):
        samples = [cache[i] if i in cache else cache.setdefault(i, train_ds[i]) for i in idx]  # cache_samples
        rngs = [random.Random(f"{args.seed}/{step}/{k}") for k in range(len(idx))]  # train.py's per-sample draws
        return video.compute_loss(model, video.collate(samples, classes, cfg, rngs))[0]

    budget.train_on_budget(model, tcfg, len(train_ds), batch_loss, lambda: train.evaluate(video, model, val, classes, cfg),
                           args.minutes, args.eval_every, log=args.log)


if __name__ == "__main__":
    main()
