"""Model folders on disk: a hub id or a path; our layout, llava-hf's and the authors'; weight files
read one at a time and checked, never a pickle run; configs that ask to run code refused."""
import contextlib
import errno
import json
import os
import pickle
import re
import shutil

import huggingface_hub
import torch
import transformers

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM,
                          AutoTokenizer)
from transformers.initialization import no_init_weights

from cli import one_line
from image_files import expand2square, mean_colour


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


# ----------------------------------------------------------------------------------------------
# A saved model's settings: its config.json, read in one place
# ----------------------------------------------------------------------------------------------

def read_settings(path, name=None):
    """config.json of a saved LLaVA, ours or llava-hf's (model_type "llava") or the authors'
    ("llava_llama"), as the settings LLaVA takes (projector, feature_layer, keep_cls, image_token_id,
    template, pad_to_square) and its parts: layout, text_config, vision_config (llava-hf's) or vision
    (the authors': where the vision tower is), why (why this template), and for the authors' layout
    start_end (mm_use_im_start_end), patch_token (mm_use_im_patch_token) and tower_trained
    (unfreeze_mm_vision_tower: the checkpoint's copy of the tower is the one to use). name: what the
    user called the model (a hub id or a folder), which the authors' scripts guess the template from."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") == "llava":  # llava-hf, or ours
        llava = transformers.LlavaConfig.from_dict(config)
        projector = config.get("llava_projector", "mlp2x_gelu")
        if projector != "linear" and config.get("projector_hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: projector_hidden_act {config['projector_hidden_act']!r} is not supported")
        why = ("config.json's llava_template" if "llava_template" in config else
               "a llava-hf checkpoint (config.json names no template): LLaVA-1.5's")
        return dict(layout="llava", projector=projector, feature_layer=llava.vision_feature_layer,
                    keep_cls=llava.vision_feature_select_strategy == "full", image_token_id=llava.image_token_index,
                    template=config.get("llava_template", "llava15"), why=why,
                    pad_to_square=config.get("llava_pad_to_square", False), text_config=llava.text_config,
                    vision_config=llava.vision_config, vision=None)
    if "mm_vision_tower" in config:  # the authors' LlavaLlamaForCausalLM
        aspect = config.get("image_aspect_ratio", "square")
        if aspect not in ("pad", "square", None):
            raise ValueError(f"{path}/config.json: image_aspect_ratio {aspect!r} (LLaVA-NeXT's) is not supported; "
                             f"this project reads 'pad' and 'square' (LLaVA and LLaVA-1.5)")
        text_config = AutoConfig.for_model("llama", **{k: v for k, v in config.items() if k != "model_type"})
        template, why = authors_template(name or path)
        return dict(layout="authors", projector=config.get("mm_projector_type", "linear"),
                    feature_layer=config.get("mm_vision_select_layer", -2),
                    keep_cls=config.get("mm_vision_select_feature", "patch") == "cls_patch",
                    image_token_id=AUTHORS_IMAGE_TOKEN_ID, template=template, why=why, pad_to_square=aspect == "pad",
                    text_config=text_config, vision_config=None, vision=config["mm_vision_tower"],
                    start_end=bool(config.get("mm_use_im_start_end", False)),
                    patch_token=config.get("mm_use_im_patch_token", True),
                    tower_trained=bool(config.get("unfreeze_mm_vision_tower", False)))
    raise ValueError(f"{path}/config.json: neither a LLaVA (model_type 'llava') nor the authors' "
                     f"layout (mm_vision_tower); got model_type {config.get('model_type')!r}")


def authors_template(name):
    """The template of an authors' checkpoint, which their config does not record, guessed as their
    run_llava.py and serve/cli.py guess their conv_mode, from the model's name (get_model_name_from_path:
    the last part of the path, or the two last for a checkpoint-N folder): "v1" in it is llava_v1
    (here llava15), otherwise llava_v0 (here the paper's). Returns (template or None, why): None where
    their guess is a template this project does not have (llama-2, mistral, mpt)."""
    parts = name.strip("/").split("/")
    model_name = "_".join(parts[-2:]) if parts[-1].startswith("checkpoint-") else parts[-1]
    lower = model_name.lower()
    theirs = next((mode for key, mode in (("llama-2", "llava_llama_2"), ("mistral", "mistral_instruct"),
                                          ("v1.6-34b", "chatml_direct"), ("v1", "llava_v1"), ("mpt", "mpt"))
                   if key in lower), "llava_v0")
    why = (f"the authors' config records no template; their run_llava.py picks {theirs} for a model named "
           f"{model_name!r}")
    return {"llava_v1": "llava15", "llava_v0": "paper"}.get(theirs), why


IMAGE = "<image>"  # where the image stands in the first human turn of LLaVA's JSON


def add_image_token(tokenizer):
    """Add <image> to the tokenizer as a special token if missing, and return its id: one token that never
    merges with its neighbours, which render() replaces by the image's positions. Called once where a
    tokenizer is loaded (load_language_model, load, load_tokenizer_and_config), never by render()."""
    if IMAGE not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(IMAGE)


def load_tokenizer_and_config(path):
    """What data.py needs to render samples for a saved model, without loading its weights."""
    name, path = path, resolve(path)
    settings = read_settings(path, name)
    tokenizer = checkpoint_tokenizer(path, settings)
    vision = settings["vision_config"] or vision_config(settings["vision"])
    n_v = count_image_tokens(vision.image_size, vision.patch_size, settings["keep_cls"])
    return tokenizer, {"template": chosen_template(settings, None, path), "image_token_id": settings["image_token_id"],
                       "num_image_tokens": n_v}


def chosen_template(settings, template, path):
    """The template asked for (--template), else the checkpoint's (settings["template"]), and why."""
    if template:
        settings["why"] = "chosen with --template"
        return template
    if settings["template"] is None:
        raise ValueError(f"{path}: {settings['why']}, which this project does not have; "
                         f"choose one with --template (paper or llava15)")
    return settings["template"]


def checkpoint_tokenizer(path, settings):
    """A saved model's tokenizer, as it feeds the model: for the authors' layout, as their loader
    (builder.py) sets it up and their tokenizer_image_token tokenizes prompts (AuthorsTokenizer)."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if settings["layout"] == "authors":
        # builder.py adds these where the saved tokenizer lacks them, in this order (ids as theirs)
        added = [IMAGE_PATCH] * bool(settings["patch_token"]) + [IMAGE_START, IMAGE_END] * settings["start_end"]
        tokenizer.add_tokens([t for t in added if t not in tokenizer.get_vocab()], special_tokens=True)
    add_image_token(tokenizer)  # the authors' tokenizer has none (they mark the image with id -200)
    return AuthorsTokenizer(tokenizer, settings["start_end"]) if settings["layout"] == "authors" else tokenizer


IMAGE_PATCH, IMAGE_START, IMAGE_END = "<im_patch>", "<im_start>", "<im_end>"  # the authors' constants.py


class AuthorsTokenizer:
    """A tokenizer that tokenizes as the authors' tokenizer_image_token (llava/mm_utils.py) does, for
    their checkpoints, which were trained so (train.py's preprocess_* call it): the text on each side of
    <image> tokenized on its own, each piece's BOS dropped but the first's. A piece tokenized alone
    starts with SentencePiece's "▁", so with a legacy-false tokenizer (Vicuna v1.5's) the "\n" after
    the image is "▁", "\n", a token more than the whole text tokenized at once gives.
    start_end (mm_use_im_start_end): <im_start> before the image and <im_end> after it, as their
    scripts write the prompt. Everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer, start_end=False):
        self.tokenizer, self.start_end = tokenizer, start_end
        # SentencePiece puts "▁" before every piece; tokenizers' Metaspace (transformers 5's LLaMA)
        # does not before one that starts with a space: a space more gives what theirs gives.
        pre = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
        self.space_lost = type(pre).__name__ == "Metaspace" and pre.prepend_scheme != "never"

    def __getattr__(self, name):  # only what the instance lacks; never `tokenizer` itself (copy, pickle)
        if name == "tokenizer" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __len__(self):
        return len(self.tokenizer)

    def __call__(self, text, return_offsets_mapping=False, **kwargs):
        """Returns input_ids (<image> as its token, where render() expects it) and, if asked, each
        token's (start, end) characters in `text`; a token added around the image has none (start == end)."""
        if not isinstance(text, str) or IMAGE not in text or kwargs:
            return self.tokenizer(text, return_offsets_mapping=return_offsets_mapping, **kwargs)
        pieces = text.split(IMAGE)
        ids, offsets, at = [], [], 0
        for i, piece in enumerate(pieces):
            before = IMAGE_END if self.start_end and i > 0 else " " if self.space_lost and piece[:1] == " " else ""
            after = IMAGE_START if self.start_end and i < len(pieces) - 1 else ""
            encoded = self.tokenizer(before + piece + after, return_offsets_mapping=True)
            piece_ids, piece_offsets = encoded["input_ids"], encoded["offset_mapping"]
            if i == 0:
                skip = int(bool(piece_ids) and piece_ids[0] == self.tokenizer.bos_token_id)  # their `offset`
                ids, offsets = piece_ids[:skip], piece_offsets[:skip]
            else:
                ids.append(self.tokenizer.convert_tokens_to_ids(IMAGE))
                offsets.append((at - len(IMAGE), at))
            for token, (a, b) in list(zip(piece_ids, piece_offsets))[skip:]:
                a, b = (min(max(x - len(before), 0), len(piece)) + at for x in (a, b))
                ids.append(token)
                offsets.append((a, b))
            at += len(piece) + len(IMAGE)
        encoded = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        return transformers.BatchEncoding(dict(encoded, offset_mapping=offsets) if return_offsets_mapping else encoded)


