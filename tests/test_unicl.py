"""UniCL: the loss against CLIP and a brute-force reading of Eq. 1-3, the cross-process gather's
gradient, the towers, templates and the zero-shot / retrieval metrics."""
import math
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import unicl


def normed(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def brute_force_unicl(u, v, y, tau):
    """Florence Eq. 1-3 term by term, one row at a time."""
    B = len(y)
    logits = [[tau * float(u[i] @ v[j]) for j in range(B)] for i in range(B)]

    def direction(L):
        total = 0.0
        for i in range(B):
            log_z = math.log(sum(math.exp(L[i][j]) for j in range(B)))
            P = [k for k in range(B) if y[k] == y[i]]
            total += -sum(L[i][k] - log_z for k in P) / len(P)
        return total / B

    return (direction(logits) + direction([list(col) for col in zip(*logits)])) / 2


def test_unicl_loss_is_clip_loss_when_labels_differ():
    u, v = normed(16, 8, seed=1), normed(16, 8, seed=2)
    tau = torch.tensor(14.3, dtype=torch.float64)
    logits = tau * u @ v.t()
    target = torch.arange(16)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    ours = unicl.unicl_loss(u, v, torch.arange(16) * 7 + 3, tau)
    torch.testing.assert_close(ours, clip, rtol=1e-12, atol=1e-12)


def test_unicl_loss_matches_brute_force_with_repeated_texts():
    u, v = normed(10, 6, seed=3), normed(10, 6, seed=4)
    y = torch.tensor([5, 1, 5, 2, 1, 5, 9, 2, 3, 3])
    ours = unicl.unicl_loss(u, v, y, torch.tensor(10.0, dtype=torch.float64)).item()
    assert ours == pytest.approx(brute_force_unicl(u, v, y.tolist(), 10.0), rel=1e-10)
    # repeated texts must change the loss (it is not silently the CLIP loss)
    assert ours != pytest.approx(unicl.unicl_loss(u, v, torch.arange(10), torch.tensor(10.0, dtype=torch.float64)).item())


def _gather_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    proj_img, proj_txt = torch.nn.Linear(5, 4, dtype=torch.float64), torch.nn.Linear(3, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2, 3, 1, 4, 0])
    lo, hi = rank * 8 // world, (rank + 1) * 8 // world
    u = F.normalize(proj_img(x[lo:hi]), dim=-1)
    u.retain_grad()
    loss = unicl.unicl_loss(u, F.normalize(proj_txt(t[lo:hi]), dim=-1), y[lo:hi], torch.tensor(3.0, dtype=torch.float64))
    loss.backward()
    grads = [p.grad for p in (*proj_img.parameters(), *proj_txt.parameters())]
    for gr in grads:  # what DDP does to parameter gradients: average over ranks
        dist.all_reduce(gr)
        gr /= world
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": grads, "u_grad": u.grad}, out_file)
    dist.destroy_process_group()


