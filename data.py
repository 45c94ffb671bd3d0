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
    args = parser.parse_args(argv)

    if args.command == "show":
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


def load_json(path):
    try:
        with open(path) as f:
            samples = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: cannot read LLaVA JSON: {e}")
    if not isinstance(samples, list):
        raise SystemExit(f"{path}: expected a JSON list of samples")
    return samples


if __name__ == "__main__":
    main()
