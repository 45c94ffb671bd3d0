"""§4.2 Training of "Visual Instruction Tuning" and its Appendix C: two stages.

    Stage 1, pre-training for feature alignment: only the projection W trains.
    Stage 2, end-to-end fine-tuning: W and the LLM train; the vision encoder stays frozen.

One process (CPU, or one GPU):
    python train.py --stage 1 --data chat.json --image-folder images/
Many GPUs, one node or several (FSDP2, BF16):
    torchrun --nproc_per_node 8 train.py --stage 1
    torchrun --nproc_per_node 8 train.py --stage 2
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 train.py --stage 2
Resume an interrupted run exactly where it stopped: add --resume.
"""
import argparse
import contextlib
import datetime
import errno
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from safetensors import SafetensorError
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

import checkpoints
import cli
import data
import disk
import distributed
import formats
import llava
import sample_checks

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
    count, natural, positive = cli.number(int, 1), cli.number(int, 0), cli.number(float, 0, above=True)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=[1, 2], default=1, help="1: align W; 2: fine-tune W and the LLM")
    p.add_argument("--vision", default="openai/clip-vit-large-patch14", help="vision encoder g (hub id or dir)")
    p.add_argument("--llm", default="lmsys/vicuna-13b-v1.5", help="language model f_phi (hub id or dir)")
    p.add_argument("--projector-type", choices=["linear", "mlp2x_gelu"],
                   help="linear (the paper; the default) or mlp2x_gelu (LLaVA-1.5; the toy's)")
    p.add_argument("--projector", default="out/stage1",
                   help="stage 2: the stage-1 output W starts from, or random (stage 1 skipped)")
    p.add_argument("--feature-layer", type=int, default=-2, help="which vision layer gives Z_v (-2: penultimate)")
    p.add_argument("--template", default="paper", choices=list(data.TEMPLATES),
                   help="paper (###) or llava15 (USER:/ASSISTANT:)")
    p.add_argument("--data", help="LLaVA JSON file (stage 1: chat.json; stage 2: llava_instruct_150k.json)")
    p.add_argument("--image-folder", help="folder the samples' `image` paths are relative to")
    p.add_argument("--out", help="output directory (checkpoints, metrics.jsonl, the final model)")
    p.add_argument("--lr", type=positive, help="peak learning rate (stage 1: 2e-3, stage 2: 2e-5)")
    p.add_argument("--global-batch", type=count, help="samples per optimizer step, all GPUs (128 / 32)")
    p.add_argument("--batch-size", type=count, help="samples per GPU per forward pass")
    p.add_argument("--epochs", type=positive, help="passes over the data (1 / 3)")
    p.add_argument("--max-steps", type=count, default=None, help="stop after this many steps (default: epochs)")
    p.add_argument("--warmup-ratio", type=cli.number(float, 0, 1), default=0.03,
                   help="linear warm-up share of the cosine schedule")
    p.add_argument("--grad-clip", type=cli.number(float, 0), default=1.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--max-length", type=count, default=2048, help="tokens per sample at most")
    p.add_argument("--pad-to-square", action="store_true", help="LLaVA-1.5's padding of images to squares")
    p.add_argument("--group-by-length", action="store_true", help="sort each global batch by length: less padding")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="bf16 mixed precision (default on GPU) or fp32")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute LLM activations in backward")
    p.add_argument("--checkpoint-every", type=natural, default=500, help="steps between checkpoints (0: never)")
    p.add_argument("--keep", type=count, default=2, help="checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--workers", type=natural, default=4, help="data loader processes per GPU")
    p.add_argument("--strict-data", action="store_true", help="the first bad sample is fatal (default: skip)")
    p.add_argument("--seed", type=int, default=0, help="data order and initialization")
    p.add_argument("--timeout", type=positive, default=30,
                   help="torchrun: minutes a process waits for the others (rank 0 reading or writing the "
                        "weights is the longest wait) before the run stops")
    p.add_argument("--kill-after-step", type=int, default=None, help=argparse.SUPPRESS)  # tests: a crash
    p.add_argument("--kill-in-save", type=int, default=None, help=argparse.SUPPRESS)  # tests: crash mid-save
    args = p.parse_args(argv)
    args.projector_type = args.projector_type or "linear"
    for k, v in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------------------------
