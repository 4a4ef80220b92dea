"""Side-by-side CPU speed of our models against the reference libraries, with the same weights, in one run.

    python tests/bench.py            # every benchmark
    python tests/bench.py coswin     # one (names: the bench_* functions below, without the prefix)

Each benchmark alternates ours and the reference call by call (so load from other processes hits both alike), after
warm-up, and reports medians and the ratio ours / reference (goal <= 1.0). Add a benchmark by writing another
`bench_<name>()` function; it is picked up automatically.
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat project files


def time_alternating(ours, reference, warmup=2, reps=7):
    """Median seconds of ours() and reference(), called alternately: warmup rounds, then reps timed rounds."""
    times = {"ours": [], "reference": []}
    for i in range(warmup + reps):
        for name, fn in (("ours", ours), ("reference", reference)):
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["ours"]), statistics.median(times["reference"])


def report(what, ours_s, reference_s, reference_name):
    print(f"{what}: ours {ours_s * 1e3:.1f} ms, {reference_name} {reference_s * 1e3:.1f} ms, "
          f"ratio ours/{reference_name} {ours_s / reference_s:.3f}")


def forward_backward(model, x):
    """One training step's compute without the optimizer: forward, a scalar loss, backward."""
    def step():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    return step


def bench_coswin():
    """CoSwin in patch mode vs timm swin_tiny_patch4_window7_224, same weights: forward + backward, batch 8, 224 px."""
    import timm
    from coswin import CONFIGS, CoSwin, load_timm_swin
    from dataclasses import replace

    torch.manual_seed(0)
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).train()
    ours = CoSwin(replace(CONFIGS["T"], embed="patch", drop_path_rate=0.1, num_classes=1000)).train()
    load_timm_swin(ours, reference.state_dict())
    x = torch.randn(8, 3, 224, 224)
    with torch.no_grad():  # same weights, same function: check before timing (drop path off in eval)
        diff = (ours.eval()(x[:2]) - reference.eval()(x[:2])).abs().max().item()
    ours.train(), reference.train()
    fused = reference.layers[0].blocks[0].attn.fused_attn
    print(f"coswin: batch 8, 224 px, fp32, CPU, {torch.get_num_threads()} threads; max |ours - timm| = {diff:.1e}; "
          f"timm attention path: {'fused SDPA' if fused else 'math (its default; TIMM_FUSED_ATTN=2 for SDPA)'}")
    ours_s, timm_s = time_alternating(forward_backward(ours, x), forward_backward(reference, x))
    report("coswin forward+backward", ours_s, timm_s, "timm")


BENCHES = {name[len("bench_"):]: fn for name, fn in dict(globals()).items() if name.startswith("bench_")}

if __name__ == "__main__":
    unknown = [name for name in sys.argv[1:] if name not in BENCHES]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; available: {sorted(BENCHES)}")
    for name in sys.argv[1:] or BENCHES:
        BENCHES[name]()
