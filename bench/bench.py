"""Side-by-side CPU speed of our models against the reference libraries, with the same weights, in one run.

    python bench/bench.py            # every benchmark
    python bench/bench.py coswin     # one (names: the bench_* functions below, without the prefix: coswin,
                                     # florence2, florence2_label, florence2_train, dyhead, meter, video, phash)
    BENCH_DEVICE=cuda python bench/bench.py florence2_label florence2_train   # on a GPU (bench/gpu_check.sh)

Each benchmark alternates ours and the reference call by call (so load from other processes hits both alike), after
warm-up, and reports medians, the ratio ours / reference (goal <= 1.0) and the median and range of the rounds'
own ratios (florence2_train has no reference: it reports samples/s and MFU). Add a benchmark by writing another
`bench_<name>()` function; it is picked up automatically.
"""
import math
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat project files


def time_alternating(ours, reference, warmup=2, reps=7, sync=None):
    """Seconds of ours() and reference(), called alternately: warmup rounds, then reps timed rounds. Returns the
    two medians and the per-round ratios ours / reference: a round's two calls run back to back, so its ratio
    is not moved by the machine getting slower or faster over the minutes of a benchmark. On a GPU, sync (e.g.
    torch.cuda.synchronize) runs before each clock reading, so that queued kernels are timed too."""
    times = {"ours": [], "reference": []}
    sync = sync or (lambda: None)
    for i in range(warmup + reps):
        for name, fn in (("ours", ours), ("reference", reference)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["ours"], times["reference"])]
    return statistics.median(times["ours"]), statistics.median(times["reference"]), ratios


def bench_device(device=None):
    """-> (the device: the argument, else the environment's BENCH_DEVICE, else cpu; its name for the report; a
    synchronisation for time_alternating on a GPU, else None)."""
    device = torch.device(device or os.environ.get("BENCH_DEVICE", "cpu"))
    if device.type == "cuda":
        return device, torch.cuda.get_device_name(device), torch.cuda.synchronize
    return device, f"CPU, {torch.get_num_threads()} threads", None


def report(what, timing, reference_name):
    ours_s, reference_s, ratios = timing
    print(f"{what}: ours {ours_s * 1e3:.1f} ms, {reference_name} {reference_s * 1e3:.1f} ms, "
          f"ratio ours/{reference_name} {ours_s / reference_s:.3f} (median of the rounds' ratios "
          f"{statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f})")


def forward_backward(model, x):
    """One training step's compute without the optimizer: forward, a scalar loss, backward."""
    def step():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    return step


def bench_coswin():
    """CoSwin in patch mode vs timm swin_tiny_patch4_window7_224, same weights: forward + backward, batch 8, 224 px."""
    import timm
    from coswin import CONFIGS, CoSwin, load_timm_swin
    from dataclasses import replace

    torch.manual_seed(0)
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).train()
    ours = CoSwin(replace(CONFIGS["T"], embed="patch", drop_path_rate=0.1, num_classes=1000)).train()
    load_timm_swin(ours, reference.state_dict())
    x = torch.randn(8, 3, 224, 224)
    with torch.no_grad():  # same weights, same function: check before timing (drop path off in eval)
        diff = (ours.eval()(x[:2]) - reference.eval()(x[:2])).abs().max().item()
    ours.train(), reference.train()
    fused = reference.layers[0].blocks[0].attn.fused_attn
    print(f"coswin: batch 8, 224 px, fp32, CPU, {torch.get_num_threads()} threads; max |ours - timm| = {diff:.1e}; "
          f"timm attention path: {'fused SDPA' if fused else 'math (its default; TIMM_FUSED_ATTN=2 for SDPA)'}")
    report("coswin forward+backward", time_alternating(forward_backward(ours, x), forward_backward(reference, x)),
           "timm")


