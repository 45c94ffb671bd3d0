"""The paper in miniature: §3 to §5 offline, on a CPU, in minutes.

Offline there is neither COCO, GPT-4, CLIP nor Vicuna. The toy world stands in for all four: images of
1 to 3 shapes in the cells of a 3x3 grid, their symbolic representation (§3's captions and boxes), a
rule-based teacher that reads only that representation, and two small pretrained models in the
formats of the real ones (stand_ins/clip: a CLIPModel with both towers; stand_ins/vicuna: a LLaMA in
float16 with a SentencePiece tokenizer.model). The demo then runs the paper on them with the same
train.py, llava.py and eval.py that run the real thing.

    python toy.py                     # the demo: world, stage 1, stage 2, evaluation, a picture (minutes)
    python toy.py --seed 3            # another world
    python toy.py --no-stage1         # the paper's ablations: also --feature-layer -1, --instruct conversation
    python toy.py pretrain            # remake the stand-ins in stand_ins/ (done once; the demo loads them)
"""
import argparse
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import time
import zlib
from functools import cache, partial

import torch
from tqdm import tqdm
from transformers import (AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, LlamaConfig, LlamaForCausalLM,
                          get_cosine_schedule_with_warmup)

import data
import disk
import eval as evaluation
import llava
import train

HERE = os.path.dirname(os.path.abspath(__file__))
STAND_INS = os.path.join(HERE, "stand_ins")

# ----------------------------------------------------------------------------------------------
# §3: the world and its symbolic representation
# ----------------------------------------------------------------------------------------------
# Each image comes with §3's symbolic representation: captions, and boxes `category: [x1, y1, x2, y2]`
# normalized to 0..1. Objects sit in the cells of a 3x3 grid; with the vision encoder's patch as
# large as a cell, one object is one visual token.

SHAPES = ["square", "circle", "triangle"]
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
          "purple": (150, 60, 190)}
GRID = 3  # cells per side
CELL = 16  # pixels per cell: 48 x 48 images
ROWS, COLS = ["top", "middle", "bottom"], ["left", "center", "right"]


def scene(rng):
    """1 to 3 objects in distinct grid cells, in reading order: shape, color, size and box in pixels."""
    objects = []
    for index in sorted(rng.sample(range(GRID * GRID), rng.randint(1, 3))):
        row, col = divmod(index, GRID)
        size = rng.choice(["small", "large"])
        side = rng.choice([8, 10]) if size == "small" else rng.choice([14, 16])
        x1 = col * CELL + (CELL - side) // 2  # centered in its cell: one object, one patch
        y1 = row * CELL + (CELL - side) // 2
        objects.append({"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "size": size,
                        "row": row, "col": col, "box": [x1, y1, x1 + side, y1 + side]})
    return objects


def held_out(objects):
    """One scene in five, chosen by what it shows, is for evaluation only, whatever the seed: no
    training image, no caption the CLIP stand-in learns from and no scene the LM stand-in reads is one."""
    key = ";".join(f"{o['size']} {o['color']} {o['shape']} {o['row']} {o['col']}" for o in objects)
    return zlib.crc32(key.encode()) % 5 == 0


def draw(objects):
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (GRID * CELL, GRID * CELL), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    for o in objects:
        x1, y1, x2, y2 = o["box"]
        rgb = COLORS[o["color"]]
        if o["shape"] == "square":
            pen.rectangle([x1, y1, x2 - 1, y2 - 1], fill=rgb)
        elif o["shape"] == "circle":
            pen.ellipse([x1, y1, x2 - 1, y2 - 1], fill=rgb)
        else:
            pen.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=rgb)
    return image


def and_list(names):
    """'a', 'a and b', 'a, b and c'."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def name(o):
    return f"{o['color']} {o['shape']}"


def where(o):
    """'at the top left', 'in the center': the cell's own row and column words."""
    row, col = ROWS[o["row"]], COLS[o["col"]]
    return "in the center" if (row, col) == ("middle", "center") else f"at the {row} {col}"


