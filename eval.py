"""§5 of "Visual Instruction Tuning": measuring the model.

Multiple choice in ScienceQA form (§5.2): the model answers "The answer is X."; accuracy per
category and overall, next to a blind baseline (the same questions, a blank image) and chance.

    python eval.py mc --model out/toy/stage2/model --questions out/toy/data/eval.json \\
        --image-folder out/toy/data/images

LLaVA-Bench (§5.1): a text-only judge LLM scores a reference answer and the model's answer from 1
to 10, seeing the question and the image's captions (COCO: and its boxes), in the authors' request;
relative score = mean(model) / mean(reference) x 100, per category and overall, as the authors'
summarize_gpt_review.py rounds it. Answers and reviews are appended as they come: a rerun resumes, and
makes again the rows whose question, image, caption or reference changed since (it says which).

    python eval.py bench --model DIR --questions questions.jsonl --context context.jsonl \\
        --references answers_gpt4.jsonl --image-folder images/ --out out/bench \\
        --judge-url https://HOST/v1 --judge-model gpt-4    # the key from OPENAI_API_KEY
    python eval.py bench --dataset coco --questions qa90_questions.jsonl \\
        --context caps_boxes_coco2014_val_80.jsonl --references qa90_gpt4_answer.jsonl ...

ScienceQA (§5.2, Table 7): accuracy by subject, context and grade, LLaVA alone and, with a judge
model, in the paper's two ensembles with a text-only GPT-4 (complement and judge), the problems in the
authors' prompt format and the answers scored as their scripts score them (scienceqa.py; --format,
--scoring), the ensembles also by the project's rules. Resumable, as bench is.

One evaluation writes an --out at a time (OUT/.lock; for mc's --out FILE, FILE.lock beside it), taken, with
--out checked writable, before the model loads.

    python eval.py scienceqa --model DIR --root ScienceQA/data/scienceqa --split test --out out/sqa \\
        [--judge-url https://HOST/v1 --judge-model gpt-4]
"""
import argparse
import hashlib
import json
import os
import re
import sys
from collections import defaultdict

import torch

import chat_api
import cli
import data
import disk
import formats
import llava
import sample_checks
import scienceqa


def extract_answer(text, n_options=5):
    """The project's strict reading (eval.py scienceqa --scoring strict; the authors' reading is
    scienceqa.their_letter): the letter in "The answer is X." (the letter, maybe in parentheses, ends
    the sentence), or a reply that is the letter alone. None if there is no such letter among the
    first n_options, or if the text states two ("The answer is A or B.", "The answer is A. No, the
    answer is B."): only a definite single letter is a choice."""
    letters = scienceqa.LETTERS[:n_options]
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
                image = question_image(image_folder, q["image"], q.get("id")) if q.get("image") else None
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

# The judge's request is the authors' (haotian-liu/LLaVA at c121f04), byte for byte: the system line and the
# user turn of their llava/eval/eval_gpt_review_bench.py (LLaVA-Bench In-the-Wild) and eval_gpt_review_visual.py
# (LLaVA-Bench COCO), the rule of the question's category from their llava/eval/table/rule.json (its text as
# written: its line breaks, and the space before the first), their temperature 0.2 and max_tokens 1024.
JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_SETTINGS = {"temperature": 0.2, "max_tokens": 1024}
_RATE = ("Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
         "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
         "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
         "respectively. The two scores are separated by a space.\n"
         "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any "
         "potential bias and ensuring that the order in which the responses were presented does not affect your "
         "judgment.")
_ASK = ("We would like to request your feedback on the performance of two AI assistants in response to the user "
        "question displayed above. The user asks the question on observing an image. ")
JUDGE_RULES = {  # rule.json's entries that LLaVA-Bench uses, under its keys (one text for the three of a set)
    **{f"llava_bench_{c}": _ASK + "For your reference, the visual content in the image is represented with a few "
       "sentences describing the image. \n" + _RATE for c in ("conv", "detail", "complex")},
    **{c: _ASK + "For your reference, the visual content in the image is represented with five descriptive "
       "sentences describing the same image and the bounding box coordinates of each object in the scene. These "
       "coordinates are in the form of bounding boxes, represented as (x1, y1, x2, y2) with floating numbers "
       "ranging from 0 to 1. These values correspond to the top left x, top left y, bottom right x, and bottom "
       "right y. \n" + _RATE for c in ("conv", "detail", "complex")}}
