"""Florence-2 from scratch: one sequence-to-sequence model for every vision task.

Florence-2 (Xiao et al., 2023) turns captioning, detection, grounding, segmentation and OCR into one
problem: read an image and a task prompt, write the answer as text. Boxes and polygons are written with
1,000 extra "coordinate" tokens <loc_0>..<loc_999>, so a single cross-entropy loss and a single decoder
serve every task. Sections 1-7 are the paper's model, following its Figure 2 from left to right; sections
8-13 are the machinery around it, each one skippable:

  1. configs           dataclasses and the model sizes (toy, base = 231.4M, large = 770M)
  2. DaViT             the image encoder: conv embeddings, window attention and channel-group attention
  3. image tokens      2D position + temporal embeddings, a spatial-mean token, projection to the text width
  4. BART              the post-LN transformer encoder-decoder with a key/value cache
  5. Florence2         image tokens in front of the prompt, the forward pass, greedy and beam search
  6. tasks             the coordinate tokens, the task prompts, the image input, parsing answers back
  7. tokenizers        BART's byte-level BPE on tiktoken; data.py's byte-level one for the toy
  8. released weights  the name map for the transformers-native checkpoints (read by data.read_weights_folder)
  9. task data         every task's target text from a Shapes-world sample; a JSON-lines reader for real data
 10. training stage    the protocol that `python train.py --stage florence2` drives: CONFIGS, TRAIN, build_vocab,
                       build_model, build_datasets, collate, compute_loss (evaluate: section 12)
 11. the toy's aids    all the CPU toy adds to the paper, in one place, off in the base and large configs: the conv
                       stem, soft coordinate targets, label smoothing, the cell heads (ToyFlorence2), the early and
                       late task mixtures
 12. evaluation        the metric of each task family on post-processed answers, and evaluate
 13. command line      python florence2.py --ckpt PATH --image IMG --task '<OD>' [--text ...] [--out out.png];
                       --images DIR_OR_GLOB labels a folder into JSON lines or a COCO file, resumably
"""
import argparse
import functools
import glob
import itertools
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.checkpoint import checkpoint

import coswin  # shared blocks: the toy's conv stem, Mlp, stochastic depth, BERT's init, checkpoint reading
import data

# ----------------------------------------------------------------------------------------------------
# 1. Configs


@dataclass
class DaViTConfig:
    in_channels: int = 3
    depths: tuple = (1, 1, 9, 1)  # blocks per stage; each block = one spatial + one channel attention block
    embed_dims: tuple = (128, 256, 512, 1024)  # channels per stage
    num_heads: tuple = (4, 8, 16, 32)  # heads of the spatial window attention
    num_groups: tuple = (4, 8, 16, 32)  # channel groups of the channel attention
    patch_size: tuple = (7, 3, 3, 3)  # conv embedding kernels: 7x7 stride 4, then 3x3 stride 2 (CvT style)
    patch_stride: tuple = (4, 2, 2, 2)
    patch_padding: tuple = (3, 1, 1, 1)
    patch_prenorm: tuple = (False, True, True, True)  # LayerNorm before (True) or after the conv embedding
    window_size: int = 12  # spatial attention window; maps the window does not divide are padded
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1  # stochastic depth, rising linearly over all blocks
    # () = the paper's stage-1 conv embedding; the CPU toy's (w1, .., wk) = a BatchNorm conv stem of stride 2^k in
    # its place (Stem), with wk = embed_dims[0] (stage 1's patch_* entries are then unused)
    stem: tuple = ()


@dataclass
class Florence2Config:
    vision: DaViTConfig = field(default_factory=DaViTConfig)
    image_size: int = 768  # images are resized to image_size x image_size: (768/32)^2 + 1 = 577 image tokens
    max_image_positions: int = 50  # learned 2D position table: the feature map may be up to 50 x 50
    max_temporal_embeddings: int = 100  # sinusoid table of frame positions (a single image is frame 0)
    vocab_size: int = 51289  # BART's 50,265 + 1,024 added: <loc_0>..<loc_999> and markup such as <poly>, <sep>
    d_model: int = 768  # text width; the image tokens are projected to it
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_heads: int = 12
    decoder_heads: int = 12
    encoder_ffn_dim: int = 3072
    decoder_ffn_dim: int = 3072
    max_position_embeddings: int = 1024  # learned positions of encoder (image + prompt) and decoder sequences
    activation: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    scale_embedding: bool = False  # multiply token embeddings by sqrt(d_model) (off in Florence-2)
    init_std: float = 0.02  # std of the random initial weights of linears and embeddings (BART's init_std)
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2  # BART starts decoding from </s>
    forced_bos_token_id: int = 0  # generation writes <s> first ...
    forced_eos_token_id: int = 2  # ... and </s> when it reaches the length limit


# Model sizes. The training stage (section 10) names one of these; its own CONFIGS add data and tokenizer.
MODELS = {
    # CPU-sized, not the paper's: 96 px; a BatchNorm conv stem (3x3 convs 16-32-64-128, stride 16) makes the 6 x 6
    # map, then one DaViT stage of one block (window + channel attention, 128 channels) -> 37 image tokens. The stem
    # does the seeing, as attention blocks trained from scratch need far more samples to learn shape than a CPU
    # gives in minutes (docs/florence2-toy.md). No dropout: the Shapes world never repeats an image. The text side
    # starts from std 0.05, as BART's 0.02 is tuned for widths of 768 and more and a width-128 decoder starting
    # from it is slow to read the image. vocab_size is set from the tokenizer.
    "toy": Florence2Config(
        vision=DaViTConfig(stem=(16, 32, 64, 128), depths=(1,), embed_dims=(128,), num_heads=(4,), num_groups=(4,),
                           patch_size=(7,), patch_stride=(16,), patch_padding=(3,), patch_prenorm=(False,),
                           window_size=6, drop_path_rate=0.0),
        image_size=96, vocab_size=1400, d_model=128, encoder_layers=2, decoder_layers=2, encoder_heads=4,
        decoder_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512, max_position_embeddings=512, dropout=0.0,
        attention_dropout=0.0, init_std=0.05),
    # Florence-2-base: DaViT 90.4M + projection 0.8M + BART-base 140.2M = 231.4M parameters.
    "base": Florence2Config(),
    # Florence-2-large: DaViT 360.6M + projection 2.2M + BART-large 407.3M = 770.2M parameters
    # (max_position_embeddings 1024, as in the released checkpoint).
    "large": Florence2Config(
        vision=DaViTConfig(embed_dims=(256, 512, 1024, 2048), num_heads=(8, 16, 32, 64), num_groups=(8, 16, 32, 64),
                           drop_path_rate=0.1),
        d_model=1024, encoder_layers=12, decoder_layers=12, encoder_heads=16, decoder_heads=16,
        encoder_ffn_dim=4096, decoder_ffn_dim=4096),
}

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}

# ----------------------------------------------------------------------------------------------------
# 2. DaViT (Ding et al., 2022): stages of conv embedding, then blocks that alternate attention over the
# tokens of a local window ("spatial") with attention over the channels of the whole image ("channel").


def run_layer(owner, layer, *args):
    """layer(*args), recomputed in the backward pass instead of stored when the owner's grad_checkpointing is
    on (train.py --grad_checkpointing: activation memory for compute)."""
    if owner.grad_checkpointing and owner.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


