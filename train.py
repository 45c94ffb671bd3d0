"""§4.2 Training of "Visual Instruction Tuning" and its Appendix C: two stages.

    Stage 1, pre-training for feature alignment: only the projection W trains.
    Stage 2, end-to-end fine-tuning: W and the LLM train; the vision encoder stays frozen.

The toy demo, offline on a CPU (makes data and stand-in models, trains both stages, evaluates):
    python train.py --toy
One process (CPU, or one GPU):
    python train.py --stage 1 --data chat.json --image-folder images/
Many GPUs, one node or several (FSDP2, BF16):
    torchrun --nproc_per_node 8 train.py --stage 1
    torchrun --nproc_per_node 8 train.py --stage 2
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 train.py --stage 2
Resume an interrupted run exactly where it stopped: add --resume.
"""
import argparse
import itertools
import json
import math
import os
import shutil
import sys
import time
from functools import cache, partial

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, get_cosine_schedule_with_warmup)

import data
import llava

# ----------------------------------------------------------------------------------------------
# Settings. Defaults are the paper's (Appendix C); a stage's defaults fill what is not given.
# ----------------------------------------------------------------------------------------------

STAGE_DEFAULTS = {
    1: dict(lr=2e-3, global_batch=128, batch_size=16, epochs=1,
            data="data/LLaVA-CC3M-Pretrain-595K/chat.json", image_folder="data/LLaVA-CC3M-Pretrain-595K/images",
            out="out/stage1"),
    2: dict(lr=2e-5, global_batch=32, batch_size=4, epochs=3,
            data="data/llava_instruct_150k.json", image_folder="data/coco/train2017", out="out/stage2"),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="run the offline toy demo end to end")
    p.add_argument("--stage", type=int, choices=[1, 2], default=1, help="1: align W; 2: fine-tune W and the LLM")
    p.add_argument("--vision", default="openai/clip-vit-large-patch14", help="vision encoder g (hub id or dir)")
    p.add_argument("--llm", default="lmsys/vicuna-13b-v1.5", help="language model f_phi (hub id or dir)")
    p.add_argument("--projector-type", help="linear (the paper; the default) or mlp2x_gelu (LLaVA-1.5; the toy's)")
    p.add_argument("--projector", default="out/stage1", help="stage 2: the stage-1 output W starts from")
    p.add_argument("--feature-layer", type=int, default=-2, help="which vision layer gives Z_v (-2: penultimate)")
    p.add_argument("--template", default="paper", help="paper (###) or llava15 (USER:/ASSISTANT:)")
    p.add_argument("--data", help="LLaVA JSON file (stage 1: chat.json; stage 2: llava_instruct_150k.json)")
    p.add_argument("--image-folder", help="folder the samples' `image` paths are relative to")
    p.add_argument("--out", help="output directory (checkpoints, metrics.jsonl, the final model)")
    p.add_argument("--lr", type=float, help="peak learning rate (stage 1: 2e-3, stage 2: 2e-5)")
    p.add_argument("--global-batch", type=int, help="samples per optimizer step, all GPUs (128 / 32)")
    p.add_argument("--batch-size", type=int, help="samples per GPU per forward pass")
    p.add_argument("--epochs", type=float, help="passes over the data (1 / 3)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: epochs)")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warm-up share of the cosine schedule")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per sample at most")
    p.add_argument("--pad-to-square", action="store_true", help="LLaVA-1.5's padding of images to squares")
    p.add_argument("--group-by-length", action="store_true", help="sort each global batch by length: less padding")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="bf16 mixed precision (default on GPU) or fp32")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute LLM activations in backward")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (0: never)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--workers", type=int, default=4, help="data loader processes per GPU")
    p.add_argument("--strict-data", action="store_true", help="the first bad sample is fatal (default: skip)")
    p.add_argument("--seed", type=int, default=0, help="data order and initialization")
    p.add_argument("--no-stage1", action="store_true", help="toy: skip stage 1 (W starts random)")
    p.add_argument("--instruct", default="all", help="toy: stage 2's data, all three response types or conversation only")
    p.add_argument("--kill-after-step", type=int, default=None, help=argparse.SUPPRESS)  # tests: a crash
    p.add_argument("--kill-in-save", type=int, default=None, help=argparse.SUPPRESS)  # tests: crash mid-save
    args = p.parse_args(argv)
    args.projector_type = args.projector_type or ("mlp2x_gelu" if args.toy else "linear")
    for k, v in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------------------------