def hf_florence2_config(cfg, image_token_id):
    """A transformers Florence2Config from ours (the reverse of florence2.config_from_hf)."""
    from transformers import BartConfig, Florence2Config
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

    v = cfg.vision
    vision = Florence2VisionConfig(
        in_channels=v.in_channels, depths=list(v.depths), embed_dim=list(v.embed_dims), num_heads=list(v.num_heads),
        num_groups=list(v.num_groups), patch_size=list(v.patch_size), patch_stride=list(v.patch_stride),
        patch_padding=list(v.patch_padding), patch_prenorm=list(v.patch_prenorm), window_size=v.window_size,
        mlp_ratio=v.mlp_ratio, qkv_bias=v.qkv_bias, drop_path_rate=v.drop_path_rate, projection_dim=cfg.d_model,
        max_position_embeddings=cfg.max_image_positions, max_temporal_embeddings=cfg.max_temporal_embeddings)
    text = BartConfig(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers, encoder_attention_heads=cfg.encoder_heads,
        decoder_attention_heads=cfg.decoder_heads, encoder_ffn_dim=cfg.encoder_ffn_dim,
        decoder_ffn_dim=cfg.decoder_ffn_dim, max_position_embeddings=cfg.max_position_embeddings,
        activation_function=cfg.activation, dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout, scale_embedding=cfg.scale_embedding, init_std=cfg.init_std,
        pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        decoder_start_token_id=cfg.decoder_start_token_id, forced_eos_token_id=cfg.forced_eos_token_id)
    return Florence2Config(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id)


def florence2_pair(model_cfg):
    """transformers Florence2ForConditionalGeneration with random weights in the size of model_cfg, and ours loaded
    from its saved folder. Dropout off on both sides (transformers' BART drops 0.1 by default), so train mode
    computes the same thing. Returns (our config, transformers' image token id, ours, transformers')."""
    import tempfile
    from dataclasses import replace

    from transformers import Florence2ForConditionalGeneration

    import florence2 as f2

    cfg = replace(model_cfg, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                  vision=replace(model_cfg.vision, drop_path_rate=0.0))
    image_token = cfg.vocab_size - 1  # transformers' image placeholder; the prompts never use it
    torch.manual_seed(0)
    reference = Florence2ForConditionalGeneration(hf_florence2_config(cfg, image_token)).float()
    with torch.no_grad():  # random weights rarely end a sequence, a small </s> embedding makes sure they never do
        reference.model.language_model.shared.weight[cfg.eos_token_id].mul_(0.1)
    reference.generation_config.forced_bos_token_id = cfg.forced_bos_token_id  # Florence-2 writes <s> first
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        ours = f2.Florence2.from_pretrained(folder)
    # the config made the round trip (the image size is the processor's, not in config.json): we time that size
    assert replace(ours.cfg, image_size=cfg.image_size) == cfg, ours.cfg
    return cfg, image_token, ours, reference