# One process or many: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK
# ----------------------------------------------------------------------------------------------

def setup_distributed(timeout=30):
    """(rank, world_size, device). Under torchrun: a process group (NCCL on GPUs, gloo on CPU) whose
    collectives wait `timeout` minutes for a rank that stalls."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=timeout))
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
    """FSDP2: each decoder layer of the LLM is one shard group; the rest (the vision tower, W, the
    embeddings and the head) is the root group. A group's parameters are sharded across ranks and
    gathered for its forward and backward; its gradients are reduce-scattered, so that each rank
    keeps only its shard, also while gradients accumulate over micro-batches. The vision tower is
    gathered with the root at every step: a rank whose batch holds no image then takes part in the
    same collectives as the others. BF16: compute in BF16, reduce gradients in FP32."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    layer_names = set(model.language_model._no_split_modules or [])  # e.g. LlamaDecoderLayer
    for module in model.language_model.modules():
        if type(module).__name__ in layer_names:
            fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def load_model(args, rank, device, bf16):
    """g, W and f_phi for this stage, sharded under torchrun.

    Weights that train (and so Adam's state) are FP32; frozen towers are kept in BF16 when the
    compute is BF16. Only rank 0 reads the checkpoints: every rank builds the model on the meta
    device (no memory), shards it, and receives its shards of rank 0's weights. Host memory holds
    one copy, and no GPU ever holds a full replica.
    """
    frozen = torch.bfloat16 if bf16 else torch.float32
    options = dict(projector=args.projector_type, feature_layer=args.feature_layer, template=args.template,
                   dtype=torch.float32 if args.stage == 2 else frozen, vision_dtype=frozen)
    weights = None
    if rank == 0:
        weights = llava.build(args.vision, args.llm, **options)  # W: random, seeded
        if args.stage == 2 and args.projector != "random":  # random: stage 1 skipped
            formats.load_projector(weights, args.projector)  # W from stage 1
    if dist.is_initialized():
        with torch.device("meta"):
            model = llava.build(args.vision, args.llm, empty=True, **options)
    else:
        model = weights
    if args.stage == 1:  # stage 1, pre-training for feature alignment: only W trains
        model.language_model.requires_grad_(False)
    # (stage 2, fine-tuning end to end: W and f_phi train; g is always frozen)
    if args.grad_checkpointing:
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not dist.is_initialized():
        return model.to(device).train()
    shard(model, bf16)
    model.to_empty(device=device)
    set_model_state_dict(model, weights.state_dict() if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buffer in model.named_buffers():  # computed, not saved (rotary frequencies, position ids)
        if rank == 0:
            buffer.copy_(weights.get_buffer(name))
        dist.broadcast(buffer, src=0)
    return model.train()


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

@contextlib.contextmanager
def ctrl_c_waits():
    """A Ctrl-C while files are written waits for the writing to end, then stops the run: a checkpoint
    or an export is never left half written (torch's writer would turn the interrupt into its own error)."""
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt




def save_checkpoint(out, step, model, optimizer, scheduler, rank, keep, kill=False):
    """out/checkpoints/step_N: each rank writes its shards of the trainable weights and of Adam's
    state, and its RNG state; rank 0 then renames step_N.tmp to step_N and points `latest` at it.
    A crash before the rename leaves the previous checkpoint as the latest."""
    root = os.path.join(out, "checkpoints")
    final, tmp = os.path.join(root, f"step_{step:07d}"), os.path.join(root, f"step_{step:07d}.tmp")
    try:
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
            disk.write_json(os.path.join(tmp, "meta.json"), {"step": step, "scheduler": scheduler.state_dict()})
            # A run resumed from an earlier checkpoint writes this step again: the folder left by the first
            # try (damaged, or complete but never named latest) goes; latest never names it.
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            with open(os.path.join(root, "latest.tmp"), "w") as f:
                f.write(os.path.basename(final))
            os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    except (Exception, CheckpointException) as e:  # DCP's error of every rank: torch's text, from C++
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.remove(os.path.join(root, "latest.tmp"))
        errors = [x for x in checkpoints.causes(e) if isinstance(x, OSError)]
        why = ("the disk is full" if any(x.errno == errno.ENOSPC for x in errors)
               else cli.one_line(errors[0]) if errors else cli.one_line(checkpoints.causes(e)[-1]))
        fail(f"step {step}: cannot write the checkpoint {os.path.basename(final)} in {root} ({why}); its .tmp "
             f"is removed, and {kept(out)}. Free space (or pass a smaller --keep), then run the same command "
             f"with --resume")
    if rank == 0:
        # Only the folders this run writes rotate: a user's copy (step_0000002.bak) is the user's.
        done = sorted((d for d in os.listdir(root) if checkpoints.STEP_FOLDER.fullmatch(d)),
                      key=lambda d: int(d[5:]))
        for old in done[:-keep]:
            shutil.rmtree(os.path.join(root, old))
    barrier()


def load_checkpoint(out, checkpoint, model, optimizer, scheduler, rank):
    """The step to continue from. A run resumed on another number of processes gets its weights and
    Adam's state resharded by DCP; a rank that had no RNG state keeps its seed."""
    path, metadata = checkpoint
    if path is None:
        if rank == 0:
            print(f"--resume: no checkpoint in {out} yet; the run starts again from step 0")
        return 0
    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optim": optim_state}
    if f"rng_{rank}" in metadata.state_dict_metadata:
        state[f"rng_{rank}"] = torch.get_rng_state()
    try:
        dcp.load(state, storage_reader=checkpoints.CheckedReader(path, metadata))
    except (Exception, CheckpointException) as e:  # DCP wraps what failed (bytes damaged in a shard) in its own
        fail(f"--resume: cannot read the checkpoint {path} ({cli.one_line(checkpoints.causes(e)[-1])}); point "
             f"{os.path.join(out, 'checkpoints', 'latest')} at an earlier step_* folder, or start a new --out")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # frozen: not saved
    if f"rng_{rank}" in state:
        torch.set_rng_state(state[f"rng_{rank}"])
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    scheduler.load_state_dict(meta["scheduler"])
    return meta["step"]


# What a resumed run must share with the run it continues; any other flag may change.
RUN_SETTINGS = ["stage", "vision", "llm", "projector_type", "feature_layer", "template", "data", "lr", "global_batch",
                "epochs", "max_steps", "warmup_ratio", "grad_clip", "max_length", "pad_to_square", "group_by_length",
                "seed"]


def check_out(args, rank):
    """A new run needs an --out of its own: it never mixes its metrics and checkpoints with another
    run's, nor replaces another run's model. --resume continues the run in --out, on its settings.
    A run that stopped before its first step left only run.json: a new run may take its place."""
    run_file = os.path.join(args.out, "run.json")
    settings = {k: getattr(args, k) for k in RUN_SETTINGS}
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f"--out {args.out} is a file; pass a directory")
    if args.resume and not os.path.isdir(args.out):
        fail(f"--resume: {args.out} holds no run to resume; start without --resume")
    # One run at a time in --out, from here to the end: another one that starts while this one loads
    # its model would pass the checks below. Rank 0 holds it for all ranks (one node or several).
    # It makes --out: a read-only or missing place fails now, before any work.
    if rank == 0:
        disk.hold_lock(args.out, "train.py")
    if args.resume:
        if not os.path.exists(run_file):
            fail(f"--resume: {args.out} holds no run to resume; start without --resume")
        with open(run_file) as f:
            saved = json.load(f)
        for k, v in settings.items():
            if saved.get(k) != v:
                fail(f"--resume: --{k.replace('_', '-')} {v} differs from the run in {args.out} "
                     f"({saved.get(k)}); resume with the same settings or start a new --out")
        return saved
    used = [f for f in ("metrics.jsonl", "checkpoints", "model", "projector.safetensors")
            if os.path.exists(os.path.join(args.out, f))]
    if used:
        fail(f"--out {args.out} already holds a run ({used[0]}); pass --resume to continue it, or another --out")
    barrier()  # every rank has looked before rank 0 writes
    return settings


