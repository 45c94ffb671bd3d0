"""Makes authors/bench_fixtures.json: what the authors' own LLaVA-Bench scripts send to the judge, and how
they read and summarise its reviews (§5.1), for test_llava.py's LLaVA-Bench tests.

Made with the authors' repository haotian-liu/LLaVA at c121f04 (installed editable in a venv with transformers
4.37.2; their scripts call the openai 0.x client, so openai 0.28.1 was installed beside it with
`pip install --target /tmp/bench-openai openai==0.28.1`), by:

    PYTHONPATH=/tmp/bench-openai /work/authors-venv/bin/python authors/make_bench_fixtures.py /work/authors-LLaVA

What it does, with their code unchanged:
1. runs their llava/eval/eval_gpt_review_bench.py (LLaVA-Bench In-the-Wild) and eval_gpt_review_visual.py
   (LLaVA-Bench COCO) as their scripts/v1_5/eval/llavabench.sh and their README run them (--rule
   llava/eval/table/rule.json; the reference answers first),
   on the small inputs below (the COCO contexts are the first two rows of their
   llava/eval/table/caps_boxes_coco2014_val_80.jsonl), their openai call pointed (OPENAI_API_BASE) at a judge
   on 127.0.0.1 that records each request's body as it arrives and answers with the review chosen below;
2. runs their llava/eval/summarize_gpt_review.py -f on each reviews file they wrote, and keeps what it prints;
3. calls their parse_score (eval_gpt_review_bench.py's; eval_gpt_review_visual.py's is the same code, checked)
   on a list of reviews, well formed and not.
The fixture holds the inputs, the request bodies (text, byte for byte), their reviews files, their summaries
and the parse_score results. Nothing of the project is imported.
"""
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading

AUTHORS = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "/work/authors-LLaVA")
HERE = os.path.dirname(os.path.abspath(__file__))

# LLaVA-Bench (In-the-Wild): three images, their captions as context.jsonl holds them (a string, or a list
# that their script joins with "\n"); the categories' scores are picked so that their summary's rounding of
# the means to 3 decimals before dividing shows (conv: 17/18 gives 94.5 there, 94.4 unrounded; detail: 23/22
# gives 104.6 there, 104.5 unrounded).
WILD_CONTEXT = [
    {"id": "001", "image": "001.jpg", "caption": "A bowl of ramen with a soft-boiled egg, two slices of pork "
                                                 "and spring onions, on a wooden table.\nChopsticks rest on the bowl."},
    {"id": "002", "image": "002.jpg", "caption": ["A meme: a cat in sunglasses at a laptop.",
                                                  "The caption reads \"When the code compiles on the first try\"."]},
    {"id": "003", "image": "003.jpg", "caption": "Caf\u00e9 street at night in Paris, people at tables \u2014 "
                                                 "neon signs, wet cobblestones \U0001F303."},
]
WILD = [  # (question_id, image, category, question, reference, answer, review)
    (0, "001.jpg", "conv", "What is the name of this dish?", "This is ramen, a Japanese noodle soup.",
     "It is a bowl of ramen.", "6 5\nAssistant 2 is correct but shorter."),
    (1, "001.jpg", "detail", "Describe this photo in detail.",
     "The photo shows a bowl of ramen:\n- a soft-boiled egg\n- two slices of pork\n- spring onions",
     "A bowl of noodle soup with an egg, meat and green onions on a wooden table.",
     "8 8\nBoth answers describe the bowl accurately."),
    (2, "001.jpg", "complex", "What might the person eating this have ordered first?",
     "They likely ordered a tonkotsu ramen with an extra egg.", "Probably ramen.",
     "9 6\nAssistant 1 reasons about the toppings; Assistant 2 does not."),
    (3, "002.jpg", "conv", "Why is this image funny?",
     "A cat is shown as a programmer, and code rarely compiles on the first try.",
     "The cat looks like a programmer, and the caption says \"When the code compiles on the first try\".",
     "6 6\nBoth explain the joke."),
    (4, "002.jpg", "detail", "Describe the image.", "A cat wearing sunglasses sits in front of a laptop.",
     "A cat in sunglasses is sitting at a laptop with a caption.", "7,8\nAssistant 2 mentions the caption."),
    (5, "003.jpg", "conv", "Which city is this?", "Paris, France.", "This looks like Paris.",
     "6 6\nBoth are right."),
    (6, "003.jpg", "detail", "Describe the scene \u2014 in detail.",
     "A caf\u00e9 street in Paris at night: people at tables, neon signs and wet cobblestones.",
     "People sit at caf\u00e9 tables on a wet street at night under neon lights \U0001F303.",
     "7 7\nBoth are vivid."),
    (7, "003.jpg", "complex", "What may have happened just before this photo was taken?",
     "It has probably just rained, since the cobblestones are wet.", "It rained.",
     "8 7.5\nAssistant 1 explains its reasoning."),
]
COCO = [  # on the first two rows of caps_boxes_coco2014_val_80.jsonl; their category names, their rule keys
    (90, "000000296284.jpg", "conv", "What kind of food is displayed in the case?",
     "The case displays a variety of donuts, including fruit-flavored ones.", "Donuts.",
     "8 6\nAssistant 2 is right but brief."),
    (91, "000000296284.jpg", "detail", "What do you see happening in this image?",
     "A bakery display case holds rows of donuts in many flavors, arranged on racks behind glass.",
     "There are many donuts in a glass display case in a shop.", "7 7\nBoth are accurate."),
    (92, "000000151358.jpg", "complex", "What could the person reading the newspaper be doing later?",
     "They might go out in the sun, since sunglasses lie on the newspaper.",
     "They may eat the apple and then go outside wearing the sunglasses.",
     "8 9\nAssistant 2 uses more of the scene."),
    (93, "000000151358.jpg", "conv", "What is on top of the newspaper?", "A pair of sunglasses.",
     "Sunglasses are on the newspaper.", "9 9\nBoth correct."),
]
# Reviews for parse_score, as a judge may write them: the first line is what their parser reads.
PARSE = ["8 6\nThe first is more detailed.", "8,6\nWhy.", "8, 6", "7.5 8\n", "10 1", "  9   7 \nBoth fine.",
         "1.0,10.0", "8 6.", "9 7\r\nWindows line ends.", "\n8 6", "Assistant 1: 8\nAssistant 2: 6", "11 -3",
         "11 3", "0 5", "8 10.5", "8", "8 6 7", "8/10 6/10", "Scores: 8 6", "nan 5", "1e1 5", "-8 6",
         "Both are fine.\n8 6", "", "8\t6", "8 6 ", "7\t 6"]


def jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


class Judge:
    """A chat-completions endpoint on 127.0.0.1: records each request's body (bytes) and answers with the
    review whose question the request holds."""

    def __init__(self, reviews):
        self.bodies, judge = [], self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                judge.bodies.append({"path": self.path, "body": body.decode()})
                content = json.loads(body)["messages"][1]["content"]
                question = content.split("[Question]\n", 1)[1].split("\n\n[Assistant 1]", 1)[0]
                reply = json.dumps({"id": "chatcmpl-fixture", "object": "chat.completion", "created": 0,
                                    "model": "gpt-4-0314", "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                        "role": "assistant", "content": reviews[question]}}],
                                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def run_set(name, script, rows, contexts, work):
    """Their review script on one set of inputs; returns the fixture's entry for it."""
    folder = os.path.join(work, name)
    os.makedirs(folder)
    questions = [{"question_id": q, "image": image, "text": text, "category": category}
                 for q, image, category, text, _, _, _ in rows]
    references = [{"question_id": q, "text": ref} for q, _, _, _, ref, _, _ in rows]
    answers = [{"question_id": q, "prompt": text, "text": ans, "answer_id": f"ans-{q}", "model_id": "llava"}
               for q, _, _, text, _, ans, _ in rows]
    for file, content in [("questions", questions), ("context", contexts), ("references", references),
                          ("answers", answers)]:
        jsonl(os.path.join(folder, file + ".jsonl"), content)
    judge = Judge({text: review for _, _, _, text, _, _, review in rows})
    env = dict(os.environ, OPENAI_API_BASE=judge.url, OPENAI_API_KEY="sk-fixture")
    reviews = os.path.join(folder, "reviews.jsonl")
    subprocess.run([sys.executable, os.path.join("llava", "eval", script), "--question",
                    os.path.join(folder, "questions.jsonl"), "--context", os.path.join(folder, "context.jsonl"),
                    "--rule", "llava/eval/table/rule.json", "--answer-list", os.path.join(folder, "references.jsonl"),
                    os.path.join(folder, "answers.jsonl"), "--output", reviews],
                   cwd=AUTHORS, env=env, check=True, stdout=subprocess.DEVNULL)
    judge.server.shutdown()
    summary = subprocess.run([sys.executable, "llava/eval/summarize_gpt_review.py", "-f", reviews], cwd=AUTHORS,
                             check=True, capture_output=True, text=True).stdout
    with open(reviews) as f:
        written = [json.loads(line) for line in f]
    assert len(judge.bodies) == len(rows) == len(written)
    return {"script": f"llava/eval/{script}", "questions": questions, "context": contexts, "references": references,
            "answers": [{"question_id": a["question_id"], "text": a["text"]} for a in answers],
            "requests": judge.bodies, "reviews": written, "summary": summary}


def their(module):
    spec = importlib.util.spec_from_file_location(module, os.path.join(AUTHORS, "llava", "eval", module + ".py"))
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def main():
    head = subprocess.run(["git", "-C", AUTHORS, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    with open(os.path.join(AUTHORS, "llava", "eval", "table", "caps_boxes_coco2014_val_80.jsonl")) as f:
        coco_context = [json.loads(next(f)) for _ in range(2)]
    with open(os.path.join(AUTHORS, "llava", "eval", "table", "rule.json")) as f:
        rules = json.load(f)
    bench, visual = their("eval_gpt_review_bench"), their("eval_gpt_review_visual")
    parsed = []
    for review in PARSE:
        theirs = [repr(x) for x in bench.parse_score(review)]  # repr: a nan is no JSON
        assert [repr(x) for x in visual.parse_score(review)] == theirs
        parsed.append({"review": review, "parse_score": theirs})
    with tempfile.TemporaryDirectory() as work:
        fixture = {
            "made_by": f"authors/make_bench_fixtures.py on haotian-liu/LLaVA at {head.stdout.strip()}, openai 0.28.1",
            "rules": {k: rules[k] for k in ["llava_bench_conv", "llava_bench_detail", "llava_bench_complex",
                                            "conv", "detail", "complex"]},
            "in-the-wild": run_set("in-the-wild", "eval_gpt_review_bench.py", WILD, WILD_CONTEXT, work),
            "coco": run_set("coco", "eval_gpt_review_visual.py", COCO, coco_context, work),
            "parse_score": parsed}
    with open(os.path.join(HERE, "bench_fixtures.json"), "w") as f:
        json.dump(fixture, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
