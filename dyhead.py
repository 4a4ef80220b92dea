"""Dynamic Head: the object-level adapter of Florence (Yuan et al. 2021, section 2.4 "Object-level visual representation
learning").

Florence turns its CoSwin image encoder into an object detector by putting a Dynamic Head (Dai et al. 2021,
arXiv:2106.08322) on the CoSwin feature pyramid: a stack of blocks that attend over the levels of the pyramid
(scale-aware), over space with a modulated deformable convolution (spatial-aware) and over channels with a dynamic ReLU
(task-aware). An ATSS detector (Zhang et al. 2020, arXiv:1912.02424) reads the boxes off the last block, and the UniCL
towers name each class-agnostic box for zero-shot detection. Read it top to bottom: the paper's model first, then the
machinery it stands on, in sections a reader of the paper can skip.

The model (Florence section 2.4):
  1. The feature pyramid (FPN) on the CoSwin stages.
  2. The Dynamic Head block (Dynamic Head section 3.2): scale-, spatial- and task-aware attention, stacked.
  3. ATSS: anchors and the box coder, adaptive training sample selection, focal / GIoU / centerness losses, the
     predictors, decoding to detections.
  4. The detector (CoSwin -> FPN -> Dynamic Head -> ATSS) and its configs: the paper's T and H, the CPU toy.
Supporting machinery:
  5. From-scratch operators: modulated deformable convolution (DCNv2) by bilinear sampling, greedy NMS and
     per-category NMS, each equal to its torchvision counterpart (tests/test_dyhead.py).
  6. COCO: box mAP exactly as pycocotools' COCOeval computes it, reading instances files, writing results files.
  7. Zero-shot detection: class-agnostic boxes named by the UniCL towers.
  8. The stage protocol for train.py (python train.py --stage det): class names, model, data, loss, evaluation.
  9. The command line: COCO box AP of a detections file against a ground truth (python dyhead.py GT DETECTIONS).
"""
import json
import math
import os
import tempfile
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import coswin
import data
import unicl


# ----------------------------------------------------------------------------------------------------------------------
# 1. The feature pyramid (FPN, Lin et al. 2017, arXiv:1612.03144, section 3). A 1x1 lateral conv brings every backbone
# stage to one width; a top-down pathway adds each coarser map, upsampled, into the next finer one, so that fine levels
# also carry the coarse levels' semantics; a 3x3 conv on each sum smooths the aliasing of the upsampling. Detectors
# that predict large objects on P6 and P7 (RetinaNet, ATSS) add levels below the backbone's coarsest one by stride-2
# 3x3 convs, the first on the coarsest FPN output, each later one after a ReLU, as ATSS's LastLevelP6P7 does.

class FPN(nn.Module):
    def __init__(self, in_channels: tuple, out_channels: int, extra_levels: int = 0):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.extra = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
                                   for _ in range(extra_levels))
        # ATSS's init (maskrcnn-benchmark's conv_with_kaiming_uniform): kaiming uniform with a=1, zero bias
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features):  # list of (B, C_i, H_i, W_i), finest first -> list of (B, out, H_l, W_l), finest first
        if len(features) != len(self.lateral):
            raise ValueError(f"FPN was built for {len(self.lateral)} stage maps, got {len(features)}")
        inner = self.lateral[-1](features[-1])                                               # (B, out, H_n, W_n)
        outs = [self.output[-1](inner)]
        for lateral, output, x in zip(self.lateral[-2::-1], self.output[-2::-1], features[-2::-1]):
            x = lateral(x)                                                                     # (B, out, H_i, W_i)
            # nearest upsampling to the finer map's exact size, not x2: a stride-2 stage of an odd-sized map is
            # ceil(H/2), and doubling it would overshoot by one row
            inner = x + F.interpolate(inner, size=x.shape[-2:], mode="nearest")                # (B, out, H_i, W_i)
            outs.insert(0, output(inner))
        for j, conv in enumerate(self.extra):
            outs.append(conv(outs[-1] if j == 0 else F.relu(outs[-1])))                        # (B, out, H/2, W/2)
        return outs


# ----------------------------------------------------------------------------------------------------------------------
# 2. The Dynamic Head block (Dai et al. 2021, arXiv:2106.08322, section 3.2, Eq. 2): on the pyramid seen as a tensor
# level x space x channel, W(F) = pi_C(pi_S(pi_L(F) * F) * F) * F, three cheap attentions, each over one dimension.
# As in the reference code (microsoft/DynamicHead dyhead/dyhead.py), level l's output is computed from levels l-1, l,
# l+1 only: spatial-aware attention (Eq. 4) samples each of them with a modulated deformable conv whose offsets and
# masks come from level l; scale-aware attention (Eq. 3) weights each of those maps by a scalar from its global
# average and averages them; task-aware attention (Eq. 5) is a dynamic ReLU on the result.

def hard_sigmoid(x):
    """The reference code's hard sigmoid, relu6(x + 3) / 6: 0 below -3, 1 above 3, 0.5 at 0. (The paper's Eq. 3
    writes max(0, min(1, (x + 1) / 2)); we follow the code, which the published results come from.)"""
    return F.relu6(x + 3) / 6


class DeformConvNorm(nn.Module):
    """A modulated deformable 3x3 conv (DCNv2) with bias, then GroupNorm with 16 groups, as the reference's
    Conv3x3Norm. Offsets and mask are inputs, not computed here: one offset conv per block serves all three."""

    def __init__(self, channels, stride):
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.norm = nn.GroupNorm(16, channels)
        nn.init.normal_(self.weight, 0, 0.01)   # the reference's init of the deformable convs

    def forward(self, x, offset, mask):  # x (B, C, H, W), offset (B, 18, H', W'), mask (B, 9, H', W') -> (B, C, H', W')
        return self.norm(deform_conv2d(x, offset, self.weight, self.bias, self.stride, 1, 1, mask))


class DyReLU(nn.Module):
    """Task-aware attention (section 3.2, Eq. 5): dynamic ReLU DY-ReLU-B (Chen et al. 2020, arXiv:2003.10027), per
    channel c: out = max(a1_c * x + b1_c, a2_c * x + b2_c), the 4 coefficients per channel computed from the globally
    pooled input, so each channel can switch itself on or off for the task at hand."""

    def __init__(self, channels, reduction=4):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, 4 * channels)

    def forward(self, x):  # x: (B, C, H, W) -> (B, C, H, W)
        B, C = x.shape[:2]
        theta = hard_sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))                    # (B, 4C) in [0, 1]
        a1, b1, a2, b2 = theta.view(B, 4, C, 1, 1).unbind(1)                                 # 4 x (B, C, 1, 1)
        # the reference's ranges: slopes (theta - 0.5) * 2 around init_a = (1, 0), intercepts theta - 0.5 around
        # init_b = (0, 0); at theta = 0.5 the two lines are x and 0, so the block starts as a plain ReLU
        a1, a2 = (a1 - 0.5) * 2 + 1.0, (a2 - 0.5) * 2
        b1, b2 = b1 - 0.5, b2 - 0.5
        return torch.maximum(a1 * x + b1, a2 * x + b2)


class DyHeadBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        if channels % 16:
            raise ValueError(f"channels must be a multiple of 16 (GroupNorm with 16 groups), got {channels}")
        # spatial-aware attention (Eq. 4): one 3x3 conv gives, at every location of level l, 2 x 9 offsets (dy, dx)
        # and 9 masks for the 9 taps, shared by the convs on levels l, l-1 (stride 2 down to l) and l+1 (upsampled)
        self.offset = nn.Conv2d(channels, 27, 3, padding=1)
        self.conv_mid = DeformConvNorm(channels, stride=1)
        self.conv_low = DeformConvNorm(channels, stride=2)
        self.conv_high = DeformConvNorm(channels, stride=1)
        # scale-aware attention (Eq. 3): the paper's linear function f, one 1x1 conv shared by all levels
        self.scale_attn = nn.Conv2d(channels, 1, 1)
        self.task_attn = DyReLU(channels)
        nn.init.normal_(self.scale_attn.weight, 0, 0.01)
        nn.init.zeros_(self.scale_attn.bias)
        # zero offsets and masks sigmoid(0) = 0.5 at the start (mmdetection's zero_init_offset): every deformable conv
        # begins as a plain 3x3 conv with half its weight, and learns where to look from there
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def scale_weighted(self, feature):  # (B, C, H, W) -> (B, C, H, W): pi_L(F) * F, one scalar per map and image
        pi = hard_sigmoid(F.relu(self.scale_attn(feature.mean((2, 3), keepdim=True))))      # (B, 1, 1, 1)
        return pi * feature

    def forward(self, levels):  # list of (B, C, H_l, W_l), finest first -> the same shapes
        outs = []
        for l, x in enumerate(levels):
            H, W = x.shape[-2:]
            offset_mask = self.offset(x)                                                      # (B, 27, H, W)
            offset, mask = offset_mask[:, :18], offset_mask[:, 18:].sigmoid()                 # (B, 18|9, H, W)
            feats = [self.conv_mid(x, offset, mask)]
            if l > 0:
                low = levels[l - 1]                                                           # (B, C, H_f, W_f)
                # a stride-2 3x3 conv with padding 1 gives ceil(H_f / 2) rows, which is H when the pyramid halves by
                # ceil (CoSwin's stride-2 embeddings, the FPN's extra levels). Otherwise zero-pad (or crop) the finer
                # map at the bottom/right to exactly 2H x 2W; in the ceil case the extra zero row is what the conv's
                # own zero padding reads anyway, so padding never changes an output that already fits
                if (low.shape[-2] + 1) // 2 != H or (low.shape[-1] + 1) // 2 != W:
                    low = F.pad(low, (0, 2 * W - low.shape[-1], 0, 2 * H - low.shape[-2]))    # (B, C, 2H, 2W)
                feats.append(self.conv_low(low, offset, mask))
            if l < len(levels) - 1:
                # upsample first, then convolve with level l's offsets at level l's size; the reference convolves at
                # the coarse size with the fine offsets, which its unchecked CUDA kernel allows (DynamicHead issue #25)
                high = F.interpolate(levels[l + 1], size=(H, W), mode="bilinear", align_corners=True)  # (B, C, H, W)
                feats.append(self.conv_high(high, offset, mask))
            # scale-aware attention, then the mean over the available neighbour levels (Eq. 4's 1/L sum)
            mean = torch.stack([self.scale_weighted(f) for f in feats]).mean(0)              # (B, C, H, W)
            outs.append(self.task_attn(mean))
        return outs


