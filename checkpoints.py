"""A run's --out: one run at a time, its settings and inputs (run.json), its checkpoints written, checked, read back."""
import contextlib
import errno
import json
import math
import os
import pickle
import re
import shutil
import sys

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

import cli
import disk
import distributed
import formats

STEP_FOLDER = re.compile(r"step_\d{7,}")  # the name of each checkpoint's folder: step_{step:07d}


class ForeignPickle(pickle.UnpicklingError):
    """A .metadata that asks for something DCP's metadata never holds: a function to run."""


class MetadataUnpickler(pickle.Unpickler):
    """DCP writes .metadata as a pickle, and pickle.load runs whatever a pickle names: a run folder
    from someone else could run code. This unpickler builds only what DCP's writer puts there: the
    classes of torch.distributed.checkpoint.metadata and its _StorageInfo, torch.Size, dtypes,
    layouts and paths."""
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}

    def find_class(self, module, name):
        found = getattr(sys.modules.get(module), name, None) if "." not in name else None
        if ((module, name) in self.ALLOWED
                or module == "torch.distributed.checkpoint.metadata" and isinstance(found, type)
                and found.__module__ == module
                or module == "torch" and isinstance(found, torch.dtype)):
            return super().find_class(module, name)
        raise ForeignPickle(f"{module}.{name}")


class CheckedReader(dcp.FileSystemReader):
    """DCP's reader of a checkpoint folder, given the metadata MetadataUnpickler read."""

    def __init__(self, path, metadata):
        super().__init__(path)
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs):  # as FileSystemReader's, without its pickle.load
        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


def check_checkpoint(path):
    """(what is wrong with the checkpoint folder `path`, or None; its DCP metadata). A complete one has
    meta.json with its step and scheduler, .metadata, and every shard file .metadata names, as long
    as it says. A .metadata that asks to run code stops the run."""
    meta_file, metadata_file = os.path.join(path, "meta.json"), os.path.join(path, ".metadata")
    if not os.path.isdir(path):
        return f"{path} is missing", None
    try:
        with open(meta_file) as f:
            meta = json.load(f)
        if not (isinstance(meta, dict) and isinstance(meta.get("step"), int)
                and isinstance(meta.get("scheduler"), dict)):
            raise ValueError
    except (OSError, ValueError):  # missing, empty, cut short, not ours
        return f"{meta_file} is missing or not a checkpoint's meta.json", None
    try:
        with open(metadata_file, "rb") as f:
            metadata = MetadataUnpickler(f).load()
        sizes = {}
        for info in metadata.storage_data.values():  # the byte range of each tensor in its shard file
            sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    except ForeignPickle as e:
        raise SystemExit(f"--resume: {metadata_file}: not a checkpoint's metadata (it asks to run {e}); resume "
                         f"only from checkpoints train.py wrote, or start a new --out")
    except Exception:  # a damaged pickle fails in many ways; none of them ran code
        return f"{metadata_file} is missing or damaged", None
    for name, size in sorted(sizes.items()):
        shard = os.path.join(path, name)
        if os.path.basename(name) != name or not os.path.isfile(shard):
            return f"{shard} is missing", metadata
        if os.path.getsize(shard) < size:
            return f"{shard} is cut short ({os.path.getsize(shard)} of {size} bytes)", metadata
    return None, metadata


def find_checkpoint(out):
    """(the checkpoint folder `latest` names, its metadata), checked before the model loads; (None, None)
    when the run has none yet. A damaged one stops the run, naming the file and the newest complete
    checkpoint to resume from instead."""
    root = os.path.join(out, "checkpoints")
    latest = os.path.join(root, "latest")
    if not os.path.exists(latest):
        return None, None
    with open(latest) as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    problem, metadata = (check_checkpoint(path) if STEP_FOLDER.fullmatch(name)
                         else (f"{latest} names no checkpoint ({name!r})", None))
    if problem:
        others = sorted((d for d in os.listdir(root) if STEP_FOLDER.fullmatch(d) and d != name),
                        key=lambda d: -int(d[5:]))
        complete = [d for d in others if check_checkpoint(os.path.join(root, d))[0] is None]
        instead = (f"point {latest} at {complete[0]} (echo {complete[0]} > {latest}) to resume from there"
                   if complete else "no complete checkpoint is left to resume from")
        raise SystemExit(f"--resume: the checkpoint is damaged: {problem}; {instead}, or start a new --out")
    return path, metadata


