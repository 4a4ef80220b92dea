"""video.py: the 3D windows against torchvision's swin3d_t and a dense brute-force reference, inflation (a clip of one
repeated frame gives the image model's output), clips (temporal sampling, augmentation, clip folders and their bad
input), and the video stage through train.py (learning, resume, DDP, --init_from a UniCL checkpoint)."""
import dataclasses
import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import coswin
import data
import test_train  # its run(): train.py in 1 or N processes
import train
import video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def perturbed(model, scale=0.05):
    """Random weights everywhere (not the init's zero biases and unit norms), so a misplaced weight shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


# ----------------------------------------------------------------------------------- the 3D windows: torchvision

def test_swin3d_t_matches_torchvision():
    """CONFIGS["swin3d_t"] with the weights of torchvision's swin3d_t (random, 7 classes) gives its logits. The clip,
    10 x 200 x 196, is divided by no window: its 5 tokens in time make a 5-frame window, the 50 x 49, 25 x 25 and
    13 x 13 maps of stages 1-3 pad and shift in space (padding in time: the next test; 18 frames, 9 tokens padded to
    16, also agree exactly, ~8 s). Where a map is smaller than the window in space, e.g. stage 4 of a 112 px clip,
    torchvision takes the first rows and columns of its flattened bias index, not the smaller window's own offsets,
    and its logits differ from Video Swin's and ours by ~2e-4; smaller in time alone, both agree."""
    tv = pytest.importorskip("torchvision.models.video")
    reference = perturbed(tv.swin3d_t(num_classes=7), 0.02).eval()
    ours = video.VideoCoSwin(dataclasses.replace(video.CONFIGS["swin3d_t"], num_classes=7)).eval()
    video.load_torchvision_swin3d(ours, reference.state_dict())
    x = torch.randn(1, 3, 10, 200, 196)
    with torch.no_grad():
        want, got = reference(x), ours(x)
    assert got.shape == (1, 7)
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("shape", [(2, 3, 9, 40, 52), (1, 3, 4, 24, 24), (1, 3, 15, 36, 60)])
def test_small_video_swin_matches_torchvision_with_gradients(shape):
    """A two-stage Video Swin with windows (4, 3, 3) (torchvision's SwinTransformer3d class, our patch mode) at sizes
    the windows do not divide, and smaller in time: the same logits and the same gradients."""
    tv = pytest.importorskip("torchvision.models.video.swin_transformer")
    reference = perturbed(tv.SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4],
                                               window_size=[4, 3, 3], stochastic_depth_prob=0.0, num_classes=5))
    cfg = video.VideoConfig(embed="patch", embed_dim=24, depths=(2, 2), num_heads=(2, 4), windows=((4, 3, 3),),
                            drop_path_rate=0.0, mask_padding=False, num_classes=5)
    ours = video.VideoCoSwin(cfg)
    video.load_torchvision_swin3d(ours, reference.state_dict())
    x = torch.randn(*shape)
    want, got = reference(x), ours(x)
    assert (got - want).abs().max().item() < 1e-5
    want.square().sum().backward()
    got.square().sum().backward()
    for a, b in [(ours.stages[1].blocks[1].attn.relative_position_bias_table,
                  reference.features[2][1].attn.relative_position_bias_table),
                 (ours.stages[0].embed.proj.weight, reference.patch_embed.proj.weight),
                 (ours.stages[1].embed.reduction.weight, reference.features[1].reduction.weight)]:
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6 * b.grad.abs().max().item())


def test_load_torchvision_swin3d_rejects_mismatches():
    tv = pytest.importorskip("torchvision.models.video")
    state = tv.swin3d_t(num_classes=7).state_dict()
    with pytest.raises(ValueError, match="patch"):
        video.load_torchvision_swin3d(video.VideoCoSwin(video.CONFIGS["toy"]), state)
    with pytest.raises(KeyError, match="missing"):
        cfg = dataclasses.replace(video.CONFIGS["swin3d_t"], depths=(2, 2, 18, 2), num_classes=7)
        video.load_torchvision_swin3d(video.VideoCoSwin(cfg), state)
    with pytest.raises(ValueError, match="head.weight has shape"):
        video.load_torchvision_swin3d(video.VideoCoSwin(replace_classes("swin3d_t", 400)), state)
    with pytest.raises(KeyError, match="unexpected key 'pos_embed'"):
        video.load_torchvision_swin3d(video.VideoCoSwin(replace_classes("swin3d_t", 7)),
                                      {**state, "pos_embed": torch.zeros(1)})


