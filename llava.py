"""§4.1 Architecture of "Visual Instruction Tuning" (LLaVA).

    X_v --g (vision encoder, frozen)--> Z_v --W (projection)--> H_v --+
    X_q --word embeddings-----------------------------------> H_q --+--> f_phi (LLM) --> X_a

One directory holds a model, in the layout of transformers' LlavaForConditionalGeneration
(llava-hf): config.json, model*.safetensors, the tokenizer and the image processor. A model saved
here loads in transformers and a llava-hf checkpoint loads here; so does the authors' own layout.

    import llava
    model = llava.build("openai/clip-vit-large-patch14", "lmsys/vicuna-13b-v1.5")  # new, W random
    model = llava.load("llava-hf/llava-1.5-7b-hf")                                 # or a saved one
    for text in model.generate_text(conversation, image): print(text, end="")
"""
import json
import os
import re
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

from transformers.initialization import no_init_weights
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM,
                          AutoTokenizer, LlavaConfig)

import data
import formats


# ----------------------------------------------------------------------------------------------
# §4.1: g, W and f_phi
# ----------------------------------------------------------------------------------------------

def make_projector(kind, vision_dim, text_dim):
    """W: from the vision encoder's width to the LLM's word-embedding width."""
    if kind == "linear":  # the paper: H_v = W · Z_v  (Eq. 1)
        return nn.Sequential(nn.Linear(vision_dim, text_dim))
    if kind == "mlp2x_gelu":  # LLaVA-1.5: Linear, GELU, Linear
        return nn.Sequential(nn.Linear(vision_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))
    raise ValueError(f"unknown projector {kind!r}; choose linear or mlp2x_gelu")


