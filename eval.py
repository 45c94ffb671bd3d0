"""§5 of "Visual Instruction Tuning": measuring the model.

Multiple choice in ScienceQA form (§5.2): the model answers "The answer is X."; accuracy per
category and overall, next to a blind baseline (the same questions, a blank image) and chance.

    python eval.py mc --model out/toy/stage2/model --questions out/toy/data/eval.json \\
        --image-folder out/toy/data/images

LLaVA-Bench (§5.1): a text-only judge LLM scores a reference answer and the model's answer from 1
to 10, seeing the question and the image's captions; relative score = mean(model) / mean(reference)
x 100, per category and overall. Answers and reviews are appended as they come: a rerun resumes.

    python eval.py bench --model DIR --questions questions.jsonl --context context.jsonl \\
        --references answers_gpt4.jsonl --image-folder images/ --out out/bench \\
        --judge-url https://HOST/v1 --judge-model gpt-4    # the key from OPENAI_API_KEY
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
    """The letter in "The answer is X." (the paper's pattern; the letter, maybe in parentheses, ends
    the sentence), or a reply that is the letter alone. None if there is no such letter among the
    first n_options, or if the text states two ("The answer is A or B.", "The answer is A. No, the
    answer is B."): only a definite single letter is a choice."""
    letters = data.LETTERS[:n_options]
    stated = set(re.findall(r"answer is \(?([A-Z])\)?(?=[.!]?$|[.!]\s)", text.strip()))
    if stated:
        return stated.pop() if len(stated) == 1 and stated <= set(letters) else None
    match = re.fullmatch(rf"\s*\(?([{letters}])\)?[.)]?\s*", text)
    return match.group(1) if match else None


def n_options(question):
    return len(re.findall(r"\([A-E]\) ", question))


@torch.no_grad()
def evaluate_mc(model, questions, image_folder, blank=False, max_new_tokens=48, progress=False, batch_size=32):
    """Accuracy by category on LLaVA-JSON multiple-choice questions (each with "answer" and
    "category"), answered greedily `batch_size` at a time. blank: show a blank image of the image
    processor's mean color instead (the blind baseline)."""
    from PIL import Image
    from tqdm import tqdm
    model.eval()
    mean = tuple(int(255 * m) for m in getattr(model.image_processor, "image_mean", [0.5] * 3))
    correct, total, chance, rows = defaultdict(int), defaultdict(int), defaultdict(float), []
    with tqdm(total=len(questions), desc="blind" if blank else "eval", disable=not progress, leave=False) as bar:
        for start in range(0, len(questions), batch_size):
            batch = questions[start:start + batch_size]
            images = []
            for q in batch:
                image = data.load_image(os.path.join(image_folder, q["image"])) if q.get("image") else None
                images.append(Image.new("RGB", image.size, mean) if blank and image is not None else image)
            texts = model.answer_batch([q["conversations"][:1] for q in batch], images, max_new_tokens)
            for q, text in zip(batch, texts):
                k = n_options(q["conversations"][0]["value"])
                predicted = extract_answer(text, k)
                category = q.get("category", "all")
                for c in (category, "overall"):
                    total[c] += 1
                    correct[c] += predicted == q["answer"]
                    chance[c] += 1 / max(k, 1)
                rows.append({"id": q.get("id"), "category": category, "answer": q["answer"], "predicted": predicted,
                             "output": text})
            bar.update(len(batch))
    return {c: {"accuracy": correct[c] / total[c], "n": total[c], "chance": chance[c] / total[c]}
            for c in total}, rows


def table(results, blind=None, categories=()):
    """The results as a terminal table: accuracy, blind baseline and chance per category (%), the
    categories in the order given, then any others."""
    lines = [f"{'category':<11}{'n':>5}{'accuracy':>10}" + (f"{'blind':>8}" if blind else "") + f"{'chance':>8}"]
    order = [c for c in categories if c in results] + sorted(set(results) - set(categories) - {"overall"})
    for c in order + ["overall"]:
        r = results[c]
        line = f"{c:<11}{r['n']:>5}{100 * r['accuracy']:>9.1f}%"
        if blind:
            line += f"{100 * blind[c]['accuracy']:>7.1f}%"
        lines.append(line + f"{100 * r['chance']:>7.1f}%")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# §5.1: LLaVA-Bench, the relative score from a judge LLM
# ----------------------------------------------------------------------------------------------

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with a few sentences describing the image. Please rate the helpfulness, "
    "relevance, accuracy, level of details of their responses. Each assistant receives an overall score on a "
    "scale of 1 to 10, where a higher score indicates better overall performance. Please first output a single "
    "line containing only two values indicating the scores for Assistant 1 and 2, respectively. The two scores "
    "are separated by a space. In the subsequent line, please provide a comprehensive explanation of your "
    "evaluation, avoiding any potential bias and ensuring that the order in which the responses were presented "
    "does not affect your judgment.")


