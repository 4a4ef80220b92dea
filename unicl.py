"""
UniCL: Florence's image-text pretraining (Florence section 2.2, Eq. 1-3; Yang et al. 2022).

Two towers, a CoSwin image encoder (coswin.py) and a CLIP-like causal text transformer, project
into one space. The loss is CLIP's contrastive loss with one change: every text carries a label
y = hash of the exact language description, and all pairs in the batch that share a label are
positives. With all labels distinct it is exactly the CLIP loss.

Read top to bottom: text tower -> two-tower model -> hash labels and prompt templates ->
the UniCL loss (with the cross-GPU gather) -> zero-shot classification and retrieval ->
the stage protocol that train.py drives (CONFIGS, TRAIN, build_vocab, build_model, build_datasets, collate,
compute_loss, evaluate; docs/design.md). The toy's one aid is its image tower's BatchNorm conv stem, a field of
coswin's "toy" config (coswin.py section 1b); the "florence" config has none.
"""
import hashlib
import math
import random
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import coswin
import data


# -----------------------------------------------------------------------------
# Configs. Model and data settings of this stage; the optimisation settings of each named
# config are in TRAIN below (train.py owns their meaning).

@dataclass
class UniCLConfig:
    # image tower
    image_encoder: str = "toy"     # a coswin.CONFIGS name
    drop_path_rate: float = 0.0    # stochastic depth of the image tower
    img_size: int = 48             # training / eval resolution (Florence pretrains at 224)
    # text tower (CLIP-like: causal, pooled at the end-of-text token)
    tokenizer: str = "bytes"       # data.get_tokenizer name; "bytes" needs no file or network
    context_length: int = 80       # tokens incl. start/end (Florence: 76 text tokens + 1)
    text_width: int = 96
    text_layers: int = 2
    text_heads: int = 4
    embed_dim: int = 128           # width of the shared image-text space
    # UniCL data recipe (section 2.2)
    unicl_stage: int = 1           # 1: short texts get a random prompt template; 2: no augmented texts
    template_max_words: int = 4    # a text of at most this many words counts as "short"
    # data: "shapes" (the built-in world) or a .csv/.tsv/.jsonl file or .tar shards (comma separated)
    data: str = "shapes"
    val_data: str = ""             # same formats; "shapes": the Shapes val split (zero-shot) beside any training data
    image_root: str = ""           # folder that image paths in data files are relative to
    train_size: int = 20000        # Shapes world: number of distinct training samples
    val_size: int = 720            # Shapes world: single-object val images for zero-shot (20 per class); 0 = no eval
    max_objects: int = 1           # Shapes world: objects per training image (1..max_objects)
    random_crop: bool = False      # random resized crop (off for Shapes: crops would cut objects away)


CONFIGS = {
    # CPU toy: UniCL on single-object Shapes-world images, zero-shot colour x shape classification in minutes
    "toy": UniCLConfig(),
    # Florence (Table 1 / section 2.2): CoSwin-H (637M) + a 256M text transformer = 893M.
    # Text tower: 16 layers of width 1024 over the 50k GPT-2 BPE vocabulary lands at 255M
    # (the paper gives only the total). 224 px, 76 text tokens.
    "florence": UniCLConfig(image_encoder="H", drop_path_rate=0.2, img_size=224, tokenizer="gpt2",
                            context_length=77, text_width=1024, text_layers=16, text_heads=16,
                            embed_dim=1024, data="", train_size=0),
}

# Optimisation settings per named config; keys are train.py TrainConfig fields.
TRAIN = {
    "toy": dict(batch_size=128, max_iters=800, lr=2e-3, warmup_iters=100, weight_decay=0.05, cache_samples=True,
                log_interval=100),
    "florence": dict(batch_size=24576, max_iters=100000, lr=1e-3, warmup_iters=5000, weight_decay=0.2),
}


# -----------------------------------------------------------------------------
# Text tower: a pre-LN causal transformer, as in CLIP. Causal attention means padding after
# the end-of-text token can never change the pooled feature, so no padding mask is needed.

