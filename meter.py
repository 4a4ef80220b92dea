"""METER: the vision-language adapter of Florence (Yuan et al. 2021, section 2.5 "Fine-grained V+L representation
learning").

Florence answers questions about images with METER (Dou et al. 2022, arXiv:2111.02387) whose image encoder is replaced
by CoSwin: a RoBERTa text encoder and the CoSwin image encoder each turn their input into tokens, and a stack of
co-attention layers fuses the two streams, each attending to itself and to the other. Pretrained with image-text
matching (ITM) and masked language modelling (MLM), fine-tuned on VQA (80.16 on VQAv2 test-dev in the paper). Read it
top to bottom:

  1. The text encoder: RoBERTa (a post-LN BERT encoder with learned positions), loadable from transformers' weights.
  2. The fusion: projections, modality embeddings, co-attention layers, poolers; the VQA, ITM and MLM heads.
  3. The official VQA accuracy: answer normalisation and the leave-one-out min(#humans / 3, 1).
  4. VQA data: the Shapes world's questions, the VQAv2 files, the answer vocabulary, soft targets.
  5. The stage protocol for train.py (python train.py --stage vqa, --stage vqa_pretrain; docs/design.md).
  6. The CPU toy's aid, in one place and off in the paper's config: ToyMeter, the paper's Meter plus a grounding head
     (ground_weight); the toy's strong image-position init (image_pos_std) is a config field of section 2.
"""
import collections
import json
import os
import random
import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import coswin
import data


# ----------------------------------------------------------------------------------------------------------------------
# 1. The text encoder (RoBERTa, Liu et al. 2019, arXiv:1907.11692, which keeps BERT's architecture, Devlin et al. 2019).
# A token's embedding is the sum of its word, position and token-type embeddings, then LayerNorm. Positions are learned
# and, as in fairseq's RoBERTa, count from the padding index: the first real token has position pad + 1 and padding
# tokens all sit at pad (RoBERTa's pad token id, 1). Each layer is post-LN: x = LN(x + Attn(x)), x = LN(x + FFN(x)),
# GELU inside the FFN. The attention of every query ignores padded keys.

@dataclass
class TextConfig:
    vocab_size: int = 439        # the "shapes" word tokenizer's 438 ids + the mask token
    width: int = 96
    layers: int = 2
    heads: int = 4
    ffn: int = 384
    max_positions: int = 34      # rows of the position table (RoBERTa: 514 = 512 tokens + the 2 rows below them)
    pad_token_id: int = 437      # the padding token (the "shapes" tokenizer's <|pad|>; RoBERTa: 1)
    position_pad: int = 1        # the position row of padding tokens; real ones count from the next (RoBERTa: 1)
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0         # hidden and attention dropout (RoBERTa: 0.1)


