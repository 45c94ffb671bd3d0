"""bench.py: llava.py measured side by side with transformers' LlavaForConditionalGeneration.

Same weights, same inputs, one run; ours and the reference alternate after a warm-up.

    python bench.py                 # tiny models (seconds)
    python bench.py --size small    # a few seconds per training step on a CPU
    python bench.py --size small --profile   # also: where a stage-2 training step spends its time

Memory per GPU at 7B and 13B is train.py --plan's: a training step simulated at full size (plan.py).
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import transformers
from PIL import Image

import data
import disk
import formats
import llava
import make_stand_ins

SIZES = {  # vision: image, patch, width, layers; LM: width, layers; batch, text tokens per sample (of
    # them, the answer: the trained ones)
    "tiny": dict(image=32, patch=8, v_width=64, v_layers=3, width=64, layers=2, batch=4, text=48, answer=12,
                 new_tokens=32),
    "small": dict(image=224, patch=16, v_width=256, v_layers=6, width=512, layers=8, batch=4, text=192, answer=48,
                  new_tokens=64),
}
VOCABULARY = 32000  # Vicuna's (LLaMA's) vocabulary size: the LM head is as wide as the real one


def timed(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    return [_time(fn) for _ in range(repeats)]


def _time(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(ours, reference, repeats):
    """Warm up both, then run them turn about; returns the two lists of seconds."""
    for _ in range(2):
        ours(), reference()
    a, b = [], []
    for _ in range(repeats):
        a.append(_time(ours))
        b.append(_time(reference))
    return a, b


def report(name, a, b, unit="s", extra=""):
    fmt = lambda xs: f"{min(xs):.4f} / {statistics.median(xs):.4f} / {max(xs):.4f}"  # noqa: E731
    print(f"{name:<28} ours {fmt(a)} {unit}   transformers {fmt(b)} {unit}   "
          f"ours/ref {statistics.median(a) / statistics.median(b):.2f}{extra}")


def matmul_peak(n=1024, repeats=10):
    """This machine's FP32 matmul FLOP/s: the yardstick of model FLOPs utilisation (MFU)."""
    x, y = torch.randn(n, n), torch.randn(n, n)
    best = min(timed(lambda: x @ y, repeats))
    return 2 * n ** 3 / best


def make_models(size, root):
    s = SIZES[size]
    tokenizer = make_stand_ins.make_tokenizer(os.path.join(root, "tokenizer"), [
        "A chat between a curious human and an artificial intelligence assistant. What color is the square? "
        "The square is red."] * 20, 400)
    make_stand_ins.make_clip(os.path.join(root, "clip"), s["image"], s["patch"], s["v_width"], s["v_layers"], heads=4,
                             vocab_size=len(tokenizer))
    make_stand_ins.make_vicuna(os.path.join(root, "lm"), tokenizer, s["width"], s["layers"], heads=8,
                               vocab_size=VOCABULARY)
    torch.manual_seed(0)
    ours = llava.build(os.path.join(root, "clip"), os.path.join(root, "lm"), "mlp2x_gelu")
    formats.save(ours, os.path.join(root, "llava"))
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(os.path.join(root, "llava"), trust_remote_code=False)
    # An untrained model soon writes EOS; let both stop at <unk> instead, which it does not write,
    # so that both generate every token asked for.
    ours.tokenizer.eos_token = "<unk>"
    return ours, reference


def training_batch(ours, size):
    """BOS, the image, then text whose last `answer` tokens are the trained ones, as in LLaVA's data."""
    s = SIZES[size]
    g = torch.Generator().manual_seed(0)
    n_v = ours.num_image_tokens
    ids = torch.randint(10, 300, (s["batch"], 1 + n_v + s["text"]), generator=g)  # (B, T)
    ids[:, 1:1 + n_v] = ours.image_token_id
    labels = ids.clone()
    labels[:, :-s["answer"]] = data.IGNORE  # the answer only (stage 1: the caption)
    pixel_values = torch.randn(s["batch"], 3, s["image"], s["image"], generator=g)  # (B, 3, H, W)
    return ids, labels, pixel_values