class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)                            # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))                                  # (B, T, C)
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    def __init__(self, vocab_size, context_length, width, layers, heads):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.grad_checkpointing = False
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens, eot):
        """tokens (B, T) padded ids, eot (B,) position of each end-of-text token -> (B, width)."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]  # (B, T, C)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and self.training else block(x)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), eot]                          # (B, C)


# -----------------------------------------------------------------------------
# The two-tower model. Features are L2-normalised; the similarity multiplier tau is learned as
# log(tau), initialised to log(1/0.07) and clamped at log(100) as in CLIP. It is a 0-d
# parameter, so train.py's rule "no weight decay below 2 dimensions" leaves it undecayed.

class UniCL(nn.Module):
    def __init__(self, cfg: UniCLConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.visual = coswin.CoSwin(replace(coswin.CONFIGS[cfg.image_encoder], num_classes=0,
                                            drop_path_rate=cfg.drop_path_rate, img_size=cfg.img_size))
        self.text = TextTransformer(vocab_size, cfg.context_length, cfg.text_width, cfg.text_layers, cfg.text_heads)
        self.image_proj = nn.Linear(self.visual.num_features, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        for proj in (self.image_proj, self.text_proj):
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)

    def encode_image(self, images):
        return F.normalize(self.image_proj(self.visual(images)), dim=-1)  # (B, D)

    def encode_text(self, tokens, eot):
        return F.normalize(self.text_proj(self.text(tokens, eot)), dim=-1)  # (B, D)

    def forward(self, images, tokens, eot):
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        return self.encode_image(images), self.encode_text(tokens, eot), scale

    def set_grad_checkpointing(self, enable=True):
        self.visual.set_grad_checkpointing(enable)
        self.text.grad_checkpointing = enable


# -----------------------------------------------------------------------------
# Labels and texts (section 2.2). y = hash of the exact language description: identical texts,
# and only identical texts, share a label. Short descriptions are enriched with a random prompt
# template in stage one; the label stays that of the description, so "a photo of X." and
# "a cropped photo of X." remain positives of each other.

TEMPLATES = (
    "a photo of {}.", "a cropped photo of {}.", "a picture of {}.", "an image of {}.",
    "a rendering of {}.", "a drawing of {}.", "a close-up photo of {}.", "there is {} in the image.",
)
# Zero-shot prompts for a class name such as "red circle". As in CLIP's ImageNet ensemble
# ("a photo of a small {}.", "a photo of a large {}.") the sizes are spelled out, so each prompt
# reads like a training text and the average covers both sizes.
ZEROSHOT_TEMPLATES = tuple(t.format(f"a {size} {{}}") for t in TEMPLATES[:4] for size in ("small", "large"))


def text_label(text: str) -> int:
    """A stable 63-bit hash of the exact text (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def templated(text: str, cfg: UniCLConfig) -> bool:
    """Whether training shows this text only inside a prompt template: a short text in stage one."""
    return cfg.unicl_stage == 1 and len(text.split()) <= cfg.template_max_words


def augment_text(text: str, cfg: UniCLConfig, rng: random.Random | None) -> str:
    """Stage one wraps short texts in a random template; stage two and evaluation leave texts as they are."""
    if rng is None or not templated(text, cfg):
        return text
    return rng.choice(TEMPLATES).format(text)


def tokenize(tokenizer, texts, context_length):
    """-> tokens (B, T) padded with pad_id, eot (B,) index of each end-of-text token. Long texts
    are cut so that the end-of-text token always fits (the pooled feature lives there)."""
    rows = []
    for text in texts:
        ids = tokenizer.encode(text, bos=True)[: context_length - 1] + [tokenizer.eos_id]
        rows.append(ids)
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    eot = torch.tensor([len(r) - 1 for r in rows])
    return tokens, eot


# -----------------------------------------------------------------------------
# The UniCL loss (Eq. 1-3). With u, v the normalised image and text features of the (global)
# batch, logits = tau u v^T and P(i) = {k : y_k = y_i}:
#   L_i2t = -1/B sum_i 1/|P(i)| sum_{k in P(i)} log softmax_j(logits[i, :])[k]
#   L_t2i = the same on logits^T
# and the loss is their mean. Under DDP every rank gathers the features of all ranks so that
# each computes the loss over the global batch.

class _GatherWithGrad(torch.autograd.Function):
    """all_gather that keeps the gradient path: forward concatenates every rank's rows (the local
    tensor sits in its own slot); backward sums the gradient every rank computed for the
    concatenation and returns this rank's slice. Each rank computes the same global loss, so the
    summed slice is world_size x dL/d(local rows), and DDP's average over ranks brings the
    parameter gradients back to exactly dL/dtheta of the single-process global batch."""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        parts[ctx.rank] = x
        return torch.cat(parts)  # (world * B_local, D)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n: (ctx.rank + 1) * ctx.n]


def gather_batch(x):
    """(B_local, ...) -> (B_global, ...), differentiable; identity outside distributed runs."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if x.dtype in (torch.long, torch.int):  # labels carry no gradient
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)
    return _GatherWithGrad.apply(x)


def unicl_loss(image_features, text_features, labels, logit_scale):
    """Florence Eq. 1-3. image_features, text_features (B, D) L2-normalised; labels (B,) int64
    hashes; logit_scale the multiplier tau (not its log). Returns the mean of the image-to-text
    and text-to-image terms, each averaged over the global batch."""
    u, v, y = gather_batch(image_features), gather_batch(text_features), gather_batch(labels)
    logits = logit_scale * u @ v.t()                                       # (B, B)
    positives = (y[:, None] == y[None, :]).to(logits.dtype)                # (B, B): P(i) as a 0/1 matrix, symmetric
    n_pos = positives.sum(1)                                               # (B,) |P(i)| >= 1 (i is in P(i))
    l_i2t = -(positives * logits.log_softmax(dim=1)).sum(1) / n_pos        # (B,)
    l_t2i = -(positives * logits.t().log_softmax(dim=1)).sum(1) / n_pos    # (B,)
    return (l_i2t.mean() + l_t2i.mean()) / 2


# -----------------------------------------------------------------------------
# Zero-shot transfer (section 2.2 / CLIP): a class is represented by the text features of
# "{template}" filled with its name, averaged over templates and renormalised.

@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames, templates=ZEROSHOT_TEMPLATES):
    device = next(model.parameters()).device
    weights = []
    for name in classnames:
        tokens, eot = tokenize(tokenizer, [t.format(name) for t in templates], model.cfg.context_length)
        v = model.encode_text(tokens.to(device), eot.to(device))  # (n_templates, D)
        weights.append(F.normalize(v.mean(0), dim=-1))
    return torch.stack(weights)  # (C, D)


@torch.no_grad()
def encode_images(model, images, transform, batch_size=256):
    device = next(model.parameters()).device
    feats = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([transform(im) for im in images[i: i + batch_size]]).to(device)  # (b, 3, H, W)
        feats.append(model.encode_image(x).float())
    return torch.cat(feats)  # (N, D)


def retrieval_recall(image_features, text_features, image_labels, text_labels, ks=(1, 5, 10)):
    """Recall@k both ways. A retrieved item counts as correct when its label (hash of the caption)
    equals the query's: with duplicate captions ("a large red circle" twice) any of the equal
    texts, or any image captioned so, is a right answer."""
    sim = image_features @ text_features.t()                               # (N_img, N_txt)
    hit = image_labels[:, None] == text_labels[None, :]                    # (N_img, N_txt)
    out = {}
    for direction, s, h in (("i2t", sim, hit), ("t2i", sim.t(), hit.t())):
        order = s.argsort(dim=1, descending=True)                          # (N_query, N_items)
        ranked_hits = h.gather(1, order)
        for k in ks:
            out[f"{direction}_R@{k}"] = ranked_hits[:, :k].any(1).float().mean().item()
    return out


def load_unicl(path, flag="--unicl_ckpt"):
    """A train.py UniCL checkpoint -> (model in eval mode, tokenizer, its UniCLConfig): the model that names
    detector boxes (dyhead.py) and scores image-text pairs for curation (engine.py)."""
    ckpt = coswin.read_checkpoint(path, flag, "unicl")
    cfg = UniCLConfig(**ckpt["stage_config"])
    tokenizer = data.get_tokenizer(cfg.tokenizer)
    model = UniCL(cfg, tokenizer.n_vocab)
    model.load_state_dict(ckpt["model"])
    return model.eval(), tokenizer, cfg


# -----------------------------------------------------------------------------
# The stage protocol that train.py drives.

def build_vocab(cfg: UniCLConfig):
    """The stage's vocabulary: for UniCL, the text tower's tokenizer."""
    return data.get_tokenizer(cfg.tokenizer)


def build_model(cfg: UniCLConfig, tokenizer) -> UniCL:
    return UniCL(cfg, tokenizer.n_vocab)


def build_datasets(cfg: UniCLConfig, seed: int, skip_bad: bool = False):
    """-> (train dataset, val dataset) of raw samples with "image" and "caption"."""
    shapes_val = data.ShapesWorld("val", size=cfg.img_size, n=cfg.val_size, seed=seed, min_objects=1, max_objects=1,
                                  ocr_prob=0.0) if cfg.val_size else None
    if cfg.data == "shapes":
        train = data.ShapesWorld("train", size=cfg.img_size, n=cfg.train_size, seed=seed,
                                 min_objects=1, max_objects=cfg.max_objects, ocr_prob=0.0)
        return train, shapes_val
    if not cfg.data:
        raise ValueError("config field 'data' is empty: pass --data=shapes or --data=PATH(.csv/.tsv/.jsonl/.tar)")
    train = data.open_image_text(cfg.data, cfg.image_root or None, skip_bad)
    if cfg.val_data == "shapes":  # a Shapes-world pool (data.py --pool) is scored zero-shot like the toy
        return train, shapes_val
    return train, data.open_image_text(cfg.val_data, cfg.image_root or None, skip_bad) if cfg.val_data else None


def _transform(cfg, train):
    return data.ImageTransform(cfg.img_size, train=train and cfg.random_crop)


def collate(samples, tokenizer, cfg: UniCLConfig, rngs=None, progress=None):
    """Raw samples -> batch tensors. rngs: one random.Random per sample (train) or None (eval),
    so augmentation depends only on the sample, never on which rank or micro-batch holds it. progress (the
    share of training done) is unused here: florence2 switches its task mixture on it."""
    rngs = rngs or [None] * len(samples)
    train_tf = _transform(cfg, train=rngs[0] is not None)
    images = torch.stack([train_tf(s["image"], r) for s, r in zip(samples, rngs)])  # (B, 3, H, W)
    texts = [augment_text(s["caption"], cfg, r) for s, r in zip(samples, rngs)]
    tokens, eot = tokenize(tokenizer, texts, cfg.context_length)
    labels = torch.tensor([text_label(s["caption"]) for s in samples])
    return {"images": images, "tokens": tokens, "eot": eot, "labels": labels}


def compute_loss(model, batch):
    u, v, scale = model(batch["images"], batch["tokens"], batch["eot"])
    loss = unicl_loss(u, v, batch["labels"], scale)
    return loss, {"logit_scale": scale.item()}


def evaluate(model, val, tokenizer, cfg: UniCLConfig):
    """Shapes world: zero-shot top-1 over all colour-shape classes on single-object val images,
    split into compositions seen in training captions and held-out ones. Any data: retrieval
    recall@1/5/10 both ways on the val captions. train.evaluate calls it in eval mode, without gradients."""
    samples = [val[i] for i in range(len(val))]
    samples = [s for s in samples if s is not None]
    feats = encode_images(model, [s["image"] for s in samples], _transform(cfg, train=False))
    metrics = {}
    if isinstance(val, data.ShapesWorld):
        classes = data.compositions()
        weights = zeroshot_classifier(model, tokenizer, [f"{c} {s}" for c, s in classes])
        pred = (feats @ weights.t()).argmax(1).tolist()
        truth = [classes.index((s["objects"][0]["color"], s["objects"][0]["category"])) for s in samples]
        for name, keep in (("zeroshot_top1", False), ("zeroshot_top1_heldout", True)):
            idx = [i for i, t in enumerate(truth) if (classes[t] in data.HELDOUT) == keep]
            metrics[name] = sum(pred[i] == truth[i] for i in idx) / max(len(idx), 1)
        # which half of the class the model gets right: colour and shape of the prediction, all val images
        for name, part in (("zeroshot_colour", 0), ("zeroshot_shape", 1)):
            metrics[name] = sum(classes[p][part] == classes[t][part] for p, t in zip(pred, truth)) / len(truth)
    captions = [s["caption"] for s in samples]
    tokens, eot = tokenize(tokenizer, captions, cfg.context_length)
    device = feats.device
    tfeats = torch.cat([model.encode_text(tokens[i: i + 256].to(device), eot[i: i + 256].to(device)).float()
                        for i in range(0, len(captions), 256)])
    labels = torch.tensor([text_label(c) for c in captions])
    metrics.update(retrieval_recall(feats.cpu(), tfeats.cpu(), labels, labels))
    return metrics