def norm_2d(norm, x):
    """LayerNorm over the channels of a (B, C, H, W) map."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


class ConvEmbed(nn.Module):
    """Overlapping strided conv that starts a stage. Stage 1 normalises after the conv; later stages
    normalise the incoming map first (the output of the previous stage has no final norm)."""

    def __init__(self, c_in, c_out, kernel, stride, padding, pre_norm):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding)
        self.norm = nn.LayerNorm(c_in if pre_norm else c_out)
        self.pre_norm = pre_norm

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)
        if self.pre_norm:
            return self.conv(norm_2d(self.norm, x))
        return norm_2d(self.norm, self.conv(x))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping w x w windows (no shift, no relative bias: the
    conv position encodings carry position). Maps the window does not divide are zero-padded at the
    bottom/right; the padded tokens take part in attention, as in the reference DaViT."""

    def __init__(self, dim, heads, window, qkv_bias):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, H, W):  # x: (B, H*W, C)
        B, N, C = x.shape
        w, h = self.window, self.heads
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, -W % w, 0, -H % w))  # (B, Hp, Wp, C)
        Hp, Wp = x.shape[1], x.shape[2]
        x = x.view(B, Hp // w, w, Wp // w, w, C).transpose(2, 3).reshape(-1, w * w, C)  # (B*nW, w*w, C)
        q, k, v = self.qkv(x).view(-1, w * w, 3, h, C // h).permute(2, 0, 3, 1, 4)  # 3 x (B*nW, h, w*w, C/h)
        x = F.scaled_dot_product_attention(q, k, v)  # (B*nW, h, w*w, C/h)
        x = self.proj(x.transpose(1, 2).reshape(-1, w * w, C))  # (B*nW, w*w, C)
        x = x.view(B, Hp // w, Wp // w, w, w, C).transpose(2, 3).reshape(B, Hp, Wp, C)  # windows -> map
        return x[:, :H, :W].reshape(B, N, C)  # drop the padding: (B, H*W, C)


class ChannelAttention(nn.Module):
    """Channel-group attention: within each group of C/G channels, every channel attends to every other,
    comparing the channels as N-dimensional vectors over all N positions. The attention map is (C/G)^2
    whatever the image size, and it sees the whole image at once (global context at linear cost)."""

    def __init__(self, dim, groups, qkv_bias):
        super().__init__()
        self.groups = groups
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, H, W):  # x: (B, N, C)
        B, N, C = x.shape
        G = self.groups
        q, k, v = self.qkv(x).view(B, N, 3, G, C // G).permute(2, 0, 3, 4, 1)  # 3 x (B, G, C/G, N)
        # channels are the "tokens" and positions their features, so the softmax scale is N^-0.5
        x = F.scaled_dot_product_attention(q, k, v, scale=N ** -0.5)  # (B, G, C/G, N)
        return self.proj(x.permute(0, 3, 1, 2).reshape(B, N, C))  # (B, N, G, C/G) -> (B, N, C)


class MixerBlock(nn.Module):
    """Half of a DaViT block: a depthwise 3x3 conv position encoding, pre-LN attention (window or channel),
    another conv position encoding, pre-LN FFN. Each step is residual."""

    def __init__(self, dim, attn, mlp_ratio, drop_path):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = coswin.Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path  # stochastic depth of both residual branches

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        x = x + self.conv1(x)
        t = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        t = coswin.residual(t, self.attn(self.norm1(t), H, W), self.drop_path, self.training)
        x = t.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        x = x + self.conv2(x)
        t = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        t = coswin.residual(t, self.ffn(self.norm2(t)), self.drop_path, self.training)
        return t.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class DaViTBlock(nn.Module):
    def __init__(self, cfg, stage, drop_spatial, drop_channel):
        super().__init__()
        dim = cfg.embed_dims[stage]
        window = WindowAttention(dim, cfg.num_heads[stage], cfg.window_size, cfg.qkv_bias)
        channel = ChannelAttention(dim, cfg.num_groups[stage], cfg.qkv_bias)
        self.spatial_block = MixerBlock(dim, window, cfg.mlp_ratio, drop_spatial)
        self.channel_block = MixerBlock(dim, channel, cfg.mlp_ratio, drop_channel)

    def forward(self, x):
        return self.channel_block(self.spatial_block(x))


class DaViT(nn.Module):
    def __init__(self, cfg: DaViTConfig):
        super().__init__()
        n = len(cfg.embed_dims)
        if not all(len(t) == n for t in (cfg.depths, cfg.num_heads, cfg.num_groups, cfg.patch_size,
                                          cfg.patch_stride, cfg.patch_padding, cfg.patch_prenorm)):
            raise ValueError(f"every per-stage tuple of DaViTConfig needs {n} entries: {cfg}")
        if cfg.stem and 2 ** len(cfg.stem) != cfg.patch_stride[0]:
            raise ValueError(f"a stem of {len(cfg.stem)} widths has stride {2 ** len(cfg.stem)}: set patch_stride[0] "
                             f"to it (got {cfg.patch_stride[0]})")
        drop = torch.linspace(0, cfg.drop_path_rate, 2 * sum(cfg.depths), device="cpu").tolist()  # per half-block
        self.convs, self.blocks = nn.ModuleList(), nn.ModuleList()
        for s in range(n):
            c_in = cfg.in_channels if s == 0 else cfg.embed_dims[s - 1]
            # stage 1 of the CPU toy is a conv stem instead (Stem, with the toy's other aids in section 11)
            self.convs.append(Stem(cfg.in_channels, cfg.stem, cfg.embed_dims[0]) if s == 0 and cfg.stem else
                              ConvEmbed(c_in, cfg.embed_dims[s], cfg.patch_size[s], cfg.patch_stride[s],
                                        cfg.patch_padding[s], cfg.patch_prenorm[s]))
            first = 2 * sum(cfg.depths[:s])
            self.blocks.append(nn.ModuleList(DaViTBlock(cfg, s, drop[first + 2 * i], drop[first + 2 * i + 1])
                                             for i in range(cfg.depths[s])))
        self.grad_checkpointing = False
        self.apply(coswin.CoSwin._init_weights)  # DaViT's own init is Swin's: truncated normal(0.02), zero biases

    def forward(self, x):  # (B, 3, H, W) -> (B, C_last, H/32, W/32) with the default strides
        for conv, stage in zip(self.convs, self.blocks):
            x = conv(x)
            for block in stage:
                x = run_layer(self, block, x)
        return x


# ----------------------------------------------------------------------------------------------------
# 3. Image tokens (paper Sec. 3: "visual token embeddings ... concatenated with the text embeddings")


def sinusoid_table(positions, dim):
    """Transformer sinusoids with sin on even and cos on odd channels: (positions, dim)."""
    freq = torch.exp(torch.arange(dim // 2, dtype=torch.float32) * -(math.log(10000.0) / (dim // 2)))
    angle = torch.arange(positions, dtype=torch.float32)[:, None] * freq[None]  # (positions, dim/2)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(positions, dim)  # interleave sin, cos


class ImageProjection(nn.Module):
    """DaViT map -> image tokens: add a learned 2D position embedding (half the channels index the column,
    half the row) and the temporal embedding of frame 0, prepend the spatial mean as a global token,
    then project to the text width and LayerNorm."""

    def __init__(self, cfg: Florence2Config):
        super().__init__()
        C = cfg.vision.embed_dims[-1]
        self.col_embed = nn.Embedding(cfg.max_image_positions, C - C // 2)
        self.row_embed = nn.Embedding(cfg.max_image_positions, C // 2)
        self.register_buffer("temporal_embed", sinusoid_table(cfg.max_temporal_embeddings, C), persistent=False)
        self.proj = nn.Linear(C, cfg.d_model, bias=False)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, feats):  # (B, C, H, W) -> (B, 1 + H*W, d_model)
        B, C, H, W = feats.shape
        if max(H, W) > self.row_embed.num_embeddings:
            raise ValueError(f"a {H}x{W} feature map exceeds the {self.row_embed.num_embeddings}x"
                             f"{self.row_embed.num_embeddings} position table: use a smaller image")
        pos = torch.cat([self.col_embed.weight[:W][None].expand(H, W, -1),  # (H, W, C - C//2)
                         self.row_embed.weight[:H][:, None].expand(H, W, -1)], dim=-1)  # (H, W, C)
        x = feats.flatten(2).transpose(1, 2) + pos.reshape(1, H * W, C)  # (B, H*W, C)
        x = x + self.temporal_embed[0]  # an image is frame 0 of a one-frame video
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, 1 + H*W, C)
        return self.norm(self.proj(x))


# ----------------------------------------------------------------------------------------------------
# 4. BART (Lewis et al., 2020): post-LN encoder-decoder, learned positions, tied embeddings


class FFN(nn.Module):
    """BART's feed-forward layer: Linear, the config's activation, dropout, Linear. (DaViT's is coswin.Mlp: GELU,
    no dropout.)"""

    def __init__(self, dim, hidden, activation=F.gelu, dropout=0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.activation, self.dropout = activation, dropout

    def forward(self, x):
        return self.fc2(F.dropout(self.activation(self.fc1(x)), self.dropout, self.training))


class Attention(nn.Module):
    """Multi-head attention. During generation, keys/values come from the decoder's KVCache. Self-attention
    gets cache = (keys, values, past): buffers preallocated for the whole answer and the number of positions
    already in them; the call writes its own keys/values after those and attends to all of them.
    Cross-attention gets kv = (keys, values) of the encoder output, computed once before the first step."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def split(self, x):  # (B, T, d) -> (B, heads, T, d/heads)
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x, source=None, mask=None, is_causal=False, cache=None, kv=None):
        """x (B, T, d) attends to source (B, S, d), or to itself when source is None.
        mask: bool, broadcastable to (B, heads, T, S), True where attending is allowed."""
        B, T, d = x.shape
        q = self.split(self.q_proj(x))
        if kv is not None:
            k, v = kv  # the encoder output's, the same at every step
        elif cache is not None:  # a generation step: write x's keys/values in place, behind the past ones
            k_buf, v_buf, past = cache  # (B, heads, max_len, d/heads) each
            k_buf[:, :, past:past + T] = self.split(self.k_proj(x))
            v_buf[:, :, past:past + T] = self.split(self.v_proj(x))
            k, v = k_buf[:, :, :past + T], v_buf[:, :, :past + T]  # (B, heads, past + T, d/heads), views
        else:
            kv = x if source is None else source
            k, v = self.split(self.k_proj(kv)), self.split(self.v_proj(kv))  # (B, heads, S, d/heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, heads, T, d/h)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, d))  # (B, T, heads, d/heads) -> (B, T, d)


class EncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = Attention(cfg.d_model, cfg.encoder_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.ffn = FFN(cfg.d_model, cfg.encoder_ffn_dim, ACTIVATIONS[cfg.activation], cfg.activation_dropout)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x, mask):  # post-LN: normalise after each residual sum
        x = self.self_attn_layer_norm(x + F.dropout(self.self_attn(x, mask=mask), self.dropout, self.training))
        return self.final_layer_norm(x + F.dropout(self.ffn(x), self.dropout, self.training))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = Attention(cfg.d_model, cfg.decoder_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.encoder_attn = Attention(cfg.d_model, cfg.decoder_heads, cfg.attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.ffn = FFN(cfg.d_model, cfg.decoder_ffn_dim, ACTIVATIONS[cfg.activation], cfg.activation_dropout)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x, memory, memory_mask, self_mask, is_causal, cache):
        drop = lambda y: F.dropout(y, self.dropout, self.training)  # noqa: E731
        self_cache, cross_cache = (None, None) if cache is None else cache
        y = self.self_attn(x, mask=self_mask, is_causal=is_causal, cache=self_cache)
        x = self.self_attn_layer_norm(x + drop(y))
        y = self.encoder_attn(x, source=memory, mask=memory_mask, kv=cross_cache)
        x = self.encoder_attn_layer_norm(x + drop(y))
        return self.final_layer_norm(x + drop(self.ffn(x)))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        # BART reserves position ids 0 and 1 (a fairseq legacy), so position p uses row p + 2
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + 2, cfg.d_model)
        self.layernorm_embedding = nn.LayerNorm(cfg.d_model)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.dropout = cfg.dropout
        self.grad_checkpointing = False

    def forward(self, x, mask):  # x: (B, S, d) embeddings; mask: (B, S) bool, False at padding
        S = x.shape[1]
        if S > self.embed_positions.num_embeddings - 2:
            raise ValueError(f"encoder input of {S} tokens (image + prompt) exceeds max_position_embeddings="
                             f"{self.embed_positions.num_embeddings - 2}")
        x = self.layernorm_embedding(x + self.embed_positions(torch.arange(S, device=x.device) + 2))
        x = F.dropout(x, self.dropout, self.training)
        attn_mask = None if bool(mask.all()) else mask[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.layers:
            x = run_layer(self, layer, x, attn_mask)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + 2, cfg.d_model)
        self.layernorm_embedding = nn.LayerNorm(cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.dropout = cfg.dropout
        self.grad_checkpointing = False

    def forward(self, x, memory, memory_mask, cache=None):
        """x: (B, T, d) embeddings of the next T target tokens; memory: (B, S, d) encoder output;
        memory_mask: (B, S) bool. Generation passes a KVCache instead of memory and memory_mask (None): it
        holds the encoder output's keys/values and mask for the rows it decodes, and the past positions."""
        T = x.shape[1]
        past = 0 if cache is None else cache.length
        if past + T > self.embed_positions.num_embeddings - 2:
            raise ValueError(f"decoder sequence of {past + T} tokens exceeds max_position_embeddings="
                             f"{self.embed_positions.num_embeddings - 2}")
        if cache is not None and past + T > cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} positions, {past + T} asked for")
        x = self.layernorm_embedding(x + self.embed_positions(torch.arange(past, past + T, device=x.device) + 2))
        x = F.dropout(x, self.dropout, self.training)
        # causal: token t sees the cached past and new tokens up to itself (no mask needed for one new token;
        # T is tested first so that a compiled step, where past varies, sees a plain bool)
        self_mask = None
        if T > 1 and past:
            self_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)  # (T, past+T)
        if cache is None:  # teacher forcing (training): the layers may be checkpointed
            memory_mask = None if bool(memory_mask.all()) else memory_mask[:, None, None, :]  # (B, 1, 1, S)
            for layer in self.layers:
                x = run_layer(self, layer, x, memory, memory_mask, self_mask, T > 1, None)
            return x
        for i, layer in enumerate(self.layers):
            x = layer(x, None, cache.memory_mask(), self_mask, T > 1 and past == 0, cache.layer(i))
        cache.length += T
        return x


class KVCache:
    """What the decoder attends to during generation, for all layers at once, in tensors allocated once.

    Self-attention: buffers (layers, N, heads, max_len, d/heads). Step t writes position t and attends to
    positions 0..t, a view of the buffer, so a step copies one position instead of the whole past (as
    torch.cat would) and memory does not grow. Cross-attention: the encoder output's keys/values
    (layers, N, heads, S, d/heads) and its padding mask, computed once before the first step.

    Only slots 0..rows-1 are decoded. Greedy search calls `drop` when rows finish, so a finished row costs
    nothing more; beam search calls `reorder` as hypotheses move between beams."""

    def __init__(self, decoder, memory, memory_mask, max_len, repeat=1):
        """memory (B, S, d) and memory_mask (B, S) bool: the encoder output; repeat: slots per memory row (the
        beams), which share its cross-attention keys/values, so those are computed once per image."""
        cross = [layer.encoder_attn for layer in decoder.layers]
        self.cross_k = torch.stack([a.split(a.k_proj(memory)) for a in cross])  # (layers, B, heads, S, d/heads)
        self.cross_v = torch.stack([a.split(a.v_proj(memory)) for a in cross])
        mask = None if bool(memory_mask.all()) else memory_mask[:, None, None, :].clone()  # (B, 1, 1, S), own
        if repeat > 1:
            self.cross_k, self.cross_v = (t.repeat_interleave(repeat, 1) for t in (self.cross_k, self.cross_v))
            mask = None if mask is None else mask.repeat_interleave(repeat, 0)
        self.mask = mask
        n_layers, N, heads, _, head_dim = self.cross_k.shape
        self.self_k = memory.new_empty(n_layers, N, heads, max_len, head_dim)
        self.self_v = torch.empty_like(self.self_k)
        self.max_len, self.length, self.rows = max_len, 0, N  # positions held, positions written, slots decoded

    def layer(self, i):  # layer i's view of the slots decoded: ((keys, values, past), (cross keys, values))
        n = self.rows
        return (self.self_k[i, :n], self.self_v[i, :n], self.length), (self.cross_k[i, :n], self.cross_v[i, :n])

    def memory_mask(self):  # (rows, 1, 1, S) bool, or None when nothing is padding
        return None if self.mask is None else self.mask[:self.rows]

    def drop(self, finished):
        """Stop decoding the slots where finished (rows,) bool is True. Running slots from the end of the range
        move into the finished slots in front of them, so the slots decoded next are again the first `rows`
        (a view, no copy) and only the rows that move are copied. Returns (to, frm): slot frm[k] moved to to[k]."""
        n = self.rows - int(finished.sum())
        to = finished[:n].nonzero().squeeze(1)  # finished slots that stay in range
        frm = (~finished[n:]).nonzero().squeeze(1) + n  # running slots past the new end, as many
        for t in (self.self_k, self.self_v):
            t[:, to, :, :self.length] = t[:, frm, :, :self.length]  # only the positions written
        for t in (self.cross_k, self.cross_v):
            t[:, to] = t[:, frm]
        if self.mask is not None:
            self.mask[to] = self.mask[frm]
        self.rows = n
        return to, frm

    def reorder(self, index):
        """Beam search moved hypotheses: slot i continues the hypothesis that was in slot index[i], so the
        self-attention keys/values follow it. The beams of an image share the cross-attention ones, which stay."""
        for t in (self.self_k, self.self_v):
            t[:, :, :, :self.length] = t[:, index, :, :self.length]


# ----------------------------------------------------------------------------------------------------
# 5. Florence-2: image tokens + prompt tokens -> encoder; decoder writes the answer


class Florence2(nn.Module):
    def __init__(self, cfg: Florence2Config):
        super().__init__()
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"activation {cfg.activation!r} not in {sorted(ACTIVATIONS)}")
        self.cfg = cfg
        self.vision_tower = DaViT(cfg.vision)
        self.projector = ImageProjection(cfg)
        # one token embedding for encoder, decoder and (tied) output layer
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.init_text_weights()

    def init_text_weights(self):
        """BART's init on the text side. The vision tower keeps DaViT's (std 0.02 whatever init_std says), as a
        larger std in its attention and MLP layers lets the coordinate tasks wipe colour out of its features."""
        for module in (self.projector, self.embed_tokens, self.encoder, self.decoder):
            module.apply(functools.partial(coswin.bert_init, std=self.cfg.init_std))

    def image_map(self, pixel_values):  # (B, 3, H, W) normalised -> the vision tower's map (B, C, H/32, W/32)
        return self.vision_tower(pixel_values.to(self.projector.proj.weight.dtype))

    def encode(self, pixel_values, input_ids, attention_mask=None, image_map=None):
        """Encode image + prompt. pixel_values (B, 3, H, W) normalised; input_ids (B, T) = <s> prompt </s>
        (right-padded in a batch); attention_mask (B, T), default input_ids != pad; image_map: the vision tower's
        map of pixel_values if already computed. Returns memory (B, S, d) and its mask (B, S) bool,
        S = image tokens + T."""
        if attention_mask is None:
            attention_mask = input_ids != self.cfg.pad_token_id
        image = self.projector(self.image_map(pixel_values) if image_map is None else image_map)
        text = self.embed_tokens(input_ids) * self.embed_scale  # (B, T, d)
        x = torch.cat([image.to(text.dtype), text], dim=1)  # (B, n_image + T, d)
        image_mask = torch.ones(image.shape[:2], dtype=torch.bool, device=x.device)
        mask = torch.cat([image_mask, attention_mask.bool()], dim=1)  # (B, n_image + T)
        return self.encoder(x, mask), mask

    def decode(self, decoder_input_ids, memory, memory_mask, cache=None):
        """Logits (B, T, vocab) for the next token after each decoder input token."""
        x = self.decoder(self.embed_tokens(decoder_input_ids) * self.embed_scale, memory, memory_mask, cache)
        if torch.is_autocast_enabled(x.device.type):
            # the tied output layer in float32 under bf16 autocast: bf16 logits (3 significant digits) tie and flip
            # the argmax between neighbouring coordinate tokens (the toy's polygons lose 0.02 mIoU)
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x.float(), self.embed_tokens.weight)
        return F.linear(x, self.embed_tokens.weight)  # tied output layer

    def forward(self, pixel_values, input_ids, decoder_input_ids, attention_mask=None, answer_lengths=None,
                groups=4, image_map=None):
        """Teacher-forced logits (B, T_dec, vocab). decoder_input_ids = </s> <s> answer... (the answer shifted
        right behind decoder_start_token_id).
        answer_lengths (B,): training's shortcut. Only the first answer_lengths[b] positions of row b are wanted,
        so the rows are sorted by length and decoded in `groups` groups, each cut to its longest row: a batch
        mixing 3-token categories with 80-token polygons is mostly padding otherwise. The decoder is causal, so a
        row's logits do not depend on what follows them, and the result, logits (N, vocab) of those positions in
        row order (logits[position < length] of the full call), is the same. The image tower and encoder run once
        on the whole batch. image_map: the vision tower's map of pixel_values if already computed."""
        memory, mask = self.encode(pixel_values, input_ids, attention_mask, image_map)
        if answer_lengths is None:
            return self.decode(decoder_input_ids, memory, mask)
        return self.decode_grouped(decoder_input_ids, memory, mask, answer_lengths, groups)

    def decode_grouped(self, decoder_input_ids, memory, mask, answer_lengths, groups):
        """forward's training shortcut: logits (N, vocab) of the first answer_lengths[b] positions of each row b,
        decoded in `groups` groups of rows sorted by length."""
        order = torch.argsort(answer_lengths, descending=True)
        packed = []  # (rows, logits (n_rows, T_group, vocab)) per group
        for rows in order.chunk(groups):
            T = int(answer_lengths[rows].max())
            packed.append((rows, self.decode(decoder_input_ids[rows, :T], memory[rows], mask[rows])))
        wanted = torch.arange(decoder_input_ids.shape[1], device=answer_lengths.device) < answer_lengths[:, None]
        out = torch.empty(int(wanted.sum()), self.cfg.vocab_size, dtype=packed[0][1].dtype, device=memory.device)
        start = answer_lengths.cumsum(0) - answer_lengths  # (B,) where row b begins in `out`
        for rows, logits in packed:  # logits[i, t] goes to start[rows[i]] + t, for t < its length
            keep = wanted[rows, :logits.shape[1]]  # (n_rows, T_group)
            out[(start[rows, None] + torch.arange(logits.shape[1], device=out.device))[keep]] = logits[keep]
        return out

    def set_grad_checkpointing(self, enable=True):
        for part in (self.vision_tower, self.encoder, self.decoder):
            part.grad_checkpointing = enable

    def new_cache(self, memory, memory_mask, max_len, repeat=1):
        """The decoder's KVCache for answers of up to max_len tokens, from encode()'s output; repeat: slots per
        image (the beams)."""
        return KVCache(self.decoder, memory, memory_mask, max_len, repeat)

    # -- generation --------------------------------------------------------------------------------
    # Greedy and beam search follow the transformers library's rules exactly (same stopping rule, same
    # length penalty, same tie order), so the released weights give the released outputs.

    @torch.no_grad()
    def generate(self, pixel_values, input_ids, attention_mask=None, max_new_tokens=256, num_beams=1,
                 no_repeat_ngram_size=0, early_stopping=True, length_penalty=1.0):
        """Returns (B, L) token ids starting with decoder_start_token_id; finished rows are padded with pad.
        early_stopping: True (stop once num_beams hypotheses are done), False (stop when no running beam
        can beat them, judged at the current length) or "never" (judged at the maximum length)."""
        cfg = self.cfg
        max_len = 1 + max_new_tokens  # the decoder start token + new tokens
        if max_new_tokens < 1 or max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_new_tokens must be in [1, {cfg.max_position_embeddings - 1}], got {max_new_tokens}")
        if num_beams < 1 or early_stopping not in (True, False, "never"):
            raise ValueError(f"need num_beams >= 1 and early_stopping in (True, False, 'never'), got "
                             f"{num_beams}, {early_stopping!r}")
        memory, mask = self.encode(pixel_values, input_ids, attention_mask)
        cache = self.new_cache(memory, mask, max_len, repeat=num_beams)  # the beams of an image share its memory

        def next_scores(seqs):  # seqs (N, L) so far, one per decoded slot -> constrained scores (N, vocab) of token L
            scores = self.decode(seqs[:, -1:], None, None, cache)[:, -1].float()  # only the new token is fed
            if num_beams > 1:  # beams add up log-probabilities; greedy takes the argmax of the logits
                scores = F.log_softmax(scores, dim=-1)
            return self._constrain(seqs, scores, max_len, no_repeat_ngram_size)

        B = input_ids.shape[0]
        if num_beams == 1:
            return self._greedy(next_scores, cache, B, max_len, memory.device)
        return self._beam_search(next_scores, cache, B, num_beams, max_len, length_penalty, early_stopping,
                                 memory.device)

    def _constrain(self, seqs, scores, max_len, ngram):
        """Decoding rules, in transformers' order: never repeat an n-gram; <s> first; </s> at the limit."""
        L = seqs.shape[1]
        if ngram and L >= ngram:
            windows = seqs.unfold(1, ngram, 1)  # (N, L-n+1, n): every n-gram so far
            seen = (windows[..., :-1] == seqs[:, None, L - ngram + 1:]).all(-1)  # starts like the current (n-1)-gram
            rows, cols = seen.nonzero(as_tuple=True)
            scores[rows, windows[rows, cols, -1]] = -math.inf
        for forced, at in ((self.cfg.forced_bos_token_id, 1), (self.cfg.forced_eos_token_id, max_len - 1)):
            if forced is not None and L == at:
                scores = torch.full_like(scores, -math.inf)
                scores[:, forced] = 0.0
        return scores

    def _greedy(self, next_scores, cache, B, max_len, device):
        """Append each running row's argmax until every row has written </s>. A row that ends leaves the decoded
        slots (KVCache.drop), so later steps compute only the rows still running; the rest of it stays pad."""
        cfg = self.cfg
        seqs = torch.full((B, max_len), cfg.pad_token_id, dtype=torch.long, device=device)
        seqs[:, 0] = cfg.decoder_start_token_id
        row = torch.arange(B, device=device)  # row[i]: the row that cache slot i decodes
        for L in range(1, max_len):
            token = next_scores(seqs[row, :L]).argmax(-1)  # (rows,)
            seqs[row, L] = token
            ended = token == cfg.eos_token_id
            if ended.all():
                return seqs[:, :L + 1]
            if ended.any():
                to, frm = cache.drop(ended)
                row[to] = row[frm]
                row = row[:cache.rows]
        return seqs

    def _beam_search(self, next_logprobs, cache, B, nb, max_len, length_penalty, early_stopping, device):
        """Keep nb running hypotheses per row. Each step expands them all, keeps the 2*nb best candidates
        (so nb can go on even if nb of them just ended), moves the ended ones among the top nb into the
        finished pool (score / length^length_penalty) and continues with the nb best that did not end."""
        cfg, K, NEG = self.cfg, 2 * nb, -1.0e9
        seqs = torch.full((B, nb, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
        scores = torch.zeros(B, nb, device=device)
        scores[:, 1:] = NEG  # the beams start identical: only the first may expand at step one
        done_seqs = torch.full((B, nb, max_len), cfg.pad_token_id, dtype=torch.long, device=device)
        done_scores = torch.full((B, nb), NEG, device=device)
        done_len = torch.zeros(B, nb, dtype=torch.long, device=device)
        is_done = torch.zeros(B, nb, dtype=torch.bool, device=device)
        improvable = torch.ones(B, 1, dtype=torch.bool, device=device)  # could a running beam still win?
        top_nb = torch.arange(K, device=device) < nb
        offsets = torch.arange(B, device=device)[:, None] * nb
        for L in range(1, max_len):
            logprobs = next_logprobs(seqs.view(B * nb, L))  # (B, nb, L) -> (B*nb, L) -> (B*nb, V)
            V = logprobs.shape[-1]
            total = (logprobs.view(B, nb, V) + scores[..., None]).view(B, nb * V)  # (B, nb, V) -> (B, nb*V)
            cand_scores, cand = total.topk(K)  # (B, K), best first
            parent, token = cand // V, cand % V
            history = seqs.gather(1, parent[..., None].expand(-1, -1, L))  # (B, K, L): each candidate's parent
            cand_seqs = torch.cat([history, token[..., None]], dim=-1)  # (B, K, L+1)
            ended = (token == cfg.eos_token_id) | (L + 1 >= max_len)
            # candidates that ended may not run on: the nb best of the rest continue
            alive = cand_scores + ended.float() * NEG
            keep = alive.topk(nb).indices  # (B, nb)
            seqs = cand_seqs.gather(1, keep[..., None].expand(-1, -1, L + 1))
            scores, parent = alive.gather(1, keep), parent.gather(1, keep)
            # ended candidates among the top nb join the finished pool, if the pool can still change
            new = cand_scores / (L ** length_penalty)  # L = generated tokens including the one just added
            new = new + (is_done.all(-1, keepdim=True) & (early_stopping is True)).float() * NEG
            new = new + (~improvable).float() * NEG
            finished = ended & top_nb
            new = new + (~finished).float() * NEG
            pool_scores = torch.cat([done_scores, new], dim=1)  # (B, nb + K)
            best = pool_scores.topk(nb).indices
            pool_seqs = torch.cat([done_seqs, F.pad(cand_seqs, (0, max_len - L - 1), value=cfg.pad_token_id)], 1)
            done_seqs = pool_seqs.gather(1, best[..., None].expand(-1, -1, max_len))
            done_scores = pool_scores.gather(1, best)
            done_len = torch.cat([done_len, torch.full_like(token, L)], 1).gather(1, best)
            is_done = torch.cat([is_done, finished], 1).gather(1, best)
            cache.reorder((parent + offsets).view(-1))  # the self-attention keys/values follow their hypothesis
            # stop when no row can improve, or every row holds nb finished hypotheses (early_stopping=True)
            best_len = max_len - 1 if (early_stopping == "never" and length_penalty > 0) else L
            best_running = scores[:, :1] / (best_len ** length_penalty)
            worst_done = torch.where(is_done, done_scores.min(1, keepdim=True).values, NEG)
            improvable &= (best_running > worst_done).any(-1, keepdim=True)
            if not improvable.any() or (is_done.all() and early_stopping is True) or ended.all():
                break
        return done_seqs[:, 0, : 1 + int(done_len[:, 0].max())]

    @classmethod
    def from_pretrained(cls, folder):
        """Load a Florence-2 checkpoint in the transformers library's native layout (config.json plus
        model.safetensors or pytorch_model.bin). Returns the model in eval mode."""
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"checkpoint folder {folder!r} does not exist")
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no config.json in {folder!r}: expected a Florence-2 checkpoint folder")
        with open(config_path) as f:
            cfg = config_from_hf(json.load(f))
        generation_path = os.path.join(folder, "generation_config.json")
        if os.path.isfile(generation_path):  # as in transformers, it replaces the model config's decoding rules
            with open(generation_path) as f:
                gen = json.load(f)
            cfg = replace(cfg, **{k: gen.get(k) for k in ("forced_bos_token_id", "forced_eos_token_id")})
        model = cls(cfg)
        model.load_state_dict(hf_state_dict_to_ours(data.read_weights_folder(folder), model.state_dict()))
        return model.eval()


# ----------------------------------------------------------------------------------------------------
# 6. Tasks: the coordinate tokens, the prompts, the image input, and parsing answers back into structures
#
# A coordinate x in an image of width W becomes bin q = floor(x / (W / 1000)), clamped to [0, 999], and is
# written as the token <loc_q>; it reads back as the bin centre (q + 0.5) * W / 1000. Boxes are
# x0 y0 x1 y1, polygons and quads x0 y0 x1 y1 ..., always alternating x and y.

NUM_BINS = 1000
LOC_TOKENS = [f"<loc_{i}>" for i in range(NUM_BINS)]


def _bin_sizes(n, image_size):  # (n,) float32: W/1000, H/1000, W/1000, ... for n alternating x, y values
    W, H = image_size
    return torch.tensor([W / NUM_BINS, H / NUM_BINS], dtype=torch.float32).repeat((n + 1) // 2)[:n]


def quantize(coords, image_size):
    """Pixel coordinates (..., 2k), alternating x and y, -> integer bins in [0, 999]."""
    coords = torch.as_tensor(coords, dtype=torch.float32)
    return (coords / _bin_sizes(coords.shape[-1], image_size)).floor().clamp(0, NUM_BINS - 1).long()


def dequantize(bins, image_size):
    """Bins (..., 2k), alternating x and y, -> float32 pixel coordinates at the bin centres."""
    bins = torch.as_tensor(bins, dtype=torch.long)
    return (bins + 0.5) * _bin_sizes(bins.shape[-1], image_size)


def loc_text(coords, image_size):
    """Pixel coordinates -> the target text "<loc_a><loc_b>..." a model learns to write."""
    return "".join(LOC_TOKENS[q] for q in quantize(coords, image_size).flatten().tolist())


def preprocess(image, size):
    """The released processor's image path: RGB (transparency composited onto white), resized to size x size
    (the aspect ratio is not kept: boxes are relative to the image, so they are unchanged), bicubic,
    ImageNet-normalised -> (3, size, size)."""
    image = data.to_rgb(image)  # before resizing: a resize must not mix in the colours hidden under alpha 0
    return data.to_tensor(image.resize((size, size), Image.BICUBIC), data.IMAGENET_MEAN, data.IMAGENET_STD)


# task token -> (prompt, answer format); "{input}" marks the tasks that take a phrase or a region
TASKS = {
    "<CAPTION>": ("What does the image describe?", "pure_text"),
    "<DETAILED_CAPTION>": ("Describe in detail what is shown in the image.", "pure_text"),
    "<MORE_DETAILED_CAPTION>": ("Describe with a paragraph what is shown in the image.", "pure_text"),
    "<OD>": ("Locate the objects with category name in the image.", "description_with_bboxes"),
    "<DENSE_REGION_CAPTION>": ("Locate the objects in the image, with their descriptions.", "description_with_bboxes"),
    "<REGION_PROPOSAL>": ("Locate the region proposals in the image.", "bboxes"),
    "<CAPTION_TO_PHRASE_GROUNDING>": ("Locate the phrases in the caption: {input}", "phrase_grounding"),
    "<REFERRING_EXPRESSION_SEGMENTATION>": ("Locate {input} in the image with mask", "polygons"),
    "<REGION_TO_SEGMENTATION>": ("What is the polygon mask of region {input}", "polygons"),
    "<OPEN_VOCABULARY_DETECTION>": ("Locate {input} in the image.", "description_with_bboxes_or_polygons"),
    "<REGION_TO_CATEGORY>": ("What is the region {input}?", "pure_text"),
    "<REGION_TO_DESCRIPTION>": ("What does the region {input} describe?", "pure_text"),
    "<REGION_TO_OCR>": ("What text is in the region {input}?", "pure_text"),
    "<OCR>": ("What is the text in the image?", "pure_text"),
    "<OCR_WITH_REGION>": ("What is the text in the image, with regions?", "ocr"),
}


def _check_task(task):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


def task_prompt(task, text_input=None):
    """The prompt text the encoder reads for a task, e.g. task_prompt("<OPEN_VOCABULARY_DETECTION>", "a red star").
    Region inputs are written as loc tokens: task_prompt("<REGION_TO_CATEGORY>", loc_text(box, size))."""
    _check_task(task)
    prompt = TASKS[task][0]
    if "{input}" not in prompt:
        if text_input:
            raise ValueError(f"{task} takes no text input, got {text_input!r}")
        return prompt
    if not text_input or not text_input.strip():
        raise ValueError(f"{task} needs a text input (a phrase, or a region written as <loc_*> tokens)")
    return prompt.format(input=text_input.strip())


# Phrases that grounding never reports (the released post-processor's block list).
BANNED_GROUNDING_PHRASES = frozenset({
    "I", "a", "a group", "a set", "all", "an", "another", "any", "anybody", "anyone", "anything", "each",
    "each other", "everybody", "everyone", "everything", "few", "he", "her", "hers", "herself", "him",
    "himself", "his", "image", "images", "it", "its", "itself", "lots", "many", "me", "mine", "myself",
    "nobody", "none", "one", "one another", "oneself", "other objects", "our", "ours", "ourselves",
    "several", "she", "some", "somebody", "someone", "something", "that", "the", "the image", "their",
    "theirs", "them", "themselves", "these", "they", "this", "those", "us", "we", "what", "which", "who",
    "whom", "whose", "you", "your", "yours", "yourself", "yourselves"})

_LOC = r"<loc_(\d+)>"
_PHRASE_END = r"(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_"  # a phrase stops at markup or coordinates


def _bins(text):
    """All <loc_N> numbers in text. A malformed string may hold absurd numbers: cap them so nothing overflows."""
    return [int(n) if len(n) <= 18 else 10 ** 18 for n in re.findall(_LOC, text)]


def _points(bins, image_size):  # dequantized to integer pixels, as the released post-processor reports them
    return dequantize(bins, image_size).int().tolist()


def _strip_markers(text):
    return text.replace("<s>", "").replace("</s>", "").replace("<pad>", "")


def _parse_boxes(text, image_size, allow_empty_phrase=False, banned=frozenset()):
    """"phrase<loc><loc><loc><loc>[<loc>x4 ...] phrase ..." -> [(phrase, [box, ...])]."""
    text = _strip_markers(text)
    chunks = re.findall(r"(?:<loc_\d+>){4,}" if allow_empty_phrase else r"[^<]+(?:<loc_\d+>){4,}", text)
    out = []
    for chunk in chunks:
        chunk = chunk.replace("<ground>", "", 1).replace("<obj>", "", 1)
        phrase = re.search(r"^\s*(.*?)" + _PHRASE_END + ")", chunk)
        boxes = [_bins(m.group()) for m in re.finditer(_LOC * 4, chunk)]
        if phrase is None or not boxes or phrase.group().strip() in banned:
            continue
        name = phrase.group().strip().encode("ascii", "ignore").decode("ascii")  # labels are kept ASCII
        out.append((name, _points(boxes, image_size)))
    return out


def _parse_polygons(text, image_size, allow_empty_phrase=False):
    """"phrase<loc>...<sep><loc>..." or "phrase<poly><loc>...</poly>..." -> [(phrase, [polygon, ...])];
    one instance per <poly>...</poly>, polygons inside separated by <sep>."""
    text = _strip_markers(text)
    unit = r"(?:<loc_\d+>|<sep>|<poly>|</poly>){4,}"
    chunks = re.findall(unit if allow_empty_phrase else r"[^<]+" + unit, text)
    out = []
    for chunk in chunks:
        phrase = re.search(r"^\s*(.*?)" + _PHRASE_END + "|<poly>)", re.sub(r"^<loc_\d+>", "", chunk, count=1))
        if phrase is None:
            continue
        if "<poly>" in chunk and "</poly>" in chunk:
            instances = re.findall(r"<poly>(.*?)</poly>", chunk)
        else:
            instances = [chunk]
        for instance in instances:
            polygons = []
            for m in re.finditer(r"((?:<loc_\d+>)+)(?:<sep>|$)", instance):
                bins = _bins(m.group(1))
                polygons.append(_points(bins[: len(bins) // 2 * 2], image_size))  # drop an unpaired x
            if polygons:
                out.append((phrase.group().strip(), polygons))
    return out


def _parse_ocr(text, image_size):
    """"text<loc>x8 text<loc>x8 ..." -> [(text, quad)]; a quad is 4 corner points x, y."""
    matches = re.finditer(r"(.+?)" + _LOC * 8, _strip_markers(text))
    return [(m.group(1).strip(), _points(_bins(m.group()[len(m.group(1)):]), image_size)) for m in matches]


def post_process(text, task, image_size):
    """Parse a generated answer (decoded with special tokens kept) into the task's structure, the same as
    the transformers Florence2Processor.post_process_generation: {task: answer}. image_size = (W, H).
    Never raises on malformed text; unparseable parts are skipped."""
    _check_task(task)
    kind = TASKS[task][1]
    if kind == "pure_text":
        answer = text.replace("<s>", "").replace("</s>", "").strip()
    elif kind in ("description_with_bboxes", "bboxes"):
        found = _parse_boxes(text, image_size, allow_empty_phrase=kind == "bboxes")
        answer = {"bboxes": [b for _, boxes in found for b in boxes],
                  "labels": [name for name, boxes in found for _ in boxes]}
    elif kind == "phrase_grounding":
        found = _parse_boxes(text, image_size, banned=BANNED_GROUNDING_PHRASES)
        answer = {"bboxes": [b for _, boxes in found for b in boxes],
                  "labels": [name for name, boxes in found for _ in boxes]}
    elif kind == "polygons":
        found = _parse_polygons(text, image_size, allow_empty_phrase=True)
        answer = {"polygons": [p for _, p in found], "labels": [name for name, _ in found]}
    elif kind == "ocr":
        found = _parse_ocr(text, image_size)
        answer = {"quad_boxes": [q for _, q in found], "labels": [t for t, _ in found]}
    else:  # description_with_bboxes_or_polygons: polygons when the answer has any
        answer = {"bboxes": [], "bboxes_labels": [], "polygons": [], "polygons_labels": []}
        if "<poly>" in text:
            for name, polygons in _parse_polygons(text, image_size):
                answer["polygons"].append(polygons)
                answer["polygons_labels"].append(name)
        else:
            for name, boxes in _parse_boxes(text, image_size):
                answer["bboxes"] += boxes
                answer["bboxes_labels"] += [name] * len(boxes)
    return {task: answer}


# ----------------------------------------------------------------------------------------------------
# 7. Tokenizers: BART's byte-level BPE (GPT-2's), run by tiktoken; then the byte-level toy tokenizer
#
# GPT-2 BPE works on bytes shown as printable characters (vocab.json keys) and applies merges.txt in
# priority order. tiktoken instead merges the adjacent pair whose concatenation has the lowest rank, so
# giving each single byte a rank below all merges, and the token made by merge i the rank 256 + i (a
# merge repeating an earlier result is skipped, as it could never fire),
# reproduces the merge order. Added tokens (<s>, </s>, <loc_17>, <OD>, ...) are cut out of the text first.

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    """GPT-2's byte -> printable character map (printable Latin-1 bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


class BartTokenizer:
    def __init__(self, vocab, merges, added_tokens):
        """vocab: {token string: id}; merges: [(left, right)] in priority order; added_tokens: list of
        {"id", "content", "special", "lstrip", "rstrip"} matched literally before BPE."""
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        char_of = bytes_to_unicode()
        unk = vocab.get("<unk>")
        ranks, rank_to_id = {}, []
        for b in range(256):
            ranks[bytes([b])] = b
            rank_to_id.append(vocab.get(char_of[b], unk))
        for left, right in merges:
            merged = bytes(byte_of[c] for c in left + right)
            if merged not in ranks and left + right in vocab:  # a repeated merge never fires second
                ranks[merged] = len(ranks)
                rank_to_id.append(vocab[left + right])
        self.bpe = tiktoken.Encoding("bart-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
        self.rank_to_id = rank_to_id
        self.id_to_bytes = {i: bytes(byte_of[c] for c in tok) for tok, i in vocab.items()
                            if all(c in byte_of for c in tok)}
        self.added = {t["content"]: t for t in added_tokens}
        self.added_by_id = {t["id"]: t for t in added_tokens}
        self.vocab_size = 1 + max([*vocab.values(), *self.added_by_id])
        self._compile_added()
        ids = {t["content"]: t["id"] for t in added_tokens} | vocab
        self.bos_token_id, self.eos_token_id = ids.get("<s>"), ids.get("</s>")
        self.pad_token_id, self.unk_token_id = ids.get("<pad>"), unk

    def _compile_added(self):
        by_length = sorted(self.added, key=len, reverse=True)  # longest match first
        self.added_pattern = re.compile("|".join(map(re.escape, by_length))) if by_length else None

    def add_tokens(self, tokens):
        """Append the tokens it lacks with the next free ids, as the Florence-2 processor adds <loc_*> to BART's
        vocabulary (a released Florence-2 tokenizer already has them: nothing changes). Returns self."""
        for content in tokens:
            if content not in self.added:
                self.added[content] = self.added_by_id[self.vocab_size] = {"id": self.vocab_size, "content": content,
                                                                           "special": False}
                self.vocab_size += 1
        self._compile_added()
        return self

    @classmethod
    def from_pretrained(cls, folder):
        """From vocab.json + merges.txt (+ added_tokens.json), or from a tokenizer.json."""
        def read(name, parse=json.loads):  # the file's parsed content, or None when absent
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                return None
            with open(path, encoding="utf-8") as f:
                return parse(f.read())

        tokenizer_json, vocab, merges_txt = read("tokenizer.json"), read("vocab.json"), read("merges.txt", str)
        if vocab is not None and merges_txt is not None:
            lines = [line for line in merges_txt.split("\n") if line and not line.startswith("#version")]
            merges = [tuple(line.split(" ")) for line in lines]
        elif tokenizer_json is not None:
            vocab = tokenizer_json["model"]["vocab"]
            merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in tokenizer_json["model"]["merges"]]
        else:
            raise FileNotFoundError(f"{folder!r} holds neither vocab.json + merges.txt nor tokenizer.json")
        added = {}
        for name in ("<s>", "<pad>", "</s>", "<unk>", "<mask>"):  # BART's specials live in vocab.json
            if name in vocab:
                added[name] = {"id": vocab[name], "content": name, "special": True}
        for content, i in (read("added_tokens.json") or {}).items():
            added.setdefault(content, {"id": i, "content": content, "special": False})
        for t in (tokenizer_json or {}).get("added_tokens", []):  # carries the strip flags when present
            added[t["content"]] = t
        return cls(vocab, merges, list(added.values()))

    def encode(self, text, add_special_tokens=True):
        """Text -> ids; with add_special_tokens, wrapped as <s> ... </s> (the Florence-2 prompt form)."""
        ids, start = [], 0
        for m in self.added_pattern.finditer(text) if self.added_pattern else ():
            tok = self.added[m.group()]
            before = text[start:m.start()]
            ids += self._bpe(before.rstrip() if tok.get("lstrip") else before)  # lstrip: eat spaces before
            ids.append(tok["id"])
            start = m.end()
            if tok.get("rstrip"):  # eat spaces after
                start += len(text[start:]) - len(text[start:].lstrip())
        ids += self._bpe(text[start:])
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def _bpe(self, chunk):
        return [self.rank_to_id[r] for r in self.bpe.encode_ordinary(chunk)]

    def decode(self, ids, skip_special_tokens=False):
        text, buffer = [], bytearray()
        for i in (ids.tolist() if torch.is_tensor(ids) else ids):
            if i in self.added_by_id:
                text.append(buffer.decode("utf-8", errors="replace"))
                buffer.clear()
                if not (skip_special_tokens and self.added_by_id[i].get("special")):
                    text.append(self.added_by_id[i]["content"])
            elif i in self.id_to_bytes:
                buffer += self.id_to_bytes[i]
            else:
                raise ValueError(f"token id {i} is not in the vocabulary")
        return "".join(text) + buffer.decode("utf-8", errors="replace")

    def __call__(self, texts):
        return encode_batch(self, texts)


def pad_rows(rows, value):
    """Lists of ids -> one right-padded LongTensor (len(rows), longest)."""
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def encode_batch(tokenizer, texts):
    """A batch of prompts -> (input_ids, attention_mask), right-padded LongTensors (B, T)."""
    rows = [tokenizer.encode(t) for t in texts]
    return pad_rows(rows, tokenizer.pad_token_id), pad_rows([[1] * len(r) for r in rows], 0)


# The toy tokenizer: data.py's byte-level tiktoken encoding (no file, works offline) with BART's <s> </s> <pad>,
# the coordinate, markup and task tokens, and optionally whole-word tokens for the Shapes world. Bytes make
# long sequences: "a small red triangle and a large blue diamond" is 45 tokens, a detailed caption 150+, and a
# batch is as long as its longest answer. The Shapes world speaks a few dozen words, so "bytes+shapes" adds
# them as single tokens, which cuts answers about 3x; any other text still encodes byte by byte, losslessly.
# The 16 words written on the images are added with and without a leading space (an OCR answer's first word has
# none), as BART's BPE has most short words as one token: reading is then naming one of 16 words, not spelling it.
# tiktoken finds added tokens by leftmost match, so the words are prefix-free (" shape" but not " shapes", which
# becomes " shape" + "s") to make every text tokenize one way.
MARKUP_TOKENS = ("<poly>", "</poly>", "<sep>")
SHAPES_WORD_TOKENS = tuple(" " + w for w in (
    *data.SHAPES, *data.COLORS, *data.SIZES, *data.NUMBER_WORDS[2:], "shape", "The", "the", "is", "are", "and",
    "at", "in", "of", "top", "bottom", "left", "right", "center", "above", "below", "background", "dark", "light",
    "noisy", "gradient", "striped", "word", "written", "image")) + tuple(p + w for w in data.WORDS for p in ("", " "))


class ByteTokenizer:
    """The toy tokenizer, with BartTokenizer's interface (encode, decode, __call__, the special ids)."""

    def __init__(self, words=()):
        base = data.Tokenizer(data.get_tokenizer("bytes").encoding, bos="<s>", eos="</s>", pad="<pad>")
        self.tok = base.add_special_tokens([*LOC_TOKENS, *MARKUP_TOKENS, *TASKS, *words])
        self.bos_token_id, self.eos_token_id, self.pad_token_id = self.tok.bos_id, self.tok.eos_id, self.tok.pad_id
        self.vocab_size = self.tok.n_vocab

    def encode(self, text, add_special_tokens=True):
        """Text -> ids; with add_special_tokens, wrapped as <s> ... </s>."""
        return self.tok.encode(text, bos=add_special_tokens, eos=add_special_tokens)

    def decode(self, ids, skip_special_tokens=False):
        """Ids -> text; every added token is written out (<s>, <loc_12>, ...) unless skip_special_tokens drops
        <s> </s> <pad>. Bytes that do not form UTF-8 (a model's half-written character) become U+FFFD."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in (self.bos_token_id, self.eos_token_id, self.pad_token_id)]
        return self.tok.decode(ids, skip_special=False)

    def __call__(self, texts):
        return encode_batch(self, texts)


# ====================================================================================================
# The paper's model ends here. What follows is the machinery around it: released weights, the training data, the
# training stage and the CPU toy's aids, evaluation, the command line.
# ====================================================================================================


# ----------------------------------------------------------------------------------------------------
# 8. Released weights: the transformers-native layout (the files are read by data.read_weights_folder)

def config_from_hf(hf):
    """Our config from a transformers Florence2Config dict (absent keys keep our base defaults, except that
    an absent forced_bos/eos_token_id means no forcing)."""
    if hf.get("model_type") != "florence2":
        raise ValueError(f"config.json has model_type {hf.get('model_type')!r}, expected 'florence2' (the "
                         f"transformers-native layout; the older trust_remote_code layout is not supported)")
    v, t = hf.get("vision_config") or {}, hf.get("text_config") or {}
    vision_keys = {"in_channels": "in_channels", "depths": "depths", "embed_dims": "embed_dim",
                   "num_heads": "num_heads", "num_groups": "num_groups", "patch_size": "patch_size",
                   "patch_stride": "patch_stride", "patch_padding": "patch_padding",
                   "patch_prenorm": "patch_prenorm", "window_size": "window_size", "mlp_ratio": "mlp_ratio",
                   "qkv_bias": "qkv_bias", "drop_path_rate": "drop_path_rate"}
    text_keys = {"vocab_size": "vocab_size", "d_model": "d_model", "encoder_layers": "encoder_layers",
                 "decoder_layers": "decoder_layers", "encoder_heads": "encoder_attention_heads",
                 "decoder_heads": "decoder_attention_heads", "encoder_ffn_dim": "encoder_ffn_dim",
                 "decoder_ffn_dim": "decoder_ffn_dim", "max_position_embeddings": "max_position_embeddings",
                 "activation": "activation_function", "dropout": "dropout",
                 "attention_dropout": "attention_dropout", "activation_dropout": "activation_dropout",
                 "scale_embedding": "scale_embedding", "pad_token_id": "pad_token_id",
                 "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
                 "decoder_start_token_id": "decoder_start_token_id"}
    vision = DaViTConfig(**{ours: tuple(v[k]) if isinstance(v[k], list) else v[k]
                            for ours, k in vision_keys.items() if k in v})
    cfg = Florence2Config(vision=vision, **{ours: t[k] for ours, k in text_keys.items() if k in t})
    cfg = replace(cfg, max_image_positions=v.get("max_position_embeddings", cfg.max_image_positions),
                  max_temporal_embeddings=v.get("max_temporal_embeddings", cfg.max_temporal_embeddings),
                  forced_bos_token_id=t.get("forced_bos_token_id"),  # absent means "not forced"
                  forced_eos_token_id=t.get("forced_eos_token_id"))
    if v.get("projection_dim", cfg.d_model) != cfg.d_model:
        raise ValueError(f"vision projection_dim {v['projection_dim']} != text d_model {cfg.d_model}")
    return cfg


# transformers name -> our name, applied in order
HF_NAME_RULES = [
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"\.(window|channel)_attn\.", ".attn."),
    (r"^model\.multi_modal_projector\.image_projection\.", "projector.proj."),
    (r"^model\.multi_modal_projector\.image_proj_norm\.", "projector.norm."),
    (r"^model\.multi_modal_projector\.image_position_embed\.row_embeddings\.", "projector.row_embed."),
    (r"^model\.multi_modal_projector\.image_position_embed\.column_embeddings\.", "projector.col_embed."),
    (r"^model\.language_model\.shared\.", "embed_tokens."),
    (r"^model\.language_model\.", ""),
    (r"\.layers\.(\d+)\.fc([12])\.", r".layers.\1.ffn.fc\2."),
]
HF_TIED = ("lm_head.weight", "model.language_model.encoder.embed_tokens.weight",
           "model.language_model.decoder.embed_tokens.weight")  # copies of the shared token embedding
HF_DERIVED = ("model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed",)  # a fixed sinusoid table


def hf_state_dict_to_ours(hf, ours):
    out = {}
    for name, tensor in hf.items():
        if name in HF_DERIVED:
            continue
        if name in HF_TIED:
            if "embed_tokens.weight" in out and not torch.equal(out["embed_tokens.weight"], tensor):
                raise ValueError(f"{name} differs from the token embedding: untied heads are not supported")
            out["embed_tokens.weight"] = tensor
            continue
        for pattern, repl in HF_NAME_RULES:
            name = re.sub(pattern, repl, name)
        out[name] = tensor
    unexpected, missing = sorted(set(out) - set(ours)), sorted(set(ours) - set(out))
    if unexpected or missing:
        raise ValueError(f"checkpoint does not match the config: {len(unexpected)} unexpected keys "
                         f"{unexpected[:5]}, {len(missing)} missing keys {missing[:5]}")
    wrong = [f"{k}: {tuple(out[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items() if out[k].shape != v.shape]
    if wrong:
        raise ValueError(f"checkpoint shapes do not match the config: {wrong[:5]}")
    return out


# ----------------------------------------------------------------------------------------------------
# 9. Task data: every task's target text from a Shapes-world sample, and a reader for real annotations
#
# Florence-2 trains on (image, task, input, target) tuples drawn from one annotation set per image (FLD-5B).
# Here the Shapes world (data.py) is that annotation set: each builder turns a sample, annotated in pixels,
# into (text input or None, target text), with boxes, polygons and quads written as <loc_*> tokens in the
# layout the public post-processor parses, so post_process(target) gives the annotation back to within a bin.


def _description(obj):  # "large red circle": a region's description (dense captions, region tasks)
    return f"{obj['size']} {obj['color']} {obj['category']}"


def _caption_phrases(sample):
    """The caption's phrases with their objects, in caption order: [("two small blue stars", [obj, obj]), ...].
    They are made by data.phrase, the function that wrote the caption, so they are its exact words."""
    groups = {}
    for obj in sample["objects"]:
        groups.setdefault(_description(obj), []).append(obj)
    return [(data.phrase(len(objs), name), objs) for name, objs in groups.items()]


OCR_TASKS = ("<OCR>", "<OCR_WITH_REGION>", "<REGION_TO_OCR>")  # only for samples with words


def shapes_target(sample, task, rng, grounding=None):
    """(text input or None, target text) of `task` for a Shapes-world sample. Where a task is about one object
    or word, `rng` picks it. Phrase grounding takes the whole caption or one referring expression, at random
    unless grounding="caption" or "reference" says which."""
    size = sample["image"].size
    loc = lambda coords: loc_text(coords, size)  # noqa: E731  pixels -> "<loc_a><loc_b>..."
    objects, obj = sample["objects"], rng.choice(sample["objects"])
    word = rng.choice(sample["ocr"]) if sample["ocr"] else None
    if task in OCR_TASKS and word is None:
        raise ValueError(f"{task} needs a sample with words (sample {sample.get('index')} has none)")
    if task == "<CAPTION>":
        return None, sample["caption"]
    if task == "<DETAILED_CAPTION>":
        return None, sample["detailed_caption"]
    if task == "<MORE_DETAILED_CAPTION>":
        return None, sample["more_detailed_caption"]
    if task == "<OD>":  # "circle<box>star<box>", objects left to right
        return None, "".join(o["category"] + loc(o["box"]) for o in objects)
    if task == "<DENSE_REGION_CAPTION>":  # "large red circle<box>small blue star<box>"
        return None, "".join(_description(o) + loc(o["box"]) for o in objects)
    if task == "<REGION_PROPOSAL>":  # "<box><box>"
        return None, "".join(loc(o["box"]) for o in objects)
    if task == "<CAPTION_TO_PHRASE_GROUNDING>":
        if (grounding or ("reference" if rng.random() < 0.5 else "caption")) == "reference":
            return obj["ref"], obj["ref"] + loc(obj["box"])  # "the red circle" -> "the red circle<box>"
        phrases = _caption_phrases(sample)  # "a large red circle<box>two small blue stars<box><box>"
        return sample["caption"], "".join(p + "".join(loc(o["box"]) for o in objs) for p, objs in phrases)
    if task == "<REFERRING_EXPRESSION_SEGMENTATION>":  # "the red circle" -> "<x0><y0><x1><y1>..."
        return obj["ref"], loc(obj["polygon"])
    if task == "<REGION_TO_SEGMENTATION>":  # "<box>" -> "<x0><y0><x1><y1>..."
        return loc(obj["box"]), loc(obj["polygon"])
    if task == "<OPEN_VOCABULARY_DETECTION>":  # "star" or "red star" -> "red star<box><box>", every match
        name = rng.choice((obj["category"], f"{obj['color']} {obj['category']}"))
        hits = [o for o in objects if name in (o["category"], f"{o['color']} {o['category']}")]
        return name, name + "".join(loc(o["box"]) for o in hits)
    if task == "<REGION_TO_CATEGORY>":  # "<box>" -> "circle"
        return loc(obj["box"]), obj["category"]
    if task == "<REGION_TO_DESCRIPTION>":  # "<box>" -> "large red circle"
        return loc(obj["box"]), _description(obj)
    if task == "<REGION_TO_OCR>":  # "<box>" -> "CAT"
        q = word["quad"]
        return loc([min(q[0::2]), min(q[1::2]), max(q[0::2]), max(q[1::2])]), word["text"]
    if task == "<OCR>":  # "CAT DOG", in reading order
        return None, " ".join(w["text"] for w in sample["ocr"])
    if task == "<OCR_WITH_REGION>":  # "CAT<quad>DOG<quad>"
        return None, "".join(w["text"] + loc(w["quad"]) for w in sample["ocr"])
    _check_task(task)


def make_example(sample, tasks, rng):
    """A raw sample -> (task, text input or None, target). A real annotation (TaskFile) carries its own task; a
    Shapes-world sample gets one drawn by `rng` from `tasks` (repeats weigh), among those it can answer."""
    if "task" in sample:
        return sample["task"], sample["input"], sample["target"]
    task = rng.choice([t for t in tasks if sample["ocr"] or t not in OCR_TASKS])  # build_datasets: never empty
    return (task, *shapes_target(sample, task, rng))


class TaskFile(data.ImageTextFile):
    """Florence-2 style annotations for fine-tuning, one JSON object per line:
        {"image": "cars/1.jpg", "task": "<OD>", "target": "car<loc_52><loc_333><loc_932><loc_774>"}
        {"image": "cars/1.jpg", "task": "<CAPTION_TO_PHRASE_GROUNDING>", "input": "a red car", "target": "..."}
    coordinates quantised against the image's own size (loc_text). data.ImageTextFile does the reading: every
    line is checked up front ("file:line: field 'task' ..."), images open lazily, skip_bad drops bad rows into
    `skipped` and makes a bad image come back as None."""
    FORMATS = {".jsonl": None}

    def __init__(self, path, image_root=None, skip_bad=False):
        super().__init__(path, image_root=image_root, caption_field="target", skip_bad=skip_bad)

    def validate(self, row, where):
        image, target, where = super().validate(row, where)  # "image" and "target": non-empty strings
        task, text_input = row.get("task"), row.get("input")
        if task is None:
            raise data.DataError(f"{where}: field 'task' is missing")
        if not isinstance(task, str) or task not in TASKS:
            raise data.DataError(f"{where}: field 'task' is {task!r}, not a Florence-2 task; valid tasks: "
                                 f"{', '.join(TASKS)}")
        if text_input is not None and not isinstance(text_input, str):
            raise data.DataError(f"{where}: field 'input' must be a string, found {type(text_input).__name__}")
        try:
            task_prompt(task, text_input)
        except ValueError as e:
            raise data.DataError(f"{where}: field 'input': {e}") from None
        return image, {"task": task, "input": text_input.strip() if text_input else None, "target": target}, where

    def __getitem__(self, index):
        sample = super().__getitem__(index)  # {"image", "caption": what validate kept, "source"}, or None
        return None if sample is None else {"image": sample["image"], **sample["caption"], "source": sample["source"]}


# ----------------------------------------------------------------------------------------------------
# 10. The training stage: the protocol that train.py drives (CONFIGS, TRAIN, build_vocab, build_model,
# build_datasets, collate, compute_loss; evaluate is in section 12). The toy's aids are in section 11.


@dataclass
class StageConfig:
    model: str = "toy"  # a MODELS name (ignored with `pretrained`)
    pretrained: str = ""  # a transformers-layout Florence-2 folder to fine-tune (its config, weights and dropout)
    tokenizer: str = "bytes+shapes"  # "bytes", "bytes+shapes" (section 7) or a folder with BART's vocab.json +
    #                                  merges.txt or tokenizer.json ("" = the pretrained folder's)
    prompt: str = "token"  # "token": the task token then its input ("<OD>"); "text": the released sentences
    dropout: float = 0.0  # BART dropout and attention dropout
    drop_path_rate: float = 0.0  # DaViT stochastic depth
    max_target_tokens: int = 128  # answers are cut to this many tokens (</s> kept); also the generation limit
    # the CPU toy's training aids, not the paper's (0 = off; "The CPU toy's training aids" below says what each is
    # for): Gaussian coordinate targets (std in bins), label smoothing of the answers' tokens, the word head's and
    # the attribute head's loss weights (Shapes world only)
    loc_sigma: float = 0.0
    label_smoothing: float = 0.0
    ocr_aux: float = 0.0
    attr_aux: float = 0.0
    # data: "shapes" (the built-in world, a fresh image per sample) or a TaskFile .jsonl of real annotations
    data: str = "shapes"
    val_data: str = ""  # a .jsonl file; for "shapes" the val split is used
    image_root: str = ""  # folder that image paths in .jsonl files are relative to ("" = the file's folder)
    tasks: str = ",".join(TASKS)  # the Shapes-world mixture; a task listed twice is drawn twice as often
    # another mixture for the first `early_frac` and the last `late_frac` of the steps (a toy aid): those of
    # early_tasks / late_tasks that are in `tasks`, so a narrower --tasks is never given tasks it left out
    early_tasks: str = ""
    early_frac: float = 0.0
    late_tasks: str = ""
    late_frac: float = 0.0
    train_size: int = 100000  # Shapes world: distinct training images
    val_size: int = 200  # Shapes world: val images, each asked the five metric tasks; 0 = no eval
    max_objects: int = 3  # Shapes world: 1..max_objects shapes per image
    ocr_prob: float = 0.5  # Shapes world: chance that an image has words
    eval_batch_size: int = 50


CONFIGS = {
    # CPU toy: the Shapes-world mixture of all 15 tasks on MODELS["toy"] (96 px, 1.95M parameters) with every
    # training aid on; 1000 val images, as at 200 a caption exact match of 0.80 has a standard error of 0.028
    "toy": StageConfig(loc_sigma=20.0, label_smoothing=0.1, ocr_aux=0.05, attr_aux=0.1, val_size=1000,
                       early_frac=0.25, early_tasks=",".join([*TASKS, "<OCR>"]),
                       late_frac=0.4, late_tasks=",".join(
        ["<CAPTION>"] * 2 + ["<OD>"] + ["<CAPTION_TO_PHRASE_GROUNDING>", "<REFERRING_EXPRESSION_SEGMENTATION>",
                                        "<OPEN_VOCABULARY_DETECTION>"] * 2 + ["<OCR>"])),
    # the paper's sizes, from scratch on your annotations (--data=file.jsonl --tokenizer=FOLDER) or fine-tuning
    # released weights (--pretrained=FOLDER); prompts are the released sentences so the two can be mixed
    "base": StageConfig(model="base", tokenizer="", prompt="text", dropout=0.1, drop_path_rate=0.1, data="",
                        max_target_tokens=1024, train_size=0, val_size=0),
    "large": StageConfig(model="large", tokenizer="", prompt="text", dropout=0.1, drop_path_rate=0.1, data="",
                         max_target_tokens=1024, train_size=0, val_size=0),
}

# Optimisation settings per named config (train.py TrainConfig fields). toy: 3600 steps fit the 30-minute budget
# of the 2-core CPU on a slow day; 400 warmup steps, as early full-lr steps let the coordinate tasks wipe colour
# out of the image features. base/large: a starting point for fine-tuning-scale runs, ours, not the paper's.
TRAIN = {
    "toy": dict(batch_size=32, max_iters=3600, lr=1e-3, warmup_iters=400, weight_decay=0.05, log_interval=50,
                ckpt_interval=500),
    "base": dict(batch_size=256, max_iters=20000, lr=1e-5, warmup_iters=500, weight_decay=0.01, beta2=0.999),
    "large": dict(batch_size=256, max_iters=20000, lr=5e-6, warmup_iters=500, weight_decay=0.01, beta2=0.999),
}


def build_vocab(cfg: StageConfig):
    """The stage's text side: the toy's byte tokenizer, or BART's from a folder with the coordinate tokens added."""
    if cfg.tokenizer in ("bytes", "bytes+shapes"):
        return ByteTokenizer(SHAPES_WORD_TOKENS if cfg.tokenizer == "bytes+shapes" else ())
    folder = cfg.tokenizer or cfg.pretrained
    if not folder:
        raise ValueError("config field 'tokenizer' is empty: pass --tokenizer=bytes, --tokenizer=bytes+shapes or "
                         "--tokenizer=FOLDER (BART vocab.json + merges.txt, e.g. a Florence-2 checkpoint folder)")
    tokenizer = BartTokenizer.from_pretrained(folder)
    # a plain BART vocabulary lacks the coordinate tokens: append them as the Florence-2 processor does
    return tokenizer.add_tokens([*LOC_TOKENS, *MARKUP_TOKENS, *(TASKS if cfg.prompt == "token" else ())])


def build_model(cfg: StageConfig, tokenizer) -> Florence2:
    """The paper's Florence2, or ToyFlorence2 (below) when a cell-head aid is on."""
    if cfg.pretrained:
        model = Florence2.from_pretrained(cfg.pretrained).train()
        if model.cfg.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but {cfg.pretrained} only "
                             f"{model.cfg.vocab_size} embeddings")
        return model
    if cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; valid models: {', '.join(MODELS)}")
    m = MODELS[cfg.model]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    model_cfg = replace(m, vision=replace(m.vision, drop_path_rate=cfg.drop_path_rate),
                        vocab_size=tokenizer.vocab_size, dropout=cfg.dropout, attention_dropout=cfg.dropout,
                        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, decoder_start_token_id=eos,
                        forced_bos_token_id=bos, forced_eos_token_id=eos)
    words = len(data.WORDS) if aid_on(cfg, cfg.ocr_aux) else 0
    attrs = len(data.COLORS) + len(data.SHAPES) if aid_on(cfg, cfg.attr_aux) else 0
    return ToyFlorence2(model_cfg, words, attrs) if words or attrs else Florence2(model_cfg)


def image_size(cfg: StageConfig):
    """The square side images are resized to: the model's, or for released weights their processor's."""
    if not cfg.pretrained:
        return MODELS[cfg.model].image_size
    path = os.path.join(cfg.pretrained, "preprocessor_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f).get("size", {}).get("height", Florence2Config.image_size)
    return Florence2Config.image_size


def build_datasets(cfg: StageConfig, seed: int, skip_bad: bool = False):
    """-> (train dataset, val dataset or None) of raw samples: Shapes-world dicts or TaskFile rows."""
    if not (0 <= cfg.early_frac and 0 <= cfg.late_frac and cfg.early_frac + cfg.late_frac <= 1):
        raise ValueError(f"need early_frac, late_frac >= 0 with early_frac + late_frac <= 1 (the two phases must "
                         f"not overlap), got {cfg.early_frac} and {cfg.late_frac}")
    for key in ("tasks",) + tuple(k for k in ("early_tasks", "late_tasks") if getattr(cfg, k)):
        mixture = getattr(cfg, key)
        for task in mixture.split(","):
            _check_task(task)  # an unknown task in --tasks lists the valid ones before any training
        if cfg.data == "shapes" and all(task in OCR_TASKS for task in mixture.split(",")):
            raise ValueError(f"every task of --{key}={mixture} needs words, and a Shapes-world image has none with "
                             f"probability 1 - ocr_prob (or when they do not fit): add a task without OCR")
    if cfg.data == "shapes":
        world = dict(size=image_size(cfg), seed=seed, max_objects=cfg.max_objects, ocr_prob=cfg.ocr_prob)
        return (data.ShapesWorld("train", n=cfg.train_size, **world),
                data.ShapesWorld("val", n=cfg.val_size, **world) if cfg.val_size else None)
    if not cfg.data:
        raise ValueError("config field 'data' is empty: pass --data=shapes or --data=FILE.jsonl "
                         "(lines of {\"image\", \"task\", \"input\", \"target\"})")
    root = cfg.image_root or None
    return (TaskFile(cfg.data, root, skip_bad),
            TaskFile(cfg.val_data, root, skip_bad) if cfg.val_data else None)


def prompt_text(task, text_input, style):
    """The encoder's text for a task: the released sentence ("text"), or the task token then its input."""
    sentence = task_prompt(task, text_input)  # also checks the task and its input
    return sentence if style == "text" else task + (text_input or "")


def collate(samples, tokenizer, cfg: StageConfig, rngs=None, progress=None):
    """Raw samples -> batch tensors. rngs: one random.Random per sample in training, which draws its task (and
    object); None (evaluation) draws with a fixed seed per position. progress: the share of the training steps
    done (it picks the toy's early or late mixture). Florence-2's decoder reads the answer shifted right behind
    </s> (BART's decoder start) and learns to write <s> answer </s>."""
    tasks = mixture_at(cfg, progress)
    rngs = rngs or [random.Random(i) for i in range(len(samples))]
    examples = [make_example(s, tasks, r) for s, r in zip(samples, rngs)]
    size = image_size(cfg)
    pixel_values = torch.stack([preprocess(s["image"], size) for s in samples])  # (B, 3, size, size)
    input_ids, attention_mask = tokenizer([prompt_text(t, i, cfg.prompt) for t, i, _ in examples])  # (B, P)
    targets = [tokenizer.encode(target) for _, _, target in examples]
    targets = [t if len(t) <= cfg.max_target_tokens else t[:cfg.max_target_tokens - 1] + t[-1:] for t in targets]
    labels = pad_rows(targets, -100)  # (B, T), -100 = not a target
    start = torch.full_like(labels[:, :1], tokenizer.eos_token_id)  # (B, 1)
    decoder_input_ids = torch.cat([start, labels[:, :-1]], 1)  # (B, T)
    decoder_input_ids = decoder_input_ids.masked_fill(labels == -100, tokenizer.pad_token_id)
    batch = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask,
             "decoder_input_ids": decoder_input_ids, "labels": labels}
    return {**batch, **aid_targets(samples, labels, tokenizer, cfg)}


def compute_loss(model, batch):
    """Cross entropy on the answer tokens (the paper's only loss), averaged per answer and then over answers:
    every (image, task) example weighs the same whatever its length, so a 40-token polygon does not drown a
    2-token category, and the mean over a batch is the mean of its micro-batches (accumulation, DDP). The toy's
    aids (below) soften the targets and add their heads' losses when the batch carries their fields."""
    labels = batch["labels"]
    valid = labels != -100  # (B, T): the answer tokens; a row's are its first ones (collate pads at the end)
    # logits (N, vocab) of the N answer tokens in row order: the model decodes rows grouped by answer length
    args = batch["pixel_values"], batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"]
    if "words" in batch or "attrs" in batch:  # ToyFlorence2's cell heads
        logits, cells = model(*args, answer_lengths=valid.sum(1), cells=True)
    else:
        logits, cells = model(*args, answer_lengths=valid.sum(1)), {}
    smoothing = float(batch["label_smoothing"]) if "label_smoothing" in batch else 0.0
    nll = F.cross_entropy(logits.float(), labels[valid], reduction="none", label_smoothing=smoothing)  # (N,)
    if "loc_bins" in batch:
        nll = nll.masked_scatter(*coordinate_kl(logits, batch["loc_bins"][valid], batch))
    per_answer = torch.zeros(labels.shape[0], device=nll.device).index_add(0, valid.nonzero()[:, 0], nll)  # (B,)
    loss = (per_answer / valid.sum(1)).mean()
    return cell_head_losses(loss, cells, batch)


# ----------------------------------------------------------------------------------------------------
# 11. The CPU toy's training aids
#
# Not Florence-2's: what a 2-million-parameter model trained from scratch for minutes on a CPU needs to learn
# the 15-task Shapes-world mixture. Each is a config field, on in the "toy" configs (the stem in MODELS, the rest
# in CONFIGS) and off in "base" and "large"; the cell heads are off for real data and released weights too
# (aid_on). What fails without each, and the runs that chose it: docs/florence2-toy.md.
#   stem             a BatchNorm conv stem makes DaViT's first map (Stem): attention blocks trained from scratch
#                    need far more samples to learn shape than a CPU gives in minutes
#   loc_sigma        a coordinate's target is a Gaussian over the bins (std 20 bins = 1.9 px at 96 px), not one
#                    bin: each pixel spans ~10 bins, and one-hot targets treat a 1-bin miss like a 500-bin miss
#   label_smoothing  trained to put no probability on "circle" after "orange", the decoder never names a
#                    colour-shape pair held out of training
#   ocr_aux          a word head: the cell of the image map under each written word names it; from the decoder's
#                    OCR answers alone the toy's tower does not learn to read within the budget
#   attr_aux         an attribute head: the cell under each object's centre names its colour and, apart, its
#                    shape, so the map codes them apart and a held-out pair's colour reads as a seen one's
#   early_*, late_*  <OCR> twice as often at first, so the decoder learns to look at the words; a late phase of
#                    mostly the tasks that name an object by its words, which teaches the text side to find it


class Stem(coswin.ConvStem):
    """The CPU toy's stage-1 embedding (DaViTConfig.stem), not the paper's: CoSwin's BatchNorm conv stem (3x3
    convs, a 2x2 max pool after each width, then LayerNorm) in place of the 7x7 stride-4 conv. A transformer
    needs many samples to learn shape from patches; early convolutions make it sample-efficient (Xiao et al.,
    2021), which is what a CPU toy trained for minutes needs."""

    def forward(self, x):  # (B, C_in, H, W) -> (B, C, H / 2^k, W / 2^k)
        return super().forward(x).permute(0, 3, 1, 2)


def aid_on(cfg: StageConfig, weight: float):
    """The cell heads name the Shapes world's 16 words, 6 colours and 6 shapes, learnt from scratch: real
    annotations have no such fixed lists, and released weights already read and see, so both are ignored with
    --data=FILE or --pretrained."""
    return weight > 0 and cfg.data == "shapes" and not cfg.pretrained


def mixture_at(cfg: StageConfig, progress):
    """The tasks to draw from at `progress` (share of the training steps done; None in evaluation): those of
    early_tasks for the first early_frac of the steps, of late_tasks for the last late_frac, else `tasks`."""
    tasks = cfg.tasks.split(",")
    if progress is not None and progress < cfg.early_frac:
        tasks = [t for t in cfg.early_tasks.split(",") if t in tasks] or tasks
    elif progress is not None and progress >= 1 - cfg.late_frac:
        tasks = [t for t in cfg.late_tasks.split(",") if t in tasks] or tasks
    return tasks


class ToyFlorence2(Florence2):
    """Florence2 with the cell heads: linear layers on the vision tower's map (B, C, h, w) that name, per cell, one
    of `word_classes` written words and an object's colour and shape (`attr_classes` = 6 + 6). Generation never
    uses them. The word head draws its initial weights before the text side's init and the attribute head after
    it, so that a seed gives the same initial model with or without the attribute head."""

    def __init__(self, cfg: Florence2Config, word_classes=0, attr_classes=0):
        self._text_init_waits = True  # a plain attribute, which nn.Module allows before its __init__
        super().__init__(cfg)  # its closing init_text_weights() waits (below) until the word head is drawn
        width = cfg.vision.embed_dims[-1]
        self.word_head = nn.Linear(width, word_classes) if word_classes else None
        self._text_init_waits = False
        self.init_text_weights()
        self.attr_head = nn.Linear(width, attr_classes) if attr_classes else None

    def init_text_weights(self):
        if not self._text_init_waits:
            super().init_text_weights()

    def forward(self, pixel_values, input_ids, decoder_input_ids, attention_mask=None, answer_lengths=None,
                groups=4, cells=False):
        """Florence2.forward; with cells=True also {"words": (B, h, w, word_classes), "attrs": (B, h, w,
        attr_classes)} of the heads the model has, computed inside forward so that DDP syncs their gradients."""
        image_map = self.image_map(pixel_values)  # (B, C, h, w)
        logits = super().forward(pixel_values, input_ids, decoder_input_ids, attention_mask, answer_lengths, groups,
                                 image_map)
        if not cells:
            return logits
        heads = {"words": self.word_head, "attrs": self.attr_head}
        if all(head is None for head in heads.values()):
            raise ValueError("cells=True needs a model built with word_classes or attr_classes > 0 "
                             "(StageConfig.ocr_aux or attr_aux > 0)")
        grid = image_map.permute(0, 2, 3, 1)  # (B, h, w, C)
        return logits, {name: head(grid) for name, head in heads.items() if head is not None}


def aid_targets(samples, labels, tokenizer, cfg: StageConfig):
    """The batch fields the aids that are on need: the bin of each <loc_*> target (loc_sigma), the smoothing,
    each image's words and objects with their centres (the cell heads)."""
    batch = {}
    if cfg.loc_sigma > 0:  # the bin of each <loc_*> target (-1 elsewhere)
        first = loc_first_id(tokenizer)
        bins = labels - first
        batch["loc_bins"] = bins.masked_fill((bins < 0) | (bins >= NUM_BINS), -1)  # (B, T); -100 falls below 0
        batch["loc_first"], batch["loc_sigma"] = torch.tensor(first), torch.tensor(float(cfg.loc_sigma))
    if cfg.label_smoothing > 0:
        batch["label_smoothing"] = torch.tensor(float(cfg.label_smoothing))
    if aid_on(cfg, cfg.ocr_aux):  # the words each image shows (their data.WORDS index, -1 = none) and their centres
        batch["words"], batch["word_xy"] = cell_targets(
            [[((data.WORDS.index(w["text"]),), w["quad"]) for w in s["ocr"]] for s in samples], samples)
        batch["words"] = batch["words"][..., 0]  # (B, n)
        batch["ocr_aux"] = torch.tensor(float(cfg.ocr_aux))
    if aid_on(cfg, cfg.attr_aux):  # each object's colour and shape (data.COLORS, data.SHAPES index) and its centre
        batch["attrs"], batch["attr_xy"] = cell_targets(
            [[((data.COLORS.index(o["color"]), data.SHAPES.index(o["category"])), o["box"]) for o in s["objects"]]
             for s in samples], samples)  # (B, n, 2), (B, n, 2)
        batch["attr_aux"] = torch.tensor(float(cfg.attr_aux))
    return batch


def cell_targets(rows, samples):
    """rows[b] = [(class ids, box or quad in pixels), ...] for image b -> (ids (B, n, k), -1 = none; centres
    (B, n, 2) as fractions of the image's width and height)."""
    n, k = max(1, max(map(len, rows))), max((len(ids) for row in rows for ids, _ in row), default=1)
    ids, xy = torch.full((len(rows), n, k), -1), torch.zeros(len(rows), n, 2)
    for b, (row, sample) in enumerate(zip(rows, samples)):
        width, height = sample["image"].size
        for j, (classes, coords) in enumerate(row):
            xs, ys = coords[0::2], coords[1::2]  # a box's two corners or a quad's four: the mean is the centre
            ids[b, j] = torch.tensor(classes)
            xy[b, j] = torch.tensor([sum(xs) / len(xs) / width, sum(ys) / len(ys) / height])
    return ids, xy


def loc_first_id(tokenizer):
    """The id of <loc_0>; the coordinate tokens must have consecutive ids (both tokenizers add them so)."""
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in (LOC_TOKENS[0], LOC_TOKENS[-1])]
    if any(len(i) != 1 for i in ids) or ids[1][0] - ids[0][0] != NUM_BINS - 1:
        raise ValueError("loc_sigma needs <loc_0>..<loc_999> as consecutive single tokens in the tokenizer")
    return ids[0][0]


def coordinate_kl(logits, bins, batch):
    """loc_sigma: logits (N, vocab) and bins (N,) of the answer tokens (-1 where not a <loc_*>) -> (is_loc (N,),
    KL(soft || p) of each coordinate token), where soft is a Gaussian of std loc_sigma bins around the target
    bin; 0 when the model's distribution over the bins matches it. compute_loss puts it in place of the
    cross entropy of those tokens."""
    is_loc = bins >= 0
    first, sigma = int(batch["loc_first"]), batch["loc_sigma"]
    logp = F.log_softmax(logits[is_loc].float(), -1)[:, first:first + NUM_BINS]  # (n, 1000) over the vocab
    k = torch.arange(NUM_BINS, device=logits.device)
    soft = torch.softmax(-0.5 * ((k - bins[is_loc, None]) / sigma) ** 2, -1)  # (n, 1000)
    return is_loc, (torch.special.xlogy(soft, soft) - soft * logp).sum(-1)


def cell_head_losses(loss, cells, batch):
    """loss plus the cell heads' weighted losses -> (loss, logs). The cell under each word's centre names the word
    (cross entropy over the 16 words), the cell under each object's centre its colour and its shape (two 6-way
    cross entropies). Only those cells are asked: a loss over every cell pulls each towards words, and the stem
    loses shape. Means over the batch's words and objects, so unlike the answers' loss not exactly the mean of
    its micro-batches'."""
    logs = {}
    if "words" in batch:
        target = batch["words"]  # (B, n)
        picked = at_centres(cells["words"], batch["word_xy"], target >= 0)  # (m, 16)
        logs["word_ce"] = cross_entropy_or_zero(picked, target[target >= 0])
        loss = loss + batch["ocr_aux"] * logs["word_ce"]
    if "attrs" in batch:
        target = batch["attrs"]  # (B, n, 2): colour, shape
        has = target[..., 0] >= 0
        picked = at_centres(cells["attrs"], batch["attr_xy"], has)  # (m, 12)
        n_colours = len(data.COLORS)
        logs["attr_ce"] = (cross_entropy_or_zero(picked[:, :n_colours], target[has][:, 0])
                           + cross_entropy_or_zero(picked[:, n_colours:], target[has][:, 1]))
        loss = loss + batch["attr_aux"] * logs["attr_ce"]
    return loss, {k: v.item() for k, v in logs.items()}


def at_centres(cell_logits, xy, has):
    """cell_logits (B, h, w, classes); xy (B, n, 2) centres as fractions of width and height; has (B, n) ->
    (m, classes): the logits of the cell under each of the m centres that `has` marks."""
    _, h, w, _ = cell_logits.shape
    points = xy[has]  # (m, 2)
    col, row = (points[:, 0] * w).long().clamp(0, w - 1), (points[:, 1] * h).long().clamp(0, h - 1)
    return cell_logits[has.nonzero()[:, 0], row, col].float()


def cross_entropy_or_zero(logits, target):  # a batch may hold no word: then a zero that keeps the graph
    return F.cross_entropy(logits, target) if len(target) else logits.sum() * 0


# ----------------------------------------------------------------------------------------------------
# 12. Evaluation: one metric per task family, on post-processed answers (the structures users get)


def pixel_box_iou(boxes1, boxes2):
    """data.box_iou of two lists of post-processed boxes (integer pixels) -> (N, M) float64: exact on integers, so
    an IoU of exactly 0.5 meets the 0.5 threshold (float32 can round 0.49999999 up on large images). A pair whose
    union is not positive (a box written with its corners swapped has a negative area) gets 0, not NaN."""
    as_tensor = lambda boxes: torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)  # noqa: E731
    return data.box_iou(as_tensor(boxes1), as_tensor(boxes2)).nan_to_num(0.0)


def mean_average_precision(predictions, truths, iou_threshold=0.5):
    """mAP at one IoU threshold, VOC style. predictions, truths: one list per image of (label, box).
    A generated answer has no scores, so a box's score is its place in the answer (the model writes boxes in
    the order it learnt, the first one is the one it committed to first): detections of a class are ranked by
    that place, ties in image order. Each detection, best first, takes the unmatched ground truth of its class
    in its image with the highest IoU >= threshold (true positive) or is a false positive. AP is the area
    under the precision-recall curve with all-point interpolation (precision made non-increasing); mAP
    averages over the classes that have ground truth (a class never predicted scores 0)."""
    aps = []
    for label in sorted({lbl for boxes in truths for lbl, _ in boxes}):
        gts = [[b for lbl, b in boxes if lbl == label] for boxes in truths]
        taken = [[False] * len(g) for g in gts]
        detections = sorted((rank, i, box) for i, boxes in enumerate(predictions)
                            for rank, (lbl, box) in enumerate(boxes) if lbl == label)
        hits = []
        for _, i, box in detections:
            ious = [0.0 if taken[i][j] else iou for j, iou in enumerate(pixel_box_iou([box], gts[i])[0].tolist())]
            j = max(range(len(ious)), key=ious.__getitem__, default=None)
            hits.append(j is not None and ious[j] >= iou_threshold)
            if hits[-1]:
                taken[i][j] = True
        precision = [tp / k for k, tp in enumerate(itertools.accumulate(hits), 1)]
        for k in reversed(range(len(precision) - 1)):  # the envelope: the best precision at this recall or beyond
            precision[k] = max(precision[k], precision[k + 1])
        # recall rises by 1 / #truths at each true positive: the area is a sum of strips of that width
        aps.append(sum(p for p, hit in zip(precision, hits) if hit) / sum(map(len, gts)))
    return sum(aps) / len(aps) if aps else 0.0


def polygon_mask(polygons, image_size):
    """Polygons (flat x0, y0, x1, y1, ... lists in pixels) rasterised together with Pillow -> bool (H, W) array."""
    mask = Image.new("1", image_size)
    draw = ImageDraw.Draw(mask)
    for polygon in polygons:
        if len(polygon) >= 6:  # a polygon needs 3 points
            draw.polygon([float(v) for v in polygon[: len(polygon) // 2 * 2]], fill=1, outline=1)
    return np.array(mask, dtype=bool)


def mask_iou(pred_polygons, true_polygons, image_size):
    pred, true = polygon_mask(pred_polygons, image_size), polygon_mask(true_polygons, image_size)
    union = (pred | true).sum()
    return float((pred & true).sum() / union) if union else 1.0


def word_matches(pred, true):
    """OCR words: (matched, max(#predicted, #true)): the multiset overlap, so a missed word and an invented
    word both count against it; word accuracy = sum matched / sum of the second numbers."""
    p, t = pred.split(), true.split()
    overlap = sum(min(p.count(w), t.count(w)) for w in set(t))
    return overlap, max(len(p), len(t))


# The five metrics of the toy (task -> metric name). Any other task of a .jsonl val set is scored by exact match.
EVAL_TASKS = {"<CAPTION>": "caption_em", "<OD>": "od_map50", "<CAPTION_TO_PHRASE_GROUNDING>": "grounding_acc50",
              "<REFERRING_EXPRESSION_SEGMENTATION>": "res_miou", "<OCR>": "ocr_word_acc"}


def score(task, preds, truths, sizes):
    """One metric over post-processed answers (preds, truths: lists of post_process(...)[task]; sizes: (W, H))."""
    if task == "<OD>":
        return mean_average_precision([list(zip(p["labels"], p["bboxes"])) for p in preds],
                                      [list(zip(t["labels"], t["bboxes"])) for t in truths])
    if task == "<CAPTION_TO_PHRASE_GROUNDING>":  # RefCOCO accuracy: the first box against the referred box
        return sum(bool(p["bboxes"] and t["bboxes"]) and pixel_box_iou(p["bboxes"][:1], t["bboxes"][:1]).item() >= 0.5
                   for p, t in zip(preds, truths)) / len(truths)
    if task == "<REFERRING_EXPRESSION_SEGMENTATION>":  # the mean over examples of the mask IoU
        every = lambda answer: [polygon for instance in answer["polygons"] for polygon in instance]  # noqa: E731
        return sum(mask_iou(every(p), every(t), size) for p, t, size in zip(preds, truths, sizes)) / len(truths)
    if task == "<OCR>":
        counts = [word_matches(p, t) for p, t in zip(preds, truths)]
        return sum(c for c, _ in counts) / max(1, sum(n for _, n in counts))
    return sum(p == t for p, t in zip(preds, truths)) / len(truths)


@torch.no_grad()
def generate_answers(model, tokenizer, examples, size, style, max_new_tokens, batch_size=50, num_beams=1):
    """(PIL image, task, text input) examples -> their generated answers, decoded with every token kept."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        pixels = torch.stack([preprocess(image, size) for image, _, _ in chunk])  # (b, 3, size, size)
        ids, mask = tokenizer([prompt_text(task, text, style) for _, task, text in chunk])
        seqs = model.generate(pixels.to(device), ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                              num_beams=num_beams)
        # a row that ended before the longest one is padded after its </s>: drop the padding, so each answer reads
        # as if generated alone (the processor's pure-text answers keep any <pad>, so it would count as text)
        out += [tokenizer.decode(row[row != tokenizer.pad_token_id]) for row in seqs]
    return out


def evaluate(model, val, tokenizer, cfg: StageConfig):
    """Greedy generation on the val set, then the metric of each task family on the post-processed answers:
    caption exact match, OD mAP@0.5, grounding accuracy at IoU 0.5 (a referring expression in, its box out),
    referring-segmentation mask IoU, OCR word accuracy. A Shapes-world val image is asked those of the five that
    are in the training mixture (OCR only when it has words); a .jsonl val row is asked its own task. Caption exact
    match is also given apart for the val images with and without a colour-shape pair held out of training
    (caption_em_heldout, caption_em_seen): naming those is zero-shot composition."""
    examples = []  # (image, task, text input, target, has a held-out composition: None for .jsonl rows)
    tasks = cfg.tasks.split(",")
    for i in range(len(val)):
        sample = val[i]
        if sample is None:  # a bad row skipped by --skip_bad_samples
            continue
        if "task" in sample:
            examples.append((sample["image"], sample["task"], sample["input"], sample["target"], None))
            continue
        held = any((o["color"], o["category"]) in data.HELDOUT for o in sample["objects"])
        for task in EVAL_TASKS:
            if task in tasks and (task not in OCR_TASKS or sample["ocr"]):
                rng = random.Random(f"eval/{i}")
                target = shapes_target(sample, task, rng, grounding="reference")
                examples.append((sample["image"], task, *target, held))
    examples.sort(key=lambda e: list(TASKS).index(e[1]))  # batches of one task: similar answer lengths
    max_new_tokens = min(cfg.max_target_tokens, model.cfg.max_position_embeddings - 1)  # <s> answer </s>
    answers = generate_answers(model, tokenizer, [e[:3] for e in examples], image_size(cfg), cfg.prompt,
                               max_new_tokens, cfg.eval_batch_size)
    metrics = {}
    for task in dict.fromkeys(e[1] for e in examples):
        idx = [k for k, e in enumerate(examples) if e[1] == task]
        sizes = [examples[k][0].size for k in idx]
        preds = [post_process(answers[k], task, size)[task] for k, size in zip(idx, sizes)]
        truths = [post_process(examples[k][3], task, size)[task] for k, size in zip(idx, sizes)]
        metrics[EVAL_TASKS.get(task, task.strip("<>").lower() + "_em")] = score(task, preds, truths, sizes)
        if task == "<CAPTION>":  # also apart: val images with a colour-shape pair never seen in training
            for name, held in (("caption_em_seen", False), ("caption_em_heldout", True)):
                sub = [j for j, k in enumerate(idx) if examples[k][4] is held]
                if sub:
                    metrics[name] = score(task, [preds[j] for j in sub], [truths[j] for j in sub], None)
    return metrics


# ----------------------------------------------------------------------------------------------------
# 13. Command line: one image with its answer drawn (--image), or a folder labelled into JSON lines or a COCO
# file (--images), in batches, resumably: python florence2.py --ckpt PATH --images DIR --task '<OD>'

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BOX_TASKS = tuple(t for t, (_, kind) in TASKS.items() if kind not in ("pure_text", "polygons", "ocr"))  # --format coco


def load_for_inference(path):
    """A transformers-layout folder (released weights) or a train.py checkpoint file -> (model in eval mode,
    tokenizer, prompt style, image side)."""
    if os.path.isdir(path):
        return (Florence2.from_pretrained(path), BartTokenizer.from_pretrained(path), "text",
                image_size(StageConfig(pretrained=path)))
    if not os.path.exists(path):
        raise FileNotFoundError(f"--ckpt {path!r}: no such file or folder")
    ckpt = coswin.read_checkpoint(path, "--ckpt", "florence2")
    cfg = StageConfig(**ckpt["stage_config"])
    tokenizer = build_vocab(cfg)
    model = build_model(cfg, tokenizer)
    model.load_state_dict(ckpt["model"])
    return model.eval(), tokenizer, cfg.prompt, image_size(cfg)


def draw_answer(image, answer, path):
    """Draw a post-processed answer on a copy of the image and save it: boxes, polygons and quads outlined with
    their labels; plain text written in the top-left corner."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width, font = max(1, min(canvas.size) // 200), ImageFont.load_default(size=max(10, min(canvas.size) // 30))
    colors = ((255, 60, 60), (60, 200, 60), (60, 120, 255), (255, 200, 0), (200, 60, 255), (0, 220, 220))
    if isinstance(answer, str):
        draw.text((2, 2), answer, fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    else:
        shapes = [("box", b, lbl) for b, lbl in zip(answer.get("bboxes", []),
                                                    answer.get("labels", answer.get("bboxes_labels", [])))]
        shapes += [("polygon", p, lbl) for inst, lbl in zip(answer.get("polygons", []),
                                                            answer.get("labels", answer.get("polygons_labels", [])))
                   for p in inst]
        shapes += [("polygon", q, lbl) for q, lbl in zip(answer.get("quad_boxes", []), answer.get("labels", []))]
        for k, (kind, coords, label) in enumerate(shapes):
            color = colors[k % len(colors)]
            if kind == "box":
                x0, y0, x1, y1 = coords
                draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), outline=color, width=width)
            elif len(coords) >= 4:
                draw.line([*coords[: len(coords) // 2 * 2], *coords[:2]], fill=color, width=width)
            if label and len(coords) >= 2:
                draw.text((coords[0], coords[1]), label, fill=color, font=font, anchor="lb")
    canvas.save(path, format="PNG")


def find_images(source):
    """--images: a folder (its files with an image extension, subfolders included) or a glob (every file it
    matches) -> sorted paths, the order they are labelled in, so that a rerun meets them in the same order."""
    if os.path.isdir(source):
        found = [os.path.join(root, name) for root, _, names in os.walk(source) for name in names
                 if name.lower().endswith(IMAGE_EXTENSIONS)]
    else:
        found = [path for path in glob.glob(source, recursive=True) if os.path.isfile(path)]
    return sorted(found)


def read_labels(path):
    """The lines an earlier run wrote to a labels file -> list of dicts ([] if there is no file). A last line
    without its newline was torn by a kill mid-write: it is cut off the file, so its image is labelled again."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    end = raw.rfind(b"\n") + 1  # where the complete lines end
    if end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(end)
        print(f"{path}: cut a torn last line (a killed run); its image is labelled again", file=sys.stderr)
    records = []
    for number, line in enumerate(raw[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not {"file", "task"} <= record.keys():
                raise ValueError
        except (ValueError, AttributeError):
            raise ValueError(f"{path}:{number}: not a labels line (file, task, answer); fix or remove it, or "
                             f"write to another --out") from None
        records.append(record)
    return records


def label_key(record):  # a rerun skips an image already labelled for this task and text
    return record["file"], record["task"], record.get("text")


def label_images(model, tokenizer, style, size, paths, task, text, out, batch_size=8, num_beams=3,
                 max_new_tokens=1024):
    """Label `paths` in batches, appending one JSON line per image to `out`: {"file", "width", "height", "task",
    "text" (when the task takes one), "answer": the post-processed answer}. Each batch's lines go out in one write,
    flushed to disk, so a kill loses at most the batch in flight. An image that does not decode is skipped, not
    fatal: returns their messages. A progress line with the rate and ETA goes to stderr."""
    bad, start, tty = [], time.time(), sys.stderr.isatty()
    with open(out, "a") as f:
        for i in range(0, len(paths), batch_size):
            images = []
            for path in paths[i:i + batch_size]:
                try:
                    images.append((path, data.load_image(path, "--images")))
                except data.DataError as e:
                    bad.append(str(e))
            answers = generate_answers(model, tokenizer, [(image, task, text) for _, image in images], size, style,
                                       max_new_tokens, batch_size, num_beams)
            lines = [json.dumps({"file": path, "width": image.width, "height": image.height, "task": task,
                                 **({"text": text} if text else {}),
                                 "answer": post_process(answer, task, image.size)[task]}) + "\n"
                     for (path, image), answer in zip(images, answers)]
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            n, seconds = min(i + batch_size, len(paths)), time.time() - start
            print(f"{n}/{len(paths)} images | {len(bad)} unreadable | {n / seconds:.2f} images/s | "
                  f"ETA {clock(seconds / n * (len(paths) - n))}", end="\r" if tty else "\n", file=sys.stderr)
    if tty and paths:
        print(file=sys.stderr)
    return bad


def clock(seconds):  # 3725.2 -> "1:02:05"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def labels_to_coco(records, folder):
    """Lines of one box task -> a COCO instances dict (data.coco_instances), as dyhead.read_coco and dyhead.CocoImages
    read it (file names relative to `folder`, the COCO file's): one category per label name, sorted, ids from 1 (an
    unnamed region proposal is an "object"); one annotation per box, corners put in order, empty boxes left out. An
    answer has no confidences, so a box's score is 1 / (1 + its place in the answer), the ranking
    mean_average_precision uses: the annotations double as a results list for dyhead.coco_eval against a
    ground-truth file."""
    labels = lambda answer: answer.get("labels", answer.get("bboxes_labels", []))  # noqa: E731
    names = sorted({name or "object" for r in records for name in labels(r["answer"])})
    category = {name: k for k, name in enumerate(names, 1)}
    images, objects = [], []
    for r in records:
        images.append({"file_name": os.path.relpath(os.path.abspath(r["file"]), folder), "width": r["width"],
                       "height": r["height"]})
        objects.append([])
        for place, (box, name) in enumerate(zip(r["answer"]["bboxes"], labels(r["answer"]))):
            x0, y0, x1, y1 = min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])
            if x1 > x0 and y1 > y0:
                objects[-1].append(((x0, y0, x1, y1), category[name or "object"], {"score": 1 / (1 + place)}))
    return data.coco_instances(images, objects, [{"id": k, "name": name} for name, k in category.items()])


def write_json(obj, path):
    """Write through a temporary file in the same folder and rename it: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run Florence-2 on one image and draw the answer (--image), or "
                                                 "label a folder of images, resumably (--images).")
    parser.add_argument("--ckpt", required=True, help="a transformers-layout Florence-2 folder, or a train.py "
                                                      "checkpoint (out_dir/ckpt.pt)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="an image file of any size and mode")
    source.add_argument("--images", help="a folder (its image files, subfolders included) or a quoted glob "
                                         "('photos/**/*.jpg')")
    parser.add_argument("--task", required=True, help=f"one of: {' '.join(TASKS)}")
    parser.add_argument("--text", default=None, help="the task's input: a phrase, or a region as four <loc_*>")
    parser.add_argument("--out", default=None, help="--image: the PNG with the answer drawn (out.png); --images: "
                                                    "the JSON-lines labels file (labels.jsonl), or with --format coco "
                                                    "the COCO file (labels.json)")
    parser.add_argument("--format", choices=("jsonl", "coco"), default="jsonl",
                        help=f"--images: coco makes OUT a COCO instances file for a box task ({' '.join(BOX_TASKS)}), "
                             f"written at the end; the lines that make the run resumable go beside it, named .jsonl")
    parser.add_argument("--batch_size", type=int, default=8, help="--images: images per generation call")
    parser.add_argument("--num_beams", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=1024, help="capped by the model's positions")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="the weights' type: bfloat16 on CPUs and GPUs that support it, float16 on GPUs")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decoder's step with torch.compile: a minute or more before the first "
                             "answer, so it can pay only on a long run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.num_beams < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        parser.error("--num_beams, --max_new_tokens and --batch_size must be at least 1")
    text = args.text or None
    if args.images is not None:
        out = args.out or ("labels.json" if args.format == "coco" else "labels.jsonl")
        lines_path = os.path.splitext(out)[0] + ".jsonl" if args.format == "coco" else out
        if args.format == "coco" and lines_path == out:
            parser.error(f"--format coco writes a .json file, not --out {out}")
        if args.format == "coco" and args.task not in BOX_TASKS:
            parser.error(f"--format coco needs a box task ({', '.join(BOX_TASKS)}), not {args.task}")
    elif args.format == "coco":
        parser.error("--format coco labels a folder: use --images")
    try:  # everything that can be wrong is found before the model is loaded
        task_prompt(args.task, text)  # the task and its input
        if args.images is None:
            image = data.load_image(args.image, f"--image {args.image}")
        else:
            paths = find_images(args.images)
            if not paths:
                raise ValueError(f"--images {args.images}: no image files found (a folder is searched for "
                                 f"{', '.join(IMAGE_EXTENSIONS)}; quote a glob so the shell leaves it to us)")
            done = {label_key(r) for r in read_labels(lines_path)}
        model, tokenizer, style, size = load_for_inference(args.ckpt)
    except (ValueError, OSError) as e:  # bad task, missing --text, no or unreadable images, bad checkpoint
        parser.exit(2, f"error: {e}\n")
    model.to(args.device, DTYPES[args.dtype])  # the model casts the pixels to its weights' type
    if args.compile:  # dynamic shapes: the rows decoded and the answer length change without recompiling
        model.decoder.compile(dynamic=True)
    max_new_tokens = min(args.max_new_tokens, model.cfg.max_position_embeddings - 1)
    if args.images is None:
        answer_text, = generate_answers(model, tokenizer, [(image, args.task, text)], size, style, max_new_tokens,
                                        num_beams=args.num_beams)
        answer = post_process(answer_text, args.task, image.size)
        print(json.dumps(answer))
        draw_answer(image, answer[args.task], args.out or "out.png")
        print(f"wrote {args.out or 'out.png'}", file=sys.stderr)
        return

    todo = [path for path in paths if (path, args.task, text) not in done]
    print(f"{lines_path}: {len(paths) - len(todo)} of {len(paths)} images already labelled, {len(todo)} to go",
          file=sys.stderr)
    start = time.time()
    bad = label_images(model, tokenizer, style, size, todo, args.task, text, lines_path, args.batch_size,
                       args.num_beams, max_new_tokens)
    print(f"labelled {len(todo) - len(bad)} images in {clock(time.time() - start)} -> {lines_path}", file=sys.stderr)
    if args.format == "coco":
        wanted = set(paths)
        records = [r for r in read_labels(lines_path) if r["file"] in wanted and r["task"] == args.task
                   and r.get("text") == text]
        coco = labels_to_coco(records, os.path.dirname(os.path.abspath(out)))
        write_json(coco, out)
        print(f"wrote {out}: {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
              f"{len(coco['categories'])} categories", file=sys.stderr)
    if bad:
        print(f"{len(bad)} unreadable images skipped:", *bad, sep="\n  ", file=sys.stderr)


if __name__ == "__main__":
    main()
