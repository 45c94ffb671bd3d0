"""§5.1 Multimodal chatbot of "Visual Instruction Tuning": talk with a trained LLaVA about an image.

    python chat.py image.jpg                       # the last training run (or the toy demo's model)
    python chat.py image.jpg --model llava-hf/llava-1.5-7b-hf
    python chat.py image.jpg --model DIR -p "What is in the image?" --temperature 0   # one answer, for scripts

In the REPL: /image PATH loads another image (and starts over), /reset starts over, /quit or
Ctrl-D leaves; Ctrl-C stops an answer being written.
"""
import argparse
import os
import signal
import sys

import torch

import cli
import data
import llava

DEFAULT_MODELS = ["out/stage2/model", "out/toy/stage2/model"]  # the last training run, the toy demo
COMMANDS = "/image PATH: another image   /reset: start over   /quit: leave   /help: this"


def open_image(path):
    """(PIL image, None) or (None, a one-line reason)."""
    try:
        return data.load_image(path), None
    except Exception as e:  # missing, unreadable, not an image, a decompression bomb
        return None, f"cannot use image {path}: {type(e).__name__}: {e}"


def context_size(model):
    return getattr(model.language_model.config, "max_position_embeddings", None) or 4096


def too_long(model, question, image):
    """Why a question cannot be asked even alone (with the image), or None: it fills the context."""
    value = f"{data.IMAGE}\n{question}" if image is not None else question
    n, limit = model.prepare([{"from": "human", "value": value}], image)[0].shape[1], context_size(model)
    if n >= limit:
        return (f"that question is {n} tokens with the prompt around it, and the context holds {limit}; "
                f"ask a shorter one")


def fit_context(model, conversation, image, max_new_tokens):
    """Drop the oldest question-answer pairs until the prompt and the answer fit the context.
    The image stays with the (new) first question. Returns the number of pairs dropped."""
    limit = context_size(model)
    dropped = 0
    while True:
        input_ids, _ = model.prepare(conversation, image)
        if input_ids.shape[1] + max_new_tokens <= limit or len(conversation) < 3:
            return dropped
        first_question = conversation[2]["value"]
        del conversation[:2]
        if image is not None:
            conversation[0] = {"from": "human", "value": f"{data.IMAGE}\n{first_question}"}
        dropped += 1


def problem(question, template=None):
    """Why a question cannot be asked as it is, or None. With the template: a question holding its
    turn separator or <STOP> ("###" in the paper's, "</s>" in llava15's), or where turns are parted
    by a space, a role name ("ASSISTANT:"), would write turns of its own into the prompt."""
    if "\ufffd" in question or any("\ud800" <= c <= "\udfff" for c in question):  # bytes that are not UTF-8
        return "that line is not UTF-8 text; type it again"
    if data.IMAGE in question:
        return f"{data.IMAGE} is where the image goes, not a word to ask with; show one with /image PATH"
    if not question.strip():
        return "the question is empty"
    for mark in (template.sep, template.stop) if template else ():
        if mark.strip() and mark in question:
            return (f"{mark} ends a turn in the {template.name} template, so it cannot be part of a question; "
                    f"leave it out")
    if template and not template.sep.strip():  # turns are parted by a space alone: a role name starts one
        for mark in (f"{template.human}:", f"{template.assistant}:"):
            if mark in question:
                return (f"{mark} starts a turn in the {template.name} template, so it cannot be part of a "
                        f"question; leave it out")


def reply(model, conversation, image, args):
    """Generate the answer to the last question, printing it as it comes; returns its text."""
    pieces = []
    try:
        for piece in model.generate_text(conversation, image, max_new_tokens=args.max_new_tokens,
                                         temperature=args.temperature, top_p=args.top_p):
            piece = piece if pieces else piece.lstrip()  # the answer starts after "ASSISTANT: "
            pieces.append(piece)
            print(piece, end="", flush=True)
    except KeyboardInterrupt:  # Ctrl-C: stop this answer, keep the chat
        print(" [stopped]", end="")
    print()
    return "".join(pieces).strip()


