"""§5 of "Visual Instruction Tuning": measuring the model.

Multiple choice in ScienceQA form (§5.2): the model answers "The answer is X."; accuracy per
category and overall, next to a blind baseline (the same questions, a blank image) and chance.

    python eval.py mc --model out/toy/stage2/model --questions out/toy/data/eval.json \\
        --image-folder out/toy/data/images
"""
import argparse
import json
import os
import re
import sys
from collections import defaultdict

import torch

import data
import llava


def extract_answer(text, n_options=5):
    """The letter in "The answer is X." (the paper's pattern); a lone letter also counts. None if
    there is no such letter among the first n_options."""
    letters = data.LETTERS[:n_options]
    match = re.search(rf"answer is \(?([{letters}])\)?(?![A-Za-z])", text)
    if match is None:
        match = re.fullmatch(rf"\s*\(?([{letters}])\)?[.)]?\s*", text)
    return match.group(1) if match else None


def n_options(question):
    return len(re.findall(r"\([A-E]\) ", question))


@torch.no_grad()
def evaluate_mc(model, questions, image_folder, blank=False, max_new_tokens=12, progress=False):
    """Accuracy by category on LLaVA-JSON multiple-choice questions (each with "answer" and
    "category"). blank: show a blank image of the image processor's mean color instead (blind)."""
    from PIL import Image
    from tqdm import tqdm
    model.eval()
    mean = tuple(int(255 * m) for m in getattr(model.image_processor, "image_mean", [0.5] * 3))
    correct, total, chance, rows = defaultdict(int), defaultdict(int), defaultdict(float), []
    for q in tqdm(questions, desc="blind" if blank else "eval", disable=not progress, leave=False):
        image = None
        if q.get("image"):
            image = data.load_image(os.path.join(image_folder, q["image"]))
            if blank:
                image = Image.new("RGB", image.size, mean)
        prompt = q["conversations"][:1]
        text = model.answer(prompt, image, max_new_tokens=max_new_tokens, temperature=0)
        k = n_options(prompt[0]["value"])
        predicted = extract_answer(text, k)
        category = q.get("category", "all")
        for c in (category, "overall"):
            total[c] += 1
            correct[c] += predicted == q["answer"]
            chance[c] += 1 / max(k, 1)
        rows.append({"id": q.get("id"), "category": category, "answer": q["answer"], "predicted": predicted,
                     "output": text})
    return {c: {"accuracy": correct[c] / total[c], "n": total[c], "chance": chance[c] / total[c]}
            for c in total}, rows


def table(results, blind=None):
    """The results as a terminal table: accuracy, blind baseline and chance per category (%)."""
    lines = [f"{'category':<11}{'n':>5}{'accuracy':>10}" + (f"{'blind':>8}" if blind else "") + f"{'chance':>8}"]
    order = [c for c in data.CATEGORIES if c in results] + sorted(set(results) - set(data.CATEGORIES) - {"overall"})
    for c in order + ["overall"]:
        r = results[c]
        line = f"{c:<11}{r['n']:>5}{100 * r['accuracy']:>9.1f}%"
        if blind:
            line += f"{100 * blind[c]['accuracy']:>7.1f}%"
        lines.append(line + f"{100 * r['chance']:>7.1f}%")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    mc = sub.add_parser("mc", help="multiple-choice accuracy (ScienceQA form) with a blind baseline")
    mc.add_argument("--model", default="out/toy/stage2/model", help="model directory or hub id")
    mc.add_argument("--questions", default="out/toy/data/eval.json", help="LLaVA JSON with answer and category")
    mc.add_argument("--image-folder", default="out/toy/data/images")
    mc.add_argument("--no-blind", action="store_true", help="skip the blind baseline")
    mc.add_argument("--out", default=None, help="write results and per-question outputs to this JSON file")
    args = p.parse_args(argv)

    questions = data.load_json(args.questions)
    for i, q in enumerate(questions):
        if "answer" not in q or "conversations" not in q:
            sys.exit(f"{args.questions}: question {q.get('id', i)} has no 'answer' or 'conversations'")
    model = llava.load(args.model)
    results, rows = evaluate_mc(model, questions, args.image_folder, progress=True)
    blind = None if args.no_blind else evaluate_mc(model, questions, args.image_folder, blank=True, progress=True)[0]
    print(table(results, blind))
    if args.out:
        data.write_json(args.out, {"results": results, "blind": blind, "outputs": rows})


if __name__ == "__main__":
    main()
