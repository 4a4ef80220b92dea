"""A standard detector on the same data at the same budget, beside `python train.py --stage det`. A comparison, not a
test; torchvision is test-only.

    python experiments/det_baseline.py                       # FCOS, 18 minutes of training, AP every 3 minutes
    python experiments/det_baseline.py --minutes 5 --eval_every 1

torchvision's FCOS (Tian et al. 2019: anchor-free, one location per object centre, focal + GIoU + centerness, the
losses ATSS also uses) on a small BatchNorm CNN with torchvision's FPN, trained on the same Shapes-world images as the
toy det stage: 96 px, the same training images in the same order (train.py's data order), batch 32, AdamW at lr 1e-3
with 100 warmup steps then cosine over the planned steps, and scored with the same coco_eval on the same 500 val
images. Training stops at a wall-clock budget (evaluation time is not counted); AP is printed against minutes and
samples seen, as train.py's --eval_interval prints it for ours.
"""
import argparse
import os
import sys
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat project files
import budget  # noqa: E402
import data  # noqa: E402
import dyhead  # noqa: E402
import train  # noqa: E402


class SmallCNN(nn.Module):
    """3x3 conv-BN-ReLU blocks with stride-2 convs: maps of strides 8, 16, 32 with 32, 64, 128 channels."""

    def __init__(self):
        super().__init__()

        def block(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())
        self.stem = nn.Sequential(block(3, 16), block(16, 32), block(32, 32))  # stride 8
        self.c4, self.c5 = block(32, 64), block(64, 128)

    def forward(self, x):
        c3 = self.stem(x)
        c4 = self.c4(c3)
        return OrderedDict(p3=c3, p4=c4, p5=self.c5(c4))


class BackboneWithFPN(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        self.body, self.fpn, self.out_channels = SmallCNN(), FeaturePyramidNetwork([32, 64, 128], width), width

    def forward(self, x):
        return self.fpn(self.body(x))


def build_fcos(cfg):
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    # FCOS's "anchors" are its locations: one per cell, sized by the stride
    anchor_generator = AnchorGenerator(sizes=((8,), (16,), (32,)), aspect_ratios=((1.0,),) * 3)
    return FCOS(BackboneWithFPN(), num_classes=len(data.SHAPES) + 1, min_size=cfg.img_size, max_size=cfg.img_size,
                image_mean=list(data.CLIP_MEAN), image_std=list(data.CLIP_STD), anchor_generator=anchor_generator,
                score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh, detections_per_img=cfg.max_detections)


def to_input(image, size):  # FCOS normalises inside: it takes RGB in [0, 1], (3, size, size)
    return torch.from_numpy(np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32) / 255).permute(2, 0, 1)


@torch.no_grad()
def evaluate(model, val, cfg):
    model.eval()
    S, found = cfg.img_size, []
    for i in range(0, len(val), 50):
        chunk = val[i:i + 50]
        outs = model([to_input(s["image"], S) for s in chunk])
        for s, o in zip(chunk, outs):
            W, H = s["image"].size
            keep = o["labels"] > 0  # torchvision's class 0 is the background, which a sigmoid head can still score
            boxes = o["boxes"][keep] * torch.tensor([W / S, H / S, W / S, H / S])
            found.append((boxes, o["scores"][keep], o["labels"][keep] - 1))
    model.train()
    truth = data.coco_instances([{"width": s["image"].width, "height": s["image"].height} for s in val],
                                [[(box, label + 1) for box, label in dyhead.sample_objects(s, cfg)] for s in val],
                                [{"id": k + 1} for k in range(len(data.SHAPES))])
    stats = dyhead.coco_eval(truth, dyhead.to_coco_results(found, range(1, len(val) + 1)))
    return {k: stats[k] for k in ("AP", "AP50", "AP75", "AR100")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=18.0, help="training wall-clock budget")
    p.add_argument("--eval_every", type=float, default=3.0, help="minutes of training between evaluations")
    p.add_argument("--steps", type=int, default=1500, help="the planned steps of the cosine schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default="", help="append each evaluation to this metrics.jsonl (docs/curves.py)")
    args = p.parse_args()
    cfg = dyhead.CONFIGS["toy"]
    tcfg = train.TrainConfig(stage="det", **dyhead.TRAIN["toy"])
    torch.manual_seed(args.seed)
    train_ds, val_ds = dyhead.build_datasets(cfg, args.seed)
    val = [val_ds[i] for i in range(len(val_ds))]
    model = build_fcos(cfg).train()
    print(f"FCOS + small CNN + FPN: {sum(q.numel() for q in model.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    trained, next_eval, step = 0.0, min(args.eval_every, args.minutes) * 60, 0
    while trained < args.minutes * 60:
        start = time.time()
        for group in opt.param_groups:
            group["lr"] = train.lr_at(step, train.TrainConfig(**{**vars(tcfg), "max_iters": args.steps}))
        idx = train.global_batch_indices(step, tcfg.batch_size, len(train_ds), args.seed)
        samples = [train_ds[i] for i in idx]
        images = [to_input(s["image"], cfg.img_size) for s in samples]
        targets = [{"boxes": torch.tensor([o["box"] for o in s["objects"]], dtype=torch.float32),
                    "labels": torch.tensor([data.SHAPES.index(o["category"]) + 1 for o in s["objects"]])}
                   for s in samples]
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        step += 1
        trained += time.time() - start
        if step % 50 == 0:
            print(f"step {step} | loss {loss.item():.4f} | {trained / 60:.1f} min", flush=True)
        if trained >= next_eval:
            metrics = evaluate(model, val, cfg)
            print(f"eval | {trained / 60:.1f} min | {step * tcfg.batch_size} samples | "
                  + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
            if args.log:
                budget.log_eval(args.log, step, tcfg.batch_size, trained, metrics)
            next_eval = min(next_eval + args.eval_every * 60, args.minutes * 60)


if __name__ == "__main__":
    main()