class DynamicHead(nn.Module):
    """num_blocks DyHeadBlocks in sequence (the paper: 6 blocks of 256 channels)."""

    def __init__(self, channels, num_blocks):
        super().__init__()
        self.blocks = nn.ModuleList(DyHeadBlock(channels) for _ in range(num_blocks))

    def forward(self, levels):  # list of (B, C, H_l, W_l), finest first -> the same shapes
        levels = list(levels)
        for block in self.blocks:
            levels = block(levels)
        return levels


# ----------------------------------------------------------------------------------------------------------------------
# 3. ATSS (Zhang et al. 2020, arXiv:1912.02424): RetinaNet with one anchor per location whose positives are chosen per
# object by a statistic of the object's own IoUs instead of a fixed IoU threshold. As in the port the Dynamic Head
# paper trains (microsoft/DynamicHead extra/atss.py), the Dynamic Head blocks replace ATSS's conv towers, so only the
# three final predictors remain.

# ----------------------------------------------------------------------------------------------------------------------
# 3a. Anchors and the box coder. ATSS keeps one square anchor per location, of side 8 x the level's stride (ATSS
# section 4.1; the DynamicHead configs give sizes 64..1024 for strides 8..128). The DynamicHead configs set detectron2's
# anchor OFFSET to 0.5 (detectron2's default is 0.0), so the anchor of cell (y, x) is centred on the cell's centre,
# ((x + 0.5) * stride, (y + 0.5) * stride), not on its top-left corner.

def anchors(sizes, strides, scale=8, offset=0.5, device=None):
    """One square anchor per feature-map location: sizes [(H_l, W_l)], strides [s_l] -> [(H_l * W_l, 4)] x1y1x2y2 in
    pixels, level by level, each in row-major order (y, then x), the order in which ATSSHead flattens its maps."""
    out = []
    for (H, W), stride in zip(sizes, strides):
        ys = (torch.arange(H, dtype=torch.float32, device=device) + offset) * stride         # (H,)
        xs = (torch.arange(W, dtype=torch.float32, device=device) + offset) * stride         # (W,)
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")                                       # (H, W) each
        centres = torch.stack((cx, cy, cx, cy), dim=-1).reshape(H * W, 4)                    # (H*W, 4)
        half = scale * stride / 2
        out.append(centres + torch.tensor([-half, -half, half, half], device=device))
    return out


# The network regresses a box as deltas from its anchor (Girshick et al. 2014, Fast/Faster R-CNN parametrisation):
# centre shift in anchor widths and log size ratio, multiplied by weights (10, 10, 5, 5) so that the four deltas of
# typical matches have about unit variance (detectron2's Box2BoxTransform with the ATSS config's BBOX_REG_WEIGHTS).
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
SCALE_CLAMP = math.log(1000.0 / 16)  # decode never grows a box by more than 1000/16 = 62.5x, so exp() cannot overflow


def _centre_size(boxes):
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(anchor_boxes, boxes, weights=BOX_WEIGHTS):
    """Deltas (dx, dy, dw, dh) that take each anchor to its box: (N, 4), (N, 4) x1y1x2y2 -> (N, 4)."""
    ax, ay, aw, ah = _centre_size(anchor_boxes)
    bx, by, bw, bh = _centre_size(boxes)
    wx, wy, ww, wh = weights
    return torch.stack((wx * (bx - ax) / aw, wy * (by - ay) / ah,
                        ww * torch.log(bw / aw), wh * torch.log(bh / ah)), dim=-1)


def decode(deltas, anchor_boxes, weights=BOX_WEIGHTS, scale_clamp=SCALE_CLAMP):
    """Inverse of encode: (N, 4) deltas on (N, 4) anchors -> (N, 4) boxes x1y1x2y2. dw, dh are clamped at scale_clamp
    after dividing by their weights, as detectron2's apply_deltas does."""
    ax, ay, aw, ah = _centre_size(anchor_boxes.to(deltas.dtype))
    wx, wy, ww, wh = weights
    dx, dy, dw, dh = deltas.unbind(-1)
    cx, cy = dx / wx * aw + ax, dy / wy * ah + ay
    w = torch.exp((dw / ww).clamp(max=scale_clamp)) * aw
    h = torch.exp((dh / wh).clamp(max=scale_clamp)) * ah
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# 3b. Adaptive training sample selection (ATSS section 4.1, Algorithm 1). For each object g: on every level take the k
# anchors whose centres are nearest g's centre (L2), as candidates; the IoU threshold is t_g = m_g + v_g, the mean plus
# the standard deviation of the candidates' IoUs with g (torch's .std(), the unbiased one, as the reference), so a
# well-matched object keeps only its best few anchors and a poorly-matched one still gets some. Positives are the
# candidates with IoU >= t_g whose centre lies inside g (every distance to a side > 0.01 px, as the reference). An
# anchor positive for several objects goes to the one it overlaps most (ties: the first object).

def atss_assign(anchors_per_level, gt_boxes, gt_labels, topk=9):
    """Label every anchor of one image: anchors_per_level [(A_l, 4)], gt_boxes (G, 4) x1y1x2y2, gt_labels (G,) ->
    (labels (A,) int64, the class of the matched object or -1 for background; matched (A,) int64, the index of the
    matched object or -1 for background). An image without objects is all background."""
    anchor_boxes = torch.cat(anchors_per_level)                                              # (A, 4)
    A, G = anchor_boxes.shape[0], gt_boxes.shape[0]
    labels = torch.full((A,), -1, dtype=torch.int64, device=anchor_boxes.device)
    matched = torch.full((A,), -1, dtype=torch.int64, device=anchor_boxes.device)
    if G == 0:
        return labels, matched
    gt_boxes = gt_boxes.to(anchor_boxes)
    ious = data.box_iou(anchor_boxes, gt_boxes)                                              # (A, G)
    anchor_ctr = (anchor_boxes[:, :2] + anchor_boxes[:, 2:]) / 2                             # (A, 2)
    gt_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2                                         # (G, 2)
    dist = (anchor_ctr[:, None] - gt_ctr[None]).pow(2).sum(-1).sqrt()                        # (A, G)

    # the k nearest anchors of each level, for all objects at once; indices into the A anchors
    candidates, start = [], 0
    for level in anchors_per_level:
        n = level.shape[0]
        nearest = dist[start:start + n].topk(min(topk, n), dim=0, largest=False).indices    # (k_l, G)
        candidates.append(nearest + start)
        start += n
    candidates = torch.cat(candidates)                                                       # (C, G), C = sum_l k_l

    # the per-object IoU threshold t_g = m_g + v_g over its C candidates
    cand_ious = ious.gather(0, candidates)                                                   # (C, G)
    threshold = cand_ious.mean(0) + cand_ious.std(0)                                         # (G,)

    # keep the candidates over the threshold whose centre is inside the object
    ctr = anchor_ctr[candidates]                                                             # (C, G, 2)
    ltrb = torch.cat((ctr - gt_boxes[:, :2], gt_boxes[:, 2:] - ctr), dim=-1)                 # (C, G, 4)
    is_pos = (cand_ious >= threshold) & (ltrb.min(-1).values > 0.01)                         # (C, G)

    # an anchor positive for several objects takes the one with the highest IoU: the IoUs of its positive pairs,
    # -inf elsewhere, and the max over objects (torch.max returns the first maximal index on ties)
    objects = torch.arange(G, device=gt_boxes.device).expand_as(candidates)                  # (C, G)
    rows, cols = candidates[is_pos], objects[is_pos]                                         # (P,), (P,)
    pos_ious = torch.full_like(ious, -math.inf)                                              # (A, G)
    pos_ious[rows, cols] = ious[rows, cols]
    best_iou, best_gt = pos_ious.max(dim=1)                                                  # (A,), (A,)
    positive = best_iou > -math.inf
    matched[positive] = best_gt[positive]
    labels[positive] = gt_labels.to(labels.device, torch.int64)[best_gt[positive]]
    return labels, matched


# ----------------------------------------------------------------------------------------------------------------------
# 3c. Losses. Classification: sigmoid focal loss (Lin et al. 2017, Eq. 5; gamma 2, alpha 0.25) on every anchor and
# class, background anchors having all-zero targets, summed and divided by the number of positives. Boxes: GIoU loss
# (Rezatofighi et al. 2019) between the decoded prediction and the object, for positives only, weighted by the
# centerness target and divided by the sum of those targets, so well-centred anchors dominate the regression.
# Centerness (FCOS, Tian et al. 2019, Eq. 3): a logit per anchor trained with BCE towards
# sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)), l, t, r, b measured from the anchor centre to the object's
# sides, averaged over positives. As in the reference, the positive count and the centerness sum are taken over all
# processes and divided by their number: DDP then averages the processes' gradients into those of the global batch.

def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Focal loss summed over all elements (torchvision.ops.sigmoid_focal_loss with reduction="sum"). logits and
    targets (float, 0/1) of the same shape."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)                         # the probability given to the true answer
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * ce * (1 - p_t) ** gamma).sum()