def symbolic(objects):
    """§3's symbolic representation: captions and normalized boxes, all the teacher may see."""
    side = GRID * CELL
    names = [f"a {o['size']} {name(o)}" for o in objects]
    # The brief caption names each object and its place, as COCO's often do ("a dog on a couch"):
    # stage 1 aligns W with it, so W learns to pass on where a patch is as well as what is there.
    listed = and_list([f"{n} {where(o)}" for n, o in zip(names, objects)])
    captions = [f"{listed[0].upper()}{listed[1:]}.",
                " ".join(f"{n[0].upper()}{n[1:]} {where(o)}." for n, o in zip(names, objects))]
    boxes = [f"{name(o)}: [{', '.join(f'{v / side:.2f}' for v in o['box'])}]" for o in objects]
    return {"captions": captions, "boxes": boxes}


def parse_boxes(boxes):
    """The teacher's view: objects back from `color shape: [x1, y1, x2, y2]` lines."""
    objects = []
    for line in boxes:
        category, coords = line.split(": ")
        x1, y1, x2, y2 = json.loads(coords)
        color, shape = category.split(" ")
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        objects.append({"color": color, "shape": shape, "row": min(int(cy * GRID), GRID - 1),
                        "col": min(int(cx * GRID), GRID - 1), "area": (x2 - x1) * (y2 - y1)})
    for o in objects:
        o["size"] = "large" if o["area"] > 0.5 / GRID ** 2 else "small"  # more than half a cell
    return objects


# ----------------------------------------------------------------------------------------------
# §3: the rule-based teacher, the stand-in for GPT-4
# ----------------------------------------------------------------------------------------------

def plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def unique(objects, key):
    """Objects whose `key` (shape or color) no other object shares."""
    return [o for o in objects if sum(p[key] == o[key] for p in objects) == 1]


def absent_pair(objects, rng):
    """A 'bag of patches' trap: a color and a shape that are both in the image, never together;
    None when there is no such pair. The paper's model says yes to these."""
    pairs = [(o["color"], p["shape"]) for o in objects for p in objects
             if not any(q["color"] == o["color"] and q["shape"] == p["shape"] for q in objects)]
    return rng.choice(pairs) if pairs else None


def exists_question(objects, rng, hard=False):
    """'Is there a ...?' with yes and no equally likely; half the no's are compositional traps.
    hard: a no names a color that is in the image with a shape that color lacks there (whenever it
    lacks one), so that "I see a red ..." goes on to yes and to no alike and only the shape decides
    (the LM stand-in's reading).
    Returns (the thing asked about, "yes" or "no", whether it is a trap)."""
    if rng.random() < 0.5:
        return name(rng.choice(objects)), "yes", False
    if hard:
        color = rng.choice(sorted({o["color"] for o in objects}))
        absent = [s for s in SHAPES if not any(o["color"] == color and o["shape"] == s for o in objects)]
        if absent:
            shape = rng.choice(absent)
            return f"{color} {shape}", "no", any(o["shape"] == shape for o in objects)
    trap = absent_pair(objects, rng) if rng.random() < 0.5 else None
    if trap is None:
        present = {name(o) for o in objects}
        trap = rng.choice([(c, s) for c in COLORS for s in SHAPES if f"{c} {s}" not in present])
    color, shape = trap
    is_trap = any(o["color"] == color for o in objects) and any(o["shape"] == shape for o in objects)
    return f"{color} {shape}", "no", is_trap


def listed(objects):
    """'a red circle', 'a red circle and a blue square', ... in reading order."""
    return and_list([f"a {name(o)}" for o in sorted(objects, key=lambda o: (o["row"], o["col"]))])


# One question-answer pair per kind of fact, as (question, answer, the fact asked for); None when the
# image cannot ask it unambiguously. Count and existence answers reason first, as the paper's best
# ScienceQA answers do: they name the objects that matter, then conclude from those words.
def ask_color(objects, rng):
    pool = unique(objects, "shape")  # "the circle" must name one object
    o = rng.choice(pool) if pool else None
    return o and (f"What color is the {o['shape']}?", f"The {o['shape']} is {o['color']}.", o["color"])


def ask_shape(objects, rng):
    pool = unique(objects, "color")
    o = rng.choice(pool) if pool else None
    return o and (f"What shape is the {o['color']} object?", f"The {o['color']} object is a {o['shape']}.", o["shape"])


