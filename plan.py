"""A training step simulated at full size (train.py --plan): memory per GPU, FLOPs and traffic, before a launch.

    python train.py --stage 2 --vision configs/clip-vit-large-patch14 --llm configs/vicuna-13b-v1.5 \\
        --plan --plan-gpus 8 --gpu-memory 80

train.py's own load_model, shard and optimizer_step (forward, backward, clipping, Adam) run on this CPU,
without a weight and without a GPU: the model is built from its configs, sharded by FSDP2 over a fake
process group of --plan-gpus ranks, and every tensor is a fake one (a shape, a dtype, no values) under
torch's FakeTensorMode. FSDPMemTracker counts the bytes of rank 0 by kind (parameters sharded and
gathered, gradients, Adam's state, activations, all-gather and reduce-scatter buffers), FlopCounterMode
the FLOPs; the collectives FSDP issues are counted here. What depends on the data (the trained
positions, the token count) comes from a batch collated before the fake step, as in a run.

The batch is the worst case --max-length allows: every sample --plan-tokens long (default --max-length),
its image first, every text token trained (the LM head runs at each). Not counted: the CUDA context and
NCCL's own buffers (about 1-2 GB a GPU), and the allocator's fragmentation; the plan keeps 10% aside.
"""
import contextlib

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode

import distributed

GiB = 2 ** 30
HEADROOM = 0.9  # of a GPU's memory the plan lets a step use
PEAK_TFLOPS = {"A100": 312, "H100": 989}  # dense BF16 tensor-core peaks (A100 SXM/PCIe; H100 SXM)
MFU = (0.35, 0.55)  # the model FLOPs utilisation a well-run FSDP job reaches on these GPUs
KINDS = ["Sharded Param", "Unsharded Param", "Buffer", "Sharded Grad", "Unsharded Grad", "OptState", "Activation",
         "Temp", "All Gather", "Reduce Scatter", "Inputs"]


def add_args(p):
    p.add_argument("--plan", action="store_true",
                   help="simulate one training step at full size (no weights, no GPU): memory per GPU, FLOPs, "
                        "traffic, and whether it fits; configs/ holds the paper's models' configs")
    p.add_argument("--plan-gpus", type=int, default=8, help="--plan: GPUs the run would use")
    p.add_argument("--gpu-memory", type=float, default=80, help="--plan: GB of memory per GPU (24, 40, 80)")
    p.add_argument("--plan-tokens", type=int, help="--plan: tokens per sample (default --max-length)")
    p.add_argument("--gpu", choices=list(PEAK_TFLOPS), default="A100", help="--plan: the GPU, for the time")
    p.add_argument("--plan-table", action="store_true", help="README's table: --plan for 7B and 13B, stages 1 and "
                                                             "2, 8 and 4 GPUs, micro-batch 1, 4, 16 (~10 min)")


# ----------------------------------------------------------------------------------------------
# The step, on fake tensors or (under torchrun, for the test of the plan) real ones
# ----------------------------------------------------------------------------------------------