def giou_loss(boxes, target_boxes, eps=1e-7):
    """1 - GIoU of each pair: (N, 4), (N, 4) x1y1x2y2 -> (N,) (torchvision.ops.generalized_box_iou_loss, reduction
    "none"). Decoded boxes have positive sides (exp), so no x2 >= x1 guard is needed."""
    x1, y1 = torch.max(boxes[:, 0], target_boxes[:, 0]), torch.max(boxes[:, 1], target_boxes[:, 1])
    x2, y2 = torch.min(boxes[:, 2], target_boxes[:, 2]), torch.min(boxes[:, 3], target_boxes[:, 3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area(boxes) + area(target_boxes) - inter
    # the smallest box enclosing both: GIoU subtracts the share of it that neither box covers
    ex1, ey1 = torch.min(boxes[:, 0], target_boxes[:, 0]), torch.min(boxes[:, 1], target_boxes[:, 1])
    ex2, ey2 = torch.max(boxes[:, 2], target_boxes[:, 2]), torch.max(boxes[:, 3], target_boxes[:, 3])
    enclosing = (ex2 - ex1) * (ey2 - ey1)
    return 1 - (inter / (union + eps) - (enclosing - union) / (enclosing + eps))


def centerness_targets(anchor_boxes, gt_boxes):
    """FCOS centerness of each anchor's centre inside its object: (N, 4), (N, 4) -> (N,) in (0, 1], 1 at the object's
    centre. ATSS positives have their centre inside the object, so every side distance is > 0."""
    ctr = (anchor_boxes[:, :2] + anchor_boxes[:, 2:]) / 2                                     # (N, 2)
    l, t = (ctr - gt_boxes[:, :2]).unbind(-1)
    r, b = (gt_boxes[:, 2:] - ctr).unbind(-1)
    return torch.sqrt(torch.min(l, r) / torch.max(l, r) * (torch.min(t, b) / torch.max(t, b)))


def atss_losses(cls_logits, box_deltas, centerness, anchors_per_level, targets, topk=9, alpha=0.25, gamma=2.0,
                box_loss_weight=2.0):
    """The ATSS training losses of a batch: cls_logits (B, A, K), box_deltas (B, A, 4), centerness (B, A) as ATSSHead
    returns them; anchors_per_level [(A_l, 4)] (levels are needed for the selection); targets [(gt_boxes (G_i, 4),
    gt_labels (G_i,))] per image. -> dict(cls, box, centerness) of scalars, their sum being the reference's total:
    box carries the config's REG_LOSS_WEIGHT (2.0). With no positive in the batch, box and centerness are 0 but still
    connected to the predictions, so backward() works."""
    B, A, K = cls_logits.shape
    anchor_boxes = torch.cat(anchors_per_level).to(box_deltas)                               # (A, 4)
    with torch.no_grad():
        labels, gt_per_anchor = [], []
        for gt_boxes, gt_labels in targets:
            lab, match = atss_assign(anchors_per_level, gt_boxes, gt_labels, topk)
            labels.append(lab)
            # background rows read an arbitrary object (or a dummy box); only positive rows are used below
            gt = gt_boxes.to(anchor_boxes)[match.clamp(min=0)] if len(gt_boxes) else torch.zeros_like(anchor_boxes)
            gt_per_anchor.append(gt)
        labels = torch.stack(labels)                                                         # (B, A)
        gt_per_anchor = torch.stack(gt_per_anchor)                                           # (B, A, 4)
        positive = labels >= 0                                                               # (B, A)
        num_pos = max(coswin.per_process_share(positive.sum().float()).item(), 1.0)
        cls_targets = F.one_hot(labels.clamp(min=0), K) * positive[..., None]                # (B, A, K)

    cls_loss = sigmoid_focal_loss(cls_logits, cls_targets.to(cls_logits), alpha, gamma) / num_pos

    pos_anchors = anchor_boxes.expand(B, A, 4)[positive]                                     # (P, 4)
    pos_gt = gt_per_anchor[positive]                                                         # (P, 4)
    pos_deltas, pos_ctr_logits = box_deltas[positive], centerness[positive]                  # (P, 4), (P,)
    if not positive.any():
        return dict(cls=cls_loss, box=pos_deltas.sum(), centerness=pos_ctr_logits.sum())    # empty sums: 0
    # the reference encodes the object as deltas and decodes it back; reading the object directly is the same box
    ctr_targets = centerness_targets(pos_anchors, pos_gt)                                    # (P,)
    box_loss = (giou_loss(decode(pos_deltas, pos_anchors), pos_gt) * ctr_targets).sum() / coswin.per_process_share(
        ctr_targets.sum())
    ctr_loss = F.binary_cross_entropy_with_logits(pos_ctr_logits, ctr_targets, reduction="sum") / num_pos
    return dict(cls=cls_loss, box=box_loss_weight * box_loss, centerness=ctr_loss)


# ----------------------------------------------------------------------------------------------------------------------
# 3d. The ATSS predictors. In the DynamicHead reference ATSS has no conv towers of its own (ATSS.NUM_CONVS 0): the
# Dynamic Head blocks are the towers, and each level of the last block feeds three convolutions, shared over levels,
# that give the class logits, the box deltas and the centerness logit of the level's anchors. The reference uses 1x1
# convolutions here (kernel_size=1); the original ATSS, on its own 4-conv towers, uses 3x3 (kernel_size=3). The class
# bias starts at -log((1 - p) / p), so every anchor first predicts probability p = 0.01 and the many background anchors
# do not swamp the focal loss at the start (Lin et al. 2017, section 4.1 "Initialization"). A learnable scalar per level
# rescales the deltas, since one shared conv serves objects of very different sizes (FCOS section 3.2).

class ATSSHead(nn.Module):
    def __init__(self, channels, num_classes, num_levels, prior_prob=0.01, kernel_size=1):
        super().__init__()
        self.num_classes = num_classes
        conv = lambda out: nn.Conv2d(channels, out, kernel_size, padding=kernel_size // 2)
        self.cls_logits, self.bbox_pred, self.centerness = conv(num_classes), conv(4), conv(1)
        for layer in (self.cls_logits, self.bbox_pred, self.centerness):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        self.scales = nn.Parameter(torch.ones(num_levels))

    def forward(self, levels):
        """levels [(B, C, H_l, W_l)] -> cls_logits (B, A, K), box_deltas (B, A, 4), centerness (B, A), with
        A = sum_l H_l * W_l ordered as anchors() orders them (level, then y, then x)."""
        cls, deltas, ctr = [], [], []
        for l, x in enumerate(levels):
            B = x.shape[0]
            cls.append(self.cls_logits(x).permute(0, 2, 3, 1).reshape(B, -1, self.num_classes))   # (B, H*W, K)
            d = self.bbox_pred(x) * self.scales[l]                                                 # (B, 4, H, W)
            deltas.append(d.permute(0, 2, 3, 1).reshape(B, -1, 4))                                # (B, H*W, 4)
            ctr.append(self.centerness(x).reshape(B, -1))                                         # (B, H*W)
        return torch.cat(cls, 1), torch.cat(deltas, 1), torch.cat(ctr, 1)


# ----------------------------------------------------------------------------------------------------------------------
# 3e. From predictions to detections (the reference's inference, then detectron2's detector_postprocess). Per level,
# an (anchor, class) pair is a candidate when its class probability alone exceeds score_thresh; its score is the class
# probability times the centerness probability (no square root in the DynamicHead reference, unlike FCOS-style
# postprocessors), so off-centre anchors rank below centred ones. Each level keeps its best pre_nms_top_n candidates;
# then per-class NMS over all levels, the best max_detections, and finally the boxes are clipped to the image and
# empty ones dropped (clipping after NMS, as detector_postprocess does).

@torch.no_grad()
def postprocess(cls_logits, box_deltas, centerness, anchors_per_level, image_size, score_thresh=0.05,
                pre_nms_top_n=1000, nms_thresh=0.6, max_detections=100):
    """Detections per image: predictions as ATSSHead returns them, image_size (H, W) for every image or a list of one
    (H, W) per image -> [(boxes (n, 4) x1y1x2y2 in input pixels, scores (n,), labels (n,) int64)], by decreasing
    score."""
    B = cls_logits.shape[0]
    sizes = image_size if isinstance(image_size, list) else [image_size] * B
    results = []
    for i in range(B):
        boxes, scores, labels, start = [], [], [], 0
        for level in anchors_per_level:
            span = slice(start, start + level.shape[0])
            start += level.shape[0]
            prob = cls_logits[i, span].sigmoid()                                             # (A_l, K)
            is_cand = prob > score_thresh                                                    # (A_l, K)
            score = (prob * centerness[i, span].sigmoid()[:, None])[is_cand]                 # (n,)
            loc, cls = is_cand.nonzero(as_tuple=True)                                        # (n,), (n,)
            score, best = score.topk(min(pre_nms_top_n, score.numel()))
            loc, cls = loc[best], cls[best]
            boxes.append(decode(box_deltas[i, span][loc], level[loc]))
            scores.append(score)
            labels.append(cls)
        boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:max_detections]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        H, W = sizes[i]
        boxes = torch.stack((boxes[:, 0].clamp(0, W), boxes[:, 1].clamp(0, H),
                             boxes[:, 2].clamp(0, W), boxes[:, 3].clamp(0, H)), dim=-1)
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        results.append((boxes[nonempty], scores[nonempty], labels[nonempty]))
    return results


# ----------------------------------------------------------------------------------------------------------------------
# 4. The detector and its configs. CoSwin's stage maps -> FPN -> Dynamic Head -> ATSS predictors (Florence section
# 2.4); the configs are the paper's adapters on CoSwin-T / CoSwin-H and the CPU toy, with their optimisation settings.

@dataclass
class DetConfig:
    backbone: str = "toy"        # a coswin.CONFIGS name
    img_size: int = 96           # images are resized to img_size x img_size, their boxes with them
    channels: int = 64           # FPN and Dynamic Head width (the paper: 256)
    num_blocks: int = 2          # Dynamic Head blocks (the paper: 6)
    skip_stages: int = 0         # finest backbone stages left out of the pyramid (ATSS on Swin: 1, it starts at P3)
    extra_levels: int = 0        # pyramid levels below the backbone's coarsest (ATSS: 2, P6 and P7)
    anchor_scale: float = 8.0    # anchor side in strides (ATSS: 8)
    topk: int = 9                # ATSS candidates per level and object
    class_agnostic: bool = False # one class, "object": proposals for zero-shot detection
    init_from: str = ""          # a train.py UniCL checkpoint whose image tower initialises the backbone
    unicl_ckpt: str = ""         # with class_agnostic on the Shapes world: a UniCL checkpoint that names the boxes
    # data: "shapes" (the built-in world, classes = its 6 shapes) or a COCO instances .json
    data: str = "shapes"
    val_data: str = ""           # a COCO instances .json; for "shapes" the val split is used
    image_root: str = ""         # folder of the images of a COCO file ("" = the file's folder)
    train_size: int = 20000      # Shapes world: distinct training images
    val_size: int = 500          # Shapes world: val images; 0 = no eval
    max_objects: int = 3         # Shapes world: 1..max_objects shapes per image
    score_thresh: float = 0.05   # inference: see postprocess
    nms_thresh: float = 0.6
    max_detections: int = 100
    eval_batch_size: int = 50


CONFIGS = {
    # CPU toy: the UniCL toy's CoSwin (conv stem, strides 8 / 16 / 32: 12 x 12, 6 x 6, 3 x 3 maps at 96 px), a
    # 2-block Dynamic Head of width 64; anchors of 4 strides (32, 64, 128 px), as Shapes-world objects are 8-50 px
    "toy": DetConfig(anchor_scale=4.0),
    # the paper's adapter: 6 blocks of 256 channels on P3-P7 of CoSwin-T / CoSwin-H (Florence section 2.4)
    "T": DetConfig(backbone="T", img_size=800, channels=256, num_blocks=6, skip_stages=1, extra_levels=2, data="",
                   train_size=0, val_size=0),
    "H": DetConfig(backbone="H", img_size=800, channels=256, num_blocks=6, skip_stages=1, extra_levels=2, data="",
                   train_size=0, val_size=0),
}

# Optimisation settings per named config (train.py TrainConfig fields)
TRAIN = {
    "toy": dict(batch_size=32, max_iters=1500, lr=1e-3, warmup_iters=100, weight_decay=0.05, log_interval=50,
                ckpt_interval=250),
    "T": dict(batch_size=16, max_iters=90000, lr=1e-4, warmup_iters=1000, weight_decay=0.05),
    "H": dict(batch_size=16, max_iters=90000, lr=1e-4, warmup_iters=1000, weight_decay=0.05),
}


class Detector(nn.Module):
    """images (B, 3, S, S) -> (class logits (B, A, K), box deltas (B, A, 4), centerness logits (B, A), anchors
    [(A_l, 4)]). The anchors come out of forward so that a DDP- or compile-wrapped model needs no attribute access."""

    def __init__(self, cfg: DetConfig, num_classes: int):
        super().__init__()
        if cfg.backbone not in coswin.CONFIGS:
            raise ValueError(f"unknown backbone {cfg.backbone!r}; valid: {', '.join(coswin.CONFIGS)}")
        bcfg = coswin.CONFIGS[cfg.backbone]
        self.cfg = cfg
        self.backbone = coswin.CoSwin(replace(bcfg, num_classes=0))
        first_stride = 2 ** len(bcfg.stem) if bcfg.stem else (4 if bcfg.embed == "conv" else bcfg.patch_size)
        used = range(cfg.skip_stages, len(bcfg.depths))
        self.strides = [first_stride * 2 ** i for i in used] + [first_stride * 2 ** (len(bcfg.depths) - 1 + j)
                                                                  for j in range(1, cfg.extra_levels + 1)]
        self.fpn = FPN(tuple(self.backbone.feature_channels[i] for i in used), cfg.channels, cfg.extra_levels)
        self.head = DynamicHead(cfg.channels, cfg.num_blocks)
        self.predictor = ATSSHead(cfg.channels, num_classes, len(self.strides))

    def forward(self, images):
        levels = self.head(self.fpn(self.backbone.forward_features(images)[self.cfg.skip_stages:]))
        cls, deltas, ctr = self.predictor(levels)
        sizes = [tuple(level.shape[-2:]) for level in levels]
        return cls, deltas, ctr, anchors(sizes, self.strides, self.cfg.anchor_scale, device=images.device)

    def set_grad_checkpointing(self, enable=True):
        self.backbone.set_grad_checkpointing(enable)


# ======================================================================================================================
# Supporting machinery: the operators the model calls, COCO evaluation and files, zero-shot detection, the stage
# protocol and the command line. Each section stands alone; a reader of the paper can stop here.

# ----------------------------------------------------------------------------------------------------------------------
# 5a. Deformable convolution (Dai et al. 2017, arXiv:1703.06211) and its modulated form, DCNv2 (Zhu et al. 2019,
# arXiv:1811.11168, section 3.2): y(p) = sum_k w_k * m_k(p) * x(p + p_k + dp_k(p)). Each output location p reads each
# kernel tap k at a learned fractional offset dp_k(p), weighted by a learned mask m_k(p) in DCNv2. A fractional point is
# read by bilinear interpolation of its 4 integer neighbours; neighbours outside the image are zero, so a point one
# pixel or more outside reads 0 and a point in (-1, 0) or (H-1, H) reads a fraction of the border pixel, as in
# torchvision. The sampled values form im2col "columns" (one row per input channel and tap, one column per output
# location), and the convolution is then a grouped matmul with the weight, as in a plain im2col convolution. Everything
# is ordinary differentiable torch ops, so autograd gives the gradients for input, offset, mask, weight and bias.

def _pair(value, name):
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """torchvision.ops.deform_conv2d in plain PyTorch, same arguments and same result.

    input (B, C_in, H, W); offset (B, 2 * offset_groups * kh * kw, H_out, W_out) holding one (dy, dx) pair per kernel
    tap, taps in row-major order, for each of offset_groups contiguous blocks of input channels; weight (C_out,
    C_in / groups, kh, kw); bias (C_out,) or None; mask (B, offset_groups * kh * kw, H_out, W_out) or None (None = plain
    deformable convolution, DCNv1). stride, padding, dilation: int or (h, w). Returns (B, C_out, H_out, W_out).
    Memory: the 4 gathered neighbours of every sample are kept for the backward pass, about 4x the columns of an
    ordinary im2col convolution.
    """
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"stride {stride!r} and dilation {dilation!r} must be >= 1 and padding {padding!r} >= 0")
    if input.dim() != 4:
        raise ValueError(f"input must be (B, C_in, H, W), got shape {tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be (C_out, C_in / groups, kh, kw), got shape {tuple(weight.shape)}")
    B, C_in, H, W = input.shape
    C_out, C_group, kh, kw = weight.shape
    if C_group == 0 or C_in % C_group or C_out % (C_in // C_group):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit input of shape {tuple(input.shape)}: "
                         f"weight.shape[1] = C_in / groups must divide C_in = {C_in}, and groups must divide C_out")
    groups, K = C_in // C_group, kh * kw
    H_out = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    W_out = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if H_out < 1 or W_out < 1:
        raise ValueError(f"the {kh}x{kw} kernel with dilation {(dh, dw)} does not fit the input of shape "
                         f"{tuple(input.shape)} padded by {(ph, pw)}")
    G = offset.shape[1] // (2 * K) if offset.dim() == 4 else 0  # offset groups, read off the offset's channels
    if offset.dim() != 4 or G == 0 or offset.shape != (B, 2 * G * K, H_out, W_out) or C_in % G:
        raise ValueError(f"offset must have shape (B, 2 * offset_groups * kh * kw, H_out, W_out) = "
                         f"({B}, 2 * offset_groups * {K}, {H_out}, {W_out}) with offset_groups dividing C_in = {C_in}, "
                         f"got {tuple(offset.shape)}")
    if mask is not None and mask.shape != (B, G * K, H_out, W_out):
        raise ValueError(f"mask must have shape (B, offset_groups * kh * kw, H_out, W_out) = "
                         f"({B}, {G * K}, {H_out}, {W_out}), got {tuple(mask.shape)}")
    if bias is not None and bias.shape != (C_out,):
        raise ValueError(f"bias must have shape (C_out,) = ({C_out},), got {tuple(bias.shape)}")

    # where every tap of every output location samples: the regular grid of a convolution, plus the learned offset
    L = H_out * W_out
    tap_y = torch.arange(kh, device=input.device) * dh                                        # (kh,)
    tap_x = torch.arange(kw, device=input.device) * dw                                        # (kw,)
    out_y = torch.arange(H_out, device=input.device) * sh - ph                                # (H_out,)
    out_x = torch.arange(W_out, device=input.device) * sw - pw                                # (W_out,)
    grid_y = (tap_y[:, None, None, None] + out_y[None, None, :, None]).expand(kh, kw, H_out, W_out)
    grid_x = (tap_x[None, :, None, None] + out_x[None, None, None, :]).expand(kh, kw, H_out, W_out)
    offset = offset.reshape(B, G, K, 2, L)                                                    # (B, G, K, (dy, dx), L)
    y = grid_y.reshape(K, L).to(input.dtype) + offset[:, :, :, 0]                             # (B, G, K, L)
    x = grid_x.reshape(K, L).to(input.dtype) + offset[:, :, :, 1]                             # (B, G, K, L)

    # bilinear weights of the 4 neighbours (y0, x0), (y0, x1), (y1, x0), (y1, x1); floor() passes no gradient, so the
    # offset's gradient comes from the fractional parts, as in torchvision's backward kernel
    y0, x0 = y.detach().floor(), x.detach().floor()
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    corner_weights = torch.stack((hy * hx, hy * lx, ly * hx, ly * lx), dim=2)                 # (B, G, 4, K, L)
    if mask is not None:
        corner_weights = corner_weights * mask.reshape(B, G, 1, K, L)

    # zero-padding the image by one pixel makes "outside contributes zero" a plain gather: a neighbour row clamped to
    # -1 or H lands on the zero ring, and a clamped far-away point has all 4 neighbours there
    Hp, Wp = H + 2, W + 2
    rows = torch.stack((y0, y0, y0 + 1, y0 + 1), dim=2).clamp(-1, H).long() + 1               # (B, G, 4, K, L)
    cols = torch.stack((x0, x0 + 1, x0, x0 + 1), dim=2).clamp(-1, W).long() + 1               # (B, G, 4, K, L)
    index = (rows * Wp + cols).view(B, G, 1, 4 * K * L).expand(B, G, C_in // G, 4 * K * L)
    padded = F.pad(input, (1, 1, 1, 1)).view(B, G, C_in // G, Hp * Wp)                        # (B, G, C_in/G, Hp*Wp)
    neighbours = padded.gather(3, index).view(B, G, C_in // G, 4, K, L)                       # (B, G, C_in/G, 4, K, L)
    columns = (neighbours * corner_weights[:, :, None]).sum(3)                                # (B, G, C_in/G, K, L)

    # the convolution proper: each conv group's (C_in/groups * K) rows of columns times its (C_out/groups) filters
    columns = columns.reshape(B, groups, C_group * K, L)                                      # (B, groups, C_in/g*K, L)
    out = weight.reshape(groups, C_out // groups, C_group * K) @ columns                      # (B, groups, C_out/g, L)
    out = out.reshape(B, C_out, H_out, W_out)                                                 # (B, C_out, H_out, W_out)
    return out if bias is None else out + bias.view(1, C_out, 1, 1)


# ----------------------------------------------------------------------------------------------------------------------
# 5b. Non-maximum suppression, as torchvision computes it. Boxes are (x1, y1, x2, y2) in pixels. NMS visits boxes by
# decreasing score and keeps a box unless a box kept before it overlaps it with IoU > threshold (data.box_iou,
# torchvision's arithmetic). All IoUs are computed at once (in row chunks, to bound memory); only the greedy pass, which
# is sequential by nature, loops, over the boxes in score order, skipping suppressed ones. torchvision's CUDA kernel
# splits the work the same way: an overlap bit mask on the device, the greedy pass on the host.


def _check_boxes_scores(boxes, scores, idxs=None):
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4), got shape {tuple(boxes.shape)}")
    if scores.shape != (boxes.shape[0],):
        raise ValueError(f"scores must be (N,) = ({boxes.shape[0]},) like boxes, got shape {tuple(scores.shape)}")
    if idxs is not None and idxs.shape != (boxes.shape[0],):
        raise ValueError(f"idxs must be (N,) = ({boxes.shape[0]},) like boxes, got shape {tuple(idxs.shape)}")


def nms(boxes, scores, iou_threshold, chunk=512):
    """torchvision.ops.nms: int64 indices of the kept boxes, by decreasing score. boxes (N, 4) x1y1x2y2, scores (N,).
    chunk: rows of the IoU matrix computed at once, which bounds the float temporaries to a few chunk x N maps."""
    _check_boxes_scores(boxes, scores)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    # tied scores are visited in index order: torchvision's kernel sorts stably (an unstable sort would change which
    # of two tied, overlapping boxes survives)
    order = torch.sort(scores, descending=True, stable=True)[1]                               # (N,)
    boxes = boxes[order]                                                                      # (N, 4), by score
    N = boxes.shape[0]
    # overlaps[i, j]: box i would suppress box j. A box can suppress only boxes after it, so each chunk of rows skips
    # the columns before it. The IoU is compared in float64 because torchvision's kernel compares a float IoU with a
    # double threshold: a float32 IoU equal to float32(0.3) exceeds 0.3 but not float32(0.3)
    overlaps = torch.zeros(N, N, dtype=torch.bool, device=boxes.device)                       # (N, N)
    for start in range(0, N, chunk):
        rows = slice(start, start + chunk)
        overlaps[rows, start:] = data.box_iou(boxes[rows], boxes[start:]).double() > iou_threshold
    overlaps = overlaps.cpu().numpy()

    # the greedy pass; row i may also mark boxes before i, which are decided already
    suppressed = np.zeros(N, dtype=bool)
    kept = []
    for i in range(N):
        if not suppressed[i]:
            kept.append(i)
            suppressed |= overlaps[i]
    return order[torch.tensor(kept, dtype=torch.int64, device=order.device)]


def batched_nms(boxes, scores, idxs, iou_threshold):
    """torchvision.ops.batched_nms: NMS within each category idxs[i] independently, indices by decreasing score.

    torchvision picks one of two strategies by size, for speed. They keep the same boxes up to floating-point rounding
    of the shifted coordinates, but order tied scores differently, so we follow it in both to give exactly its indices:
    up to 1,000 boxes (25,000 on a GPU), one NMS over boxes shifted apart per category so that boxes of different
    categories never overlap; beyond, one NMS per category and a final sort by score."""
    _check_boxes_scores(boxes, scores, idxs)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if boxes.numel() <= (4000 if boxes.device.type == "cpu" else 100_000):
        shift = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))                  # (N,)
        return nms(boxes + shift[:, None], scores, iou_threshold)
    keep = torch.zeros_like(scores, dtype=torch.bool)                                         # (N,)
    for category in torch.unique(idxs):
        members = torch.where(idxs == category)[0]
        keep[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    keep = torch.where(keep)[0]
    return keep[torch.sort(scores[keep], descending=True)[1]]  # torchvision's unstable sort here, for its tie order


# ----------------------------------------------------------------------------------------------------------------------
# 6a. COCO box evaluation (pycocotools' COCOeval with iouType="bbox": evaluate, accumulate, summarize)

# np.linspace as pycocotools builds them: np.arange would put the thresholds a hair above .55, .60, ...
COCO_IOU_THRS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
COCO_REC_THRS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)
COCO_MAX_DETS = (1, 10, 100)
COCO_AREA_RNGS = np.array([[0 ** 2, 1e5 ** 2], [0 ** 2, 32 ** 2], [32 ** 2, 96 ** 2], [96 ** 2, 1e5 ** 2]])
COCO_AREA_LABELS = ("all", "small", "medium", "large")
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# (is AP, IoU threshold or None for all, area label, maxDets) of each entry of COCO_STATS, as summarize() lists them
_COCO_SUMMARY = ((1, None, "all", 100), (1, .5, "all", 100), (1, .75, "all", 100), (1, None, "small", 100),
                 (1, None, "medium", 100), (1, None, "large", 100), (0, None, "all", 1), (0, None, "all", 10),
                 (0, None, "all", 100), (0, None, "small", 100), (0, None, "medium", 100), (0, None, "large", 100))
_MATCH_CHUNK = 20_000   # pairs x padded ground truths per matching chunk; bounds the (pairs, A, T, G) work arrays


def coco_box_iou(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU of x,y,w,h boxes, dt (..., D, 4) against gt (..., G, 4) -> (..., D, G), as pycocotools' maskUtils.iou.

    Areas are w*h (no +1). Against a crowd gt the union is the detection's own area, so a detection inside a crowd
    region scores 1 however large the region. The float operations follow maskApi.c's bbIou in order, so the
    values are bit-identical to pycocotools'. Not data.box_iou: COCO boxes are x,y,w,h (areas w*h, not (x2 - x1) *
    (y2 - y1)), a crowd gt changes the union, and matches at the thresholds need pycocotools' float64 values exactly.
    """
    d, g = dt[..., :, None, :], gt[..., None, :, :]
    w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
    h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
    inter = w * h
    da, ga = d[..., 2] * d[..., 3], g[..., 2] * g[..., 3]
    union = np.where(crowd[..., None, :], da, da + ga - inter)
    overlap = (w > 0) & (h > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(overlap, inter / np.where(overlap, union, 1.0), 0.0)


def _coco_check_detections(detections, cat_pos=None, img_pos=None):
    """-> (boxes (N, 4), scores (N,)) as float64; ValueError naming the first detection whose fields are missing,
    whose bbox is not 4 numbers, whose bbox/score is not finite, or whose image/category is not in img_pos/cat_pos."""
    fields = {"image_id", "category_id", "bbox", "score"}
    for i, d in enumerate(detections):
        if not fields <= d.keys():
            raise ValueError(f"detection {i}: missing field '{sorted(fields - d.keys())[0]}'")
        if img_pos is not None and d["image_id"] not in img_pos:
            raise ValueError(f"detection {i}: image_id {d['image_id']!r} is not an image of the ground truth")
        if cat_pos is not None and d["category_id"] not in cat_pos:
            raise ValueError(f"detection {i}: category_id {d['category_id']!r} is not a category of the ground truth")
    try:
        box = np.array([d["bbox"] for d in detections], np.float64).reshape(-1, 4)
        score = np.array([d["score"] for d in detections], np.float64)
    except (TypeError, ValueError):       # ragged or non-numeric: find the culprit for the message
        box, score = None, None
    if box is None or len(box) != len(detections):
        i = next((i for i, d in enumerate(detections) if np.size(d["bbox"]) != 4), 0)
        raise ValueError(f"detection {i}: bbox {detections[i]['bbox']!r} / score {detections[i]['score']!r} must "
                         f"be 4 numbers and a number")
    bad = ~(np.isfinite(box).all(1) & np.isfinite(score))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"detection {i}: bbox {list(box[i])} / score {score[i]} must be finite")
    return box, score


def _group_starts(keys: np.ndarray, uniq: np.ndarray):
    """For sorted keys and sorted unique keys `uniq`: (start, count) of each unique key's run (count 0 if absent)."""
    start = np.searchsorted(keys, uniq, side="left")
    return start, np.searchsorted(keys, uniq, side="right") - start


def _coco_match(d_box, d_n, d_start, g_box, g_crowd, g_ign, g_n, g_start):
    """pycocotools' evaluateImg matching for many (image, category) pairs at once -> matched gt row (P, A, T, Dmax).

    Per pair: detections (sorted by score) at rows d_start..d_start+d_n of d_box, gts at g_start..g_start+g_n of
    g_box; g_ign (A, Ng) is the per-area-range ignore flag. Returns the row of the gt each detection matches, -1 if
    none. Rule, per area range and threshold t: walk the detections in score order; a detection takes, among gts not
    yet taken (crowd gts are never used up) whose IoU >= min(t, 1-1e-10), the one of highest IoU, preferring any
    non-ignored gt over all ignored ones; equal IoUs go to the later gt in file order, as pycocotools' ">= best so far"
    scan does. The rank loop is sequential because a taken gt changes later detections' choices.
    """
    P, A, T = len(d_n), g_ign.shape[0], len(COCO_IOU_THRS)
    dmax, gmax = int(d_n.max()), int(g_n.max())
    cols_d, cols_g = np.arange(dmax), np.arange(gmax)
    d_valid, g_valid = cols_d < d_n[:, None], cols_g < g_n[:, None]                     # (P, Dmax), (P, Gmax)
    d_rows = np.where(d_valid, d_start[:, None] + cols_d, 0)
    g_rows = np.where(g_valid, g_start[:, None] + cols_g, 0)
    crowd = g_crowd[g_rows] & g_valid                                                      # (P, Gmax)
    ious = coco_box_iou(d_box[d_rows], g_box[g_rows], crowd)                               # (P, Dmax, Gmax)
    ious[~np.broadcast_to(g_valid[:, None, :], ious.shape)] = -1.0                      # padding never passes
    ign = g_ign[:, g_rows].transpose(1, 0, 2)[:, :, None, :]                               # (P, A, 1, Gmax)
    thr = np.minimum(COCO_IOU_THRS, 1 - 1e-10)[None, None, :, None]
    reusable = crowd[:, None, None, :]
    taken = np.zeros((P, A, T, gmax), bool)
    match = np.full((P, A, T, dmax), -1, np.int64)
    for r in range(dmax):
        # only pairs whose rank-r detection reaches the lowest threshold on some gt can match; the rest stay -1
        act = np.nonzero(d_valid[:, r] & (ious[:, r, :] >= thr.min()).any(-1))[0]
        iou = ious[act, None, None, r, :]                                                  # (P', 1, 1, Gmax)
        ok = (iou >= thr) & ~(taken[act] & ~reusable[act])
        regular = ok & ~ign[act]
        cand = np.where(regular.any(-1, keepdims=True), regular, ok & ign[act])
        best = gmax - 1 - np.where(cand, iou, -1.0)[..., ::-1].argmax(-1)               # ties -> the later gt
        hit = cand.any(-1)
        q, a, t = np.nonzero(hit)
        taken[act[q], a, t, best[q, a, t]] = True
        match[act, :, :, r] = np.where(hit, g_rows[act[:, None, None], best], -1)
    return match


def coco_eval(coco_gt: dict, detections: list) -> dict:
    """COCO box AP/AR of `detections` (results format: image_id, category_id, bbox x,y,w,h, score) against `coco_gt`
    (a COCO instances dict) -> {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
    "ARl"}, equal to pycocotools' COCOeval(gt, gt.loadRes(detections), "bbox") .stats after evaluate, accumulate,
    summarize (-1 where no category has a non-ignored gt in that area range).

    Images are coco_gt["images"], categories coco_gt["categories"]; gt annotations of other images or categories
    are left out, as pycocotools does. A detection naming an unknown image or category, or with a non-finite
    bbox/score, raises ValueError (pycocotools asserts on the image, silently drops the category). Duplicate gt
    annotation ids raise ValueError: pycocotools looks gts up by id and would evaluate one of them twice. A gt box
    with NaN/inf coordinates is not matched as pycocotools' C code would (NaN IoUs); read_coco drops such boxes.
    """
    # (1) Index images and categories as sorted unique ids (pycocotools' np.unique), gts and detections as arrays.
    img_ids = sorted({im["id"] for im in coco_gt["images"]})
    cat_ids = sorted({c["id"] for c in coco_gt["categories"]})
    img_pos = {v: i for i, v in enumerate(img_ids)}
    cat_pos = {v: i for i, v in enumerate(cat_ids)}
    I, K, A, T, R, M = len(img_ids), len(cat_ids), len(COCO_AREA_RNGS), len(COCO_IOU_THRS), len(COCO_REC_THRS), 3
    d_box, d_score = _coco_check_detections(detections, cat_pos, img_pos)
    anns = coco_gt["annotations"]
    seen = set()
    for a in anns:
        if a["id"] in seen:
            raise ValueError(f"coco_gt: annotation id {a['id']!r} occurs twice")
        seen.add(a["id"])
    anns = [a for a in anns if a["image_id"] in img_pos and a["category_id"] in cat_pos]

    g_key = np.array([cat_pos[a["category_id"]] * I + img_pos[a["image_id"]] for a in anns], np.int64)
    g_order = np.argsort(g_key, kind="mergesort")                 # a pair's gts stay in file order
    g_key = g_key[g_order]
    g_box = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)[g_order]
    g_area = np.array([a["area"] for a in anns], np.float64)[g_order]
    g_crowd = np.array([bool(a["iscrowd"]) for a in anns], bool)[g_order]
    g_zero_id = np.array([a["id"] == 0 for a in anns], bool)[g_order]
    lo, hi = COCO_AREA_RNGS[:, :1], COCO_AREA_RNGS[:, 1:]
    g_ign = g_crowd[None] | (g_area[None] < lo) | (g_area[None] > hi)                   # (A, Ng)

    d_key = np.array([cat_pos[d["category_id"]] * I + img_pos[d["image_id"]] for d in detections], np.int64)
    # score order inside each pair: stable on -score, then stable on the pair, so equal scores keep list order
    d_order = np.argsort(-d_score, kind="mergesort")
    d_order = d_order[np.argsort(d_key[d_order], kind="mergesort")]
    d_key, d_score, d_box = d_key[d_order], d_score[d_order], d_box[d_order]
    pairs = np.unique(np.concatenate([g_key, d_key]))
    d_start, d_cnt = _group_starts(d_key, pairs)
    d_rank = np.arange(len(d_key)) - np.repeat(d_start, d_cnt)
    keep = d_rank < COCO_MAX_DETS[-1]                              # pycocotools cuts each pair at 100 before matching
    d_key, d_score, d_box, d_rank = d_key[keep], d_score[keep], d_box[keep], d_rank[keep]
    d_start, d_cnt = _group_starts(d_key, pairs)
    g_start, g_cnt = _group_starts(g_key, pairs)
    d_area = d_box[:, 2] * d_box[:, 3]                             # loadRes: a detection's area is w*h

    # (2) Match (evaluateImg) in chunks of pairs with similar gt counts, so padding to the chunk's largest stays small.
    d_gt = np.full((A, T, len(d_key)), -1, np.int64)                                    # matched gt row per detection
    both = np.nonzero((d_cnt > 0) & (g_cnt > 0))[0]
    both = both[np.argsort(g_cnt[both], kind="mergesort")]
    i = 0
    while i < len(both):
        j = i + 1
        while j < len(both) and (j + 1 - i) * g_cnt[both[j]] <= _MATCH_CHUNK:
            j += 1
        ch = both[i:j]
        m = _coco_match(d_box, d_cnt[ch], d_start[ch], g_box, g_crowd, g_ign, g_cnt[ch], g_start[ch])
        rows = d_start[ch][:, None] + np.arange(m.shape[-1])
        valid = np.arange(m.shape[-1]) < d_cnt[ch][:, None]
        d_gt[:, :, rows[valid]] = m.transpose(1, 2, 0, 3)[:, :, valid]
        i = j
    # row -1 (unmatched) reads an appended column: not ignored, id not 0
    ign_of = np.take_along_axis(np.pad(g_ign, ((0, 0), (0, 1))), d_gt.reshape(A, -1), 1).reshape(A, T, -1)
    # pycocotools stores the matched gt's id and tests it for non-zero: a match to a gt with id 0 counts as unmatched
    d_m = (d_gt >= 0) & ~np.append(g_zero_id, False)[d_gt]
    # ignored: a detection matched to an ignored gt, and an unmatched one whose own area is outside the range
    d_out = (d_area[None] < lo) | (d_area[None] > hi)                                   # (A, Nd)
    d_ig = ign_of | (~d_m & d_out[:, None, :])
    tps, fps = d_m & ~d_ig, ~d_m & ~d_ig                                                 # (A, T, Nd)

    # (3) Accumulate: per category and maxDets, all images' detections in one list sorted by score (mergesort on
    # the concatenation in image order, as pycocotools), then cumulative precision/recall at 101 recall points.
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    g_cat = g_key // I
    npig = np.stack([np.bincount(g_cat[~g_ign[a]], minlength=K) for a in range(A)], 1)  # (K, A) non-ignored gts
    d_cat = d_key // I
    c_start, c_cnt = _group_starts(d_cat, np.arange(K))
    for k in range(K):
        if not npig[k].any():
            continue
        blk = np.arange(c_start[k], c_start[k] + c_cnt[k])
        for mi, max_det in enumerate(COCO_MAX_DETS):
            sel = blk[d_rank[blk] < max_det]
            sel = sel[np.argsort(-d_score[sel], kind="mergesort")]
            nd = len(sel)
            tp_sum = np.cumsum(tps[:, :, sel], axis=2).astype(float)
            fp_sum = np.cumsum(fps[:, :, sel], axis=2).astype(float)
            for a in np.nonzero(npig[k])[0]:
                rc = tp_sum[a] / npig[k, a]
                pr = tp_sum[a] / (fp_sum[a] + tp_sum[a] + np.spacing(1))
                recall[:, k, a, mi] = rc[:, -1] if nd else 0
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]                # precision made monotone
                for t in range(T):
                    idx = np.searchsorted(rc[t], COCO_REC_THRS, side="left")
                    ok = idx < nd                                      # recall levels never reached keep 0
                    precision[t, ok, k, a, mi] = pr[t, idx[ok]]
                    precision[t, ~ok, k, a, mi] = 0

    # (4) Summarize: the mean over the valid (> -1) entries of each slice, as pycocotools' _summarize.
    out = {}
    for name, (is_ap, iou_thr, area, max_det) in zip(COCO_STATS, _COCO_SUMMARY):
        ai, mi = [COCO_AREA_LABELS.index(area)], [COCO_MAX_DETS.index(max_det)]
        s = precision[:, :, :, ai, mi] if is_ap else recall[:, :, ai, mi]
        if iou_thr is not None:
            s = s[np.where(iou_thr == COCO_IOU_THRS)[0]]
        out[name] = float(np.mean(s[s > -1])) if (s > -1).any() else -1.0
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 6b. Reading ground truth and writing results. A bad record names the file, the annotation and the field, never a
# KeyError from deep inside the evaluation.