def bench_florence2():
    """Florence-2 base vs transformers Florence2ForConditionalGeneration, same random weights, no dropout, one
    768 px image and a 10-token prompt: forward + backward on 32 target tokens, greedy and 3-beam generation of
    32 new tokens. Seconds per call on a few cores, hence 1 warm-up round; 7 timed ones (~6 min in all on 2),
    as with 3 the ratio moved by +-0.02 between runs, which is the whole question at parity."""
    import torch.nn.functional as F

    import florence2 as f2

    cfg, image_token, ours, reference = florence2_pair(f2.MODELS["base"])
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=g)
    prompt = torch.cat([torch.tensor([[cfg.bos_token_id]]), torch.randint(3, image_token, (1, 8), generator=g),
                        torch.tensor([[cfg.eos_token_id]])], 1)  # (1, 10): <s> 8 tokens </s>
    n_image = 1 + (cfg.image_size // math.prod(cfg.vision.patch_stride)) ** 2  # 577 image tokens
    hf_prompt = torch.cat([torch.full((1, n_image), image_token), prompt], 1)  # transformers marks the image slots
    targets = torch.randint(3, image_token, (1, 32), generator=g)
    decoder_ids = torch.cat([torch.tensor([[cfg.decoder_start_token_id]]), targets[:, :-1]], 1)  # (1, 32)

    def hf_logits(decoder_input_ids):
        return reference(pixel_values=pixels, input_ids=hf_prompt, decoder_input_ids=decoder_input_ids,
                         use_cache=False).logits

    ours.eval(), reference.eval()
    with torch.no_grad():
        diff = (ours(pixels, prompt, decoder_ids) - hf_logits(decoder_ids)).abs().max().item()
    print(f"florence2: base, 1 image {cfg.image_size} px ({n_image} image tokens), 10 prompt tokens, fp32, CPU, "
          f"{torch.get_num_threads()} threads, transformers attention {reference.config._attn_implementation}; "
          f"max |ours - transformers| logits = {diff:.1e}")

    def train_step(logits_fn, model):
        def step():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(logits_fn().flatten(0, 1), targets.flatten()).backward()
        return step

    ours.train(), reference.train()
    timing = time_alternating(train_step(lambda: ours(pixels, prompt, decoder_ids), ours),
                              train_step(lambda: hf_logits(decoder_ids), reference), warmup=1)
    grad_diff = (ours.embed_tokens.weight.grad - reference.model.language_model.shared.weight.grad).abs().max()
    report(f"florence2 forward+backward, 32 target tokens (max |grad diff| of the token embedding "
           f"{grad_diff.item():.1e})", timing, "transformers")
    ours.zero_grad(set_to_none=True), reference.zero_grad(set_to_none=True)

    ours.eval(), reference.eval()
    for beams in (1, 3):
        out = {}
        beam_options = dict(early_stopping=True, length_penalty=1.0) if beams > 1 else {}  # our defaults

        def ours_generate():
            out["ours"] = ours.generate(pixels, prompt, max_new_tokens=32, num_beams=beams)

        def hf_generate():
            with torch.no_grad():
                out["transformers"] = reference.generate(
                    pixel_values=pixels, input_ids=hf_prompt, max_new_tokens=32, num_beams=beams, do_sample=False,
                    no_repeat_ngram_size=0, **beam_options)

        timing = time_alternating(ours_generate, hf_generate, warmup=1)
        same = out["ours"].tolist() == out["transformers"].tolist()
        lengths = out["ours"].shape[1] - 1, out["transformers"].shape[1] - 1
        report(f"florence2 {'greedy' if beams == 1 else f'{beams}-beam'} generation, new tokens ours/transformers "
               f"{lengths[0]}/{lengths[1]}, ids identical: {same}", timing, "transformers")


def bench_florence2_label(size="base", new_tokens=64, batches=(1, 8), reps=5, compile=False, device=None):
    """Labelling throughput, images per second: Florence-2 base with the same random weights in ours and
    transformers Florence2ForConditionalGeneration, 768 px images, an <OD>-sized prompt (<s> 12 words </s>),
    greedy generation of `new_tokens` new tokens (no early </s>: the random weights never write it, so both
    write exactly new_tokens, the last one the </s> forced at the limit), at each batch size in `batches`:
      (a) ours fp32 vs transformers `generate` fp32, (b) ours bf16 vs transformers bf16,
      (c) our fastest path (fp32 or bf16; also bf16 with the decoder compiled, if compile=True) vs transformers
          as users run it by default, fp32 eager.
    The fp32 ids must be identical between ours and transformers, and between our batch and batch-1 runs.
    device: "cpu" or "cuda" (default: the environment's BENCH_DEVICE, else cpu); BENCH_COMPILE=1 sets compile.
    A smoke run (a narrow model, a few tokens), from tests/:
    python -c 'import bench; bench.bench_florence2_label("tiny", new_tokens=4, reps=1)'."""
    import copy
    from dataclasses import replace

    import florence2 as f2

    base = f2.MODELS["base"]
    if size == "tiny":  # base's image size and vocabulary, narrow and shallow: checks that the bench runs
        base = replace(base, d_model=64, encoder_layers=1, decoder_layers=1, encoder_heads=4, decoder_heads=4,
                       encoder_ffn_dim=128, decoder_ffn_dim=128,
                       vision=replace(base.vision, embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1),
                                      num_heads=(1, 2, 3, 4), num_groups=(1, 2, 3, 4)))
    device, where, sync = bench_device(device)
    compile = compile or os.environ.get("BENCH_COMPILE") == "1"
    cfg, image_token, ours, reference = florence2_pair(base)
    ours.eval().to(device), reference.eval().to(device)
    models = {"fp32": (ours, reference),  # dtype -> (ours, transformers'), the same weights
              "bf16": (copy.deepcopy(ours).to(torch.bfloat16), copy.deepcopy(reference).to(torch.bfloat16))}
    if compile:  # ours only: timed against transformers fp32
        models["bf16 compiled"] = (copy.deepcopy(models["bf16"][0]), reference)
        models["bf16 compiled"][0].decoder.compile(dynamic=True)
    n_image = 1 + (cfg.image_size // math.prod(cfg.vision.patch_stride)) ** 2  # 577 image tokens at 768 px
    g = torch.Generator().manual_seed(0)
    B = max(batches)
    pixels = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
    prompt = torch.cat([torch.full((B, 1), cfg.bos_token_id), torch.randint(3, image_token, (B, 12), generator=g),
                        torch.full((B, 1), cfg.eos_token_id)], 1).to(device)  # (B, 14): the length of <OD>'s prompt
    hf_prompt = torch.cat([torch.full((B, n_image), image_token, device=device), prompt], 1)  # the image slots
    print(f"florence2 labelling: {size}, {cfg.image_size} px ({n_image} image tokens), {prompt.shape[1]} prompt "
          f"tokens, greedy, {new_tokens} new tokens, {where}, transformers attention "
          f"{reference.config._attn_implementation}")
    # our fp32 ids of each image alone: a batch must give them row by row
    alone = [ours.generate(pixels[i:i + 1], prompt[i:i + 1], max_new_tokens=new_tokens)[0].tolist() for i in range(B)]

    for b in batches:
        out, seconds = {}, {}  # seconds[ours' dtype]: median seconds per call of ours and of transformers beside it

        def ours_generate(model):
            def run():
                out["ours"] = model.generate(pixels[:b], prompt[:b], max_new_tokens=new_tokens)
            return run

        def hf_generate(model):
            def run():
                with torch.no_grad():
                    out["transformers"] = model.generate(pixel_values=pixels[:b], input_ids=hf_prompt[:b],
                                                         max_new_tokens=new_tokens, do_sample=False, num_beams=1)
            return run

        for dtype, (mine, theirs) in models.items():
            their_dtype = "fp32" if theirs is reference else dtype
            timing = time_alternating(ours_generate(mine), hf_generate(theirs), warmup=1, reps=reps, sync=sync)
            seconds[dtype] = timing[:2]
            same = out["ours"].tolist() == out["transformers"].tolist()
            lengths = out["ours"].shape[1] - 1, out["transformers"].shape[1] - 1
            report(f"batch {b}, ours {dtype} {b / timing[0]:.3f} images/s, transformers {their_dtype} "
                   f"{b / timing[1]:.3f} images/s (new tokens {lengths[0]}/{lengths[1]}, ids identical: {same})",
                   timing, "transformers")
            if dtype == "fp32":
                assert same and lengths == (new_tokens, new_tokens), (out["ours"], out["transformers"])
                assert out["ours"].tolist() == alone[:b], "a batch's ids differ from its images' ids alone"
        fastest = min(seconds, key=lambda dtype: seconds[dtype][0])
        # (c) against transformers fp32 timed beside it: the fp32 rounds' for ours bf16, its own for the others
        fp32_rounds = seconds["fp32" if fastest == "bf16" else fastest][1]
        print(f"batch {b}, images/s ours / transformers: (a) fp32 {seconds['fp32'][1] / seconds['fp32'][0]:.2f}x, "
              f"(b) bf16 {seconds['bf16'][1] / seconds['bf16'][0]:.2f}x, (c) ours {fastest} vs transformers fp32 "
              f"eager {fp32_rounds / seconds[fastest][0]:.2f}x")


def bench_florence2_train(config=None, batch=None, steps=None, device=None):
    """Florence-2 training throughput and MFU: our training step (forward, backward, AdamW) on one fixed batch of
    Shapes-world samples, as `python train.py --stage florence2` makes them, the data pipeline left out. On a GPU:
    `base` at 768 px, bf16 autocast, torch.compile, batch 16 (BENCH_BATCH), and MFU against train.PEAK_TFLOPS; on
    a CPU: the toy, float32, eager, batch 8. FLOPs of a sample are train.flops_per_sample's (FlopCounterMode).
    device: default the environment's BENCH_DEVICE, else cpu. No reference: transformers has no Florence-2 trainer."""
    import train

    device, where, sync = bench_device(device)
    sync, gpu = sync or (lambda: None), device.type == "cuda"
    config = config or ("base" if gpu else "toy")
    batch = batch or int(os.environ.get("BENCH_BATCH", 16 if gpu else 8))
    steps = steps or (20 if gpu else 3)
    flags = {"stage": "florence2", "config": config, "tokenizer": "bytes+shapes", "data": "shapes", "val_size": "0",
             "train_size": str(batch), "batch_size": str(batch)}
    tcfg, stage, scfg = train.build_configs(flags)
    torch.manual_seed(0)
    tokenizer = stage.build_vocab(scfg)
    model = stage.build_model(scfg, tokenizer).to(device).train()
    train_ds, _ = stage.build_datasets(scfg, 0)
    rngs = [random.Random(i) for i in range(batch)]
    data = stage.collate([train_ds[i] for i in range(batch)], tokenizer, scfg, rngs, 0.0)
    data = {k: v.to(device) for k, v in data.items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)
    with autocast:
        flops = train.flops_per_sample(stage, model, data, batch, str(device))
    optimizer = train.make_optimizer(model, tcfg, device.type)
    step_model = torch.compile(model) if gpu else model

    def step():
        with autocast:
            loss = stage.compute_loss(step_model, data)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    rate = batch / seconds
    peak = train.peak_tflops(train.TrainConfig(), device.type, "bfloat16" if gpu else "float32")
    mfu = f", MFU {flops * rate / (peak * 1e12):.1%} of {peak:g} TFLOP/s" if peak else ""
    size = getattr(getattr(model, "cfg", None), "image_size", "?")
    mode = "bf16 compiled" if gpu else "fp32 eager"
    print(f"florence2 training step: {config}, {size} px, batch {batch}, {where}, {mode}: {seconds * 1e3:.1f} ms a "
          f"step, {rate:.1f} samples/s, {flops / 1e9:.1f} GFLOPs a sample{mfu}")


def bench_dyhead():
    """dyhead's from-scratch operators vs torchvision's compiled ones and pycocotools: deform_conv2d forward +
    backward (batch 2, 64 channels, 32 x 32, 3x3, with mask, the Dynamic Head's shape at a small level), nms on
    2,000 boxes, and coco_eval vs COCOeval (evaluate + accumulate + summarize) on 200 images x 5 objects x 100
    detections."""
    import contextlib
    import io
    import random

    import torchvision.ops as tv
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    import dyhead

    torch.manual_seed(0)
    x = torch.randn(2, 64, 32, 32, requires_grad=True)
    w = (torch.randn(64, 64, 3, 3) * 0.05).requires_grad_()
    offset = (torch.randn(2, 18, 32, 32) * 2).requires_grad_()
    mask = torch.rand(2, 9, 32, 32, requires_grad=True)

    def dcn(fn):
        def step():
            for t in (x, w, offset, mask):
                t.grad = None
            fn(x, offset, w, padding=1, mask=mask).sum().backward()
        return step
    report("deform_conv2d forward + backward", time_alternating(dcn(dyhead.deform_conv2d), dcn(tv.deform_conv2d)),
           "torchvision")

    xy = torch.rand(2000, 2) * 300
    boxes = torch.cat([xy, xy + 20 + torch.rand(2000, 2) * 60], 1)
    scores = torch.rand(2000)
    report("nms, 2000 boxes", time_alternating(lambda: dyhead.nms(boxes, scores, 0.5),
                                               lambda: tv.nms(boxes, scores, 0.5), reps=15), "torchvision")

    rng = random.Random(0)
    images, annotations, detections = [], [], []
    for i in range(1, 201):
        images.append({"id": i, "width": 640, "height": 480})
        for _ in range(5):
            bx, by, bw, bh = rng.uniform(0, 500), rng.uniform(0, 380), rng.uniform(8, 140), rng.uniform(8, 100)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": rng.randint(1, 5),
                                "bbox": [bx, by, bw, bh], "area": bw * bh, "iscrowd": 0})
            for _ in range(20):  # detections scattered around each object
                detections.append({"image_id": i, "category_id": rng.randint(1, 5), "score": rng.random(),
                                   "bbox": [bx + rng.gauss(0, 8), by + rng.gauss(0, 8), bw * rng.uniform(0.7, 1.3),
                                            bh * rng.uniform(0.7, 1.3)]})
    gt = {"images": images, "annotations": annotations, "categories": [{"id": k} for k in range(1, 6)]}

    def pycocotools_eval():
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            ev = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
    report("coco_eval, 200 images", time_alternating(lambda: dyhead.coco_eval(gt, detections), pycocotools_eval,
                                                     warmup=1, reps=5), "pycocotools")


