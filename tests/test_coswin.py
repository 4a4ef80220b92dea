"""CoSwin: parity with timm's Swin-T, shifted windows and padding against a dense brute-force reference, any-size
inputs, checkpointing, drop path, parameter counts, bad input."""
from dataclasses import replace

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from coswin import CONFIGS, CoSwin, Stage, count_parameters, load_timm_swin


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def timm_swin_t(**kwargs):
    """timm's swin_tiny_patch4_window7_224, random init, with a non-zero head (random bias too), in eval mode."""
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kwargs).eval()
    with torch.no_grad():
        model.head.fc.bias.normal_()
    return model


def ours_from(reference):
    model = CoSwin(replace(CONFIGS["T"], embed="patch", num_classes=reference.num_classes)).eval()
    load_timm_swin(model, reference.state_dict())
    return model


# ---------------------------------------------------------------------------------------------- parity with timm Swin

@pytest.mark.parametrize("size", [(224, 224), (224, 448)])
def test_patch_mode_matches_timm_swin_t(size):
    # (224, 448): maps 56x112 ... 7x14, so stage 4 shrinks/unshifts along H only (Swin's per-axis rule); timm is
    # built for that size (its window/shift are fixed at construction), ours decides per input
    reference = timm_swin_t(img_size=size)
    ours = ours_from(reference)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        logits_ref, logits = reference(x), ours(x)
        stages_ref = reference.forward_intermediates(x, intermediates_only=True)  # (B, C_i, H_i, W_i), no norm
        stages = ours.forward_features(x)
    assert logits.shape == (2, 1000)
    assert (logits - logits_ref).abs().max() < 1e-4
    # every stage; our per-stage LayerNorms (fresh: weight 1, bias 0) except the last, which is timm's final norm
    norms = [F.layer_norm(f.permute(0, 2, 3, 1), f.shape[1:2]) for f in stages_ref[:3]]
    norms.append(reference.norm(stages_ref[3].permute(0, 2, 3, 1)))
    for ref, got in zip(norms, stages):
        assert got.shape == ref.permute(0, 3, 1, 2).shape
        assert (got - ref.permute(0, 3, 1, 2)).abs().max() < 1e-4


def test_patch_mode_gradients_match_timm():
    reference = timm_swin_t()
    ours = ours_from(reference)
    x = torch.randn(1, 3, 224, 224)
    for model in (reference, ours):
        model(x).square().mean().backward()
    pairs = [(reference.patch_embed.proj.weight, ours.stages[0].embed.proj.weight),
             (reference.layers[1].downsample.reduction.weight, ours.stages[1].embed.reduction.weight),
             (reference.layers[2].blocks[1].attn.relative_position_bias_table,
              ours.stages[2].blocks[1].attn.relative_position_bias_table),
             (reference.layers[0].blocks[1].attn.qkv.weight, ours.stages[0].blocks[1].attn.qkv.weight)]
    for ref, got in pairs:
        assert ref.grad.abs().max() > 0
        assert torch.allclose(got.grad, ref.grad, rtol=1e-3, atol=1e-5 * ref.grad.abs().max().item())


def test_load_timm_swin_rejects_mismatches():
    reference = timm_swin_t()
    with pytest.raises(ValueError, match="patch"):
        load_timm_swin(CoSwin(CONFIGS["T"]), reference.state_dict())  # conv mode has no timm counterpart
    with pytest.raises(KeyError, match="missing"):
        load_timm_swin(CoSwin(replace(CONFIGS["S"], embed="patch", num_classes=1000)), reference.state_dict())
    with pytest.raises(ValueError, match="shape"):
        load_timm_swin(CoSwin(replace(CONFIGS["T"], embed="patch", num_classes=10)), reference.state_dict())
    with pytest.raises(KeyError, match="unexpected key"):
        load_timm_swin(ours_from(reference), {**reference.state_dict(), "pos_embed": torch.zeros(1)})


def test_patch_mode_parameter_count_is_timm_swin_t_plus_our_stage_norms():
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    extra = sum(2 * c for c in (96, 192, 384))  # LayerNorms on stages 1-3 for forward_features
    ours = count_parameters(replace(CONFIGS["T"], embed="patch", num_classes=1000))
    assert ours == sum(p.numel() for p in reference.parameters()) + extra