_COCO_ANN_FIELDS = ("image_id", "category_id", "bbox", "area", "iscrowd")


def read_coco(path: str):
    """Load and validate a COCO instances JSON -> (dataset, skipped_ids).

    Missing top-level lists, a missing field of an image, category or annotation, a bbox that is not 4 numbers,
    duplicate annotation ids, or an annotation naming an unknown image/category raise ValueError naming the file,
    the annotation id (its index if it has no id) and the field. Annotations whose bbox or area is NaN/inf or whose
    box has width or height <= 0 are dropped from dataset["annotations"] and their ids returned in skipped_ids
    (not fatal: such a box can match nothing; pycocotools would keep it as a gt no detection can ever find).
    """
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level is {type(data).__name__}, not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing field '{key}' (a list)")
    for key in ("images", "categories"):
        for i, rec in enumerate(data[key]):
            if "id" not in rec:
                raise ValueError(f"{path}: {dict(images='image', categories='category')[key]} index {i}: "
                                 f"missing field 'id'")
    img_ids = {im["id"] for im in data["images"]}
    cat_ids = {c["id"] for c in data["categories"]}
    kept, skipped, seen = [], [], set()
    for i, ann in enumerate(data["annotations"]):
        if "id" not in ann:
            raise ValueError(f"{path}: annotation index {i}: missing field 'id'")
        where = f"{path}: annotation id {ann['id']}"
        for field in _COCO_ANN_FIELDS:
            if field not in ann:
                raise ValueError(f"{where}: missing field '{field}'")
        if ann["id"] in seen:
            raise ValueError(f"{where}: field 'id' occurs twice")
        seen.add(ann["id"])
        if ann["image_id"] not in img_ids:
            raise ValueError(f"{where}: field 'image_id' {ann['image_id']!r} is not in 'images'")
        if ann["category_id"] not in cat_ids:
            raise ValueError(f"{where}: field 'category_id' {ann['category_id']!r} is not in 'categories'")
        box = ann["bbox"]
        try:
            box = [float(v) for v in box]
            area = float(ann["area"])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: field 'bbox' {box!r} / 'area' {ann['area']!r} must be numbers") from None
        if len(box) != 4:
            raise ValueError(f"{where}: field 'bbox' has {len(box)} numbers, not 4 (x, y, w, h)")
        if not all(math.isfinite(v) for v in box + [area]) or box[2] <= 0 or box[3] <= 0:
            skipped.append(ann["id"])
            continue
        kept.append(ann)
    return {**data, "annotations": kept}, skipped