# ----------------------------------------------------------------------------------------------
# g and f_phi from pretrained models, by hub id or folder
# ----------------------------------------------------------------------------------------------

def vision_config(name_or_path):
    """The config of a CLIP-like model's vision half (or of a vision model on its own)."""
    if os.path.isdir(name_or_path):  # before errors_naming, which would name the folder twice
        refuse_remote_code(name_or_path)
    with errors_naming(name_or_path):
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    if not hasattr(getattr(config, "vision_config", config), "image_size"):
        raise ValueError(f"{name_or_path}: a {config.model_type} model, not a vision encoder "
                         f"(--vision and --llm swapped?)")
    return getattr(config, "vision_config", config)


def load_vision_tower(name_or_path, dtype=torch.float32, empty=False):
    """g and its image processor. empty: its layout only, weights not read (for the meta device)."""
    config = vision_config(name_or_path)
    if not empty:
        refuse_config_only(name_or_path)
    if empty:
        tower = AutoModel.from_config(config, dtype=dtype)
    else:
        with errors_naming(name_or_path), quiet_transformers():  # a CLIP checkpoint also holds a text tower
            tower = AutoModel.from_pretrained(name_or_path, config=config, dtype=dtype, trust_remote_code=False)
    return tower, AutoImageProcessor.from_pretrained(name_or_path, backend="pil", trust_remote_code=False)


