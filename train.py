"""
One training loop for every stage (DESIGN.md section 5).

    python train.py                                    # toy UniCL on the Shapes world, CPU, minutes
    python train.py --stage unicl --config toy --max_iters=200 --lr=1e-3
    torchrun --nproc_per_node=8 train.py --stage unicl --config florence --data=shards/{0000..0999}.tar

A stage is a module that exposes CONFIGS (named dataclass configs), TRAIN (optimisation
settings per named config), build_tokenizer, build_model, build_datasets, collate, compute_loss
and evaluate. This file owns everything else: flags, DDP, the data order, bf16 autocast,
gradient accumulation, AdamW with warmup + cosine, clipping, checkpoints, logging.

The data order and every per-sample random choice are a function of (seed, step, sample index)
only, and all randomness is restored from checkpoints, so a run gives the same numbers on one
process or many, and a resumed run continues exactly.
"""
import contextlib
import dataclasses
import functools
import importlib
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import DataError

# stage name -> (its file, the stage config fields that select it): one file may serve several stages, as METER's
# does VQA fine-tuning and its ITM + MLM pretraining
STAGES = {"unicl": ("unicl", {}), "florence2": ("florence2", {}), "det": ("dyhead", {}),
          "vqa": ("meter", {"task": "vqa"}), "vqa_pretrain": ("meter", {"task": "pretrain"}), "video": ("video", {})}


@dataclass
class TrainConfig:
    stage: str = "unicl"
    config: str = "toy"            # a name in the stage's CONFIGS
    # optimisation (named configs set these through their stage's TRAIN table)
    batch_size: int = 128          # global batch: all ranks and all accumulation steps together
    micro_batch_size: int = 0      # per rank and forward pass; 0 = batch_size / world_size (no accumulation)
    max_iters: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio
    warmup_iters: int = 100
    lr_decay_iters: int = 0        # length of the schedule; 0 = max_iters (set it to stop early on the same schedule)
    weight_decay: float = 0.05     # on matrices only: biases, norms and the temperature are not decayed
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0         # 0 = off
    # run
    seed: int = 0
    device: str = ""               # "" = cuda if available else cpu
    dtype: str = ""                # "" = bfloat16 autocast on GPUs that support it, else float32
    compile: bool = False
    grad_checkpointing: bool = False
    out_dir: str = "out"
    resume: bool = False           # continue from out_dir/ckpt.pt
    eval_only: bool = False        # evaluate out_dir/ckpt.pt (or the fresh model) and exit
    skip_bad_samples: bool = False # drop unreadable / malformed samples instead of stopping (count reported)
    cache_samples: bool = False    # keep every raw sample in memory after its first read (small datasets only)
    log_interval: int = 25
    eval_interval: int = 0         # 0 = evaluate only at the end
    ckpt_interval: int = 250
    peak_tflops: float = 0.0       # one device's peak, for MFU; 0 = PEAK_TFLOPS's bf16 figure on a GPU, no MFU on CPUs


# -----------------------------------------------------------------------------
# Flags: --key=value or --key value; a bare --flag sets a boolean. A key is looked up first in
# TrainConfig, then in the stage config; anything else is an error that lists the valid keys.

