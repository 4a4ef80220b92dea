"""The training loop of the standard models beside the toy stages (experiments/*_baseline.py): the toy's AdamW, warmup and
cosine (train.make_optimizer, train.lr_at), the toy's batches in the toy's order (train.global_batch_indices), a
wall-clock budget in which evaluation time is not counted, and an evaluation every `eval_every` minutes printed
against minutes and samples (and, with `log`, appended to a metrics.jsonl as train.py writes it, for
docs/curves.py). A comparison tool, not a test."""
import json
import time

import torch

import train


def fmt(metrics):
    return " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("truncated", "out_of_vocab"))


def log_eval(path, step, batch_size, trained_s, metrics):
    """Append one evaluation to a metrics.jsonl, as train.py writes it plus the samples and training minutes."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "samples": step * batch_size, "minutes": round(trained_s / 60, 2),
                            "eval": metrics}) + "\n")


def train_on_budget(model, tcfg, n, batch_loss, evaluate, minutes, eval_every, extra=None, log=None):
    """Trains `model` until `minutes` of training or tcfg.max_iters steps. batch_loss(step, indices) -> loss of the
    samples at those dataset indices; evaluate() -> metrics. Prints each evaluation and, at the end, one JSON line
    (samples, steps, minutes, the last metrics and `extra`); `log`: a path each evaluation is appended to."""
    opt = train.make_optimizer(model, tcfg, "cpu")  # AdamW, decay on matrices only, as for the toys
    budget = minutes * 60
    trained, next_eval, step, losses, metrics = 0.0, min(eval_every * 60, budget), 0, [], {}
    while trained < budget and step < tcfg.max_iters:
        start = time.time()
        for group in opt.param_groups:
            group["lr"] = train.lr_at(step, tcfg)
        loss = batch_loss(step, train.global_batch_indices(step, tcfg.batch_size, n, tcfg.seed))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        step += 1
        losses.append(loss.item())
        trained += time.time() - start
        if trained >= next_eval or trained >= budget or step == tcfg.max_iters:
            metrics = evaluate()
            print(f"eval | {trained / 60:.2f} min | {step * tcfg.batch_size} samples | step {step} | "
                  f"loss {sum(losses) / len(losses):.4f} | {fmt(metrics)}", flush=True)
            if log:
                log_eval(log, step, tcfg.batch_size, trained, metrics)
            losses, next_eval = [], min(next_eval + eval_every * 60, budget)
    print(json.dumps({"samples": step * tcfg.batch_size, "steps": step, "minutes": round(trained / 60, 2),
                      **{k: round(v, 4) for k, v in metrics.items()}, **(extra or {})}))
    return metrics