def load_language_model(name_or_path, dtype=torch.float32, empty=False):
    """f_phi (a causal LM with its head) and its tokenizer, which pads. empty: as load_vision_tower's."""
    if os.path.isdir(name_or_path):
        refuse_remote_code(name_or_path)
    with errors_naming(name_or_path):
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{name_or_path}: a {config.model_type} model, not a language model "
                         f"(--vision and --llm swapped?)")
    if empty:
        language_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        refuse_config_only(name_or_path)
        with errors_naming(name_or_path):
            language_model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=False)
    if config_only(name_or_path) and not os.path.exists(os.path.join(name_or_path, "tokenizer_config.json")):
        return language_model, ids_only_tokenizer(config)  # empty (--plan): the batch is made of ids
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    add_image_token(tokenizer)
    if tokenizer.pad_token is None:  # LLaMA has none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return language_model, tokenizer


def config_only(path):
    """Whether `path` is a folder holding a model's config and no weights (configs/: for train.py --plan)."""
    return os.path.isdir(path) and not any(re.search(r"\.(safetensors|bin|pt|pth)$", f) for f in os.listdir(path))


def refuse_config_only(path):
    if config_only(path):
        raise ValueError(f"{path}: holds a config and no weights (a folder for train.py --plan); "
                         f"give a model with its weights (a hub id, or a folder with its weight files)")


def ids_only_tokenizer(config):
    """A config-only folder's tokenizer: one made-up piece per id, padding, BOS and EOS as the config
    says, and <image> after the vocabulary (where add_image_token puts it in LLaMA's 32,000)."""
    from tokenizers import Tokenizer, models
    vocab = {f"<id_{i}>": i for i in range(config.vocab_size)}
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "<id_0>")))
    for name in ("pad", "bos", "eos"):
        setattr(tokenizer, f"{name}_token", f"<id_{getattr(config, f'{name}_token_id', None) or 0}>")
    add_image_token(tokenizer)
    return tokenizer


