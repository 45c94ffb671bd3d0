"""§3 and Table 2 of "Visual Instruction Tuning": the data the model learns from.

Table 2, the training sequence, is built here as token ids and labels together (the text tokenized
at once, the answers found by their characters):

    X_system-message <STOP>
    Human: X_instruct^1 <STOP> Assistant: X_a^1 <STOP>
    Human: X_instruct^2 <STOP> Assistant: X_a^2 <STOP> ...

Only the answers X_a and their <STOP> are trained (Eq. 3); every other label is -100.

    python data.py show FILE.json --index 0 --model DIR   # print a sample, trained tokens marked
"""
import argparse
import itertools
import os
import sys
from dataclasses import dataclass

import torch

import chat_api
import cli
import disk
import formats
from cli import SampleError

IGNORE = -100  # label of a position that is not trained (PyTorch's cross_entropy ignore_index)
IMAGE = "<image>"  # where the image stands in the first human turn of LLaVA's JSON


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
    image_first: bool  # <image> moved to the start of the first turn (LLaVA-1.5), or left where the data put it

    def __str__(self):
        return self.name


TEMPLATES = {
    # The paper's template (the authors' `conv_vicuna_v0`): <STOP> is "###".
    "paper": Template(
        name="paper",
        system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        human="Human", assistant="Assistant", sep="###", stop="###", image_first=False),
    # LLaVA-1.5 (the authors' `conv_vicuna_v1`, and llava-hf checkpoints): <STOP> is the EOS "</s>".
    "llava15": Template(
        name="llava15",
        system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        human="USER", assistant="ASSISTANT", sep=" ", stop="</s>", image_first=True),
}


def get_template(name):
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


# ----------------------------------------------------------------------------------------------
# Table 2 as tokens: input_ids and labels built together
# ----------------------------------------------------------------------------------------------

def conversation_text(conversations, template, image=False):
    """Table 2 as one string, and the (start, end) character spans of what is trained: each answer
    X_a with the space before it and its <STOP>. A template with image_first puts the image first in
    the first turn (LLaVA-1.5: the authors' preprocess_multimodal, llava-hf's prompts); the paper's
    keeps it where the data put it. A conversation ending in a human turn ends with "Assistant:", the chat prompt."""
    text, trained = template.system + template.sep, []
    for i, turn in enumerate(conversations):
        value = turn["value"]
        if turn["from"] == "human":
            if i == 0 and image and template.image_first:
                value = IMAGE + "\n" + value.replace(IMAGE, "").strip()
            text += f"{template.human}: {value}{template.sep}{template.assistant}:"
        else:  # the answer and its <STOP>: the only trained text
            trained.append((len(text), len(text) + 1 + len(value) + len(template.stop)))
            text += " " + value + template.stop
    return text, trained


def add_image_token(tokenizer):
    """Add <image> to the tokenizer as a special token if it is missing, and return its id: one token
    that never merges with its neighbours, which render() replaces by the image's positions. Called
    once where a tokenizer is loaded (llava.build, llava.load, `data.py show`), never by render()."""
    if IMAGE not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(IMAGE)