def write_coco_results(path: str, detections) -> None:
    """Write detections (dicts with image_id, category_id, bbox x,y,w,h, score) as a COCO results JSON list.

    bbox is rounded to 1/100 pixel (below any IoU that matters, and a third of the file size of raw float32 repr);
    scores keep full precision, since rounding them makes ties that reorder detections. Written to a temporary file
    in the same directory and moved into place with os.replace, so a reader never sees half a file.
    """
    _coco_check_detections(detections)
    py = lambda v: v.item() if hasattr(v, "item") else v          # numpy scalars -> int/float json can write
    out = [{"image_id": py(d["image_id"]), "category_id": py(d["category_id"]),
            "bbox": [round(float(v), 2) for v in d["bbox"]], "score": float(d["score"])} for d in detections]
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(out, f, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def detections_for(coco_gt: dict, labelled: dict, gt_root=".", labelled_root=".", where="labels") -> list:
    """The boxes of a COCO instances file made elsewhere (florence2.py --images --format coco), as detections on
    `coco_gt`'s ids: images matched by file (each file name taken relative to its own file's root folder),
    categories by name -> (detections, {name: boxes} of names the ground truth lacks). Such boxes can match nothing
    and are left out, as pycocotools drops unknown categories; an image the ground truth lacks is an error naming
    it. A box keeps its "score" (1 if it has none)."""
    file = lambda root, im: os.path.normpath(os.path.join(os.path.abspath(root), im["file_name"]))  # noqa: E731
    image_id = {file(gt_root, im): im["id"] for im in coco_gt["images"]}
    category_id = {c["name"]: c["id"] for c in coco_gt["categories"]}
    images = {im["id"]: file(labelled_root, im) for im in labelled["images"]}
    names = {c["id"]: c["name"] for c in labelled["categories"]}
    out, unknown = [], {}
    for ann in labelled["annotations"]:
        file, name = images[ann["image_id"]], names[ann["category_id"]]
        if file not in image_id:
            raise ValueError(f"{where}: image '{file}' is not in the ground truth's images")
        if name not in category_id:
            unknown[name] = unknown.get(name, 0) + 1
            continue
        out.append({"image_id": image_id[file], "category_id": category_id[name], "bbox": ann["bbox"],
                    "score": ann.get("score", 1.0)})
    return out, unknown


# ----------------------------------------------------------------------------------------------------------------------
# 7. Zero-shot detection (Florence section 2.4): a detector trained class-agnostic (--class_agnostic) proposes boxes,
# and the UniCL towers name each one, as they name a whole image in zero-shot classification: the region, cropped
# with some of its surroundings and resized to the image tower's input, is matched against the text embeddings of
# every class name. The detector never sees a class name; the label set is chosen at test time.

def region_crops(image, boxes, size, context=2.0):
    """Square crops of side context x the box's longer side around each box's centre (zero-padded where they leave
    the image), resized to size x size: the Shapes-world UniCL tower learnt from images where a shape fills about
    half the frame, so a tight crop would show it a shape bigger than any it has seen."""
    crops = []
    for x0, y0, x1, y1 in boxes.tolist():
        half = context * max(x1 - x0, y1 - y0, 1.0) / 2
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        crops.append(image.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))
                     .resize((size, size), Image.BILINEAR))
    return crops