BENCH_RULE_KEYS = {"in-the-wild": "llava_bench_", "coco": ""}  # the set's rule: its prefix + the question's category
BENCH_CATEGORIES = ("conv", "detail", "complex")


def bench_context(row, dataset):
    """What the judge sees of the image, from a context row, as the authors' scripts write it: In-the-Wild's
    caption (a list: its lines joined by "\n"); COCO's five captions, a blank line, then each box as
    "category: [x1, y1, x2, y2]" (Python's list as their f-string prints it)."""
    if dataset == "coco":
        boxes = "\n".join(f"{box['category']}: {box['bbox']}" for box in row["instances"])
        return "\n".join(row["captions"]) + "\n\n" + boxes
    return "\n".join(row["caption"]) if isinstance(row["caption"], list) else row["caption"]


def judge_messages(context, question, reference, answer, category, dataset="in-the-wild"):
    """The reference answer is Assistant 1, the model's Assistant 2 (the paper's order, the authors' prompt)."""
    rule = JUDGE_RULES[BENCH_RULE_KEYS[dataset] + category]
    content = (f"[Context]\n{context}\n\n[Question]\n{question}\n\n[Assistant 1]\n{reference}\n\n"
               f"[End of Assistant 1]\n\n[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n[System]\n{rule}\n\n")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


def first_line(review):
    return (review or "").strip().split("\n")[0].strip()


def parse_scores(review):
    """(reference score, model score) from the review's first line, each from 1 to 10. Read as the authors'
    parse_score (eval_gpt_review_bench.py) reads it: the line split at "," and at each " ", two fields, each a
    float ("8 6", "7.5 8", "8,6", "8 6."). Where theirs reads no two numbers, the line stripped and split at runs
    of spaces and commas, two decimal numbers ("8, 6", " 9  7 "; theirs: -1 -1). None for anything else, a failed
    review (theirs -1 -1, or a score off the scale, both counted in their means; here asked again): "Assistant 1:
    8", one score, prose, "11 3", "0 5", "nan 5"."""
    fields = (review or "").split("\n")[0].replace(",", " ").split(" ")
    try:
        scores = (float(fields[0]), float(fields[1])) if len(fields) == 2 else None
    except ValueError:
        scores = None
    fields = first_line(review).replace(",", " ").split()
    if scores is None and len(fields) == 2 and all(re.fullmatch(r"\d+(?:\.\d+)?", f) for f in fields):
        scores = float(fields[0]), float(fields[1])
    return scores if scores and all(1 <= score <= 10 for score in scores) else None


def relative_scores(pairs):
    """The relative score as the authors' summarize_gpt_review.py makes it from (reference, model) pairs: each
    mean rounded to 3 decimals, then model / reference x 100 rounded to 1 (their rounding first can move the
    last digit: 17/18 is 94.5 there, 94.4 unrounded)."""
    reference, model = (round(sum(p[i] for p in pairs) / len(pairs), 3) for i in (0, 1))
    return {"relative": round(model / reference * 100, 1), "reference": reference, "model": model, "n": len(pairs)}


append_jsonl = disk.append_jsonl