def render(conversations, tokenizer, template, image_token_id=None, num_image_tokens=0,
           for_generation=False, max_length=None, sample_id="?"):
    """Turn LLaVA's `conversations` list into (input_ids, labels), the Table 2 sequence.

    conversations: [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", ...}, ...]
    The whole text is tokenized at once, as a llava-hf processor does at inference and as the
    authors trained (a piece tokenized alone can differ: SentencePiece starts every piece with "▁").
    The tokenizer adds BOS if it is set up to. A token is trained if its characters overlap an
    answer or its <STOP>; every other label is IGNORE. The <image> in the first human turn becomes
    `num_image_tokens` positions holding `image_token_id`; llava.py puts the visual tokens H_v there.
    for_generation: the conversation ends with a human turn; the ids end with "Assistant:" and are,
    token for token, a prefix of the training ids of the same conversation with its answer.
    Returns two lists of ints of equal length.
    """
    template = get_template(str(template))
    check_conversation(conversations, sample_id, image=image_token_id is not None, for_generation=for_generation,
                       stop=template.stop)
    text, trained = conversation_text(conversations, template, image=image_token_id is not None)
    placeholder = tokenizer.convert_tokens_to_ids(IMAGE)
    encoded = tokenizer(text, return_offsets_mapping=True)
    # <image> must be one token of its own, or the image's positions would silently be missing
    assert image_token_id is None or encoded["input_ids"].count(placeholder) == 1, \
        "the tokenizer has no <image> token: call add_image_token(tokenizer) where it is loaded"
    input_ids, labels = [], []
    for position, (token, (start, end)) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"])):
        if token == tokenizer.eos_token_id and start == end and position > 0:
            continue  # an EOS the tokenizer appends: the text already ends where it should
        if image_token_id is not None and token == placeholder:  # X_v, never trained
            input_ids += [image_token_id] * num_image_tokens
            labels += [IGNORE] * num_image_tokens
            continue
        input_ids.append(token)
        labels.append(token if any(start < b and end > a for a, b in trained) else IGNORE)

    if max_length is not None and len(input_ids) > max_length:
        if image_token_id is not None and image_token_id in input_ids[max_length:]:
            raise SampleError(f"sample {sample_id}: {len(input_ids)} tokens; max_length "
                              f"{max_length} would cut through the image positions")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if not for_generation and all(label == IGNORE for label in labels):
        raise SampleError(f"sample {sample_id}: no answer token left to train "
                          f"(max_length {max_length})")
    return input_ids, labels


def check_conversation(conversations, sample_id, image, for_generation=False, stop=None):
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
        try:  # a lone surrogate ("\ud800": half of an emoji, cut by a scraper) cannot be tokenized
            turn["value"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise SampleError(f"sample {sample_id}: turn {i} is not valid Unicode text "
                              f"({turn['value'][e.start]!r} at character {e.start}: {e.reason})") from None
        if stop and turn["from"] == "gpt" and stop in turn["value"]:  # it would train a stop mid-answer
            raise SampleError(f"sample {sample_id}: answer in turn {i} contains the template's stop {stop!r}")
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
    """The classroom view: the sequence as text, trained tokens in [[...]] (and green on a terminal,
    unless NO_COLOR is set or TERM is dumb), each run of image positions as <image xN>."""
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    kind = ["image" if i == image_token_id else label != IGNORE for i, label in zip(input_ids, labels)]
    text_ids, shown, out = [], "", []
    for run, group in itertools.groupby(zip(input_ids, kind), key=lambda pair: pair[1]):
        ids = [i for i, _ in group]
        if run == "image":
            out.append(f"<image x{len(ids)}>")
            continue
        text_ids += ids  # decoded with all the text before it, so that a piece keeps its leading space
        text = tokenizer.decode(text_ids)
        piece, shown = text[len(shown):], text
        out.append((f"\033[1;32m[[{piece}]]\033[0m" if color else f"[[{piece}]]") if run else piece)
    n_trained = sum(label != IGNORE for label in labels)
    return "".join(out) + f"\n-- {len(input_ids)} tokens, {n_trained} trained (in [[ ]])"


# ----------------------------------------------------------------------------------------------
# §3: the paper's instruction lists
# ----------------------------------------------------------------------------------------------

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


LETTERS = "ABCDE"  # multiple-choice options, as ScienceQA letters them


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
    captions, instances = disk.load_json_object(captions_file), disk.load_json_object(instances_file)
    for path, obj, keys in [(captions_file, captions, ["annotations"]),
                            (instances_file, instances, ["images", "categories", "annotations"])]:
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), list) for k in keys):
            raise SystemExit(f"{path}: not a COCO file (needs lists {', '.join(keys)})")
    where = instances_file, "images"
    try:
        images = {im["id"]: im for im in instances["images"]}
        where = instances_file, "categories"
        names = {c["id"]: c["name"] for c in instances["categories"]}
        out = {}
        for i, im in images.items():
            if not all(isinstance(im.get(k), (int, float)) and im[k] > 0 for k in ("width", "height")):
                print(f"skipped image {i} ({instances_file}): width {im.get('width')!r}, height "
                      f"{im.get('height')!r}; its boxes cannot be normalized", file=sys.stderr)
                continue
            out[i] = (im["file_name"], [], [])
        where = captions_file, "annotations"
        for a in captions["annotations"]:
            if a["image_id"] in out:
                out[a["image_id"]][1].append(a["caption"].strip())
        where = instances_file, "annotations"
        for a in instances["annotations"]:
            if a["image_id"] not in out:  # instances of an image that is not listed (or was skipped above)
                continue
            W, H = images[a["image_id"]]["width"], images[a["image_id"]]["height"]
            x, y, w, h = (float(v) for v in a["bbox"])
            box = [x / W, y / H, (x + w) / W, (y + h) / H]
            out[a["image_id"]][2].append(f"{names[a['category_id']]}: [{', '.join(f'{v:.3f}' for v in box)}]")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SystemExit(f"{where[0]}: not a COCO file: an entry of its {where[1]} is malformed "
                         f"({type(e).__name__}: {e})") from None
    uncaptioned = [i for i, (_, captions, _) in out.items() if not captions]
    if uncaptioned:  # the teacher would describe them from boxes alone: a subset of the captions was given
        print(f"skipped {len(uncaptioned)} images of {instances_file} that {captions_file} has no caption for "
              f"(e.g. image {uncaptioned[0]})", file=sys.stderr)
    return {i: a for i, a in out.items() if a[1]}


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


