"""§4.2 Training of "Visual Instruction Tuning" and its Appendix C: two stages.

    Stage 1, pre-training for feature alignment: only the projection W trains; it exports W.
    Stage 2, end-to-end fine-tuning: W and the LLM train, the vision encoder stays frozen; it exports the model.

One process (CPU, or one GPU):
    python train.py --stage 1 --data chat.json --image-folder images/
Many GPUs, one node or several (FSDP2, BF16):
    torchrun --nproc_per_node 8 train.py --stage 1
    torchrun --nproc_per_node 8 train.py --stage 2
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 train.py --stage 2
Resume an interrupted run exactly where it stopped: add --resume.
"""
import argparse
import collections
import math
import os
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
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
import plan
import sample_checks

# ----------------------------------------------------------------------------------------------
# §4.2: what each stage trains, in which dtype, and what it exports. This table alone decides
# load_model's freezing and dtypes and export's part and dtype. What trains is FP32, and so is Adam's
# state; what stays frozen (g, always) is in the compute dtype: BF16 with --dtype bf16 (the GPUs'
# default), half the memory. "compute": the dtype it was computed in.
# ----------------------------------------------------------------------------------------------

Stage = collections.namedtuple("Stage", "trains starts_from_w exports export_dtype")
STAGES = {  # trains (the rest is frozen)               W from --projector  exports      export dtype
    1: Stage(frozenset({"projector"}),                   False,              "projector", "fp32"),
    2: Stage(frozenset({"projector", "language_model"}), True,               "model",     "compute"),
}  # 1: pre-training for feature alignment; 2: end-to-end fine-tuning

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
    p.add_argument("--projector-type", choices=["linear", "mlp2x_gelu"], default="linear",
                   help="linear (the paper; the default) or mlp2x_gelu (LLaVA-1.5; the toy's)")
    p.add_argument("--projector", default="out/stage1",
                   help="stage 2: the stage-1 output W starts from, or random (stage 1 skipped)")
    p.add_argument("--feature-layer", type=int, default=-2, help="which vision layer gives Z_v (-2: penultimate)")
    p.add_argument("--template", default="paper", choices=list(data.TEMPLATES),
                   help="paper (###), llava15 (USER:/ASSISTANT:) or plain (LLaVA-1.5's stage 1: image, caption)")
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
    plan.add_args(p)
    args = p.parse_args(argv)
    for k, v in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def fail(message):
    """A user's mistake: one line naming the flag or file and what to do, and a non-zero exit."""
    raise SystemExit(f"train.py: {message}")


# ----------------------------------------------------------------------------------------------
# §4.2: the two stages
# ----------------------------------------------------------------------------------------------

