"""§5.2's ScienceQA as the authors ran it (haotian-liu/LLaVA; the commits are named where each rule is).

Their release (problems.json, pid_splits.json, images/SPLIT/PID/image.png) becomes LLaVA JSON as their
scripts/convert_sqa_to_llava.py writes it (convert_to_llava, with convert_sqa_to_llava_base_prompt.py's
create_one_example_chatbot), in any of their prompt formats: "QCM-LEA", the paper's (their
finetune_sqa.sh), is the default. Answers are read and scored as their llava/eval/eval_science_qa*.py read
them, and Table 7's columns are counted as ScienceQA's own scorer counts them (lupantech/ScienceQA,
get_scores). Plumbing: imports no section file."""
import random
import re
import sys

from cli import SampleError
from sample_checks import check_scienceqa_problem

LETTERS = "ABCDE"  # multiple-choice options, as ScienceQA letters them
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}  # Table 7
IMAGE = "<image>"

# create_one_example_chatbot's inputs (Q question, C context, M options, L lecture, E solution) and outputs
# (A the answer); their names as theirs: their "AL" holds the solution, their "AE" the lecture.
INPUTS = {
    "CQM": "Context: {context}\nQuestion: {question}\nOptions: {choice}\n",
    "QCM": "Question: {question}\nContext: {context}\nOptions: {choice}\n",
    "QCML": "Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {lecture}\n",
    "QCME": "Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {solution}\n",
    "QCMLE": "Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {lecture} {solution}\n",
    "QCLM": "Question: {question}\nContext: {context}\nBECAUSE: {lecture}\nOptions: {choice}\n",
    "QCEM": "Question: {question}\nContext: {context}\nBECAUSE: {solution}\nOptions: {choice}\n",
    "QCLEM": "Question: {question}\nContext: {context}\nBECAUSE: {lecture} {solution}\nOptions: {choice}\n"}
OUTPUTS = {
    "A": "Answer: The answer is {answer}.", "AL": "Answer: The answer is {answer}. BECAUSE: {solution}",
    "AE": "Answer: The answer is {answer}. BECAUSE: {lecture}",
    "ALE": "Answer: The answer is {answer}. BECAUSE: {lecture} {solution}",
    "AEL": "Answer: The answer is {answer}. BECAUSE: {solution} {lecture}",
    "LA": "Answer: {lecture} The answer is {answer}.", "EA": "Answer: {solution} The answer is {answer}.",
    "LEA": "Answer: {lecture} {solution} The answer is {answer}.",
    "ELA": "Answer: {solution} {lecture} The answer is {answer}."}
FORMATS = [f"{i}-{o}" for i in INPUTS for o in OUTPUTS]
HEADS = ("Question: ", "Answer: ")  # what convert_to_llava takes off the start of each turn
PAPER_FORMAT = "QCM-LEA"  # the paper's run; "QCM-ALE" its answer-first ablation; "CQM-A" LLaVA-1.5's evaluation


def turns(problem, format=PAPER_FORMAT):
    """(question turn, answer turn) of one problem, character for character as convert_to_llava writes them,
    their clean-ups included: each text's pairs of spaces made one space in one pass (three become two),
    the ends stripped, a trailing "BECAUSE:" dropped; then, in a question turn that starts "Question: ", every
    "Question: " removed, wherever it stands, and every "Answer: " of the answer likewise. The image, if
    any, is "\\n<image>" at the end. The lecture and solution have each written "\\n" made a line break."""
    source, target = format.split("-")
    fields = dict(question=problem["question"], context=problem["hint"].strip() or "N/A",
                  choice=" ".join(f"({letter}) {c}" for letter, c in zip(LETTERS, problem["choices"])),
                  answer=LETTERS[problem["answer"]], lecture=problem["lecture"].replace("\\n", "\n"),
                  solution=problem["solution"].replace("\\n", "\n"))
    texts = []
    for text in (INPUTS[source].format(**fields), OUTPUTS[target].format(**fields)):
        text = text.replace("  ", " ").strip()
        texts.append(text.replace("BECAUSE:", "").strip() if text.endswith("BECAUSE:") else text)
    question, answer = (t.replace(head, "") if t.startswith(head) else t for t, head in zip(texts, HEADS))
    return (f"{question}\n{IMAGE}" if problem["image"] else question), answer