TEACHER_FIELDS = ["id", "image", "conversations", "teacher"]  # a row of the teacher's JSONL


def teacher_rows(out_jsonl, kind, model):
    """The rows the teacher wrote in out_jsonl before, made with the same `kind` and `model`; stop with
    one line if the file is anything else (LLaVA JSON, another program's JSONL, another teacher's)."""
    made_by = {"model": model, "kind": kind}
    if out_jsonl.endswith(".json"):
        raise SystemExit(f"--out {out_jsonl}: the teacher writes JSONL (one sample a line), not a LLaVA JSON "
                         f"list; name it .jsonl")
    if not os.path.exists(out_jsonl):
        return []
    if not os.path.isfile(out_jsonl):  # a folder, or a FIFO that reading would wait on forever
        raise SystemExit(f"--out {out_jsonl}: not a regular file; pass a .jsonl file")
    with open(out_jsonl, "rb") as f:
        start = f.read(64).lstrip()
    if start.startswith(b"["):
        raise SystemExit(f"--out {out_jsonl}: a JSON list (LLaVA JSON?), not the teacher's JSONL; pass another --out")
    rows = disk.read_jsonl(out_jsonl)  # a line cut short by a crash is ignored: asked again
    if start and not rows:
        raise SystemExit(f"--out {out_jsonl}: holds no JSONL rows of the teacher; pass another --out")
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not all(k in row for k in TEACHER_FIELDS):
            raise SystemExit(f"--out {out_jsonl}: row {number} is not the teacher's (it needs "
                             f"{', '.join(TEACHER_FIELDS)}); pass another --out")
        if row["teacher"] != made_by:
            other = row["teacher"] if isinstance(row["teacher"], dict) else {}
            raise SystemExit(f"--out {out_jsonl}: made with --model {other.get('model')!r} --kind "
                             f"{other.get('kind')!r}, not --model {model!r} --kind {kind!r}; pass another --out, "
                             f"or the same settings to continue it")
    return rows


def teacher_out(out_jsonl, kind, model):
    """teacher_rows(), and out_jsonl opened for appending once (a missing folder or a read-only file is
    said before the first request)."""
    rows = teacher_rows(out_jsonl, kind, model)
    try:
        open(out_jsonl, "a").close()
    except OSError as e:
        raise OSError(e.errno, e.strerror, out_jsonl) from None
    return rows