def judge_messages(context, question, reference, answer):
    """The reference answer is Assistant 1, the model's Assistant 2 (the paper's order)."""
    content = (f"[Context]\n{context}\n\n[Question]\n{question}\n\n[Assistant 1]\n{reference}\n\n"
               f"[End of Assistant 1]\n\n[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n[System]\n{JUDGE_RULE}\n\n")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


def parse_scores(review):
    """(reference score, model score) from the review's first line; None if it has no two numbers."""
    numbers = re.findall(r"\d+(?:\.\d+)?", review.strip().splitlines()[0] if review.strip() else "")
    return (float(numbers[0]), float(numbers[1])) if len(numbers) == 2 else None


def append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def evaluate_bench(model, questions, contexts, references, image_folder, out, judge_url, judge_model,
                   api_key, **client_options):
    """questions: [{question_id, image, text, category}], contexts: {image: captions text},
    references: {question_id: reference answer}. Returns {category: relative score etc.}."""
    os.makedirs(out, exist_ok=True)
    answers_path, reviews_path = os.path.join(out, "answers.jsonl"), os.path.join(out, "reviews.jsonl")
    answers = {r["question_id"]: r["text"] for r in data.read_jsonl(answers_path)}
    for q in questions:  # 1. the model's answers, saved one by one
        if q["question_id"] not in answers:
            image = data.load_image(os.path.join(image_folder, q["image"]))
            text = model.answer([{"from": "human", "value": f"{data.IMAGE}\n{q['text']}"}], image, temperature=0)
            answers[q["question_id"]] = text
            append_jsonl(answers_path, {"question_id": q["question_id"], "text": text})
    reviews = {r["question_id"]: r for r in data.read_jsonl(reviews_path)}
    for q in questions:  # 2. the judge's reviews, saved one by one
        if q["question_id"] in reviews:
            continue
        messages = judge_messages(contexts[q["image"]], q["text"], references[q["question_id"]],
                                  answers[q["question_id"]])
        review = data.chat_completion(messages, judge_url, judge_model, api_key, **client_options)
        scores = parse_scores(review)
        if scores is None:
            print(f"question {q['question_id']}: the judge gave no two scores; asked again on the next run",
                  file=sys.stderr)
            continue
        reviews[q["question_id"]] = {"question_id": q["question_id"], "category": q.get("category", "all"),
                                     "scores": scores, "review": review}
        append_jsonl(reviews_path, reviews[q["question_id"]])
    totals = defaultdict(lambda: [0.0, 0.0, 0])  # 3. relative score = mean(model) / mean(reference) x 100
    for r in reviews.values():
        for c in (r["category"], "overall"):
            totals[c][0] += r["scores"][0]
            totals[c][1] += r["scores"][1]
            totals[c][2] += 1
    return {c: {"relative": 100 * m / ref if ref else 0.0, "reference": ref / n, "model": m / n, "n": n}
            for c, (ref, m, n) in totals.items()}


def bench_table(results):
    lines = [f"{'category':<14}{'n':>4}{'reference':>11}{'model':>8}{'relative':>10}"]
    for c in sorted(set(results) - {"overall"}) + ["overall"]:
        r = results[c]
        lines.append(f"{c:<14}{r['n']:>4}{r['reference']:>11.2f}{r['model']:>8.2f}{r['relative']:>9.1f}%")
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
    bench = sub.add_parser("bench", help="LLaVA-Bench relative score with a judge LLM")
    bench.add_argument("--model", default="out/toy/stage2/model")
    bench.add_argument("--questions", required=True, help="JSONL: question_id, image, text, category")
    bench.add_argument("--context", required=True, help="JSONL: image, caption (what the judge sees)")
    bench.add_argument("--references", required=True, help="JSONL: question_id, text (reference answers)")
    bench.add_argument("--image-folder", required=True)
    bench.add_argument("--out", default="out/bench", help="answers.jsonl, reviews.jsonl, results.json")
    bench.add_argument("--judge-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))
    bench.add_argument("--judge-model", default="gpt-4")
    args = p.parse_args(argv)

    if args.command == "bench":
        contexts = {r["image"]: r.get("caption", r.get("text", "")) for r in data.read_jsonl(args.context)}
        references = {r["question_id"]: r["text"] for r in data.read_jsonl(args.references)}
        questions = data.read_jsonl(args.questions)
        for q in questions:
            if q["question_id"] not in references or q["image"] not in contexts:
                sys.exit(f"{args.questions}: question {q['question_id']} has no reference answer or context")
        results = evaluate_bench(llava.load(args.model), questions, contexts, references, args.image_folder,
                                 args.out, args.judge_url, args.judge_model, os.environ.get("OPENAI_API_KEY"))
        print(bench_table(results))
        data.write_json(os.path.join(args.out, "results.json"), results)
        return

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