def parse_flags(argv):
    pairs, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise SystemExit(f"error: expected --key=value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            value, i = (nxt, i + 1) if nxt is not None and not nxt.startswith("--") else (None, i)
        pairs[key.replace("-", "_")] = value
        i += 1
    return pairs


def convert(key, value, default):
    """A flag's text -> the type of the field's default value."""
    if isinstance(default, bool):
        if value is None or value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
    elif value is None:
        raise SystemExit(f"error: --{key} needs a value")
    else:
        try:
            return type(default)(value)
        except ValueError:
            pass
    raise SystemExit(f"error: --{key}={value}: expected {type(default).__name__}")


def load_stage(name):
    if name not in STAGES:
        raise SystemExit(f"error: unknown stage {name!r}; valid stages: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name][0])


def build_configs(flags, base_train=None, base_stage=None):
    """-> (TrainConfig, stage module, stage config). base_*: configs restored from a checkpoint."""
    tcfg = base_train or TrainConfig()
    for key in ("stage", "config"):
        if key in flags:
            tcfg = dataclasses.replace(tcfg, **{key: flags[key]})
    stage = load_stage(tcfg.stage)
    if base_stage is None:
        if tcfg.config not in stage.CONFIGS:
            raise SystemExit(f"error: unknown config {tcfg.config!r} for stage {tcfg.stage}; "
                             f"valid configs: {', '.join(stage.CONFIGS)}")
        scfg = stage.CONFIGS[tcfg.config]
        tcfg = dataclasses.replace(tcfg, **stage.TRAIN.get(tcfg.config, {}))
    else:
        scfg = base_stage
    scfg = dataclasses.replace(scfg, **STAGES[tcfg.stage][1])
    t_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    s_fields = {f.name: f for f in dataclasses.fields(scfg)}
    for key, value in flags.items():
        if key in ("stage", "config"):
            continue
        if key in t_fields:
            tcfg = dataclasses.replace(tcfg, **{key: convert(key, value, getattr(tcfg, key))})
        elif key in s_fields:
            scfg = dataclasses.replace(scfg, **{key: convert(key, value, getattr(scfg, key))})
        else:
            raise SystemExit(f"error: unknown config key {key!r}.\n  training keys: {', '.join(t_fields)}\n"
                             f"  {tcfg.stage} keys: {', '.join(s_fields)}")
    return tcfg, stage, scfg


# -----------------------------------------------------------------------------
# Optimisation: AdamW, linear warmup then cosine decay (per step), gradient clipping.

def lr_at(step, cfg: TrainConfig):
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    total = cfg.lr_decay_iters or cfg.max_iters
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, total - cfg.warmup_iters))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# Dense bf16 tensor-core peaks (the vendors' data sheets, without sparsity), for MFU: model FLOPs per second over
# what the device could do. Matched against torch.cuda.get_device_name(), first match wins.
PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0}


def peak_tflops(tcfg: TrainConfig, device_type, dtype):
    """The peak that MFU divides by (--peak_tflops, else the table's bf16 figure for this GPU), or 0: no MFU."""
    if tcfg.peak_tflops < 0:
        raise SystemExit(f"error: --peak_tflops must be positive (or 0 for the device table), got {tcfg.peak_tflops}")
    if tcfg.peak_tflops or device_type != "cuda" or dtype != "bfloat16":
        return tcfg.peak_tflops
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


def flops_per_sample(stage, model, batch, micro, device):
    """Model FLOPs of one training sample (forward + backward, as torch's FlopCounterMode counts matmuls,
    convolutions and attention), from one extra step on `batch` that leaves no trace: the RNG, the buffers
    (BatchNorm statistics) and the gradients are as before. Counted before gradient checkpointing is switched on,
    so recomputation is not counted (MFU, not hardware utilisation)."""
    from torch.utils.flop_counter import FlopCounterMode
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), FlopCounterMode(display=False) as counter:
        stage.compute_loss(model, batch)[0].backward()
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / micro


def make_optimizer(model, cfg: TrainConfig, device_type):
    """Weight decay only on tensors of 2 or more dimensions (weights of linears, convs,
    embeddings); biases, norm gains and the UniCL temperature (a 0-d scalar) are not decayed.
    A model may scale parts' learning rates: `model.lr_mults()` -> {parameter name prefix:
    multiplier} (METER trains its pretrained encoders slower than its fusion and heads)."""
    mults = model.lr_mults() if hasattr(model, "lr_mults") else {}
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            mult = next((m for prefix, m in mults.items() if name.startswith(prefix)), 1.0)
            groups.setdefault((cfg.weight_decay if p.dim() >= 2 else 0.0, mult), []).append(p)
    order = sorted(groups, key=lambda k: (k[0] == 0.0, k[1]))  # decayed first, as checkpoints hold them
    return torch.optim.AdamW([{"params": groups[k], "weight_decay": k[0], "lr_mult": k[1]} for k in order],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device_type == "cuda")