def generate_with_teacher(annotations, kind, out_jsonl, base_url, model, api_key, limit=None, seed=0, **kwargs):
    """Ask the teacher about every image; append each result to out_jsonl as it arrives, with the
    settings that made it (the teacher model and the kind). A rerun with the same settings skips the
    ids already in out_jsonl; a malformed reply is logged and skipped. Returns (new samples, skipped)."""
    import random
    rng = random.Random(seed)
    done = {row["id"] for row in teacher_out(out_jsonl, kind, model)}
    new = skipped = 0
    todo = [(str(i), a) for i, a in sorted(annotations.items())][:limit]
    for image_id, (file_name, captions, boxes) in todo:
        sample_id = f"{image_id}_{kind}"
        if sample_id in done:
            continue
        reply = chat_api.chat_completion(teacher_messages(captions, boxes, kind), base_url, model, api_key, **kwargs)
        try:
            conversations = parse_teacher_reply(reply, kind, rng)
        except ValueError as e:
            print(f"skipped {sample_id}: malformed teacher reply ({e})", file=sys.stderr)
            skipped += 1
            continue
        disk.append_jsonl(out_jsonl, {"id": sample_id, "image": file_name, "conversations": conversations,
                                       "teacher": {"model": model, "kind": kind}})  # a full disk names the file
        new += 1
    return new, skipped


# ----------------------------------------------------------------------------------------------
# §5.2: ScienceQA's release (problems.json, pid_splits.json, images/) as LLaVA's JSON
# ----------------------------------------------------------------------------------------------

SQA_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}  # Table 7
SQA_TEXTS = ["question", "hint", "lecture", "solution"]  # the fields that must be strings ("" allowed)


def scienceqa_problems(root, split):
    """{pid: problem} of one split of ScienceQA's release, in pid_splits.json's order."""
    problems = disk.load_json_object(os.path.join(root, "problems.json"))
    splits = disk.load_json_object(os.path.join(root, "pid_splits.json"))
    if split not in splits:
        raise SystemExit(f"{os.path.join(root, 'pid_splits.json')}: no split {split!r}; choose one of {sorted(splits)}")
    return {pid: problems.get(pid) for pid in splits[split]}


