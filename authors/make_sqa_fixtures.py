"""Made the fixtures in authors/sqa/ by running the authors' own ScienceQA code, once; CI only reads them.

What made them: the authors' repository haotian-liu/LLaVA at c121f04 (checked out at /work/authors-LLaVA,
installed editable in a venv with transformers 4.37.2; this script needs neither transformers nor torch),
and that checkout's 8959d5c (the paper's release, April 2023) for the scorer that made Table 7, read with
`git show`. The command:

    /work/authors-venv/bin/python authors/make_sqa_fixtures.py /work/authors-LLaVA

It writes authors/sqa/problems.json and pid_splits.json (16 problems written by hand below, in ScienceQA's
schema: with and without an image, a hint, a hint of spaces only, empty lectures and solutions, 2 to 5
options, double spaces, "Question: " and "Answer: " inside the texts, a written "\\n"), replies.json (LLaVA's
replies, the teacher's, the re-asked teacher's: the corner cases of the answer parsing), and what their
code makes of them:
  convert_<FORMAT>.json   scripts/convert_sqa_to_llava.py convert_to_llava(base_dir, "test", FORMAT)
  scores.json             llava/eval/eval_science_qa.py at c121f04 and at 8959d5c (random.seed(0) first),
                          eval_science_qa_gpt4.py and eval_science_qa_gpt4_requery.py (random.seed(0)
                          first): their output files and printed lines
Their scripts run unchanged, as `python SCRIPT ARGS` would run them (runpy), with `fire` stubbed for the
converter (its import is only for its command line: convert_to_llava is called directly).
"""
import contextlib
import io
import json
import os
import random
import runpy
import subprocess
import sys
import tempfile
import types

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sqa")
FORMATS = ["QCM-LEA", "CQM-A", "QCM-ALE", "CQM-LEA", "QCML-A"]


def problem(question, choices, answer, hint="", image=None, lecture="Lecture.", solution="Solution.",
            subject="natural science", grade=2):
    return {"question": question, "choices": choices, "answer": answer, "hint": hint, "image": image,
            "task": "closed choice", "grade": f"grade{grade}", "subject": subject, "topic": "topic",
            "category": "category", "skill": "skill", "lecture": lecture, "solution": solution, "split": "test"}


PROBLEMS = {
    "1": problem("Which is smooth?", ["wool", "glass"], 1, image="image.png"),
    "2": problem("What does the magnet do?", ["push", "pull", "nothing"], 1, hint="A magnet is near iron.", grade=8),
    "3": problem("Which state is farthest north?", ["Ohio", "Texas", "Maine", "Utah"], 2, hint="Look at the map.",
                 image="image.png", subject="social science", grade=10),
    "4": problem("Which animal is a mammal?", ["frog", "bat"], 1, image="image.png", lecture="", grade=6),
    "5": problem("Which word is a noun?", ["run", "cat"], 1, lecture="", subject="language science", grade=11),
    "6": problem("Which is a verb?", ["red", "sing", "blue", "tall", "slow"], 1, hint="Read the text.",
                 subject="language science", grade=3),
    "7": problem("Is the sentence true?", ["yes", "no"], 0, hint=" ", grade=7),
    "8": problem("Which is a liquid?", ["ice", "water", "steam"], 1, lecture="", solution="", grade=1),
    "9": problem("When did it happen?", ["1776", "1812"], 0, hint="Some history.\n", subject="social science",
                 grade=4),
    "10": problem("Which is  heavier?", ["a brick", "a feather", "a leaf", "a coin"], 0, image="image.png",
                  lecture="Mass is how much matter.\n\nA  brick has more.", solution="The brick.  It is heavy.",
                  grade=12),
    "11": problem("Question: which is a fruit?", ["apple", "carrot", "potato"], 0,
                  solution="Answer: an apple is a fruit.", grade=5),
    "12": problem("Which magnet pair attracts?", ["N-N", "N-S", "S-S", "none"], 1, image="image.png", solution="",
                  grade=9),
    "13": problem("Which is a rock?", ["granite", "oak", "moss", "fern", "clay"], 0, hint="Line one.\nLine two.",
                  image="image.png", subject="social science", grade=4),
    "14": problem("Which  one   is spelled right?", ["recieve", "receive"], 1, subject="language science",
                  grade=9),
    "15": problem("Which is hot?", ["sun", "snow"], 0, lecture="First line.\\nSecond line."),
    "16": problem("Which shape has 3 sides?", ["square", "triangle", "circle", "line"], 1, hint="Shapes.",
                  image="image.png", lecture="", solution="", grade=2),
}
LLAVA = {  # the corner cases of reading an answer
    "1": "Lecture. The answer is B.", "2": "The answer is (B).", "3": "The answer is C or D.", "4": "B",
    "5": "B. Because it names a thing.", "6": "the answer is B.", "7": "The answer is A", "8":
    "The answer is B. No, the answer is C.", "9": "The answer is A. So The answer is B.", "10": "The answer is E.",
    "11": "", "12": "The answer is Blue.", "13": "The answer is A, granite.", "14": "C",
    "15": "The answer is A. The answer is A.", "16": "(B)"}
