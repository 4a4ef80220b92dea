"""Learning curves of a toy stage beside its standard model, from the runs' metrics.jsonl files, as a PNG in docs/curves/.

    python docs/curves.py unicl out/metrics.jsonl out_cnn/metrics.jsonl      # ours, then the standard model
    python docs/curves.py vqa out_vqa/metrics.jsonl --also 'without the aid=out_noaid/metrics.jsonl'   # + an ablation

Each file holds JSON lines as train.py writes them ({"step", "eval": {metric: value}} at each evaluation) or as
experiments/budget.py writes them (the same, with "samples"). The x axis is training samples seen (step x the toy's
global batch where a line does not say); the y axis is the stage's metric on the val set, with chance drawn dashed.
Needs matplotlib (docs only: nothing else in the project imports it).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat project files
import train  # noqa: E402

# stage -> (metric key, its name on the plot, chance level, standard model's name)
STAGES = {
    "unicl": ("zeroshot_top1", "zero-shot top-1, 36 colour-shape classes", 1 / 36, "8-conv BatchNorm CNN tower"),
    "florence2": ("od_map50", "OD mAP@0.5", 0.0, ""),
    "det": ("AP", "COCO AP", 0.0, "torchvision FCOS"),
    "vqa": ("vqa_acc", "VQA accuracy", 0.406, "CNN + question transformer"),
    "video": ("top1", "top-1, 8 motions", 0.125, "small 3D CNN"),
}


def curve(path, key, batch):
    """-> (samples seen, metric) at each evaluation of the run that wrote `path`."""
    xs, ys = [], []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if key in record.get("eval", {}):
                xs.append(record.get("samples", record["step"] * batch))
                ys.append(record["eval"][key])
    if not xs:
        raise SystemExit(f"error: {path}: no evaluation with {key!r} (train with --eval_interval=N)")
    return xs, ys


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=list(STAGES))
    p.add_argument("ours", help="metrics.jsonl of the toy run")
    p.add_argument("standard", nargs="?", help="metrics.jsonl of the standard model's run")
    p.add_argument("--also", action="append", default=[], metavar="LABEL=PATH",
                   help="another run of ours to draw (an ablation), dotted; repeatable")
    p.add_argument("--out", default="", help="default: docs/curves/STAGE.png")
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, name, chance, standard_name = STAGES[args.stage]
    batch = train.build_configs({"stage": args.stage})[0].batch_size
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot(*curve(args.ours, key, batch), "o-", label=f"ours ({args.stage} toy)")
    if args.standard:
        ax.plot(*curve(args.standard, key, batch), "s-", label=standard_name or "standard model")
    for also in args.also:
        label, eq, path = also.rpartition("=")  # the last "=": a label may hold flags
        if not eq:
            raise SystemExit(f"error: --also {also!r}: expected LABEL=PATH")
        ax.plot(*curve(path, key, batch), ".:", label=label)
    ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.3f})")
    ax.set_xlabel("training samples seen")
    ax.set_ylabel(name)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "curves", f"{args.stage}.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