def scienceqa_sample(pid, p, root, split, answer_first=False):
    """§5.2: one problem as a single-turn sample. X_instruct is the context (the hint), the question
    and the lettered options in the authors' words, after the image if there is one. X_a reasons
    (lecture, solution), then answers "The answer is X."; answer_first is the paper's ablation
    (89.77% against 90.92%): the answer, then the reasoning. Raises SampleError."""
    where = f"problem {pid} ({os.path.join(root, 'problems.json')})"
    if not isinstance(p, dict):
        raise SampleError(f"{where}: not an object (is the pid in problems.json?)")
    missing = [f for f in SQA_TEXTS + ["choices", "answer", "image", "subject", "grade"] if f not in p]
    if missing:
        raise SampleError(f"{where}: missing {', '.join(missing)}")
    choices, answer = p["choices"], p["answer"]
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise SampleError(f"{where}: needs a list of 2 to {len(LETTERS)} choices")
    not_text = [f for f in SQA_TEXTS if not isinstance(p[f], str)]
    if not_text or not all(isinstance(c, str) for c in choices):
        raise SampleError(f"{where}: {', '.join(not_text or ['choices'])} must be text")
    if type(answer) is not int or not 0 <= answer < len(choices):
        raise SampleError(f"{where}: answer {answer!r} is not the index of one of its {len(choices)} choices")
    if p["subject"] not in SQA_SUBJECTS or p["grade"] not in [f"grade{g}" for g in range(1, 13)]:
        raise SampleError(f"{where}: unknown subject {p['subject']!r} or grade {p['grade']!r}")
    options = " ".join(f"({letter}) {choice}" for letter, choice in zip(LETTERS, choices))
    question = f"Context: {p['hint'].strip() or 'N/A'}\nQuestion: {p['question']}\nOptions: {options}"
    reasoning = " ".join(t.strip() for t in (p["lecture"], p["solution"]) if t.strip())
    answer = f"The answer is {LETTERS[answer]}."
    sample = {"id": pid}
    if p["image"]:
        if not isinstance(p["image"], str):
            raise SampleError(f"{where}: image must be a file name, not {p['image']!r}")
        sample["image"] = f"{split}/{pid}/{p['image']}"  # relative to ROOT/images
        if outside(sample["image"]):
            raise SampleError(f"{where}: its image {sample['image']!r} lies outside {os.path.join(root, 'images')}")
        if not os.path.isfile(os.path.join(root, "images", sample["image"])):
            raise SampleError(f"{where}: its image {os.path.join(root, 'images', sample['image'])} is missing")
        question = f"{IMAGE}\n{question}"
    if reasoning:  # the authors' answer-first format puts "BECAUSE:" before the reasoning
        answer = f"{answer} BECAUSE: {reasoning}" if answer_first else f"{reasoning} {answer}"
    sample["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return sample


def scienceqa(problems, root, split, answer_first=False):
    """The problems of a split that convert; a malformed one is named on stderr and skipped."""
    samples = []
    for pid, problem in problems.items():
        try:
            samples.append(scienceqa_sample(pid, problem, root, split, answer_first))
        except SampleError as e:
            print(f"skipped: {e}", file=sys.stderr)
    return samples


# ----------------------------------------------------------------------------------------------
# Datasets: LLaVA's public JSON files as they are (chat.json, llava_instruct_150k.json, ...)
# ----------------------------------------------------------------------------------------------

def outside(name):
    """Whether an image path from the data would be read from outside the folder it is relative to."""
    return os.path.isabs(name) or ".." in name.replace("\\", "/").split("/")


def load_image(path, pad_to_square=False, background=(0, 0, 0)):
    """Any image file as 8-bit RGB, upright as its EXIF orientation says (a phone's portrait photo):
    RGBA and palettes over white, grayscale, CMYK, 16-bit, 32-bit float (0 to 1 is black to white).
    pad_to_square: LLaVA-1.5's padding of the short side with `background` (the image mean).
    A FIFO or a device (/dev/zero) is refused: reading it would never end."""
    from PIL import Image, ImageOps
    import numpy as np
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is not a regular file (a FIFO, a device?)")
    with Image.open(path) as image:
        image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or 32-bit grayscale
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if image.mode == "F" and pixels.max() <= 1.0:  # float pixels from 0 (black) to 1 (white)
            top = 1.0
        else:
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

    def __init__(self, json_path, image_folder, model, max_length=2048, pad_to_square=False, strict=False,
                 samples=None):
        self.path, self.image_folder, self.max_length = json_path, image_folder, max_length
        self.samples = disk.load_json(json_path) if samples is None else samples  # samples: the file, read already
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
        sample = self.samples[index]
        sample_id = f"{sample.get('id', index)!s} ({self.path}[{index}])" if isinstance(sample, dict) else index
        if not isinstance(sample, dict) or "conversations" not in sample:
            raise SampleError(f"sample {sample_id}: no 'conversations'")
        pixel_values = None
        if sample.get("image") is not None:
            if not isinstance(sample["image"], str):  # e.g. several images: the model takes one
                raise SampleError(f"sample {sample_id}: 'image' must be one file name, not {sample['image']!r}")
            if outside(sample["image"]):
                raise SampleError(f"sample {sample_id}: image {sample['image']!r} lies outside --image-folder "
                                  f"(an absolute path, or '..'); name it relative to the folder")
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


def check_images(samples, image_folder, json_path, first=20):
    """Stop early if none of the first samples' images is in image_folder: the wrong folder would
    otherwise skip every image sample and train on the text-only ones alone."""
    named = (s["image"] for s in samples if isinstance(s, dict) and isinstance(s.get("image"), str))
    names = list(itertools.islice(named, first))
    if names and not any(os.path.isfile(os.path.join(image_folder, n)) for n in names):
        raise SystemExit(f"--image-folder {image_folder}: none of the first {len(names)} images of {json_path} is "
                         f"there (e.g. {os.path.join(image_folder, names[0])}); pass the folder they are relative to")


def collate(samples, pad_id):
    """Pad a list of samples on the right into one batch; None (skipped) samples are counted.
    A micro-batch whose samples were all skipped becomes one padding token with nothing to train:
    under torchrun every rank must still run its forward and backward, in step with the others."""
    kept = [s for s in samples if s is not None] or [
        {"input_ids": torch.tensor([pad_id]), "labels": torch.tensor([IGNORE]), "pixel_values": None}]
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
            "skipped": sum(s is None for s in samples)}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("show", help="print one tokenized sample with its trained tokens marked")
    p.add_argument("file", help="a LLaVA JSON file (a list of samples)")
    p.add_argument("--index", type=int, default=0, help="which sample")
    p.add_argument("--model", default="out/toy/stage2/model", help="a model directory (for its tokenizer)")
    p.add_argument("--template", choices=list(TEMPLATES), help="paper or llava15 (default: the model's)")
    p = sub.add_parser("teacher", help="GPT-assisted generation from COCO annotations with a chat-completions API")
    p.add_argument("--captions", required=True, help="COCO captions_*.json")
    p.add_argument("--instances", required=True, help="COCO instances_*.json")
    p.add_argument("--kind", required=True, choices=["conversation", "detail", "reasoning"])
    p.add_argument("--out", required=True, help="JSONL file, appended to; a rerun with the same --model and "
                   "--kind skips the ids in it")
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))
    p.add_argument("--model", default=os.environ.get("OPENAI_MODEL", "gpt-4"), help="the teacher model")
    p.add_argument("--limit", type=cli.number(int, 1), default=None, help="at most this many images")
    p = sub.add_parser("scienceqa", help="§5.2: one split of ScienceQA's release as LLaVA JSON")
    p.add_argument("--root", required=True, help="the folder of problems.json, pid_splits.json and images/")
    p.add_argument("--split", default="train", help="train, val, test, minival or minitest")
    p.add_argument("--out", required=True, help="the LLaVA JSON file to write (images relative to ROOT/images)")
    p.add_argument("--answer-first", action="store_true", help="the ablation: the answer, then the reasoning")
    args = parser.parse_args(argv)

    if args.command == "scienceqa":
        samples = scienceqa(scienceqa_problems(args.root, args.split), args.root, args.split, args.answer_first)
        disk.write_json(args.out, samples)
        print(f"{args.out}: {len(samples)} samples, {sum('image' in s for s in samples)} with an image "
              f"(--image-folder {os.path.join(args.root, 'images')})")
    elif args.command == "teacher":
        key = os.environ.get("OPENAI_API_KEY")  # from the environment only: never a flag, never printed
        annotations = coco_annotations(args.captions, args.instances)
        teacher_rows(args.out, args.kind, args.model)  # not the teacher's file: refused before a lock file is made
        if os.path.isdir(os.path.dirname(os.path.abspath(args.out))):  # else the next step names the missing folder
            # two teachers on one --out would mix their rows
            disk.hold_lock_file(args.out + ".lock", "data.py teacher", args.out, "file")
        try:
            new, skipped = generate_with_teacher(annotations, args.kind, args.out, args.base_url, args.model, key,
                                                 limit=args.limit)
        except RuntimeError as e:  # the endpoint gave up: every sample so far is saved
            sys.exit(f"the teacher failed ({e}); {len(disk.read_jsonl(args.out))} samples are saved in {args.out}: "
                     f"run the same command again to continue")
        print(f"{args.out}: {new} new samples, {skipped} malformed replies skipped")
    elif args.command == "show":
        samples = disk.load_json(args.file)
        if not 0 <= args.index < len(samples):
            sys.exit(f"{args.file}: --index {args.index} is out of range (0..{len(samples) - 1})")
        sample = samples[args.index]
        if not isinstance(sample, dict) or "conversations" not in sample:
            raise SampleError(f"sample {args.index} of {args.file}: no 'conversations'")
        try:
            tokenizer, config = formats.load_tokenizer_and_config(args.model)
        except (OSError, ValueError) as e:  # missing, not a model, asks to run its own code
            sys.exit(f"cannot load --model {args.model}: {cli.one_line(e)}")
        add_image_token(tokenizer)  # the authors' tokenizer has none
        has_image = "image" in sample
        ids, labels = render(sample["conversations"], tokenizer, args.template or config["template"],
                             image_token_id=config["image_token_id"] if has_image else None,
                             num_image_tokens=config["num_image_tokens"],
                             sample_id=f"{sample.get('id', args.index)} ({args.file}[{args.index}])")
        print(show(ids, labels, tokenizer, config["image_token_id"]))


if __name__ == "__main__":
    cli.cli(main, "data.py")