def replace_classes(name, n):
    return dataclasses.replace(video.CONFIGS[name], num_classes=n)


# ------------------------------------------------------------------------- the 3D windows: a dense reference

def dense_block(block, x, M, shifted):
    """A Swin block over a (T, H, W) map written with no windows, roll, padding or mask tensors: global attention over
    all tokens, where i may attend to j iff they fall in the same window of the (shifted) grid along every axis. Along
    an axis of length L > M the shifted grid has its borders at s, s+M, ... (s = M//2), so the window of position p is
    floor((p - s) / M); an axis no longer than M is one window. The bias is looked up by the offsets (dt, dy, dx)."""
    B, *S, C = x.shape
    attn, heads = block.attn, block.attn.num_heads
    coords = [c.flatten() for c in torch.meshgrid(*(torch.arange(s) for s in S), indexing="ij")]  # 3 x (L,)
    same = torch.ones(len(coords[0]), len(coords[0]), dtype=torch.bool)
    index = torch.zeros(len(coords[0]), len(coords[0]), dtype=torch.long)
    for p, length, m in zip(coords, S, M):
        shift = m // 2 if shifted and length > m else 0
        w = torch.div(p - shift, m, rounding_mode="floor")
        same &= w[:, None] == w[None, :]
        index = index * (2 * m - 1) + (p[:, None] - p[None, :]).clamp(-m + 1, m - 1) + m - 1
    bias = attn.relative_position_bias_table[index].permute(2, 0, 1)  # (heads, L, L)
    h = block.norm1(x).reshape(B, -1, C)
    q, k, v = F.linear(h, attn.qkv.weight, attn.qkv.bias).view(B, h.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias  # (B, heads, L, L)
    y = attn.proj((logits.masked_fill(~same, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(B, -1, C))
    x = x + y.view(x.shape)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("size", [(4, 6, 8), (5, 7, 9), (1, 2, 3), (3, 8, 5), (9, 3, 4)])
def test_3d_windows_match_dense_reference(size):
    # window (2, 3, 4): (4, 6, 8) divides; (5, 7, 9) pads and shifts every axis; (1, 2, 3) is smaller than the window;
    # (3, 8, 5) pads T with a shift of 1; (9, 3, 4) shifts in time only
    M, C = (2, 3, 4), 8
    stage = coswin.Stage(torch.nn.Identity(), C, 2, 2, M, 2.0, True, [0.0, 0.0]).eval()
    for block in stage.blocks:
        for module in block.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.data.normal_(1, 0.1), module.bias.data.normal_(0, 0.1)
        block.attn.relative_position_bias_table.data.normal_(0, 1.0)  # large bias: indexing errors show
    x = torch.randn(2, *size, C)
    with torch.no_grad():
        expected = x
        for i, block in enumerate(stage.blocks):
            expected = dense_block(block, expected, M, shifted=i % 2 == 1)
        got = stage(x)
    assert (got - expected).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------------------- inflation

@pytest.mark.parametrize("name, overrides", [
    ("toy_cvt", {}),  # conv embeddings: tubes of 2 frames, 3-frame conv merging, windows 8 x 4 x 4
    ("toy_cvt", dict(temporal_kernels=(3, 3, 2, 3), temporal_strides=(2, 2, 1, 3),
                     windows=((2, 4, 4), (3, 4, 4), (8, 4, 4), (1, 4, 4)))),  # overlapping kernels, dynamic windows
    ("toy", {}),  # the toy's BatchNorm stem on every frame
])
@pytest.mark.parametrize("T, H, W", [(8, 48, 48), (7, 40, 60)])
def test_repeated_frame_clip_gives_the_2d_output(name, overrides, T, H, W):
    """A freshly inflated model maps a clip of one repeated frame to the image model's output for that frame."""
    cfg2d = dataclasses.replace(coswin.CONFIGS[name], num_classes=5)
    image_model = perturbed(coswin.CoSwin(cfg2d)).eval()
    for m in image_model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0)
    model = video.VideoCoSwin(video.config_from_2d(cfg2d, **overrides)).eval()
    video.inflate_from_2d(model, image_model.state_dict())
    frames = torch.randn(2, 3, H, W)
    with torch.no_grad():
        want = image_model(frames)
        got = model(frames[:, :, None].expand(-1, -1, T, -1, -1))
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
    # the rules themselves: W3D[:, :, t] = W2D / kt, the bias table tiled over the time offsets
    if name == "toy_cvt":
        w2d, w3d = image_model.stages[1].embed.proj.weight, model.stages[1].embed.proj.weight
        kt = w3d.shape[2]
        assert all(torch.equal(w3d[:, :, t], w2d / kt) for t in range(kt))
    table2d = image_model.stages[0].blocks[0].attn.relative_position_bias_table
    table3d = model.stages[0].blocks[0].attn.relative_position_bias_table
    assert torch.equal(table3d.view(-1, *table2d.shape), table2d.expand(table3d.shape[0] // len(table2d), -1, -1))


def test_inflation_names_what_does_not_fit():
    image_model = coswin.CoSwin(coswin.CONFIGS["toy_cvt"])
    with pytest.raises(KeyError, match="missing"):
        video.inflate_from_2d(video.VideoCoSwin(video.CONFIGS["toy"]), image_model.state_dict())
    with pytest.raises(ValueError, match="spatial windows must equal"):
        model = video.VideoCoSwin(video.config_from_2d(coswin.CONFIGS["toy_cvt"], windows=((2, 3, 3),)))
        video.inflate_from_2d(model, image_model.state_dict())
    with pytest.raises(ValueError, match="conv-mode"):
        video.inflate_from_2d(video.VideoCoSwin(video.CONFIGS["swin3d_t"]), image_model.state_dict())


def test_paper_config_and_bad_input():
    n = video.count_parameters(video.CONFIGS["H"])
    assert 700e6 < n < 750e6, n  # CoSwin-H's 635M + the 3D conv kernels' extra taps (merging spans 3 frames)
    model = video.VideoCoSwin(video.CONFIGS["toy"])
    with pytest.raises(ValueError, match="expects clips"):
        model(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="one entry per stage"):
        video.VideoCoSwin(dataclasses.replace(video.CONFIGS["toy"], temporal_strides=(1, 2)))


# ----------------------------------------------------------------------------------------------------- clips

def test_temporal_sampling():
    assert video.sample_indices(20, 4, 2) == [6, 8, 10, 12]  # evaluation: centred
    assert video.sample_indices(5, 4, 2) == [0, 2, 4, 4]  # short: the last frame repeats
    starts = {video.sample_indices(20, 4, 2, random.Random(i))[0] for i in range(200)}
    assert starts == set(range(14))  # training: every start that keeps the span inside the clip


def test_clip_augmentation_is_the_same_for_every_frame():
    cfg = dataclasses.replace(video.CONFIGS["toy"], crop_scale=0.5, hflip=True, num_frames=4)
    frame = data.ShapesWorld("val", 64, 1)[0]["image"]
    clips = [video.clip_tensor([frame] * 6, cfg, random.Random(i)) for i in range(8)]
    for clip in clips:
        assert clip.shape == (3, 4, 48, 48)
        assert all(torch.equal(clip[:, t], clip[:, 0]) for t in range(4))  # no motion made up
    assert len({c.sum().item() for c in clips}) == 8  # yet each clip its own crop
    plain = video.clip_tensor([frame] * 6, dataclasses.replace(cfg, crop_scale=1.0, hflip=False), random.Random(0))
    assert torch.equal(plain, video.clip_tensor([frame] * 6, cfg))  # evaluation: no augmentation


def write_clips(folder, clips):
    """clips: {name: (label, [frame sizes] or frame count)} -> folder/name/00001.png ... and folder/clips.csv."""
    for name, (label, frames) in clips.items():
        os.makedirs(folder / name, exist_ok=True)
        sizes = [(32, 32)] * frames if isinstance(frames, int) else frames
        for i, size in enumerate(sizes, 1):
            Image.new("RGB", size, (20 * i % 255, 0, 0)).save(folder / name / f"{i:05d}.png")
    (folder / "clips.csv").write_text("clip,label\n" + "".join(f"{n},{label}\n" for n, (label, _) in clips.items()))
    return folder / "clips.csv"


def test_clip_folders_read_and_name_bad_clips(tmp_path):
    path = write_clips(tmp_path, {"a": ("jump", 10), "b": ("run", 10), "short": ("run", 3),
                                  "mixed": ("jump", [(32, 32)] * 5 + [(40, 32)] * 5)})
    ds = video.ClipFolders(path, min_frames=8)
    assert ds.classes == ["jump", "run"] and len(ds) == 4 and len(ds.short) == 1 and "'short'" in ds.short[0]
    sample = ds[0]
    assert sample["label"] == 0 and len(sample["frames"]) == 10 and sample["frames"][3].size == (32, 32)
    with pytest.raises(data.DataError, match="clips.csv:5: clip 'mixed': frames of mixed sizes"):
        ds[3]
    assert len(video.ClipFolders(path, min_frames=8, short_clips="skip").skipped) == 1
    os.remove(tmp_path / "b" / "00004.png")
    with pytest.raises(data.DataError, match=r"clips.csv:3: clip 'b': missing frame\(s\) \[4\]"):
        video.ClipFolders(path)
    (tmp_path / "val.csv").write_text("clip,label\na,jump\nb,swim\n")
    with pytest.raises(data.DataError, match="val.csv:3: clip 'b': unknown label 'swim'"):
        video.ClipFolders(tmp_path / "val.csv", classes=["jump", "run"])
    skipping = video.ClipFolders(tmp_path / "val.csv", classes=["jump", "run"], skip_bad=True)
    assert len(skipping) == 1 and len(skipping.skipped) == 1
    (tmp_path / "a" / "00002.png").write_bytes(b"not a png")
    (tmp_path / "a.csv").write_text("clip,label\na,jump\n")
    with pytest.raises(data.DataError, match="a.csv:2: clip 'a': cannot open frame '00002.png'"):
        video.ClipFolders(tmp_path / "a.csv")[0]
    skipping = video.ClipFolders(tmp_path / "a.csv", skip_bad=True)
    assert skipping[0] is None and len(skipping.skipped) == 1
    (tmp_path / "nofolder.csv").write_text("clip,label\nzzz,run\n")
    with pytest.raises(data.DataError, match="clip 'zzz': no such folder"):
        video.ClipFolders(tmp_path / "nofolder.csv")


def test_bad_clips_stop_train_py_or_are_skipped_and_counted(tmp_path):
    path = write_clips(tmp_path, {f"c{i}": ("jump" if i % 2 else "run", 8) for i in range(6)}
                       | {"mixed": ("run", [(32, 32)] * 4 + [(40, 32)] * 4), "short": ("jump", 2)})
    args = ["--stage", "video", f"--data={path}", "--img_size=32", "--batch_size=4", "--max_iters=2",
            f"--out_dir={tmp_path / 'o'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "clip 'mixed'" in bad.stderr, bad.stderr
    ok = subprocess.run([sys.executable, "train.py", *args, "--skip_bad_samples", "--short_clips=skip"], cwd=ROOT,
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "skipped 2 bad samples" in ok.stdout and "1 skipped in all" in ok.stdout, ok.stdout


# ------------------------------------------------------------------------------------------------ the stage

TINY = ["--stage", "video", "--train_size=400", "--val_size=0", "--batch_size=4", "--log_interval=1",
        "--warmup_iters=2", "--cache_samples=false"]


def test_video_stage_learns(tmp_path):
    """train.py --stage video from scratch, 120 steps of 16 clips (~35 s on one thread): the loss falls by half and the
    four translations, the easiest motions, are read off most val clips (chance 1/8 overall). Measured: loss 2.02 ->
    0.54, top-1 0.83, the translations 0.99."""
    metrics = train.main(["--stage", "video", "--max_iters=120", "--batch_size=16", "--warmup_iters=20",
                          "--train_size=2000", "--val_size=160", "--log_interval=10", f"--out_dir={tmp_path}"])
    losses = test_train.logged_values(tmp_path)
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3]), losses
    moving = [metrics[f"top1_moving_{d}"] for d in ("left", "right", "up", "down")]
    assert metrics["top1"] > 0.4 and sum(moving) / 4 > 0.6, metrics


def test_video_resume_continues_exactly(tmp_path):
    train.main([*TINY, "--max_iters=6", f"--out_dir={tmp_path / 'full'}"])
    train.main([*TINY, "--max_iters=3", "--lr_decay_iters=6", f"--out_dir={tmp_path / 'half'}"])
    train.main([*TINY, "--max_iters=6", "--resume", f"--out_dir={tmp_path / 'half'}"])
    assert test_train.logged_values(tmp_path / "full") == test_train.logged_values(tmp_path / "half")


def test_two_processes_match_one(tmp_path):
    """Two processes holding half of each batch give one process's first loss and gradient norm (the stem's BatchNorm
    statistics cover both halves). The two-process BatchNorm
    is written out where one process uses the fused kernel: in one process alone that moves the first gradient norm
    by 4.8e-5 of its value (measured), and Adam's early steps carry such rounding into the later losses (~1e-3)."""
    args = [*TINY, "--batch_size=8", "--max_iters=3"]
    runs = test_train.one_and_two_processes(args, tmp_path)
    assert len(runs["one"]) == 3
    (l1, g1), (l2, g2) = runs["one"][0], runs["two"][0]
    assert abs(l1 - l2) <= 1e-5 * abs(l1) and abs(g1 - g2) <= 2e-4 * abs(g1), runs
    for (l1, _), (l2, _) in zip(runs["one"][1:], runs["two"][1:]):
        assert abs(l1 - l2) <= 3e-3 * abs(l1), runs


def test_init_from_a_unicl_checkpoint(tmp_path):
    """--init_from inflates a UniCL checkpoint's CoSwin: the stem is copied, the 3D conv kernels are the 2D ones over
    kt, the bias tables tiled, the final norm is the tower's last; the action head starts fresh."""
    unicl_dir = tmp_path / "unicl"
    train.main(["--max_iters=1", "--batch_size=4", "--val_size=0", "--train_size=8", f"--out_dir={unicl_dir}"])
    tower = {k[len("visual."):]: v for k, v in
             torch.load(unicl_dir / "ckpt.pt", weights_only=True)["model"].items() if k.startswith("visual.")}
    metrics = train.main([*TINY, "--max_iters=1", "--val_size=16", f"--init_from={unicl_dir / 'ckpt.pt'}",
                          "--lr=1e-12", f"--out_dir={tmp_path / 'v'}"])
    assert 0 <= metrics["top1"] <= 1
    state = torch.load(tmp_path / "v" / "ckpt.pt", weights_only=True)["model"]
    close = dict(rtol=1e-5, atol=1e-6)  # one step at lr 1e-12 (Adam: steps of ~lr)
    torch.testing.assert_close(state["stages.0.embed.convs.0.weight"], tower["stages.0.embed.convs.0.weight"], **close)
    w3d, w2d = state["stages.1.embed.proj.weight"], tower["stages.1.embed.proj.weight"]
    torch.testing.assert_close(w3d, w2d[:, :, None].expand_as(w3d) / 3, **close)
    torch.testing.assert_close(state["norm.weight"], tower["norms.2.weight"], **close)
    with pytest.raises(SystemExit, match="holds a CoSwin 'toy'"):
        train.main([*TINY, "--max_iters=1", f"--init_from={unicl_dir / 'ckpt.pt'}", "--image_encoder=toy_cvt",
                    f"--out_dir={tmp_path / 'w'}"])
    with pytest.raises(SystemExit, match="not a train.py checkpoint of the unicl stage"):
        train.main([*TINY, "--max_iters=1", f"--init_from={tmp_path / 'v' / 'ckpt.pt'}", f"--out_dir={tmp_path / 'x'}"])


@pytest.mark.slow
def test_readme_run_reaches_its_bar(tmp_path):
    """`python train.py --stage video`: top-1 >= 0.97 on the 800 val clips (docs/video-toy.md)."""
    metrics = train.main(["--stage", "video", f"--out_dir={tmp_path}"])
    assert metrics["top1"] >= 0.97, metrics