def evaluate(stage, model, val, vocab, scfg):
    """The stage's metrics on `val`, in eval mode (dropout off, BatchNorm on its running statistics) and without
    gradients; the model goes back to the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return stage.evaluate(model, val, vocab, scfg)
    finally:
        model.train(was_training)


# -----------------------------------------------------------------------------
# Checkpoints: written to a temp file then renamed, so a crash mid-write never destroys the
# last good one; loaded with weights_only=True (plain tensors and Python containers only).

def save_checkpoint(path, model, optimizer, step, tcfg, scfg):
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
        "train_config": dataclasses.asdict(tcfg), "stage_config": dataclasses.asdict(scfg),
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise SystemExit(f"error: no checkpoint at {path} (did the run write one? see --out_dir)")
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_rng(rng):
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# -----------------------------------------------------------------------------
# Data order: an epoch is a permutation seeded by (seed, epoch); step s takes the global
# positions [s*B, (s+1)*B) of the endless concatenation of epochs; rank r of W takes its
# contiguous share, split into micro-batches. Each sample gets its own random.Random seeded by
# (seed, step, position), so its augmentation is the same whichever rank or micro-batch holds it.

@functools.lru_cache(maxsize=2)
def epoch_permutation(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


def global_batch_indices(step, batch_size, n, seed):
    """Dataset indices of the global batch of this step (the same on every rank)."""
    return [epoch_permutation(n, seed, pos // n)[pos % n] for pos in range(step * batch_size, (step + 1) * batch_size)]


class SampleSource:
    """Fetches raw samples, optionally cached. With --skip_bad_samples a bad one (None, or a DataError naming file,
    line and field) is replaced by the next index; `skipped` counts distinct bad samples, those
    the dataset dropped when it was read included."""

    def __init__(self, dataset, skip_bad, cache):
        self.dataset, self.skip_bad, self.bad = dataset, skip_bad, set()
        self.dropped_on_read = len(getattr(dataset, "skipped", []))
        self.cache = {} if cache else None

    @property
    def skipped(self):
        return self.dropped_on_read + len(self.bad)

    def get(self, index):
        if self.cache is not None:
            if index not in self.cache:
                self.cache[index] = self._read(index)
            return self.cache[index]
        return self._read(index)

    def _read(self, index):
        for attempt in range(len(self.dataset)):
            i = (index + attempt) % len(self.dataset)
            try:
                sample = self.dataset[i]
            except DataError:
                if not self.skip_bad:
                    raise
                sample = None
            if sample is not None:
                return sample
            self.bad.add(i)
        raise RuntimeError("every sample of the dataset is bad")


# -----------------------------------------------------------------------------

def main(argv):
    flags = parse_flags(argv)
    # a checkpoint to resume or evaluate brings its own stage and configs, which the flags then override: read
    # it before checking the flags, so `--resume --out_dir=out --tasks=...` finds the florence2 keys
    first = {k: convert(k, flags[k], getattr(TrainConfig, k)) for k in ("out_dir", "resume", "eval_only") if k in flags}
    ckpt, ckpt_path = None, os.path.join(first.get("out_dir", TrainConfig.out_dir), "ckpt.pt")
    if first.get("resume") or (first.get("eval_only") and os.path.exists(ckpt_path)):
        ckpt = load_checkpoint(ckpt_path)
        base = TrainConfig(**ckpt["train_config"])
        if flags.get("stage", base.stage) != base.stage:
            raise SystemExit(f"error: {ckpt_path} is a checkpoint of stage {base.stage}, not {flags['stage']}")
        stage_cfg_cls = type(load_stage(base.stage).CONFIGS[base.config])
        tcfg, stage, scfg = build_configs(flags, base, stage_cfg_cls(**ckpt["stage_config"]))
    else:
        tcfg, stage, scfg = build_configs(flags)

    # distributed set-up: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = tcfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if ddp:
        local_rank = int(os.environ["LOCAL_RANK"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = tcfg.dtype or ("bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32")
    autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext())

    micro = tcfg.micro_batch_size or tcfg.batch_size // world
    if tcfg.batch_size % (micro * world):
        raise SystemExit(f"error: batch_size {tcfg.batch_size} is not a multiple of "
                         f"micro_batch_size {micro} x world_size {world}")
    accum = tcfg.batch_size // (micro * world)

    # every rank builds the same initial model from the same seed
    random.seed(tcfg.seed)
    torch.manual_seed(tcfg.seed)
    try:  # a bad config value (unknown model or task, missing tokenizer folder) is named, not a traceback
        vocab = stage.build_vocab(scfg)
        model = stage.build_model(scfg, vocab).to(device)
        train_ds, val_ds = stage.build_datasets(scfg, tcfg.seed, tcfg.skip_bad_samples)
    except DataError:
        raise  # a bad annotation file: reported below with the --skip_bad_samples hint
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    optimizer = make_optimizer(model, tcfg, device_type)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        restore_rng(ckpt["rng"])
    source = SampleSource(train_ds, tcfg.skip_bad_samples, tcfg.cache_samples)
    mine = range(rank * micro * accum, (rank + 1) * micro * accum)  # this rank's share of the global batch

    def batch_positions(step):
        return global_batch_indices(step, tcfg.batch_size, len(train_ds), tcfg.seed)

    def micro_batch(positions, step, m):
        share = mine[m * micro: (m + 1) * micro]
        samples = [source.get(positions[p]) for p in share]
        rngs = [random.Random(f"{tcfg.seed}/{step}/{p}") for p in share]
        batch = stage.collate(samples, vocab, scfg, rngs, step / tcfg.max_iters)  # progress: 0 -> 1
        return {k: v.to(device) for k, v in batch.items()}

    peak = peak_tflops(tcfg, device_type, dtype)
    if tcfg.eval_only:
        peak = 0.0  # nothing is trained: no MFU
    if peak:
        with autocast:
            sample_flops = flops_per_sample(stage, model, micro_batch(batch_positions(step), step, 0), micro, device)
    if tcfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if master:
        os.makedirs(tcfg.out_dir, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"stage {tcfg.stage} | config {tcfg.config} | {n_params / 1e6:.2f}M parameters | device {device} "
              f"x{world} | {dtype} | global batch {tcfg.batch_size} = {world} ranks x {accum} accum x {micro}")
        if peak:
            print(f"MFU: {sample_flops / 1e9:.3f} GFLOPs a sample (forward + backward) against {peak:g} TFLOPs a "
                  f"device")

    def log(record):
        if master:
            with open(os.path.join(tcfg.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def run_eval():
        metrics = evaluate(stage, model, val_ds, vocab, scfg) if master and val_ds is not None else {}
        if ddp:
            dist.barrier()
        return metrics

    if tcfg.eval_only:
        with autocast:  # --dtype=bfloat16 evaluates in bf16, as it would train
            metrics = run_eval()
        log({"step": step, "eval": metrics})
        finish(metrics, master, ddp)
        return metrics

    train_model = model
    if tcfg.compile:
        # torch 2.11's inductor (H100) failed an internal assertion in its coalescing analysis on the toy UniCL
        # graphs, whose text length varies per batch (dynamic shapes); without that analysis it compiles and trains
        from torch._inductor import config as inductor_config
        inductor_config.triton.coalesce_tiling_analysis = False
        train_model = torch.compile(model)
    if ddp:
        # static_graph: the set of parameters a stage uses is the same every step, but need not be all of
        # them (UniCL's image tower leaves CoSwin's pyramid norms unused), so DDP can skip those cheaply
        train_model = DDP(train_model, device_ids=[device] if device_type == "cuda" else None, static_graph=True)

    t_start, step_start = time.time(), step
    with interrupt_requests() as interrupted:  # SIGINT / SIGTERM: finish the step, checkpoint, exit
        while step < tcfg.max_iters:
            lr = lr_at(step, tcfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)
            positions, loss_sum, logs = batch_positions(step), torch.zeros((), device=device), {}
            for m in range(accum):
                batch = micro_batch(positions, step, m)
                sync = nullcontext() if not ddp or m == accum - 1 else train_model.no_sync()
                with sync, autocast:
                    loss, logs = stage.compute_loss(train_model, batch)
                    (loss / accum).backward()
                loss_sum += loss.detach() / accum
            if ddp:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            loss_value = loss_sum.item()
            if not math.isfinite(loss_value):
                where = (f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path)
                         else "no checkpoint was written yet")
                raise SystemExit(f"error: non-finite loss ({loss_value}) at step {step + 1}; stopping, {where}")
            # the total gradient norm, clipped to grad_clip if set; logged, since Adam hides a uniform gradient scale
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip or float("inf")).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            if step % tcfg.log_interval == 0 or step == tcfg.max_iters:
                elapsed = time.time() - t_start
                rate = (step - step_start) * tcfg.batch_size / elapsed
                eta = (tcfg.max_iters - step) * tcfg.batch_size / rate
                # MFU: the model FLOPs done per second (every rank's samples) over the peak of all the ranks' devices
                mfu = {"mfu": sample_flops * rate / (peak * 1e12 * world)} if peak else {}
                log({"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "samples_per_s": rate, **mfu,
                     **logs})
                if master:
                    skipped = f" | skipped {source.skipped}" if source.skipped else ""
                    shown = f" | MFU {mfu['mfu']:.1%}" if mfu else ""
                    print(f"step {step}/{tcfg.max_iters} | loss {loss_value:.4f} | lr {lr:.2e} | "
                          f"{rate:.0f} samples/s{shown} | eta {eta / 60:.1f} min{skipped}", flush=True)
            if tcfg.eval_interval and step % tcfg.eval_interval == 0 and step < tcfg.max_iters:
                metrics = run_eval()
                log({"step": step, "eval": metrics})
                if master:
                    print("eval " + format_metrics(metrics), flush=True)
            stop = bool(interrupted)
            if step % tcfg.ckpt_interval == 0 or step == tcfg.max_iters or stop:
                if master:
                    save_checkpoint(ckpt_path, model, optimizer, step, tcfg, scfg)
                if ddp:
                    dist.barrier()
            if stop:
                if master:
                    print(f"interrupted: checkpoint of step {step} saved to {ckpt_path}; continue with --resume",
                          flush=True)
                finish({}, master, ddp)
                raise SystemExit(130)  # the shell's code for "stopped by a signal": not mistaken for a finished run

        if source.skipped and master:
            print(f"skipped {source.skipped} bad samples")
        metrics = run_eval()
        log({"step": step, "eval": metrics, "skipped": source.skipped})
        finish(metrics, master, ddp)
        return metrics


def format_metrics(metrics):
    return " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())


@contextlib.contextmanager
def interrupt_requests():
    """While training, SIGINT / SIGTERM only set a flag (the yielded list), so the current step finishes and is
    checkpointed: nothing is lost. The previous handlers come back afterwards (main may run inside pytest)."""
    requests = []
    previous = {sig: signal.signal(sig, lambda *_: requests.append(sig)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def finish(metrics, master, ddp):
    if master and metrics:
        print("final " + format_metrics(metrics), flush=True)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except DataError as e:  # bad input: say which file, line and field, not a traceback
        raise SystemExit(f"error: {e}\n(--skip_bad_samples skips such samples and counts them)")