def shifted_targets(labels):
    """Eq. 3's targets: position t predicts token t+1, so shift the labels, not the logits.
    Returns targets (B, T), IGNORE where nothing is trained, and keep (B, T), True where a target is
    (transformers' `logits_to_keep` takes it: the LM head runs at those positions only)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=data.IGNORE)  # (B, T)
    return targets, targets != data.IGNORE


class LLaVA(nn.Module):
    def __init__(self, vision_tower, language_model, tokenizer, image_processor, projector="mlp2x_gelu",
                 feature_layer=-2, keep_cls=False, image_token_id=None, template="paper"):
        super().__init__()
        self.vision_tower = vision_tower.requires_grad_(False).eval()  # g, always frozen
        self.projector = make_projector(projector, vision_tower.config.hidden_size,
                                        language_model.config.hidden_size)  # W
        self.language_model = language_model  # f_phi, a causal LM with its LM head
        self.tokenizer, self.image_processor = tokenizer, image_processor
        n = vision_tower.config.num_hidden_layers  # hidden states: -n - 1 (the input) to n (the last layer)
        if not -n - 1 <= feature_layer <= n:
            raise ValueError(f"feature layer {feature_layer}: the vision encoder has {n} layers; choose -{n + 1}..{n}")
        self.projector_kind, self.feature_layer, self.keep_cls = projector, feature_layer, keep_cls
        self.image_token_id = image_token_id
        self.template = data.get_template(template)
        self.num_image_tokens = formats.count_image_tokens(vision_tower.config.image_size, vision_tower.config.patch_size,
                                                   keep_cls)  # N_v: how many positions the image takes

    def train(self, mode=True):
        super().train(mode)
        self.vision_tower.eval()  # frozen: no dropout, whatever the rest does
        return self

    def encode_images(self, pixel_values):
        """X_v (B, 3, H, W) -> H_v (B, N_v, D), the visual tokens in the word-embedding space."""
        with torch.no_grad():  # g is frozen: no activations kept for backward
            # Z_v = g(X_v): the grid features of one layer; the paper's default is the one before
            # the last (feature_layer=-2). Position 0 is CLS, dropped unless keep_cls.
            Z_v = self.vision_features(pixel_values.to(self.vision_tower.dtype))  # (B, 1 + N, D_v)
            Z_v = Z_v if self.keep_cls else Z_v[:, 1:]  # (B, N_v, D_v)
        W = self.projector
        return W(Z_v.to(W[0].weight.dtype))  # H_v = W · Z_v  (Eq. 1), (B, N_v, D)

    def feature_layers(self):
        """The layers Z_v needs: a CLIP tower's layers up to `feature_layer` (for the paper's -2,
        all but the last); the ones after it cannot change Z_v. None for a tower of another layout."""
        if not hasattr(self.vision_tower, "pre_layrnorm"):
            return None
        layers = self.vision_tower.encoder.layers
        return layers[:range(len(layers) + 1)[self.feature_layer]]  # hidden state i: after layer i (0: input)

    def vision_features(self, pixel_values):
        """The hidden states of layer `feature_layer` of the vision tower, (B, 1 + N, D_v)."""
        layers, tower = self.feature_layers(), self.vision_tower
        if layers is None:  # not CLIP's layout: run the whole tower, keep one of its hidden states
            return tower(pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))  # (B, 1 + N, D_v)
        for layer in layers:
            hidden = layer(hidden, None)  # no attention mask: every patch sees every patch
        return hidden

    def embed(self, input_ids, pixel_values=None):
        """Word embeddings of the text, with H_v written over the image positions."""
        is_image = input_ids == self.image_token_id  # (B, T)
        # The image id may lie outside the vocabulary (the authors use -200): embed a 0 there.
        embeds = self.language_model.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # (B, T, D)
        if pixel_values is None:
            if is_image.any():
                raise ValueError("input_ids hold image positions but no pixel_values were given")
            if self.training and self.projector[0].weight.requires_grad:
                # A text-only batch still runs W (times 0): under FSDP every rank must take part
                # in W's gradient reduction, whatever its batch holds.
                embeds = embeds + 0 * self.projector(embeds.new_zeros(1, self.projector[0].in_features)).sum()
            return embeds
        H_v = self.encode_images(pixel_values)  # (B_img, N_v, D)
        if is_image.sum() != H_v.shape[0] * H_v.shape[1]:
            raise ValueError(f"{int(is_image.sum())} image positions in input_ids but "
                             f"{H_v.shape[0]} images x {H_v.shape[1]} visual tokens")
        # Images fill the image positions in order: row by row through the batch.
        return embeds.masked_scatter(is_image.unsqueeze(-1), H_v.to(embeds.dtype))

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None,
                cache=None, use_cache=False, num_items=None):
        """Returns (logits, loss or None, the KV cache).

        logits: (B, T, V) without labels; with labels (N, V), only at the N positions that have a
        target: the LM head never runs where nothing is trained (in stage 1, the ~600 positions of
        instruction and image before a caption of a few dozen), and the (B, T, V) logits never exist.
        loss (Eq. 3): the negative log-likelihood of every labelled token given the ones before it,
        averaged over the labelled tokens, or summed and divided by num_items when given (so that
        gradient accumulation over micro-batches and ranks weighs every token the same).
        """
        inputs_embeds = self.embed(input_ids, pixel_values)  # (B, T, D)
        keep = 0  # transformers' logits_to_keep: 0 keeps every position
        if labels is not None:
            targets, keep = shifted_targets(labels)  # (B, T) each
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  cache=cache, use_cache=use_cache, logits_to_keep=keep)
        logits = out.logits  # (B, T, V), or (N, V) with labels
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
            loss = loss / (num_items if num_items is not None else keep.sum().clamp(min=1))
        return logits, loss, out.cache

    # ------------------------------------------------------------------------------------------
    # Generation (§5.1): greedy or sampled, one token at a time, with a KV cache
    # ------------------------------------------------------------------------------------------

    def prepare(self, conversations, image=None):
        """A conversation ending in a human turn (and a PIL image) -> the model's inputs (1, T)."""
        input_ids, _ = data.render(conversations, self.tokenizer, self.template,
                                   image_token_id=self.image_token_id if image is not None else None,
                                   num_image_tokens=self.num_image_tokens, for_generation=True)
        device = self.projector[0].weight.device
        pixel_values = None
        if image is not None:
            pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"].to(device)
        return torch.tensor([input_ids], device=device), pixel_values

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, max_new_tokens=256, temperature=0.0, top_p=1.0,
                 use_cache=True, stop=None):
        """Yield new token ids one by one until EOS, the stop string (the template's <STOP>), or
        max_new_tokens. temperature 0 is greedy; otherwise sample with temperature and top-p."""
        stop = self.template.stop if stop is None else stop
        warpers = []
        if temperature > 0:
            warpers = [transformers.TemperatureLogitsWarper(temperature)]
            if top_p < 1.0:
                warpers.append(transformers.TopPLogitsWarper(top_p))
        inputs_embeds = self.embed(input_ids, pixel_values)  # (1, T, D): the prompt, once
        cache = transformers.DynamicCache() if use_cache else None
        new_ids = []
        for _ in range(max_new_tokens):
            out = self.language_model(inputs_embeds=inputs_embeds, cache=cache, use_cache=use_cache,
                                      logits_to_keep=1)  # the LM head for the last position only
            logits = out.logits[:, -1].float()  # (1, V): the next token's scores
            if temperature > 0:
                for warp in warpers:
                    logits = warp(input_ids, logits)
                next_id = torch.multinomial(logits.softmax(-1), 1)  # (1, 1)
            else:
                next_id = logits.argmax(-1, keepdim=True)  # (1, 1)
            token = int(next_id)
            new_ids.append(token)
            yield token
            # A stop string that has just appeared lies in the last few tokens: decode only those.
            if token == self.tokenizer.eos_token_id or (stop and stop in self.tokenizer.decode(new_ids[-len(stop) - 4:])):
                return
            next_embeds = self.language_model.get_input_embeddings()(next_id)  # (1, 1, D)
            if use_cache:  # the cache holds keys and values of all earlier positions
                inputs_embeds = next_embeds
            else:  # no cache: run the whole sequence again
                inputs_embeds = torch.cat([inputs_embeds, next_embeds], dim=1)
            input_ids = torch.cat([input_ids, next_id], dim=1)

    def generate_text(self, conversations, image=None, stop=None, **kwargs):
        """Yield the answer as pieces of text as they are generated, without the <STOP>."""
        input_ids, pixel_values = self.prepare(conversations, image)
        stop = self.template.stop if stop is None else stop
        ids, shown = [], 0
        for token in self.generate(input_ids, pixel_values, stop=stop, **kwargs):
            if token == self.tokenizer.eos_token_id:
                break
            ids.append(token)
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            if stop and stop in text:
                yield text[shown:text.index(stop)]
                return
            # Hold back a tail that may be the start of the stop string or of a multi-byte letter.
            safe = len(text.rstrip("\ufffd"))
            for k in range(max(shown, safe - len(stop) + 1), safe):
                if stop and stop.startswith(text[k:safe]):
                    safe = k
                    break
            if safe > shown:
                yield text[shown:safe]
                shown = safe
        text = self.tokenizer.decode(ids)
        if len(text) > shown:
            yield text[shown:]

    def answer(self, conversations, image=None, stop=None, **kwargs):
        """The whole answer at once, decoded in one piece (as answer_batch decodes it)."""
        stop = self.template.stop if stop is None else stop
        ids = [i for i in self.generate(*self.prepare(conversations, image), stop=stop, **kwargs)
               if i != self.tokenizer.eos_token_id]
        text = self.tokenizer.decode(ids)
        return (text.split(stop)[0] if stop else text).strip()

    @torch.no_grad()
    def answer_batch(self, prompts, images, max_new_tokens=256):
        """Greedy answers to many prompts at once (for evaluation): `prompts` are conversations
        ending in a human turn, `images` one PIL image or None each. The prompts are padded on the
        left, so that every row's next token comes at the same place; transformers' generate then
        takes each row's positions from the attention mask, so a row reads as it would alone."""
        prepared = [self.prepare(p, i) for p, i in zip(prompts, images)]  # each: (1, T_i) ids, pixels or None
        rows = [ids[0].tolist() for ids, _ in prepared]
        shown = [pixels for _, pixels in prepared if pixels is not None]
        pixel_values = torch.cat(shown) if shown else None  # (B_img, 3, H, W)
        longest = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows])  # (B, T), padded on the left
        attention_mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])  # (B, T)
        device = self.projector[0].weight.device
        new_ids = self.language_model.generate(
            inputs_embeds=self.embed(input_ids.to(device), pixel_values), attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=pad, stop_strings=self.template.stop or None, tokenizer=self.tokenizer)  # (B, new)
        texts = []
        for ids in new_ids.tolist():  # each row up to its EOS (then padding), and up to the stop string
            ids = ids[:ids.index(self.tokenizer.eos_token_id)] if self.tokenizer.eos_token_id in ids else ids
            text = self.tokenizer.decode(ids)
            texts.append((text.split(self.template.stop)[0] if self.template.stop else text).strip())
        return texts