def train(args):
    """One stage on --data, from step 0 or (--resume) from the last checkpoint in --out; the model it
    trained and the last step's loss."""
    rank, world_size, device = distributed.setup(args.timeout)
    master = rank == 0  # rank 0 alone logs, writes metrics and exports the model
    torch.manual_seed(args.seed)  # the same initial W on every rank
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    bf16 = (args.dtype or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    samples = read_samples(args, world_size)  # what can be checked is checked before the model loads
    run = checkpoints.open_run(args, rank)  # its settings; resumed: as run.json has them
    if world_size > 1:  # so that a rank left waiting in a collective can name the one that went silent
        distributed.heartbeat(args.out, rank, every=min(10.0, args.timeout * 60 / 4))
    checkpoint = checkpoints.find_checkpoint(args.out) if args.resume else None
    try:
        model = load_model(args, rank, device, bf16)
    except (OSError, ValueError, SafetensorError) as e:  # missing, corrupt, swapped, made for other models
        fail(f"cannot build the model (--vision, --llm, --projector): {cli.one_line(e)}")
    inputs = checkpoints.fingerprint_inputs(args, run, rank)  # resumed: stops if they changed since

    optimizer = adam(model, args.lr)  # with a cosine schedule, 3% warm-up (Appendix C)
    dataset = data.LazyDataset(args.data, args.image_folder, model, args.max_length, args.pad_to_square,
                               samples=samples)
    total_steps = args.max_steps or math.ceil(args.epochs * (len(dataset) // args.global_batch))
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)
    start_step = checkpoints.load(args.out, checkpoint, model, optimizer, scheduler, rank) if args.resume else 0
    if master:
        checkpoints.record_start(args, run, inputs, start_step)
    accumulation = args.global_batch // (args.batch_size * world_size)  # micro-batches per step and rank
    loader = data_loader(dataset, args, world_size, rank, start_step, total_steps, model.tokenizer.pad_token_id)
    # One process in BF16: autocast computes in BF16 from the FP32 weights (under FSDP, its mixed
    # precision policy does the same).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not dist.is_initialized())
    if master:
        print(f"stage {args.stage}: {len(dataset)} samples, {total_steps} steps of {args.global_batch} "
              f"({world_size} processes x {args.batch_size} x {accumulation} accumulation), "
              f"{sum(p.numel() for p in optimizer.param_groups[0]['params']) / 1e6:.2f}M trainable parameters, "
              f"{'bf16' if bf16 else 'fp32'} on {device.type}")

    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not master,
                    desc=f"stage {args.stage}", dynamic_ncols=True)
    skipped, started, loss = 0, time.time(), float("nan")
    for step in progress:  # from 0: the body makes optimizer step step + 1
        batches = [next(loader) for _ in range(accumulation)]  # this rank's share of the global batch
        n_tokens, n_skipped = count_tokens(batches, step, args.strict_data)  # all ranks: the same numbers
        loss = optimizer_step(model, optimizer, batches, n_tokens, world_size, device, autocast, args.grad_clip,
                              check=partial(finite_loss, args, step, n_tokens))
        scheduler.step()
        skipped += n_skipped
        if master:
            samples_per_s = (step + 1 - start_step) * args.global_batch / (time.time() - started)
            log_step(args, progress, step + 1, loss, scheduler.get_last_lr()[0], samples_per_s, skipped)
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < total_steps:
            with distributed.ctrl_c_waits():
                checkpoints.save(args.out, step + 1, model, optimizer, scheduler, rank, args.keep)

    with distributed.ctrl_c_waits():
        export(model, args, rank, bf16)
    if master and skipped:
        print(f"stage {args.stage}: skipped {skipped} bad samples (see the messages above)")
    distributed.barrier()
    return model, loss


def read_samples(args, world_size):
    """The samples of --data, whose images are in --image-folder, enough and divisible for the batches."""
    for path, flag in [(args.data, "--data"), (args.image_folder, "--image-folder")]:
        if not os.path.exists(path):
            fail(f"{flag} {path} not found; pass {flag} (or try the offline demo: python toy.py)")
    samples = disk.load_json(args.data)
    sample_checks.check_images(samples, args.image_folder, args.data)
    if len(samples) < args.global_batch:
        fail(f"{args.data} has {len(samples)} samples, fewer than --global-batch {args.global_batch}")
    if args.global_batch % (args.batch_size * world_size):
        fail(f"--global-batch {args.global_batch} is not a multiple of --batch-size {args.batch_size} "
             f"x {world_size} processes")
    return samples


def count_tokens(batches, step, strict_data):
    """(the tokens the global batch trains on, the bad samples it skipped), both over all ranks: every
    rank knows them, so a global batch that cannot train stops all of them together."""
    n_tokens = distributed.all_sum(sum(len(b["target_positions"]) for b in batches))
    n_skipped = int(distributed.all_sum(sum(b["skipped"] for b in batches)))
    if n_skipped and strict_data:
        fail(f"--strict-data: step {step + 1} holds the bad sample named above; fix it or leave out --strict-data")
    if n_tokens == 0:
        fail(f"step {step + 1}: no sample of the global batch can be trained on (see the messages above); "
             f"check --data, --image-folder and --max-length. Nothing was saved.")
    return n_tokens, n_skipped


def adam(model, lr):
    """Adam without weight decay (Appendix C) over what trains; fused: one kernel for all parameters."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0, fused=True)


def optimizer_step(model, optimizer, micro_batches, n_tokens, world_size, device, autocast, clip, check=None):
    """One optimizer step of this rank: forward and backward of its micro-batches, the gradients clipped,
    then Adam. check(loss_sum, norm) sees the step's tensors before the weights change; what it returns
    is returned. train.py --plan (plan.py) runs this very function on fake tensors, at full size."""
    loss_sum = accumulate(model, micro_batches, n_tokens, world_size, device, autocast)
    norm = gradient_norm([p for group in optimizer.param_groups for p in group["params"]], clip)
    result = check(loss_sum, norm) if check else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return result


def finite_loss(args, step, n_tokens, loss_sum, norm):
    """The step's loss per token. The loss and the gradient norm are read once a step, before the weights
    change; both are reduced over the ranks, so a NaN or inf stops every rank at the same step."""
    loss, norm = float(distributed.all_sum(loss_sum)) / n_tokens, float(norm)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        fail(f"step {step + 1}: the loss is {loss:g} and the gradient norm {norm:g}; the run stops before "
             f"this step changes the weights, and exports nothing ({checkpoints.left_to_resume(args.out)}). "
             f"Try a lower --lr, or check the --llm and --projector weights for NaN or inf")
    return loss


def accumulate(model, micro_batches, n_tokens, world_size, device, autocast):
    """The summed token loss (a tensor: nothing waits for it) of forward and backward over this rank's
    micro-batches; gradients add up in .grad. Under FSDP each backward reduce-scatters at once, so each
    rank accumulates only its shard of the gradients. Every rank runs as many micro-batches as the
    others: the collectives stay in step."""
    loss_sum = 0.0
    for batch in micro_batches:
        pixel_values = batch["pixel_values"].to(device) if batch["pixel_values"] is not None else None
        with autocast:
            _, loss = model(batch["input_ids"].to(device), pixel_values, batch["attention_mask"].to(device),
                            labels=batch["labels"].to(device), reduction="sum",
                            target_positions=batch["target_positions"].to(device))  # ids (B, T); loss: a sum
        (loss * world_size / n_tokens).backward()
        loss_sum = loss_sum + loss.detach().double()
    return loss_sum


def gradient_norm(parameters, clip):
    """The norm of the gradients of all ranks together (a tensor), the same on every rank; the gradients
    are clipped to `clip` when it is above 0."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, clip if clip > 0 else math.inf)  # inf: scaled by 1
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def log_step(args, progress, step, loss, lr, samples_per_s, skipped):
    """Step `step`'s numbers: on the progress bar, and a row of metrics.jsonl."""
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.1f}")
    disk.append_jsonl(os.path.join(args.out, "metrics.jsonl"), dict(
        stage=args.stage, step=step, loss=loss, lr=lr, samples_per_s=samples_per_s, skipped=skipped))