def ask_count(objects, rng):
    what = rng.choice(SHAPES + ["object"])
    matching = [o for o in objects if what in ("object", o["shape"])]
    told = f"I see {listed(matching)}: {plural(len(matching), what)}." if matching else f"There are no {what}s."
    return f"How many {what}s are there?", told, str(len(matching))


def ask_position(objects, rng):
    pool = [o for o in objects if sum(name(p) == name(o) for p in objects) == 1]
    o = rng.choice(pool) if pool else None
    return o and (f"Where is the {name(o)}?", f"The {name(o)} is {where(o)} of the image.", where(o))


def ask_existence(objects, rng, hard=False):
    thing, answer, _ = exists_question(objects, rng, hard)
    color = thing.split()[0]
    same_color = [o for o in objects if o["color"] == color]  # a trap has these, in other shapes
    seen = f"I see {listed(same_color)}" if same_color else f"I see nothing {color}"
    told = f"{seen}, so yes, there is a {thing} in the image." if answer == "yes" else \
        f"{seen}, so no, there is no {thing} in the image."
    return f"Is there a {thing} in the image?", told, answer


ASK = {"color": ask_color, "shape": ask_shape, "count": ask_count, "position": ask_position,
       "existence": ask_existence}


def conversation_turns(objects, rng):
    """Questions with definite answers: colors, shapes, counts, positions, existence."""
    turns = [qa[:2] for ask in ASK.values() if (qa := ask(objects, rng))]
    rng.shuffle(turns)
    return turns[:rng.randint(2, 4)]


def describe(objects):
    parts = [f"The image shows {plural(len(objects), 'object')} on a white background."]
    for o in objects:
        parts.append(f"A {o['size']} {name(o)} is {where(o)}.")
    return " ".join(parts)


def reason(objects, rng):
    """One question that needs a step: comparing positions or sizes, or counting after a change."""
    named_once = [o for o in objects if sum(name(p) == name(o) for p in objects) == 1]  # "the red circle" is one
    if len(named_once) >= 2 and rng.random() < 0.7:
        a, b = rng.sample(named_once, 2)
        if rng.random() < 0.5 and a["row"] != b["row"]:
            higher = a if a["row"] < b["row"] else b
            return (f"Which is higher in the image, the {name(a)} or the {name(b)}?",
                    f"The {name(a)} is {where(a)} and the {name(b)} is {where(b)}, "
                    f"so the {name(higher)} is higher.")
        if a["size"] != b["size"]:
            larger = a if a["size"] == "large" else b
            return (f"Which is larger, the {name(a)} or the {name(b)}?",
                    f"The {name(a)} is {a['size']} and the {name(b)} is {b['size']}, so the {name(larger)} is larger.")
    o = rng.choice(objects)
    left = len(objects) - 1
    return (f"If the {name(o)} were taken away, how many objects would be left?",
            f"There {'is' if len(objects) == 1 else 'are'} {plural(len(objects), 'object')} now. Taking away the "
            f"{name(o)} leaves {plural(left, 'object') if left else 'no objects'}.")


def teacher(symbolic_rep, kind, rng):
    """The stand-in for GPT-4: a symbolic representation -> one sample's conversations. The image
    goes before or after the first question at random, as in LLaVA-Instruct."""
    objects = parse_boxes(symbolic_rep["boxes"])
    if kind == "conversation":
        turns = conversation_turns(objects, rng)
    elif kind == "detail":
        turns = [(rng.choice(data.DETAILED), describe(objects))]
    elif kind == "reasoning":
        turns = [reason(objects, rng)]
    elif kind == "brief":  # stage 1: a brief instruction answered by the caption
        turns = [(rng.choice(data.BRIEF), symbolic_rep["captions"][0])]
    else:
        raise ValueError(f"unknown response type {kind!r}")
    first = turns[0][0]
    conversations = [{"from": "human", "value": f"{data.IMAGE}\n{first}" if rng.random() < 0.5 else f"{first}\n{data.IMAGE}"}]
    conversations.append({"from": "gpt", "value": turns[0][1]})
    for question, answer in turns[1:]:
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return conversations


