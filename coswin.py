"""CoSwin: the image encoder of Florence (Yuan et al. 2021, section 2.3 "Transformer-based Florence pretrained models").

CoSwin is a hierarchical Swin Transformer (Liu et al. 2021, arXiv:2103.14030) whose patch embedding and patch merging
layers are replaced by the convolutional token embeddings of CvT (Wu et al. 2021, arXiv:2103.15808), with global average
pooling on top. Read it top to bottom:

  1. Token embedding between stages: CvT's ConvEmbed (conv mode) or Swin's patch embedding / patch merging (patch mode);
     1b. the CPU toy's BatchNorm conv stem (not in Florence).
  2. Window attention with the relative position bias (Swin section 3.2, Eq. 4).
  3. Shifted windows: cyclic roll + a region mask (Swin section 3.2, Fig. 4); padding for maps windows do not divide.
     Sections 2-4 work on maps of any number of axes, so video.py's 3D windows (T, H, W) are these same blocks.
  4. The pre-LN Swin block with an MLP and stochastic depth, a stage of blocks, the whole model, named configs.
  5. load_timm_swin: timm's Swin weights into patch mode, which makes this file testable against a reference Swin.
  6. For the adapters (det, vqa, video): read_checkpoint (a train.py checkpoint of a named stage), load_unicl_tower
     (the image tower of a UniCL checkpoint), and per_process_share, the DDP normaliser of a loss averaged over a
     batch-dependent count.
  The building blocks other files reuse live here: Mlp, residual (stochastic depth), bert_init, ConvStem.

Tensors inside a stage are kept channels-last, (B, H, W, C), as in Swin: every LayerNorm and Linear then acts on the
last dimension without permutes.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class CoSwinConfig:
    img_size: int = 224          # nominal resolution, for reporting only; forward accepts any H, W
    in_chans: int = 3            # input image channels
    embed: str = "conv"          # "conv" = CvT ConvEmbed (CoSwin); "patch" = plain Swin patch embedding + patch merging
    patch_size: int = 4          # "patch" mode only: side of the square patch embedded by stage 1
    stem: tuple = ()             # widths of a BatchNorm conv stem replacing stage 1's embedding (section 1b); () = none
    embed_dim: int = 96          # channels of stage 1; each later stage doubles them
    depths: tuple = (2, 2, 6, 2)          # Swin blocks per stage
    num_heads: tuple = (3, 6, 12, 24)     # attention heads per stage
    window_size: int = 7         # side M of the square attention window (shrinks to maps smaller than it)
    mlp_ratio: float = 4.0       # MLP hidden width / channels
    qkv_bias: bool = True        # bias on the q, k, v projection
    drop_path_rate: float = 0.1  # stochastic depth of the last block; linearly increasing from 0 over all blocks
    num_classes: int = 0         # >0 adds a linear head on the pooled features (used for timm parity / ImageNet)


CONFIGS: dict[str, CoSwinConfig] = {
    # CPU-sized for the UniCL toy stage at 48 px. A toy-only deviation: a 5-conv BatchNorm stem (section 1b) makes the
    # stage-1 tokens (stride 8, maps 6, 3, 2 with a 4x4 window), 0.96M parameters. "toy_cvt" is the same size with
    # CoSwin's own 7x7/4 conv embedding, 0.93M: in minutes of CPU it learns the colour of a Shapes-world object but
    # hardly its shape, which the stem version learns (docs/unicl-toy.md); tests use it as the stem-less toy.
    "toy": CoSwinConfig(stem=(16, 32, 48), embed_dim=48, depths=(1, 2, 1), num_heads=(2, 4, 8), window_size=4,
                        drop_path_rate=0.0),
    "toy_cvt": CoSwinConfig(embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4,
                            drop_path_rate=0.0),
    # Swin-T/S/B/L widths and depths (Swin section 3.3, 224 px with window 7) and Swin's drop path rates,
    # with CvT conv embeddings.
    "T": CoSwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "S": CoSwinConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "B": CoSwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
    "L": CoSwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), drop_path_rate=0.2),
    # Florence reports only "CoSwin-H, 637M parameters". We keep the depths (2, 2, 18, 2) that Swin-S/B/L and
    # SwinV2-H share and pick the width: embed_dim 340 (10 heads of 34 channels in stage 1, doubling per stage) gives
    # 635.3M parameters with conv embeddings and no head, 0.27% below 637M. tests/test_coswin.py checks the count.
    "H": CoSwinConfig(embed_dim=340, depths=(2, 2, 18, 2), num_heads=(10, 20, 40, 80), drop_path_rate=0.5),
}


# ----------------------------------------------------------------------------------------------------------------------
# 1. Token embedding. CvT section 3.1: a strided convolution over the (B, C, H, W) map, then LayerNorm over channels;
# it replaces both Swin's patch embedding (stage 1: kernel 7, stride 4, padding 2) and Swin's patch merging
# (later stages: kernel 3, stride 2, padding 1, doubling the channels). Overlapping kernels let neighbouring tokens
# share pixels, which non-overlapping patches cannot.

class ConvEmbed(nn.Module):
    def __init__(self, in_chans, dim, kernel_size, stride, padding, channels_last_input):
        super().__init__()
        self.channels_last_input = channels_last_input  # True between stages, which run channels-last
        self.proj = nn.Conv2d(in_chans, dim, kernel_size, stride, padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # x: (B, C_in, H, W), or (B, H, W, C_in) if channels_last_input -> (B, H', W', C)
        if self.channels_last_input:
            x = x.permute(0, 3, 1, 2)  # (B, C_in, H, W)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H', W', C)


class PatchEmbed(nn.Module):
    """Swin's stage-1 embedding: non-overlapping p x p patches, linearly projected, then LayerNorm."""

    def __init__(self, in_chans, dim, patch_size):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # x: (B, C_in, H, W) -> (B, ceil(H/p), ceil(W/p), C)
        p = self.patch_size
        x = F.pad(x, (0, -x.shape[3] % p, 0, -x.shape[2] % p))  # zero-pad right/bottom to a whole patch, as Swin
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H/p, W/p, C)