def bench_meter():
    """meter's RoBERTa text encoder vs transformers RobertaModel (roberta-base size, random weights, eval mode so no
    dropout), forward + backward on a right-padded batch of 8 x 64 tokens."""
    from transformers import RobertaConfig, RobertaModel
    import meter
    config = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                           layer_norm_eps=1e-5)
    torch.manual_seed(0)
    reference = RobertaModel(config, add_pooling_layer=False).eval()
    ours = meter.text_encoder_from_hf(config.to_dict(), reference.state_dict()).eval()
    ids = torch.randint(3, config.vocab_size, (8, 64))
    mask = torch.ones(8, 64, dtype=torch.long)
    for b, n in enumerate((64, 60, 50, 41, 64, 33, 20, 57)):
        ids[b, n:], mask[b, n:] = config.pad_token_id, 0

    def step(model, call):
        def run():
            model.zero_grad(set_to_none=True)
            call().sum().backward()
        return run
    report("RoBERTa-base text encoder, forward + backward, 8 x 64 tokens",
           time_alternating(step(ours, lambda: ours(ids, mask)),
                            step(reference, lambda: reference(input_ids=ids, attention_mask=mask).last_hidden_state),
                            warmup=2, reps=7), "transformers")


def bench_video():
    """Video CoSwin in patch mode (CONFIGS["swin3d_t"]) vs torchvision swin3d_t, same random weights: forward +
    backward on one 16 x 112 x 112 clip (8 x 28 x 28 tokens in stage 1), train mode (stochastic depth 0.1 on both)."""
    from dataclasses import replace

    from torchvision.models.video import swin3d_t

    import video
    torch.manual_seed(0)
    reference = swin3d_t(num_classes=400).train()
    ours = video.VideoCoSwin(replace(video.CONFIGS["swin3d_t"], num_classes=400)).train()
    video.load_torchvision_swin3d(ours, reference.state_dict())
    x = torch.randn(1, 3, 16, 112, 112)
    with torch.no_grad():  # stage 4's 4 x 4 map is smaller than the 7 x 7 window, where torchvision's bias differs
        diff = (ours.eval()(x) - reference.eval()(x)).abs().max().item()
    ours.train(), reference.train()
    print(f"video: swin3d_t, 1 clip 16 x 112 x 112, fp32, CPU, {torch.get_num_threads()} threads; "
          f"max |ours - torchvision| logits = {diff:.1e}")
    report("video swin3d_t forward+backward", time_alternating(forward_backward(ours, x),
                                                                forward_backward(reference, x)), "torchvision")