# ----------------------------------------------------------------------------------------------
# §5.2 in miniature: multiple-choice questions in ScienceQA form
# ----------------------------------------------------------------------------------------------

CATEGORIES = ["color", "shape", "count", "position", "existence"]
OPTIONS = {"color": list(COLORS), "shape": SHAPES, "count": ["0", "1", "2", "3"], "existence": ["yes", "no"],
           "row": ROWS, "column": COLS}


def mc_sample(objects, category, rng, image_first=False, hard=False):
    """A question of `category` in ScienceQA form, or None if the image cannot ask it.

    As in the paper's best ScienceQA variant, the answer reasons first: the fact, then "The answer
    is X.". Options come in a fixed order, so the letter follows from the fact: the questions test
    what the model sees, not how well a tiny LM matches words to letters.
    """
    if category == "position":  # the row or the column of an object named once
        asked = ask_position(objects, rng)
        if asked is None:
            return None
        o = next(o for o in objects if f"the {name(o)}?" in asked[0])
        axis = rng.choice(["row", "column"])
        right = ROWS[o["row"]] if axis == "row" else COLS[o["col"]]
        question = f"In which {axis} is the {name(o)}?"
        fact = f"The {name(o)} is {where(o)}, so it is in the {right} {axis}."  # the place, then the axis
        options = OPTIONS[axis]
    else:
        asked = ask_existence(objects, rng, hard) if category == "existence" else ASK[category](objects, rng)
        if asked is None:
            return None
        question, fact, right = asked
        options = OPTIONS[category]
    letter = data.LETTERS[options.index(right)]
    choices = " ".join(f"({data.LETTERS[i]}) {option}" for i, option in enumerate(options))
    question, answer = f"Question: {question}\nOptions: {choices}", f"{fact} The answer is {letter}."
    human = f"{data.IMAGE}\n{question}" if image_first else f"{question}\n{data.IMAGE}"
    return {"question": question, "answer": answer, "letter": letter, "category": category,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}


def make_world(out, n_images=2000, n_eval=500, seed=0, mc_train=1, mc_eval=2):
    """Write out/images/*.png and the LLaVA JSON files; returns {file name: number of samples}.
    Each training image gets mc_train multiple-choice questions, each held-out image mc_eval.

    stage1.json      brief instruction + caption pairs (stage 1, like CC-595K's chat.json)
    conversation.json, detail.json, reasoning.json: the three response types (like LLaVA-Instruct)
    mc_train.json    multiple-choice questions on training images (like ScienceQA's train split)
    instruct.json    all of the above but stage 1, shuffled: stage 2's data
    eval.json        multiple-choice questions on held-out images, with "category" and "answer"
    eval_chat.json   the teacher's conversations about the held-out images (open-ended questions)
    symbolic.json    each image's symbolic representation (captions and boxes)
    """
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    files = {k: [] for k in ["stage1", "conversation", "detail", "reasoning", "mc_train", "eval", "eval_chat",
                             "symbolic"]}
    for i in range(n_images + n_eval):
        is_eval = i >= n_images
        # Held-out questions are balanced over the categories. A scene of the wrong split, or one
        # that cannot ask the questions (no shape appears just once, say), is drawn again.
        categories = [CATEGORIES[(i * mc_eval + j) % len(CATEGORIES)] for j in range(mc_eval)] if is_eval else \
            [rng.choice(CATEGORIES) for _ in range(mc_train)]
        while True:
            objects = scene(rng)
            if held_out(objects) != is_eval:
                continue
            questions = [mc_sample(objects, c, rng, image_first=rng.random() < 0.5 and not is_eval)
                         for c in categories]
            if all(questions):
                break
        image_id = f"toy_{i:06d}"
        image_file = f"{image_id}.png"
        draw(objects).save(os.path.join(out, "images", image_file))
        rep = symbolic(objects)
        files["symbolic"].append({"id": image_id, "image": image_file, **rep})
        for j, mc in enumerate(questions):
            extra = {"category": mc["category"], "answer": mc["letter"]} if is_eval else {}
            files["eval" if is_eval else "mc_train"].append(
                {"id": f"{image_id}_mc{j}", "image": image_file, **extra, "conversations": mc["conversations"]})
        kinds = ["conversation"] if is_eval else ["brief", "conversation", "detail", "reasoning"]
        for kind in kinds:
            key = "eval_chat" if is_eval else {"brief": "stage1"}.get(kind, kind)
            files[key].append({"id": f"{image_id}_{kind}", "image": image_file, "conversations": teacher(rep, kind, rng)})
    files["instruct"] = files["conversation"] + files["detail"] + files["reasoning"] + files["mc_train"]
    rng.shuffle(files["instruct"])
    for key, samples in files.items():
        disk.write_json(os.path.join(out, f"{key}.json"), samples)
    return {f"{k}.json": len(v) for k, v in files.items()}


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