def bench_training(ours, reference, size, stage, repeats, peak):
    s = SIZES[size]
    ids, labels, pixel_values = training_batch(ours, size)
    n_v = ours.num_image_tokens
    for model, lm in ((ours, ours.language_model), (reference, None)):
        model.train()
        model.requires_grad_(False)
        projector = ours.projector if model is ours else reference.model.multi_modal_projector
        projector.requires_grad_(True)
        if stage == 2:
            (lm if lm is not None else reference.model.language_model).requires_grad_(True)
            if lm is None:
                reference.lm_head.requires_grad_(True)
    # The optimizer train.py uses, for both.
    opt_a = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0, fused=True)
    opt_b = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0,
                              fused=True)

    def step_ours():
        loss = ours(ids, pixel_values, labels=labels)[1]
        loss.backward()
        opt_a.step()
        opt_a.zero_grad()

    def step_reference():
        loss = reference(input_ids=ids, pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        opt_b.step()
        opt_b.zero_grad()

    a, b = alternate(step_ours, step_reference, repeats)
    # Model FLOPs, the work the loss needs (attention scores left out, as small here): 2 per parameter
    # and token forward; backward 4 through trainable layers, 2 (activation gradients only) through
    # the frozen LM of stage 1. The LM head only at the trained positions, the vision tower forward
    # only and up to the feature layer.
    lm = ours.language_model
    n_head = lm.get_output_embeddings().weight.numel()
    n_body = sum(p.numel() for p in lm.parameters()) - n_head - lm.get_input_embeddings().weight.numel()
    layers = ours.vision_tower.encoder.layers
    run = [ours.vision_tower.embeddings, *layers[:llava.layers_needed(len(layers), ours.feature_layer)]]
    n_vision = sum(p.numel() for module in run for p in module.parameters())
    per_param_token = 6 if stage == 2 else 4
    flops = (2 * n_vision * s["batch"] * (n_v + 1) + per_param_token * n_body * ids.numel()
             + per_param_token * n_head * int((labels != data.IGNORE).sum()))
    mfu = flops / statistics.median(a) / peak
    report(f"training step, stage {stage}", a, b, extra=f"   MFU ours {100 * mfu:.1f}%")


def profile_training(ours, size, repeats=5):
    """Where our stage-2 step spends its time: its phases one by one, then torch.profiler's
    busiest operators."""
    ids, labels, pixel_values = training_batch(ours, size)
    ours.train()
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0,
                                  fused=True)

    def step():
        ours(ids, pixel_values, labels=labels)[1].backward()
        optimizer.step()
        optimizer.zero_grad()

    with torch.no_grad():
        vision = statistics.median(timed(lambda: ours.vision_tower(pixel_values, output_hidden_states=True), repeats))
    forward = statistics.median(timed(lambda: ours(ids, pixel_values, labels=labels)[1], repeats))
    forward_backward = statistics.median(timed(lambda: ours(ids, pixel_values, labels=labels)[1].backward(), repeats))
    whole = statistics.median(timed(step, repeats))
    times = {"vision tower (frozen, no grad)": vision, "projector, LLM forward, loss": forward - vision,
             "backward": forward_backward - forward, "optimizer step (Adam)": whole - forward_backward}
    for name, t in times.items():
        print(f"  {name:<34} {t * 1000:8.1f} ms  {100 * t / whole:5.1f}%")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=36))


@torch.no_grad()
def bench_generation(ours, reference, size, repeats, peak, batches=(1, 16)):
    """At each batch size: the time to the first token (the vision tower and the prompt), then the
    tokens/s of greedy decoding after it (every row generates every token asked for), ours eager and
    with compile=True against transformers' generate (eager, its default DynamicCache), turn about.
    The compile's own cost (its first call) is reported apart. The share of the peak: the decode
    step's model FLOPs (2 per parameter of the LM body and head, and token) at the tokens/s reached.
    At most 5 repeats of each (after 2 warm-ups): a run at batch 16 takes seconds."""
    n, repeats = SIZES[size]["new_tokens"], min(repeats, 5)
    ours.eval(), reference.eval()
    questions = ["What color is the square?", "Describe the image.", "What is in the picture? Answer briefly.",
                 "Is the square red?"]
    lm = ours.language_model
    flops_per_token = 2 * (sum(p.numel() for p in lm.parameters()) - lm.get_input_embeddings().weight.numel())

    def inputs(batch):
        conversations = [[{"from": "human", "value": "<image>\n" + questions[i % len(questions)]}]
                         for i in range(batch)]
        return ours.prepare_batch(conversations, [Image.new("RGB", (64, 48), (200, 30, 30))] * batch)

    def ours_generates(batch, tokens, compile):
        ids, pixel_values, mask = inputs(batch)

        def run():
            steps = list(ours.generate(ids, pixel_values, mask, max_new_tokens=tokens, stop="", compile=compile))
            assert len(steps) == tokens
        return run

    def reference_generates(batch, tokens):
        ids, pixel_values, mask = inputs(batch)
        return lambda: reference.generate(input_ids=ids, pixel_values=pixel_values, attention_mask=mask,
                                          max_new_tokens=tokens, do_sample=False,
                                          eos_token_id=ours.tokenizer.eos_token_id,
                                          pad_token_id=ours.tokenizer.pad_token_id)

    for batch in batches:
        first_a, first_b = alternate(ours_generates(batch, 1, False), reference_generates(batch, 1), repeats)
        report(f"time to first token, batch {batch}", first_a, first_b)
        start = time.perf_counter()
        ours_generates(batch, n, True)()
        print(f"{'  compile, batch ' + str(batch):<28} {time.perf_counter() - start:.1f} s (its first call, once)")
        for compile in (False, True):
            a, b = alternate(ours_generates(batch, n, compile), reference_generates(batch, n), repeats)
            # Decoding alone: the n - 1 tokens after the first, in the time the first did not take.
            ours_rate = batch * (n - 1) / (statistics.median(a) - statistics.median(first_a))
            reference_rate = batch * (n - 1) / (statistics.median(b) - statistics.median(first_b))
            name = f"decoding, batch {batch}" + (", --compile" if compile else "")
            print(f"{name:<28} ours {ours_rate:.1f} tokens/s   transformers {reference_rate:.1f} tokens/s   "
                  f"ours/ref (tokens/s) {ours_rate / reference_rate:.2f}   "
                  f"peak share ours {100 * ours_rate * flops_per_token / peak:.1f}%")