def input_fingerprints(args):
    """The content of the inputs at the run's paths (disk.content_fingerprint): the --data file, hashed
    whole, and the weight, config and tokenizer files of --vision and --llm."""
    inputs = {"data": {os.path.basename(args.data): disk.content_fingerprint(args.data, whole=math.inf)}}
    for flag in ("vision", "llm"):
        folder = formats.resolve(getattr(args, flag))
        files = set(formats.checkpoint_files(folder)) | {os.path.join(folder, f) for f in os.listdir(folder)
                                                        if f.endswith((".json", ".model", ".txt"))}
        inputs[flag] = {os.path.basename(f): disk.content_fingerprint(f) for f in sorted(files) if os.path.isfile(f)}
    return inputs


def check_inputs(args, saved, now):
    """Why a resumed run cannot go on with the inputs it finds (None: it can): one named in run.json has
    other content now. run.json written before it recorded the inputs: they go unchecked, and it says so."""
    if saved is None:
        print(f"--resume: {args.out}/run.json records no fingerprint of the inputs (an older train.py wrote it); "
              f"whether --data, --vision and --llm changed is not checked")
        return None
    for flag, files in now.items():
        for name in sorted(set(files) | set(saved.get(flag, {}))):
            then, found = saved.get(flag, {}).get(name), files.get(name)
            if then != found:
                what = "is new" if then is None else "is gone" if found is None else "has other content"
                return (f"--resume: --{flag} {getattr(args, flag)} changed since the run in {args.out} started "
                        f"({name} {what}); resume with the inputs it started from, or start a new --out")
    return None