# ----------------------------------------------------------------------------------------------
# The demo: §3 to §5 on the stand-ins
# ----------------------------------------------------------------------------------------------

def demo(args):
    """The world (§3), stage 1 and stage 2 (§4.2) on the stand-ins, the evaluation (§5), a picture."""
    out, start = args.out, time.time()
    for stage in ("stage1", "stage2"):  # the demo starts afresh each time
        shutil.rmtree(os.path.join(out, stage), ignore_errors=True)
    world = os.path.join(out, "data")
    print(f"[1/5] the toy world (§3) -> {world}")
    sizes = make_world(world, args.images, args.held_out, seed=args.seed)
    print("      " + ", ".join(f"{k}: {v}" for k, v in sizes.items()))
    stage2_data = os.path.join(world, "instruct.json")
    if args.instruct == "conversation":  # ablation: conversation data only (and the MC training questions)
        stage2_data = os.path.join(world, "instruct_conversation.json")
        disk.write_json(stage2_data, disk.load_json(os.path.join(world, "conversation.json")) +
                        disk.load_json(os.path.join(world, "mc_train.json")))
    common = ["--vision", args.vision, "--llm", args.llm, "--image-folder", os.path.join(world, "images"),
              "--projector-type", "mlp2x_gelu", "--feature-layer", str(args.feature_layer), "--template", "paper",
              "--workers", "0", "--checkpoint-every", "0", "--seed", str(args.seed), "--dtype", "fp32"]
    if not args.no_stage1:
        print("[2/5] stage 1: pre-training for feature alignment (W only)")
        # The paper's lr. W learns only through the frozen LM, and on 2,000 captions it needs many
        # small steps: batch 8 for 4 epochs.
        train.train(train.get_args(["--stage", "1", "--data", os.path.join(world, "stage1.json"), "--out",
                                    os.path.join(out, "stage1"), "--lr", "2e-3", "--global-batch", "8",
                                    "--batch-size", "8", "--epochs", "4"] + common))
    else:
        print("[2/5] stage 1 skipped (--no-stage1): W starts random")
    print("[3/5] stage 2: fine-tuning end to end (W and the LLM)")
    train.train(train.get_args(["--stage", "2", "--data", stage2_data, "--out", os.path.join(out, "stage2"),
                                "--projector", "random" if args.no_stage1 else os.path.join(out, "stage1"),
                                "--lr", "1e-3", "--global-batch", "16", "--batch-size", "16", "--epochs", "1"] + common))

    print("[4/5] evaluation (§5): held-out multiple choice, the image last and first, and the chat's answers")
    model = llava.load(os.path.join(out, "stage2", "model"))
    images = os.path.join(world, "images")
    questions = disk.load_json(os.path.join(world, "eval.json"))
    last, rows = evaluation.evaluate_mc(model, questions, images, progress=True)
    first, _ = evaluation.evaluate_mc(model, image_first(questions), images, progress=True)
    blind, _ = evaluation.evaluate_mc(model, questions, images, blank=True, progress=True)
    chat, chat_rows = chat_eval(model, disk.load_json(os.path.join(world, "eval_chat.json")), images)
    print(results_table(last, first, blind, chat))
    minutes = (time.time() - start) / 60
    results = {"image_last": last, "image_first": first, "blind": blind, "chat": chat, "minutes": minutes}
    disk.write_json(os.path.join(out, "results.json"), dict(results, outputs=rows, chat_outputs=chat_rows))
    print(f"[5/5] a picture of it -> {os.path.join(out, 'demo.png')}")
    picture(os.path.join(out, "demo.png"), images, chat_rows, out)
    print(f"done in {minutes:.1f} min. Chat with it: python chat.py {os.path.join(images, questions[0]['image'])}")
    return results


