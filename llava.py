"""§4.1 Architecture of "Visual Instruction Tuning" (LLaVA).

    X_v --g (vision encoder, frozen)--> Z_v --W (projection)--> H_v --+
    X_q --word embeddings-----------------------------------> H_q --+--> f_phi (LLM) --> X_a

    import llava
    model = llava.build("openai/clip-vit-large-patch14", "lmsys/vicuna-13b-v1.5")  # new, W random
    model = llava.load("llava-hf/llava-1.5-7b-hf", device="cuda")                  # or a saved one
    for text in model.generate_text(conversation, image): print(text, end="")

Model folders on disk (our layout, llava-hf's and the authors') are formats.py's.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from torch._subclasses.fake_tensor import is_fake

import data
import decoding
import formats


def make_projector(kind, vision_dim, text_dim):
    """W: from the vision encoder's width to the LLM's word-embedding width."""
    if kind == "linear":  # the paper: H_v = W · Z_v  (Eq. 1)
        return nn.Sequential(nn.Linear(vision_dim, text_dim))
    if kind == "mlp2x_gelu":  # LLaVA-1.5: Linear, GELU, Linear
        return nn.Sequential(nn.Linear(vision_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))
    raise ValueError(f"unknown projector {kind!r}; choose linear or mlp2x_gelu")


def shifted_targets(labels):
    """Eq. 3's targets: position t predicts token t+1, so shift the labels, not the logits.
    Returns targets (B, T), IGNORE where nothing is trained, and has_target (B, T), True where a
    target is (transformers' `logits_to_keep` takes it: the LM head runs at those positions only)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=data.IGNORE)  # (B, T)
    return targets, targets != data.IGNORE


class LLaVA(nn.Module):
    def __init__(self, vision_tower, language_model, tokenizer, image_processor, projector="mlp2x_gelu",
                 feature_layer=-2, keep_cls=False, image_token_id=None, template="paper", pad_to_square=False):
        super().__init__()
        n = vision_tower.config.num_hidden_layers  # hidden states: -n - 1 (the input) to n (the last layer)
        if not -n - 1 <= feature_layer <= n:
            raise ValueError(f"feature layer {feature_layer}: the vision encoder has {n} layers; choose -{n + 1}..{n}")
        skip_layers_after(vision_tower, feature_layer)
        self.vision_tower = vision_tower.requires_grad_(False).eval()  # g, always frozen
        self.projector = make_projector(projector, vision_tower.config.hidden_size,
                                        language_model.config.hidden_size)  # W
        self.language_model = language_model  # f_phi, a causal LM with its LM head
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.projector_kind, self.feature_layer, self.keep_cls = projector, feature_layer, keep_cls
        self.image_token_id, self.pad_to_square = image_token_id, pad_to_square  # images padded as in training
        self.compile_decoding = False  # generate's default: chat.py and eval.py --compile say True
        self.template = data.get_template(template)
        self.num_image_tokens = formats.count_image_tokens(vision_tower.config.image_size,
                                                           vision_tower.config.patch_size, keep_cls)  # N_v

    def train(self, mode=True):
        super().train(mode)
        self.vision_tower.eval()  # frozen: no dropout, whatever the rest does
        return self

    def encode_images(self, pixel_values):
        """X_v (B, 3, H, W) -> H_v (B, N_v, D), the visual tokens in the word-embedding space."""
        with torch.no_grad():  # g is frozen: no activations kept for backward
            # Z_v = g(X_v): the grid features of one layer; the paper's default is the one before
            # the last (feature_layer=-2), and the layers after it do not run (skip_layers_after).
            # Position 0 is CLS, dropped unless keep_cls.
            out = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
            Z_v = out.hidden_states[self.feature_layer]  # (B, 1 + N, D_v)
            Z_v = Z_v if self.keep_cls else Z_v[:, 1:]  # (B, N_v, D_v)
        W = self.projector
        return W(Z_v.to(W[0].weight.dtype))  # H_v = W · Z_v  (Eq. 1), (B, N_v, D)

    def embed(self, input_ids, pixel_values=None):
        """Word embeddings of the text (B, T, D), with H_v written over the image positions."""
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
        if not is_fake(is_image) and is_image.sum() != H_v.shape[0] * H_v.shape[1]:  # fake (--plan): no values
            raise ValueError(f"{int(is_image.sum())} image positions in input_ids but "
                             f"{H_v.shape[0]} images x {H_v.shape[1]} visual tokens")
        # Images fill the image positions in order: row by row through the batch.
        return embeds.masked_scatter(is_image.unsqueeze(-1), H_v.to(embeds.dtype))

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, reduction="mean",
                target_positions=None):
        """Returns (logits, loss or None).

        logits: (B, T, V) without labels; with labels (N, V), only at the N positions that have a
        target: the LM head never runs where nothing is trained (in stage 1, the ~600 positions of
        instruction and image before a caption of a few dozen), and the (B, T, V) logits never exist.
        target_positions: those N positions, as data.collate computes them (default: from labels).
        loss (Eq. 3): the negative log-likelihood of every labelled token given the ones before it,
        averaged over the labelled tokens; reduction="sum": summed (train.py divides by the tokens
        of all micro-batches and ranks, so that every token weighs the same).
        """
        inputs_embeds = self.embed(input_ids, pixel_values)  # (B, T, D)
        if labels is None:
            return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits, None
        positions = data.target_positions(labels) if target_positions is None else target_positions  # (N,)
        targets = shifted_targets(labels)[0].flatten()[positions]  # (N,)
        hidden = self.language_model.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        logits = self.language_model.get_output_embeddings()(hidden.last_hidden_state.flatten(0, 1)[positions])
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")  # Eq. 3, summed; logits (N, V)
        assert reduction in ("mean", "sum"), reduction
        return logits, loss / max(len(positions), 1) if reduction == "mean" else loss

    # ------------------------------------------------------------------------------------------
    # Generation (§5.1): one loop, a batch of rows, one token at a time, with a KV cache
    # ------------------------------------------------------------------------------------------

    @property
    def context_size(self):  # the most positions f_phi reads: prompt and answer together
        return getattr(self.language_model.config, "max_position_embeddings", None) or 4096

    def prepare(self, conversation, image=None):
        """A conversation ending in a human turn (and a PIL image) -> input_ids (1, T), pixel_values."""
        input_ids, _ = data.render(conversation, self.tokenizer, self.template,
                                   image_token_id=self.image_token_id if image is not None else None,
                                   num_image_tokens=self.num_image_tokens, for_generation=True)
        device = self.projector[0].weight.device
        pixel_values = None
        if image is not None:
            pixel_values = formats.pixel_values(self.image_processor, image, self.pad_to_square).to(device)
        return torch.tensor([input_ids], device=device), pixel_values

    def prepare_batch(self, conversations, images):
        """Conversations and their images (PIL or None each) -> input_ids (B, T) padded on the left, so
        that every row's next token comes at the same place; pixel_values of the images given
        (B_img, 3, H, W) or None; attention_mask (B, T), 0 on the padding (of any id: masked out)."""
        rows, pixels = [], []
        for conversation, image in zip(conversations, images):
            input_ids, pixel_values = self.prepare(conversation, image)
            rows.append(input_ids[0])
            pixels += [] if pixel_values is None else [pixel_values]
        T = max(len(row) for row in rows)
        input_ids = torch.stack([F.pad(row, (T - len(row), 0), value=self.tokenizer.pad_token_id or 0) for row in rows])
        attention_mask = torch.stack([F.pad(torch.ones_like(row), (T - len(row), 0)) for row in rows])
        return input_ids, torch.cat(pixels) if pixels else None, attention_mask

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=256, temperature=0.0,
                 top_p=1.0, stop=None, use_cache=True, compile=None):
        """The one generation loop: the chat's stream, the one-shot answer and evaluation's batches.
        input_ids (B, T), padded on the left where attention_mask is 0; each row's positions count its
        own tokens, so a row reads as it would alone. Greedy at temperature 0; otherwise temperature,
        then top-p, then one draw. Yields each step's new token of every row (B ids), None for a row
        that has stopped: after EOS, or after the token that completes `stop` (default: the
        template's <STOP>). Ends when every row has stopped, or after max_new_tokens. compile
        (default: self.compile_decoding): the one-token steps run through torch.compile."""
        stop = self.template.stop if stop is None else stop
        warpers = [transformers.TemperatureLogitsWarper(temperature)] if temperature > 0 else []
        if temperature > 0 and top_p < 1.0:
            warpers.append(transformers.TopPLogitsWarper(top_p))
        B, T = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask  # (B, T)
        mask = F.pad(mask, (0, max_new_tokens), value=1)  # (B, T + max_new): one mask for every step
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T + max_new): padding takes none
        # Keys and values of every place, allocated once; each step writes its token's in place.
        cache = transformers.StaticCache(self.language_model.config, T + max_new_tokens) if use_cache else None
        compile = self.compile_decoding if compile is None else compile
        decode = torch.compile(self.next_scores) if compile else self.next_scores  # compiled at its first call
        inputs_embeds = self.embed(input_ids, pixel_values)  # (B, T, D): the prompt, once, uncompiled
        stops = decoding.StopCheck(self.tokenizer, stop, B)  # the stop string, found on token ids
        running = [True] * B
        for t in range(max_new_tokens):
            # With the cache, only the new tokens go in (the prompt, then one a step); without, all again.
            start = T + t - inputs_embeds.shape[1]
            run = self.next_scores if t == 0 else decode
            scores = run(inputs_embeds, mask if use_cache else mask[:, :T + t], positions[:, start:T + t], cache)
            for warp in warpers:
                scores = warp(input_ids, scores)  # (they read the scores only)
            next_ids = torch.multinomial(scores.softmax(-1), 1) if warpers else scores.argmax(-1, keepdim=True)
            step = [token if alive else None for token, alive in zip(next_ids[:, 0].tolist(), running)]  # (B,)
            running = [token is not None and not stops.ends(row, token) for row, token in enumerate(step)]
            yield step
            if not any(running):
                return
            next_embeds = self.language_model.get_input_embeddings()(next_ids)  # (B, 1, D)
            inputs_embeds = next_embeds if use_cache else torch.cat([inputs_embeds, next_embeds], dim=1)

    def next_scores(self, inputs_embeds, mask, positions, cache):
        """f_phi on the new positions (B, n, D), the earlier ones read from the cache: the scores of
        every row's next token (B, V), in FP32. The LM head runs at the last position only."""
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions,
                                  cache=cache, use_cache=cache is not None, logits_to_keep=1)
        return out.logits[:, -1].float()

    def answer_text(self, ids, stop):
        """The text of an answer's ids: without its EOS, up to the stop string."""
        text = self.tokenizer.decode(ids[:-1] if ids and ids[-1] == self.tokenizer.eos_token_id else ids)
        return text.split(stop)[0] if stop else text

    def generate_text(self, conversation, image=None, stop=None, **kwargs):
        """The chat's stream: the answer in pieces of text as it is generated, without the stop string."""
        stop = self.template.stop if stop is None else stop
        ids, shown, byte_ids = [], 0, decoding.byte_tokens(self.tokenizer)  # shown: characters yielded
        for [token] in self.generate(*self.prepare(conversation, image), stop=stop, **kwargs):
            ids.append(token)
            settled = len(ids)  # a run of byte tokens at the end may yet read otherwise: held back
            while settled and ids[settled - 1] in byte_ids:
                settled -= 1
            text = self.answer_text(ids[:settled], stop)
            # Hold back a tail that may be the start of the stop string or of a multi-byte letter.
            safe = len(text.rstrip("\ufffd"))
            for k in range(max(shown, safe - len(stop) + 1), safe):
                if stop and stop.startswith(text[k:safe]):
                    safe = k
                    break
            if safe > shown:
                yield text[shown:safe]
                shown = safe
        text = self.answer_text(ids, stop)  # the answer has ended: nothing more is held back
        if len(text) > shown:
            yield text[shown:]

    def answer_batch(self, conversations, images, max_new_tokens=256, stop=None, **sampling):
        """The answers to many conversations at once (evaluation), each ending in a human turn, with a
        PIL image or None each: one batch through generate (greedy unless `sampling` says otherwise),
        each answer decoded whole."""
        stop = self.template.stop if stop is None else stop
        answers = [[] for _ in conversations]
        for step in self.generate(*self.prepare_batch(conversations, images), max_new_tokens=max_new_tokens,
                                  stop=stop, **sampling):
            for ids, token in zip(answers, step):
                ids += [] if token is None else [token]
        return [self.answer_text(ids, stop).strip() for ids in answers]

    def answer(self, conversation, image=None, **kwargs):
        """The whole answer at once (the one-shot mode): a batch of one."""
        return self.answer_batch([conversation], [image], **kwargs)[0]