def sample(pid, problem, root, split, format=PAPER_FORMAT):
    """One problem as LLaVA JSON, as theirs: {"id", "image": "PID/FILE" (relative to ROOT/images/SPLIT),
    "conversations"}. Raises SampleError for a problem that cannot be one (their script would crash or write
    nonsense; an image "" counts as none here, as null does there)."""
    check_scienceqa_problem(pid, problem, root, split, len(LETTERS), SUBJECTS)
    question, answer = turns(problem, format)
    out = {"id": pid} | ({"image": f"{pid}/{problem['image']}"} if problem["image"] else {})
    return out | {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def convert(problems, root, split, format=PAPER_FORMAT):
    """The problems of a split that convert, in pid_splits.json's order; a malformed one is named on stderr
    and skipped."""
    samples = []
    for pid, problem in problems.items():
        try:
            samples.append(sample(pid, problem, root, split, format))
        except SampleError as e:
            print(f"skipped: {e}", file=sys.stderr)
    return samples


def asked(sample):
    """The question as their model_vqa_science.py asks it (lines 43-57 at c121f04): <image> taken out, the
    text stripped, and "<image>\\n" put first if the problem has an image."""
    question = sample["conversations"][0]["value"].replace(IMAGE, "").strip()
    return f"{IMAGE}\n{question}" if "image" in sample else question


# ----------------------------------------------------------------------------------------------
# Answers read as the authors' scorers read them
# ----------------------------------------------------------------------------------------------

PATTERN = re.compile(r"The answer is ([A-Z]).")  # theirs: the "." is any character, so "C or D" reads C


def their_letter(text, bare=False):
    """The letter the authors' scripts read in a reply, or None (their "FAILED"): exactly one match of
    PATTERN (eval_science_qa.py at 8959d5c, the paper's release, and both ensemble scripts). bare: also a reply
    that is a letter alone, or starts "A. " (eval_science_qa.py at c121f04, for LLaVA-1.5's letter answers)."""
    if bare and text in list(LETTERS):  # theirs is a list: "" and "AB" are not in it
        return text
    if bare and len(text) >= 3 and text[0] in LETTERS and text[1:3] == ". ":
        return text[0]
    found = PATTERN.findall(text)
    return found[0] if len(found) == 1 else None


def their_index(letter, n_choices, rng):
    """get_pred_idx: the option's index; a letter that is no option (or None) gets a random option from
    rng (their random.choice(range(n)); theirs unseeded), or -1, a wrong answer, when rng is None."""
    if letter is not None and letter in LETTERS[:n_choices]:
        return LETTERS.index(letter)
    return rng.choice(range(n_choices)) if rng is not None else -1


SCORINGS = {  # --scoring: how LLaVA's answers are read and what an unread one counts as
    "paper": "eval_science_qa.py at 8959d5c, which made Table 7: one 'The answer is X.'; none: a seeded random option",
    "authors": "eval_science_qa.py at c121f04: also 'X' alone and 'X. ...'; none: wrong",
    "strict": "the project's extract_answer: one definite letter among the options; none: wrong"}


def their_scores(problems, texts, scoring="paper", seed=0):
    """{pid: the index of the option scored} for LLaVA alone, as their eval_science_qa.py scores it (paper:
    get_pred_idx is called twice for each problem, as there, and the first call counts; the random draws
    match theirs under random.seed(seed))."""
    rng = random.Random(seed) if scoring == "paper" else None
    chosen = {}
    for pid, problem in problems.items():
        letter = their_letter(texts[pid], bare=scoring == "authors")
        chosen[pid] = their_index(letter, len(problem["choices"]), rng)
        their_index(letter, len(problem["choices"]), rng)  # their second call, for sqa_results['results']
    return chosen


def their_ensembles(problems, ours, teacher, judge, seed=0):
    """({pid: index}, {pid: index}): the complement as eval_science_qa_gpt4.py scores it (the teacher's option;
    where its reply reads no letter, LLaVA's; a letter that is no option, or LLaVA's unread answer: a random
    option), and the judge as eval_science_qa_gpt4_requery.py does (the re-asked teacher's option where its
    reply reads a letter, else LLaVA's, an unread one a random option, even where the teacher named one).
    ours, teacher: {pid: reply}; judge: {pid: reply} where the teacher was asked again. Each script draws
    from its own random.Random(seed), in their order (LLaVA's, the teacher's, the re-asked)."""
    complement, final = {}, {}
    rng_c, rng_j = random.Random(seed), random.Random(seed)
    for pid, problem in problems.items():
        n, letters = len(problem["choices"]), [their_letter(ours[pid]), their_letter(teacher[pid])]
        llava, gpt4 = (their_index(letter, n, rng_c) for letter in letters)
        complement[pid] = gpt4 if letters[1] is not None else llava
        llava, _ = (their_index(letter, n, rng_j) for letter in letters)
        again = their_letter(judge[pid]) if pid in judge else None
        requery = their_index(again, n, rng_j)
        final[pid] = requery if again is not None else llava
    return complement, final


# ----------------------------------------------------------------------------------------------
# Table 7's columns
# ----------------------------------------------------------------------------------------------

TABLE7 = ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg"]


def table7_columns(problem):
    """The Table 7 columns a problem counts in, as ScienceQA's get_scores counts them: its subject; TXT if it
    has a hint (any text, a space too), IMG if an image, NO if neither; its grades; Avg."""
    context = ["TXT"] * bool(problem["hint"]) + ["IMG"] * bool(problem["image"]) or ["NO"]
    grades = "G1-6" if int(problem["grade"][len("grade"):]) <= 6 else "G7-12"
    return [SUBJECTS[problem["subject"]], *context, grades, "Avg"]


def score_table7(problems, chosen):
    """Accuracy (%) in each Table 7 column. chosen: {pid: the index of the option answered (-1 or None:
    none)}."""
    right, n = {c: 0 for c in TABLE7}, {c: 0 for c in TABLE7}
    for pid, problem in problems.items():
        for column in table7_columns(problem):
            n[column] += 1
            right[column] += chosen.get(pid) == problem["answer"]
    return {c: {"accuracy": 100 * right[c] / n[c], "n": n[c]} for c in TABLE7 if n[c]}