def bench_phash():
    """engine.phashes (a batch of DCTs as two matrix products) vs imagehash.phash (one scipy DCT per image), on the
    same decoded images: 256 Shapes images at 64 px and scikit-image's photographs (512 px and so on), images/s."""
    import glob

    import imagehash
    import skimage.data
    from PIL import Image

    import data
    import engine
    folder = os.path.dirname(skimage.data.__file__)
    photos = [Image.open(p).convert("RGB") for p in sorted(glob.glob(os.path.join(folder, "*")))
              if p.endswith((".png", ".jpg"))]
    shapes = [data.ShapesWorld("train", 64, n=256)[i]["image"] for i in range(256)]
    for what, images in ((f"{len(shapes)} Shapes images, 64 px", shapes), (f"{len(photos)} photographs", photos)):
        ours_s, ref_s, ratios = time_alternating(lambda: engine.phashes(images),
                                                 lambda: [imagehash.phash(im) for im in images])
        print(f"phash, {what}: ours {len(images) / ours_s:.0f} images/s, imagehash {len(images) / ref_s:.0f} "
              f"images/s, speed-up x{ref_s / ours_s:.2f} (rounds x{1 / max(ratios):.2f}-x{1 / min(ratios):.2f})")


BENCHES = {name[len("bench_"):]: fn for name, fn in dict(globals()).items() if name.startswith("bench_")}

if __name__ == "__main__":
    unknown = [name for name in sys.argv[1:] if name not in BENCHES]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; available: {sorted(BENCHES)}")
    for name in sys.argv[1:] or BENCHES:
        BENCHES[name]()
