"""Model folders on disk: a hub id or a path; our layout, llava-hf's and the authors'; weight files
read one at a time and checked, never a pickle run; configs that ask to run code refused."""
import errno
import json
import os
import pickle
import re

import huggingface_hub
import torch
import transformers

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from cli import one_line


AUTHORS_IMAGE_TOKEN_ID = -200  # the authors' IMAGE_TOKEN_INDEX: a position id outside the vocabulary


class RemoteCodeError(PermissionError):
    """A model folder that asks to run Python files of its own: an OSError, so that every program says
    it in one line naming the folder, as it says a missing one."""


REMOTE_CODE_CONFIGS = ["config.json", "preprocessor_config.json", "tokenizer_config.json", "processor_config.json"]


def refuse_remote_code(folder):
    """Stop before transformers reads `folder` if its configs ask to run Python files of their own
    (auto_map): transformers would ask on stdin, and a "y" (or a pipe) would run them. Every
    from_pretrained here also says trust_remote_code=False, for hub ids fetched by transformers."""
    for name in REMOTE_CODE_CONFIGS:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                config = json.loads(f.read())
        except (OSError, ValueError, RecursionError):  # absent or unreadable: transformers says so itself
            continue
        if isinstance(config, dict) and "auto_map" in config:
            raise RemoteCodeError(errno.EPERM, f"its configs ask to run their own code (auto_map); this project "
                                               f"never runs it (see {name})", folder)