@torch.no_grad()
def region_features(images, proposals, unicl_model, unicl_cfg):
    """UniCL image features of every proposal's crop: [(n_i, D)] per image."""
    transform = data.ImageTransform(unicl_cfg.img_size)
    return [unicl.encode_images(unicl_model, region_crops(data.to_rgb(image), boxes, unicl_cfg.img_size), transform)
            if len(boxes) else None for image, (boxes, _, _) in zip(images, proposals)]


@torch.no_grad()
def name_regions(proposals, features, unicl_model, tokenizer, class_names, groups=None):
    """Class-agnostic proposals and their crops' features named by UniCL -> [(boxes, scores, labels)] per image,
    labels indexing class_names; a detection's score is its proposal score times the probability UniCL gives its
    class. groups: the label of each class name when several names make one label (their probabilities add up)."""
    classifier = unicl.zeroshot_classifier(unicl_model, tokenizer, class_names)              # (C, D)
    out = []
    for (boxes, scores, _), feats in zip(proposals, features):
        if feats is None:
            out.append((boxes, scores, torch.zeros(0, dtype=torch.int64)))
            continue
        probs = (unicl_model.logit_scale.exp() * feats @ classifier.t()).softmax(-1)         # (n, C)
        if groups is not None:
            index = torch.tensor(groups, device=probs.device)                                # (C,)
            probs = probs.new_zeros(len(probs), max(groups) + 1).index_add(1, index, probs)  # (n, labels)
        p, labels = probs.max(-1)
        out.append((boxes, scores * p.cpu(), labels.cpu()))
    return out