# ----------------------------------------------------------------------------------------------
# Building a new LLaVA from a vision encoder and an LLM (the start of stage 1)
# ----------------------------------------------------------------------------------------------

def load_vision_tower(name_or_path, dtype=torch.float32, empty=False):
    """The vision half of a CLIP-like model (or a vision model on its own), by hub id or directory.
    empty: its layout only, weights not read (to be built on the meta device)."""
    if os.path.isdir(name_or_path):
        formats.refuse_remote_code(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    vision_config = getattr(config, "vision_config", config)
    if not hasattr(vision_config, "image_size"):
        raise ValueError(f"{name_or_path}: a {config.model_type} model, not a vision encoder "
                         f"(--vision and --llm swapped?)")
    if empty:
        return AutoModel.from_config(vision_config, dtype=dtype)
    with formats.quiet_transformers():  # a CLIP checkpoint also holds the text tower we leave out
        return AutoModel.from_pretrained(name_or_path, config=vision_config, dtype=dtype, trust_remote_code=False)


def build(vision, llm, projector="mlp2x_gelu", feature_layer=-2, keep_cls=False, template="paper",
          dtype=torch.float32, vision_dtype=None, empty=False):
    """A new LLaVA: g and f_phi from pretrained models (hub ids or directories), W random (FP32).
    dtype: f_phi's; vision_dtype: g's (default: the same). Checkpoints are converted as read (Vicuna
    ships float16). empty: the same model without reading any weights (for the meta device)."""
    for folder in (vision, llm):  # before formats.named, which would name the folder twice
        if os.path.isdir(folder):
            formats.refuse_remote_code(folder)
    vision_tower = formats.named(vision, lambda: load_vision_tower(vision, vision_dtype or dtype, empty))
    config = formats.named(llm, lambda: AutoConfig.from_pretrained(llm, trust_remote_code=False))
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{llm}: a {config.model_type} model, not a language model (--vision and --llm swapped?)")
    if empty:
        language_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        language_model = formats.named(llm, lambda: AutoModelForCausalLM.from_pretrained(
            llm, dtype=dtype, trust_remote_code=False))
    tokenizer = AutoTokenizer.from_pretrained(llm, trust_remote_code=False)
    # An <image> token in the vocabulary, so that transformers' Llava can read what we save.
    image_token_id = data.add_image_token(tokenizer)
    if tokenizer.pad_token is None:  # LLaMA has none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=not empty)
    processor = AutoImageProcessor.from_pretrained(vision, backend="pil", trust_remote_code=False)
    return LLaVA(vision_tower, language_model, tokenizer, processor,
                 projector, feature_layer, keep_cls, image_token_id, template)


# ----------------------------------------------------------------------------------------------
# Saving and loading: the llava-hf layout, and the authors' layout
# ----------------------------------------------------------------------------------------------

def save(model, path, state_dict=None, max_shard_size="5GB"):
    """Write `path` in the llava-hf layout, atomically: a crash leaves the old directory intact.

    state_dict: a full state dict gathered elsewhere (FSDP); default the model's own.
    """
    from huggingface_hub import save_torch_state_dict
    state_dict = model.state_dict() if state_dict is None else state_dict
    weights = {formats.rename(k, formats.TO_HF): formats.own_storage(v) for k, v in state_dict.items()}
    lm = model.language_model.config
    if lm.tie_word_embeddings:
        weights.pop("language_model.lm_head.weight", None)
    if model.projector_kind == "linear":
        # transformers' projector is always Linear, act, Linear: write the paper's single Linear W
        # as Linear W, identity act, Linear I. It computes exactly W · Z_v.
        W = weights["multi_modal_projector.linear_1.weight"]
        weights["multi_modal_projector.linear_2.weight"] = torch.eye(W.shape[0], dtype=W.dtype)
        weights["multi_modal_projector.linear_2.bias"] = torch.zeros(W.shape[0], dtype=W.dtype)
    config = LlavaConfig(
        vision_config=model.vision_tower.config.to_dict(), text_config=lm.to_dict(),
        image_token_index=model.image_token_id, image_seq_length=model.num_image_tokens,
        projector_hidden_act="gelu" if model.projector_kind == "mlp2x_gelu" else "linear",
        vision_feature_layer=model.feature_layer,
        vision_feature_select_strategy="full" if model.keep_cls else "default",
        tie_word_embeddings=lm.tie_word_embeddings,
        llava_projector=model.projector_kind, llava_template=model.template.name)  # ours; transformers ignores them
    config.architectures = ["LlavaForConditionalGeneration"]

    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_torch_state_dict(weights, tmp, max_shard_size=max_shard_size)
    formats.usual_mode(*[os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".safetensors")])
    config.save_pretrained(tmp)
    model.tokenizer.save_pretrained(tmp)
    model.image_processor.save_pretrained(tmp)
    old = path.rstrip("/") + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load(path, dtype=torch.float32, vision=None, template=None, device="cpu"):
    """A saved LLaVA: ours or llava-hf (model_type "llava"), or the authors' ("llava_llama").

    The model is built on `device` with its weights uninitialized, then filled one weight file at a
    time: memory holds the model and one file, never a second copy.
    Strict: a missing, unexpected or mis-shaped weight is an error that names it.
    vision: for the authors' layout, where to find the vision tower if not `mm_vision_tower`.
    """
    path = formats.resolve(path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    data.add_image_token(tokenizer)  # the authors' tokenizer has none (they mark the image with id -200)
    weight_files = formats.checkpoint_files(path)
    if config.get("model_type") == "llava":  # llava-hf, or ours
        llava_config = LlavaConfig.from_dict(config)
        projector = config.get("llava_projector", "mlp2x_gelu")
        if projector != "linear" and config.get("projector_hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: projector_hidden_act {config['projector_hidden_act']!r} is not supported")
        with torch.device(device), no_init_weights():  # the weights come from the files
            vision_tower = AutoModel.from_config(llava_config.vision_config, dtype=dtype)
            language_model = AutoModelForCausalLM.from_config(llava_config.text_config, dtype=dtype)
            processor = AutoImageProcessor.from_pretrained(path, backend="pil", trust_remote_code=False)
            model = LLaVA(vision_tower, language_model, tokenizer, processor,
                          projector, llava_config.vision_feature_layer,
                          llava_config.vision_feature_select_strategy == "full",
                          llava_config.image_token_index, template or config.get("llava_template", "llava15"))
        rules = formats.FROM_CHECKPOINT
    elif "mm_vision_tower" in config:  # the authors' LlavaLlamaForCausalLM
        text_config = AutoConfig.for_model("llama", **{k: v for k, v in config.items() if k != "model_type"})
        vision = vision or config["mm_vision_tower"]
        vision_tower = load_vision_tower(vision, dtype).to(device)
        with torch.device(device), no_init_weights():
            language_model = AutoModelForCausalLM.from_config(text_config, dtype=dtype)
            processor = AutoImageProcessor.from_pretrained(vision, backend="pil", trust_remote_code=False)
            model = LLaVA(vision_tower, language_model, tokenizer, processor,
                          config.get("mm_projector_type", "linear"), config.get("mm_vision_select_layer", -2),
                          config.get("mm_vision_select_feature", "patch") == "cls_patch",
                          formats.AUTHORS_IMAGE_TOKEN_ID, template or formats.authors_template(config))
        rules = formats.FROM_AUTHORS
    else:
        raise ValueError(f"{path}/config.json: neither a LLaVA (model_type 'llava') nor the authors' "
                         f"layout (mm_vision_tower); got model_type {config.get('model_type')!r}")
    linear = model.projector_kind == "linear" and rules is formats.FROM_CHECKPOINT  # save() wrote W as Linear, I, Linear
    shapes = {formats.rename(k, rules): v for k, v in formats.stored_shapes(weight_files).items()}
    if linear:
        shapes = {k: v for k, v in shapes.items() if not k.startswith("projector.2.")}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if rules is formats.FROM_AUTHORS and not any(k.startswith("vision_tower.") for k in shapes):
        expected = {k: v for k, v in expected.items() if not k.startswith("vision_tower.")}  # from mm_vision_tower
    formats.check_weights(expected, shapes, model.language_model.config.tie_word_embeddings, path)
    for file in weight_files:  # one file in memory at a time
        weights = {formats.rename(k, rules): v for k, v in formats.read_file(file, device).items()}
        if linear:
            eye, bias = weights.pop("projector.2.weight", None), weights.pop("projector.2.bias", None)
            if eye is not None and not torch.equal(eye, torch.eye(eye.shape[0], dtype=eye.dtype, device=eye.device)) \
                    or bias is not None and bias.any():
                raise ValueError(f"{path}: a linear projector needs multi_modal_projector.linear_2 = identity")
        model.load_state_dict(weights, strict=False)
        del weights
    if model.language_model.config.tie_word_embeddings:
        model.language_model.tie_weights()
    return model


def save_projector(model, path, state_dict=None):
    """Stage 1's output: W alone (keys 0.weight, 0.bias, ...), written atomically."""
    from safetensors.torch import save_file
    state_dict = model.projector.state_dict() if state_dict is None else state_dict
    save_file({k: v.contiguous() for k, v in state_dict.items()}, path + ".tmp",
              metadata={"projector": model.projector_kind})
    formats.usual_mode(path + ".tmp")
    os.replace(path + ".tmp", path)


def load_projector(model, path):
    """W from stage 1: our projector.safetensors (or a directory holding it), or the authors'
    mm_projector.bin (read with weights_only=True)."""
    if os.path.isdir(path):
        path = os.path.join(path, "projector.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no stage-1 projector here; run stage 1 or pass --projector")
    weights = formats.read_file(path)
    weights = {re.sub(r"^(model\.)?mm_projector\.", "", k): v for k, v in weights.items()}
    weights = {"0." + k if k in ("weight", "bias") else k: v for k, v in weights.items()}  # the authors' linear W
    expected = model.projector.state_dict()
    problems = sorted(set(expected) ^ set(weights)) or [k for k in expected if weights[k].shape != expected[k].shape]
    if problems:
        raise ValueError(f"{path}: does not fit this model's {model.projector_kind} projector "
                         f"(weight {problems[0]}); was it made for other models?")
    model.projector.load_state_dict(weights)