def evaluate_bench(model, questions, contexts, references, image_folder, out, judge_url, judge_model,
                   api_key, model_id=None, load_model=None, dataset="in-the-wild", batch_size=16, max_new_tokens=1024,
                   **client_options):
    """questions: [{question_id, image, text, category (conv, detail or complex)}], contexts: {image: what
    the judge sees of it, bench_context's text}, references: {question_id: reference answer}; dataset:
    in-the-wild or coco, the judge's rule. Returns {category: relative score etc.} over the questions
    reviewed so far. The answers remember model_id and the reviews the judge too: a rerun
    into the same `out` with another model or judge is refused, never mixed. Each row also remembers
    what it was made from (the question and image; the judge's whole request): a question, image,
    caption or reference changed since is answered or reviewed again, and said. model: the model, or
    None to call load_model() if some question needs an answer; its answers are greedy, `batch_size`
    questions at once, at most max_new_tokens each (the authors' model_vqa.py: 1024)."""
    hold_out(out, "eval.py bench")
    answers_path, reviews_path = os.path.join(out, "answers.jsonl"), os.path.join(out, "reviews.jsonl")
    samples = [{"id": q["question_id"], "image": q["image"],  # the image first, as the authors' model_vqa.py asks
                "conversations": [{"from": "human", "value": f"{data.IMAGE}\n{q['text']}"}]} for q in questions]
    made = {q["question_id"]: inputs(q["text"], os.path.join(image_folder, q["image"])) for q in questions}
    answers = llava_answers(samples, image_folder, answers_path, model_id,  # 1. the model's, a batch at a time
                            load_model if model is None else lambda: model, batch_size, max_new_tokens,
                            key="question_id", what="question", made=made)
    requests = {q["question_id"]: judge_messages(contexts[q["image"]], q["text"], references[q["question_id"]],
                                                 answers[q["question_id"]], q["category"], dataset) for q in questions}
    asked = {k: inputs(m) for k, m in requests.items()}
    reviews = fresh_rows(saved_rows(reviews_path, model=model_id, judge=judge_model), "question_id", asked, "question",
                         "its question, image, caption, reference or answer changed since its review; asked again")
    for q in questions:  # 2. the judge's reviews, saved one by one
        if q["question_id"] in reviews:
            continue
        try:
            review = chat_api.chat_completion(requests[q["question_id"]], judge_url, judge_model, api_key,
                                              **JUDGE_SETTINGS, **client_options) or ""
        except RuntimeError as e:  # the judge gave up or answered nonsense: what came before is saved
            raise SystemExit(f"question {q['question_id']}: the judge failed ({e}); {len(reviews)} reviews are saved "
                             f"in {reviews_path}: run the same command again to continue") from None
        scores = parse_scores(review)
        if scores is None:
            print(f"question {q['question_id']}: the judge gave no two scores from 1 to 10 on its first line "
                  f"({first_line(review)[:80]!r}); asked again on the next run", file=sys.stderr)
            continue
        reviews[q["question_id"]] = {"question_id": q["question_id"], "category": q["category"],
                                     "model": model_id, "judge": judge_model,
                                     "inputs": asked[q["question_id"]], "scores": scores, "review": review}
        append_jsonl(reviews_path, reviews[q["question_id"]])
    scores = defaultdict(list)  # 3. the relative score, per category and overall
    for r in reviews.values():
        scores[r["category"]].append(r["scores"])
        scores["overall"].append(r["scores"])
    return {c: relative_scores(pairs) for c, pairs in scores.items()}


def bench_table(results):
    """Per category, as the authors' summarize_gpt_review.py: the relative score, and each assistant's mean."""
    lines = [f"{'category':<14}{'n':>4}{'relative':>10}{'reference':>11}{'model':>8}"]
    for c in sorted(set(results) - {"overall"}) + ["overall"]:
        r = results[c]
        lines.append(f"{c:<14}{r['n']:>4}{r['relative']:>9.1f}%{r['reference']:>11.3f}{r['model']:>8.3f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# §5.2: ScienceQA (Table 7); LLaVA alone, and with a text-only teacher as complement or judge
# ----------------------------------------------------------------------------------------------

TABLE7, table7_columns, score_table7 = scienceqa.TABLE7, scienceqa.table7_columns, scienceqa.score_table7


def table7(runs):
    """One row per method in Table 7's columns ('-' where no problem falls), then the counts."""
    width = max(len(name) for name in [*runs, "questions"]) + 1

    def row(name, cells):
        return f"{name:<{width}}" + "".join(f"{cell:>7}" for cell in cells)
    lines = [row("method", TABLE7)]
    for name, scores in runs.items():
        lines.append(row(name, [f"{scores[c]['accuracy']:.2f}" if c in scores else "-" for c in TABLE7]))
    counts = next(iter(runs.values()))
    return "\n".join(lines + [row("questions", [counts[c]["n"] if c in counts else "-" for c in TABLE7])])


def saved_rows(path, **made_by):
    """The rows of a JSONL output so far. Rows another model (or teacher) made are refused, so
    that one output folder never mixes two models' answers."""
    rows = disk.read_jsonl(path)
    for row in rows:
        for key, value in made_by.items():
            if row.get(key) != value:
                raise SystemExit(f"{path}: made by {key} {row.get(key)!r}, not {value!r}; "
                                 f"pass another --out, or delete it to start over")
    return rows


def inputs(made_from, *files):
    """A short hash of what a row is made from: `made_from` (texts, a request) as JSON, and the files' bytes."""
    digest = hashlib.sha1(json.dumps(made_from, sort_keys=True).encode())
    for path in files:
        with open(path, "rb") as f:
            digest.update(hashlib.sha1(f.read()).digest())
    return digest.hexdigest()[:16]


def fresh_rows(rows, key, made, what, changed):
    """{key: the last saved row} for the keys in `made` ({key: inputs()}) whose row was made from the same
    inputs. A row made from other inputs (a corrected question, a new image, an older version without
    "inputs") is left out, to be made again, and said: "{what} KEY: {changed}"."""
    last = {row[key]: row for row in rows}
    fresh = {}
    for k, made_from in made.items():
        if k in last and last[k].get("inputs") == made_from:
            fresh[k] = last[k]
        elif k in last:
            print(f"{what} {k}: {changed}", file=sys.stderr)
    return fresh


def model_fingerprint(path):
    """Who answers: the model's directory, and its files' names, sizes and times (a model trained
    again in the same place is another model)."""
    import hashlib
    path = os.path.abspath(formats.resolve(path))
    listing = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in os.scandir(path) if f.is_file())
    return f"{path}@{hashlib.sha1(repr(listing).encode()).hexdigest()[:12]}"