# ----------------------------------------------------------------------------------------------
# The run's folder: one run at a time, on the settings and inputs it started with
# ----------------------------------------------------------------------------------------------

# What a resumed run must share with the run it continues; any other flag may change.
RUN_SETTINGS = ["stage", "vision", "llm", "projector_type", "feature_layer", "template", "data", "lr", "global_batch",
                "epochs", "max_steps", "warmup_ratio", "grad_clip", "max_length", "pad_to_square", "group_by_length",
                "seed"]


def open_run(args, rank):
    """The run's settings, as run.json has them when it resumes. A new run needs an --out of its own: it
    never mixes its metrics and checkpoints with another run's, nor replaces another run's model.
    --resume continues the run in --out, on its settings. A run that stopped before its first step left
    only run.json: a new run may take its place."""
    run_file = os.path.join(args.out, "run.json")
    settings = {k: getattr(args, k) for k in RUN_SETTINGS}
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"--out {args.out} is a file; pass a directory")
    if args.resume and not os.path.isdir(args.out):
        raise SystemExit(f"--resume: {args.out} holds no run to resume; start without --resume")
    # One run at a time in --out, from here to the end: another one that starts while this one loads
    # its model would pass the checks below. Rank 0 holds it for all ranks (one node or several).
    # It makes --out: a read-only or missing place fails now, before any work.
    if rank == 0:
        disk.hold_lock(args.out, "train.py")
    if args.resume:
        if not os.path.exists(run_file):
            raise SystemExit(f"--resume: {args.out} holds no run to resume; start without --resume")
        with open(run_file) as f:
            saved = json.load(f)
        for k, v in settings.items():
            if saved.get(k) != v:
                raise SystemExit(f"--resume: --{k.replace('_', '-')} {v} differs from the run in {args.out} "
                                 f"({saved.get(k)}); resume with the same settings or start a new --out")
        return saved
    used = [f for f in ("metrics.jsonl", "checkpoints", "model", "projector.safetensors")
            if os.path.exists(os.path.join(args.out, f))]
    if used:
        raise SystemExit(f"--out {args.out} already holds a run ({used[0]}); pass --resume to continue it, or "
                         f"another --out")
    distributed.barrier()  # every rank has looked before rank 0 writes
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


def fingerprint_inputs(args, run, rank):
    """The inputs' fingerprints on rank 0, which alone has read the weights (None on the others). A resumed
    run whose inputs changed since it started stops, every rank together."""
    inputs = input_fingerprints(args) if rank == 0 else None
    problem = check_inputs(args, run.get("inputs"), inputs) if rank == 0 and args.resume else None
    if distributed.all_sum(problem is not None):
        raise SystemExit(problem or f"rank {rank}: rank 0 refuses to resume (see its message)")
    return inputs