# ------------------------------------------------------------- shifted windows and padding vs a dense reference

def dense_swin_block(block, x, M, shifted, windowed=True):
    """A Swin block written with no windows, roll, padding or mask tensors: global attention over all H*W tokens,
    where token i may attend to j iff they fall in the same window of the (shifted) grid. Along an axis of length
    L > M the shifted grid has its borders at s, s+M, ... (s = M//2), so the window of position y is
    floor((y - s) / M); a map no longer than M is one window. The bias is looked up by the offset (dy, dx).
    (timm cannot be the oracle at sizes that need padding: it rolls before padding, pytorch-image-models #2438.)"""
    B, H, W, C = x.shape
    attn, heads = block.attn, block.attn.num_heads
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()  # (L,)

    def window_of(pos, length):
        shift = M // 2 if shifted and length > M else 0
        return torch.div(pos - shift, M, rounding_mode="floor")

    same = (window_of(ys, H)[:, None] == window_of(ys, H)[None, :]) & \
           (window_of(xs, W)[:, None] == window_of(xs, W)[None, :]) | (not windowed)  # (L, L)
    dy, dx = ys[:, None] - ys[None, :], xs[:, None] - xs[None, :]
    index = ((dy.clamp(-M + 1, M - 1) + M - 1) * (2 * M - 1) + dx.clamp(-M + 1, M - 1) + M - 1)  # (L, L)
    bias = attn.relative_position_bias_table[index].permute(2, 0, 1)  # (heads, L, L)
    h = block.norm1(x).reshape(B, H * W, C)
    q, k, v = F.linear(h, attn.qkv.weight, attn.qkv.bias).view(B, H * W, 3, heads, -1).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias  # (B, heads, L, L)
    weights = logits.masked_fill(~same, float("-inf")).softmax(-1)
    y = attn.proj((weights @ v).transpose(1, 2).reshape(B, H * W, C)).view(B, H, W, C)
    x = x + y
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("H, W", [(8, 8), (10, 13), (3, 9), (4, 4), (2, 3), (9, 4)])
def test_shifted_windows_and_padding_match_dense_reference(H, W):
    # window 4: (8, 8) divides; (10, 13) pads both axes and shifts; (3, 9) shrinks along H and pads/shifts along W;
    # (4, 4) map = window (no shift); (2, 3) smaller than the window; (9, 4) pads H only
    M, C = 4, 8
    stage = Stage(torch.nn.Identity(), C, 2, 2, M, 2.0, True, [0.0, 0.0]).eval()
    for block in stage.blocks:
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.data.normal_(1, 0.1), module.bias.data.normal_(0, 0.1)
        block.attn.relative_position_bias_table.data.normal_(0, 1.0)  # large bias: indexing errors show
    x = torch.randn(2, H, W, C)
    with torch.no_grad():
        expected = x
        for i, block in enumerate(stage.blocks):
            expected = dense_swin_block(block, expected, M, shifted=i % 2 == 1)
        got = stage(x)
        # the reference can tell: without the window restriction (global attention) the result is different
        unrestricted = x
        for block in stage.blocks:
            unrestricted = dense_swin_block(block, unrestricted, M, shifted=False, windowed=False)
    assert (got - expected).abs().max() < 1e-5
    if H > M or W > M:
        assert (unrestricted - expected).abs().max() > 1e-2


