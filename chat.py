"""§5.1 Multimodal chatbot of "Visual Instruction Tuning": talk with a trained LLaVA about an image.

    python chat.py image.jpg [--model DIR]         # default: the last training run (or the toy demo's)
    python chat.py image.jpg --model DIR -p "What is in the image?" --temperature 0   # one answer, for scripts

In the REPL (its turns named as the template names them): /image PATH loads another image and starts
over, /reset starts over, /quit or Ctrl-D leaves; Ctrl-C stops an answer being written.
"""
import argparse
import os
import signal
import sys

import torch

import cli
import data
import llava
from image_files import open_image

DEFAULT_MODELS = ["out/stage2/model", "out/toy/stage2/model"]  # the last training run, the toy demo
COMMANDS = "/image PATH: another image   /reset: start over   /quit: leave   /help: this"


def why_refused(question, template=None):
    """Why a question cannot be asked as it is, or None. With the template: a question holding its turn
    separator or <STOP> ("###" in the paper's, "</s>" in llava15's) would write turns of its own."""
    if "\ufffd" in question or any("\ud800" <= c <= "\udfff" for c in question):  # bytes that are not UTF-8
        return "that line is not UTF-8 text; type it again"
    if data.IMAGE in question:
        return f"{data.IMAGE} is where the image goes, not a word to ask with; show one with /image PATH"
    if not question.strip():
        return "the question is empty"
    ends = [mark for mark in (template.sep, template.stop) if mark.strip()] if template else []
    # Where turns are parted by a space alone, a role name ("ASSISTANT:") starts one.
    starts = [f"{template.human}:", f"{template.assistant}:"] if template and not template.sep.strip() else []
    for mark in [m for m in ends + starts if m in question]:
        return (f"{mark} {'ends' if mark in ends else 'starts'} a turn in the {template.name} template, so it "
                f"cannot be part of a question; leave it out")


def too_long(model, question, image):
    """Why a question cannot be asked even alone (with the image), or None: it fills the context."""
    value = f"{data.IMAGE}\n{question}" if image is not None else question
    n, limit = model.prepare([{"from": "human", "value": value}], image)[0].shape[1], model.context_size
    if n >= limit:
        return f"that question is {n} tokens with the prompt around it, and the context holds {limit}; ask a shorter one"


def fit_context(model, conversation, image, max_new_tokens):
    """Drop the oldest exchanges until the prompt and the answer fit; the image stays with the first
    question left. Returns the number of exchanges dropped."""
    before = len(conversation)
    while len(conversation) > 2 and model.prepare(conversation, image)[0].shape[1] + max_new_tokens > model.context_size:
        del conversation[:2]
        if image is not None:
            conversation[0] = {"from": "human", "value": f"{data.IMAGE}\n{conversation[0]['value']}"}
    return (before - len(conversation)) // 2


def reply(model, conversation, image, sampling):
    """Generate the answer to the last question, printing it as it comes; returns its text."""
    pieces = []
    try:
        for piece in model.generate_text(conversation, image, **sampling):
            pieces.append(piece if pieces else piece.lstrip())  # the answer starts after "Assistant: "
            print(pieces[-1], end="", flush=True)
    except KeyboardInterrupt:  # Ctrl-C: stop this answer, keep the chat
        print(" [stopped]", end="")
    print()
    return "".join(pieces).strip()


def repl(model, image, sampling):
    template, conversation = model.template, []
    print(f"LLaVA ({template.name} template: {model.template_why}). {COMMANDS}")
    while True:
        try:
            line = input(f"{template.human}: ").strip()  # bytes that are not UTF-8 read as U+FFFD (see main)
        except EOFError:  # Ctrl-D
            return print()
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as in a shell
            print()
            continue
        command, _, argument = line.partition(" ")
        if not line:
            continue
        if why := why_refused(line, None if line.startswith("/") else template):
            print(f"({why})")
        elif command in ("/quit", "/exit"):
            return
        elif command == "/reset":
            conversation = []
            print("(conversation reset)")
        elif command == "/image":
            new_image, error = open_image(argument.strip())
            if not error:
                image, conversation = new_image, []
            print(error or f"(image {argument.strip()} loaded; conversation reset)")
        elif line.startswith("/"):
            print(COMMANDS if command == "/help" else f"unknown command {command}; {COMMANDS}")
        elif why := too_long(model, line, image):
            print(f"({why})")
        else:
            first = not conversation and image is not None  # the image goes with the first question
            conversation.append({"from": "human", "value": f"{data.IMAGE}\n{line}" if first else line})
            if dropped := fit_context(model, conversation, image, sampling["max_new_tokens"]):
                print(f"(the conversation outgrew the context: {dropped} oldest exchanges dropped)")
            print(f"{template.assistant}: ", end="", flush=True)
            conversation.append({"from": "gpt", "value": reply(model, conversation, image, sampling) or "..."})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", nargs="?", help="the image to talk about (optional)")
    p.add_argument("--model", default=None, help="model directory or hub id (ours, llava-hf's or the authors')")
    p.add_argument("--template", choices=sorted(data.TEMPLATES), help="the prompt's (default: the model's; see README)")
    p.add_argument("-p", "--prompt", default=None, help="one question: print the answer and exit")
    p.add_argument("--temperature", type=cli.number(float, 0), default=0.2, help="0 is greedy")
    p.add_argument("--top-p", type=cli.number(float, 0, 1, above=True), default=1.0, help="nucleus sampling")
    p.add_argument("--max-new-tokens", type=cli.number(int, 1), default=512, help="the longest answer")
    p.add_argument("--device", choices=["cuda", "cpu"], help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoding step (a one-time cost)")
    args = p.parse_args(argv)
    if args.prompt is not None and why_refused(args.prompt):
        sys.exit(f"chat.py: -p: {why_refused(args.prompt)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("chat.py: --device cuda: PyTorch sees no CUDA GPU here; pass --device cpu")
    path = args.model or next((m for m in DEFAULT_MODELS if os.path.isdir(m)), None)
    if path is None:
        sys.exit("chat.py: no trained model found in out/; pass --model DIR or run python toy.py")
    try:
        model = llava.load(path, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                           template=args.template)
    except (OSError, ValueError) as e:
        sys.exit(f"chat.py: cannot load --model {path}: {cli.one_line(e)}")
    model.compile_decoding = args.compile
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    image, error = open_image(args.image) if args.image else (None, None)
    if error and args.prompt is not None:
        sys.exit(f"chat.py: {error}")
    if error:
        print(error)
    if args.prompt is not None:  # one-shot: the answer alone on stdout (which template, and why, on stderr)
        print(f"chat.py: the {model.template.name} template ({model.template_why})", file=sys.stderr)
        if why := why_refused(args.prompt, model.template) or too_long(model, args.prompt, image):
            sys.exit(f"chat.py: -p: {why}")
        value = f"{data.IMAGE}\n{args.prompt}" if image is not None else args.prompt
        return print(model.answer([{"from": "human", "value": value}], image, **sampling))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C reaches us even if started with it ignored
    sys.stdin.reconfigure(errors="replace")  # a line that is not UTF-8 is refused, not fatal
    if sys.stdin.isatty():
        import readline  # noqa: F401  (input() gets line editing and history, as in any REPL)
    repl(model, image, sampling)


if __name__ == "__main__":
    cli.cli(main, "chat.py")