def fail(message):
    """A user's mistake: one line naming the flag or file and what to do, and a non-zero exit."""
    raise SystemExit(f"train.py: {message}")


# ----------------------------------------------------------------------------------------------
# §4.2: the two stages
# ----------------------------------------------------------------------------------------------

def train(args):
    rank, world_size, device = setup_distributed(args.timeout)
    master = rank == 0  # rank 0 alone logs, writes metrics and exports the model
    torch.manual_seed(args.seed)  # the same initial W on every rank
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    bf16 = (args.dtype or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    for path, flag in [(args.data, "--data"), (args.image_folder, "--image-folder")]:
        if not os.path.exists(path):
            fail(f"{flag} {path} not found; pass {flag} (or try the offline demo: python toy.py)")
    samples = disk.load_json(args.data)  # what can be checked is checked before the model loads
    sample_checks.check_images(samples, args.image_folder, args.data)
    if len(samples) < args.global_batch:
        fail(f"{args.data} has {len(samples)} samples, fewer than --global-batch {args.global_batch}")
    if args.global_batch % (args.batch_size * world_size):
        fail(f"--global-batch {args.global_batch} is not a multiple of --batch-size {args.batch_size} "
             f"x {world_size} processes")
    accumulation = args.global_batch // (args.batch_size * world_size)  # gradient accumulation steps
    run = check_out(args, rank)  # its settings; resumed: as run.json has them
    if world_size > 1:  # so that a rank left waiting in a collective can name the one that went silent
        distributed.heartbeat(args.out, rank, every=min(10.0, args.timeout * 60 / 4))
    checkpoint = checkpoints.find_checkpoint(args.out) if args.resume else None

    try:
        model = load_model(args, rank, device, bf16)
    except (OSError, ValueError, SafetensorError) as e:  # missing, corrupt, swapped, made for other models
        fail(f"cannot build the model (--vision, --llm, --projector): {cli.one_line(e)}")
    loaded_peak = peak_host_memory()
    inputs = input_fingerprints(args) if master else None  # rank 0 alone has read the weights
    problem = check_inputs(args, run.get("inputs"), inputs) if master and args.resume else None
    if all_sum(problem is not None):  # every rank stops together
        fail(problem or f"rank {rank}: rank 0 refuses to resume (see its message)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Adam without weight decay; cosine schedule with 3% warm-up (Appendix C). fused: one kernel for
    # all parameters instead of several per tensor.
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0, fused=True)
    # One process in BF16: autocast computes in BF16 from the FP32 weights (under FSDP, its mixed
    # precision policy does the same).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not dist.is_initialized())

    dataset = data.LazyDataset(args.data, args.image_folder, model, args.max_length, args.pad_to_square,
                               samples=samples)
    steps_per_epoch = len(dataset) // args.global_batch
    total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)
    start_step = load_checkpoint(args.out, checkpoint, model, optimizer, scheduler, rank) if args.resume else 0
    if master and not args.resume:
        # The run starts: its settings and its inputs' content stay.
        disk.write_json(os.path.join(args.out, "run.json"), dict(run, inputs=inputs))
    if master and args.resume:  # the metrics of steps after the checkpoint are written again
        rows = [r for r in disk.read_jsonl(os.path.join(args.out, "metrics.jsonl")) if r["step"] <= start_step]
        with open(os.path.join(args.out, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    batches = micro_batches(len(dataset), args.global_batch, args.batch_size, world_size, rank, start_step,
                            total_steps, args.seed, dataset.lengths() if args.group_by_length else None)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                              collate_fn=partial(data.collate, pad_id=model.tokenizer.pad_token_id),
                                              persistent_workers=False, prefetch_factor=4 if args.workers else None))
    if master:
        n_trainable = sum(p.numel() for p in trainable)
        print(f"stage {args.stage}: {len(dataset)} samples, {total_steps} steps of {args.global_batch} "
              f"({world_size} processes x {args.batch_size} x {accumulation} accumulation), "
              f"{n_trainable / 1e6:.2f}M trainable parameters, {'bf16' if bf16 else 'fp32'} on {device.type}")
    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not master,
                    desc=f"stage {args.stage}", dynamic_ncols=True)
    skipped, t0, loss_value = 0, time.time(), float("nan")
    for step in progress:
        micro = [next(loader) for _ in range(accumulation)]
        # Every trained token of the global batch weighs the same: divide the summed loss by the
        # token count over all micro-batches and ranks. FSDP averages gradients over ranks, so
        # multiply by the world size to get a sum.
        n_tokens = all_sum(sum(int(llava.shifted_targets(b["labels"])[1].sum()) for b in micro))
        bad = int(all_sum(sum(b["skipped"] for b in micro)))  # every rank knows, so all of them stop together
        if bad and args.strict_data:
            fail(f"--strict-data: step {step + 1} holds the bad sample named above; fix it or leave out --strict-data")
        if n_tokens == 0:  # every rank sees the same count, so all of them stop here
            fail(f"step {step + 1}: no sample of the global batch can be trained on (see the messages above); "
                 f"check --data, --image-folder and --max-length. Nothing was saved.")
        loss_sum = accumulate(model, micro, n_tokens, world_size, device, autocast)
        skipped += bad
        # The loss and the gradient norm are read once a step, before the weights change; both are
        # reduced over the ranks, so a NaN or inf stops every rank at the same step.
        norm = gradient_norm(trainable, args.grad_clip)
        loss_value = all_sum(loss_sum) / n_tokens
        if not (math.isfinite(loss_value) and math.isfinite(norm)):
            fail(f"step {step + 1}: the loss is {loss_value:g} and the gradient norm {norm:g}; the run stops "
                 f"before this step changes the weights, and exports nothing ({kept(args.out)}). Try a lower "
                 f"--lr, or check the --llm and --projector weights for NaN or inf")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        if master:
            samples_per_s = (step + 1 - start_step) * args.global_batch / (time.time() - t0)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                 samples_s=f"{samples_per_s:.1f}")
            disk.append_jsonl(os.path.join(args.out, "metrics.jsonl"), {
                "stage": args.stage, "step": step + 1, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                "samples_per_s": samples_per_s, "skipped": skipped})
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < total_steps:
            with ctrl_c_waits():
                save_checkpoint(args.out, step + 1, model, optimizer, scheduler, rank, args.keep,
                                kill=args.kill_in_save == step + 1)
        if args.kill_after_step == step + 1:
            os._exit(3)  # tests: a crash right after this step

    with ctrl_c_waits():
        export(model, args, rank, torch.bfloat16 if bf16 and args.stage == 2 else torch.float32)  # W alone: FP32
    if master and skipped:
        print(f"stage {args.stage}: skipped {skipped} bad samples (see the messages above)")
    print(f"rank {rank}: peak host memory {peak_host_memory():.0f} MiB ({loaded_peak:.0f} MiB once the model was "
          f"loaded)", file=sys.stderr)
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return model, loss_value