def image_first(questions):
    """The same questions with the image before the question, as chat.py sends it."""
    return [dict(q, conversations=[{"from": "human", "value": f"{data.IMAGE}\n" + q["conversations"][0]["value"]
                                    .replace(data.IMAGE, "").strip()}] + q["conversations"][1:]) for q in questions]


FACT_WORDS = set(COLORS) | set(SHAPES) | set(ROWS) | set(COLS) | {"0", "1", "2", "3", "yes", "no", "nothing"}
ASKED = {"What color": "color", "What shape": "shape", "How many": "count", "Where is": "position", "Is there": "existence"}


def facts(text):
    """The words of an answer that carry its facts, in order: colors, shapes, counts, places, yes/no."""
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w in FACT_WORDS]


@torch.no_grad()
def chat_eval(model, samples, images, batch_size=32):
    """The teacher's conversations about held-out images, asked as chat.py asks them: the image first
    in the first question, each later question after the model's own answers, greedy. An answer is
    right when it names the same colors, shapes, counts, places and yes/no as the teacher's, in the
    same order. Returns ({category: accuracy, n}, one row per question)."""
    conversations = [[] for _ in samples]
    pictures = [data.load_image(os.path.join(images, s["image"])) for s in samples]
    rows = []
    for turn in range(max(len(s["conversations"]) // 2 for s in samples)):
        asked = [k for k, s in enumerate(samples) if len(s["conversations"]) > 2 * turn]
        for k in asked:
            question = samples[k]["conversations"][2 * turn]["value"].replace(data.IMAGE, "").strip()
            conversations[k].append({"from": "human", "value": f"{data.IMAGE}\n{question}" if turn == 0 else question})
        for start in range(0, len(asked), batch_size):
            batch = asked[start:start + batch_size]
            answers = model.answer_batch([conversations[k] for k in batch], [pictures[k] for k in batch], 64)
            for k, answer in zip(batch, answers):
                conversations[k].append({"from": "gpt", "value": answer})
                question, teacher_answer = conversations[k][-2]["value"], samples[k]["conversations"][2 * turn + 1]["value"]
                category = next(c for q, c in ASKED.items() if q in question)
                rows.append({"id": samples[k]["id"], "image": samples[k]["image"], "turn": turn, "category": category,
                             "question": question.replace(f"{data.IMAGE}\n", ""), "answer": answer,
                             "teacher": teacher_answer, "right": facts(answer) == facts(teacher_answer)})
    results = {}
    for category in CATEGORIES + ["overall"]:
        chosen = [r["right"] for r in rows if category in (r["category"], "overall")]
        results[category] = {"accuracy": sum(chosen) / max(len(chosen), 1), "n": len(chosen)}
    return results, rows


def results_table(last, first, blind, chat):
    """Held-out accuracy per category (%): multiple choice with the image last and first, the blind
    baseline (a blank image), chance, and the chat's open-ended answers."""
    lines = [f"{'category':<11}{'n':>5}{'image last':>12}{'image first':>13}{'blind':>8}{'chance':>8}{'chat':>8}{'n':>6}"]
    for c in CATEGORIES + ["overall"]:
        lines.append(f"{c:<11}{last[c]['n']:>5}{100 * last[c]['accuracy']:>11.1f}%{100 * first[c]['accuracy']:>12.1f}%"
                     f"{100 * blind[c]['accuracy']:>7.1f}%{100 * last[c]['chance']:>7.1f}%"
                     f"{100 * chat[c]['accuracy']:>7.1f}%{chat[c]['n']:>6}")
    return "\n".join(lines)


def picture(path, images, chat_rows, out, shown=4):
    """A picture a student can look at: a few held-out images, each with a question, the model's answer
    and the teacher's; and the loss curves of both stages from their metrics.jsonl."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default(size=14)
    canvas = Image.new("RGB", (1100, 40 + 150 * shown), "white")  # images and answers left, losses right
    pen = ImageDraw.Draw(canvas)
    first_turns = [r for r in chat_rows if r["turn"] == 0]
    picked = [next((r for r in first_turns if r["category"] == c), None) for c in CATEGORIES]  # a kind each
    picked = ([r for r in picked if r] + first_turns)[:shown]
    for i, r in enumerate(picked):
        y = 20 + 150 * i
        canvas.paste(data.load_image(os.path.join(images, r["image"])).resize((144, 144), Image.NEAREST), (20, y))
        pen.rectangle([19, y - 1, 164, y + 144], outline="gray")
        pen.text((180, y + 20), f"Q: {r['question']}", fill="black", font=font)
        pen.text((180, y + 55), f"model: {r['answer']}", fill="darkgreen" if r["right"] else "red", font=font)
        pen.text((180, y + 90), f"teacher: {r['teacher']}", fill="gray", font=font)
    for k, stage in enumerate(["stage1", "stage2"]):
        losses = [r["loss"] for r in disk.read_jsonl(os.path.join(out, stage, "metrics.jsonl"))]
        x0, y0, w, h = 680, 40 + 300 * k, 380, 200
        pen.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
        pen.text((x0, y0 - 20), f"{stage} loss ({len(losses)} steps)" if losses else f"{stage}: skipped", fill="black", font=font)
        if len(losses) > 1:
            top = max(losses)
            pen.line([(x0 + w * s / (len(losses) - 1), y0 + h - h * v / top) for s, v in enumerate(losses)], fill="blue")
            pen.text((x0 + 5, y0 + 5), f"{top:.2f}", fill="black", font=font)
            pen.text((x0 + w - 60, y0 + h - 20), f"{losses[-1]:.3f}", fill="black", font=font)
    canvas.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="demo", choices=["demo", "pretrain", "probe"],
                   help="demo (the default), pretrain (remake the stand-ins), or probe (the LM stand-in alone, "
                        "scenes in words)")
    p.add_argument("--seed", type=int, default=0, help="the world's seed and train.py's")
    p.add_argument("--out", default=None, help="output folder (demo: out/toy; pretrain: stand_ins)")
    p.add_argument("--vision", default=os.path.join(STAND_INS, "clip"), help="the CLIP stand-in")
    p.add_argument("--llm", default=os.path.join(STAND_INS, "vicuna"), help="the Vicuna stand-in")
    p.add_argument("--no-stage1", action="store_true", help="ablation: skip stage 1 (W starts random)")
    p.add_argument("--feature-layer", type=int, default=-2, help="ablation: -1 takes Z_v from the last layer")
    p.add_argument("--instruct", default="all", choices=["all", "conversation"],
                   help="ablation: stage 2 on conversations only (no detail, no reasoning)")
    p.add_argument("--images", type=int, default=2000, help="training images (a smaller world runs faster)")
    p.add_argument("--held-out", type=int, default=500, help="demo: held-out images (2 questions each)")
    p.add_argument("--lm-steps", type=int, default=16000, help="pretrain: the LM stand-in's steps of 16 scenes")
    p.add_argument("--n", type=int, default=60, help="probe: questions per category and order")
    p.add_argument("--clip-steps", type=int, default=800, help="pretrain: the CLIP stand-in's steps of 128 pairs")
    args = p.parse_args(argv)
    if args.command == "probe":
        results, existence = probe(args.llm, args.n)
        for order, kinds in existence.items():
            print(f"existence, {order}: " + "; ".join(f"{kind} {right}/{asked}" for kind, (right, asked) in kinds.items()))
        print(f"{'':12}" + "".join(f"{c:>11}" for c in CATEGORIES) + f"   (right of {args.n} each)")
        for order, right in results.items():
            print(f"{order:12}" + "".join(f"{right[c]:>11}" for c in CATEGORIES))
    elif args.command == "pretrain":
        pretrain(args.out or STAND_INS, args.lm_steps, args.clip_steps, args.seed, args.images)
    else:
        args.out = args.out or "out/toy"
        demo(args)


if __name__ == "__main__":
    main()
