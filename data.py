"""§3 and Table 2 of "Visual Instruction Tuning": the data the model learns from.

Table 2, the training sequence, is built here as token ids and labels together (the text tokenized
at once, the answers found by their characters):

    X_system-message <STOP>
    Human: X_instruct^1 <STOP> Assistant: X_a^1 <STOP>
    Human: X_instruct^2 <STOP> Assistant: X_a^2 <STOP> ...

Only the answers X_a and their <STOP> are trained (Eq. 3); every other label is -100. Then the datasets
over LLaVA's JSON files and §3's GPT-assisted generation (§5.2's ScienceQA as LLaVA JSON: scienceqa.py).

    python data.py show FILE.json --index 0 --model DIR   # print a sample, trained tokens marked
"""
import itertools
import os
import random
import sys
from dataclasses import dataclass

import torch

import chat_api
import cli
import data_cli
import disk
import formats
import teacher_files
from cli import SampleError
from image_files import load_image
import scienceqa
from sample_checks import check_conversation, check_image_name, checked_sample, scienceqa_problems

IGNORE = -100  # label of a position that is not trained (PyTorch's cross_entropy ignore_index)
IMAGE = formats.IMAGE  # where the image stands in the first human turn of LLaVA's JSON


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
    # The paper's template, as the authors prompt at inference (their `conv_llava_v0`): <STOP> is "###".
    "paper": Template(
        name="paper", system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        human="Human", assistant="Assistant", sep="###", stop="###", image_first=False),
    # LLaVA-1.5 (the authors' `conv_vicuna_v1`, and llava-hf checkpoints): <STOP> is the EOS "</s>".
    "llava15": Template(
        name="llava15", system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        human="USER", assistant="ASSISTANT", sep=" ", stop="</s>", image_first=True),
    # LLaVA-1.5's stage 1 (the authors' `conv_llava_plain`, preprocess_plain): <image>, the caption, "\n"; no roles.
    "plain": Template(name="plain", system="", human="", assistant="", sep="", stop="\n", image_first=True),
}


def get_template(name):
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


# ----------------------------------------------------------------------------------------------
# Table 2 as tokens: input_ids and labels built together, and shown
# ----------------------------------------------------------------------------------------------

def conversation_text(conversations, template, image=False):
    """Table 2 as one string, and the (start, end) character spans of what is trained: each answer X_a with
    the space before it and its <STOP>. A template with image_first puts the image first in the first turn
    (LLaVA-1.5: the authors' preprocess_multimodal, llava-hf's prompts); the paper's keeps it where the data
    put it. A conversation ending in a human turn ends with "Assistant:", the chat prompt. The plain template:
    the answer and "\n" alone (render puts the image before them)."""
    if not template.human:
        text = "".join(turn["value"] + template.stop for turn in conversations[1:2])
        return text, [(0, len(text))]
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