class PatchMerging(nn.Module):
    """Swin's downsampling: concatenate each 2x2 group of tokens (4C), LayerNorm, Linear 4C -> 2C without bias."""

    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x):  # x: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))  # odd sides get a zero row/column, as Swin
        B, H, W, C = x.shape
        # Swin's concat order is [x(0,0), x(1,0), x(0,1), x(1,1)] for (row, col) offsets: column offset outermost
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5)  # (B, H/2, W/2, dcol, drow, C)
        return self.reduction(self.norm(x.reshape(B, H // 2, W // 2, 4 * C)))  # (B, H/2, W/2, 2C)


# 1b. A convolutional stem, for the CPU toy only (not in Florence). At toy size and a few minutes of training, a window
# transformer fed by one 7x7/4 conv learns the colour of small objects but hardly their shape: timm's own Swin of that
# size does the same, while a small BatchNorm CNN learns shape from far fewer samples (docs/unicl-toy.md). A few
# BatchNorm convs in front, as hybrid ViTs do (Dosovitskiy et al. 2021 section 3.1; Xiao et al. 2021, "Early
# convolutions help transformers see better"), give the transformer stages tokens that already carry local shape. Each width is a block
# of 3x3 conv-BN-ReLU (one conv on the full-resolution map, where convs cost most, two on later ones) and a 2x2 max
# pool, so the stem has stride 2^len(widths); a LayerNorm then makes its output tokens like ConvEmbed's.

class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics cover every rank's batch, so that a DDP run computes what one process
    with the same global batch computes (tests/test_train.py). Per-channel sums are all-reduced; the differentiable
    all_reduce sums their gradients back, which is exactly d(loss)/d(local sums). Two passes (the mean, then the
    squared deviations from it) keep the variance as accurate as nn.BatchNorm2d's, which one process uses."""

    def forward(self, x):  # x: (B, C, H, W)
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)  # one process: nn.BatchNorm2d's fused kernel (the formula below is ~25% slower)
        n = dist_nn.all_reduce(x.new_full((1,), x.numel() / x.shape[1]))  # (1,) values per channel, global batch
        mean = dist_nn.all_reduce(x.sum((0, 2, 3))) / n  # (C,)
        var = dist_nn.all_reduce((x - mean[:, None, None]).square().sum((0, 2, 3))) / n  # (C,) biased: normalises
        with torch.no_grad():  # running statistics as nn.BatchNorm2d keeps them (unbiased variance)
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        x = (x - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + self.eps)  # (B, C, H, W)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class ConvStem(nn.Module):
    def __init__(self, in_chans, widths, dim):
        super().__init__()
        if widths[-1] != dim:
            raise ValueError(f"the stem's last width {widths[-1]} must equal embed_dim {dim}")
        layers, c = [], in_chans
        for i, w in enumerate(widths):
            for _ in range(1 if i == 0 else 2):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), GlobalBatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
            layers.append(nn.MaxPool2d(2, ceil_mode=True))  # ceil: odd sides keep their last row/column
        # channels-last memory: faster convs on CPU, and the (B, H, W, C) view the stages take is then free
        self.convs = nn.Sequential(*layers).to(memory_format=torch.channels_last)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # x: (B, C_in, H, W) -> (B, ceil(H/s), ceil(W/s), dim), s = 2^len(widths)
        x = self.convs(x.contiguous(memory_format=torch.channels_last))  # (B, dim, H/s, W/s), channels-last
        return self.norm(x.permute(0, 2, 3, 1))  # (B, H/s, W/s, dim)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Window attention (Swin section 3.2). Self-attention runs inside non-overlapping M x M windows, so its cost is
# linear in the number of tokens. Each head adds a learned bias B to the logits that depends only on the relative
# offset of the two tokens: Attention(Q, K, V) = SoftMax(Q K^T / sqrt(d) + B) V (Swin Eq. 4). Offsets along one axis
# lie in [-M+1, M-1], so the biases live in a table of (2M-1)^2 x heads, and a fixed index buffer picks B out of it.
# A window is a tuple of sides, one per map axis: (M, M) for images, (Wt, Wh, Ww) for Video Swin's (T, H, W) windows,
# whose table has (2Wt-1)(2Wh-1)(2Ww-1) rows (Liu et al. 2022, Video Swin section 3.2).

def relative_position_index(window):
    """(N, N) index into the prod(2w-1)-row bias table for every (query, key) pair of a window of N = prod(w) tokens;
    the table is row-major over the offsets, the first axis outermost."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(w) for w in window), indexing="ij")).flatten(1)  # (axes, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (axes, N, N) offsets in [-(w-1), w-1]
    index = torch.zeros_like(rel[0])
    for offsets, w in zip(rel, window):
        index = index * (2 * w - 1) + offsets + w - 1  # (N, N)
    return index


class WindowAttention(nn.Module):
    def __init__(self, dim, num_heads, window_size, qkv_bias):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"channels {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = tuple(window_size)  # (M, M) for images, (Wt, Wh, Ww) for video
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        rows = math.prod(2 * w - 1 for w in self.window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        self.fused = None  # None: the fused SDPA kernel on GPU, Eq. 4 written out on CPU; True/False to force one
        # a buffer, not a parameter: it is a fixed function of the window size (not saved, rebuilt on construction)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)

    def relative_position_bias(self, window):
        """(heads, N, N) bias B of Eq. 4 for a window of sides `window` <= window_size (a map smaller than the
        nominal window along some axis), N = prod(window)."""
        M, N = self.window_size, math.prod(window)
        corner = tuple(slice(0, w) for w in window)
        index = self.relative_position_index.view(*M, *M)[corner + corner]  # (*window, *window): the top-left part
        bias = self.relative_position_bias_table[index.reshape(-1)]  # (N*N, heads)
        return bias.view(N, N, -1).permute(2, 0, 1)  # (heads, N, N)

    def forward(self, x, window, mask):
        """x: (B, nW, N, C) tokens of nW windows of N = wh*ww tokens; mask: (nW, 1, N, N) additive, or None."""
        B, nW, N, C = x.shape
        heads, hd = self.num_heads, C // self.num_heads
        qkv = self.qkv(x).view(B, nW, N, 3, heads, hd)  # (B, nW, N, 3, heads, hd)
        bias = self.relative_position_bias(window)  # (heads, N, N)
        attn_mask = bias if mask is None else bias + mask  # (heads, N, N) or (nW, heads, N, N): shared by the batch
        if x.is_cuda if self.fused is None else self.fused:
            # the production view (timm's fused path): bias and shift/padding mask folded into one additive
            # attn_mask for the fused kernel, windows x heads as one "head" axis (the 4-D layout it takes)
            qkv = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, B, nW * heads, N, hd)  # (3, B, nW*heads, N, hd)
            q, k, v = qkv.unbind(0)
            attn_mask = attn_mask.expand(nW, -1, -1, -1).reshape(nW * heads, N, N)  # (nW*heads, N, N)
            attn_mask = attn_mask.to(q.dtype)  # q's dtype under autocast
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).view(B, nW, heads, N, hd)
        else:
            # on CPU, SDPA with a mask that needs a gradient falls back to a slower path than Eq. 4 written out
            # (bench/bench.py: 1.035 vs 0.99 of timm's time), so write it out
            q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # 3 x (B, nW, heads, N, hd)
            attn = (q * hd ** -0.5) @ k.transpose(-2, -1) + attn_mask  # (B, nW, heads, N, N)
            x = attn.softmax(dim=-1) @ v  # (B, nW, heads, N, hd)
        x = x.transpose(2, 3)  # (B, nW, N, heads, hd)
        return self.proj(x.reshape(B, nW, N, C))  # (B, nW, N, C)


# ----------------------------------------------------------------------------------------------------------------------
# 3. Shifted windows (Swin section 3.2, Fig. 2 and 4). Every second block shifts the window grid by M//2 so that
# information crosses window borders. Rather than attend within the smaller border windows separately, Swin rolls
# the map cyclically by -M//2 and keeps the regular grid; a window at the far edge then holds tokens that the roll
# carried across the border next to tokens that are not their neighbours in the image, and an additive mask of -100
# (exp(-100) ~ 0) stops such pairs attending to each other.
# A map the window does not divide is zero-padded at the right/bottom before rolling (as in the reference Swin); we
# also mask the padded tokens out as keys, so no output ever depends on the padding. (timm rolls before padding,
# which puts carried-over tokens next to unrelated ones, pytorch-image-models issue #2438; at such sizes we follow
# the reference order and tests/test_coswin.py checks against a dense brute-force reference instead of timm.)
# A map no larger than the window along an axis gets a window of the map's size and no shift along that axis (Swin).
# The reference Video Swin (and torchvision's swin3d_t) lets queries attend to the zero-padded tokens; mask_padding=False
# follows it, for the patch mode that must equal it.
# Everything here is per axis, so it holds for maps of any number of axes: (H, W) images and (T, H, W) clips.
#
# Padding aside, the roll and the cut into windows only move tokens, so together they are one permutation of the
# map's positions. We compute it (and its inverse and the mask) once per map size as an index, and each block moves
# its tokens with a single index_select each way instead of roll + reshape copies (3x faster on CPU, forward+backward).

def window_partition(x, window):
    """(B, *S, C) -> (B, nW, N, C), N = prod(window), windows in row-major order; S must be multiples of the window
    (S = (H, W) for images, (T, H, W) for clips)."""
    B, *S, C = x.shape
    n = len(S)
    x = x.view(B, *(d for s, w in zip(S, window) for d in (s // w, w)), C)  # (B, S1/w1, w1, S2/w2, w2, ..., C)
    x = x.permute(0, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2), 2 * n + 1)  # (B, S1/w1, S2/w2, .., w1, w2, .., C)
    return x.reshape(B, -1, math.prod(window), C)  # (B, nW, N, C)


@dataclass
class WindowPlan:
    """How one kind of block (regular or shifted) cuts a map of sides S into windows."""
    window: tuple   # window actually used, one side per axis
    padded: tuple   # map sides after zero-padding to whole windows
    order: torch.Tensor    # (prod(padded),) flat map position of the token at each window slot, the roll included
    inverse: torch.Tensor  # (prod(padded),) window slot of each flat map position: undoes `order`
    mask: torch.Tensor     # (nW, 1, N, N) additive: -100 across roll borders or onto padding, 0 else; None if no-op


def plan_windows(size, M, shifted, device, mask_padding=True):
    """The WindowPlan of a regular (shifted=False) or shifted block on a map of sides `size` with nominal window M
    (a tuple of the same length); mask_padding=False lets queries attend to padded tokens, as the reference does."""
    window = tuple(min(m, s) for m, s in zip(M, size))
    shift = tuple(m // 2 if shifted and s > m else 0 for m, s in zip(M, size))
    padded = tuple(s + (-s % w) for s, w in zip(size, window))
    axes = tuple(range(1, len(size) + 1))
    positions = torch.arange(math.prod(padded), device=device).view(1, *padded, 1)  # flat index of each token
    positions = torch.roll(positions, shifts=tuple(-s for s in shift), dims=axes)  # the cyclic shift of Swin Fig. 4
    order = window_partition(positions, window).reshape(-1)  # (nW*N,)
    mask = None
    if any(shift) or (mask_padding and padded != tuple(size)):
        # along each axis, the first `shift` positions are the ones the roll carries over to the far border; a pair
        # in one window may attend iff both are real tokens that agree on being carried over, along every axis
        region, pad = torch.zeros(padded, dtype=torch.long, device=device), torch.zeros(padded, dtype=torch.bool,
                                                                                       device=device)
        for axis, (s, sh, p) in enumerate(zip(size, shift, padded)):
            coord = torch.arange(p, device=device).view([-1 if a == axis else 1 for a in range(len(size))])
            region = 2 * region + (coord < sh)  # (*padded) one bit per axis
            pad = pad | (coord >= s)
        if mask_padding:
            region = region.masked_fill(pad, -1)  # -1 = padding
        region = region.view(-1)[order].view(-1, 1, math.prod(window))  # (nW, 1, N)
        mask = (region.transpose(1, 2) != region).float().unsqueeze(1) * -100.0  # (nW, 1, N, N)
    return WindowPlan(window, padded, order, torch.argsort(order), mask)


# ----------------------------------------------------------------------------------------------------------------------
# 4. The Swin block (Swin Eq. 3): x = x + W-MSA(LN(x)); x = x + MLP(LN(x)), the MLP two Linears with a GELU between.
# Stochastic depth (Huang et al. 2016) drops a block's residual branch for whole samples during training.

def residual(x, branch, p, training):
    """x + branch, with stochastic depth: the branch is dropped for a random fraction p of the samples during
    training, and rescaled by 1/(1-p) for the rest so its expected value is unchanged."""
    if p == 0.0 or not training:
        return x + branch
    keep = branch.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p).div_(1.0 - p)  # (B, 1, 1, 1)
    return torch.addcmul(x, branch, keep)  # x + branch * keep in one pass


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def bert_init(m, std=0.02):
    """BERT's init (also BART's and RoBERTa's), for module.apply: Linear and Embedding weights from N(0, std), zero
    biases, a zero padding row, LayerNorm 1 and 0. The text towers and fusion layers of meter.py and florence2.py."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=std)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.Embedding) and m.padding_idx is not None:
        nn.init.zeros_(m.weight[m.padding_idx])
    if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
        nn.init.ones_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class SwinBlock(nn.Module):
    def __init__(self, dim, num_heads, window_size, shifted, mlp_ratio, qkv_bias, drop_path):
        super().__init__()
        self.shifted = shifted  # shifted windows (SW-MSA) or regular ones (W-MSA)
        self.drop_prob = drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, plan):
        """x: (B, *S, C), S = (H, W) or (T, H, W); plan: this block's WindowPlan for a map of sides S."""
        B, *S, C = x.shape
        padded, N = plan.padded, math.prod(plan.window)
        y = self.norm1(x)
        if padded != tuple(S):  # (B, *padded, C): pad first, then roll (reference Swin)
            y = F.pad(y, [0, 0] + [d for s, p in zip(reversed(S), reversed(padded)) for d in (0, p - s)])
        y = y.reshape(B, -1, C).index_select(1, plan.order)  # (B, nW*N, C): rolled and cut into windows
        y = self.attn(y.view(B, -1, N, C), plan.window, plan.mask)  # (B, nW, N, C)
        y = y.view(B, -1, C).index_select(1, plan.inverse).view(B, *padded, C)  # back in place, roll undone
        if padded != tuple(S):
            y = y[(slice(None),) + tuple(slice(0, s) for s in S)]  # (B, *S, C)
        x = residual(x, y, self.drop_prob, self.training)
        return residual(x, self.mlp(self.norm2(x)), self.drop_prob, self.training)


