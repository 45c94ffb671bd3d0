"""§3 and Table 2 of "Visual Instruction Tuning": the data the model learns from.

Table 2, the training sequence, is built here as token ids and labels together, piece by piece:

    X_system-message <STOP>
    Human: X_instruct^1 <STOP> Assistant: X_a^1 <STOP>
    Human: X_instruct^2 <STOP> Assistant: X_a^2 <STOP> ...

Only the answers X_a and their <STOP> are trained (Eq. 3); every other label is -100.

    python data.py show FILE.json --index 0 --model DIR   # print a sample, trained tokens marked
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass

IGNORE = -100  # label of a position that is not trained (PyTorch's cross_entropy ignore_index)
IMAGE = "<image>"  # where the image stands in the first human turn of LLaVA's JSON


class SampleError(ValueError):
    """A sample that cannot be used; the message names it."""


# ----------------------------------------------------------------------------------------------
# Table 2: the conversation templates
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Template:
    name: str
    system: str  # X_system-message
    human: str  # role names
    assistant: str
    sep: str  # after the system message and after each human turn
    stop: str  # <STOP> after each answer; generation stops here

    def __str__(self):
        return self.name


TEMPLATES = {
    # The paper's template (the authors' `conv_vicuna_v0`): <STOP> is "###".
    "paper": Template(
        name="paper",
        system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        human="Human", assistant="Assistant", sep="###", stop="###"),
    # LLaVA-1.5 (the authors' `conv_vicuna_v1`, and llava-hf checkpoints): <STOP> is the EOS "</s>".
    "llava15": Template(
        name="llava15",
        system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        human="USER", assistant="ASSISTANT", sep=" ", stop="</s>"),
}


def get_template(name):
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


# ----------------------------------------------------------------------------------------------
# Table 2 as tokens: input_ids and labels built together
# ----------------------------------------------------------------------------------------------

def encode_text(tokenizer, text):
    """Token ids of one piece of text, without BOS/EOS.

    SentencePiece tokenizers (LLaMA, Vicuna) put a space before every piece they are given; the
    piece " Paris" would become two spaces. Such a tokenizer gets the piece without its own space.
    """
    if text.startswith(" ") and _adds_prefix_space(tokenizer):
        text = text[1:]
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _adds_prefix_space(tokenizer):
    if not hasattr(tokenizer, "_llava_prefix_space"):
        first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))[0]
        tokenizer._llava_prefix_space = first.startswith("\u2581")  # SentencePiece's "▁"
    return tokenizer._llava_prefix_space


def render(conversations, tokenizer, template, image_token_id=None, num_image_tokens=0,
           for_generation=False, max_length=None, sample_id="?"):
    """Turn LLaVA's `conversations` list into (input_ids, labels), the Table 2 sequence.

    conversations: [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", ...}, ...]
    The `<image>` in the first human turn (prefix or suffix) becomes `num_image_tokens` positions
    holding `image_token_id`; llava.py puts the projected visual tokens H_v there.
    for_generation: the conversation ends with a human turn; the ids end with "Assistant:" and are,
    token for token, a prefix of the training ids of the same conversation with its answer.
    Returns two lists of ints of equal length; labels are IGNORE except on answers and their <STOP>.
    """
    template = get_template(str(template))
    check_conversation(conversations, sample_id, image=image_token_id is not None,
                       for_generation=for_generation)
    # Pieces of (text or list of ids, trained?). Neighbouring text pieces with the same flag are
    # tokenized together, so that a piece boundary is only where the trained flag changes.
    pieces = [(template.system + template.sep, False)]
    for turn in conversations:
        if turn["from"] == "human":
            before, image, after = turn["value"].partition(IMAGE)
            pieces.append((f"{template.human}: {before}", False))
            if image:  # X_v, in the place the data put it
                pieces.append(([image_token_id] * num_image_tokens, False))
            pieces.append((after + template.sep + f"{template.assistant}:", False))
        else:  # the answer and its <STOP>: the only trained tokens
            pieces.append((" " + turn["value"], True))
            pieces.append((template.stop, True))

    input_ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels = [IGNORE] * len(input_ids)
    text, text_trained = "", False
    for piece, trained in pieces + [(None, None)]:
        if isinstance(piece, str) and trained == text_trained:
            text += piece  # same flag: tokenize together
            continue
        ids = encode_text(tokenizer, text)  # flush the text gathered so far
        input_ids += ids
        labels += ids if text_trained else [IGNORE] * len(ids)
        text, text_trained = "", trained
        if isinstance(piece, str):
            text = piece
        elif piece is not None:  # image positions, never trained
            input_ids += piece
            labels += [IGNORE] * len(piece)

    if max_length is not None and len(input_ids) > max_length:
        if image_token_id in input_ids[max_length:]:
            raise SampleError(f"sample {sample_id}: {len(input_ids)} tokens; max_length "
                              f"{max_length} would cut through the image positions")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if not for_generation and all(label == IGNORE for label in labels):
        raise SampleError(f"sample {sample_id}: no answer token left to train "
                          f"(max_length {max_length})")
    return input_ids, labels


def check_conversation(conversations, sample_id, image, for_generation=False):
    """Raise SampleError for a conversation that Table 2 cannot render."""
    if not isinstance(conversations, list) or not conversations:
        raise SampleError(f"sample {sample_id}: 'conversations' must be a non-empty list")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt"):
            role = turn.get("from") if isinstance(turn, dict) else turn
            raise SampleError(f"sample {sample_id}: turn {i} has unknown role {role!r}")
        if turn["from"] != ("human", "gpt")[i % 2]:
            raise SampleError(f"sample {sample_id}: turn {i} breaks the human/gpt alternation")
        if not isinstance(turn.get("value"), str) or not turn["value"].strip():
            raise SampleError(f"sample {sample_id}: turn {i} is empty")
    if for_generation != (conversations[-1]["from"] == "human"):
        last = "a human turn" if for_generation else "an answer"
        raise SampleError(f"sample {sample_id}: the conversation must end with {last}")
    places = [i for i, turn in enumerate(conversations) if IMAGE in turn["value"]]
    if image and places != [0]:
        raise SampleError(f"sample {sample_id}: an image needs exactly one {IMAGE} in the first "
                          f"human turn (found in turns {places})")
    if not image and places:
        raise SampleError(f"sample {sample_id}: {IMAGE} in turn {places[0]} but no image")
    if image and conversations[0]["value"].count(IMAGE) != 1:
        raise SampleError(f"sample {sample_id}: more than one {IMAGE} in the first turn")


def show(input_ids, labels, tokenizer, image_token_id=None):
    """The classroom view: the sequence as text, trained tokens in [[...]] (and green on a terminal)."""
    color = sys.stdout.isatty()
    out, i = [], 0
    while i < len(input_ids):
        if input_ids[i] == image_token_id:  # a run of image positions
            j = i
            while j < len(input_ids) and input_ids[j] == image_token_id:
                j += 1
            out.append(f"<image x{j - i}>")
            i = j
            continue
        j, trained = i, labels[i] != IGNORE
        while j < len(input_ids) and input_ids[j] != image_token_id and (labels[j] != IGNORE) == trained:
            j += 1
        text = tokenizer.decode(input_ids[i:j])
        if trained:
            text = f"\033[1;32m[[{text}]]\033[0m" if color else f"[[{text}]]"
        out.append(text)
        i = j
    n_trained = sum(label != IGNORE for label in labels)
    return "".join(out) + f"\n-- {len(input_ids)} tokens, {n_trained} trained (in [[ ]])"


# ----------------------------------------------------------------------------------------------
# §3 in miniature: the toy world and its symbolic representation
# ----------------------------------------------------------------------------------------------
# Offline there is neither COCO nor GPT-4. The toy world stands in for both: images of simple shapes,
# each with the symbolic representation of §3 (captions, and boxes `category: [x1, y1, x2, y2]`
# normalized to 0..1), and a rule-based teacher that reads only that representation.
# Objects sit in the cells of a 3x3 grid; with the vision encoder's patch as large as a cell, one
# object is about one visual token.

SHAPES = ["square", "circle", "triangle"]
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
          "purple": (150, 60, 190)}
GRID = 3  # cells per side
ROWS, COLS = ["top", "middle", "bottom"], ["left", "center", "right"]

BRIEF = [  # the paper's brief-description instructions (stage 1)
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.", "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.", "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.", "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.", "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented."]
DETAILED = [  # detailed-description instructions, as in the paper's list
    "Describe the following image in detail.", "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.", "Share a comprehensive rundown of the presented image.",
    "Explain the various aspects of the image before you.", "Analyze the image in a comprehensive and detailed manner."]


def toy_scene(rng, cell=16):
    """1 to 3 objects in distinct grid cells, in reading order: shape, color, size and box in pixels."""
    objects = []
    for index in sorted(rng.sample(range(GRID * GRID), rng.randint(1, 3))):
        row, col = divmod(index, GRID)
        size = rng.choice(["small", "large"])
        side = rng.choice([8, 10]) if size == "small" else rng.choice([14, 16])
        x1 = col * cell + (cell - side) // 2  # centered in its cell: one object, one patch
        y1 = row * cell + (cell - side) // 2
        objects.append({"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "size": size,
                        "row": row, "col": col, "box": [x1, y1, x1 + side, y1 + side]})
    return objects


def draw(objects, cell=16):
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (GRID * cell, GRID * cell), (255, 255, 255))
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
    """'at the top left', 'at the middle right', 'in the center': the cell's row and column words,
    the words the LM stand-in reads there (train.scene_words), so a place is read, not worked out."""
    row, col = ROWS[o["row"]], COLS[o["col"]]
    return "in the center" if (row, col) == ("middle", "center") else f"at the {row} {col}"


def symbolic(objects, cell=16):
    """§3's symbolic representation: captions and normalized boxes, all the teacher may see."""
    side = GRID * cell
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


def exists_question(objects, rng):
    """'Is there a ...?' with yes and no equally likely; half the no's are compositional traps.
    Returns (the thing asked about, "yes" or "no", whether it is a trap)."""
    if rng.random() < 0.5:
        return name(rng.choice(objects)), "yes", False
    trap = absent_pair(objects, rng) if rng.random() < 0.5 else None
    if trap is None:
        present = {name(o) for o in objects}
        trap = rng.choice([(c, s) for c in COLORS for s in SHAPES if f"{c} {s}" not in present])
    color, shape = trap
    is_trap = any(o["color"] == color for o in objects) and any(o["shape"] == shape for o in objects)
    return f"{color} {shape}", "no", is_trap


# One question-answer pair per kind of fact; None when the image cannot ask it unambiguously.
def ask_color(objects, rng):
    pool = unique(objects, "shape")  # "the circle" must name one object
    o = rng.choice(pool) if pool else None
    # Not "I see a green square, so ...": count and existence answers begin "I see a" and then name
    # the first object in reading order, and an LM taught both learns to follow "I see a" with the
    # first object's color whatever was asked (the toy demo's LM, given the held-out scenes in words:
    # color right 93% when the asked object came first, 38% second, 22% third). Here the shape
    # just said asks for its own color.
    return o and (f"What color is the {o['shape']}?", f"The {o['shape']} is {o['color']}.", o["color"])


def ask_shape(objects, rng):
    pool = unique(objects, "color")
    o = rng.choice(pool) if pool else None
    return o and (f"What shape is the {o['color']} object?", f"The {o['color']} object is a {o['shape']}.", o["shape"])


def listed(objects):
    """'a red circle', 'a red circle and a blue square', ... in reading order."""
    return and_list([f"a {name(o)}" for o in sorted(objects, key=lambda o: (o["row"], o["col"]))])


# Counting and existence answers reason first, as the paper's best ScienceQA answers do: they name the
# objects that matter (one look at the image per object), then conclude from those words.
def ask_count(objects, rng):
    what = rng.choice(SHAPES + ["object"])
    matching = [o for o in objects if what in ("object", o["shape"])]
    told = f"I see {listed(matching)}: {plural(len(matching), what)}." if matching else f"There are no {what}s."
    return f"How many {what}s are there?", told, str(len(matching))


def ask_position(objects, rng):
    pool = [o for o in objects if sum(name(p) == name(o) for p in objects) == 1]
    o = rng.choice(pool) if pool else None
    return o and (f"Where is the {name(o)}?", f"The {name(o)} is {where(o)} of the image.", where(o))


def ask_existence(objects, rng):
    thing, answer, _ = exists_question(objects, rng)
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
    n = len(objects)
    parts = [f"The image shows {plural(n, 'object')} on a white background."]
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
    """The stand-in for GPT-4: a symbolic representation -> one sample's conversations."""
    objects = parse_boxes(symbolic_rep["boxes"])
    if kind == "conversation":
        turns = conversation_turns(objects, rng)
    elif kind == "detail":
        turns = [(rng.choice(DETAILED), describe(objects))]
    elif kind == "reasoning":
        turns = [reason(objects, rng)]
    elif kind == "brief":  # stage 1: a brief instruction answered by the caption
        turns = [(rng.choice(BRIEF), symbolic_rep["captions"][0])]
    else:
        raise ValueError(f"unknown response type {kind!r}")
    first = turns[0][0]
    conversations = [{"from": "human", "value": f"{IMAGE}\n{first}" if rng.random() < 0.5 else f"{first}\n{IMAGE}"}]
    conversations.append({"from": "gpt", "value": turns[0][1]})
    for question, answer in turns[1:]:
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return conversations


# ----------------------------------------------------------------------------------------------
# §5.2 in miniature: multiple-choice questions in ScienceQA form
# ----------------------------------------------------------------------------------------------

CATEGORIES = ["color", "shape", "count", "position", "existence"]
LETTERS = "ABCDE"


OPTIONS = {"color": list(COLORS), "shape": SHAPES, "count": ["0", "1", "2", "3"], "existence": ["yes", "no"],
           "row": ROWS, "column": COLS}


def mc_sample(objects, category, rng):
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
        asked = ASK[category](objects, rng)
        if asked is None:
            return None
        question, fact, right = asked
        options = OPTIONS[category]
    letter = LETTERS[options.index(right)]
    listed = " ".join(f"({LETTERS[i]}) {option}" for i, option in enumerate(options))
    question, answer = f"Question: {question}\nOptions: {listed}", f"{fact} The answer is {letter}."
    # The image after the question, as in part of LLaVA-Instruct ("...\n<image>"): a causal LM then
    # reads each visual token already knowing what is asked, and the token of the asked object can
    # mark itself; with the image first, the answer alone must find the object among the visual
    # tokens. Given the scenes in words (no vision), the toy's LM stand-in answered position
    # questions 92-99% right in 6 runs of 7 with the image after (82% in one), and 80%, 82% and
    # 96% in 3 runs with it first.
    return {"question": question, "answer": answer, "letter": letter, "category": category,
            "conversations": [{"from": "human", "value": f"{question}\n{IMAGE}"}, {"from": "gpt", "value": answer}]}


# ----------------------------------------------------------------------------------------------
# Writing the toy world as LLaVA JSON files and an image folder
# ----------------------------------------------------------------------------------------------

def make_toy_world(out, n_images=2000, n_eval=400, mc_per_image=1, seed=0, cell=16):
    """Write out/images/*.png and the LLaVA JSON files; returns {file name: number of samples}.

    stage1.json      brief instruction + caption pairs (stage 1, like CC-595K's chat.json)
    conversation.json, detail.json, reasoning.json: the three response types (like LLaVA-Instruct)
    mc_train.json    multiple-choice questions on training images (like ScienceQA's train split)
    instruct.json    all of the above but stage 1, shuffled: stage 2's data
    eval.json        multiple-choice questions on unseen images, with "category" and "answer"
    symbolic.json    each image's symbolic representation (captions and boxes)
    """
    import random
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    files = {k: [] for k in ["stage1", "conversation", "detail", "reasoning", "mc_train", "eval", "symbolic"]}
    for i in range(n_images + n_eval):
        held_out = i >= n_images
        # Multiple-choice questions; on held-out images balanced over the categories. A scene that
        # cannot ask one (say, no shape appears just once) is drawn again.
        categories = [CATEGORIES[(i * mc_per_image + j) % len(CATEGORIES)] if held_out else rng.choice(CATEGORIES)
                      for j in range(mc_per_image)]
        while True:
            objects = toy_scene(rng, cell)
            questions = [mc_sample(objects, category, rng) for category in categories]
            if all(questions):
                break
        image_id = f"toy_{i:06d}"
        image_file = f"{image_id}.png"
        draw(objects, cell).save(os.path.join(out, "images", image_file))
        rep = symbolic(objects, cell)
        files["symbolic"].append({"id": image_id, "image": image_file, **rep})
        for j, mc in enumerate(questions):
            extra = {"category": mc["category"], "answer": mc["letter"]} if held_out else {}
            files["eval" if held_out else "mc_train"].append(
                {"id": f"{image_id}_mc{j}", "image": image_file, **extra, "conversations": mc["conversations"]})
        if held_out:
            continue
        for kind in ["brief", "conversation", "detail", "reasoning"]:
            files["stage1" if kind == "brief" else kind].append(
                {"id": f"{image_id}_{kind}", "image": image_file, "conversations": teacher(rep, kind, rng)})
    files["instruct"] = files["conversation"] + files["detail"] + files["reasoning"] + files["mc_train"]
    rng.shuffle(files["instruct"])
    for key, samples in files.items():
        write_json(os.path.join(out, f"{key}.json"), samples)
    return {f"{k}.json": len(v) for k, v in files.items()}


def write_json(path, obj):
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# §3 with a real teacher: GPT-assisted generation from COCO-style annotations
# ----------------------------------------------------------------------------------------------
# The teacher sees only text: the captions and the boxes of one image (the query), after a system
# message and a few hand-written seed examples, as in-context pairs of (context, response).

TEACHER_SYSTEM = {
    "conversation": "You are an AI visual assistant, and you are seeing a single image. What you see is "
    "provided with five sentences describing the image and the objects in it with their bounding boxes "
    "(category: [x1, y1, x2, y2], coordinates normalized from 0 to 1). Design a conversation between you "
    "and a person asking about this photo, answering as if you see the image. Ask diverse questions about "
    "the object types, counting the objects, object actions, object locations and relative positions "
    "between objects. Only include questions that have definite answers. Write each question after "
    "'Question:' and each answer after 'Answer:', and separate the turns with a line '==='.",
    "detail": "You are an AI visual assistant that can analyze a single image. You receive five sentences "
    "describing the same image and the objects in it with their bounding boxes (category: [x1, y1, x2, "
    "y2], normalized from 0 to 1). Describe the image in detail, as if you see it: the objects, their "
    "counts, colors, positions and relations. Do not mention the sentences or the coordinates.",
    "reasoning": "You are an AI visual assistant that can analyze a single image. You receive five "
    "sentences describing the same image and the objects in it with their bounding boxes (category: "
    "[x1, y1, x2, y2], normalized from 0 to 1). Create one plausible question about the image that needs "
    "reasoning or background knowledge to answer, and answer it in detail, step by step, as if you see the "
    "image. Write the question after 'Question:' and the answer after 'Answer:'.",
}
SEED_EXAMPLES = {  # (captions, boxes) -> the response a good teacher gives; written by hand
    "conversation": [(
        ["A man rides a bicycle down a city street.", "A cyclist passes a red bus on the road."],
        ["person: [0.412, 0.301, 0.530, 0.802]", "bicycle: [0.398, 0.560, 0.551, 0.905]",
         "bus: [0.012, 0.205, 0.361, 0.774]"],
        "Question:\nWhat is the man riding?\n===\nAnswer:\nThe man is riding a bicycle.\n===\n"
        "Question:\nWhat color is the bus?\n===\nAnswer:\nThe bus is red.\n===\n"
        "Question:\nWhere is the bus relative to the cyclist?\n===\nAnswer:\nThe bus is to the left of the "
        "cyclist, on the same road.")],
    "detail": [(
        ["Two dogs play with a ball on the grass.", "A brown dog and a white dog chase a ball in a park."],
        ["dog: [0.102, 0.402, 0.420, 0.880]", "dog: [0.550, 0.380, 0.902, 0.851]",
         "sports ball: [0.452, 0.700, 0.503, 0.760]"],
        "The image shows two dogs playing in a grassy park. A brown dog on the left and a white dog on the "
        "right both run toward a small ball lying on the grass between them.")],
    "reasoning": [(
        ["A kitchen counter with a cake and lit candles.", "A birthday cake sits next to a stack of plates."],
        ["cake: [0.300, 0.402, 0.650, 0.750]", "dining table: [0.000, 0.520, 1.000, 1.000]"],
        "Question:\nWhat occasion is likely being prepared for?\n===\nAnswer:\nA birthday celebration. The "
        "cake carries lit candles, which people usually blow out on a birthday, and the stack of plates next "
        "to it suggests that guests will share the cake.")],
}


def read_jsonl(path):
    """The rows of a JSONL file (none if it does not exist); a last line cut short by a crash is ignored."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def symbolic_context(captions, boxes):
    """The teacher's view of one image: §3's captions, then boxes."""
    return "\n".join(captions) + "\n\n" + "\n".join(boxes)


def teacher_messages(captions, boxes, kind):
    """Chat-completion messages: system message, the seed examples in context, then the query."""
    messages = [{"role": "system", "content": TEACHER_SYSTEM[kind]}]
    for seed_captions, seed_boxes, response in SEED_EXAMPLES[kind]:
        messages += [{"role": "user", "content": symbolic_context(seed_captions, seed_boxes)},
                     {"role": "assistant", "content": response}]
    return messages + [{"role": "user", "content": symbolic_context(captions, boxes)}]


def coco_annotations(captions_file, instances_file):
    """COCO's captions_*.json and instances_*.json -> {image id: (file name, captions, boxes)} with
    boxes as `category: [x1, y1, x2, y2]` normalized by the image size."""
    captions, instances = load_json_object(captions_file), load_json_object(instances_file)
    images = {im["id"]: im for im in instances["images"]}
    names = {c["id"]: c["name"] for c in instances["categories"]}
    out = {i: (im["file_name"], [], []) for i, im in images.items()}
    for a in captions["annotations"]:
        if a["image_id"] in out:
            out[a["image_id"]][1].append(a["caption"].strip())
    for a in instances["annotations"]:
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        W, H = im["width"], im["height"]
        box = [x / W, y / H, (x + w) / W, (y + h) / H]
        out[a["image_id"]][2].append(f"{names[a['category_id']]}: [{', '.join(f'{v:.3f}' for v in box)}]")
    return out


def chat_completion(messages, base_url, model, api_key, timeout=60, retries=5, backoff=1.0):
    """One call to an OpenAI-compatible /chat/completions endpoint with the standard library.
    Timeouts, refused connections, 429 and 5xx are retried with exponential backoff; other HTTP
    errors raise. The key goes in the Authorization header only, never in a message."""
    import time
    import urllib.error
    import urllib.request
    body = json.dumps({"model": model, "messages": messages, "temperature": 0.7}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(retries + 1):
        request = urllib.request.Request(base_url.rstrip("/") + "/chat/completions", body, headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.loads(response.read())
            return reply["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500:
                raise RuntimeError(f"{base_url}: HTTP {e.code} {e.reason}") from None
            error = f"HTTP {e.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            error = type(e).__name__
        if attempt == retries:
            raise RuntimeError(f"{base_url}: gave up after {retries + 1} tries ({error})")
        time.sleep(backoff * 2 ** attempt)


def parse_teacher_reply(text, kind, rng):
    """The teacher's text -> LLaVA `conversations` (image prefix in the first turn).
    conversation/reasoning: Question:/Answer: blocks separated by '==='. Raises ValueError."""
    if kind == "detail":
        if not text.strip():
            raise ValueError("empty description")
        pairs = [(rng.choice(DETAILED), text.strip())]
    else:
        blocks = [b.strip() for b in text.split("===") if b.strip()]
        pairs, question = [], None
        for block in blocks:
            head, _, body = block.partition(":")
            if head.strip() == "Question" and question is None and body.strip():
                question = body.strip()
            elif head.strip() == "Answer" and question is not None and body.strip():
                pairs.append((question, body.strip()))
                question = None
            else:
                raise ValueError(f"unexpected block {block[:40]!r}")
        if not pairs or question is not None:
            raise ValueError("no complete Question/Answer pair")
        if kind == "reasoning":
            pairs = pairs[:1]
    conversations = []
    for i, (question, answer) in enumerate(pairs):
        conversations += [{"from": "human", "value": f"{IMAGE}\n{question}" if i == 0 else question},
                          {"from": "gpt", "value": answer}]
    return conversations


def generate_with_teacher(annotations, kind, out_jsonl, base_url, model, api_key, limit=None, seed=0, **kwargs):
    """Ask the teacher about every image; append each result to out_jsonl as it arrives.
    A rerun skips the ids already in out_jsonl; a malformed reply is logged and skipped.
    Returns (new samples, skipped)."""
    import random
    rng = random.Random(seed)
    done = {row.get("id") for row in read_jsonl(out_jsonl)}  # a line cut short by a crash: done again
    new = skipped = 0
    todo = [(str(i), a) for i, a in sorted(annotations.items())][:limit]
    with open(out_jsonl, "a") as out:
        for image_id, (file_name, captions, boxes) in todo:
            sample_id = f"{image_id}_{kind}"
            if sample_id in done:
                continue
            reply = chat_completion(teacher_messages(captions, boxes, kind), base_url, model, api_key, **kwargs)
            try:
                conversations = parse_teacher_reply(reply, kind, rng)
            except ValueError as e:
                print(f"skipped {sample_id}: malformed teacher reply ({e})", file=sys.stderr)
                skipped += 1
                continue
            out.write(json.dumps({"id": sample_id, "image": file_name, "conversations": conversations}) + "\n")
            out.flush()
            new += 1
    return new, skipped


# ----------------------------------------------------------------------------------------------
# Datasets: LLaVA's public JSON files as they are (chat.json, llava_instruct_150k.json, ...)
# ----------------------------------------------------------------------------------------------

def load_image(path, pad_to_square=False, background=(0, 0, 0)):
    """Any image file as 8-bit RGB: RGBA and palettes over white, grayscale, CMYK, 16-bit.
    pad_to_square: LLaVA-1.5's padding of the short side with `background` (the image mean)."""
    from PIL import Image
    import numpy as np
    with Image.open(path) as image:
        image.load()
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or 32-bit grayscale
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray((pixels.clip(0, top) / top * 255).round().astype(np.uint8), "L")
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    image = image.convert("RGB")
    if pad_to_square and image.width != image.height:
        side = max(image.size)
        square = Image.new("RGB", (side, side), background)
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = square
    return image


class LazyDataset:
    """A LLaVA JSON file read once; each sample is rendered and its image read only when asked for.

    Bad samples (missing or corrupt image, broken turns, <image> without an image, ...) give None
    and a one-line message naming the sample and file; with strict=True the first one is fatal.
    """

    def __init__(self, json_path, image_folder, model, max_length=2048, pad_to_square=False, strict=False):
        self.path, self.image_folder, self.max_length = json_path, image_folder, max_length
        self.samples = load_json(json_path)
        self.tokenizer, self.template = model.tokenizer, model.template
        self.image_processor, self.image_token_id = model.image_processor, model.image_token_id
        self.num_image_tokens, self.pad_to_square, self.strict = model.num_image_tokens, pad_to_square, strict
        mean = getattr(self.image_processor, "image_mean", [0, 0, 0])
        self.background = tuple(int(255 * m) for m in mean)

    def __len__(self):
        return len(self.samples)

    def lengths(self):
        """A cheap guess of each sample's length in tokens (characters / 4, plus the image), for
        grouping samples of similar length; read from the JSON alone."""
        return [sum(len(str(t.get("value", ""))) for t in s.get("conversations", []) if isinstance(t, dict)) // 4
                + (self.num_image_tokens if s.get("image") else 0) if isinstance(s, dict) else 0
                for s in self.samples]

    def __getitem__(self, index):
        try:
            return self.load(index)
        except SampleError as e:
            if self.strict:
                raise
            print(f"skipped: {e}", file=sys.stderr)
            return None

    def load(self, index):
        import torch
        sample = self.samples[index]
        sample_id = f"{sample.get('id', index)!s} ({self.path}[{index}])" if isinstance(sample, dict) else index
        if not isinstance(sample, dict) or "conversations" not in sample:
            raise SampleError(f"sample {sample_id}: no 'conversations'")
        pixel_values = None
        if sample.get("image") is not None:
            image_path = os.path.join(self.image_folder, sample["image"])
            try:
                image = load_image(image_path, self.pad_to_square, self.background)
            except Exception as e:  # missing, truncated, not an image
                raise SampleError(f"sample {sample_id}: cannot read image {image_path}: {type(e).__name__}: {e}")
            pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        input_ids, labels = render(sample["conversations"], self.tokenizer, self.template,
                                   self.image_token_id if pixel_values is not None else None,
                                   self.num_image_tokens, max_length=self.max_length, sample_id=sample_id)
        return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels), "pixel_values": pixel_values}