# ----------------------------------------------------------------------------------------------
# A whole LLaVA in the llava-hf layout (and the authors' read), W alone after stage 1
# ----------------------------------------------------------------------------------------------

def save(model, path, state_dict=None, max_shard_size="5GB", pad_to_square=None):
    """Write `path` in the llava-hf layout, atomically: a crash leaves the old directory intact.

    state_dict: a full state dict gathered elsewhere (FSDP); default the model's own.
    pad_to_square: whether its images were padded to squares in training (train.py --pad-to-square;
    default: model.pad_to_square), recorded so that llava.load pads them at inference too.
    """
    from huggingface_hub import save_torch_state_dict
    state_dict = model.state_dict() if state_dict is None else state_dict
    weights = {rename(k, TO_HF): standalone(v) for k, v in state_dict.items()}
    lm = model.language_model.config
    if lm.tie_word_embeddings:
        weights.pop("language_model.lm_head.weight", None)
    if model.projector_kind == "linear":
        # transformers' projector is always Linear, act, Linear: write the paper's single Linear W
        # as Linear W, identity act, Linear I. It computes exactly W · Z_v.
        W = weights["multi_modal_projector.linear_1.weight"]
        weights["multi_modal_projector.linear_2.weight"] = torch.eye(W.shape[0], dtype=W.dtype)
        weights["multi_modal_projector.linear_2.bias"] = torch.zeros(W.shape[0], dtype=W.dtype)
    config = transformers.LlavaConfig(
        vision_config=model.vision_tower.config.to_dict(), text_config=lm.to_dict(),
        image_token_index=model.image_token_id, image_seq_length=model.num_image_tokens,
        projector_hidden_act="gelu" if model.projector_kind == "mlp2x_gelu" else "linear",
        vision_feature_layer=model.feature_layer,
        vision_feature_select_strategy="full" if model.keep_cls else "default",
        tie_word_embeddings=lm.tie_word_embeddings,
        llava_projector=model.projector_kind, llava_template=model.template.name,  # ours; transformers ignores them
        llava_pad_to_square=model.pad_to_square if pad_to_square is None else pad_to_square)
    config.architectures = ["LlavaForConditionalGeneration"]

    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_torch_state_dict(weights, tmp, max_shard_size=max_shard_size)
    apply_umask(*[os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".safetensors")])
    config.save_pretrained(tmp)
    model.tokenizer.save_pretrained(tmp)
    model.image_processor.save_pretrained(tmp)
    old = path.rstrip("/") + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load(path, make_model, dtype=torch.float32, device="cpu", vision=None, template=None):
    """A saved LLaVA: ours or llava-hf's, or the authors'. make_model: llava.LLaVA, passed in (the
    plumbing imports no section file). vision: for the authors' layout, where the tower is if not at
    `mm_vision_tower`. template: the one to use (default: the checkpoint's; model.template_why says
    why). The model is built on `device` with its weights uninitialized, then filled one weight file
    at a time: memory holds the model and one file, never a second copy.
    Strict: a missing, unexpected or mis-shaped weight is an error that names it."""
    name, path = path, resolve(path)
    settings = read_settings(path, name)
    settings["template"] = chosen_template(settings, template, path)
    tokenizer = checkpoint_tokenizer(path, settings)
    layout, text_config, config = settings["layout"], settings["text_config"], settings["vision_config"]
    vision = vision or settings["vision"]
    # The authors' loader reads the tower from mm_vision_tower; a copy in the checkpoint (saved in the
    # training dtype) is read only where their config says the tower was trained (clip_encoder.py).
    tower_from_checkpoint = layout == "llava" or settings["tower_trained"]
    options = {k: settings[k] for k in ("projector", "feature_layer", "keep_cls", "image_token_id", "template",
                                        "pad_to_square")}
    files = checkpoint_files(path)
    if layout == "authors":  # the tower's weights are the pretrained CLIP's
        vision_tower, processor = load_vision_tower(vision, dtype)
        vision_tower = vision_tower.to(device)
    with torch.device(device), no_init_weights():  # the weights come from the files
        if layout == "llava":
            vision_tower = AutoModel.from_config(config, dtype=dtype)
            processor = AutoImageProcessor.from_pretrained(path, backend="pil", trust_remote_code=False)
        language_model = AutoModelForCausalLM.from_config(text_config, dtype=dtype)
        model = make_model(vision_tower, language_model, tokenizer, processor, **options)
    model.template_why = settings["why"]  # chat.py and eval.py say it
    renames = FROM_CHECKPOINT if layout == "llava" else FROM_AUTHORS
    w_then_identity = model.projector_kind == "linear" and layout == "llava"  # as save() writes W

    def wanted(k):
        return not (w_then_identity and k.startswith("projector.2.") or
                    not tower_from_checkpoint and k.startswith("vision_tower."))
    shapes = {k: v for k, v in ((rename(k, renames), v) for k, v in stored_shapes(files).items()) if wanted(k)}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if wanted(k)}
    tied = model.language_model.config.tie_word_embeddings
    check_weights(expected, shapes, tied, path)
    for file in files:  # one file in memory at a time
        weights = {rename(k, renames): v for k, v in read_file(file, device).items()}
        if w_then_identity:
            I, bias = weights.pop("projector.2.weight", None), weights.pop("projector.2.bias", None)
            if I is not None and not torch.equal(I, torch.eye(len(I), dtype=I.dtype, device=I.device)) \
                    or bias is not None and bias.any():
                raise ValueError(f"{path}: a linear projector needs multi_modal_projector.linear_2 = identity")
        model.load_state_dict({k: v for k, v in weights.items() if wanted(k)}, strict=False)
        del weights
    if tied:
        model.language_model.tie_weights()
    return model