def render(conversations, tokenizer, template, image_token_id=None, num_image_tokens=0,
           for_generation=False, max_length=None, sample_id="?"):
    """Turn LLaVA's `conversations` list into (input_ids, labels), the Table 2 sequence, two lists of ints.

    conversations: [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", ...}, ...]
    The whole text is tokenized at once, as a llava-hf processor does at inference and as the authors
    trained (a piece tokenized alone can differ: SentencePiece starts every piece with "▁"). The tokenizer
    adds BOS if it is set up to. A token is trained if its characters overlap an answer or its <STOP>;
    every other label is IGNORE. The <image> in the first human turn becomes `num_image_tokens` positions
    holding `image_token_id`; llava.py puts the visual tokens H_v there. for_generation: the conversation
    ends with a human turn; the ids end with "Assistant:" and are, token for token, a prefix of the
    training ids of the same conversation with its answer."""
    template = get_template(str(template))
    check_conversation(conversations, sample_id, image_token_id is not None, IMAGE, for_generation, template.stop)
    if not template.human and (image_token_id is None or len(conversations) != 2 - for_generation):
        raise SampleError(f"sample {sample_id}: the plain template trains an image and its caption: one turn "
                          f"with <image>, one answer (use --template paper or llava15 for conversations)")
    if not template.human and for_generation and conversations[0]["value"].replace(IMAGE, "").strip():
        raise SampleError(f"sample {sample_id}: the plain template (LLaVA-1.5's stage 1) reads no question, only "
                          f"the image; ask a model trained with the paper or llava15 template")
    text, trained = conversation_text(conversations, template, image=image_token_id is not None)
    placeholder = tokenizer.convert_tokens_to_ids(IMAGE)
    encoded = tokenizer(text, return_offsets_mapping=True)
    pieces = list(zip(encoded["input_ids"], encoded["offset_mapping"]))
    if not template.human:  # plain: the image after BOS, the caption tokenized alone (their tokenizer_image_token)
        pieces.insert(int(pieces[:1] == [(tokenizer.bos_token_id, (0, 0))]), (placeholder, (0, 0)))
    # <image> must be one token of its own, or the image's positions would silently be missing
    assert image_token_id is None or [token for token, _ in pieces].count(placeholder) == 1, \
        "the tokenizer has no <image> token: call formats.add_image_token(tokenizer) where it is loaded"
    input_ids, labels = [], []
    for position, (token, (start, end)) in enumerate(pieces):
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
        raise SampleError(f"sample {sample_id}: no answer token left to train (max_length {max_length})")
    return input_ids, labels


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
# The datasets: LLaVA's public JSON files as they are (chat.json, llava_instruct_150k.json, ...)
# ----------------------------------------------------------------------------------------------

class LazyDataset:
    """A LLaVA JSON file read once; each sample is rendered and its image read only when asked for.
    A bad sample (missing or corrupt image, broken turns, <image> without an image, ...) gives None and
    a one-line message naming the sample and file; with strict=True the first one is fatal."""

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
        sample, sample_id = checked_sample(self.samples, index, self.path)
        pixel_values = None
        if sample.get("image") is not None:
            check_image_name(sample["image"], sample_id)
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
    """Pad a list of samples on the right into one batch; None (skipped) samples are counted. A batch whose
    samples were all skipped becomes one padding token with nothing to train: under torchrun every rank
    must still run its forward and backward, in step with the others."""
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
            "target_positions": target_positions(labels), "skipped": sum(s is None for s in samples)}


def target_positions(labels):
    """Where Eq. 3 trains, (N,): the positions t whose next token t + 1 is labelled, counted row by row
    through the batch (B * T). Computed with the batch, so that the model's shapes never depend on a
    tensor's values (train.py --plan runs the step on tensors that have none)."""
    has_target = torch.zeros_like(labels, dtype=torch.bool)  # (B, T)
    has_target[:, :-1] = labels[:, 1:] != IGNORE
    return has_target.flatten().nonzero()[:, 0]


def micro_batches(n_samples, global_batch, batch_size, world_size, rank, start_step, total_steps, seed,
                  lengths=None):
    """Index lists for this rank's micro-batches, from start_step on (train.py's data order). Step s of
    epoch e takes global batch s of a permutation seeded by (seed, e). Each global batch is cut into
    micro-batches of batch_size; rank r takes every world_size-th one. The gradient summed over all
    micro-batches of all ranks is the same for any world size.
    lengths: sort each global batch by length before cutting it (LLaVA-1.5's length grouping, inside
    one optimizer step so that the step's samples stay the same): less padding.
    """
    steps_per_epoch = n_samples // global_batch
    accumulation = global_batch // (batch_size * world_size)
    assert accumulation * batch_size * world_size == global_batch, "read_samples checks --global-batch"
    batches, permutation, epoch = [], None, None
    for step in range(start_step, total_steps):
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            permutation = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        step_samples = permutation[(step % steps_per_epoch) * global_batch:][:global_batch].tolist()
        if lengths is not None:
            step_samples.sort(key=lambda i: lengths[i])
        for j in range(accumulation):
            i = j * world_size + rank  # this rank's j-th micro-batch is the step's i-th
            batches.append(step_samples[i * batch_size:(i + 1) * batch_size])
    return batches


