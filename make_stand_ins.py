"""The toy's stand-ins for CLIP and Vicuna, made in the formats of the real checkpoints and pretrained
on a toy world of their own: CLIP on image-caption pairs, the LM on the world in words. Done once
(44 minutes on a CPU); the demo (toy.py) loads what is kept in stand_ins/.

    python make_stand_ins.py                    # remake stand_ins/clip and stand_ins/vicuna
    python make_stand_ins.py --out DIR          # somewhere else
    python make_stand_ins.py probe              # the LM stand-in alone: held-out scenes in words (25 s)
"""
import argparse
import io
import itertools
import json
import math
import os
import random
import shutil
import time
from functools import cache, partial

import torch
from tqdm import tqdm
from transformers import (AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, LlamaConfig, LlamaForCausalLM,
                          get_cosine_schedule_with_warmup)

import data
import disk
import eval as evaluation
import formats
import llava
from toy import (CATEGORIES, CELL, COLS, GRID, ROWS, STAND_INS, held_out, make_world, mc_sample, scene, symbolic,
                 teacher)


# ----------------------------------------------------------------------------------------------
# The stand-ins for CLIP and Vicuna, in the formats of the real checkpoints
# ----------------------------------------------------------------------------------------------

def added_token(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def make_tokenizer(path, texts, vocab_size=1000, legacy=False):
    """A SentencePiece BPE tokenizer.model trained on `texts` with LLaMA's settings (byte fallback,
    digits split, a dummy prefix "▁", no normalization), beside Vicuna v1.5's tokenizer_config.json:
    BOS added, no EOS, no pad token, legacy false. Returns it loaded as transformers loads Vicuna's."""
    import sentencepiece
    os.makedirs(path, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentencepiece_length=16, minloglevel=2)
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": added_token("<s>"),
              "clean_up_tokenization_spaces": False, "eos_token": added_token("</s>"), "legacy": legacy,
              "model_max_length": 4096, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
              "tokenizer_class": "LlamaTokenizer", "unk_token": added_token("<unk>")}
    special = {"bos_token": added_token("<s>"), "eos_token": added_token("</s>"), "unk_token": added_token("<unk>")}
    for file, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(path, file), "w") as f:
            json.dump(content, f, indent=2)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def make_clip(path, image_size=32, patch_size=8, width=64, layers=3, heads=4, vocab_size=512, eos_token_id=3, seed=0):
    """A small CLIP saved as openai/clip-vit-* is: the full CLIPModel (both towers, FP32 safetensors)
    and its preprocessor_config.json (resize the short side, center-crop, CLIP's mean and std)."""
    torch.manual_seed(seed)
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                 num_attention_heads=heads)
    config = CLIPConfig(vision_config=dict(image_size=image_size, patch_size=patch_size, **tower),
                        text_config=dict(vocab_size=vocab_size, max_position_embeddings=64, pad_token_id=0,
                                         bos_token_id=1, eos_token_id=eos_token_id, **tower),
                        projection_dim=width)
    model = CLIPModel(config)
    # CLIP starts its position embeddings at std 0.02, far below what the patch embedding gives an
    # image; real CLIP learns them from 400M pairs, a stand-in has seconds. Started at the patches'
    # scale, where an object is stays readable from its visual token.
    model.vision_model.embeddings.position_embedding.weight.data.normal_(std=0.6)
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return model


def make_vicuna(path, tokenizer, width=64, layers=2, heads=4, seed=0, vocab_size=None, model=None):
    """A small LLaMA saved as lmsys/vicuna-*-v1.5 is: float16 safetensors ("torch_dtype": "float16"),
    beside the tokenizer's files. `model`: save this trained LLaMA instead of a new one."""
    if model is None:
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                             max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=None, tie_word_embeddings=False,
                             # LLaMA's 0.02 is about 1/sqrt(width) at width 4096; at a small width
                             # the attention would start so flat that reading the image takes far longer.
                             initializer_range=width ** -0.5)
        model = LlamaForCausalLM(config)
    os.makedirs(path, exist_ok=True)
    model.to(torch.float16).save_pretrained(path)
    model.float()
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tokenizer.name_or_path, f), os.path.join(path, f))
    return model