TEACHER = {  # the text-only teacher (their GPT-4 outputs)
    "1": "The answer is A.", "2": "The answer is B.", "3": "The answer is D.", "4": "I cannot see the image.",
    "5": "The answer is E.", "6": "The answer is B.", "7": "The answer is A.", "8": "The answer is C.",
    "9": "The answer is B.", "10": "The answer is A.", "11": "The answer is A.", "12": "The answer is C.",
    "13": "The answer is A.", "14": "The answer is B.", "15": "No idea.", "16": "The answer is B."}
REQUERY = {  # the teacher asked again where LLaVA and it name different letters
    "1": "The answer is B.", "3": "The answer is C.", "8": "I still cannot tell.", "12": "The answer is E."}


def run_script(path, argv, seed=None):
    """Run one of their scripts as `python path argv` would; its printed lines."""
    if seed is not None:
        random.seed(seed)
    sys.argv, out = [path, *argv], io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(path, run_name="__main__")
    return out.getvalue().splitlines()


def main(repo):
    os.makedirs(HERE, exist_ok=True)
    splits = {"train": [], "val": [], "test": list(PROBLEMS), "minival": [], "minitest": []}
    for name, value in [("problems.json", PROBLEMS), ("pid_splits.json", splits),
                        ("replies.json", {"llava": LLAVA, "teacher": TEACHER, "requery": REQUERY})]:
        with open(os.path.join(HERE, name), "w") as f:
            json.dump(value, f, indent=1)
    sys.modules["fire"] = types.ModuleType("fire")  # their converter imports it for its command line only
    sys.path.insert(0, os.path.join(repo, "scripts"))
    import convert_sqa_to_llava
    scores = {}
    with tempfile.TemporaryDirectory() as work:
        for name in ("problems.json", "pid_splits.json"):
            with open(os.path.join(HERE, name)) as f, open(os.path.join(work, name), "w") as g:
                g.write(f.read())
        for format in FORMATS:
            with contextlib.redirect_stdout(io.StringIO()):
                convert_sqa_to_llava.convert_to_llava(work, "test", format)
            with open(os.path.join(work, f"llava_test_{format}.json")) as f, \
                    open(os.path.join(HERE, f"convert_{format}.json"), "w") as g:
                g.write(f.read())
        ours = os.path.join(work, "ours.jsonl")
        with open(ours, "w") as f:
            for pid, text in LLAVA.items():
                image = "<image>\n" * bool(PROBLEMS[pid]["image"])  # their IMG-Accuracy reads the prompt
                f.write(json.dumps({"question_id": pid, "text": text, "prompt": f"{image}problem {pid}"}) + "\n")
        old = os.path.join(work, "eval_science_qa_8959d5c.py")
        with open(old, "w") as f:
            f.write(subprocess.run(["git", "-C", repo, "show", "8959d5c:llava/eval/eval_science_qa.py"],
                                   capture_output=True, text=True, check=True).stdout)
        for version, path, seed in [("c121f04", os.path.join(repo, "llava/eval/eval_science_qa.py"), None),
                                    ("8959d5c", old, 0)]:
            out, result = os.path.join(work, "out.json"), os.path.join(work, "result.json")
            printed = run_script(path, ["--base-dir", work, "--result-file", ours, "--output-file", out,
                                        "--output-result", result], seed)
            with open(out) as f, open(result) as g:
                graded, indices = json.load(f), json.load(g)["results"]
            scores[f"eval_science_qa.py@{version}"] = {
                "printed": printed, "results": indices,
                "parsed": {a["question_id"]: a["parsed_ans"] for kind in graded for a in graded[kind]},
                "correct": sorted((a["question_id"] for a in graded["correct"]), key=int)}
        gpt4, requery = os.path.join(work, "gpt4.json"), os.path.join(work, "requery.jsonl")
        with open(gpt4, "w") as f:
            json.dump({"outputs": TEACHER}, f)
        with open(requery, "w") as f:
            for pid, text in REQUERY.items():
                f.write(json.dumps({"question_id": pid, "text": text}) + "\n")
        scores["eval_science_qa_gpt4.py"] = {"printed": run_script(
            os.path.join(repo, "llava/eval/eval_science_qa_gpt4.py"),
            ["--base-dir", work, "--gpt4-result", gpt4, "--our-result", ours], 0)}
        result = os.path.join(work, "requery_result.json")
        printed = run_script(os.path.join(repo, "llava/eval/eval_science_qa_gpt4_requery.py"),
                             ["--base-dir", work, "--gpt4-result", gpt4, "--requery-result", requery,
                              "--our-result", ours, "--output-result", result], 0)
        with open(result) as f:
            scores["eval_science_qa_gpt4_requery.py"] = {"printed": [line for line in printed if "Total" in line],
                                                         "results": json.load(f)["results"]}
    with open(os.path.join(HERE, "scores.json"), "w") as f:
        json.dump(scores, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