def repl(model, image, args):
    conversation = []
    print(f"LLaVA ({model.template.name} template). {COMMANDS}")
    while True:
        try:
            line = input("USER: ").strip()  # bytes that are not UTF-8 read as U+FFFD (see main)
        except EOFError:  # Ctrl-D
            print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as in a shell
            print()
            continue
        if not line:
            continue
        if why := problem(line, None if line.startswith("/") else model.template):
            print(f"({why})")
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command in ("/quit", "/exit"):
                return
            if command == "/reset":
                conversation = []
                print("(conversation reset)")
            elif command == "/image":
                new_image, error = open_image(argument.strip())
                if error:
                    print(error)
                else:
                    image, conversation = new_image, []
                    print(f"(image {argument.strip()} loaded; conversation reset)")
            elif command == "/help":
                print(COMMANDS)
            else:
                print(f"unknown command {command}; {COMMANDS}")
            continue
        if why := too_long(model, line, image):
            print(f"({why})")
            continue
        first = not conversation
        conversation.append({"from": "human", "value": f"{data.IMAGE}\n{line}" if first and image is not None else line})
        dropped = fit_context(model, conversation, image, args.max_new_tokens)
        if dropped:
            print(f"(the conversation outgrew the context: {dropped} oldest exchanges dropped)")
        print("ASSISTANT: ", end="", flush=True)
        answer = reply(model, conversation, image, args)
        conversation.append({"from": "gpt", "value": answer or "..."})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", nargs="?", help="the image to talk about (optional)")
    p.add_argument("--model", default=None, help="model directory or hub id (ours or llava-hf)")
    p.add_argument("-p", "--prompt", default=None, help="one question: print the answer and exit")
    p.add_argument("--temperature", type=cli.number(float, 0), default=0.2, help="0 is greedy")
    p.add_argument("--top-p", type=cli.number(float, 0, 1, above=True), default=1.0,
                   help="nucleus sampling: keep this much probability")
    p.add_argument("--max-new-tokens", type=cli.number(int, 1), default=512, help="the longest answer")
    p.add_argument("--device", choices=["cuda", "cpu"], help="cuda or cpu (default: cuda when there is one)")
    args = p.parse_args(argv)
    if args.prompt is not None and problem(args.prompt):
        sys.exit(f"chat.py: -p: {problem(args.prompt)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("chat.py: --device cuda: PyTorch sees no CUDA GPU here; pass --device cpu")

    path = args.model or next((m for m in DEFAULT_MODELS if os.path.isdir(m)), None)
    if path is None:
        sys.exit("chat.py: no trained model found in out/; pass --model DIR or run python toy.py")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model = llava.load(path, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device).eval()
    except (OSError, ValueError) as e:
        sys.exit(f"chat.py: cannot load --model {path}: {cli.one_line(e)}")
    image = None
    if args.image:
        image, error = open_image(args.image)
        if error and args.prompt is not None:
            sys.exit(f"chat.py: {error}")
        if error:
            print(error)

    if args.prompt is not None:  # one-shot: the answer alone on stdout
        if why := problem(args.prompt, model.template) or too_long(model, args.prompt, image):
            sys.exit(f"chat.py: -p: {why}")
        value = f"{data.IMAGE}\n{args.prompt}" if image is not None else args.prompt
        print(model.answer([{"from": "human", "value": value}], image, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p))
        return
    # Ctrl-C must reach the REPL even when a parent started us with SIGINT ignored (a background job
    # of a non-interactive shell): Python raises KeyboardInterrupt only under its own handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdin.reconfigure(errors="replace")  # a line that is not UTF-8 is refused, not fatal
    if sys.stdin.isatty():
        import readline  # noqa: F401  (input() gets line editing and history, as in any REPL)
    repl(model, image, args)


if __name__ == "__main__":
    cli.cli(main, "chat.py")