# ----------------------------------------------------------------------------------------------
# Pretraining the stand-ins: CLIP on image-caption pairs, the LM on the world in words
# ----------------------------------------------------------------------------------------------

def pretrain_clip(path, world, tokenizer, steps=800, batch=128, lr=1e-3):
    """The CLIP stand-in: contrastive image-caption training (CLIP's own loss) on a world's images.
    Captions in a batch differ mostly in colors, so colors are learned first; trained until shapes
    and places also tell captions apart, the patch features carry them strongly enough for stage 1
    to align W with them quickly."""
    end = len(tokenizer)  # the text tower's own end-of-text id: CLIP pools its features there
    model = make_clip(path, GRID * CELL, CELL, width=128, layers=3, heads=4, vocab_size=end + 1, eos_token_id=end)
    processor = CLIPImageProcessor.from_pretrained(path, trust_remote_code=False)
    reps = disk.load_json(os.path.join(world, "symbolic.json"))
    pixels = processor(images=[data.load_image(os.path.join(world, "images", r["image"])) for r in reps],
                       return_tensors="pt")["pixel_values"]  # (N, 3, H, W)
    captions = [tokenizer.encode(r["captions"][1]) + [end] for r in reps]
    text = torch.nn.utils.rnn.pad_sequence([torch.tensor(c) for c in captions], batch_first=True)  # (N, L)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(c), dtype=torch.long) for c in captions], batch_first=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # A 10% warm-up: started at full lr, the loss can stay near chance (ln 128 = 4.85).
    scheduler = get_cosine_schedule_with_warmup(optimizer, steps // 10, steps)
    generator = torch.Generator().manual_seed(0)
    for _ in tqdm(range(steps), desc="CLIP stand-in", dynamic_ncols=True):
        idx = torch.randperm(len(reps), generator=generator)[:batch]
        loss = model(input_ids=text[idx], attention_mask=mask[idx], pixel_values=pixels[idx], return_loss=True).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    return loss.item()


def scene_words(objects):
    """How the LM stand-in is shown a scene: for each grid cell, in the order of the visual tokens
    (row by row), the words that say what is there."""
    cells = [f"nothing {ROWS[r]} {COLS[c]}" for r in range(GRID) for c in range(GRID)]
    for o in objects:
        cells[o["row"] * GRID + o["col"]] = f"{o['size']} {o['color']} {o['shape']} {ROWS[o['row']]} {COLS[o['col']]}"
    return cells


# What the LM stand-in reads: multiple-choice questions, the teacher's conversations, and the brief
# caption that stage 1 aligns W with. Its questions dwell on the lookups a small LM learns last:
# finding an object by its shape to read its color, and whether a color goes with a shape.
LM_READING = ["mc"] * 4 + ["conversation"] * 2 + ["brief"]
LM_QUESTIONS = ["color"] * 3 + ["existence"] * 4 + ["count"] * 2 + ["shape", "position"]


def lm_reading(seed, kinds=LM_READING, min_objects=2):
    """What the LM stand-in reads, without end: a fresh scene in words (`scene_words`) and one
    conversation about it, of a kind drawn from `kinds` ("mc" or a teacher's response type).
    Held-out scenes are never read. Multiple-choice questions come with scenes of at least
    `min_objects` objects: with one, "What color is the square?" is answered by any color there."""
    rng = random.Random(seed)
    while True:
        kind = rng.choice(kinds)
        objects = scene(rng)
        if held_out(objects) or (kind == "mc" and len(objects) < min_objects):
            continue
        if kind == "mc":
            mc = mc_sample(objects, rng.choice(LM_QUESTIONS), rng, image_first=rng.random() < 0.5, hard=True)
            if mc is None:  # this scene cannot ask that question
                continue
            yield mc["conversations"], scene_words(objects)
        else:
            yield teacher(symbolic(objects), kind, rng), scene_words(objects)


@cache  # a few hundred cells ("nothing top left", "large red circle top left", ...) read again and again
def cell_ids(tokenizer, cell):
    return tokenizer.encode(cell, add_special_tokens=False)


def scene_rows(tokenizer, pairs):
    """(conversations, cell words) pairs rendered: (ids, labels, the ids of each cell's words)."""
    rows = []
    for conversations, cells in pairs:
        ids, labels = data.render(conversations, tokenizer, "paper", tokenizer.unk_token_id, GRID ** 2)
        rows.append((torch.tensor(ids), torch.tensor(labels), [cell_ids(tokenizer, cell) for cell in cells]))
    return rows


def scene_inputs(model, tokenizer, rows, noise=0.0):
    """A batch for the LM alone: word embeddings, and at the 9 image positions (held by the
    placeholder <unk>) the sum of the word embeddings of the cell, plus Gaussian noise of std `noise`.
    Returns the LM's keyword arguments."""
    embed = model.get_input_embeddings()
    pad_id = tokenizer.unk_token_id  # Vicuna has no pad token; padding is masked out
    pad = partial(torch.nn.utils.rnn.pad_sequence, batch_first=True)
    ids = pad([r[0] for r in rows], padding_value=pad_id)  # (B, T)
    mask = pad([torch.ones_like(r[0]) for r in rows], padding_value=0)  # (B, T)
    words = pad([torch.tensor(w) for r in rows for w in r[2]], padding_value=-1)  # (B*9, L) words per cell
    cell_embeds = (embed(words.clamp(min=0)) * (words >= 0).unsqueeze(-1)).sum(1)  # (B*9, D)
    cell_embeds = cell_embeds + noise * torch.randn_like(cell_embeds)
    is_image = (ids == tokenizer.unk_token_id) & mask.bool()
    inputs = embed(ids).masked_scatter(is_image.unsqueeze(-1), cell_embeds)  # (B, T, D)
    return dict(inputs_embeds=inputs, attention_mask=mask, labels=pad([r[1] for r in rows], padding_value=data.IGNORE))


def pretrain_lm(path, tokenizer, reading, steps=1000, batch=16, lr=1e-3, noise=0.1, width=128, layers=4):
    """The Vicuna stand-in: a causal LM trained on toy conversations, in the chat template, with the
    scene written in words where the image will be. Vicuna has read about the world; this LM has
    read about the toy world: each of the 9 image positions holds the sum of the word embeddings of
    its cell ("large red circle top left"). `reading` yields (conversations, cell words) pairs.
    Stage 1 then has a clear job: make W turn each patch's features into what the LM reads there,
    the paper's "visual tokenizer for the frozen LLM". The cells are read through a little noise,
    so that the LM leans on the words' own directions, the ones stage 1's captions constrain."""
    model = make_vicuna(path, tokenizer, width=width, layers=layers, heads=4)
    formats.add_image_token(tokenizer)  # after the LM is made: <image> is never embedded, the cells are
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(0.03 * steps), steps)
    for _ in tqdm(range(steps), desc="LM stand-in", dynamic_ncols=True):
        inputs = scene_inputs(model, tokenizer, scene_rows(tokenizer, itertools.islice(reading, batch)), noise)
        targets, keep = llava.shifted_targets(inputs.pop("labels"))  # (B, T) each
        logits = model(**inputs, logits_to_keep=keep).logits  # (N, V): only where a token is trained
        loss = torch.nn.functional.cross_entropy(logits, targets[keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    make_vicuna(path, tokenizer, model=model)
    return loss.item()


def pretrain(out=STAND_INS, lm_steps=16000, clip_steps=800, seed=0, images=2000):
    """Make stand_ins/clip and stand_ins/vicuna from a world of their own (seed 1000 + seed)."""
    start = time.time()
    world = os.path.join(out, "world.tmp")
    make_world(world, images, 0, seed=1000 + seed, mc_train=2)
    samples = [s for f in ("instruct", "stage1") for s in disk.load_json(os.path.join(world, f"{f}.json"))]
    # The system message comes with every sample: weighted so that BPE gives it few tokens.
    texts = [t.system for t in data.TEMPLATES.values()] * 200 + [turn["value"] for s in samples for turn in s["conversations"]]
    tokenizer = make_tokenizer(os.path.join(out, "tokenizer.tmp"), texts, vocab_size=1000)
    clip_loss = pretrain_clip(os.path.join(out, "clip"), world, tokenizer, steps=clip_steps)
    lm_loss = pretrain_lm(os.path.join(out, "vicuna"), tokenizer, lm_reading(seed), steps=lm_steps)
    shutil.rmtree(world)
    shutil.rmtree(os.path.join(out, "tokenizer.tmp"))
    print(f"{out}: CLIP contrastive loss {clip_loss:.3f}, LM loss {lm_loss:.3f}, {(time.time() - start) / 60:.1f} min")
    return clip_loss, lm_loss


EXISTENCE_KINDS = ["yes", "no: nothing of that color", "no: that color in other shapes"]


@torch.no_grad()
def probe(lm_dir, n=60, seed=12345):
    """What the LM stand-in knows before it sees an image: held-out scenes written in words at the
    image positions (as it read them, without the noise), n multiple-choice questions a category,
    the scene after the question and before it, greedy. Returns {order: {category: right answers}}
    and, for existence, {order: {the teacher's answer: [right, asked]}} (EXISTENCE_KINDS; the last is
    the compositional trap: "I see a red square, so no, there is no red circle")."""
    tokenizer = AutoTokenizer.from_pretrained(lm_dir, trust_remote_code=False)
    lm = LlamaForCausalLM.from_pretrained(lm_dir, dtype=torch.float32, trust_remote_code=False).eval()
    formats.add_image_token(tokenizer)
    rng, results, existence = random.Random(seed), {}, {}
    for order in ("image last", "image first"):
        results[order] = {}
        existence[order] = {kind: [0, 0] for kind in EXISTENCE_KINDS}
        for category in CATEGORIES:
            right = asked = 0
            while asked < n:
                objects = scene(rng)
                mc = mc_sample(objects, category, rng, image_first=order == "image first") if held_out(objects) else None
                if mc is None:  # a training scene, or one that cannot ask this
                    continue
                ids, labels = data.render(mc["conversations"][:1], tokenizer, "paper", tokenizer.unk_token_id,
                                          GRID ** 2, for_generation=True)
                row = (torch.tensor(ids), torch.tensor(labels), [cell_ids(tokenizer, c) for c in scene_words(objects)])
                inputs = scene_inputs(lm, tokenizer, [row])
                del inputs["labels"]
                out = lm.generate(**inputs, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.unk_token_id,
                                  eos_token_id=tokenizer.eos_token_id, stop_strings="###", tokenizer=tokenizer)
                answer = tokenizer.decode(out[0], skip_special_tokens=True).split("###")[0]
                is_right = evaluation.extract_answer(answer) == mc["letter"]
                right += is_right
                asked += 1
                if category == "existence":
                    kind = EXISTENCE_KINDS[0 if mc["letter"] == "A" else 1 if "I see nothing" in mc["answer"] else 2]
                    existence[order][kind][0] += is_right
                    existence[order][kind][1] += 1
            results[order][category] = right
    return results, existence


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="pretrain", choices=["pretrain", "probe"],
                   help="pretrain (the default: remake the stand-ins), or probe (the LM stand-in alone, scenes in words)")
    p.add_argument("--seed", type=int, default=0, help="pretrain: the stand-ins' world is seed 1000 + this")
    p.add_argument("--out", default=STAND_INS, help="pretrain: where clip/ and vicuna/ go")
    p.add_argument("--llm", default=os.path.join(STAND_INS, "vicuna"), help="probe: the LM stand-in")
    p.add_argument("--images", type=int, default=2000, help="pretrain: the images of the stand-ins' world")
    p.add_argument("--lm-steps", type=int, default=16000, help="pretrain: the LM stand-in's steps of 16 scenes")
    p.add_argument("--clip-steps", type=int, default=800, help="pretrain: the CLIP stand-in's steps of 128 pairs")
    p.add_argument("--n", type=int, default=60, help="probe: questions per category and order")
    args = p.parse_args(argv)
    if args.command == "probe":
        results, existence = probe(args.llm, args.n)
        for order, kinds in existence.items():
            print(f"existence, {order}: " + "; ".join(f"{kind} {right}/{asked}" for kind, (right, asked) in kinds.items()))
        print(f"{'':12}" + "".join(f"{c:>11}" for c in CATEGORIES) + f"   (right of {args.n} each)")
        for order, right in results.items():
            print(f"{order:12}" + "".join(f"{right[c]:>11}" for c in CATEGORIES))
    else:
        pretrain(args.out, args.lm_steps, args.clip_steps, args.seed, args.images)


if __name__ == "__main__":
    main()
