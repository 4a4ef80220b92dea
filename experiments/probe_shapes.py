"""How many samples does an image tower need to tell the six Shapes-world shapes apart? A diagnostic, not a test.

    python experiments/probe_shapes.py --arch coswin --steps 400          # the toy CoSwin of `python train.py` (conv stem)
    python experiments/probe_shapes.py --config toy_cvt                   # the toy size with CoSwin's own conv embedding
    python experiments/probe_shapes.py --config toy_cvt --norm batch      # ... with BatchNorm in place of its LayerNorms
    python experiments/probe_shapes.py --config toy_cvt --init torch      # ... with PyTorch's default init
    python experiments/probe_shapes.py --config toy_cvt --cfg "embed='patch'"  # ... as plain Swin (patch embedding)
    python experiments/probe_shapes.py --arch timm_swin                   # timm's Swin at toy_cvt's size (test-only)
    python experiments/probe_shapes.py --arch cnn --steps 300             # a plain 8-conv BatchNorm CNN
    python experiments/probe_shapes.py --arch cnn --unicl --eval_interval=500   # `python train.py` with that CNN as the
                                                                          # image tower (any train.py flags follow)
    python experiments/probe_shapes.py --arch cnn --width 32 --florence2 '--tasks=<CAPTION>' --max_objects=1  # Florence-2
    python experiments/probe_shapes.py --read out/ckpt.pt   # colour and shape left in a Florence-2 run's image features,
                                                      # on seen and on held-out colour-shape pairs

Supervised 36-way colour x shape cross-entropy on the same single-object 48 px images as the toy UniCL run (20k
distinct training images, 720 val images), batch 128, AdamW with warmup + cosine. Prints the val accuracy of the
predicted shape and colour every 100 steps. The toy UniCL run sees 102k samples (800 steps x 128) in its 5 minutes;
this tells whether an image tower can learn shape in that many, separately from the contrastive objective.
With --unicl it runs the real thing instead, `train.py`'s UniCL stage with the probe's image tower in place of the toy
CoSwin, to tell whether the rest of the recipe (text tower, loss, schedule, evaluation) is what holds shape back.
--florence2 does the same for `train.py --stage florence2`, with the CNN's last map in place of the toy DaViT's.
"""
import argparse
import ast
import itertools
import math
import os
import sys
import time
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat project files
import coswin  # noqa: E402
import data  # noqa: E402