def record_start(args, run, inputs, start_step):
    """A new run keeps its settings and its inputs' content in run.json; a resumed one drops the metrics
    of the steps after its checkpoint, which it trains again."""
    metrics = os.path.join(args.out, "metrics.jsonl")
    if not args.resume:
        disk.write_json(os.path.join(args.out, "run.json"), dict(run, inputs=inputs))
        return
    rows = [r for r in disk.read_jsonl(metrics) if r["step"] <= start_step]
    with open(metrics, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def stopped_by_ctrl_c(out):
    """The one line of a run stopped by Ctrl-C: after which step, and how to go on."""
    if not os.path.exists(os.path.join(out, "run.json")):
        return "stopped by Ctrl-C before the first step; nothing was saved"
    steps = [r["step"] for r in disk.read_jsonl(os.path.join(out, "metrics.jsonl"))]
    latest = os.path.join(out, "checkpoints", "latest")
    saved = f"its checkpoint {open(latest).read()}" if os.path.exists(latest) else "step 0 (no checkpoint yet)"
    return (f"stopped by Ctrl-C after step {max(steps, default=0)}; the same command with --resume continues "
            f"from {saved} in {out}")


def left_to_resume(out):
    """What a run that stops now leaves to resume from, as a phrase of its one line."""
    latest = os.path.join(out, "checkpoints", "latest")
    if not os.path.exists(latest):
        return "no checkpoint was written yet"
    with open(latest) as f:
        return f"its last checkpoint, {f.read().strip()}, is kept for --resume"


# ----------------------------------------------------------------------------------------------
# Writing and reading a checkpoint: sharded with torch.distributed.checkpoint, visible only when complete
# ----------------------------------------------------------------------------------------------

def save(out, step, model, optimizer, scheduler, rank, keep):
    """out/checkpoints/step_N: each rank writes its shards of the trainable weights and of Adam's
    state, and its RNG state; rank 0 then renames step_N.tmp to step_N and points `latest` at it.
    A crash before the rename leaves the previous checkpoint as the latest. Then only the `keep`
    newest step_N folders stay."""
    root = os.path.join(out, "checkpoints")
    final, tmp = os.path.join(root, f"step_{step:07d}"), os.path.join(root, f"step_{step:07d}.tmp")
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        distributed.barrier()
        options = StateDictOptions(ignore_frozen_params=True)  # the frozen weights are in their own files
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        dcp.save({"model": model_state, "optim": optim_state, f"rng_{rank}": torch.get_rng_state()},
                 checkpoint_id=tmp)
        distributed.barrier()
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
        errors = [x for x in cli.causes(e) if isinstance(x, OSError)]
        why = ("the disk is full" if any(x.errno == errno.ENOSPC for x in errors)
               else cli.one_line(errors[0]) if errors else cli.one_line(cli.causes(e)[-1]))
        raise SystemExit(f"step {step}: cannot write the checkpoint {os.path.basename(final)} in {root} ({why}); "
                         f"its .tmp is removed, and {left_to_resume(out)}. Free space (or pass a smaller --keep), "
                         f"then run the same command with --resume")
    if rank == 0:
        # Only the folders this run writes rotate: a user's copy (step_0000002.bak) is the user's.
        done = sorted((d for d in os.listdir(root) if STEP_FOLDER.fullmatch(d)), key=lambda d: int(d[5:]))
        for old in done[:-keep]:
            shutil.rmtree(os.path.join(root, old))
    distributed.barrier()


def load(out, checkpoint, model, optimizer, scheduler, rank):
    """The step to continue from, with the model, Adam and the schedule as `checkpoint` (find_checkpoint's
    answer) has them. A run resumed on another number of processes gets its weights and Adam's state
    resharded by DCP; a rank that had no RNG state keeps its seed."""
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
        dcp.load(state, storage_reader=CheckedReader(path, metadata))
    except (Exception, CheckpointException) as e:  # DCP wraps what failed (bytes damaged in a shard) in its own
        raise SystemExit(f"--resume: cannot read the checkpoint {path} ({cli.one_line(cli.causes(e)[-1])}); point "
                         f"{os.path.join(out, 'checkpoints', 'latest')} at an earlier step_* folder, or start a "
                         f"new --out")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # frozen: not saved
    if f"rng_{rank}" in state:
        torch.set_rng_state(state[f"rng_{rank}"])
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    scheduler.load_state_dict(meta["scheduler"])
    return meta["step"]