def llava_answers(samples, image_folder, path, model_id, load_model, batch_size=32, max_new_tokens=1024,
                  key="id", what="problem", made=None):
    """LLaVA's greedy answer to each sample's question, appended to `path` a batch at a time (rows named
    by `key`): a rerun answers only what is missing, or what was asked with another question or image
    since (made: {id: a hash of them}, default the question turn's and the image's), and loads the model
    only then. Returns {id: text}."""
    from tqdm import tqdm
    made = made or {s["id"]: inputs(s["conversations"][0]["value"],
                                    *([os.path.join(image_folder, s["image"])] if "image" in s else []))
                    for s in samples}
    answers = fresh_rows(saved_rows(path, model=model_id), key, made, what,
                         "its question or image changed since it was answered; answered again")
    answers = {k: r["text"] for k, r in answers.items()}
    todo = [s for s in samples if s["id"] not in answers]
    model = load_model() if todo else None
    for start in tqdm(range(0, len(todo), batch_size), desc="LLaVA", disable=not todo, leave=False):
        batch = todo[start:start + batch_size]
        images = [question_image(image_folder, s["image"], s["id"], what, path) if "image" in s else None
                  for s in batch]
        for s, text in zip(batch, model.answer_batch([s["conversations"][:1] for s in batch], images, max_new_tokens)):
            answers[s["id"]] = text
            append_jsonl(path, {key: s["id"], "model": model_id, "inputs": made[s["id"]], "text": text})
    return {s["id"]: answers[s["id"]] for s in samples}


SQA_TEACHER = ("You answer multiple-choice questions on science, society and language. You cannot see the "
               "image a question may come with: use the context and what you know. Reason briefly, then end "
               'with "The answer is X.", X being the letter of one option.')


def sqa_teacher_messages(question, replies=()):
    """The text-only teacher's request: the question alone (complement), or the question and two
    answers with their reasoning, to make its own final answer (judge)."""
    content = question
    if replies:
        content += "\n\nTwo assistants answered it; Assistant 1 read the text alone, Assistant 2 also saw the image."
        for i, reply in enumerate(replies, 1):
            content += f"\n\n[Assistant {i}]\n{reply}\n[End of Assistant {i}]"
        content += "\n\nWeigh both answers and their reasoning, then make your own final answer."
    return [{"role": "system", "content": SQA_TEACHER}, {"role": "user", "content": content}]


