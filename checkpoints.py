"""Checkpoint folders as train.py writes them (step_NNNNNNN/ with DCP's shards, .metadata and meta.json),
checked before a resume: complete, and holding nothing that would run code when read."""
import json
import os
import pickle
import re
import sys

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import StorageMeta

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


def causes(e):
    """An error, the errors it wraps (DCP's failures of each rank) and what caused each, outermost first."""
    todo, found = [e], []
    while todo:
        x = todo.pop(0)
        if x is not None and not any(x is y for y in found):
            found.append(x)
            failures = getattr(x, "failures", None) or {}  # CheckpointException: {rank: error}
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()] + [x.__cause__, x.__context__]
    return found
