"""data.py's command line: the arguments of its three commands, and the sample and model `show` reads,
checked."""
import argparse
import os
import sys

import cli
import disk
import formats
import scienceqa
from cli import SampleError


def parse_args(argv, description, templates):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    command = sub.add_parser("show", help="print one tokenized sample with its trained tokens marked")
    command.add_argument("file", help="a LLaVA JSON file (a list of samples)")
    command.add_argument("--index", type=int, default=0, help="which sample")
    command.add_argument("--model", default="out/toy/stage2/model", help="a model directory (for its tokenizer)")
    command.add_argument("--template", choices=templates, help="paper, llava15 or plain (default: the model's)")
    command = sub.add_parser("teacher", help="GPT-assisted generation from COCO annotations with a chat-completions API")
    command.add_argument("--captions", required=True, help="COCO captions_*.json")
    command.add_argument("--instances", required=True, help="COCO instances_*.json")
    command.add_argument("--kind", required=True, choices=["conversation", "detail", "reasoning"])
    command.add_argument("--out", required=True, help="JSONL file, appended to; a rerun with the same --model and "
                         "--kind skips the ids in it")
    command.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))
    command.add_argument("--model", default=os.environ.get("OPENAI_MODEL", "gpt-4"), help="the teacher model")
    command.add_argument("--limit", type=cli.number(int, 1), default=None, help="at most this many images")
    command = sub.add_parser("scienceqa", help="§5.2: one split of ScienceQA's release as LLaVA JSON")
    command.add_argument("--root", required=True, help="the folder of problems.json, pid_splits.json and images/")
    command.add_argument("--split", default="train", help="train, val, test, minival or minitest")
    command.add_argument("--out", required=True, help="the LLaVA JSON file to write (images relative to ROOT/images)")
    command.add_argument("--format", default=scienceqa.PAPER_FORMAT, choices=scienceqa.FORMATS, metavar="FORMAT",
                         help="the authors' prompt format: QCM-LEA (the paper's, the default), QCM-ALE (its "
                         "answer-first ablation), CQM-A (LLaVA-1.5's), any of their INPUT-OUTPUT pairs")
    return parser.parse_args(argv)


def show_inputs(args):
    """The sample `show` prints, and the model's tokenizer and config (template, image token id, N_v)."""
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
    return sample, tokenizer, config