def synthetic_batch(train, model, batch_size, tokens, with_image=True):
    """A batch of `batch_size` samples of `tokens` ids each, collated by train.py's data.collate: BOS, the
    image's N_v positions, then text, every text token trained. Ids only: no tokenizer needed."""
    data = train.data  # (a section file: the plumbing reaches it through train.py, never imports it)
    n_v = model.num_image_tokens if with_image else 0
    vocab = model.language_model.config.vocab_size
    ids = torch.randint(3, vocab, (batch_size, tokens), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = model.language_model.config.bos_token_id or 1
    ids[:, 1:1 + n_v] = model.image_token_id
    labels = ids.clone()
    labels[:, :1 + n_v] = data.IGNORE
    size = model.vision_tower.config.image_size
    pixel_values = torch.zeros(batch_size, 3, size, size) if with_image else None
    samples = [{"input_ids": i, "labels": l, "pixel_values": None if pixel_values is None else pixel_values[k]}
               for k, (i, l) in enumerate(zip(ids, labels))]
    return data.collate(samples, model.tokenizer.pad_token_id)


class CountCollectives(TorchDispatchMode):
    """Bytes this rank sends in FSDP's collectives, by kind, as a ring sends them: all-gather and
    reduce-scatter (N - 1) shards each, all-reduce 2 (N - 1) / N of its tensor."""
    def __init__(self, world_size):
        super().__init__()
        self.n, self.sent = world_size, {"all-gather": 0, "reduce-scatter": 0, "all-reduce": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name, n = func.__name__, self.n
        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        if name.startswith("_allgather_base_"):
            self.sent["all-gather"] += nbytes(args[1]) * (n - 1)
        elif name.startswith("_reduce_scatter_base_"):
            self.sent["reduce-scatter"] += nbytes(args[0]) * (n - 1)
        elif name.startswith("allreduce_"):
            self.sent["all-reduce"] += sum(nbytes(t) for t in args[0]) * 2 * (n - 1) // n
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def shapes_found_apart():
    """DTensor learns an op's output shape by running it on global-shape stand-ins of its arguments, made
    in the fake mode it finds. In a real run that is a FakeTensorMode of its own (no memory); in the plan
    it would be ours, and the tracker would count the stand-ins: for clipping's and Adam's ops over every
    gradient, all gradients unsharded (25 GiB at 7B). So they are made apart here too, out of its sight."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator
    from torch.utils._python_dispatch import _disable_current_modes
    found = ShardingPropagator._propagate_tensor_meta_non_cached

    def apart(self, op_schema):
        with _disable_current_modes():
            return found(self, op_schema)
    ShardingPropagator._propagate_tensor_meta_non_cached = apart
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = found


def tracked_step(train, model, optimizer, args, world_size, tokens, fake_mode=None, held_gradients=False):
    """train.optimizer_step on a synthetic micro-batch of --batch-size x `tokens`, after a first Adam step
    that made Adam's state (as every step after the first has it). held_gradients: as the last micro-batch
    of an accumulation runs, with the sharded gradients of the ones before it held. Returns
    {"peak": {kind: bytes}, "peak_in_model": bytes, "flops": per micro-batch, "sent": {kind: bytes}}."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPModState
    batches = [synthetic_batch(train, model, args.batch_size, tokens)]
    n_tokens, _ = train.count_tokens(batches, 0, False)  # real tensors: what depends on the data
    fake = (lambda t: fake_mode.from_tensor(t)) if fake_mode else (lambda t: t)
    batches = [tree_map_only(torch.Tensor, fake, b) for b in batches]
    device = torch.device("cpu")
    no_autocast = torch.autocast("cpu", enabled=False)  # under FSDP its mixed precision casts
    with fake_mode or contextlib.nullcontext():
        for p in optimizer.param_groups[0]["params"]:  # Adam's state, as after step 1
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for p in optimizer.param_groups[0]["params"] if held_gradients else []:
            p.grad = torch.zeros_like(p)  # sharded, as FSDP2 accumulates them
        tracker = FSDPMemTracker(model, optimizer)
        tracker.track_inputs(tuple(batches))
        flops, collectives = FlopCounterMode(display=False), CountCollectives(world_size)
        with tracker, flops, collectives, shapes_found_apart():
            train.optimizer_step(model, optimizer, batches, n_tokens, world_size, device, no_autocast, args.grad_clip)
        peak = tracker.get_tracker_snapshot("peak")
        root = tracker.memory_tracking[model].snapshots  # the moments inside forward and backward
        in_model = max(snap[d]["Total"] for state in (_FSDPModState.PEAK_FW, _FSDPModState.PEAK_BW)
                       for snap in root.get(state, []) for d in snap)
    [snapshot] = [s for d, s in peak.items() if torch.device(d).type == "cpu"]
    return {"peak": {str(getattr(k, "value", k)): v for k, v in snapshot.items()}, "peak_in_model": in_model,
            "flops": flops.get_total_flops(), "sent": collectives.sent}


def simulate(train, args, gpus, tokens=None):
    """One step of train.py's at the sizes of --vision and --llm, sharded over `gpus` fake ranks, BF16
    as on GPUs unless --dtype fp32: one micro-batch (each is the same), with the gradients of the ones
    before it held when the step accumulates."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", rank=0, world_size=gpus, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (gpus,))  # outside FakeTensorMode: a mesh holds real ranks
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        with fake_mode:
            model = train.load_model(args, 0, torch.device("cpu"), (args.dtype or "bf16") == "bf16", mesh=mesh,
                                     read_weights=False)
            optimizer = train.adam(model, args.lr)
        accumulation = args.global_batch // (args.batch_size * gpus)
        result = tracked_step(train, model, optimizer, args, gpus, tokens or args.plan_tokens or args.max_length,
                              fake_mode, held_gradients=accumulation > 1)
        result.update(accumulation=accumulation, trainable=sum(p.numel() for p in optimizer.param_groups[0]["params"]),
                      n_image_tokens=model.num_image_tokens)
        return result
    finally:
        distributed.close()  # the fake group, and DTensor's caches that hold its mesh


# ----------------------------------------------------------------------------------------------
# What the plan says
# ----------------------------------------------------------------------------------------------

# The paper's runs (Appendix C, 8 A100s): samples, epochs, hours, and the mean tokens a sample holds
# (N_v visual tokens + text; our estimates of the text: CC-595K's brief instruction and caption in the
# template about 60 tokens, LLaVA-Instruct-158K's conversations about 250, ScienceQA's question,
# context and answer about 200).
PAPER_RUNS = [
    dict(name="stage 1, CC-595K, 1 epoch", stage=1, samples=595_000, epochs=1, hours=4, text=60),
    dict(name="stage 2, LLaVA-Instruct-158K, 3 epochs", stage=2, samples=158_000, epochs=3, hours=10, text=250),
    dict(name="stage 2, ScienceQA, 12 epochs", stage=2, samples=12_726, epochs=12, hours=4, text=200),
]


def hours(flops_per_step, steps, gpus, gpu, mfu):
    return flops_per_step * steps / (gpus * PEAK_TFLOPS[gpu] * 1e12 * mfu) / 3600


def peak_bytes(result):
    return result["peak"]["Total"]


def report(args, result, gpus):
    """The plan's lines: peak memory per GPU by kind, FLOPs and traffic per step, whether it fits."""
    step_flops = result["flops"] * max(result["accumulation"], 1) * gpus
    sent = {k: v * max(result["accumulation"], 1) for k, v in result["sent"].items()}
    tokens = args.plan_tokens or args.max_length
    print(f"train.py --plan: stage {args.stage}, {args.vision} + {args.llm}, {gpus} GPUs, micro-batch "
          f"{args.batch_size} x {tokens} tokens x {result['accumulation']} accumulation (global batch "
          f"{args.global_batch}), {'--grad-checkpointing, ' if args.grad_checkpointing else ''}"
          f"{args.dtype or 'bf16'}; {result['trainable'] / 1e9:.2f}B trainable parameters")
    print(f"peak memory per GPU (simulated step, rank 0): {peak_bytes(result) / GiB:.1f} GiB")
    for kind in KINDS:
        if result["peak"].get(kind):
            print(f"  {kind:<16} {result['peak'][kind] / GiB:7.2f} GiB")
    print(f"FLOPs per step (all GPUs): {step_flops / 1e12:.0f} TFLOP; sent per GPU per step: "
          + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sent.items()))
    return step_flops


def fits(result, gpu_memory):
    return peak_bytes(result) <= HEADROOM * gpu_memory * 1e9


def plan(train, args):
    """train.py --plan: simulate, report, and if the step does not fit, simulate what would."""
    if args.plan_table:
        return table(train, args.gpu)
    gpus = args.plan_gpus
    if args.global_batch % (args.batch_size * gpus):
        train.fail(f"--global-batch {args.global_batch} is not a multiple of --batch-size {args.batch_size} x "
                   f"--plan-gpus {gpus}")
    result = simulate(train, args, gpus)
    report(args, result, gpus)
    budget = f"{HEADROOM * args.gpu_memory:.0f} of {args.gpu_memory:g} GB"
    if fits(result, args.gpu_memory):
        print(f"fits: {peak_bytes(result) / 1e9:.1f} GB of the {budget} a step may use")
    else:
        print(f"does not fit: {peak_bytes(result) / 1e9:.1f} GB, above the {budget} a step may use; trying:")
        for what, changes in alternatives(args, gpus):
            tried = simulate(train, _with(args, changes), changes.get("plan_gpus", gpus))
            ok = fits(tried, args.gpu_memory)
            print(f"  {what}: {peak_bytes(tried) / 1e9:.1f} GB, {'fits' if ok else 'does not fit'}")
            if ok:
                break
    paper_time(train, args, gpus)


def _with(args, changes):
    import argparse
    return argparse.Namespace(**{**vars(args), **changes})


def alternatives(args, gpus):
    """What to try, cheapest first: recompute activations, smaller micro-batches (more accumulation),
    more GPUs."""
    tried = {} if args.grad_checkpointing else {"grad_checkpointing": True}
    if tried:
        yield "--grad-checkpointing", tried
    b = args.batch_size
    while b > 1:
        b //= 2
        yield f"{'--grad-checkpointing ' if tried else ''}--batch-size {b}", {**tried, "batch_size": b}
    n = gpus
    while args.global_batch % (2 * n) == 0 and n < 64:
        n *= 2
        yield f"{'--grad-checkpointing ' if tried else ''}--batch-size 1, {n} GPUs", {
            **tried, "batch_size": 1, "plan_gpus": n}


def paper_time(train, args, gpus):
    """Predicted hours of the paper's run of this stage: steps x FLOPs per step (simulated at the
    paper's mean sample length) at the GPU's BF16 peak and an MFU range, beside the paper's hours on
    8 A100s and the MFU those imply."""
    for run in PAPER_RUNS:
        if run["stage"] != args.stage:
            continue
        tokens = 1 + model_image_tokens(args) + run["text"]
        result = simulate(train, _with(args, {"plan_tokens": tokens}), gpus, tokens=tokens)
        step_flops = result["flops"] * max(result["accumulation"], 1) * gpus
        steps = run["samples"] // args.global_batch * run["epochs"]
        low, high = (hours(step_flops, steps, gpus, args.gpu, m) for m in reversed(MFU))
        implied = step_flops * steps / (8 * PEAK_TFLOPS["A100"] * 1e12 * run["hours"] * 3600)
        print(f"time, {run['name']} ({steps} steps, {tokens} tokens a sample): {low:.1f}-{high:.1f} h on {gpus} "
              f"{args.gpu}s at {MFU[0]:.0%}-{MFU[1]:.0%} MFU; the paper: ~{run['hours']} h on 8 A100s "
              f"({implied:.0%} MFU)")


def model_image_tokens(args):
    import formats
    config = formats.vision_config(args.vision)
    return formats.count_image_tokens(config.image_size, config.patch_size)


# ----------------------------------------------------------------------------------------------
# The table a GPU user reads before buying time: python train.py --plan-table
# ----------------------------------------------------------------------------------------------

def table(train, gpu="A100"):
    """Peak memory per GPU, and the paper's run's predicted hours, for Vicuna-7B and -13B (CLIP ViT-L/14,
    224 px), stage 1 and 2, 8 and 4 GPUs, with and without --grad-checkpointing, micro-batch 1, 4 and 16
    at 2048 tokens. The global batch is the paper's (128, 32), or one micro-batch a GPU where that is
    larger. Each row is a simulated step (about 15 s here)."""
    print(f"| LLM | stage | GPUs | --grad-checkpointing | micro-batch x 2048 | peak GiB per GPU | 24 GB | 40 GB "
          f"| 80 GB | paper's run, h on {gpu}s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in ("7b", "13b"):
        for stage in (1, 2):
            run = next(r for r in PAPER_RUNS if r["stage"] == stage)
            for checkpointing in (False, True):
                base = ["--stage", str(stage), "--vision", "configs/clip-vit-large-patch14", "--llm",
                        f"configs/vicuna-{size}-v1.5", "--projector", "random", "--gpu", gpu]
                base += ["--grad-checkpointing"] if checkpointing else []
                tokens = 1 + model_image_tokens(train.get_args(base)) + run["text"]
                paper = train.get_args(base + ["--batch-size", "1"])  # the paper's global batch
                sample_flops = simulate(train, paper, 8, tokens=tokens)["flops"]  # a sample's
                steps = run["samples"] // paper.global_batch * run["epochs"]
                for gpus in (8, 4):
                    step_flops = sample_flops * paper.global_batch
                    low, high = (hours(step_flops, steps, gpus, gpu, m) for m in reversed(MFU))
                    for batch in (1, 4, 16):
                        global_batch = max(train.STAGE_DEFAULTS[stage]["global_batch"], batch * gpus)
                        args = train.get_args(base + ["--batch-size", str(batch), "--global-batch", str(global_batch),
                                                      "--plan-tokens", "2048"])
                        peak = peak_bytes(simulate(train, args, gpus)) / GiB
                        marks = " | ".join("yes" if peak * GiB <= HEADROOM * gb * 1e9 else "no" for gb in (24, 40, 80))
                        print(f"| Vicuna-{size.upper()} | {stage} | {gpus} | {'yes' if checkpointing else 'no'} | "
                              f"{batch} | {peak:.1f} | {marks} | {low:.1f}-{high:.1f} |", flush=True)