# ----------------------------------------------------------------------------------------------
# §3: GPT-assisted visual instruction data generation
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

# The teacher sees only text: the captions and the boxes of one image (the query), after a system
# message and a few hand-written seed examples, as in-context pairs of (context, response).

TEACHER_SYSTEM = {
    "conversation": "You are an AI visual assistant, and you are seeing a single image. What you see is provided "
    "with five sentences describing the image and the objects in it with their bounding boxes (category: [x1, y1, "
    "x2, y2], coordinates normalized from 0 to 1). Design a conversation between you and a person asking about "
    "this photo, answering as if you see the image. Ask diverse questions about the object types, counting the "
    "objects, object actions, object locations and relative positions between objects. Only include questions that "
    "have definite answers. Write each question after 'Question:' and each answer after 'Answer:', and separate "
    "the turns with a line '==='.",
    "detail": "You are an AI visual assistant that can analyze a single image. You receive five sentences "
    "describing the same image and the objects in it with their bounding boxes (category: [x1, y1, x2, y2], "
    "normalized from 0 to 1). Describe the image in detail, as if you see it: the objects, their counts, colors, "
    "positions and relations. Do not mention the sentences or the coordinates.",
    "reasoning": "You are an AI visual assistant that can analyze a single image. You receive five sentences "
    "describing the same image and the objects in it with their bounding boxes (category: [x1, y1, x2, y2], "
    "normalized from 0 to 1). Create one plausible question about the image that needs reasoning or background "
    "knowledge to answer, and answer it in detail, step by step, as if you see the image. Write the question after "
    "'Question:' and the answer after 'Answer:'.",
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
    """Ask the teacher about every image; append each result to out_jsonl as it arrives, with the settings
    that made it (the teacher model and the kind). A rerun with the same settings skips the ids already in
    out_jsonl; a malformed reply is logged and skipped. Returns (new samples, skipped)."""
    rng = random.Random(seed)
    done = {row["id"] for row in teacher_files.open_out(out_jsonl, kind, model)}
    new = skipped = 0
    for image_id, (file_name, captions, boxes) in [(str(i), a) for i, a in sorted(annotations.items())][:limit]:
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


def main(argv=None):
    args = data_cli.parse_args(argv, __doc__, list(TEMPLATES))
    if args.command == "scienceqa":
        samples = scienceqa.convert(scienceqa_problems(args.root, args.split), args.root, args.split, args.format)
        disk.write_json(args.out, samples)
        print(f"{args.out}: {len(samples)} samples ({args.format}), {sum('image' in s for s in samples)} with an "
              f"image (--image-folder {os.path.join(args.root, 'images', args.split)})")
    elif args.command == "teacher":
        key = os.environ.get("OPENAI_API_KEY")  # from the environment only: never a flag, never printed
        annotations = teacher_files.coco_annotations(args.captions, args.instances)
        teacher_files.claim_out(args.out, args.kind, args.model)
        try:
            new, skipped = generate_with_teacher(annotations, args.kind, args.out, args.base_url, args.model, key,
                                                 limit=args.limit)
        except RuntimeError as e:  # the endpoint gave up: every sample so far is saved
            sys.exit(f"the teacher failed ({e}); {len(disk.read_jsonl(args.out))} samples are saved in {args.out}: "
                     f"run the same command again to continue")
        print(f"{args.out}: {new} new samples, {skipped} malformed replies skipped")
    elif args.command == "show":
        sample, tokenizer, config = data_cli.show_inputs(args)
        ids, labels = render(sample["conversations"], tokenizer, args.template or config["template"],
                             config["image_token_id"] if "image" in sample else None, config["num_image_tokens"],
                             sample_id=f"{sample.get('id', args.index)} ({args.file}[{args.index}])")
        print(show(ids, labels, tokenizer, config["image_token_id"]))


if __name__ == "__main__":
    cli.cli(main, "data.py")