# One process or many: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK
# ----------------------------------------------------------------------------------------------

def setup_distributed():
    """(rank, world_size, device). Under torchrun: a process group (NCCL on GPUs, gloo on CPU)."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_sum(value):
    """Sum a number over all ranks (itself in one process)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor(float(value), dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shard(model, bf16):
    """FSDP2: each transformer layer is one shard group, the rest (embeddings, W, head) the root.

    Parameters are sharded across ranks and gathered for each layer's forward and backward.
    Frozen and trainable parameters may mix in a group (the per-parameter FSDP2 has no
    'uniform requires_grad' rule). BF16: compute in BF16, reduce gradients in FP32.
    """
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    # A CLIP tower's layers after the feature layer never run (llava.LLaVA.vision_features), and FSDP2
    # expects a group to take part in every forward: those layers stay in the root group.
    used = model.feature_layers()
    unused = set() if used is None else set(model.vision_tower.encoder.layers) - set(used)
    for tower in (model.vision_tower, model.language_model):
        layer_names = set(getattr(tower, "_no_split_modules", None) or [])  # e.g. LlamaDecoderLayer
        for module in tower.modules():
            if type(module).__name__ in layer_names and module not in unused:
                fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


# ----------------------------------------------------------------------------------------------
# Data order: the same global batches whatever the world size, and a position to resume from
# ----------------------------------------------------------------------------------------------

def micro_batches(n_samples, global_batch, batch_size, world_size, rank, start_step, total_steps, seed,
                  lengths=None):
    """Index lists for this rank's micro-batches, from start_step on.

    Step s of epoch e takes global batch s of a permutation seeded by (seed, e). Each global batch
    is cut into micro-batches of batch_size; rank r takes every world_size-th one. The gradient
    summed over all micro-batches of all ranks is the same for any world size.
    lengths: sort each global batch by length before cutting it (LLaVA-1.5's length grouping, inside
    one optimizer step so that the step's samples stay the same): less padding.
    """
    steps_per_epoch = n_samples // global_batch
    accumulation = global_batch // (batch_size * world_size)
    batches, permutation, epoch = [], None, None
    for step in range(start_step, total_steps):
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            permutation = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        chunk = permutation[(step % steps_per_epoch) * global_batch:][:global_batch].tolist()
        if lengths is not None:
            chunk.sort(key=lambda i: lengths[i])
        for a in range(accumulation):
            i = a * world_size + rank
            batches.append(chunk[i * batch_size:(i + 1) * batch_size])
    return batches


# ----------------------------------------------------------------------------------------------
# Checkpoints: sharded with torch.distributed.checkpoint, made visible only when complete
# ----------------------------------------------------------------------------------------------

def save_checkpoint(out, step, model, optimizer, scheduler, rank, keep, kill=False):
    """out/checkpoints/step_N: each rank writes its shards of the trainable weights and of Adam's
    state, and its RNG state; rank 0 then renames step_N.tmp to step_N and points `latest` at it.
    A crash before the rename leaves the previous checkpoint as the latest."""
    root = os.path.join(out, "checkpoints")
    final, tmp = os.path.join(root, f"step_{step:07d}"), os.path.join(root, f"step_{step:07d}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    options = StateDictOptions(ignore_frozen_params=True)  # the frozen weights are in their own files
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    dcp.save({"model": model_state, "optim": optim_state, f"rng_{rank}": torch.get_rng_state()},
             checkpoint_id=tmp)
    barrier()
    if kill:
        os._exit(3)  # tests: die with the new checkpoint half done
    if rank == 0:
        data.write_json(os.path.join(tmp, "meta.json"), {"step": step, "scheduler": scheduler.state_dict()})
        os.replace(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
        for old in done[:-keep]:
            shutil.rmtree(os.path.join(root, old))
    barrier()


def load_checkpoint(out, model, optimizer, scheduler, rank):
    """The step to continue from (0 if there is no checkpoint)."""
    root = os.path.join(out, "checkpoints")
    if not os.path.exists(os.path.join(root, "latest")):
        return 0
    with open(os.path.join(root, "latest")) as f:
        path = os.path.join(root, f.read().strip())
    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optim": optim_state, f"rng_{rank}": torch.get_rng_state()}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # frozen: not saved
    torch.set_rng_state(state[f"rng_{rank}"])
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    scheduler.load_state_dict(meta["scheduler"])
    return meta["step"]


# ----------------------------------------------------------------------------------------------
# §4.2: the two stages
# ----------------------------------------------------------------------------------------------

def train(args):
    rank, world_size, device = setup_distributed()
    master = rank == 0  # rank 0 alone logs, writes metrics and exports the model
    torch.manual_seed(args.seed)  # the same initial W on every rank
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    bf16 = (args.dtype or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    for path, flag in [(args.data, "--data"), (args.image_folder, "--image-folder")]:
        if not os.path.exists(path):
            sys.exit(f"train.py: {flag} {path} not found; pass {flag} (or try the offline demo: python train.py --toy)")
    if args.global_batch % (args.batch_size * world_size):
        sys.exit(f"train.py: --global-batch {args.global_batch} is not a multiple of --batch-size "
                 f"{args.batch_size} x {world_size} processes")
    accumulation = args.global_batch // (args.batch_size * world_size)  # gradient accumulation steps

    try:
        model = llava.build(args.vision, args.llm, args.projector_type, args.feature_layer, template=args.template)
    except OSError as e:
        sys.exit(f"train.py: cannot load --vision {args.vision} or --llm {args.llm}: {str(e).splitlines()[0]}")
    if args.stage == 1:
        # Stage 1: pre-training for feature alignment. g and f_phi frozen; only W trains.
        model.language_model.requires_grad_(False)
    else:
        # Stage 2: fine-tuning end to end. W and f_phi train; g stays frozen.
        if args.projector and args.projector != "none":
            llava.load_projector(model, args.projector)
    if args.grad_checkpointing:
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    if dist.is_initialized():
        shard(model, bf16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Adam without weight decay; cosine schedule with 3% warm-up (Appendix C). fused: one kernel for
    # all parameters instead of several per tensor (an optimizer step 3x faster on this CPU).
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0, fused=True)

    dataset = data.LazyDataset(args.data, args.image_folder, model, args.max_length, args.pad_to_square,
                               args.strict_data)
    steps_per_epoch = len(dataset) // args.global_batch
    if steps_per_epoch == 0:
        sys.exit(f"train.py: {args.data} has {len(dataset)} samples, fewer than --global-batch {args.global_batch}")
    total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)
    start_step = load_checkpoint(args.out, model, optimizer, scheduler, rank) if args.resume else 0

    batches = micro_batches(len(dataset), args.global_batch, args.batch_size, world_size, rank, start_step,
                            total_steps, args.seed, dataset.lengths() if args.group_by_length else None)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                              collate_fn=partial(data.collate, pad_id=model.tokenizer.pad_token_id),
                                              persistent_workers=False, prefetch_factor=4 if args.workers else None))
    if master:
        os.makedirs(args.out, exist_ok=True)
        n_trainable = sum(p.numel() for p in trainable)
        print(f"stage {args.stage}: {len(dataset)} samples, {total_steps} steps of {args.global_batch} "
              f"({world_size} processes x {args.batch_size} x {accumulation} accumulation), "
              f"{n_trainable / 1e6:.2f}M trainable parameters, {'bf16' if bf16 else 'fp32'} on {device.type}")
    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not master,
                    desc=f"stage {args.stage}", dynamic_ncols=True)
    skipped, t0 = 0, time.time()
    for step in progress:
        micro = [next(loader) for _ in range(accumulation)]
        # Every trained token of the global batch weighs the same: divide the summed loss by the
        # token count over all micro-batches and ranks. FSDP averages gradients over ranks, so
        # multiply by the world size to get a sum.
        n_tokens = max(all_sum(sum(int(llava.shifted_targets(b["labels"])[1].sum()) for b in micro)), 1)
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            if dist.is_initialized():  # reduce gradients once, after the last micro-batch
                model.set_requires_gradient_sync(i == accumulation - 1)
            skipped += batch["skipped"]
            if batch["input_ids"].shape[0] == 0:
                continue
            pixel_values = batch["pixel_values"].to(device) if batch["pixel_values"] is not None else None
            _, loss, _ = model(batch["input_ids"].to(device), pixel_values, batch["attention_mask"].to(device),
                               labels=batch["labels"].to(device), num_items=1)  # the summed token loss
            (loss * world_size / n_tokens).backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        loss_value = all_sum(loss_sum) / n_tokens
        if master:
            samples_per_s = (step + 1 - start_step) * args.global_batch / (time.time() - t0)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                 samples_s=f"{samples_per_s:.1f}")
            with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"stage": args.stage, "step": step + 1, "loss": loss_value,
                                    "lr": scheduler.get_last_lr()[0], "samples_per_s": samples_per_s,
                                    "skipped": skipped}) + "\n")
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < total_steps:
            save_checkpoint(args.out, step + 1, model, optimizer, scheduler, rank, args.keep,
                            kill=args.kill_in_save == step + 1)
        if args.kill_after_step == step + 1:
            os._exit(3)  # tests: a crash right after this step

    # Export: gather the full weights on rank 0. Stage 1 keeps W alone; stage 2 the whole model.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if master:
        if skipped:
            print(f"stage {args.stage}: skipped {skipped} bad samples (see the messages above)")
        if args.stage == 1:
            llava.save_projector(model, os.path.join(args.out, "projector.safetensors"),
                                 {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")})
        else:
            llava.save(model, os.path.join(args.out, "model"), state_dict=state)
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return model, loss_value


# ----------------------------------------------------------------------------------------------
# Toy stand-ins for CLIP ViT-L/14 and Vicuna
# ----------------------------------------------------------------------------------------------

def make_toy_tokenizer(texts, vocab_size=512):
    """A byte-level BPE tokenizer trained on `texts`, with LLaMA's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def make_toy_clip(path, image_size=32, patch_size=8, width=64, layers=3, heads=4, vocab_size=512, seed=0):
    """A small CLIP (vision and text towers) saved to `path` with its image processor."""
    torch.manual_seed(seed)
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                 num_attention_heads=heads)
    config = CLIPConfig(vision_config=dict(image_size=image_size, patch_size=patch_size, **tower),
                        text_config=dict(vocab_size=vocab_size, max_position_embeddings=64, pad_token_id=1,
                                         bos_token_id=2, eos_token_id=3, **tower),  # the toy tokenizer's ids
                        projection_dim=width)
    model = CLIPModel(config)
    # CLIP starts its position embeddings at std 0.02, far below what the patch embedding gives an
    # image; real CLIP learns them from 400M pairs, a stand-in has seconds. Started at the patches'
    # scale, where an object is stays readable from its visual token: after the toy demo's contrastive
    # pre-training, a linear probe on the frozen features finds an object's cell 99% to 100% of the
    # time, against 15% when started at 0.02.
    model.vision_model.embeddings.position_embedding.weight.data.normal_(std=0.6)
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return model


def make_toy_lm(path, tokenizer, width=64, layers=2, heads=4, seed=0, vocab_size=None):
    """A small LLaMA-architecture causal LM (the stand-in for Vicuna) saved with its tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False,
                         # LLaMA's 0.02 is about 1/sqrt(width) at width 4096. At width 128 it makes the
                         # attention start so flat that learning to read the image takes several times
                         # longer; 1/sqrt(width) is the same rule at this width.
                         initializer_range=width ** -0.5)
    model = LlamaForCausalLM(config)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


# ----------------------------------------------------------------------------------------------
# The toy demo: §3 to §5 in minutes on a CPU
# ----------------------------------------------------------------------------------------------

TOY = dict(n_images=2000, n_eval=500, image_size=48, patch_size=16,  # 3x3 grid: one cell, one patch
           lm_steps=3600)  # the LM stand-in reads 3600 x 16 fresh scenes
# What the LM stand-in reads: multiple-choice questions, and one time in five the brief caption that
# stage 1 aligns W with. A 4-layer LM learns to look things up in a scene only after some 30,000
# questions (multiple choice alone, exact cell words, 250 held-out questions, earlier answer forms:
# 75-82% after 16,000, 92% after 32,000, 96% after 48,000). Scenes in words cost nothing to make:
# every one is new, none a held-out one.
LM_READING = ["mc"] * 4 + ["brief"]
# Its questions: color 3 times in 8, count 2 in 8. "What color is the square?" (find the object by
# its shape alone, read its color) is the lookup this LM learns last, if at all: other listings start
# with the first object in reading order, and an LM that has not learned the lookup names the first
# object's color (given the held-out scenes in words: 88% right when the asked object came first,
# ~50% otherwise). With every category equally often, color came out 71% in one demo run and 95.5%
# in another differing only by float rounding; the LM alone, with another seed, 75%. With color 3
# in 7, that seed gave 98% and the demo color 100% but count 79%; counting twice as often too, the
# demo scores 96.7%, every category 92% or more.
LM_QUESTIONS = ["color"] * 3 + ["count"] * 2 + ["shape", "position", "existence"]


def pretrain_toy_clip(path, data_dir, tokenizer, n_images, steps=150, batch=128, lr=1e-3):
    """The CLIP stand-in: contrastive image-caption training (CLIP's own loss) on the toy world.

    Kept brief: in-batch captions differ mostly in colors, and longer training can wipe shape out of
    the patch features. After these 150 steps, linear probes on the frozen patch features of the toy
    demo's held-out images read color, shape, size and an object's cell 100% of the time."""
    model = make_toy_clip(path, TOY["image_size"], TOY["patch_size"], width=128, layers=3, heads=4,
                          vocab_size=len(tokenizer))
    processor = CLIPImageProcessor.from_pretrained(path)
    reps = data.load_json(os.path.join(data_dir, "symbolic.json"))[:n_images]  # training images only
    pixels = processor(images=[data.load_image(os.path.join(data_dir, "images", r["image"])) for r in reps],
                       return_tensors="pt")["pixel_values"]  # (N, 3, H, W)
    text = tokenizer([r["captions"][1] + tokenizer.eos_token for r in reps], padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    # A 10% warm-up. Started at full lr, the loss stayed near chance (ln 128 = 4.85; ended 4.15 to
    # 4.85) in 3 of 6 runs, the toy tokenizer and the seed decide which; with it, 0.47 to 0.74 in 6 of 6.
    scheduler = get_cosine_schedule_with_warmup(optimizer, steps // 10, steps)
    generator = torch.Generator().manual_seed(0)
    for _ in tqdm(range(steps), desc="CLIP stand-in", dynamic_ncols=True):
        idx = torch.randperm(len(reps), generator=generator)[:batch]
        loss = model(input_ids=text["input_ids"][idx], attention_mask=text["attention_mask"][idx],
                     pixel_values=pixels[idx], return_loss=True).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    return loss.item()


def scene_words(objects):
    """How the LM stand-in is shown a scene: for each grid cell, in the order of the visual tokens
    (row by row), the words that say what is there."""
    cells = [f"nothing {data.ROWS[r]} {data.COLS[c]}" for r in range(data.GRID) for c in range(data.GRID)]
    for o in objects:
        cells[o["row"] * data.GRID + o["col"]] = (f"{o['size']} {o['color']} {o['shape']} "
                                                  f"{data.ROWS[o['row']]} {data.COLS[o['col']]}")
    return cells


def toy_reading(seed, kinds, avoid=(), min_objects=2):
    """What the LM stand-in reads, without end: a fresh scene in words (`scene_words`) and one
    conversation about it, of a kind drawn from `kinds` ("mc" or a teacher's response type). Scenes
    in `avoid` (tuples of cell words: the held-out images) are skipped: the evaluation stays unseen.

    Multiple-choice questions come with scenes of at least `min_objects` objects. With one object,
    "What color is the square?" is answered by any color the scene holds; an LM that reads such
    questions too (40% of the color questions) often settles for the color of some object rather
    than learning to find the asked one: its answers then attend to every object alike. Given the
    scenes in words (no vision), color questions: 72-76% right in 4 runs of 5 with every scene,
    100%, 95%, 81% and 76% in 4 runs with 2 or 3 objects. Better, not solved. Captions keep scenes
    of every size: stage 1 shows them all."""
    import random
    rng = random.Random(seed)
    while True:
        kind = rng.choice(kinds)
        objects = data.toy_scene(rng)
        while kind == "mc" and len(objects) < min_objects:
            objects = data.toy_scene(rng)
        cells = scene_words(objects)
        if tuple(cells) in avoid:
            continue
        if kind == "mc":
            mc = data.mc_sample(objects, rng.choice(LM_QUESTIONS), rng)
            if mc is None:  # this scene cannot ask that question
                continue
            yield mc["conversations"], cells
        else:
            yield data.teacher(data.symbolic(objects), kind, rng), cells


@cache  # a few hundred cells ("nothing top left", "large red circle top left", ...) read again and again
def cell_ids(tokenizer, cell):
    return data.encode_text(tokenizer, " " + cell)


def scene_rows(tokenizer, pairs):
    """(conversations, cell words) pairs rendered: (ids, labels, the ids of each cell's words)."""
    rows = []
    for conversations, cells in pairs:
        ids, labels = data.render(conversations, tokenizer, "paper", tokenizer.unk_token_id, data.GRID ** 2)
        words = [cell_ids(tokenizer, cell) for cell in cells]
        rows.append((torch.tensor(ids), torch.tensor(labels), words))
    return rows


def scene_inputs(model, tokenizer, rows, noise=0.0):
    """A batch for the LM alone: word embeddings, and at the 9 image positions (held by the
    placeholder <unk>) the sum of the word embeddings of the cell, plus Gaussian noise of std `noise`.
    Returns the LM's keyword arguments."""
    embed = model.get_input_embeddings()
    pad = partial(torch.nn.utils.rnn.pad_sequence, batch_first=True)
    ids = pad([r[0] for r in rows], padding_value=tokenizer.pad_token_id)  # (B, T)
    word_ids = pad([torch.tensor(w) for r in rows for w in r[2]], padding_value=-1)  # (B*9, L) words per cell
    cell_embeds = (embed(word_ids.clamp(min=0)) * (word_ids >= 0).unsqueeze(-1)).sum(1)  # (B*9, D)
    cell_embeds = cell_embeds + noise * torch.randn_like(cell_embeds)
    inputs = embed(ids).masked_scatter((ids == tokenizer.unk_token_id).unsqueeze(-1), cell_embeds)  # (B, T, D)
    return dict(inputs_embeds=inputs, attention_mask=(ids != tokenizer.pad_token_id).long(),
                labels=pad([r[1] for r in rows], padding_value=data.IGNORE))


def pretrain_toy_lm(path, tokenizer, reading, steps=1000, batch=16, lr=1e-3, noise=0.1):
    """The Vicuna stand-in: a causal LM trained on toy conversations, in the chat template, with the
    scene written in words where the image will be. Vicuna has read about the world; this LM has
    read about the toy world: each of the 9 image positions holds the sum of the word embeddings of
    its cell ("large red circle top left"). `reading` yields (conversations, cell words) pairs.
    Stage 1 then has a clear job: make W turn each patch's features into what the LM reads there,
    the paper's "visual tokenizer for the frozen LLM".

    The cells are read through noise (std 0.1 a dimension; a cell's words sum to a norm of about 2).
    An LM that only ever saw exact sums reads them through directions stage 1's captions never
    constrain: W then captions well but answers questions near chance (30% held-out with W alone,
    no stage 2). Read through noise, the LM leans on the words' own directions, and the same
    stage 1 gives 67%."""
    model = make_toy_lm(path, tokenizer, width=128, layers=4, heads=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(0.03 * steps), steps)
    for _ in tqdm(range(steps), desc="LM stand-in", dynamic_ncols=True):
        rows = scene_rows(tokenizer, itertools.islice(reading, batch))
        inputs = scene_inputs(model, tokenizer, rows, noise)
        # Logits only where a token is trained (the answers), as llava.py does: the head and its
        # softmax over every position were a tenth of this loop's time.
        targets, keep = llava.shifted_targets(inputs.pop("labels"))  # (B, T) each
        logits = model(**inputs, logits_to_keep=keep).logits  # (N, V), N trained positions
        loss = torch.nn.functional.cross_entropy(logits, targets[keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    return loss.item()


def toy_demo(args):
    """Data (§3), stand-ins for CLIP and Vicuna, stage 1 and stage 2 (§4.2), evaluation (§5)."""
    import eval as evaluation
    out = args.out if args.out != STAGE_DEFAULTS[args.stage]["out"] else "out/toy"
    start = time.time()
    data_dir = os.path.join(out, "data")
    print(f"[1/5] the toy world (§3) -> {data_dir}")
    sizes = data.make_toy_world(data_dir, TOY["n_images"], TOY["n_eval"], mc_per_image=2, seed=args.seed)
    print("      " + ", ".join(f"{k}: {v}" for k, v in sizes.items()))

    stage2_data = os.path.join(data_dir, "instruct.json")
    if args.instruct == "conversation":  # ablation: conversation data only (and the MC training questions)
        stage2_data = os.path.join(data_dir, "instruct_conversation.json")
        data.write_json(stage2_data, data.load_json(os.path.join(data_dir, "conversation.json")) +
                        data.load_json(os.path.join(data_dir, "mc_train.json")))

    print("[2/5] stand-ins for CLIP ViT-L/14 and Vicuna")
    # The tokenizer learns the words of all the toy world's training text, whatever stage 2 reads:
    # the stand-ins are the same, bit for bit, in every ablation. (Trained on the conversation-only
    # set instead, the tokenizer changed, and so did the CLIP stand-in: contrastive loss 4.85 against
    # 0.57, 80.1% held-out.)
    instruct = data.load_json(os.path.join(data_dir, "instruct.json"))
    stage1 = data.load_json(os.path.join(data_dir, "stage1.json"))
    # The system message comes with every sample: weighted so that BPE gives it few tokens.
    texts = [t.system for t in data.TEMPLATES.values()] * 500 + [
        turn["value"] for s in instruct + stage1 for turn in s["conversations"]]
    tokenizer = make_toy_tokenizer(texts, vocab_size=1024)
    clip_loss = pretrain_toy_clip(os.path.join(out, "clip"), data_dir, tokenizer, TOY["n_images"])
    held_out = {tuple(scene_words(data.parse_boxes(r["boxes"])))
                for r in data.load_json(os.path.join(data_dir, "symbolic.json"))[TOY["n_images"]:]}
    reading = toy_reading(args.seed + 1, LM_READING, avoid=held_out)
    lm_loss = pretrain_toy_lm(os.path.join(out, "lm"), tokenizer, reading, steps=TOY["lm_steps"])
    print(f"      CLIP contrastive loss {clip_loss:.3f}, LM loss {lm_loss:.3f}")

    common = ["--vision", os.path.join(out, "clip"), "--llm", os.path.join(out, "lm"),
              "--image-folder", os.path.join(data_dir, "images"), "--projector-type", args.projector_type,
              "--feature-layer", str(args.feature_layer), "--template", "paper", "--workers", "0",
              "--checkpoint-every", "0", "--seed", str(args.seed)]
    if not args.no_stage1:
        print("[3/5] stage 1: pre-training for feature alignment (W only)")
        # The paper's lr; W learns only through the frozen LM, and on 2,000 captions it needs many
        # small steps: batch 8 for 6 epochs (1,500 steps). On the same stand-ins, batch 32 for 3
        # epochs ended at caption loss 0.39, this at 0.20. Held-out accuracy follows this loss: in
        # 16 demo runs, a last-step loss over 0.35 went with 52-66%, 0.24 with 70%, under 0.21
        # with 79-92%.
        train(get_args(["--stage", "1", "--data", os.path.join(data_dir, "stage1.json"), "--out",
                        os.path.join(out, "stage1"), "--lr", "2e-3", "--global-batch", "8", "--batch-size", "8",
                        "--epochs", "6"] + common))
    else:
        print("[3/5] stage 1 skipped (--no-stage1): W starts random")
    print("[4/5] stage 2: fine-tuning end to end (W and the LLM)")
    # Stage 2 teaches the LM to read the scene from W's visual tokens instead of words, and the other
    # response types. One epoch, so that the LM stand-in can read 3,600 steps within 10 minutes: in
    # trials of a near recipe, 3,200 steps and 1 epoch scored 89.4% and 90.7% held-out, 2,200 steps
    # and 2 epochs 88.9%.
    train(get_args(["--stage", "2", "--data", stage2_data, "--out", os.path.join(out, "stage2"),
                    "--projector", "none" if args.no_stage1 else os.path.join(out, "stage1"),
                    "--lr", "1e-3", "--global-batch", "16", "--batch-size", "16", "--epochs", "1"] + common))

    print("[5/5] evaluation (§5): held-out multiple choice, by category")
    model = llava.load(os.path.join(out, "stage2", "model"))
    questions = data.load_json(os.path.join(data_dir, "eval.json"))
    results, rows = evaluation.evaluate_mc(model, questions, os.path.join(data_dir, "images"), progress=True)
    blind, _ = evaluation.evaluate_mc(model, questions, os.path.join(data_dir, "images"), blank=True, progress=True)
    print(evaluation.table(results, blind))
    minutes = (time.time() - start) / 60
    data.write_json(os.path.join(out, "results.json"), {"results": results, "blind": blind, "minutes": minutes,
                                                        "outputs": rows})
    print(f"done in {minutes:.1f} min. Chat with it: python chat.py {os.path.join(data_dir, 'images', questions[0]['image'])}")
    return results, blind


if __name__ == "__main__":
    args = get_args()
    toy_demo(args) if args.toy else train(args)
    if "RANK" in os.environ:  # under torchrun: everything is saved and the process group destroyed, so leave
        # now. DTensor's caches keep FSDP's device mesh, and with it gloo's worker threads, alive after
        # destroy_process_group; tearing them down during interpreter exit can abort a finished run
        # ("terminate called without an active exception", which torchrun reports as a failure; seen once
        # in CI on CPU). os._exit skips that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