class Attention(nn.Module):
    """Multi-head attention of queries x over keys and values from `context` (= x for self-attention), with BERT's
    output projection. key_mask (B, Tk) is True where a key may be attended to."""

    def __init__(self, dim, heads, dropout=0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context, key_mask):
        B, Tq, D = x.shape
        Tk, H = context.shape[1], self.heads
        q = self.query(x).view(B, Tq, H, D // H).transpose(1, 2)        # (B, H, Tq, D/H)
        k = self.key(context).view(B, Tk, H, D // H).transpose(1, 2)    # (B, H, Tk, D/H)
        v = self.value(context).view(B, Tk, H, D // H).transpose(1, 2)  # (B, H, Tk, D/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, Tq, D))           # (B, Tq, D)


class PostNormBlock(nn.Module):
    """LN(x + dropout(sublayer)): BERT's residual around every sublayer."""

    def __init__(self, dim, eps, dropout):
        super().__init__()
        self.norm, self.drop = nn.LayerNorm(dim, eps=eps), nn.Dropout(dropout)

    def forward(self, x, branch):
        return self.norm(x + self.drop(branch))


class EncoderLayer(nn.Module):
    def __init__(self, dim, heads, ffn, eps=1e-5, dropout=0.0):
        super().__init__()
        self.attn, self.attn_norm = Attention(dim, heads, dropout), PostNormBlock(dim, eps, dropout)
        self.ffn, self.ffn_norm = coswin.Mlp(dim, ffn), PostNormBlock(dim, eps, dropout)  # exact GELU, as BERT

    def forward(self, x, mask):
        x = self.attn_norm(x, self.attn(x, x, mask))
        return self.ffn_norm(x, self.ffn(x))


class TextEncoder(nn.Module):
    """encoder(input_ids (B, T), attention_mask (B, T) of 1 = token, 0 = padding) -> last hidden states (B, T, width)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=cfg.pad_token_id)
        self.pos_embed = nn.Embedding(cfg.max_positions, cfg.width)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.width)
        self.embed_norm, self.embed_drop = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps), nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg.width, cfg.heads, cfg.ffn, cfg.layer_norm_eps, cfg.dropout)
                                    for _ in range(cfg.layers))

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.bool()
        # RoBERTa's positions: pad + 1, pad + 2, ... along the real tokens; pad on padding
        positions = torch.cumsum(mask, dim=1) * mask + self.cfg.position_pad                     # (B, T)
        if positions.max() >= self.cfg.max_positions:
            raise ValueError(f"a text of {int(mask.sum(1).max())} tokens needs more than the "
                             f"{self.cfg.max_positions} rows of the position table")
        x = self.tok_embed(input_ids) + self.pos_embed(positions) + self.type_embed(torch.zeros_like(input_ids))
        x = self.embed_drop(self.embed_norm(x))                                                   # (B, T, width)
        for layer in self.layers:
            x = layer(x, mask)
        return x


# transformers' RobertaModel names -> ours, per layer and outside the layers
_HF_LAYER = {"attention.self.query": "attn.query", "attention.self.key": "attn.key", "attention.self.value": "attn.value",
             "attention.output.dense": "attn.out", "attention.output.LayerNorm": "attn_norm.norm",
             "intermediate.dense": "ffn.fc1", "output.dense": "ffn.fc2", "output.LayerNorm": "ffn_norm.norm"}
_HF_EMBED = {"embeddings.word_embeddings": "tok_embed", "embeddings.position_embeddings": "pos_embed",
             "embeddings.token_type_embeddings": "type_embed", "embeddings.LayerNorm": "embed_norm"}


def text_config_from_hf(config: dict) -> TextConfig:
    """A transformers RobertaConfig.to_dict() -> TextConfig."""
    if config.get("hidden_act", "gelu") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"only hidden_act 'gelu' and absolute positions are supported, got "
                         f"{config.get('hidden_act')!r} / {config.get('position_embedding_type')!r}")
    return TextConfig(vocab_size=config["vocab_size"], width=config["hidden_size"], layers=config["num_hidden_layers"],
                      heads=config["num_attention_heads"], ffn=config["intermediate_size"],
                      max_positions=config["max_position_embeddings"], pad_token_id=config["pad_token_id"],
                      position_pad=config["pad_token_id"],
                      type_vocab_size=config["type_vocab_size"], layer_norm_eps=config["layer_norm_eps"],
                      dropout=config.get("hidden_dropout_prob", 0.1))


def hf_text_state_dict(state_dict: dict, encoder: TextEncoder) -> dict:
    """A RobertaModel state dict -> TextEncoder names. The pooler (pooler.*) and position_ids buffers are not part of
    the encoder and are dropped; any other name without a place, and any weight the encoder lacks, is an error."""
    ours, unexpected = {}, []
    for name, value in state_dict.items():
        name = name.removeprefix("roberta.")
        if name.startswith("pooler.") or name.endswith("position_ids"):
            continue
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name)
        e = re.fullmatch(r"(embeddings\.\w+)\.(weight|bias)", name)
        if m and m.group(2) in _HF_LAYER:
            ours[f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}.{m.group(3)}"] = value
        elif e and e.group(1) in _HF_EMBED:
            ours[f"{_HF_EMBED[e.group(1)]}.{e.group(2)}"] = value
        else:
            unexpected.append(name)
    own = encoder.state_dict()
    unexpected += [f"{k} (maps to no weight)" for k in ours if k not in own]
    missing = [k for k in own if k not in ours]
    if unexpected or missing:
        raise ValueError(f"RoBERTa state dict does not fit the text encoder: unexpected {unexpected[:5]}, "
                         f"missing {missing[:5]}")
    return ours


def text_encoder_from_hf(config: dict, state_dict: dict) -> TextEncoder:
    """Our text encoder with the weights of a transformers RobertaModel (config = RobertaConfig.to_dict())."""
    encoder = TextEncoder(text_config_from_hf(config))
    encoder.load_state_dict(hf_text_state_dict(state_dict, encoder))
    return encoder


def load_roberta_folder(folder) -> tuple[TextConfig, dict]:
    """A transformers RoBERTa folder (config.json + model.safetensors or pytorch_model.bin) -> (config, our weights)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--roberta {folder!r}: no config.json there")
    with open(path) as f:
        cfg = text_config_from_hf(json.load(f))
    return cfg, hf_text_state_dict(data.read_weights_folder(folder), TextEncoder(cfg))


# ----------------------------------------------------------------------------------------------------------------------
# 2. The fusion (METER section 3.1, "co-attention"; Florence section 2.5). Text tokens (the text encoder's last layer)
# and image tokens (CoSwin's last feature map, flattened) are each projected to the fusion width, and a modality
# embedding (token type 0 = text, 1 = image) is added. Then each layer updates both streams in parallel from the
# previous layer's outputs: the text stream attends to itself, then to the image tokens, then an FFN, and the image
# stream the same with the roles swapped (BERT's cross-attention layer, post-LN). The text stream is pooled at its first
# token and the image stream by averaging its tokens (METER's Swin towers have no class token), each through
# Linear + tanh, and the two are concatenated: the (B, 2d) representation every head reads.

@dataclass
class FusionConfig:
    width: int = 128
    layers: int = 2
    heads: int = 4
    ffn: int = 512
    dropout: float = 0.0         # METER: 0.1


class CoAttentionLayer(nn.Module):
    def __init__(self, cfg: FusionConfig):
        super().__init__()
        d, eps = cfg.width, 1e-12  # METER's BertConfig eps
        self.self_attn, self.self_norm = Attention(d, cfg.heads, cfg.dropout), PostNormBlock(d, eps, cfg.dropout)
        self.cross_attn, self.cross_norm = Attention(d, cfg.heads, cfg.dropout), PostNormBlock(d, eps, cfg.dropout)
        self.ffn, self.ffn_norm = coswin.Mlp(d, cfg.ffn), PostNormBlock(d, eps, cfg.dropout)

    def forward(self, x, x_mask, other, other_mask):
        x = self.self_norm(x, self.self_attn(x, x, x_mask))
        x = self.cross_norm(x, self.cross_attn(x, other, other_mask))
        return self.ffn_norm(x, self.ffn(x))


class Pooler(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x):  # (B, d) -> (B, d)
        return torch.tanh(self.dense(x))


@dataclass
class MeterConfig:
    task: str = "vqa"            # "vqa" (fine-tuning) or "pretrain" (ITM + MLM); set by train.py's --stage
    image_encoder: str = "toy"   # a coswin.CONFIGS name
    image_stages: int = 0        # CoSwin stages used (0 = all); the image tokens are the last one's map
    image_positions: int = 0     # side of a grid of learned image-token positions (0 = none, as METER's Swin towers)
    image_pos_std: float = 0.02  # their initial std (BERT's init)
    img_size: int = 64
    text: TextConfig = None
    fusion: FusionConfig = None
    tokenizer: str = "shapes"    # a data.get_tokenizer name: one token per word of the Shapes world, as BPE would give
    context_length: int = 32     # text tokens, begin and end included; longer questions are truncated (and counted)
    init_from: str = ""          # a train.py checkpoint: UniCL (its image tower) or vqa_pretrain (all but the heads);
                                 # "" or "none": none
    freeze_stem: bool = True     # with init_from: the toy tower's conv stem is not fine-tuned (see build_model)
    roberta: str = ""            # a transformers RoBERTa folder for the text encoder (its tokenizer is not included)
    # learning rates relative to the fusion's (train.py's --lr): METER fine-tunes its pretrained encoders at 1/5 of it
    # and its VQA head at 10x (METER's VQA config: 5e-6, x5 cross-modal, x50 head)
    image_lr_mult: float = 1.0
    text_lr_mult: float = 1.0
    head_lr_mult: float = 1.0
    ground_weight: float = 0.0   # the toy's grounding aid (section 6; 0 = off, as in the paper's config)
    # data: "shapes" (the built-in world) or VQAv2 files (vqa: questions .json; pretrain: an image-text file)
    data: str = "shapes"
    annotations: str = ""        # VQAv2 annotations .json of the training questions
    val_data: str = ""
    val_annotations: str = ""
    image_root: str = ""         # VQAv2: folder of the training images (COCO_*_<12-digit image id>.jpg)
    val_image_root: str = ""
    min_answer_count: int = 9    # VQAv2: answers seen fewer times in training are left out of the vocabulary
    train_size: int = 50000      # Shapes world: distinct training images
    val_size: int = 2000         # Shapes world: val questions (one per val image); 0 = no eval
    max_objects: int = 3
    mlm_prob: float = 0.15       # pretraining: the share of caption words masked (whole words, see mask_tokens)
    eval_batch_size: int = 100

    def __post_init__(self):  # a checkpoint's stage_config holds the nested configs as dicts
        self.text = TextConfig(**self.text) if isinstance(self.text, dict) else (self.text or TextConfig())
        self.fusion = FusionConfig(**self.fusion) if isinstance(self.fusion, dict) else (self.fusion or FusionConfig())

    @property
    def init_path(self) -> str:
        """The checkpoint init_from names, "" for none."""
        return "" if self.init_from.lower() in ("", "none") else self.init_from


class Meter(nn.Module):
    """(images (B, 3, S, S), input_ids (B, T), attention_mask (B, T)) -> a dict of head outputs: "vqa" (B, answers)
    logits when fine-tuning; "itm" (B, 2) and "mlm" (n, vocab) logits at the masked tokens (mlm_labels != -100) when
    pretraining."""

    def __init__(self, cfg: MeterConfig, num_answers: int = 0):
        super().__init__()
        if cfg.image_encoder not in coswin.CONFIGS:
            raise ValueError(f"unknown image_encoder {cfg.image_encoder!r}; valid: {', '.join(coswin.CONFIGS)}")
        if cfg.task not in ("vqa", "pretrain"):
            raise ValueError(f"unknown task {cfg.task!r}: 'vqa' or 'pretrain'")
        icfg = coswin.CONFIGS[cfg.image_encoder]
        n = cfg.image_stages or len(icfg.depths)
        self.cfg = cfg
        self.image_encoder = coswin.CoSwin(replace(icfg, depths=icfg.depths[:n], num_heads=icfg.num_heads[:n],
                                                   num_classes=0))
        self.text_encoder = TextEncoder(cfg.text)
        d = cfg.fusion.width
        self.image_proj = nn.Linear(self.image_encoder.num_features, d)
        self.text_proj = nn.Linear(cfg.text.width, d)
        self.modality_embed = nn.Embedding(2, d)
        self.image_pos = nn.Parameter(torch.zeros(1, d, cfg.image_positions, cfg.image_positions)) \
            if cfg.image_positions else None
        self.text_layers = nn.ModuleList(CoAttentionLayer(cfg.fusion) for _ in range(cfg.fusion.layers))
        self.image_layers = nn.ModuleList(CoAttentionLayer(cfg.fusion) for _ in range(cfg.fusion.layers))
        self.text_pooler, self.image_pooler = Pooler(d), Pooler(d)
        if cfg.task == "vqa":  # METER's VQA head
            self.vqa_head = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(),
                                          nn.Linear(2 * d, num_answers))
        else:  # ITM on the pooled pair; MLM on the fused text tokens (BERT's prediction head)
            self.itm_head = nn.Linear(2 * d, 2)
            self.mlm_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d, eps=1e-12),
                                          nn.Linear(d, cfg.text.vocab_size))
        fresh = [m for name, m in self.named_children() if name not in ("image_encoder",)]
        for module in fresh:
            module.apply(coswin.bert_init)  # BERT's init; CoSwin keeps its own
        if self.image_pos is not None:
            nn.init.normal_(self.image_pos, std=cfg.image_pos_std)

    def fuse(self, images, input_ids, attention_mask):
        """-> (fused text tokens (B, T, d), fused image tokens (B, N, d), pooled pair (B, 2d), [the text tokens after
        each co-attention layer (B, T, d)], the last of which is the first output)."""
        fmap = self.image_encoder.forward_features(images)[-1]                    # (B, C, h, w)
        y = self.image_proj(fmap.flatten(2).transpose(1, 2))                      # (B, N = h*w, d)
        if self.image_pos is not None:  # the learned grid, resized to this map
            pos = F.interpolate(self.image_pos, size=fmap.shape[-2:], mode="bilinear", align_corners=False)
            y = y + pos.flatten(2).transpose(1, 2)                                # (1, N, d)
        x = self.text_proj(self.text_encoder(input_ids, attention_mask))          # (B, T, d)
        x = x + self.modality_embed.weight[0]
        y = y + self.modality_embed.weight[1]
        x_mask = attention_mask.bool()
        y_mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
        texts = []
        for text_layer, image_layer in zip(self.text_layers, self.image_layers):
            x, y = text_layer(x, x_mask, y, y_mask), image_layer(y, y_mask, x, x_mask)  # both from the last layer
            texts.append(x)
        pooled = torch.cat([self.text_pooler(x[:, 0]), self.image_pooler(y.mean(1))], dim=-1)  # (B, 2d)
        return x, y, pooled, texts

    def forward(self, images, input_ids, attention_mask, mlm_labels=None):
        x, _, pooled, _ = self.fuse(images, input_ids, attention_mask)
        return self.head_outputs(x, pooled, mlm_labels)

    def head_outputs(self, x, pooled, mlm_labels=None):
        """The task's heads on the fused text tokens x (B, T, d) and the pooled pair (B, 2d)."""
        if self.cfg.task == "vqa":
            return {"vqa": self.vqa_head(pooled)}
        out = {"itm": self.itm_head(pooled)}
        if mlm_labels is not None:
            out["mlm"] = self.mlm_head(x[mlm_labels != -100])                     # (n masked, vocab)
        return out

    def lr_mults(self):
        """{parameter name prefix: learning-rate multiplier}, read by train.make_optimizer."""
        return {"image_encoder.": self.cfg.image_lr_mult, "text_encoder.": self.cfg.text_lr_mult,
                "vqa_head.": self.cfg.head_lr_mult}

    def set_grad_checkpointing(self, enable=True):
        self.image_encoder.set_grad_checkpointing(enable)

    def freeze(self, module):
        """Fine-tune without `module`, a pretrained part: no gradients, and its BatchNorms keep their statistics."""
        module.requires_grad_(False)
        self.frozen = [*getattr(self, "frozen", []), module]
        module.eval()

    def train(self, mode=True):
        super().train(mode)
        for module in getattr(self, "frozen", []):
            module.eval()
        return self