def load_tokenizer_and_config(path):
    """What data.py needs to render samples for a saved model, without loading its weights."""
    path = resolve(path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if config.get("model_type") == "llava":
        vc = config["vision_config"]
        keep_cls = config.get("vision_feature_select_strategy", "default") == "full"
        return tokenizer, {"template": config.get("llava_template", "llava15"),
                           "image_token_id": config["image_token_index"],
                           "num_image_tokens": count_image_tokens(vc["image_size"], vc["patch_size"], keep_cls)}
    if os.path.isdir(config["mm_vision_tower"]):
        refuse_remote_code(config["mm_vision_tower"])
    vision = transformers.AutoConfig.from_pretrained(config["mm_vision_tower"], trust_remote_code=False)
    vision = getattr(vision, "vision_config", vision)
    return tokenizer, {"template": authors_template(config), "image_token_id": AUTHORS_IMAGE_TOKEN_ID,
                       "num_image_tokens": count_image_tokens(vision.image_size, vision.patch_size)}


def count_image_tokens(image_size, patch_size, keep_cls=False):
    """N_v: one visual token per patch of the grid, and CLS if it is kept."""
    return (image_size // patch_size) ** 2 + int(keep_cls)


def resolve(path):
    """A local directory as it is; otherwise a hub id, fetched (or found in the local cache): the
    configs, the tokenizer, and the weights as safetensors, or pytorch_model*.bin where the repo
    ships only those (the authors' LLaVA releases)."""
    if os.path.isdir(path):
        refuse_remote_code(path)
        return path
    try:
        files = huggingface_hub.list_repo_files(path)
    except Exception:  # offline: whatever the local cache holds
        files = None
    try:
        folder = huggingface_hub.snapshot_download(path, allow_patterns=["*.json", "*.model", "*.txt"] + weight_patterns(files))
    except Exception as e:
        raise FileNotFoundError(f"{path}: not a directory, and the hub cannot give it ({type(e).__name__})")
    refuse_remote_code(folder)
    return folder


def weight_patterns(files):
    """Which weight files to fetch from a repo listing `files` (None: unknown)."""
    if files is not None and not any(f.endswith(".safetensors") for f in files):
        return ["pytorch_model*.bin"]
    return ["*.safetensors"] if files is not None else ["*.safetensors", "pytorch_model*.bin"]


def authors_template(config):
    return "llava15" if config.get("mm_projector_type", "linear") != "linear" else "paper"


# ----------------------------------------------------------------------------------------------
# Weight files: names in each layout, read one file at a time
# ----------------------------------------------------------------------------------------------

def named(path, read):
    """read() from `path`; an error that does not say where names it (a corrupt weight file)."""
    try:
        return read()
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: {one_line(e)}") from None


# Our parameter names -> the names transformers' LlavaForConditionalGeneration writes and reads.
TO_HF = [(r"^projector\.0\.", "multi_modal_projector.linear_1."),
         (r"^projector\.2\.", "multi_modal_projector.linear_2.")]


# Names in checkpoints -> ours. llava-hf on the hub, transformers 5, the authors' code.
FROM_CHECKPOINT = [
    (r"^multi_modal_projector\.linear_1\.", "projector.0."),
    (r"^multi_modal_projector\.linear_2\.", "projector.2."),
    (r"^model\.multi_modal_projector\.linear_1\.", "projector.0."),
    (r"^model\.multi_modal_projector\.linear_2\.", "projector.2."),
    (r"^(model\.)?vision_tower\.vision_model\.", "vision_tower."),  # transformers 4 nests CLIP
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]


# Names in the authors' LlavaLlamaForCausalLM checkpoints -> ours.
FROM_AUTHORS = [(r"^model\.mm_projector\.(weight|bias)$", r"projector.0.\1"),  # linear W: a bare nn.Linear
                (r"^model\.mm_projector\.", "projector."),
                (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision_tower."),
                (r"^model\.", "language_model.model."),
                (r"^lm_head\.", "language_model.lm_head.")]


def rename(key, rules):
    for pattern, replacement in rules:
        new_key, n = re.subn(pattern, replacement, key)
        if n:
            return new_key
    return key


def usual_mode(*paths):
    """safetensors writes its files readable by their owner alone; give them what the user's umask
    gives any new file."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        os.chmod(path, 0o666 & ~umask)


def own_storage(tensor):
    """A tensor that safetensors can write: a copy if it is a view into a larger storage (as the
    full state dict gathered from FSDP shards can hold)."""
    tensor = tensor.detach().contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def checkpoint_files(path):
    """A checkpoint directory's weight files: model*.safetensors (one or shards), else the authors'
    pytorch_model*.bin."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and f.startswith("model"))
    files = files or sorted(f for f in os.listdir(path) if re.fullmatch(r"pytorch_model.*\.bin", f))
    if not files:
        raise FileNotFoundError(f"{path}: no model*.safetensors or pytorch_model*.bin")
    return [os.path.join(path, f) for f in files]


def read_file(file, device="cpu"):
    """One weight file's tensors: safetensors straight onto `device`; a .bin read with
    weights_only=True (no code from the file is run) and memory-mapped."""
    if file.endswith(".safetensors"):
        return named(file, lambda: load_file(file, device=str(device)))
    try:
        return torch.load(file, map_location=device, weights_only=True, mmap=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as e:  # empty, cut short, or code in it
        if isinstance(e, pickle.UnpicklingError):
            raise ValueError(f"{file}: holds more than tensors; not read, since reading it would run its code") from None
        why = "empty" if os.path.getsize(file) == 0 else "cut short, or not in torch.save's format"
        raise ValueError(f"{file}: not a PyTorch weight file ({why})") from None


def stored_shapes(files):
    """{name: shape} of every tensor in the files, read from their headers, not their data."""
    shapes = {}
    for file in files:
        if file.endswith(".safetensors"):
            with named(file, lambda: safe_open(file, "pt")) as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        else:
            shapes.update({k: tuple(v.shape) for k, v in read_file(file).items()})
    return shapes


def check_weights(expected, found, tied, source):
    """Raise an error naming the first missing, unexpected or mis-shaped weight ({name: shape} each)."""
    if tied:  # a tied head is the embedding matrix: never stored separately
        expected.pop("language_model.lm_head.weight", None)
        found.pop("language_model.lm_head.weight", None)
    for problem, names in (("missing", sorted(set(expected) - set(found))), ("unexpected", sorted(set(found) - set(expected)))):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise ValueError(f"{source}: {problem} weight {names[0]}{more}")
    for k, shape in found.items():
        if shape != expected[k]:
            raise ValueError(f"{source}: weight {k} has shape {shape}, the model expects {expected[k]}")


class quiet_transformers:
    """Silence transformers' load reports inside a `with` block."""
    def __enter__(self):
        self.level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()

    def __exit__(self, *exc):
        transformers.logging.set_verbosity(self.level)


# ----------------------------------------------------------------------------------------------
