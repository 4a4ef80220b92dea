"""
One training loop for every stage.

    python train.py                                    # toy UniCL on the Shapes world, CPU, minutes
    python train.py --stage unicl --config toy --max_iters=200 --lr=1e-3
    torchrun --nproc_per_node=8 train.py --stage unicl --config florence --data=shards/{0000..0999}.tar

A stage is a module (STAGES below) that exposes the stage protocol (docs/design.md):

    CONFIGS, TRAIN                                   named stage configs, and optimisation settings per name
    build_vocab(cfg) -> vocab                        the text / label side: a tokenizer, a vocabulary, class names
    build_model(cfg, vocab) -> nn.Module
    build_datasets(cfg, seed, skip_bad) -> (train, val or None)     raw samples (data.py)
    collate(samples, vocab, cfg, rngs, progress) -> dict of tensors
    compute_loss(model, batch) -> (loss, logs)
    evaluate(model, val, vocab, cfg) -> metrics      called in eval mode without gradients (evaluate() below)

This file owns everything else: flags, DDP, the data order, bf16 autocast, gradient accumulation, AdamW with
warmup + cosine, clipping, checkpoints, logging. A run is four steps, each a function near the end of the file:
read_configs, start_processes, build_run, train_loop.

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
# Logging and interruption.

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


# -----------------------------------------------------------------------------
# A run in four steps, each one function below: the configs (from flags, or from the checkpoint a run resumes),
# the processes (device, DDP, dtype, the batch split), the model and data, the loop. main() calls them in order.

def read_configs(flags):
    """-> (TrainConfig, stage module, stage config, checkpoint or None). A checkpoint to resume or evaluate brings its
    own stage and configs, which the flags then override: it is read before the flags are checked, so that
    `--resume --out_dir=out --tasks=...` finds the florence2 keys."""
    first = {k: convert(k, flags[k], getattr(TrainConfig, k)) for k in ("out_dir", "resume", "eval_only") if k in flags}
    path = os.path.join(first.get("out_dir", TrainConfig.out_dir), "ckpt.pt")
    if not (first.get("resume") or (first.get("eval_only") and os.path.exists(path))):
        return (*build_configs(flags), None)
    ckpt = load_checkpoint(path)
    base = TrainConfig(**ckpt["train_config"])
    if flags.get("stage", base.stage) != base.stage:
        raise SystemExit(f"error: {path} is a checkpoint of stage {base.stage}, not {flags['stage']}")
    stage_cfg_cls = type(load_stage(base.stage).CONFIGS[base.config])
    return (*build_configs(flags, base, stage_cfg_cls(**ckpt["stage_config"])), ckpt)


@dataclass
class Processes:
    """Where the run computes: this process's device and rank among `world` (torchrun sets RANK, WORLD_SIZE and
    LOCAL_RANK), the dtype, and how the global batch splits into `world` ranks x `accum` forward passes x `micro`."""
    device: str
    dtype: str
    rank: int
    world: int
    micro: int
    accum: int

    @property
    def ddp(self):
        return self.world > 1

    @property
    def master(self):  # rank 0 prints, logs and writes checkpoints
        return self.rank == 0

    @property
    def device_type(self):
        return "cuda" if self.device.startswith("cuda") else "cpu"

    def autocast(self):
        return torch.autocast(self.device_type, dtype=torch.bfloat16) if self.dtype == "bfloat16" else nullcontext()


def start_processes(tcfg: TrainConfig) -> Processes:
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = tcfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if ddp:
        local_rank = int(os.environ["LOCAL_RANK"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    on_gpu = device.startswith("cuda")
    dtype = tcfg.dtype or ("bfloat16" if on_gpu and torch.cuda.is_bf16_supported() else "float32")
    micro = tcfg.micro_batch_size or tcfg.batch_size // world
    if tcfg.batch_size % (micro * world):
        raise SystemExit(f"error: batch_size {tcfg.batch_size} is not a multiple of "
                         f"micro_batch_size {micro} x world_size {world}")
    return Processes(device, dtype, rank, world, micro, tcfg.batch_size // (micro * world))


def finish(metrics, procs: Processes):
    if procs.master and metrics:
        print("final " + format_metrics(metrics), flush=True)
    if procs.ddp:
        dist.destroy_process_group()


@dataclass
class Run:
    """The model and data of a run, and how a step's micro-batches are drawn from the data (see Data order above)."""
    tcfg: TrainConfig
    stage: object        # the stage module
    scfg: object         # its config
    procs: Processes
    vocab: object        # the stage's build_vocab(): a tokenizer, a vocabulary or class names
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    source: SampleSource  # the training samples
    val: object          # the val dataset, or None
    step: int
    ckpt_path: str

    def positions(self, step):
        return global_batch_indices(step, self.tcfg.batch_size, len(self.source.dataset), self.tcfg.seed)

    def micro_batch(self, positions, step, m):
        """The m-th forward pass of this rank at `step`: its share of the global batch, collated on the device."""
        p = self.procs
        mine = range(p.rank * p.micro * p.accum, (p.rank + 1) * p.micro * p.accum)  # this rank's share
        share = mine[m * p.micro: (m + 1) * p.micro]
        samples = [self.source.get(positions[i]) for i in share]
        rngs = [random.Random(f"{self.tcfg.seed}/{step}/{i}") for i in share]
        batch = self.stage.collate(samples, self.vocab, self.scfg, rngs, step / self.tcfg.max_iters)  # progress 0->1
        return {k: v.to(p.device) for k, v in batch.items()}

    def log(self, record):
        if self.procs.master:
            with open(os.path.join(self.tcfg.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(self):
        """Rank 0 evaluates; the others wait for it."""
        metrics = (evaluate(self.stage, self.model, self.val, self.vocab, self.scfg)
                   if self.procs.master and self.val is not None else {})
        if self.procs.ddp:
            dist.barrier()
        return metrics


def build_run(stage, tcfg: TrainConfig, scfg, procs: Processes, ckpt) -> Run:
    """Every rank builds the same initial model from the same seed; a checkpoint then restores the model, the
    optimizer, the step and the random states."""
    random.seed(tcfg.seed)
    torch.manual_seed(tcfg.seed)
    try:  # a bad config value (unknown model or task, missing tokenizer folder) is named, not a traceback
        vocab = stage.build_vocab(scfg)
        model = stage.build_model(scfg, vocab).to(procs.device)
        train_ds, val_ds = stage.build_datasets(scfg, tcfg.seed, tcfg.skip_bad_samples)
    except DataError:
        raise  # a bad annotation file: reported by __main__ with the --skip_bad_samples hint
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    optimizer = make_optimizer(model, tcfg, procs.device_type)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        restore_rng(ckpt["rng"])
    source = SampleSource(train_ds, tcfg.skip_bad_samples, tcfg.cache_samples)
    return Run(tcfg, stage, scfg, procs, vocab, model, optimizer, source, val_ds, step,
               os.path.join(tcfg.out_dir, "ckpt.pt"))


def announce(run: Run):
    """The run's first lines: what is trained where, and the FLOPs a sample for MFU (-> sample FLOPs, peak)."""
    tcfg, procs = run.tcfg, run.procs
    peak = 0.0 if tcfg.eval_only else peak_tflops(tcfg, procs.device_type, procs.dtype)  # nothing trained: no MFU
    sample_flops = 0.0
    if peak:
        with procs.autocast():
            batch = run.micro_batch(run.positions(run.step), run.step, 0)
            sample_flops = flops_per_sample(run.stage, run.model, batch, procs.micro, procs.device)
    if tcfg.grad_checkpointing:
        run.model.set_grad_checkpointing(True)
    if procs.master:
        os.makedirs(tcfg.out_dir, exist_ok=True)
        n_params = sum(p.numel() for p in run.model.parameters())
        print(f"stage {tcfg.stage} | config {tcfg.config} | {n_params / 1e6:.2f}M parameters | device {procs.device} "
              f"x{procs.world} | {procs.dtype} | global batch {tcfg.batch_size} = {procs.world} ranks x "
              f"{procs.accum} accum x {procs.micro}")
        if peak:
            print(f"MFU: {sample_flops / 1e9:.3f} GFLOPs a sample (forward + backward) against {peak:g} TFLOPs a "
                  f"device")
    return sample_flops, peak


def wrap_for_training(run: Run):
    """The module the loop calls: compiled and / or in DDP; run.model stays the plain one that checkpoints hold."""
    model = run.model
    if run.tcfg.compile:
        # torch 2.11's inductor (H100) failed an internal assertion in its coalescing analysis on the toy UniCL
        # graphs, whose text length varies per batch (dynamic shapes); without that analysis it compiles and trains
        from torch._inductor import config as inductor_config
        inductor_config.triton.coalesce_tiling_analysis = False
        model = torch.compile(model)
    if run.procs.ddp:
        # static_graph: the set of parameters a stage uses is the same every step, but need not be all of
        # them (UniCL's image tower leaves CoSwin's pyramid norms unused), so DDP can skip those cheaply
        model = DDP(model, device_ids=[run.procs.device] if run.procs.device_type == "cuda" else None,
                    static_graph=True)
    return model


def train_step(run: Run, train_model, step):
    """One optimisation step at `step`: accumulated micro-batches, the loss averaged over ranks, clipping, AdamW.
    -> (loss, lr, gradient norm, the stage's logs of the last micro-batch)."""
    tcfg, procs = run.tcfg, run.procs
    lr = lr_at(step, tcfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    positions, loss_sum, logs = run.positions(step), torch.zeros((), device=procs.device), {}
    for m in range(procs.accum):
        batch = run.micro_batch(positions, step, m)
        sync = nullcontext() if not procs.ddp or m == procs.accum - 1 else train_model.no_sync()
        with sync, procs.autocast():
            loss, logs = run.stage.compute_loss(train_model, batch)
            (loss / procs.accum).backward()
        loss_sum += loss.detach() / procs.accum
    if procs.ddp:
        dist.all_reduce(loss_sum)
        loss_sum /= procs.world
    loss_value = loss_sum.item()
    if not math.isfinite(loss_value):
        where = (f"the last good checkpoint is {run.ckpt_path}" if os.path.exists(run.ckpt_path)
                 else "no checkpoint was written yet")
        raise SystemExit(f"error: non-finite loss ({loss_value}) at step {step + 1}; stopping, {where}")
    # the total gradient norm, clipped to grad_clip if set; logged, since Adam hides a uniform gradient scale
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), tcfg.grad_clip or float("inf")).item()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_value, lr, grad_norm, logs


def train_loop(run: Run, sample_flops, peak):
    """Steps until max_iters, with progress lines, evaluations and checkpoints; then the final evaluation."""
    tcfg, procs = run.tcfg, run.procs
    train_model = wrap_for_training(run)
    t_start, step_start = time.time(), run.step
    with interrupt_requests() as interrupted:  # SIGINT / SIGTERM: finish the step, checkpoint, exit
        while run.step < tcfg.max_iters:
            loss, lr, grad_norm, logs = train_step(run, train_model, run.step)
            run.step += 1
            step = run.step
            if step % tcfg.log_interval == 0 or step == tcfg.max_iters:
                elapsed = time.time() - t_start
                rate = (step - step_start) * tcfg.batch_size / elapsed
                eta = (tcfg.max_iters - step) * tcfg.batch_size / rate
                # MFU: the model FLOPs done per second (every rank's samples) over the peak of all the ranks' devices
                mfu = {"mfu": sample_flops * rate / (peak * 1e12 * procs.world)} if peak else {}
                run.log({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "samples_per_s": rate, **mfu,
                         **logs})
                if procs.master:
                    skipped = f" | skipped {run.source.skipped}" if run.source.skipped else ""
                    shown = f" | MFU {mfu['mfu']:.1%}" if mfu else ""
                    print(f"step {step}/{tcfg.max_iters} | loss {loss:.4f} | lr {lr:.2e} | "
                          f"{rate:.0f} samples/s{shown} | eta {eta / 60:.1f} min{skipped}", flush=True)
            if tcfg.eval_interval and step % tcfg.eval_interval == 0 and step < tcfg.max_iters:
                metrics = run.evaluate()
                run.log({"step": step, "eval": metrics})
                if procs.master:
                    print("eval " + format_metrics(metrics), flush=True)
            stop = bool(interrupted)
            if step % tcfg.ckpt_interval == 0 or step == tcfg.max_iters or stop:
                if procs.master:
                    save_checkpoint(run.ckpt_path, run.model, run.optimizer, step, tcfg, run.scfg)
                if procs.ddp:
                    dist.barrier()
            if stop:
                if procs.master:
                    print(f"interrupted: checkpoint of step {step} saved to {run.ckpt_path}; continue with --resume",
                          flush=True)
                finish({}, procs)
                raise SystemExit(130)  # the shell's code for "stopped by a signal": not mistaken for a finished run

        if run.source.skipped and procs.master:
            print(f"skipped {run.source.skipped} bad samples")
        metrics = run.evaluate()
        run.log({"step": run.step, "eval": metrics, "skipped": run.source.skipped})
        finish(metrics, procs)
        return metrics


def main(argv):
    tcfg, stage, scfg, ckpt = read_configs(parse_flags(argv))
    procs = start_processes(tcfg)
    run = build_run(stage, tcfg, scfg, procs, ckpt)
    sample_flops, peak = announce(run)
    if tcfg.eval_only:
        with procs.autocast():  # --dtype=bfloat16 evaluates in bf16, as it would train
            metrics = run.evaluate()
        run.log({"step": run.step, "eval": metrics})
        finish(metrics, procs)
        return metrics
    return train_loop(run, sample_flops, peak)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except DataError as e:  # bad input: say which file, line and field, not a traceback
        raise SystemExit(f"error: {e}\n(--skip_bad_samples skips such samples and counts them)")