def count_parameters(cfg: MeterConfig, num_answers: int) -> int:
    """Parameters of Meter(cfg), counted on the meta device (instant even for the paper's size)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Meter(cfg, num_answers).parameters())


# ----------------------------------------------------------------------------------------------------------------------
# 3. The official VQA accuracy (Antol et al. 2015; the VQA challenge's evaluation, GT-Vision-Lab/VQA
# PythonEvaluationTools/vqaEvaluation/vqaEval.py). A question has (usually ten) human answers; a prediction scores
# min(#humans who gave it / 3, 1), averaged over the ten subsets of nine humans. Answers are normalised (punctuation,
# number words, articles, contractions) only when the humans disagree, as the official code does.

# the official tables, reproduced as data (vqaEval.py, VQAEval.__init__)
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# no "'" (so "don't" survives) and no ":" or "."; periods have their own rule below
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

# The official code compiles these under Python 2 without re.UNICODE, so \d there is [0-9] only.
# "(?!<=\d)" is a lookahead (a typo for a lookbehind): in effect "a period not followed by a digit".
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)", re.ASCII)


def _process_punctuation(text: str) -> str:
    # a mark next to a space, or any digit comma like "1,000", is deleted; otherwise it becomes a space
    # (the test reads the original text, not the text as it is being rewritten)
    delete_all = COMMA_STRIP.search(text) is not None
    out = text
    for p in PUNCTUATION:
        out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
    # the official call passes re.UNICODE (= 32) in sub's *count* slot: at most 32 periods go
    return PERIOD_STRIP.sub("", out, count=32)


def _process_digit_article(text: str) -> str:
    # lower-case, number words to digits, drop articles, then restore apostrophes ("dont" -> "don't")
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official answer processing: processPunctuation, then processDigitArticle."""
    return _process_digit_article(_process_punctuation(answer))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official per-question accuracy: mean over annotators i of min(1, #{j != i: answer_j == pred} / 3)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one annotator answer, got an empty list")
    pred, gts = _clean(prediction), [_clean(a) for a in answers]
    # official quirk: only when the annotators disagree are answers and prediction normalised, so
    # "Yes." against ten "yes" scores 0
    if len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    # leave-one-out by position (the official compares answer dicts, made distinct by answer_id);
    # summed in annotator order so the float matches bit for bit (0.6 vs 0.5999999999999999)
    accs = [min(1, sum(a == pred for j, a in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return float(sum(accs)) / len(accs)


# ----------------------------------------------------------------------------------------------------------------------
# 4. VQA data. A raw VQA sample is {"image": PIL image, "questions": [{"question", "answers" (human answers), "type",
# "question_id"}], "heldout": bool or None}: a training image of the Shapes world carries all its questions and
# collate draws one per step; a val sample and a VQAv2 row carry one. The answer vocabulary holds the answers a
# classifier can give; the target of a question is, for each vocabulary answer, the score the official accuracy
# would give it (0, 0.3, 0.6, 0.9, 1 for 0, 1, 2, 3, 4+ of ten humans): METER's soft targets.

QUESTION_TYPES = ("count", "color", "shape", "size", "exist", "position")


def shapes_answers(max_objects: int) -> list[str]:
    """Every answer the Shapes world's questions can have (counts up to max_objects, colours, shapes, sizes, yes/no):
    the vocabulary of the built-in world, which every training answer falls in."""
    return [str(n) for n in range(max_objects + 1)] + list(data.COLORS) + list(data.SHAPES) + list(data.SIZES) + \
        ["yes", "no"]


def pick_question(questions, rng: random.Random):
    """One question, its type drawn uniformly among the types the image has, so that rare types (position) are asked
    as often as common ones (count)."""
    by_type = collections.defaultdict(list)
    for q in questions:
        by_type[q["type"]].append(q)
    return rng.choice(by_type[rng.choice(sorted(by_type))])


class ShapesVQA:
    """The Shapes world as VQA samples. Train: every question of image i (one answer, counted as ten identical human
    answers). Val: one question per image, picked by a generator seeded with the image index."""

    def __init__(self, split, size, n, seed=0, max_objects=3):
        self.world = data.ShapesWorld(split, size=size, n=n, seed=seed, max_objects=max_objects, ocr_prob=0.0)
        self.split = split

    def __len__(self):
        return len(self.world)

    def __getitem__(self, index):
        s = self.world[index]
        questions = [{"question": q["question"], "answers": [q["answer"]] * 10, "type": q["type"],
                      "question_id": f"{self.split}/{index}/{k}"} for k, q in enumerate(s["qa"])]
        if self.split != "train":
            questions = [pick_question(questions, random.Random(f"vqa/{self.split}/{index}"))]
        heldout = any((o["color"], o["category"]) in data.HELDOUT for o in s["objects"])
        return {"image": s["image"], "questions": questions, "heldout": heldout, "objects": s["objects"]}


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise data.DataError(f"{path}: no such file ({what})") from None
    except json.JSONDecodeError as e:
        raise data.DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


class VQAv2:
    """The VQAv2 files as VQA samples, one per question: questions .json ({"questions": [{"image_id", "question",
    "question_id"}]}), annotations .json ({"annotations": [{"question_id", "answers": [{"answer"}], "answer_type"}]}),
    and a folder of COCO images whose names end in the 12-digit image id. A question without annotations, or an
    annotation without answers, names the file and the question id; with skip_bad they are skipped and counted."""

    def __init__(self, questions_path, annotations_path, image_root, skip_bad=False):
        if not annotations_path:
            raise ValueError(f"VQAv2 questions {questions_path!r} need their annotations file (--annotations= / "
                             f"--val_annotations=)")
        self.root = image_root or os.path.dirname(os.path.abspath(questions_path))
        questions = _read_json(questions_path, "VQAv2 questions").get("questions")
        annotations = _read_json(annotations_path, "VQAv2 annotations").get("annotations")
        if not isinstance(questions, list) or not isinstance(annotations, list):
            raise data.DataError(f"{questions_path} / {annotations_path}: expected a 'questions' list and an "
                                 f"'annotations' list")
        by_id = {a.get("question_id"): a for a in annotations}
        self.rows, self.skipped = [], []
        for i, q in enumerate(questions):
            where = f"{questions_path}: question {i} (question_id {q.get('question_id')})"
            try:
                missing = [k for k in ("image_id", "question", "question_id") if k not in q]
                if missing:
                    raise data.DataError(f"{where}: missing field {missing[0]!r}")
                ann = by_id.get(q["question_id"])
                if ann is None:
                    raise data.DataError(f"{where}: no annotation with this question_id in {annotations_path}")
                answers = [a.get("answer") for a in ann.get("answers") or []]
                if not answers or not all(isinstance(a, str) for a in answers):
                    raise data.DataError(f"{annotations_path}: question_id {q['question_id']}: field 'answers' "
                                         f"must be a non-empty list of {{'answer': text}}")
            except data.DataError:
                if not skip_bad:
                    raise
                self.skipped.append(q.get("question_id"))
                continue
            self.rows.append({"image_id": q["image_id"], "question": q["question"], "answers": answers,
                              "type": ann.get("answer_type", "other"), "question_id": q["question_id"]})
        self._files = None

    def __len__(self):
        return len(self.rows)

    def image_path(self, image_id):
        if self._files is None:  # the folder's images by the id at the end of their name, listed once
            names = os.listdir(self.root) if os.path.isdir(self.root) else []
            self._files = {int(m.group(1)): n for n in names if (m := re.search(r"(\d+)\.\w+$", n))}
        if image_id not in self._files:
            raise data.DataError(f"{self.root}: no image file for image_id {image_id}")
        return os.path.join(self.root, self._files[image_id])

    def __getitem__(self, index):
        row = self.rows[index]
        where = f"question_id {row['question_id']}"
        try:
            path = self.image_path(row["image_id"])
        except data.DataError as e:
            raise data.DataError(f"{where}: {e}") from None
        image = data.load_image(path, where)
        return {"image": image, "questions": [dict(row)], "heldout": None}


def vqav2_answers(dataset: VQAv2, min_count: int) -> list[str]:
    """The answer vocabulary of VQAv2 training questions: every normalised human answer given at least min_count
    times (METER's 3,129 answers come from the same rule with min_count 9), most frequent first."""
    counts = collections.Counter(normalize_answer(a) for row in dataset.rows for a in row["answers"])
    return [a for a, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]


def soft_targets(answers: list[str], vocab_index: dict) -> torch.Tensor:
    """(len(vocab),) the official accuracy of each vocabulary answer against these human answers (0 elsewhere)."""
    target = torch.zeros(len(vocab_index))
    for answer in set(answers):
        key = normalize_answer(answer)
        if key in vocab_index:
            target[vocab_index[key]] = vqa_accuracy(key, answers)
    return target


# ----------------------------------------------------------------------------------------------------------------------
# 5. The stage that `python train.py --stage vqa` (fine-tuning) and `--stage vqa_pretrain` (ITM + MLM) drive.

TOY_TEXT = TextConfig()
TOY_TOWER = "out_u/ckpt.pt"  # the README's UniCL toy run
TOY_FUSION = FusionConfig()
ROBERTA_BASE = TextConfig(vocab_size=50265, width=768, layers=12, heads=12, ffn=3072, max_positions=514, pad_token_id=1,
                          position_pad=1, type_vocab_size=1, layer_norm_eps=1e-5, dropout=0.1)
CONFIGS = {
    # CPU toy at 64 px: the first two stages of the UniCL toy's CoSwin (8 x 8, then 4 x 4 tokens of 96 channels) with
    # learned positions on the 16 image tokens, initialised strong (std 0.5: ~60% of a projected token's norm, so that
    # cells differ from the first step, as a pretrained ViT's positions do); a 2-layer word-level text encoder of width
    # 96; 2 co-attention layers of width 128 per modality; the grounding aid of section 6. The image tower starts from
    # the UniCL toy's (README: `python train.py --max_iters=2400 --out_dir=out_u`); from random weights the toy
    # reaches VQA accuracy ~0.55, not ~0.93 (docs/vqa-toy.md)
    "toy": MeterConfig(image_stages=2, image_positions=4, image_pos_std=0.5, text=TOY_TEXT, fusion=TOY_FUSION,
                       init_from=TOY_TOWER, ground_weight=1.0),
    # the paper's: CoSwin-H, RoBERTa-base, 6 co-attention layers of width 768 (Florence section 2.5; METER section 4)
    "florence": MeterConfig(image_encoder="H", img_size=384, text=ROBERTA_BASE, tokenizer="bytes", context_length=40,
                            fusion=FusionConfig(width=768, layers=6, heads=12, ffn=3072, dropout=0.1),
                            image_lr_mult=0.2, text_lr_mult=0.2, head_lr_mult=10.0,
                            data="", train_size=0, val_size=0),
}
PAPER_ANSWERS = 3129  # METER's VQAv2 answer vocabulary

TRAIN = {
    "toy": dict(batch_size=64, max_iters=5000, lr=1e-3, warmup_iters=100, weight_decay=0.01, log_interval=50,
                ckpt_interval=250),
    "florence": dict(batch_size=512, max_iters=10000, lr=2.5e-5, warmup_iters=1000, weight_decay=0.01),  # METER's VQA
}


class Vocab:
    """What build_vocab gives: the text tokenizer (with a mask token for MLM) and the answer vocabulary."""

    def __init__(self, text: data.Tokenizer, answers: list[str]):
        self.text, self.answers = text, list(answers)
        self.answer_index = {a: i for i, a in enumerate(self.answers)}
        self.mask_id = text.token_id("<|mask|>")
        self._pieces = {}

    def piece(self, token_id) -> str:
        """The text of one token ("" for special tokens)."""
        if token_id not in self._pieces:
            self._pieces[token_id] = self.text.decode([token_id])
        return self._pieces[token_id]


_VQAV2_CACHE = {}


def _vqav2(path, annotations, root, skip_bad=False):
    key = (path, annotations, root, skip_bad)
    if key not in _VQAV2_CACHE:  # build_vocab (the answers) and build_datasets read the same files
        _VQAV2_CACHE[key] = VQAv2(path, annotations, root, skip_bad)
    return _VQAV2_CACHE[key]


def build_vocab(cfg: MeterConfig) -> Vocab:
    text = data.get_tokenizer(cfg.tokenizer).add_special_tokens(["<|mask|>"])
    if text.n_vocab > cfg.text.vocab_size:
        raise ValueError(f"tokenizer {cfg.tokenizer!r} has {text.n_vocab} ids, the text encoder's table "
                         f"{cfg.text.vocab_size}")
    if cfg.data == "shapes" or cfg.task == "pretrain":
        return Vocab(text, shapes_answers(cfg.max_objects))
    return Vocab(text, vqav2_answers(_vqav2(cfg.data, cfg.annotations, cfg.image_root, True), cfg.min_answer_count))


def build_model(cfg: MeterConfig, vocab: Vocab) -> Meter:
    """The paper's Meter, or ToyMeter (section 6) when the grounding aid is on: on the Shapes world's VQA only, whose
    objects give its targets."""
    init_from = cfg.init_path
    if init_from and cfg.image_encoder == "toy" and not os.path.isfile(init_from):  # say so before any training
        raise FileNotFoundError(
            f"--init_from {init_from!r}: no such file. The toy starts from the UniCL toy's image tower: make it first "
            f"with `python train.py --max_iters=2400 --out_dir=out_u` (7-13 min on 2 cores), or pass --init_from=none "
            f"to train the tower from random weights (VQA accuracy ~0.55 instead of ~0.93).")
    toy = cfg.ground_weight > 0 and cfg.task == "vqa" and cfg.data == "shapes"
    model = (ToyMeter if toy else Meter)(cfg, len(vocab.answers))
    if cfg.roberta:
        _, weights = load_roberta_folder(cfg.roberta)
        model.text_encoder.load_state_dict(weights)
    if init_from:
        load_init(model, init_from, cfg)
        # A CPU-toy aid (the paper's CoSwin has no stem): the toy tower's conv stem, which sees the full 64 px image,
        # costs about half of a training step (its backward most); pretrained on this world, it is kept as it is.
        if cfg.freeze_stem and coswin.CONFIGS[cfg.image_encoder].stem:
            model.freeze(model.image_encoder.stages[0].embed)
    return model


def load_init(model: Meter, path, cfg: MeterConfig):
    """--init_from: a UniCL checkpoint gives the image tower; a vqa_pretrain checkpoint gives everything but the heads."""
    ckpt = coswin.read_checkpoint(path, "--init_from", ("unicl", "vqa_pretrain"))
    if ckpt["train_config"]["stage"] == "unicl":
        coswin.load_unicl_tower(model.image_encoder, path, cfg.image_encoder)
        return
    heads = ("itm_head.", "mlm_head.", "vqa_head.", "ground_aid.")
    body = {k: v for k, v in ckpt["model"].items() if not k.startswith(heads)}
    missing = [k for k in model.state_dict() if k not in body and not k.startswith(heads)]
    if missing:
        raise ValueError(f"--init_from {path!r} does not fit this model: missing {missing[:5]}")
    model.load_state_dict(body, strict=False)


def build_datasets(cfg: MeterConfig, seed: int, skip_bad: bool = False):
    """-> (train, val or None) of raw VQA samples (vqa) or image-text samples (pretrain)."""
    if cfg.data == "shapes":
        world = dict(size=cfg.img_size, seed=seed, max_objects=cfg.max_objects)
        if cfg.task == "pretrain":
            kw = dict(world, ocr_prob=0.0)
            return (data.ShapesWorld("train", n=cfg.train_size, **kw),
                    data.ShapesWorld("val", n=cfg.val_size, **kw) if cfg.val_size else None)
        return (ShapesVQA("train", n=cfg.train_size, **world),
                ShapesVQA("val", n=cfg.val_size, **world) if cfg.val_size else None)
    if not cfg.data:
        raise ValueError("config field 'data' is empty: pass --data=shapes or a file")
    if cfg.task == "pretrain":
        return (data.open_image_text(cfg.data, cfg.image_root or None, skip_bad),
                data.open_image_text(cfg.val_data, cfg.val_image_root or None, skip_bad) if cfg.val_data else None)
    train = _vqav2(cfg.data, cfg.annotations, cfg.image_root, skip_bad)
    val = VQAv2(cfg.val_data, cfg.val_annotations, cfg.val_image_root, skip_bad) if cfg.val_data else None
    for ds, name in ((train, cfg.data), (val, cfg.val_data)):
        if ds is not None and ds.skipped:
            print(f"{name}: skipped {len(ds.skipped)} questions without usable annotations")
    return train, val


def encode_texts(texts, vocab: Vocab, cfg: MeterConfig):
    """-> (input_ids (B, T) right-padded, attention_mask (B, T), number of texts truncated to context_length)."""
    ids = [vocab.text.encode(t, bos=True, eos=True) for t in texts]
    truncated = sum(len(i) > cfg.context_length for i in ids)
    ids = [i if len(i) <= cfg.context_length else i[:cfg.context_length - 1] + i[-1:] for i in ids]  # keep the end
    T = max(map(len, ids))
    input_ids = torch.full((len(ids), T), vocab.text.pad_id)
    mask = torch.zeros(len(ids), T, dtype=torch.long)
    for b, i in enumerate(ids):
        input_ids[b, :len(i)], mask[b, :len(i)] = torch.tensor(i), 1
    return input_ids, mask, truncated


def preprocess(image, size):
    """RGB, resized to size x size (bilinear; no flips or crops, which would change the answers of position
    questions), normalised as the UniCL towers were trained -> (3, size, size)."""
    return data.to_tensor(data.to_rgb(image).resize((size, size)), data.CLIP_MEAN, data.CLIP_STD)


def word_spans(ids, vocab: Vocab):
    """[[positions of one word's tokens], ...] of one text: a token continues a word when it starts with a letter or
    digit and the token before it ends with one (bytes of one word; a BPE piece without a leading space)."""
    spans, prev = [], ""
    for t, i in enumerate(ids):
        piece = vocab.piece(i)
        if piece[:1].isalnum() and prev[-1:].isalnum() and spans:
            spans[-1].append(t)
        elif piece.strip():
            spans.append([t])
        prev = piece
    return spans


def mask_tokens(input_ids, attention_mask, vocab: Vocab, prob, rngs):
    """BERT's masking (section 3.1) over whole words (BERT's whole-word-masking variant): each word is picked with
    probability prob and all its tokens are predicted; a picked token becomes the mask token 80% of the time, a
    random token 10%, itself 10%. Over bytes, masking single tokens would let the model read a word off its other
    letters ("r[MASK]d"); a whole masked word ("a large [MASK]x3 circle") can only be read off the image. Row b
    draws from rngs[b], so a sample is masked the same way whichever batch or process holds it.
    -> (masked ids, labels: the original id where picked, -100 elsewhere)."""
    ids, labels = input_ids.clone(), torch.full_like(input_ids, -100)
    normal = vocab.text.n_vocab - len(vocab.text.special_tokens)  # ordinary ids come first
    for b, rng in enumerate(rngs):
        n = int(attention_mask[b].sum())
        for span in word_spans(ids[b, :n].tolist(), vocab):
            if rng.random() >= prob:
                continue
            for t in span:
                labels[b, t] = ids[b, t]
                roll = rng.random()
                ids[b, t] = vocab.mask_id if roll < 0.8 else (rng.randrange(normal) if roll < 0.9 else ids[b, t])
    return ids, labels


def collate(samples, vocab: Vocab, cfg: MeterConfig, rngs=None, progress=None):
    rngs = rngs or [random.Random(i) for i in range(len(samples))]
    images = torch.stack([preprocess(s["image"], cfg.img_size) for s in samples])            # (B, 3, S, S)
    if cfg.task == "pretrain":
        return collate_pretrain(samples, images, vocab, cfg, rngs)
    questions = [pick_question(s["questions"], rng) for s, rng in zip(samples, rngs)]
    input_ids, mask, _ = encode_texts([q["question"] for q in questions], vocab, cfg)
    targets = torch.stack([soft_targets(q["answers"], vocab.answer_index) for q in questions])  # (B, answers)
    batch = {"images": images, "input_ids": input_ids, "attention_mask": mask, "targets": targets}
    if cfg.ground_weight > 0 and all("objects" in s for s in samples):  # ToyMeter's grounding aid (section 6)
        batch["ground_cells"] = ground_targets(questions, samples, input_ids.shape[1], vocab, cfg.image_positions)
        batch["ground_weight"] = torch.tensor(float(cfg.ground_weight))
    return batch


def collate_pretrain(samples, images, vocab, cfg, rngs):
    """ITM + MLM in one forward pass. Samples are paired (0, 1), (2, 3), ...; half of the pairs swap their images, so
    both become mismatched (ITM label 0), the rest stay matched. The captions are masked for MLM, whose loss is taken
    on the matched pairs only. (METER runs ITM and MLM as two passes, unmasked captions for ITM, and draws a
    mismatched image from the whole batch; one pass halves the toy's cost, and pairs keep every choice a function of
    the sample, so two processes holding half a batch each make the same pairs as one process, given even shares.)"""
    B = len(samples)
    captions = [s["caption"] for s in samples]
    input_ids, mask, _ = encode_texts(captions, vocab, cfg)
    input_ids, mlm_labels = mask_tokens(input_ids, mask, vocab, cfg.mlm_prob, rngs)
    order, matched = torch.arange(B), torch.ones(B, dtype=torch.bool)
    for k in range(0, B - 1, 2):
        if rngs[k].random() < 0.5 and captions[k] != captions[k + 1]:  # the same caption would be no mismatch
            order[k], order[k + 1] = k + 1, k
            matched[k] = matched[k + 1] = False
    mlm_labels[~matched] = -100
    return {"images": images[order], "input_ids": input_ids, "attention_mask": mask, "itm_labels": matched.long(),
            "mlm_labels": mlm_labels}


def compute_loss(model, batch):
    if "targets" in batch:  # VQA: binary cross entropy against the soft scores, summed over answers (METER)
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        loss = F.binary_cross_entropy_with_logits(out["vqa"].float(), batch["targets"]) * batch["targets"].shape[1]
        if "ground" in out and "ground_cells" in batch:  # ToyMeter's grounding aid (section 6)
            ground = ground_loss(out["ground"], batch["ground_cells"])
            return loss + batch["ground_weight"] * ground, {"vqa_bce": loss.item(), "ground": ground.item()}
        return loss, {"vqa_bce": loss.item()}
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["mlm_labels"])
    itm = F.cross_entropy(out["itm"].float(), batch["itm_labels"])
    labels = batch["mlm_labels"][batch["mlm_labels"] != -100]
    # the mean over every process's masked tokens: each process holds a different number of them
    count = coswin.per_process_share(torch.tensor(float(labels.numel()), device=labels.device)).clamp(min=1.0)
    mlm = F.cross_entropy(out["mlm"].float(), labels, reduction="sum") / count
    return itm + mlm, {"itm": itm.item(), "mlm": mlm.item()}


@torch.no_grad()
def answer(model, vocab: Vocab, cfg: MeterConfig, images, questions, batch_size=100):
    """PIL images and question texts -> the predicted answers (the highest-scoring vocabulary answer)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        pixels = torch.stack([preprocess(im, cfg.img_size) for im in images[i:i + batch_size]]).to(device)
        input_ids, mask, _ = encode_texts(questions[i:i + batch_size], vocab, cfg)
        logits = model(pixels, input_ids.to(device), mask.to(device))["vqa"]
        out += [vocab.answers[k] for k in logits.argmax(-1).tolist()]
    return out


def evaluate(model, val, vocab: Vocab, cfg: MeterConfig):
    return evaluate_vqa(model, val, vocab, cfg) if cfg.task == "vqa" else evaluate_pretrain(model, val, vocab, cfg)


def evaluate_vqa(model, val, vocab, cfg):
    """VQA accuracy (the official score) over the val questions, per question type, and apart for images with and
    without a held-out colour-shape pair; plus how many questions were truncated and how many had no answer in the
    vocabulary (they can score only 0)."""
    samples = [s for s in (val[i] for i in range(len(val))) if s is not None]
    rows = [(s, q) for s in samples for q in s["questions"]]
    predictions = answer(model, vocab, cfg, [s["image"] for s, _ in rows], [q["question"] for _, q in rows],
                         cfg.eval_batch_size)
    scores = [vqa_accuracy(p, q["answers"]) for p, (_, q) in zip(predictions, rows)]
    groups = collections.defaultdict(list)
    for score, (s, q) in zip(scores, rows):
        groups[f"acc_{q['type']}"].append(score)
        if s["heldout"] is not None:
            groups["acc_heldout" if s["heldout"] else "acc_seen"].append(score)
    metrics = {"vqa_acc": sum(scores) / len(scores)}
    metrics.update({k: sum(v) / len(v) for k, v in sorted(groups.items())})
    metrics["truncated"] = float(encode_texts([q["question"] for _, q in rows], vocab, cfg)[2])
    metrics["out_of_vocab"] = float(sum(not any(normalize_answer(a) in vocab.answer_index for a in q["answers"])
                                        for _, q in rows))
    return metrics


def evaluate_pretrain(model, val, vocab, cfg):
    """ITM accuracy (half of the pairs mismatched) and MLM accuracy of the masked tokens on the val captions."""
    samples = [s for s in (val[i] for i in range(len(val))) if s is not None]
    device = next(model.parameters()).device
    itm_right = itm_n = mlm_right = mlm_n = 0
    for i in range(0, len(samples), cfg.eval_batch_size):
        chunk = samples[i:i + cfg.eval_batch_size]
        rngs = [random.Random(f"vqa_pretrain/val/{i + j}") for j in range(len(chunk))]
        batch = {k: v.to(device) for k, v in collate(chunk, vocab, cfg, rngs).items()}
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["mlm_labels"])
        itm_right += (out["itm"].argmax(-1) == batch["itm_labels"]).sum().item()
        itm_n += len(chunk)
        labels = batch["mlm_labels"][batch["mlm_labels"] != -100]
        mlm_right += (out["mlm"].argmax(-1) == labels).sum().item()
        mlm_n += labels.numel()
    return {"itm_acc": itm_right / itm_n, "mlm_acc": mlm_right / max(1, mlm_n)}


# ----------------------------------------------------------------------------------------------------------------------
# 6. A CPU-toy aid, off in the paper's config: grounding the question's object words (MeterConfig.ground_weight).
# Why: a position question ("is the red circle left of the blue star?") needs each object's words to fetch where
# their object is in the first fusion layer, so that the second can compare subject and object. Trained from scratch,
# nothing makes a word fetch anything: the answer only rewards fetching once the comparison exists, and the comparison
# only once words fetch, so position stays at chance (docs/vqa-toy.md, "Why position needs the aid").
# METER's words come from a RoBERTa and its image tokens from a ViT pretrained on millions of pairs; here a linear head
# on the first fusion layer's text tokens predicts the image-map cell of the object each named phrase refers to, beside
# the VQA loss (weighted by ground_weight; collate adds the targets, compute_loss the loss).

class ToyMeter(Meter):
    """Meter with the grounding aid's head: forward adds "ground", the cell logits (B, T, image_positions ** 2) of
    the first co-attention layer's text tokens, to the heads' outputs (computed in forward, so that DDP syncs the
    head's gradients as any other weight's)."""

    def __init__(self, cfg: MeterConfig, num_answers: int = 0):
        super().__init__(cfg, num_answers)
        if not cfg.image_positions:
            raise ValueError("ground_weight needs image_positions: the aid names cells of that grid")
        # drawn after Meter's weights, PyTorch's default init; saved as ground_aid.head.*, which load_init skips
        self.ground_aid = nn.ModuleDict({"head": nn.Linear(cfg.fusion.width, cfg.image_positions ** 2)})

    def forward(self, images, input_ids, attention_mask, mlm_labels=None):
        x, _, pooled, texts = self.fuse(images, input_ids, attention_mask)
        return {**self.head_outputs(x, pooled, mlm_labels), "ground": self.ground_aid.head(texts[0])}


def ground_loss(logits, cells):
    """Cross entropy of the cell logits (B, T, cells) over the tokens with a cell (cells (B, T), -100 elsewhere),
    averaged over every process's such tokens (each holds a different number); logits.sum() * 0 keeps the head in the
    backward pass if there are none."""
    named = cells != -100
    count = coswin.per_process_share(named.sum().float()).clamp(min=1.0)
    return F.cross_entropy(logits[named].float(), cells[named], reduction="sum") / count + logits.sum() * 0.0


def ground_targets(questions, samples, T, vocab: Vocab, grid):
    """(B, T) of each token's cell on the grid x grid image map, for the tokens of a phrase in the question that names
    one object ("the red circle" or another `ref`, "the square" with one square, "the red object" with one red
    object), -100 elsewhere. The cell is the one under the object's centre."""
    cells = torch.full((len(questions), T), -100)
    for b, (q, s) in enumerate(zip(questions, samples)):
        text, width = q["question"], s["image"].size[0]
        for o in s["objects"]:
            phrases = [o["ref"]]
            if sum(p["category"] == o["category"] for p in s["objects"]) == 1:
                phrases.append(f"the {o['category']}")
            if sum(p["color"] == o["color"] for p in s["objects"]) == 1:
                phrases.append(f"the {o['color']} object")
            cell = centre_cell(o["box"], width, grid)
            for phrase in phrases:
                start = text.find(phrase)
                if start < 0 or text[start + len(phrase):][:1] not in ("", " ", "?"):  # not "the circle" of "circles"
                    continue
                first, end = phrase_tokens(text, start, start + len(phrase), vocab)
                cells[b, first:min(T, end)] = cell
    return cells


def centre_cell(box, width, grid):
    """The cell (row-major) of a grid x grid map over a width-px image that holds the centre of box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    row, col = (min(grid - 1, int((a0 + a1) / 2 / width * grid)) for a0, a1 in ((y0, y1), (x0, x1)))
    return row * grid + col


def phrase_tokens(text, start, end, vocab: Vocab):
    """(first, end) token positions of the characters text[start:end], a phrase of whole words, in the encoding of
    text with its begin token: the tokens before the phrase, then those through its last character."""
    return len(vocab.text.encode(text[:start].rstrip(), bos=True)), len(vocab.text.encode(text[:end], bos=True))