class Stage(nn.Module):
    """One resolution: a token embedding that downsamples (and widens), then `depth` blocks alternating W/SW-MSA."""

    def __init__(self, embed, dim, depth, num_heads, window_size, mlp_ratio, qkv_bias, drop_paths, mask_padding=True):
        super().__init__()
        self.embed = embed
        # an int M is the square image window (M, M); a tuple gives one side per map axis
        window_size = (window_size, window_size) if isinstance(window_size, int) else tuple(window_size)
        self.window_size, self.mask_padding = window_size, mask_padding
        self.blocks = nn.ModuleList(  # odd blocks use shifted windows
            SwinBlock(dim, num_heads, window_size, i % 2 == 1, mlp_ratio, qkv_bias, p)
            for i, p in enumerate(drop_paths))
        self.grad_checkpointing = False
        self._plans = {}  # (sides, device) -> (WindowPlan of the regular blocks, WindowPlan of the shifted ones)

    def plans(self, size, device):
        """Window plans of the regular and the shifted blocks on a map of sides `size`. They depend only on the map
        size, so they are built once per size and shared by every block and every step at that size."""
        key = (tuple(size), device)
        if key not in self._plans:
            if len(self._plans) >= 32:  # many input sizes (e.g. multi-scale detection): bound the cache
                self._plans.clear()
            with torch.inference_mode(False):  # a plan first built under inference_mode must still serve training
                self._plans[key] = tuple(plan_windows(size, self.window_size, shifted, device, self.mask_padding)
                                         for shifted in (0, 1))
        return self._plans[key]

    def forward(self, x):  # x: (B, C_in, H, W) for the stem, else (B, H, W, C_in) -> (B, H', W', C); clips: (T, H, W)
        x = self.embed(x)
        plans = self.plans(x.shape[1:-1], x.device)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # recompute the block in backward instead of storing its activations; the RNG state is restored so
                # drop path makes the same choices twice
                x = torch.utils.checkpoint.checkpoint(block, x, plans[block.shifted], use_reentrant=False)
            else:
                x = block(x, plans[block.shifted])
        return x


