"""The paper in miniature: §3 to §5 offline, on a CPU, in minutes.

Offline there is neither COCO, GPT-4, CLIP nor Vicuna. The toy world stands in for all four: images of
1 to 3 shapes in the cells of a 3x3 grid, their symbolic representation (§3's captions and boxes), a
rule-based teacher that reads only that representation, and two small pretrained models in the
formats of the real ones (stand_ins/clip: a CLIPModel with both towers; stand_ins/vicuna: a LLaMA in
float16 with a SentencePiece tokenizer.model, made once by make_stand_ins.py). The demo then runs
the paper on them with the same train.py, llava.py and eval.py that run the real thing.

    python toy.py                     # the demo: world, stage 1, stage 2, evaluation, a picture (minutes)
    python toy.py --seed 3            # another world
    python toy.py --no-stage1         # the paper's ablations: also --feature-layer -1, --instruct conversation
    python make_stand_ins.py          # remake the stand-ins in stand_ins/ (done once; the demo loads them)
"""
import argparse
import json
import os
import random
import re
import shutil
import time
import zlib

import torch

import data
import disk
import eval as evaluation
import llava
import scienceqa
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


def objects_in_words(objects):
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
    told = f"I see {objects_in_words(matching)}: {plural(len(matching), what)}." if matching else \
        f"There are no {what}s."
    return f"How many {what}s are there?", told, str(len(matching))


def ask_position(objects, rng):
    pool = [o for o in objects if sum(name(p) == name(o) for p in objects) == 1]
    o = rng.choice(pool) if pool else None
    return o and (f"Where is the {name(o)}?", f"The {name(o)} is {where(o)} of the image.", where(o))


def ask_existence(objects, rng, hard=False):
    thing, answer, _ = exists_question(objects, rng, hard)
    color = thing.split()[0]
    same_color = [o for o in objects if o["color"] == color]  # a trap has these, in other shapes
    seen = f"I see {objects_in_words(same_color)}" if same_color else f"I see nothing {color}"
    told = f"{seen}, so yes, there is a {thing} in the image." if answer == "yes" else \
        f"{seen}, so no, there is no {thing} in the image."
    return f"Is there a {thing} in the image?", told, answer


QUESTION_MAKERS = {"color": ask_color, "shape": ask_shape, "count": ask_count, "position": ask_position,
       "existence": ask_existence}


def conversation_turns(objects, rng):
    """Questions with definite answers: colors, shapes, counts, positions, existence."""
    turns = [qa[:2] for ask in QUESTION_MAKERS.values() if (qa := ask(objects, rng))]
    rng.shuffle(turns)
    return turns[:rng.randint(2, 4)]


def description(objects):
    parts = [f"The image shows {plural(len(objects), 'object')} on a white background."]
    for o in objects:
        parts.append(f"A {o['size']} {name(o)} is {where(o)}.")
    return " ".join(parts)


def reasoning_turn(objects, rng):
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
        turns = [(rng.choice(data.DETAILED), description(objects))]
    elif kind == "reasoning":
        turns = [reasoning_turn(objects, rng)]
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
        asked = ask_existence(objects, rng, hard) if category == "existence" else QUESTION_MAKERS[category](objects, rng)
        if asked is None:
            return None
        question, fact, right = asked
        options = OPTIONS[category]
    letter = scienceqa.LETTERS[options.index(right)]
    choices = " ".join(f"({scienceqa.LETTERS[i]}) {option}" for i, option in enumerate(options))
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
        symbolic_rep = symbolic(objects)
        files["symbolic"].append({"id": image_id, "image": image_file, **symbolic_rep})
        for j, mc in enumerate(questions):
            extra = {"category": mc["category"], "answer": mc["letter"]} if is_eval else {}
            files["eval" if is_eval else "mc_train"].append(
                {"id": f"{image_id}_mc{j}", "image": image_file, **extra, "conversations": mc["conversations"]})
        kinds = ["conversation"] if is_eval else ["brief", "conversation", "detail", "reasoning"]
        for kind in kinds:
            key = "eval_chat" if is_eval else {"brief": "stage1"}.get(kind, kind)
            files[key].append({"id": f"{image_id}_{kind}", "image": image_file,
                               "conversations": teacher(symbolic_rep, kind, rng)})
    files["instruct"] = files["conversation"] + files["detail"] + files["reasoning"] + files["mc_train"]
    rng.shuffle(files["instruct"])
    for key, samples in files.items():
        disk.write_json(os.path.join(out, f"{key}.json"), samples)
    return {f"{k}.json": len(v) for k, v in files.items()}


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
CATEGORY_BY_QUESTION = {"What color": "color", "What shape": "shape", "How many": "count", "Where is": "position",
                        "Is there": "existence"}


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
                category = next(c for q, c in CATEGORY_BY_QUESTION.items() if q in question)
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
    p.add_argument("--seed", type=int, default=0, help="the world's seed and train.py's")
    p.add_argument("--out", default="out/toy", help="output folder")
    p.add_argument("--vision", default=os.path.join(STAND_INS, "clip"), help="the CLIP stand-in")
    p.add_argument("--llm", default=os.path.join(STAND_INS, "vicuna"), help="the Vicuna stand-in")
    p.add_argument("--no-stage1", action="store_true", help="ablation: skip stage 1 (W starts random)")
    p.add_argument("--feature-layer", type=int, default=-2, help="ablation: -1 takes Z_v from the last layer")
    p.add_argument("--instruct", default="all", choices=["all", "conversation"],
                   help="ablation: stage 2 on conversations only (no detail, no reasoning)")
    p.add_argument("--images", type=int, default=2000, help="training images (a smaller world runs faster)")
    p.add_argument("--held-out", type=int, default=500, help="held-out images (2 questions each)")
    demo(p.parse_args(argv))


if __name__ == "__main__":
    main()