def zero_shot_metrics(detector, cfg: DetConfig, samples):
    """COCO AP of zero-shot detection on Shapes-world samples, with the 6 shape names and with the 36 colour-shape
    names as the label sets, on all val images and apart on those that hold a colour-shape pair held out of
    UniCL's training (naming them is zero-shot composition)."""
    unicl_model, tokenizer, unicl_cfg = unicl.load_unicl(cfg.unicl_ckpt)
    pairs = data.compositions()
    # a shape is named through its colour-shape names (prompt ensembling over the world's colour words): the toy's
    # captions never name a shape without its colour, and "a photo of a small circle." alone embeds poorly
    names = [f"{c} {s}" for c, s in pairs]
    sets = {"shape": ([data.SHAPES.index(s) for _, s in pairs], len(data.SHAPES),
                      lambda o: data.SHAPES.index(o["category"])),
            "pair": (None, len(pairs), lambda o: pairs.index((o["color"], o["category"])))}
    images = [s["image"] for s in samples]
    proposals = detect(detector, images, cfg, cfg.eval_batch_size)
    features = region_features(images, proposals, unicl_model, unicl_cfg)
    held = [any((o["color"], o["category"]) in data.HELDOUT for o in s["objects"]) for s in samples]
    metrics = {}
    for name, (groups, n_labels, label_of) in sets.items():
        found = name_regions(proposals, features, unicl_model, tokenizer, names, groups)
        for part, keep in (("", None), ("_seen", False), ("_heldout", True)):
            idx = [i for i, h in enumerate(held) if keep is None or h == keep]
            truth = data.coco_instances([{"width": images[i].width, "height": images[i].height} for i in idx],
                                        [[(o["box"], label_of(o) + 1) for o in samples[i]["objects"]] for i in idx],
                                        [{"id": k + 1} for k in range(n_labels)])
            stats = coco_eval(truth, to_coco_results([found[i] for i in idx], range(1, len(idx) + 1)))
            metrics[f"zeroshot_{name}{part}_AP"], metrics[f"zeroshot_{name}{part}_AP50"] = stats["AP"], stats["AP50"]
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# 8. The stage that `python train.py --stage det` drives: build_vocab, build_model, build_datasets, collate,
# compute_loss, evaluate (CONFIGS and TRAIN are in section 4).