# ----------------------------------------------------------------------------------------------
# The model of a stage, one copy read and sharded across the ranks; its export
# ----------------------------------------------------------------------------------------------

def load_model(args, rank, device, bf16, mesh=None, read_weights=True):
    """g, W and f_phi for this stage, frozen and typed as STAGES says, sharded under torchrun. Only rank 0
    reads the checkpoints: every rank builds the model on the meta device (no memory), shards it, and
    receives its shards of rank 0's weights. Host memory holds one copy; no GPU holds a full replica.
    mesh: FSDP's (default: all ranks); read_weights=False: the layout alone, values unset (--plan)."""
    stage = STAGES[args.stage]
    dtype = {part: torch.float32 if part in stage.trains else torch.bfloat16 if bf16 else torch.float32
             for part in ("vision_tower", "language_model")}  # W: FP32 from llava.build
    options = dict(projector=args.projector_type, feature_layer=args.feature_layer, template=args.template,
                   dtype=dtype["language_model"], vision_dtype=dtype["vision_tower"])
    weights = None
    if rank == 0 and read_weights:
        weights = llava.build(args.vision, args.llm, **options)  # W: random, seeded, FP32
        if stage.starts_from_w and args.projector != "random":  # random: stage 1 skipped
            formats.load_projector(weights, args.projector)  # W from stage 1
    if dist.is_initialized():
        with torch.device("meta"):
            model = llava.build(args.vision, args.llm, empty=True, **options)
    else:
        model = weights
    parts = dict(model.named_children())
    assert stage.trains <= set(parts) and "projector" in stage.trains, (stage, list(parts))  # W is FP32
    for name, part in parts.items():
        part.requires_grad_(name in stage.trains)
    if args.grad_checkpointing:
        model.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if not dist.is_initialized():
        return model.to(device).train()
    shard(model, bf16, mesh)
    model.to_empty(device=device)
    if not read_weights:
        return model.train()
    set_model_state_dict(model, weights.state_dict() if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buffer in model.named_buffers():  # computed, not saved (rotary frequencies, position ids)
        if rank == 0:
            buffer.copy_(weights.get_buffer(name))
        dist.broadcast(buffer, src=0)
    return model.train()


def shard(model, bf16, mesh=None):
    """FSDP2: each decoder layer of the LLM is a shard group; the rest (g, W, the embeddings, the head) is
    the root group. A group is gathered for its forward and backward, and its gradients reduce-scattered:
    each rank keeps only its shard, also while gradients accumulate. g is gathered with the root at
    every step, so a rank whose batch holds no image takes part in the same collectives as the others.
    BF16: compute in BF16, reduce gradients in FP32."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    layer_names = set(model.language_model._no_split_modules or [])  # e.g. LlamaDecoderLayer
    for module in model.language_model.modules():
        if type(module).__name__ in layer_names:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def export(model, args, rank, bf16):
    """What STAGES says the stage exports, in its dtype: W alone (only W is gathered) or the whole model
    in the llava-hf layout. Tensors are gathered one at a time, so rank 0 holds the exported copy and
    nothing more."""
    stage = STAGES[args.stage]
    dtype = torch.bfloat16 if bf16 and stage.export_dtype == "compute" else torch.float32
    module = model.projector if stage.exports == "projector" else model
    state = {}
    for name, tensor in module.state_dict().items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # a collective: every rank
        if rank == 0:
            state[name] = full.detach().to("cpu", dtype if full.is_floating_point() else full.dtype)
    if rank != 0:
        return
    if stage.exports == "projector":
        formats.save_projector(model, os.path.join(args.out, "projector.safetensors"), state)
    else:
        formats.save(model, os.path.join(args.out, "model"), state_dict=state, pad_to_square=args.pad_to_square)


# ----------------------------------------------------------------------------------------------
# Data order (data.micro_batches): the same global batches whatever the world size, resumable
# ----------------------------------------------------------------------------------------------

def data_loader(dataset, args, world_size, rank, start_step, total_steps, pad_id):
    """This rank's micro-batches from start_step on, read and collated by --workers processes."""
    batches = data.micro_batches(len(dataset), args.global_batch, args.batch_size, world_size, rank, start_step,
                            total_steps, args.seed, dataset.lengths() if args.group_by_length else None)
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                            collate_fn=partial(data.collate, pad_id=pad_id), persistent_workers=False,
                                            prefetch_factor=4 if args.workers else None))


def main(argv=None):
    args = get_args(argv)
    if args.plan or args.plan_table:  # simulated at full size, nothing read but configs
        return plan.plan(sys.modules[__name__], args)
    try:
        train(args)
    except (RuntimeError, CheckpointException) as e:
        if not distributed.timed_out(e):
            raise
        fail(distributed.timed_out_message(args.out, args.timeout, checkpoints.left_to_resume(args.out)))
    except KeyboardInterrupt:  # Ctrl-C: say where the run stopped and how to go on
        fail(checkpoints.stopped_by_ctrl_c(args.out))
    distributed.close()  # the model is gone with train's frame: the process group goes before the interpreter


if __name__ == "__main__":
    cli.cli(main, "train.py")