def sqa_ensembles(samples, problems, answers, path, url, teacher, api_key, model_id, seed=0, **client_options):
    """§5.2's two ensembles of LLaVA and a text-only teacher, {rule: {pid: the option's index, -1 none}}:
    "complement" and "judge" as the authors score them (scienceqa.their_ensembles: their parsing, their
    random guesses, seeded), and the project's rules, "complement, project's rules" (the teacher's letter,
    by extract_answer; where it names no option, LLaVA's) and "judge, project's rules" (where both name an
    option and they differ, the re-asked teacher's final choice; LLaVA's if it names none; the teacher's
    where LLaVA names none). The teacher is asked again where either rule set has them disagree. Each
    request and reply is appended to `path` as it comes; a rerun asks nothing twice, and a reply without
    an option is kept as it is. A saved reply to another request (the question changed since, or LLaVA's
    answer) is asked again, and said."""
    rows = {(r["kind"], r["id"]): r for r in saved_rows(path, model=model_id, teacher=teacher)}

    def ask(kind, pid, messages):
        if (kind, pid) in rows and rows[kind, pid]["messages"] != messages:
            print(f"problem {pid}: its question or the answers it weighs changed since the teacher's {kind} reply; "
                  f"asked again", file=sys.stderr)
            del rows[kind, pid]
        if (kind, pid) not in rows:
            try:
                reply = chat_api.chat_completion(messages, url, teacher, api_key, **client_options) or ""  # null: none
            except RuntimeError as e:  # the endpoint gave up: what came before is saved
                raise SystemExit(f"problem {pid}: the teacher failed ({e}); {len(rows)} replies are saved in "
                                 f"{path}: run the same command again to continue")
            rows[kind, pid] = {"id": pid, "kind": kind, "model": model_id, "teacher": teacher, "messages": messages,
                               "reply": reply, "letter": extract_answer(reply, len(problems[pid]["choices"]))}
            append_jsonl(path, rows[kind, pid])
            if rows[kind, pid]["letter"] is None:
                print(f"problem {pid}: the teacher's {kind} reply names no option; LLaVA's answer stands (the "
                      f"authors' rules guess where it names a letter that is no option)", file=sys.stderr)
        return rows[kind, pid]

    replies, requery, complement, judge = {}, {}, {}, {}
    for s in samples:
        pid, question = s["id"], s["conversations"][0]["value"].replace(data.IMAGE, "").strip()
        ours = extract_answer(answers[pid], len(problems[pid]["choices"]))
        theirs = ask("complement", pid, sqa_teacher_messages(question))
        replies[pid] = theirs["reply"]
        complement[pid] = judge[pid] = theirs["letter"] or ours
        letters = scienceqa.their_letter(answers[pid]), scienceqa.their_letter(theirs["reply"])
        differ = theirs["letter"] and ours and theirs["letter"] != ours
        if differ or None not in letters and letters[0] != letters[1]:
            final = ask("judge", pid, sqa_teacher_messages(question, [theirs["reply"], answers[pid]]))
            judge[pid] = final["letter"] or ours if differ else judge[pid]
            if None not in letters and letters[0] != letters[1]:
                requery[pid] = final["reply"]
    authors = scienceqa.their_ensembles(problems, answers, replies, requery, seed)
    index = {pid: -1 if letter is None else scienceqa.LETTERS.index(letter) for pid, letter in complement.items()}
    return {"complement": authors[0], "judge": authors[1], "complement, project's rules": index,
            "judge, project's rules": {pid: -1 if x is None else scienceqa.LETTERS.index(x) for pid, x in judge.items()}}