def bench_data(ours, root, workers, n=256):
    """Samples/s through LazyDataset + collate with real JPEG decoding, at 224 and 336 px."""
    folder = os.path.join(root, "jpeg")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        pixels = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)  # COCO's size, noise: a hard JPEG
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}.jpg"), quality=90)
        samples.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown in the image?"},
            {"from": "gpt", "value": "A scene with many colors and shapes, " * 8}]})
    disk.write_json(os.path.join(root, "samples.json"), samples)
    for px in (224, 336):
        ours.image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": px},
                                                               crop_size={"height": px, "width": px})
        dataset = data.LazyDataset(os.path.join(root, "samples.json"), folder, ours)
        for w in (0, workers):
            loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=w,
                                                 collate_fn=lambda b: data.collate(b, ours.tokenizer.pad_token_id))
            start = time.perf_counter()
            count = sum(batch["input_ids"].shape[0] for batch in loader)
            print(f"{'data pipeline':<28} {px} px, {w} workers: {count / (time.perf_counter() - start):.0f} samples/s")


def bench_padding(n=20000, batch=16, seed=0):
    """Share of padded positions per batch: random batches against length-grouped ones, on a
    mix like LLaVA-1.5's (image samples: 576 visual tokens + text; a third text-only)."""
    rng = np.random.default_rng(seed)
    with_image = rng.random(n) < 0.67
    lengths = np.where(with_image, 576, 0) + rng.lognormal(5.0, 0.8, n).astype(int) + 20
    lengths = np.minimum(lengths, 2048)

    def padding(order):
        batches = [lengths[order[i:i + batch]] for i in range(0, n - batch + 1, batch)]
        return 1 - sum(b.sum() for b in batches) / sum(b.max() * len(b) for b in batches)

    random_order = rng.permutation(n)
    megabatch = 8 * batch  # as train.py --group-by-length: sort inside each global batch of 128
    grouped = np.concatenate([sorted(random_order[i:i + megabatch], key=lambda j: lengths[j])
                              for i in range(0, n, megabatch)])
    print(f"{'padding share':<28} random batches {100 * padding(random_order):.1f}%   "
          f"length-grouped within a global batch of {megabatch} {100 * padding(grouped):.1f}%")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="tiny")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--workers", type=int, default=2, help="data loader processes to compare with 0")
    p.add_argument("--profile", action="store_true", help="also profile our stage-2 training step")
    args = p.parse_args()
    torch.manual_seed(0)
    peak = matmul_peak()
    print(f"{args.size} models; {torch.get_num_threads()} threads; FP32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory() as root:
        ours, reference = make_models(args.size, root)
        for stage in (1, 2):
            bench_training(ours, reference, args.size, stage, args.repeats, peak)
        bench_generation(ours, reference, args.size, args.repeats, peak)
        if args.profile:
            print("where a stage-2 training step of ours spends its time:")
            profile_training(ours, args.size)
        bench_data(ours, root, args.workers)
    bench_padding()


if __name__ == "__main__":
    main()