class CoSwin(nn.Module):
    def __init__(self, cfg: CoSwinConfig):
        super().__init__()
        if cfg.embed not in ("conv", "patch"):
            raise ValueError(f'CoSwinConfig.embed must be "conv" or "patch", got {cfg.embed!r}')
        if len(cfg.depths) != len(cfg.num_heads):
            raise ValueError(f"depths {cfg.depths} and num_heads {cfg.num_heads} must have one entry per stage")
        self.cfg = cfg
        self.feature_channels = [cfg.embed_dim * 2 ** i for i in range(len(cfg.depths))]
        self.num_features = self.feature_channels[-1]
        # stochastic depth rate grows linearly with depth, from 0 to drop_path_rate (Swin section 4.1)
        drop_paths = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        for i, (depth, heads, dim) in enumerate(zip(cfg.depths, cfg.num_heads, self.feature_channels)):
            if cfg.stem and i == 0:  # the toy's conv stem (section 1b), in either mode
                embed = ConvStem(cfg.in_chans, cfg.stem, dim)
            elif cfg.embed == "conv" and i == 0:  # CvT: 7x7 stride 4 on the image ...
                embed = ConvEmbed(cfg.in_chans, dim, 7, 4, 2, channels_last_input=False)
            elif cfg.embed == "conv":  # ... and 3x3 stride 2 between stages, doubling the channels
                embed = ConvEmbed(dim // 2, dim, 3, 2, 1, channels_last_input=True)
            else:
                embed = PatchEmbed(cfg.in_chans, dim, cfg.patch_size) if i == 0 else PatchMerging(dim // 2, dim)
            first = sum(cfg.depths[:i])
            self.stages.append(Stage(embed, dim, depth, heads, cfg.window_size, cfg.mlp_ratio, cfg.qkv_bias,
                                     drop_paths[first:first + depth]))
        # one LayerNorm per stage output for the detection adapter's pyramid; the last one is also the final norm
        # before global average pooling (forward() uses only that one)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for dim in self.feature_channels)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):  # Swin's init: truncated normal(0.02) for Linear weights and bias tables, zero biases
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, WindowAttention):
            nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def _check_input(self, x):
        # the 7x7/4 conv with padding 2 needs at least 3 pixels; patches and the stem take any size
        min_side = 3 if self.cfg.embed == "conv" and not self.cfg.stem else 1
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans or min(x.shape[2:]) < min_side:
            raise ValueError(f"CoSwin expects images (B, {self.cfg.in_chans}, H, W) with H, W >= {min_side}, "
                             f"got shape {tuple(x.shape)}")

    def forward_features(self, x):
        """x: (B, C, H, W) -> one map (B, C_i, H_i, W_i) per stage, strides 4, 8, 16, 32 (with a stem: 2^len(stem),
        doubling per stage), each after its own LayerNorm."""
        self._check_input(x)
        features = []
        for stage, norm in zip(self.stages, self.norms):
            x = stage(x)  # (B, H_i, W_i, C_i)
            features.append(norm(x).permute(0, 3, 1, 2))  # (B, C_i, H_i, W_i)
        return features

    def forward(self, x):
        """x: (B, C, H, W) -> (B, num_features) pooled image features, or (B, num_classes) logits with a head."""
        self._check_input(x)
        for stage in self.stages:
            x = stage(x)  # (B, H_i, W_i, C_i)
        return self.head(self.norms[-1](x).mean(dim=(1, 2)))  # global average pool over (H, W): (B, C)


# ----------------------------------------------------------------------------------------------------------------------
# 5. timm's SwinTransformer weights in patch mode. timm (1.0) names: patch_embed.{proj,norm}; layers.i.downsample
# (PatchMerging at the start of stage i > 0); layers.i.blocks.j.{norm1,attn.{qkv,proj,relative_position_bias_table},
# norm2,mlp.{fc1,fc2}}; norm; head.fc. Its relative_position_index / attn_mask buffers are recomputed here, not loaded.

def load_timm_swin(model: CoSwin, state_dict: dict) -> None:
    """Copy a timm SwinTransformer state dict into a patch-mode CoSwin of the same shape (strict on every weight)."""
    if model.cfg.embed != "patch":
        raise ValueError('load_timm_swin needs a CoSwin built with embed="patch" (plain Swin)')
    ours = {}
    for key, value in state_dict.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue  # fixed buffers: functions of the window size and the map size
        parts = key.split(".")
        if parts[0] == "patch_embed":
            new = "stages.0.embed." + ".".join(parts[1:])
        elif parts[0] == "layers" and parts[2] == "downsample":
            new = f"stages.{parts[1]}.embed." + ".".join(parts[3:])
        elif parts[0] == "layers":
            new = "stages." + ".".join(parts[1:])
        elif parts[0] == "norm":
            new = f"norms.{len(model.stages) - 1}.{parts[1]}"
        elif parts[:2] == ["head", "fc"]:
            new = "head." + parts[2]
        else:
            raise KeyError(f"load_timm_swin: unexpected key {key!r} in the timm state dict")
        ours[new] = value
    expected = model.state_dict()
    # our extra per-stage norms of stages 1..3 (for forward_features) have no timm counterpart and keep their init
    own_only = {k for k in expected if k.startswith("norms.") and int(k.split(".")[1]) < len(model.stages) - 1}
    missing = sorted(set(expected) - set(ours) - own_only)
    unexpected = sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise KeyError(f"load_timm_swin: model/config mismatch; missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in ours.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"load_timm_swin: {key} has shape {tuple(value.shape)} in the timm state dict, "
                             f"{tuple(expected[key].shape)} in the model")
    model.load_state_dict(ours, strict=False)


def count_parameters(cfg: CoSwinConfig) -> int:
    """Parameters of CoSwin(cfg), counted on the meta device (no memory, instant even for H)."""
    with torch.device("meta"):
        return sum(p.numel() for p in CoSwin(cfg).parameters())


if __name__ == "__main__":
    for name, cfg in CONFIGS.items():
        print(f"CoSwin-{name}: {count_parameters(cfg) / 1e6:.1f}M parameters "
              f"(embed_dim {cfg.embed_dim}, depths {cfg.depths}, heads {cfg.num_heads}, window {cfg.window_size})")


# ----------------------------------------------------------------------------------------------------------------------
# 6. The adapters (dyhead.py, meter.py, video.py) start from the CoSwin that UniCL pretrained (Florence section 2.4-2.6).
# A train.py UniCL checkpoint keeps it under model.visual.*, with the tower's config name in stage_config.image_encoder.

def read_checkpoint(path, flag, stages=None):
    """A train.py checkpoint file -> its dict. A missing or unreadable file, or a checkpoint of a stage not in
    `stages` (a name or a tuple of names; None = any), is named with the flag that gave the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path!r}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or holding more than tensors and containers
        raise ValueError(f"{flag} {path!r}: cannot read it as a checkpoint ({type(e).__name__})") from None
    stage = ckpt.get("train_config", {}).get("stage") if isinstance(ckpt, dict) else None
    stages = (stages,) if isinstance(stages, str) else stages
    if stages is not None and stage not in stages:
        raise ValueError(f"{flag} {path!r} is not a train.py checkpoint of the {' or '.join(stages)} stage "
                         f"(stage: {stage!r})")
    return ckpt


def load_unicl_tower(backbone: CoSwin, path, name, flag="--init_from"):
    """Copy a UniCL checkpoint's CoSwin (model.visual.*) into `backbone`, built from coswin.CONFIGS[name]. Every weight
    of the backbone must be there; a backbone cut to its first stages (meter's toy) leaves the later ones unused."""
    ckpt = read_checkpoint(path, flag, "unicl")
    encoder = ckpt["stage_config"].get("image_encoder")
    if encoder != name:
        raise ValueError(f"{flag} {path!r} holds a CoSwin {encoder!r}, the model's image tower is {name!r}")
    tower = {k[len("visual."):]: v for k, v in ckpt["model"].items() if k.startswith("visual.")}
    own = backbone.state_dict()
    later = [k for k in tower if k not in own and not (k.split(".")[0] in ("stages", "norms")
                                                         and int(k.split(".")[1]) >= len(backbone.stages))]
    if later:
        raise ValueError(f"{flag} {path!r}: weights the image tower has no place for: {', '.join(later[:5])}")
    backbone.load_state_dict({k: v for k, v in tower.items() if k in own})  # strict: a missing weight is named


# A loss averaged over a count that differs between processes (ATSS's positives, MLM's masked tokens) must be divided by
# the global count, not each process's own, for DDP's average of the processes' gradients to be the global batch's.

def per_process_share(total):
    """A batch statistic summed over the DDP processes and divided by their number (the statistic itself outside
    DDP), so that each process's loss is its sum over the global normaliser times the number of processes."""
    if not (dist.is_available() and dist.is_initialized()):
        return total
    total = total.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()
