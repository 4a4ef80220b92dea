"""Video CoSwin: the video adapter of Florence (Yuan et al. 2021, section 2.6 "Adaption to video recognition").

Florence turns its image encoder into a video encoder with three changes, and starts the video model from the image
model's weights: the 2D conv token embedding becomes a 3D conv (each 3D tube one token), the 2D conv merging becomes a
3D conv merging, and the 2D shifted windows become 3D shifted windows, as in Video Swin (Liu et al. 2022,
arXiv:2106.13230). Read it top to bottom:

  1. Token embedding and merging in 3D: CvT's conv embedding with a temporal kernel (conv mode), Video Swin's patch
     embedding and patch merging (patch mode), the toy's BatchNorm conv stem applied to every frame.
  2. The model: coswin's Stage on (T, H, W) maps (its window attention is written for any number of axes), window
     sizes per stage, global average pooling over space and time, an action head; named configs.
  3. load_torchvision_swin3d: torchvision's swin3d_t weights in patch mode, which proves the 3D windows.
  4. Inflation (Florence section 2.6): config_from_2d, inflate_from_2d; a clip of one repeated frame then gives the
     image model's output.
  5. Clips: the Shapes world's moving shapes, folders of frames listed in a CSV (Kinetics style), temporal sampling,
     clip-level augmentation.
  6. The stage that `python train.py --stage video` drives (the stage protocol of docs/design.md).
The toy's one aid is the BatchNorm conv stem of coswin's "toy" config (section 1); the paper configs have none.

Tensors inside a stage are channels-last, (B, T, H, W, C), as coswin's are (B, H, W, C).
"""
import collections
import collections.abc
import csv
import os
import random
import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import coswin
import data


@dataclass
class VideoConfig:
    # the model
    embed: str = "conv"          # "conv" = CvT conv embeddings in 3D (Video CoSwin); "patch" = Video Swin's patches
    in_chans: int = 3
    patch_size: tuple = (2, 4, 4)           # "patch" mode: the (t, h, w) tube embedded by stage 1
    stem: tuple = ()             # widths of coswin's BatchNorm conv stem, run on every frame (section 1); () = none
    temporal_kernels: tuple = (2, 3, 3, 3)  # "conv" mode: frames each stage's 3D conv spans ...
    temporal_strides: tuple = (2, 1, 1, 1)  # ... and its temporal stride (T shrinks by it)
    embed_dim: int = 96
    depths: tuple = (2, 2, 6, 2)
    num_heads: tuple = (3, 6, 12, 24)
    windows: tuple = ((8, 7, 7),)           # (Wt, Wh, Ww) per stage; a single entry serves every stage
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    mask_padding: bool = True    # False: queries attend to padded tokens, as the reference Video Swin does
    num_classes: int = 0         # >0 adds the action head (the stage sets it from the data's classes)
    # --init_from: the coswin.CONFIGS name of the image tower this model inflates ("" = none matches)
    image_encoder: str = ""
    init_from: str = ""          # a train.py UniCL checkpoint whose CoSwin is inflated into this model
    # data: "shapes" (the built-in moving shapes) or a CSV of (clip folder, label) rows
    data: str = "shapes"
    val_data: str = ""           # a CSV as `data`; for "shapes" the val split is used
    frames_root: str = ""        # folder the clip folders are relative to ("" = the CSV's folder)
    img_size: int = 48           # frames are cropped / resized to img_size x img_size
    num_frames: int = 8          # frames sampled per clip
    frame_stride: int = 1        # every frame_stride-th frame
    short_clips: str = "repeat"  # clips shorter than the sampled span: "repeat" their last frame, or "skip" them
    crop_scale: float = 1.0      # training: random resized crop over [crop_scale, 1] of the frame area (1 = off)
    hflip: bool = False          # training: mirror whole clips (off for Shapes: it turns "left" into "right")
    train_size: int = 10000      # Shapes world: distinct training clips
    val_size: int = 800          # Shapes world: val clips (100 per motion); 0 = no eval
    eval_batch_size: int = 100