def pixel_values(image_processor, image, pad_to_square=False):
    """An image (PIL) as the model's input (1, 3, H, W); pad_to_square: padded first, as the authors'
    process_images does for image_aspect_ratio "pad" (expand2square over the processor's mean colour)."""
    if pad_to_square:
        image = expand2square(image.convert("RGB"), mean_colour(image_processor))
    return image_processor(images=image, return_tensors="pt")["pixel_values"]


def save_projector(model, path, state_dict=None):
    """Stage 1's output: W alone (keys 0.weight, 0.bias, ...), written atomically."""
    from safetensors.torch import save_file
    state_dict = model.projector.state_dict() if state_dict is None else state_dict
    save_file({k: v.contiguous() for k, v in state_dict.items()}, path + ".tmp",
              metadata={"projector": model.projector_kind})
    apply_umask(path + ".tmp")
    os.replace(path + ".tmp", path)


def load_projector(model, path):
    """W from stage 1: our projector.safetensors (or a directory holding it), or the authors'
    mm_projector.bin (read with weights_only=True)."""
    if os.path.isdir(path):
        path = os.path.join(path, "projector.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no stage-1 projector here; run stage 1 or pass --projector")
    weights = read_file(path)
    weights = {re.sub(r"^(model\.)?mm_projector\.", "", k): v for k, v in weights.items()}
    weights = {"0." + k if k in ("weight", "bias") else k: v for k, v in weights.items()}  # the authors' linear W
    expected = model.projector.state_dict()
    misfits = sorted(set(expected) ^ set(weights)) or [k for k in expected if weights[k].shape != expected[k].shape]
    if misfits:
        raise ValueError(f"{path}: does not fit this model's {model.projector_kind} projector "
                         f"(weight {misfits[0]}); was it made for other models?")
    model.projector.load_state_dict(weights)


# ----------------------------------------------------------------------------------------------
# Weight files: names in each layout, read one file at a time
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def errors_naming(path):
    """Reading `path` inside: an error that does not say where (a corrupt weight file) names it."""
    try:
        yield
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


def rename(key, renames):
    for pattern, replacement in renames:
        new_key, n = re.subn(pattern, replacement, key)
        if n:
            return new_key
    return key


def apply_umask(*paths):
    """safetensors writes its files readable by their owner alone; give them what the user's umask
    gives any new file."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        os.chmod(path, 0o666 & ~umask)


def standalone(tensor):
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
        with errors_naming(file):
            return load_file(file, device=str(device))
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
            with errors_naming(file), safe_open(file, "pt") as f:
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