def accumulate(model, micro_batches, n_tokens, world_size, device, autocast):
    """Forward and backward over this rank's micro-batches; gradients add up in .grad. Under FSDP each
    backward reduce-scatters at once, so each rank accumulates only its shard of the gradients.
    Every rank runs as many micro-batches as the others: the collectives stay in step.
    Returns the summed token loss."""
    loss_sum = 0.0
    for batch in micro_batches:
        pixel_values = batch["pixel_values"].to(device) if batch["pixel_values"] is not None else None
        with autocast:
            _, loss = model(batch["input_ids"].to(device), pixel_values, batch["attention_mask"].to(device),
                            labels=batch["labels"].to(device), reduction="sum")
        (loss * world_size / n_tokens).backward()
        loss_sum += loss.item()
    return loss_sum


def gradient_norm(parameters, clip):
    """The norm of the gradients of all ranks together, the same number on every rank; the gradients
    are clipped to `clip` when it is above 0."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, clip if clip > 0 else math.inf)  # inf: scaled by 1
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def kept(out):
    """What a run that stops now leaves to resume from."""
    latest = os.path.join(out, "checkpoints", "latest")
    if not os.path.exists(latest):
        return "no checkpoint was written yet"
    with open(latest) as f:
        return f"its last checkpoint, {f.read().strip()}, is kept for --resume"


def peak_host_memory():
    """This process's peak resident memory so far, in MiB: Linux's VmHWM, which starts afresh with the
    program (ru_maxrss, the fallback, keeps the high-water mark of the process that started it)."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read())[1]) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def export(model, args, rank, dtype):
    """Stage 1 writes W alone (only W is gathered); stage 2 the whole model in the llava-hf layout,
    in `dtype` (BF16 on GPUs, the precision it was computed in: half of FP32). Tensors are gathered
    one at a time, so rank 0 holds the exported copy and nothing more."""
    module = model.projector if args.stage == 1 else model
    state = {}
    for name, tensor in module.state_dict().items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # a collective: every rank
        if rank == 0:
            state[name] = full.detach().to("cpu", dtype if full.is_floating_point() else full.dtype)
    if rank == 0:
        if args.stage == 1:
            formats.save_projector(model, os.path.join(args.out, "projector.safetensors"), state)
        else:
            formats.save(model, os.path.join(args.out, "model"), state_dict=state)