# ----------------------------------------------------------------------------------------------------------------------
# 1. Tokens in 3D. Conv mode: CvT's ConvEmbed (coswin section 1) with a temporal kernel kt and stride st: Conv3d
# (kt, k, k) / (st, s, s), then LayerNorm. In time the clip is padded by repeating its first and last frames rather
# than with zeros: a clip of one repeated frame then stays that frame everywhere, which is what makes inflation exact
# (section 4). Patch mode is Video Swin's: non-overlapping (2, 4, 4) tubes (zero-padded at the end, as there) and
# patch merging that halves H and W only, each frame on its own (coswin's PatchMerging with T folded into the batch).

def pad_time(x, kernel, stride):
    """(B, C, T, H, W) -> (B, C, T', H, W) padded in time by repeating the end frames, so that a (kernel, stride)
    temporal conv gives ceil(T / stride) outputs, centred on the input where the kernel allows."""
    T = x.shape[2]
    total = max(0, (-(-T // stride) - 1) * stride + kernel - T)
    before = min(total, (kernel - stride + 1) // 2) if kernel > stride else 0
    if total == 0:
        return x
    return F.pad(x, (0, 0, 0, 0, before, total - before), mode="replicate")  # (B, C, T + total, H, W)


class ConvEmbed3d(nn.Module):
    def __init__(self, in_chans, dim, kernel, stride, padding, temporal_kernel, temporal_stride, channels_last_input):
        super().__init__()
        self.channels_last_input = channels_last_input
        self.kt, self.st = temporal_kernel, temporal_stride
        self.proj = nn.Conv3d(in_chans, dim, (temporal_kernel, kernel, kernel), (temporal_stride, stride, stride),
                              (0, padding, padding))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # x: (B, C_in, T, H, W), or (B, T, H, W, C_in) if channels_last_input -> (B, T', H', W', C)
        if self.channels_last_input:
            x = x.permute(0, 4, 1, 2, 3)  # (B, C_in, T, H, W)
        x = self.proj(pad_time(x, self.kt, self.st))  # (B, C, T', H', W')
        return self.norm(x.permute(0, 2, 3, 4, 1))  # (B, T', H', W', C)


class PatchEmbed3d(nn.Module):
    """Video Swin's stage-1 embedding: non-overlapping (pt, ph, pw) tubes, linearly projected, then LayerNorm."""

    def __init__(self, in_chans, dim, patch_size):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, dim, self.patch_size, self.patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # x: (B, C_in, T, H, W) -> (B, ceil(T/pt), ceil(H/ph), ceil(W/pw), C)
        (pt, ph, pw), (T, H, W) = self.patch_size, x.shape[2:]
        x = F.pad(x, (0, -W % pw, 0, -H % ph, 0, -T % pt))  # zeros at the end of every axis, as Video Swin
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))  # (B, T', H', W', C)


class PatchMerging3d(coswin.PatchMerging):
    """Video Swin's patch merging: coswin's 2x2 spatial merging on every frame; time is not merged."""

    def forward(self, x):  # x: (B, T, H, W, C) -> (B, T, ceil(H/2), ceil(W/2), 2C)
        B, T = x.shape[:2]
        x = super().forward(x.flatten(0, 1))  # (B*T, H/2, W/2, 2C)
        return x.view(B, T, *x.shape[1:])  # (B, T, H/2, W/2, 2C)


class FrameStem(coswin.ConvStem):
    """The toy's BatchNorm conv stem (coswin section 1b) on every frame: a 3D conv stem whose kernels span one frame,
    so its inflation is a plain copy. BatchNorm statistics pool over frames as over pixels."""

    def forward(self, x):  # x: (B, C_in, T, H, W) -> (B, T, H/s, W/s, dim)
        B, C, T, H, W = x.shape
        x = super().forward(x.transpose(1, 2).reshape(B * T, C, H, W))  # (B*T, H/s, W/s, dim)
        return x.view(B, T, *x.shape[1:])  # (B, T, H/s, W/s, dim)


# ----------------------------------------------------------------------------------------------------------------------
# 2. The model. Each stage is coswin's Stage (embedding, then blocks alternating regular and shifted windows): its window
# attention, shift, padding and relative position bias work per axis, so on (T, H, W) maps they are Video Swin's 3D
# shifted windows with a (2Wt-1)(2Wh-1)(2Ww-1)-row bias table. Florence's "dynamic window size" uses small windows in
# early stages and large ones late (section 2.6); `windows` gives one window per stage. The clip's features are the
# global average over time and space of the last stage, LayerNormed; the head classifies actions.

class VideoCoSwin(nn.Module):
    def __init__(self, cfg: VideoConfig):
        super().__init__()
        n = len(cfg.depths)
        if cfg.embed not in ("conv", "patch"):
            raise ValueError(f'VideoConfig.embed must be "conv" or "patch", got {cfg.embed!r}')
        if len(cfg.num_heads) != n or (cfg.embed == "conv" and (len(cfg.temporal_kernels) != n or
                                                              len(cfg.temporal_strides) != n)):
            raise ValueError(f"depths {cfg.depths}, num_heads {cfg.num_heads}, temporal_kernels "
                             f"{cfg.temporal_kernels} and temporal_strides {cfg.temporal_strides} need one entry "
                             f"per stage")
        if len(cfg.windows) not in (1, n) or any(len(w) != 3 for w in cfg.windows):
            raise ValueError(f"windows {cfg.windows}: one (Wt, Wh, Ww) for every stage, or one per stage")
        self.cfg = cfg
        self.windows = list(cfg.windows) * n if len(cfg.windows) == 1 else list(cfg.windows)
        channels = [cfg.embed_dim * 2 ** i for i in range(n)]
        self.num_features = channels[-1]
        drop_paths = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        for i, (depth, heads, dim) in enumerate(zip(cfg.depths, cfg.num_heads, channels)):
            if cfg.stem and i == 0:
                embed = FrameStem(cfg.in_chans, cfg.stem, dim)
            elif cfg.embed == "conv":  # CvT's 7x7/4 then 3x3/2 (coswin section 1), with a temporal kernel each
                kt, st = cfg.temporal_kernels[i], cfg.temporal_strides[i]
                embed = (ConvEmbed3d(cfg.in_chans, dim, 7, 4, 2, kt, st, channels_last_input=False) if i == 0 else
                         ConvEmbed3d(dim // 2, dim, 3, 2, 1, kt, st, channels_last_input=True))
            else:
                embed = PatchEmbed3d(cfg.in_chans, dim, cfg.patch_size) if i == 0 else PatchMerging3d(dim // 2, dim)
            first = sum(cfg.depths[:i])
            self.stages.append(coswin.Stage(embed, dim, depth, heads, self.windows[i], cfg.mlp_ratio, cfg.qkv_bias,
                                            drop_paths[first:first + depth], cfg.mask_padding))
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.apply(coswin.CoSwin._init_weights)

    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward(self, x):
        """x: (B, C, T, H, W) clips -> (B, num_features) pooled features, or (B, num_classes) logits with a head."""
        min_side = 3 if self.cfg.embed == "conv" and not self.cfg.stem else 1  # as coswin: 7x7/4 with padding 2
        if x.ndim != 5 or x.shape[1] != self.cfg.in_chans or min(x.shape[3:]) < min_side:
            raise ValueError(f"VideoCoSwin expects clips (B, {self.cfg.in_chans}, T, H, W) with H, W >= {min_side}, "
                             f"got shape {tuple(x.shape)}")
        for stage in self.stages:
            x = stage(x)  # (B, T_i, H_i, W_i, C_i)
        return self.head(self.norm(x).mean(dim=(1, 2, 3)))  # global average pool over (T, H, W): (B, C)


def count_parameters(cfg: VideoConfig) -> int:
    """Parameters of VideoCoSwin(cfg), counted on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in VideoCoSwin(cfg).parameters())


# ----------------------------------------------------------------------------------------------------------------------
# 3. torchvision's swin3d_t (Video Swin-T: patches (2, 4, 4), windows (8, 7, 7), embed 96, depths 2-2-6-2) in patch
# mode. torchvision names: patch_embed.{proj,norm}; features.{0,2,4,6}.j = the blocks of stage i = index/2
# ({norm1, attn.{qkv, proj, relative_position_bias_table}, norm2, mlp.0, mlp.3}); features.{1,3,5} = the patch merging
# that opens the next stage ({norm, reduction}); norm; head. Its relative_position_index buffers are recomputed here.

def load_torchvision_swin3d(model: VideoCoSwin, state_dict: dict) -> None:
    """Copy a torchvision SwinTransformer3d state dict into a patch-mode VideoCoSwin of the same shape (strict)."""
    if model.cfg.embed != "patch":
        raise ValueError('load_torchvision_swin3d needs a VideoCoSwin built with embed="patch" (CONFIGS["swin3d_t"])')
    ours = {}
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):
            continue  # a fixed function of the window size
        parts = key.split(".")
        if parts[0] == "patch_embed":
            new = "stages.0.embed." + ".".join(parts[1:])
        elif parts[0] == "features" and int(parts[1]) % 2 == 1:
            new = f"stages.{(int(parts[1]) + 1) // 2}.embed." + ".".join(parts[2:])
        elif parts[0] == "features":
            rest = ".".join(parts[3:]).replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
            new = f"stages.{int(parts[1]) // 2}.blocks.{parts[2]}.{rest}"
        elif parts[0] in ("norm", "head"):
            new = key
        else:
            raise KeyError(f"load_torchvision_swin3d: unexpected key {key!r} in the torchvision state dict")
        ours[new] = value
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise KeyError(f"load_torchvision_swin3d: model/config mismatch; missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    for key, value in ours.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"load_torchvision_swin3d: {key} has shape {tuple(value.shape)} in the torchvision "
                             f"state dict, {tuple(expected[key].shape)} in the model")
    model.load_state_dict(ours)


# ----------------------------------------------------------------------------------------------------------------------
# 4. Inflation (Florence section 2.6; I3D, Carreira and Zisserman 2017, section 2.4). Every 2D conv kernel is repeated
# over the kt frames of its 3D kernel and divided by kt, W3D[:, :, t] = W2D / kt, so a clip of one repeated frame gets
# the 2D conv's response; the relative position bias of every time offset is the 2D table's (the 3D table is the 2D one
# tiled over the 2Wt-1 time offsets), so such a clip's attention weights spread over time exactly as they spread over
# one frame; everything else is copied. With time padded by repeating frames (section 1) and padded tokens masked, a
# repeated-frame clip then gives the image model's features: tests/test_video.py checks it.

def config_from_2d(coswin_cfg: coswin.CoSwinConfig, **overrides) -> VideoConfig:
    """The VideoConfig whose model inflate_from_2d can fill from a CoSwin of coswin_cfg: the same widths, depths,
    heads, stem and spatial window; time set by the overrides (temporal_kernels / temporal_strides / windows' Wt)."""
    n, M = len(coswin_cfg.depths), coswin_cfg.window_size
    base = VideoConfig(embed=coswin_cfg.embed, in_chans=coswin_cfg.in_chans,
                       patch_size=(2, coswin_cfg.patch_size, coswin_cfg.patch_size), stem=coswin_cfg.stem,
                       temporal_kernels=(2,) + (3,) * (n - 1), temporal_strides=(2,) + (1,) * (n - 1),
                       embed_dim=coswin_cfg.embed_dim, depths=coswin_cfg.depths, num_heads=coswin_cfg.num_heads,
                       windows=((8, M, M),), mlp_ratio=coswin_cfg.mlp_ratio, qkv_bias=coswin_cfg.qkv_bias,
                       drop_path_rate=coswin_cfg.drop_path_rate, num_classes=coswin_cfg.num_classes)
    return replace(base, **overrides)


def inflate_from_2d(model: VideoCoSwin, coswin_state_dict: dict) -> None:
    """Fill a conv-mode VideoCoSwin from the state dict of the CoSwin it was configured from (config_from_2d). The
    CoSwin's per-stage norms but the last (detection's pyramid) have no place here; its head is copied only if the
    video model has one of the same shape."""
    if model.cfg.embed != "conv":
        raise ValueError('inflate_from_2d fills a conv-mode VideoCoSwin (patch mode has no temporal conv kernels)')
    n = len(model.stages)
    source = {(f"norm.{k.split('.', 2)[2]}" if k.startswith(f"norms.{n - 1}.") else k): v
              for k, v in coswin_state_dict.items() if not k.startswith("norms.") or k.startswith(f"norms.{n - 1}.")}
    if isinstance(model.head, nn.Identity) or source.get("head.weight", torch.empty(0)).shape != model.head.weight.shape:
        source = {k: v for k, v in source.items() if not k.startswith("head.")}
    target = model.state_dict()
    missing = sorted(k for k in target if k not in source and not k.startswith("head."))
    unexpected = sorted(k for k in source if k not in target)
    if missing or unexpected:
        raise KeyError(f"inflate_from_2d: the video model does not fit the 2D weights; missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    inflated = {}
    for key, value in source.items():
        want = target[key].shape
        if key.endswith("relative_position_bias_table") and value.shape != want:
            wt = (want[0] // value.shape[0] + 1) // 2  # rows = (2Wt-1) x the 2D table's rows
            if want[0] != (2 * wt - 1) * value.shape[0] or want[1] != value.shape[1]:
                raise ValueError(f"inflate_from_2d: {key}: a 2D table {tuple(value.shape)} cannot tile {tuple(want)}"
                                 f" (the spatial windows must equal the 2D window)")
            value = value.repeat(2 * wt - 1, 1)  # (2Wt-1 time offsets x 2D rows, heads): time offset outermost
        elif value.ndim == 4 and len(want) == 5:  # a 2D conv kernel (out, in, k, k) -> (out, in, kt, k, k)
            kt = want[2]
            value = value.unsqueeze(2).repeat(1, 1, kt, 1, 1) / kt
        if value.shape != want:
            raise ValueError(f"inflate_from_2d: {key} has shape {tuple(value.shape)} in the 2D weights, "
                             f"{tuple(want)} in the video model")
        inflated[key] = value
    model.load_state_dict(inflated, strict=False)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Clips. A raw clip sample is {"frames": a sequence of PIL images, "label": class index, "clip": its name}. The
# Shapes world renders moving shapes (data.ShapesVideo, labels data.MOTIONS). Real clips come Kinetics style: one folder
# of frame images per clip (numbered 1.jpg, 2.jpg ... or img_00001.jpg ...) and a CSV of (clip, label) rows. Frames are
# decoded only when sampled; a clip's frame headers are read with the sample, so a missing or unopenable frame, a gap
# in the numbering and frames of mixed sizes are found there and named with the clip (--skip_bad_samples: counted
# skips). A label the training CSV does not hold is named when the val CSV is read.

FRAME_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ClipFrames(collections.abc.Sequence):
    """The frames of one clip folder, decoded on access."""

    def __init__(self, paths, where):
        self.paths, self.where = paths, where

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return data.load_image(self.paths[i], f"{self.where}: frame '{os.path.basename(self.paths[i])}'")


class ClipFolders:
    """Clips listed in a CSV with a header naming the fields `clip` (a folder of frames, relative to root) and
    `label`. classes: the label set (the training CSV's own sorted labels if None; a val CSV gets the training
    set's). Clips shorter than min_frames are counted in `short` and kept (sampling repeats their last frame) or, with
    short_clips="skip", dropped (and counted in `skipped` too). skip_bad: a bad row or clip is dropped and its
    message kept in `skipped`."""

    def __init__(self, path, root=None, classes=None, min_frames=1, short_clips="repeat", skip_bad=False):
        if short_clips not in ("repeat", "skip"):
            raise ValueError(f'short_clips must be "repeat" or "skip", got {short_clips!r}')
        self.path, self.skip_bad, self.skipped, self.short = str(path), skip_bad, [], []
        self.root = root or os.path.dirname(os.path.abspath(self.path))
        rows = self._rows()
        self.classes = list(classes) if classes is not None else sorted({label for _, _, label in rows})
        index = {c: i for i, c in enumerate(self.classes)}
        self.items = []  # (where, folder, frame paths, label index)
        for where, clip, label in rows:
            try:
                if label not in index:
                    raise data.DataError(f"{where}: clip '{clip}': unknown label '{label}' (the training labels are "
                                         f"{', '.join(self.classes[:10])}{' ...' if len(self.classes) > 10 else ''})")
                paths = self._frames(where, clip)
            except data.DataError as e:
                if not skip_bad:
                    raise
                self.skipped.append(str(e))
                continue
            if len(paths) < min_frames:
                self.short.append(f"{where}: clip '{clip}' has {len(paths)} frames, fewer than the {min_frames} "
                                  f"sampled")
                if short_clips == "skip":
                    self.skipped.append(self.short[-1])
                    continue
            self.items.append((f"{where}: clip '{clip}'", paths, index[label]))

    def _rows(self):
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or not {"clip", "label"} <= set(reader.fieldnames):
                    raise data.DataError(f"{self.path}:1: the header must name the fields 'clip' and 'label' "
                                         f"(found {reader.fieldnames})")
                rows = []
                for row in reader:
                    where = f"{self.path}:{reader.line_num}"
                    clip, label = (row.get("clip") or "").strip(), (row.get("label") or "").strip()
                    if clip and label:
                        rows.append((where, clip, label))
                    elif not self.skip_bad:
                        raise data.DataError(f"{where}: field '{'clip' if not clip else 'label'}' is empty or missing")
                    else:
                        self.skipped.append(f"{where}: a field is empty or missing")
                return rows
        except OSError as e:
            raise data.DataError(f"{self.path}: cannot read: {e.strerror or e}") from e

    def _frames(self, where, clip):
        """The clip folder's frame files in frame order; a missing folder, no frames or a gap in the numbering is a
        DataError naming the clip."""
        folder = os.path.join(self.root, clip)
        if not os.path.isdir(folder):
            raise data.DataError(f"{where}: clip '{clip}': no such folder {folder}")
        numbered = []
        for name in os.listdir(folder):
            number = re.search(r"(\d+)\D*$", name)
            if name.lower().endswith(FRAME_EXTS) and number:
                numbered.append((int(number.group(1)), name))
        if not numbered:
            raise data.DataError(f"{where}: clip '{clip}': no numbered frame images ({', '.join(FRAME_EXTS)}) "
                                 f"in {folder}")
        numbered.sort()
        numbers = [k for k, _ in numbered]
        gaps = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
        if gaps:
            raise data.DataError(f"{where}: clip '{clip}': missing frame(s) {gaps[:5]} between {numbers[0]} and "
                                 f"{numbers[-1]}")
        return [os.path.join(folder, name) for _, name in numbered]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        where, paths, label = self.items[i]
        try:
            sizes = set()
            for path in paths:  # headers only: Pillow decodes pixels on first access
                try:
                    with Image.open(path) as im:
                        sizes.add(im.size)
                except Exception as e:
                    raise data.DataError(f"{where}: cannot open frame '{os.path.basename(path)}': {e}") from e
            if len(sizes) > 1:
                raise data.DataError(f"{where}: frames of mixed sizes {sorted(sizes)}")
        except data.DataError as e:
            if not self.skip_bad:
                raise
            self.skipped.append(str(e))
            return None
        return {"frames": ClipFrames(paths, where), "label": label, "clip": where}


def sample_indices(length, num_frames, stride, rng=None):
    """Frame indices of one sampled clip: num_frames frames `stride` apart, from a random start (training: rng) or
    centred in the clip (evaluation: None). A clip shorter than the span repeats its last frame."""
    span = (num_frames - 1) * stride + 1
    start = rng.randrange(length - span + 1) if rng is not None and length > span else max(0, (length - span) // 2)
    return [min(start + i * stride, length - 1) for i in range(num_frames)]


def clip_tensor(frames, cfg: VideoConfig, rng=None):
    """Sampled frames of one clip -> (3, T, S, S). Training (rng): the same random resized crop and mirror for every
    frame, so the augmentation never makes motion that is not there; evaluation: resize + centre crop."""
    indices = sample_indices(len(frames), cfg.num_frames, cfg.frame_stride, rng)
    crop_seed = rng.random() if rng is not None else None
    flip = rng is not None and cfg.hflip and rng.random() < 0.5
    out = []
    for i in indices:
        img = data.to_rgb(frames[i])
        if crop_seed is not None and cfg.crop_scale < 1.0:
            img = data.random_resized_crop(img, cfg.img_size, (cfg.crop_scale, 1.0), rng=random.Random(crop_seed))
        else:
            img = data.center_crop(data.resize(img, cfg.img_size), cfg.img_size)
        out.append(data.to_tensor(data.hflip(img) if flip else img, data.CLIP_MEAN, data.CLIP_STD))
    return torch.stack(out, 1)  # (3, T, S, S)


# ----------------------------------------------------------------------------------------------------------------------
# 6. The stage that `python train.py --stage video` drives (CONFIGS, TRAIN, build_*, collate, compute_loss, evaluate).

CONFIGS = {
    # CPU toy: the UniCL toy's CoSwin (coswin "toy": BatchNorm stem on every frame, widths 48-96-192, depths 1-2-1,
    # spatial window 4) with 3D conv merging of 3 frames and temporal stride 2 (8 frames -> 8, 4, 2 tokens in time) and
    # windows spanning all of them: --init_from a UniCL toy checkpoint inflates it. 8 frames of 48 px.
    "toy": config_from_2d(coswin.CONFIGS["toy"], temporal_kernels=(1, 3, 3), temporal_strides=(1, 2, 2),
                          windows=((8, 4, 4), (4, 4, 4), (2, 4, 4)), image_encoder="toy"),
    # the paper's: Video CoSwin inflated from CoSwin-H (Florence section 2.6, Kinetics-400 top-1 86.5): 2-frame tubes
    # (3D conv (2, 7, 7) / (2, 4, 4), as Video Swin's (2, 4, 4) patches), 3D conv merging over 3 frames, and the dynamic
    # window size, small early and large late (the paper gives no sizes: Wt 4 in stages 1-2 and 8 in 3-4; spatially
    # the image model's 7, so its bias tables inflate); 32 frames of 224 px, every second frame, as Video Swin.
    # 724.9M parameters beside CoSwin-H's 635.3M (Florence: 637M): the extra temporal taps of the 3D conv kernels.
    "H": config_from_2d(coswin.CONFIGS["H"], windows=((4, 7, 7), (4, 7, 7), (8, 7, 7), (8, 7, 7)), image_encoder="H",
                        img_size=224, num_frames=32, frame_stride=2, crop_scale=0.35, hflip=True, data="",
                        train_size=0, val_size=0),
    # torchvision's swin3d_t (Video Swin-T) in patch mode, padded tokens attended as there: tests/test_video.py proves
    # the 3D windows against it
    "swin3d_t": VideoConfig(embed="patch", patch_size=(2, 4, 4), embed_dim=96, depths=(2, 2, 6, 2),
                            num_heads=(3, 6, 12, 24), windows=((8, 7, 7),), drop_path_rate=0.1, mask_padding=False,
                            img_size=224, num_frames=32, frame_stride=2, crop_scale=0.35, hflip=True, data="",
                            train_size=0, val_size=0),
}

TRAIN = {
    "toy": dict(batch_size=32, max_iters=1200, lr=1e-3, warmup_iters=100, weight_decay=0.05, cache_samples=True,
                log_interval=50, ckpt_interval=250),
    "H": dict(batch_size=64, max_iters=30000, lr=3e-4, warmup_iters=2500, weight_decay=0.05),
    "swin3d_t": dict(batch_size=64, max_iters=30000, lr=1e-3, warmup_iters=2500, weight_decay=0.02),
}


def build_vocab(cfg: VideoConfig):
    """The stage's vocabulary: the class names (clips need no text): the Shapes world's motions, or the training CSV's sorted labels."""
    if cfg.data == "shapes":
        return list(data.MOTIONS)
    if not cfg.data:
        raise ValueError("config field 'data' is empty: pass --data=shapes or --data=clips.csv")
    return ClipFolders(cfg.data, cfg.frames_root or None, skip_bad=True).classes


def build_model(cfg: VideoConfig, classes) -> VideoCoSwin:
    model = VideoCoSwin(replace(cfg, num_classes=len(classes)))
    if cfg.init_from:
        if cfg.image_encoder not in coswin.CONFIGS:
            raise ValueError(f"--init_from needs the config's image_encoder to name the CoSwin it inflates "
                             f"(one of {', '.join(coswin.CONFIGS)}), got {cfg.image_encoder!r}")
        image_model = coswin.CoSwin(coswin.CONFIGS[cfg.image_encoder])
        coswin.load_unicl_tower(image_model, cfg.init_from, cfg.image_encoder)
        inflate_from_2d(model, image_model.state_dict())
    return model


def build_datasets(cfg: VideoConfig, seed: int, skip_bad: bool = False):
    """-> (train, val or None) of raw clip samples."""
    if cfg.data == "shapes":
        clips = dict(size=cfg.img_size, num_frames=cfg.num_frames, seed=seed)
        return (data.ShapesVideo("train", n=cfg.train_size, **clips),
                data.ShapesVideo("val", n=cfg.val_size, **clips) if cfg.val_size else None)
    span = (cfg.num_frames - 1) * cfg.frame_stride + 1
    kw = dict(root=cfg.frames_root or None, min_frames=span, short_clips=cfg.short_clips, skip_bad=skip_bad)
    train = ClipFolders(cfg.data, **kw)
    val = ClipFolders(cfg.val_data, classes=train.classes, **kw) if cfg.val_data else None
    for ds in (train, val):
        if ds is not None and (ds.short or ds.skipped):
            what = "skipped" if cfg.short_clips == "skip" else "padded by repeating their last frame"
            print(f"{ds.path}: {len(ds.short)} clips shorter than {span} frames {what}; {len(ds.skipped)} skipped "
                  f"in all")
    return train, val


def collate(samples, classes, cfg: VideoConfig, rngs=None, progress=None):
    """Raw clips -> {"clips" (B, 3, T, S, S), "labels" (B,)}; rngs (training) draw each clip's sampling and crop."""
    rngs = rngs or [None] * len(samples)
    clips = torch.stack([clip_tensor(s["frames"], cfg, r) for s, r in zip(samples, rngs)])  # (B, 3, T, S, S)
    return {"clips": clips, "labels": torch.tensor([s["label"] for s in samples])}


def compute_loss(model, batch):
    logits = model(batch["clips"]).float()
    loss = F.cross_entropy(logits, batch["labels"])
    return loss, {"ce": loss.item()}


def evaluate(model, val, classes, cfg: VideoConfig):
    """Top-1 over the val clips (centre-sampled, centre-cropped), and per class. train.evaluate calls it in eval mode,
    without gradients."""
    device = next(model.parameters()).device
    right, total = collections.Counter(), collections.Counter()
    samples = [s for s in (val[i] for i in range(len(val))) if s is not None]
    for i in range(0, len(samples), cfg.eval_batch_size):
        batch = collate(samples[i:i + cfg.eval_batch_size], classes, cfg)
        predictions = model(batch["clips"].to(device)).argmax(-1).cpu()
        for label, prediction in zip(batch["labels"].tolist(), predictions.tolist()):
            total[label] += 1
            right[label] += label == prediction
    metrics = {"top1": sum(right.values()) / max(1, sum(total.values()))}
    metrics.update({f"top1_{classes[k].replace(' ', '_')}": right[k] / total[k] for k in sorted(total)})
    return metrics


if __name__ == "__main__":
    for name, cfg in CONFIGS.items():
        extra = f" (CoSwin-{cfg.image_encoder}: {coswin.count_parameters(coswin.CONFIGS[cfg.image_encoder]) / 1e6:.1f}M" \
                f"{'; Florence: 637M' if cfg.image_encoder == 'H' else ''})" if cfg.image_encoder else ""
        print(f"Video CoSwin {name}: {count_parameters(cfg) / 1e6:.1f}M parameters without a head{extra}")