def test_gather_gives_single_process_gradient(tmp_path):
    """2 processes with gather-with-grad + DDP-style gradient averaging == 1 process on the global batch."""
    out = tmp_path / "rank0.pt"
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    two = torch.load(out)
    torch.manual_seed(0)
    proj_img, proj_txt = torch.nn.Linear(5, 4, dtype=torch.float64), torch.nn.Linear(3, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    u = F.normalize(proj_img(x), dim=-1)
    u.retain_grad()
    loss = unicl.unicl_loss(u, F.normalize(proj_txt(t), dim=-1), torch.tensor([0, 1, 0, 2, 3, 1, 4, 0]),
                            torch.tensor(3.0, dtype=torch.float64))
    loss.backward()
    torch.testing.assert_close(two["loss"], loss.detach())
    for a, b in zip(two["grads"], [p.grad for p in (*proj_img.parameters(), *proj_txt.parameters())]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # rank 0's local features get world_size x their share of dL/du (summed over ranks), which the average undoes
    torch.testing.assert_close(two["u_grad"], 2 * u.grad[:4], rtol=1e-10, atol=1e-12)


def tiny_model():
    cfg = unicl.UniCLConfig(img_size=32, context_length=24, text_width=32, text_layers=2, text_heads=2, embed_dim=16)
    torch.manual_seed(0)
    return unicl.UniCL(cfg, vocab_size=259).eval(), cfg


def test_text_pooling_ignores_padding_after_end_of_text():
    model, _ = tiny_model()
    tokens = torch.randint(0, 256, (2, 12))
    eot = torch.tensor([6, 11])
    padded = tokens.clone()
    padded[0, 7:] = 258  # anything after the end-of-text token of row 0
    torch.testing.assert_close(model.encode_text(tokens, eot), model.encode_text(padded, eot))


def test_model_features_are_normalised_and_temperature_is_clamped():
    model, _ = tiny_model()
    u, v, scale = model(torch.randn(3, 3, 32, 32), torch.randint(0, 256, (3, 10)), torch.tensor([9, 9, 9]))
    assert u.shape == v.shape == (3, 16)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(3))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model(torch.randn(1, 3, 32, 32), torch.randint(0, 256, (1, 4)), torch.tensor([3]))[2].item() == pytest.approx(100)


def test_templates_only_in_stage_one_and_only_for_short_texts():
    cfg = unicl.UniCLConfig(template_max_words=4)
    rng = random.Random(0)
    short = unicl.augment_text("a red circle", cfg, rng)
    assert short != "a red circle" and "a red circle" in short
    long = "a red circle and a small blue star"
    assert unicl.augment_text(long, cfg, rng) == long
    assert unicl.augment_text("a red circle", unicl.UniCLConfig(unicl_stage=2), rng) == "a red circle"
    assert unicl.augment_text("a red circle", cfg, None) == "a red circle"  # evaluation never augments
    assert unicl.text_label("a red circle") == unicl.text_label("a red circle") != unicl.text_label("a red circle.")


def test_tokenize_keeps_end_of_text_when_truncating():
    class Tok:
        pad_id, eos_id = 0, 9

        def encode(self, text, bos=False):
            return [8] * bos + [ord(c) % 7 + 1 for c in text]
    tokens, eot = unicl.tokenize(Tok(), ["abc", "a much longer text than fits"], context_length=6)
    assert tokens.shape == (2, 6)
    assert tokens[0].tolist()[:5] == [8, 1 + ord("a") % 7, 1 + ord("b") % 7, 1 + ord("c") % 7, 9] and tokens[0, 5] == 0
    assert eot.tolist() == [4, 5] and tokens[1, 5] == 9


def test_retrieval_recall_counts_equal_captions_as_hits():
    img = torch.eye(4)
    # text j = e_swap(j) + 0.5 e_j: every image's own text is its second-best match, with no ties
    txt = torch.tensor([[0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1.0], [0, 0, 1.0, 0]]) + 0.5 * torch.eye(4)
    labels = torch.tensor([0, 1, 2, 3])
    r = unicl.retrieval_recall(img, txt, labels, labels, ks=(1, 2))
    assert r["i2t_R@1"] == 0.0 and r["i2t_R@2"] == 1.0 and r["t2i_R@1"] == 0.0
    same = torch.tensor([0, 0, 2, 2])  # images 0,1 share a caption, as do 2,3
    r = unicl.retrieval_recall(img, txt, same, same, ks=(1,))
    assert r["i2t_R@1"] == 1.0 and r["t2i_R@1"] == 1.0


def test_zeroshot_classifier_averages_templates():
    model, cfg = tiny_model()
    import data
    tok = data.get_tokenizer("bytes")
    w = unicl.zeroshot_classifier(model, tok, ["red circle", "blue star"], templates=("a {}.", "the {}!"))
    assert w.shape == (2, 16)
    t, e = unicl.tokenize(tok, ["a red circle.", "the red circle!"], cfg.context_length)
    expected = F.normalize(model.encode_text(t, e).mean(0), dim=-1)
    torch.testing.assert_close(w[0], expected)


def test_florence_config_sizes():
    """Florence: text tower 256M and total 893M, each within 2% (counted on the meta device)."""
    cfg = unicl.CONFIGS["florence"]
    with torch.device("meta"):
        model = unicl.UniCL(cfg, vocab_size=50257 + 2)  # GPT-2 BPE + start and pad tokens
    text = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("text.", "text_proj")))
    total = sum(p.numel() for p in model.parameters())
    assert abs(text / 256e6 - 1) < 0.02, text
    assert abs(total / 893e6 - 1) < 0.02, total