def build_vocab(cfg: DetConfig):
    """The detector's label side, its class names: "object" alone when class-agnostic, else the Shapes world's shapes
    or the COCO file's categories (sorted by id). Boxes need no text; zero-shot detection brings the UniCL tokenizer."""
    if cfg.class_agnostic:
        return ["object"]
    if cfg.data == "shapes":
        return list(data.SHAPES)
    dataset, _ = read_coco(cfg.data)
    return [c["name"] for c in sorted(dataset["categories"], key=lambda c: c["id"])]


def build_model(cfg: DetConfig, classes) -> Detector:
    model = Detector(cfg, len(classes))
    if cfg.init_from:
        coswin.load_unicl_tower(model.backbone, cfg.init_from, cfg.backbone)
    return model


class CocoImages:
    """A COCO instances file as raw samples: {"image": PIL image, "image_id", "objects": [{"box": x0 y0 x1 y1 in
    pixels, "label": index into the sorted categories}]}. Boxes read_coco finds degenerate (NaN, zero or negative
    size) are skipped and their ids kept in `skipped_boxes`; boxes reaching outside an image of known width and height
    are clipped to it (ids in `clipped`), and skipped if nothing is left."""

    def __init__(self, path, image_root=None):
        self.path = path
        self.dataset, self.skipped_boxes = read_coco(path)
        self.root = image_root or os.path.dirname(os.path.abspath(path))
        label = {c["id"]: i for i, c in enumerate(sorted(self.dataset["categories"], key=lambda c: c["id"]))}
        self.images = sorted(self.dataset["images"], key=lambda im: im["id"])
        sizes = {im["id"]: (im.get("width"), im.get("height")) for im in self.images}
        self.objects, self.clipped = {im["id"]: [] for im in self.images}, []
        for ann in self.dataset["annotations"]:
            if ann.get("iscrowd", 0):
                continue  # crowd regions are not objects to learn; coco_eval ignores detections on them
            x, y, w, h = ann["bbox"]
            box = [x, y, x + w, y + h]
            W, H = sizes[ann["image_id"]]
            if W and H and (box[0] < 0 or box[1] < 0 or box[2] > W or box[3] > H):
                box = [min(max(box[0], 0), W), min(max(box[1], 0), H), min(max(box[2], 0), W), min(max(box[3], 0), H)]
                if box[2] <= box[0] or box[3] <= box[1]:
                    self.skipped_boxes.append(ann["id"])
                    continue
                self.clipped.append(ann["id"])
            self.objects[ann["image_id"]].append({"box": box, "label": label[ann["category_id"]]})

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        info = self.images[index]
        if "file_name" not in info:
            raise data.DataError(f"{self.path}: image id {info['id']}: missing field 'file_name'")
        image = data.load_image(os.path.join(self.root, info["file_name"]), f"{self.path}: image id {info['id']}")
        return {"image": image, "image_id": info["id"], "objects": self.objects[info["id"]]}


def build_datasets(cfg: DetConfig, seed: int, skip_bad: bool = False):
    """-> (train, val or None) of raw samples: Shapes-world dicts or CocoImages rows."""
    if cfg.data == "shapes":
        world = dict(size=cfg.img_size, seed=seed, max_objects=cfg.max_objects, ocr_prob=0.0)
        return (data.ShapesWorld("train", n=cfg.train_size, **world),
                data.ShapesWorld("val", n=cfg.val_size, **world) if cfg.val_size else None)
    if not cfg.data:
        raise ValueError("config field 'data' is empty: pass --data=shapes or --data=instances.json")
    root = cfg.image_root or None
    train, val = CocoImages(cfg.data, root), (CocoImages(cfg.val_data, root) if cfg.val_data else None)
    for ds in (train, val):
        if ds is not None and (ds.skipped_boxes or ds.clipped):
            print(f"{ds.path}: {len(ds.skipped_boxes)} boxes skipped (NaN, empty, or wholly outside the image), "
                  f"{len(ds.clipped)} clipped to their image")
    return train, val


def sample_objects(sample, cfg: DetConfig):
    """[(box x0 y0 x1 y1 in the sample's pixels, label)] of a raw sample."""
    if "image_id" in sample:  # a CocoImages row
        return [(o["box"], 0 if cfg.class_agnostic else o["label"]) for o in sample["objects"]]
    return [(o["box"], 0 if cfg.class_agnostic else data.SHAPES.index(o["category"])) for o in sample["objects"]]


def preprocess(image, size):
    """RGB, resized to size x size (bilinear), normalised as the UniCL towers were trained -> (3, size, size)."""
    return data.to_tensor(data.to_rgb(image).resize((size, size), Image.BILINEAR), data.CLIP_MEAN, data.CLIP_STD)


def collate(samples, classes, cfg: DetConfig, rngs=None, progress=None):
    """Raw samples -> {"images" (B, 3, S, S), "boxes" (B, N, 4) in input pixels, "labels" (B, N), -1 = padding}."""
    S = cfg.img_size
    images = torch.stack([preprocess(s["image"], S) for s in samples])                       # (B, 3, S, S)
    objects = [sample_objects(s, cfg) for s in samples]
    N = max(1, max(map(len, objects)))
    boxes, labels = torch.zeros(len(samples), N, 4), torch.full((len(samples), N), -1)
    for b, (sample, objs) in enumerate(zip(samples, objects)):
        W, H = sample["image"].size
        scale = torch.tensor([S / W, S / H, S / W, S / H])
        for j, (box, label) in enumerate(objs):
            boxes[b, j], labels[b, j] = torch.tensor(box, dtype=torch.float32) * scale, label
    return {"images": images, "boxes": boxes, "labels": labels}


def compute_loss(model, batch):
    """The ATSS losses (focal + GIoU + centerness) of the batch."""
    cls, deltas, ctr, anchors_per_level = model(batch["images"])
    targets = [(boxes[labels >= 0], labels[labels >= 0]) for boxes, labels in zip(batch["boxes"], batch["labels"])]
    losses = atss_losses(cls.float(), deltas.float(), ctr.float(), anchors_per_level, targets)
    return sum(losses.values()), {k: v.item() for k, v in losses.items()}


@torch.no_grad()
def detect(model, images, cfg: DetConfig, batch_size=50):
    """PIL images -> [(boxes (n, 4) x0 y0 x1 y1 in each image's own pixels, scores (n,), labels (n,))]."""
    device = next(model.parameters()).device
    S, out = cfg.img_size, []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        pixels = torch.stack([preprocess(im, S) for im in chunk]).to(device)                # (b, 3, S, S)
        cls, deltas, ctr, anchors_per_level = model(pixels)
        found = postprocess(cls.float(), deltas.float(), ctr.float(), anchors_per_level, (S, S), cfg.score_thresh,
                            nms_thresh=cfg.nms_thresh, max_detections=cfg.max_detections)
        for im, (boxes, scores, labels) in zip(chunk, found):
            W, H = im.size
            out.append((boxes.cpu() * torch.tensor([W / S, H / S, W / S, H / S]), scores.cpu(), labels.cpu()))
    return out


def to_coco_results(found, image_ids):
    """detect()'s output -> detections in the COCO results format (category ids = label + 1)."""
    return [{"image_id": image_id, "category_id": int(label) + 1, "score": float(score),
             "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]}
            for image_id, (boxes, scores, labels) in zip(image_ids, found)
            for (x0, y0, x1, y1), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist())]


def evaluate(model, val, classes, cfg: DetConfig):
    """COCO box AP of the detector on the val set (coco_eval: AP, AP50, AP75, APs, APm, APl, AR100). Category ids are
    label + 1, as to_coco_results writes them."""
    samples = [s for s in (val[i] for i in range(len(val))) if s is not None]
    found = detect(model, [s["image"] for s in samples], cfg, cfg.eval_batch_size)
    truth = data.coco_instances([{"width": s["image"].width, "height": s["image"].height} for s in samples],
                                [[(box, label + 1) for box, label in sample_objects(s, cfg)] for s in samples],
                                [{"id": k + 1} for k in range(len(classes))])
    stats = coco_eval(truth, to_coco_results(found, range(1, len(samples) + 1)))
    metrics = {k: stats[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")}
    if cfg.unicl_ckpt and cfg.class_agnostic and cfg.data == "shapes":
        metrics.update(zero_shot_metrics(model, cfg, samples))
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# 9. The command line: COCO box AP of detections against a ground-truth instances file.

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="COCO box AP of detections against a ground-truth instances file.")
    parser.add_argument("gt", help="COCO instances .json (e.g. python data.py --images DIR --coco)")
    parser.add_argument("detections", help="a COCO results list on the ground truth's ids, or an instances file "
                                           "(florence2.py --images --format coco) matched by file and category name")
    args = parser.parse_args()
    try:
        gt, _ = read_coco(args.gt)
        with open(args.detections) as f:
            found = json.load(f)
        if not isinstance(found, list):  # an instances file: its file names are relative to its own folder
            found, unknown = detections_for(gt, found, os.path.dirname(args.gt), os.path.dirname(args.detections),
                                            args.detections)
            if unknown:
                print(f"{sum(unknown.values())} boxes named outside the ground truth's categories, left out: "
                      f"{', '.join(sorted(unknown)[:5])}{' ...' if len(unknown) > 5 else ''}")
        stats = coco_eval(gt, found)
    except (OSError, ValueError, KeyError) as e:
        parser.exit(2, f"error: {e}\n")
    print(" | ".join(f"{k} {v:.4f}" for k, v in stats.items()))