def main():
    args = get_args()
    try:
        train(args)
    except (RuntimeError, CheckpointException) as e:
        # gloo raises when a collective waits past --timeout (NCCL's watchdog ends the process itself)
        if "RANK" not in os.environ or not any("timed out" in str(x).lower() for x in checkpoints.causes(e)):
            raise
        silent = distributed.silent_ranks(args.out, int(os.environ["WORLD_SIZE"]), min(30.0, args.timeout * 30))
        who = (f"rank {', '.join(map(str, silent))} stopped answering ({max(silent.values()):.0f} s without a "
               f"heartbeat: stopped, killed, or its node is gone)" if silent else
               "another process gave no word (every rank is alive: one hangs, or waits for a slow disk)")
        fail(f"rank {os.environ['RANK']}: {who}; the collective waited --timeout {args.timeout:g} minutes. The run "
             f"stops, and {kept(args.out)}. Run the same command with --resume, or a larger --timeout if the wait "
             f"was expected")
    except KeyboardInterrupt:  # Ctrl-C: say where the run stopped and how to go on
        if not os.path.exists(os.path.join(args.out, "run.json")):
            fail("stopped by Ctrl-C before the first step; nothing was saved")
        steps = [r["step"] for r in disk.read_jsonl(os.path.join(args.out, "metrics.jsonl"))]
        latest = os.path.join(args.out, "checkpoints", "latest")
        saved = f"its checkpoint {open(latest).read()}" if os.path.exists(latest) else "step 0 (no checkpoint yet)"
        fail(f"stopped by Ctrl-C after step {max(steps, default=0)}; the same command with --resume continues "
             f"from {saved} in {args.out}")
    if "RANK" in os.environ:  # under torchrun: everything is saved and the process group destroyed, so leave
        # now. DTensor's caches keep FSDP's device mesh, and with it gloo's worker threads, alive after
        # destroy_process_group; tearing them down during interpreter exit can abort a finished run
        # ("terminate called without an active exception", which torchrun reports as a failure; seen once
        # in CI on CPU). os._exit skips that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    cli.cli(main, "train.py")