def render(split, n, size):
    """-> images (n, 3, size, size) normalised as in training, class ids colour * 6 + shape (n,)."""
    world, tf = data.ShapesWorld(split, size=size, n=n, seed=0, max_objects=1, ocr_prob=0.0), data.ImageTransform(size)
    images, classes = [], []
    for i in range(n):
        sample = world[i]
        obj = sample["objects"][0]
        images.append(tf(sample["image"]))
        classes.append(data.COLORS.index(obj["color"]) * len(data.SHAPES) + data.SHAPES.index(obj["category"]))
    return torch.stack(images), torch.tensor(classes)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channel (last) dim of a (..., C) token map: a drop-in for a LayerNorm(C)."""

    def forward(self, x):
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def swap_layernorms(module):
    for name, child in module.named_children():
        if isinstance(child, nn.LayerNorm):
            setattr(module, name, TokenBatchNorm(child.normalized_shape[0]))
        else:
            swap_layernorms(child)


def cnn(width):
    def block(c_in, c_out):  # two 3x3 convs with BatchNorm + ReLU, then a 2x2 max pool
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(3, width), *block(width, 2 * width), *block(2 * width, 4 * width),
                         *block(4 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 4 * width


def build_tower(args):
    """-> (image tower: images (B, 3, H, W) -> pooled features (B, F), F)."""
    if args.arch == "cnn":
        return cnn(args.width)
    if args.arch == "timm_swin":  # a reference Swin of the toy's size (patch embedding), to rule out a bug of ours
        from timm.models.swin_transformer import SwinTransformer
        toy = coswin.CONFIGS["toy_cvt"]
        encoder = SwinTransformer(img_size=args.size, patch_size=toy.patch_size, embed_dim=toy.embed_dim,
                                  depths=toy.depths, num_heads=toy.num_heads, window_size=toy.window_size,
                                  drop_path_rate=toy.drop_path_rate, num_classes=0)
        return encoder, encoder.num_features
    overrides = {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in args.cfg)}  # e.g. depths=(2,2,2,1)
    encoder = coswin.CoSwin(replace(coswin.CONFIGS[args.config], num_classes=0, **overrides))
    if args.norm == "batch":
        swap_layernorms(encoder)
    if args.init == "torch":  # std 0.02 is small for width 24: PyTorch's default is ~1/sqrt(fan_in)
        for m in encoder.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
            if isinstance(m, coswin.WindowAttention):
                nn.init.normal_(m.relative_position_bias_table, std=1.0)
    return encoder, encoder.num_features


def run_stage(stage, train_flags, swap):
    """train.py's `stage` with the model that stage's build_model returns passed through swap(model, cfg) first."""
    import importlib

    import train

    module = importlib.import_module(stage)
    build = module.build_model
    module.build_model = lambda cfg, tokenizer: swap(build(cfg, tokenizer), cfg)
    train.main(["--stage", stage, *train_flags])


def unicl_swap(args):
    """build_tower's image tower in place of UniCL's CoSwin, with a fresh projection of its width."""
    def swap(model, cfg):
        model.visual, features = build_tower(args)
        model.image_proj = nn.Linear(features, cfg.embed_dim, bias=False)
        nn.init.normal_(model.image_proj.weight, std=features ** -0.5)  # as UniCL inits its projections
        return model
    return swap


def florence2_swap(args):
    """The CNN in place of DaViT: its last feature map (before the pooling) feeds the image projection, whose width
    must match (--width 32: 128 channels = the toy DaViT's)."""
    if args.arch != "cnn":
        raise SystemExit("--florence2 swaps in the CNN only (--arch cnn); "
                         "the toy DaViT is `train.py --stage florence2`")

    def swap(model, cfg):
        channels = model.cfg.vision.embed_dims[-1]
        if 4 * args.width != channels:
            raise SystemExit(f"--width {args.width}: the image projection takes {channels} channels, "
                             f"so use --width {channels // 4}")
        model.vision_tower = build_tower(args)[0][:-2]  # (B, 4 * width, H/16, W/16): no pooling, no flatten
        return model
    return swap


def read_florence2(path, n_fit=600, n_test=300):
    """What a trained Florence-2 checkpoint's image tower still encodes: a linear probe (max, mean and min over the
    map, fitted on n_fit single-object training images, scored on n_test others) for colour and for shape, on the
    stem's output and on DaViT's last map. A probe at chance (1/6) means the information is gone, not merely unused.
    Then the same probes on n_test val images of a colour-shape pair held out of training (data.HELDOUT): fitted on
    seen pairs only, they read an unseen pair's colour and shape as well only if the map codes the two apart."""
    import florence2
    model, _, _, size = florence2.load_for_inference(path)
    world = data.ShapesWorld("train", size=size, n=n_fit + n_test, seed=5, max_objects=1, ocr_prob=0.0)
    val = data.ShapesWorld("val", size=size, n=20 * n_test, seed=5, max_objects=1, ocr_prob=0.0)
    # the first n_test of them: render val images only until that many are found (about 1 in 6 is held out)
    held_out = (s for s in map(val.__getitem__, range(len(val)))
                if (s["objects"][0]["color"], s["objects"][0]["category"]) in data.HELDOUT)
    unseen = list(itertools.islice(held_out, n_test))
    samples = [world[i] for i in range(len(world))] + unseen
    pixels = torch.stack([florence2.preprocess(s["image"], size) for s in samples])  # (N, 3, size, size)
    labels = {"colour": torch.tensor([data.COLORS.index(s["objects"][0]["color"]) for s in samples]),
              "shape": torch.tensor([data.SHAPES.index(s["objects"][0]["category"]) for s in samples])}
    maps = {}
    tower = model.vision_tower
    hook = tower.convs[0].register_forward_hook(lambda module, inputs, out: maps.__setitem__("first stage in", out))
    with torch.no_grad():
        maps["last map"] = tower(pixels)  # (N, C, h, w)
    hook.remove()
    torch.manual_seed(0)
    seen, held = slice(n_fit, n_fit + n_test), slice(n_fit + n_test, None)
    for where, fmap in maps.items():
        x = fmap.flatten(2)  # (N, C, h*w)
        x = torch.cat([x.amax(2), x.mean(2), x.amin(2)], 1)  # (N, 3C)
        x = (x - x[:n_fit].mean(0)) / (x[:n_fit].std(0) + 1e-5)
        scores = []
        for name, y in labels.items():
            probe = nn.Linear(x.shape[1], 6)
            opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
            for _ in range(300):
                opt.zero_grad()
                F.cross_entropy(probe(x[:n_fit]), y[:n_fit]).backward()
                opt.step()
            right = probe(x).argmax(1) == y
            scores.append(f"{name} {right[seen].float().mean():.2f} (held-out pairs {right[held].float().mean():.2f})")
        print(f"{where} {tuple(fmap.shape[1:])}: linear probe " + ", ".join(scores) + " (chance 0.17)")


def main():
    if sys.argv[1:2] == ["--read"]:  # python experiments/probe_shapes.py --read out/ckpt.pt
        return read_florence2(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=("coswin", "cnn", "timm_swin"), default="coswin")
    p.add_argument("--norm", choices=("layer", "batch"), default="layer", help="coswin: keep or swap its LayerNorms")
    p.add_argument("--init", choices=("swin", "torch"), default="swin",
                   help="coswin: Swin's std-0.02 Linear init, or PyTorch's default (fan-in) init + bias tables std 1")
    p.add_argument("--config", choices=list(coswin.CONFIGS), default="toy", help="coswin: the CoSwin config")
    p.add_argument("--cfg", nargs="*", default=[], help="coswin: config overrides, e.g. depths=(2,2,2,1)")
    p.add_argument("--width", type=int, default=16, help="cnn: channels of the first block")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--unicl", action="store_true", help="run train.py's UniCL stage with this image tower; the "
                   "flags after --unicl are train.py's (--max_iters, --lr, ...), --steps/--lr/--size do not apply")
    p.add_argument("--florence2", action="store_true", help="the same for train.py's Florence-2 stage (--arch cnn)")
    argv = sys.argv[1:]
    cut = next((argv.index(f) + 1 for f in ("--unicl", "--florence2") if f in argv), len(argv))
    args, train_flags = p.parse_args(argv[:cut]), argv[cut:]
    torch.set_num_threads(args.threads)
    if args.unicl:
        return run_stage("unicl", train_flags, unicl_swap(args))
    if args.florence2:
        return run_stage("florence2", train_flags, florence2_swap(args))
    torch.manual_seed(0)
    start = time.time()
    x_train, y_train = render("train", 20000, args.size)
    x_val, y_val = render("val", 720, args.size)
    print(f"rendered 20720 images in {time.time() - start:.0f} s", flush=True)

    encoder, features = build_tower(args)
    model = nn.Sequential(encoder, nn.Linear(features, len(data.COLORS) * len(data.SHAPES)))
    norm = {"coswin": f"{args.norm} norm, {args.init} init", "cnn": "batch norm", "timm_swin": "layer norm"}[args.arch]
    name = f"coswin {args.config}" if args.arch == "coswin" else args.arch
    print(f"{name} ({norm}{', ' + ' '.join(args.cfg) if args.cfg else ''}): "
          f"{sum(q.numel() for q in model.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    start, shapes = time.time(), len(data.SHAPES)
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:  # 100 warmup steps, then cosine to 0, as the toy run's schedule
            group["lr"] = args.lr * min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        idx = torch.randint(0, len(x_train), (128,))
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                pred = model(x_val).argmax(1)
            model.train()
            print(f"step {step} ({step * 128} samples) | loss {loss.item():.3f} | "
                  f"shape {(pred % shapes == y_val % shapes).float().mean():.3f} | "
                  f"colour {(pred // shapes == y_val // shapes).float().mean():.3f} | {time.time() - start:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()