# ----------------------------------------------------------------------------------------------
# g runs up to its feature layer only
# ----------------------------------------------------------------------------------------------

def layers_needed(n_layers, feature_layer):
    """How many of a tower's n layers Z_v needs: hidden state i is the output of layer i (0: the input)."""
    return range(n_layers + 1)[feature_layer]


def pass_through(hidden_states, *args, **kwargs):
    return hidden_states


def skip_layers_after(vision_tower, feature_layer):
    """An optimisation, made once where the model is built or loaded: Z_v is one hidden state, and
    the layers after it cannot change it, so they pass their input on instead of running (for the
    paper's -2, CLIP's last layer: its FLOPs and activations). Their weights stay: a saved model is
    whole, and hidden_states[feature_layer] is still Z_v."""
    layers = getattr(getattr(vision_tower, "encoder", None), "layers", [])
    for layer in layers[layers_needed(len(layers), feature_layer):]:
        layer.forward = pass_through


# ----------------------------------------------------------------------------------------------
# A new LLaVA from a vision encoder and an LLM (the start of stage 1), or a saved one
# ----------------------------------------------------------------------------------------------

def build(vision, llm, projector="mlp2x_gelu", feature_layer=-2, keep_cls=False, template="paper",
          dtype=torch.float32, vision_dtype=None, empty=False):
    """A new LLaVA: g and f_phi from pretrained models (hub ids or directories), W random (FP32).
    dtype: f_phi's; vision_dtype: g's (default: the same). Checkpoints are converted as read (Vicuna
    ships float16). empty: the same model without reading any weights (for the meta device)."""
    vision_tower, image_processor = formats.load_vision_tower(vision, vision_dtype or dtype, empty)
    language_model, tokenizer = formats.load_language_model(llm, dtype, empty)
    # An <image> token in the vocabulary, so that transformers' Llava can read what we save.
    image_token_id = formats.add_image_token(tokenizer)
    if len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=not empty)
    return LLaVA(vision_tower, language_model, tokenizer, image_processor,
                 projector, feature_layer, keep_cls, image_token_id, template)


def load(path, device="cpu", dtype=None, vision=None, template=None):
    """A saved LLaVA, ready to answer: ours, llava-hf's or the authors' (formats.py reads the folder,
    strictly). dtype: by default BF16 on a GPU, FP32 on a CPU. vision: for the authors' layout,
    where the vision tower is if not at `mm_vision_tower`."""
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    return formats.load(path, LLaVA, dtype, device, vision, template).eval()