def collate(samples, pad_id):
    """Pad a list of samples on the right into one batch; None (skipped) samples are counted."""
    import torch
    kept = [s for s in samples if s is not None]
    T = max((len(s["input_ids"]) for s in kept), default=1)
    input_ids = torch.full((len(kept), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(kept), T), IGNORE, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(kept), T), dtype=torch.long)  # (B, T)
    for i, s in enumerate(kept):
        n = len(s["input_ids"])
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = s["input_ids"], s["labels"], 1
    images = [s["pixel_values"] for s in kept if s["pixel_values"] is not None]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": torch.stack(images) if images else None,  # (B_img, 3, H, W)
            "skipped": len(samples) - len(kept)}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("show", help="print one tokenized sample with its trained tokens marked")
    p.add_argument("file", help="a LLaVA JSON file (a list of samples)")
    p.add_argument("--index", type=int, default=0, help="which sample")
    p.add_argument("--model", default="out/toy/stage2", help="a model directory (for its tokenizer)")
    p.add_argument("--template", default=None, help="paper or llava15 (default: the model's)")
    p = sub.add_parser("toy", help="write the toy world: images and LLaVA JSON files")
    p.add_argument("--out", default="out/toy/data", help="output folder")
    p.add_argument("--images", type=int, default=2000, help="training images")
    p.add_argument("--eval", type=int, default=500, help="held-out images for the multiple-choice evaluation")
    p.add_argument("--mc-per-image", type=int, default=2, help="multiple-choice questions per image")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("teacher", help="GPT-assisted generation from COCO annotations with a chat-completions API")
    p.add_argument("--captions", required=True, help="COCO captions_*.json")
    p.add_argument("--instances", required=True, help="COCO instances_*.json")
    p.add_argument("--kind", required=True, choices=["conversation", "detail", "reasoning"])
    p.add_argument("--out", required=True, help="JSONL file, appended to; a rerun skips the ids in it")
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))
    p.add_argument("--model", default=os.environ.get("OPENAI_MODEL", "gpt-4"), help="the teacher model")
    p.add_argument("--limit", type=int, default=None, help="at most this many images")
    args = parser.parse_args(argv)

    if args.command == "toy":
        import time
        start = time.time()
        sizes = make_toy_world(args.out, args.images, args.eval, args.mc_per_image, args.seed)
        print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + f" ({time.time() - start:.1f} s)")
    elif args.command == "teacher":
        key = os.environ.get("OPENAI_API_KEY")  # from the environment only: never a flag, never printed
        new, skipped = generate_with_teacher(coco_annotations(args.captions, args.instances), args.kind,
                                             args.out, args.base_url, args.model, key, limit=args.limit)
        print(f"{args.out}: {new} new samples, {skipped} malformed replies skipped")
    elif args.command == "show":
        import llava
        tokenizer, config = llava.load_tokenizer_and_config(args.model)
        samples = load_json(args.file)
        if not 0 <= args.index < len(samples):
            sys.exit(f"{args.file}: --index {args.index} is out of range (0..{len(samples) - 1})")
        sample = samples[args.index]
        has_image = "image" in sample
        ids, labels = render(sample["conversations"], tokenizer, args.template or config["template"],
                             image_token_id=config["image_token_id"] if has_image else None,
                             num_image_tokens=config["num_image_tokens"], sample_id=sample.get("id", args.index))
        print(show(ids, labels, tokenizer, config["image_token_id"]))


def load_json_object(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: cannot read JSON: {e}")


def load_json(path):
    """A LLaVA JSON file: a list of samples."""
    samples = load_json_object(path)
    if not isinstance(samples, list):
        raise SystemExit(f"{path}: expected a JSON list of samples")
    return samples


if __name__ == "__main__":
    main()