def test_shifted_block_never_mixes_regions():
    # brute force on the attention weights themselves: for a shifted block on a padded 10x13 map, perturbing one
    # token's value changes exactly the outputs of the tokens in its shifted window, nothing across roll borders
    M, C, H, W = 4, 8, 10, 13
    stage = Stage(torch.nn.Identity(), C, 2, 1, M, 2.0, True, [0.0, 0.0]).eval()
    block, plan = stage.blocks[1], stage.plans((H, W), torch.device("cpu"))[1]
    x = torch.randn(1, H, W, C)

    def attention_only(x):  # the attention branch of the block: norm1, windows, attention, back in place
        (Hp, Wp), (wh, ww) = plan.padded, plan.window
        y = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H)).reshape(1, Hp * Wp, C).index_select(1, plan.order)
        y = block.attn(y.view(1, -1, wh * ww, C), plan.window, plan.mask)
        return y.view(1, Hp * Wp, C).index_select(1, plan.inverse).view(1, Hp, Wp, C)[:, :H, :W]

    with torch.no_grad():
        base = attention_only(x)
        for r, c in [(0, 0), (1, 12), (5, 6), (9, 12), (2, 2), (9, 0)]:
            bumped = x.clone()
            bumped[0, r, c] += 10.0
            changed = (attention_only(bumped) - base).abs().amax(-1)[0] > 1e-6  # (H, W)
            rows = torch.div(torch.arange(H) - M // 2, M, rounding_mode="floor")
            cols = torch.div(torch.arange(W) - M // 2, M, rounding_mode="floor")
            window = (rows[:, None] == rows[r]) & (cols[None, :] == cols[c])
            assert torch.equal(changed, window), (r, c)


# ---------------------------------------------------------------------------------------- shapes, any input size

@pytest.mark.parametrize("embed", ["conv", "patch"])
@pytest.mark.parametrize("size", [(64, 64), (97, 131), (32, 32), (3, 5)])
def test_any_input_size(embed, size):
    cfg = replace(CONFIGS["toy_cvt"], embed=embed)
    model = CoSwin(cfg).eval()
    H, W = size
    side = (lambda n: (n - 3) // 4 + 1) if embed == "conv" else (lambda n: -(-n // 4))  # stride-4 stem
    h, w = side(H), side(W)
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        features, pooled = model.forward_features(x), model(x)
    assert model.feature_channels == [24, 48, 96, 192] and model.num_features == 192
    for i, f in enumerate(features):
        assert f.shape == (2, model.feature_channels[i], h, w)
        h, w = -(-h // 2), -(-w // 2)  # stride-2 merging: ceil
        assert torch.isfinite(f).all()
    assert pooled.shape == (2, 192)
    assert torch.allclose(pooled, features[-1].mean(dim=(2, 3)), atol=1e-5)  # GAP of the normed last stage


@pytest.mark.parametrize("size", [(48, 48), (97, 131), (1, 1), (3, 300)])
def test_conv_stem_any_input_size(size):
    """The toy's stem: stride 2 per width with ceil (odd sides keep their edge), so any image of at least 1 x 1."""
    model = CoSwin(CONFIGS["toy"]).eval()
    assert CONFIGS["toy"].stem == (16, 32, 48) and model.feature_channels == [48, 96, 192]
    h, w = size
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        features, pooled = model.forward_features(x), model(x)
    for _ in range(3):  # three 2x2 max pools, ceil mode
        h, w = -(-h // 2), -(-w // 2)
    for i, f in enumerate(features):
        assert f.shape == (2, model.feature_channels[i], h, w) and torch.isfinite(f).all()
        h, w = -(-h // 2), -(-w // 2)
    assert pooled.shape == (2, 192)
    with pytest.raises(ValueError, match="last width 32 must equal embed_dim 48"):
        CoSwin(replace(CONFIGS["toy"], stem=(16, 32)))


def test_conv_stem_batchnorm_uses_batch_stats_in_training_and_running_stats_in_eval():
    """Outside DDP the stem's GlobalBatchNorm2d is nn.BatchNorm2d: batch statistics in training (so a sample's
    output depends on its batch), running statistics in eval (so it does not)."""
    torch.manual_seed(0)
    model = CoSwin(CONFIGS["toy"])
    x = torch.randn(4, 3, 48, 48)
    reference = nn.BatchNorm2d(16)
    bn = model.stages[0].embed.convs[1]
    reference.load_state_dict(bn.state_dict())
    y = model.stages[0].embed.convs[0](x)
    torch.testing.assert_close(bn(y), reference(y))
    torch.testing.assert_close(bn.running_var, reference.running_var)
    assert not torch.allclose(model(x)[:2], model(x[:2]))
    model.eval()
    torch.testing.assert_close(model(x)[:2], model(x[:2]), rtol=1e-5, atol=1e-6)


def test_window_plans_are_cached_per_size():
    model = CoSwin(CONFIGS["toy_cvt"]).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        plans = model.stages[0].plans((16, 16), torch.device("cpu"))
        model(torch.randn(1, 3, 64, 64))
    assert model.stages[0].plans((16, 16), torch.device("cpu")) is plans


def test_plan_built_under_inference_mode_serves_training():
    model = CoSwin(CONFIGS["toy_cvt"])
    with torch.inference_mode():
        model.eval()(torch.randn(1, 3, 40, 40))  # first sight of this size builds the plans here
    model.train()(torch.randn(2, 3, 40, 40)).sum().backward()
    assert model.stages[0].blocks[0].attn.relative_position_bias_table.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- checkpointing, drop path, counts

def test_grad_checkpointing_gives_same_gradients():
    cfg = replace(CONFIGS["toy_cvt"], drop_path_rate=0.3)  # drop path on: checkpointing must replay the same masks
    model = CoSwin(cfg).train()
    x = torch.randn(4, 3, 48, 48)

    def grads(checkpointing):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        model(x).pow(2).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, checkpointed = grads(False), grads(True)
    assert len(plain) == len(checkpointed) > 0
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_drop_path_is_identity_in_eval_and_random_in_training():
    model = CoSwin(replace(CONFIGS["toy_cvt"], drop_path_rate=0.5))
    plain = CoSwin(replace(CONFIGS["toy_cvt"], drop_path_rate=0.0))
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))
        model.train()
        assert not torch.allclose(model(x), model(x))


def test_drop_path_rate_increases_linearly_over_blocks():
    model = CoSwin(replace(CONFIGS["T"], drop_path_rate=0.2))
    rates = [block.drop_prob for stage in model.stages for block in stage.blocks]
    assert len(rates) == 12 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert all(b > a for a, b in zip(rates, rates[1:]))


def test_parameter_counts():
    assert abs(count_parameters(CONFIGS["H"]) / 637e6 - 1) < 0.02  # Florence: CoSwin-H has 637M parameters
    assert 27e6 < count_parameters(CONFIGS["T"]) < 31e6  # Swin-T: 28.3M (27.5M without the head)
    assert count_parameters(CONFIGS["toy_cvt"]) < 2e6 and count_parameters(CONFIGS["toy"]) < 2e6
    sizes = [count_parameters(CONFIGS[name]) for name in ("T", "S", "B", "L", "H")]
    assert sizes == sorted(sizes)


# ------------------------------------------------------------------------------------------------- bad input

def test_bad_input_errors():
    model = CoSwin(CONFIGS["toy_cvt"])
    for bad in (torch.randn(3, 64, 64), torch.randn(1, 1, 64, 64), torch.randn(1, 3, 2, 64)):
        with pytest.raises(ValueError, match="expects images"):
            model(bad)
        with pytest.raises(ValueError, match="expects images"):
            model.forward_features(bad)
    with pytest.raises(ValueError, match="embed"):
        CoSwin(replace(CONFIGS["toy_cvt"], embed="pixels"))
    with pytest.raises(ValueError, match="num_heads"):
        CoSwin(replace(CONFIGS["toy_cvt"], num_heads=(1, 2, 4)))
    with pytest.raises(ValueError, match="divisible"):
        CoSwin(replace(CONFIGS["toy_cvt"], num_heads=(5, 2, 4, 8)))


def test_fused_and_written_out_attention_agree():
    """The SDPA path (used on GPU) and Eq. 4 written out (used on CPU) give the same outputs and gradients."""
    torch.manual_seed(0)
    model = CoSwin(CONFIGS["toy_cvt"])
    x = torch.randn(2, 3, 40, 56)  # 10 x 14 first map: padding and shifted windows
    outs = []
    for fused in (True, False):
        for m in model.modules():
            if hasattr(m, "fused"):
                m.fused = fused
        model.zero_grad()
        y = model(x)
        y.square().sum().backward()
        outs.append((y.detach(), model.stages[0].blocks[0].attn.relative_position_bias_table.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-6)