def evaluate_scienceqa(root, split, out, model_id, load_model, teacher=None, url=None, api_key=None,
                       batch_size=32, max_new_tokens=1024, format=scienceqa.PAPER_FORMAT, scoring="paper", seed=0,
                       **client_options):
    """§5.2 end to end on one split: {method: Table 7 scores}, also written to out/results.json. The problems
    as the authors convert them (format), asked as their model_vqa_science.py asks them (scienceqa.asked),
    LLaVA's answers scored by `scoring` (scienceqa.SCORINGS; "paper" draws its guesses from seed), the
    ensembles by the authors' rules and by the project's. out/answers.jsonl holds LLaVA's answers,
    out/teacher.jsonl the teacher's requests and replies."""
    if scoring not in scienceqa.SCORINGS:
        raise ValueError(f"scoring {scoring!r}: choose one of {list(scienceqa.SCORINGS)}")
    problems = sample_checks.scienceqa_problems(root, split)
    samples = scienceqa.convert(problems, root, split, format)  # the training prompts; bad problems named
    if not samples:
        raise SystemExit(f"{os.path.join(root, 'pid_splits.json')}: split {split!r} has no problems" if not problems
                         else f"{os.path.join(root, 'problems.json')}: none of the {len(problems)} problems of split "
                              f"{split!r} can be asked (each is named above); nothing to score")
    problems = {s["id"]: problems[s["id"]] for s in samples}
    samples = [dict(s, conversations=[{"from": "human", "value": scienceqa.asked(s)}]) for s in samples]
    hold_out(out, "eval.py scienceqa")  # before the model loads
    answers = llava_answers(samples, os.path.join(root, "images", split), os.path.join(out, "answers.jsonl"),
                            model_id, load_model, batch_size, max_new_tokens)
    if scoring == "strict":
        letters = {pid: extract_answer(answers[pid], len(p["choices"])) for pid, p in problems.items()}
        chosen = {pid: -1 if x is None else scienceqa.LETTERS.index(x) for pid, x in letters.items()}
    else:
        chosen = scienceqa.their_scores(problems, answers, scoring, seed)
    runs = {"LLaVA": score_table7(problems, chosen)}
    if teacher:
        ensembles = sqa_ensembles(samples, problems, answers, os.path.join(out, "teacher.jsonl"), url, teacher,
                                  api_key, model_id, seed, **client_options)
        runs.update({f"LLaVA+{teacher} ({rule})": score_table7(problems, c) for rule, c in ensembles.items()})
    disk.write_json(os.path.join(out, "results.json"), {"model": model_id, "split": split, "format": format,
                                                        "scoring": scoring, "seed": seed, "results": runs})
    return runs


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
    bench.add_argument("--context", required=True, help="JSONL, what the judge sees of each image: image, caption "
                       "(text or a list; In-the-Wild's context.jsonl), or with --dataset coco image, captions, "
                       "instances (category, bbox; the authors' caps_boxes_coco2014_val_80.jsonl)")
    bench.add_argument("--dataset", choices=list(BENCH_RULE_KEYS), default="in-the-wild",
                       help="LLaVA-Bench In-the-Wild or COCO: its context and its judge's rule (the authors' rule.json "
                            "entries llava_bench_conv/detail/complex, or conv/detail/complex)")
    bench.add_argument("--references", required=True, help="JSONL: question_id, text (reference answers)")
    bench.add_argument("--image-folder", required=True)
    bench.add_argument("--out", default="out/bench", help="answers.jsonl, reviews.jsonl, results.json")
    bench.add_argument("--judge-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))
    bench.add_argument("--judge-model", default="gpt-4", help="the authors' scripts ask gpt-4-0314")
    bench.add_argument("--timeout", type=cli.number(float, 0, above=True), default=60,
                       help="seconds per try, the whole reply however slowly it comes")
    bench.add_argument("--retries", type=cli.number(int, 0), default=5, help="tries after the first, then stop")
    bench.add_argument("--batch-size", type=cli.number(int, 1), default=16, help="questions answered at once")
    bench.add_argument("--max-new-tokens", type=cli.number(int, 1), default=1024, help="as the authors' model_vqa.py")
    sqa = sub.add_parser("scienceqa", help="§5.2: ScienceQA in Table 7's columns, alone and with a teacher")
    sqa.add_argument("--model", required=True, help="model directory or hub id")
    sqa.add_argument("--root", required=True, help="the folder of problems.json, pid_splits.json and images/")
    sqa.add_argument("--split", default="test")
    sqa.add_argument("--out", default="out/sqa", help="answers.jsonl, teacher.jsonl, results.json; a rerun resumes")
    sqa.add_argument("--batch-size", type=cli.number(int, 1), default=32, help="questions answered at once")
    sqa.add_argument("--max-new-tokens", type=cli.number(int, 1), default=1024,
                     help="the reasoning comes before the answer")
    sqa.add_argument("--judge-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))
    sqa.add_argument("--judge-model", default=None, help="the text-only teacher (e.g. gpt-4); none: LLaVA alone")
    sqa.add_argument("--format", default=scienceqa.PAPER_FORMAT, choices=scienceqa.FORMATS, metavar="FORMAT",
                     help="the prompt format the model was trained on (the authors' names; QCM-LEA: the paper's)")
    sqa.add_argument("--scoring", default="paper", choices=list(scienceqa.SCORINGS),
                     help="; ".join(f"{k}: {v}" for k, v in scienceqa.SCORINGS.items()))
    sqa.add_argument("--seed", type=int, default=0, help="the authors' random guesses (--scoring paper, ensembles)")
    for command in (mc, bench, sqa):
        command.add_argument("--compile", action="store_true",
                             help="torch.compile the decoding step (a one-time cost, then faster answers)")
        command.add_argument("--template", choices=sorted(data.TEMPLATES),
                             help="the prompt's template (default: the model's, and it says why)")
    args = p.parse_args(argv)

    try:
        model_id = model_fingerprint(args.model)  # who answers: every output remembers it, and the template
        model_id += f" --template {args.template}" if args.template else ""  # that asks it
    except FileNotFoundError as e:
        sys.exit(f"eval.py {args.command}: --model {e}")
    if args.command == "scienceqa":
        runs = evaluate_scienceqa(args.root, args.split, args.out, model_id,
                                  lambda: model_or_exit(args.model, args.compile, args.template),
                                  args.judge_model, args.judge_url, os.environ.get("OPENAI_API_KEY"),
                                  args.batch_size, args.max_new_tokens, args.format, args.scoring, args.seed,
                                  temperature=0)
        print(table7(runs))
        print(f"(accuracy %; prompts {args.format}; LLaVA scored by --scoring {args.scoring}, the ensembles by the "
              f"authors' rules and by the project's; answers and results in {args.out})")
        return
    if args.command == "bench":  # every input, and --out, is checked before the model loads
        contexts = read_contexts(args.context, args.dataset)
        references = {r["question_id"]: r["text"] for r in read_rows(args.references, "question_id", "text")}
        questions = read_rows(args.questions, "question_id", "image", "text", "category")
        for q in questions:
            if q["question_id"] not in references or q["image"] not in contexts:
                sys.exit(f"{args.questions}: question {q['question_id']} has no reference answer or context")
            if q["category"] not in BENCH_CATEGORIES:
                sys.exit(f"{args.questions}: question {q['question_id']}: category {q['category']!r} has no judge's "
                         f"rule; LLaVA-Bench's are {', '.join(BENCH_CATEGORIES)}")
            check_image(args.questions, q["question_id"], args.image_folder, q["image"])
        hold_out(args.out, "eval.py bench")
        saved_rows(os.path.join(args.out, "reviews.jsonl"), model=model_id, judge=args.judge_model)  # or refused now
        results = evaluate_bench(None, questions, contexts, references, args.image_folder, args.out,
                                 args.judge_url, args.judge_model, os.environ.get("OPENAI_API_KEY"), model_id,
                                 load_model=lambda: model_or_exit(args.model, args.compile, args.template),
                                 dataset=args.dataset, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                 timeout=args.timeout, retries=args.retries)
        if results:
            print(bench_table(results))
        missing = len(questions) - results.get("overall", {}).get("n", 0)
        if missing:  # the judge gave no two scores for some: results.json waits for all of them
            sys.exit(f"{missing} of {len(questions)} questions have no review yet (see above); run the same "
                     f"command again to ask the judge again")
        disk.write_json(os.path.join(args.out, "results.json"), dict(results, model=model_id, judge=args.judge_model))
        return

    questions = disk.load_json(args.questions)
    if not questions:
        sys.exit(f"{args.questions}: no questions")
    for i, q in enumerate(questions):  # every question is checked before the model loads
        turn = q.get("conversations", [None])[0] if isinstance(q, dict) else None
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            sys.exit(f"{args.questions}: question {i} has no 'conversations' with a question first")
        if n_options(turn["value"]) < 2 or q.get("answer") not in scienceqa.LETTERS[:n_options(turn["value"])]:
            sys.exit(f"{args.questions}: question {q.get('id', i)} needs 2 or more options '(A) ...' and an "
                     f"'answer' letter among them")
        try:  # half of an emoji pair (a lone surrogate, cut by a scraper) cannot be tokenized
            turn["value"].encode("utf-8")
        except UnicodeEncodeError:
            sys.exit(f"{args.questions}: question {q.get('id', i)} is not valid Unicode text; fix or remove it")
        if q.get("image"):
            check_image(args.questions, q.get("id", i), args.image_folder, q["image"])
    if args.out and os.path.isdir(args.out):
        sys.exit(f"--out {args.out} is a folder; pass the JSON file to write")
    if args.out:  # one evaluation writes it at a time, and it can be written: known before the model loads
        hold_out(args.out, "eval.py mc", folder=False)
    if args.out and os.path.exists(args.out):  # only the same model's results are replaced
        made_by = disk.load_json_object(args.out)
        made_by = made_by.get("model") if isinstance(made_by, dict) else None
        if made_by != model_id:
            sys.exit(f"--out {args.out}: made by model {made_by!r}, not {model_id!r}; pass another --out, "
                     f"or delete it to start over")
    model = model_or_exit(args.model, args.compile, args.template)
    results, rows = evaluate_mc(model, questions, args.image_folder, progress=True)
    blind = None if args.no_blind else evaluate_mc(model, questions, args.image_folder, blank=True, progress=True)[0]
    print(table(results, blind))
    if args.out:
        disk.write_json(args.out, {"model": model_id, "results": results, "blind": blind, "outputs": rows})


def read_rows(path, *keys):
    """An input JSONL file: each line an object with `keys`, text (a question_id may be a number); a
    line that is not is named. The first key names the row: two rows with the same are refused."""
    rows, seen = disk.read_jsonl(path, required=True), {}
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not all(k in row for k in keys):
            sys.exit(f"{path}: row {i} needs {', '.join(keys)}")
        for k in keys:
            if not (isinstance(row[k], str) or k == "question_id" and type(row[k]) is int):
                sys.exit(f"{path}: row {i}: {k} must be {'a number or ' * (k == 'question_id')}text, not {row[k]!r}")
        if row[keys[0]] in seen:
            sys.exit(f"{path}: rows {seen[row[keys[0]]]} and {i} have the same {keys[0]} {row[keys[0]]!r}; "
                     f"each needs its own")
        seen[row[keys[0]]] = i
    if not rows:
        sys.exit(f"{path}: empty")
    return rows


def read_contexts(path, dataset):
    """{image: bench_context's text} from a --context file of `dataset`'s form; a row that is not is named."""
    need = {"in-the-wild": "caption (a text, or a list of texts)",
            "coco": "captions (a list of texts) and instances (a list of {category, bbox})"}
    texts = lambda value: isinstance(value, list) and all(isinstance(t, str) for t in value)  # noqa: E731
    rows = read_rows(path, "image")
    for i, row in enumerate(rows, 1):
        if dataset == "coco":
            boxes = row.get("instances")
            ok = texts(row.get("captions")) and isinstance(boxes, list) and all(
                isinstance(b, dict) and isinstance(b.get("category"), str) and isinstance(b.get("bbox"), list)
                for b in boxes)
        else:
            ok = isinstance(row.get("caption"), str) or texts(row.get("caption"))
        if not ok:
            other = "in-the-wild" if dataset == "coco" else "coco"
            sys.exit(f"{path}: row {i} needs {need[dataset]} for --dataset {dataset}; {other}'s needs {need[other]}")
    return {row["image"]: bench_context(row, dataset) for row in rows}


def check_image(path, question, folder, image):
    if not os.path.isfile(os.path.join(folder, image)):
        sys.exit(f"{path}: question {question}: image {os.path.join(folder, image)} not found; check --image-folder")


def question_image(folder, image, question, what="question", saved=None):
    """A question's image, or one line naming the file and the question (truncated, not an image)."""
    path = os.path.join(folder, image)
    try:
        return data.load_image(path)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        kept = f"; the answers so far are kept in {saved}, and the same command goes on from them" \
            if saved and os.path.exists(saved) else ""
        raise SystemExit(f"{what} {question}: cannot read its image {path} ({cli.one_line(e)}): replace the "
                         f"file or remove the {what}{kept}") from None


def hold_out(out, program, folder=True):
    """One evaluation writes `out` (a folder; folder=False: a file, locked by OUT.lock beside it) at a
    time, for the life of the process; an --out that cannot be written is said now, not at the end."""
    try:
        if folder:
            os.makedirs(out, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        disk.hold_lock_file(os.path.join(out, ".lock") if folder else out + ".lock", program, f"--out {out}", "--out")
    except OSError as e:
        raise SystemExit(f"{program}: --out {out}: cannot write there ({cli.one_line(e)}); pass another --out") \
            from None


def model_or_exit(path, compile=False, template=None):
    """The model at `path` on this machine's GPU (BF16) or CPU, or one line that says why it cannot be
    loaded. compile: its generation compiles the decoding step. template: --template (default: the
    model's); which one and why is said on stderr."""
    try:
        model = llava.load(path, device="cuda" if torch.cuda.is_available() else "cpu", template=template)
        model.compile_decoding = compile
        print(f"eval.py: the {model.template.name} template ({model.template_why})", file=sys.stderr)
        return model
    except (OSError, ValueError) as e:
        sys.exit(f"cannot load --model {path}: {cli.one_line(e)}")


if __name__ == "__main__":
    cli.cli(main, "eval.py")
