"""One-line refusals of the samples a user brings: LLaVA JSON conversations, their image names and image
folder, ScienceQA's release and its problems."""
import itertools
import os

import disk
from cli import SampleError


def check_conversation(conversations, sample_id, image, placeholder, for_generation=False, stop=None):
    """Raise SampleError for a conversation that Table 2 cannot render; `placeholder` marks the image
    ("<image>")."""
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
        try:  # a lone surrogate ("\ud800": half of an emoji, cut by a scraper) cannot be tokenized
            turn["value"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise SampleError(f"sample {sample_id}: turn {i} is not valid Unicode text "
                              f"({turn['value'][e.start]!r} at character {e.start}: {e.reason})") from None
        if stop and turn["from"] == "gpt" and stop in turn["value"]:  # it would train a stop mid-answer
            raise SampleError(f"sample {sample_id}: answer in turn {i} contains the template's stop {stop!r}")
    if for_generation != (conversations[-1]["from"] == "human"):
        last = "a human turn" if for_generation else "an answer"
        raise SampleError(f"sample {sample_id}: the conversation must end with {last}")
    places = [i for i, turn in enumerate(conversations) if placeholder in turn["value"]]
    if image and places != [0]:
        raise SampleError(f"sample {sample_id}: an image needs exactly one {placeholder} in the first "
                          f"human turn (found in turns {places})")
    if not image and places:
        raise SampleError(f"sample {sample_id}: {placeholder} in turn {places[0]} but no image")
    if image and conversations[0]["value"].count(placeholder) != 1:
        raise SampleError(f"sample {sample_id}: more than one {placeholder} in the first turn")


def outside(name):
    """Whether an image path from the data would be read from outside the folder it is relative to."""
    return os.path.isabs(name) or ".." in name.replace("\\", "/").split("/")


def checked_sample(samples, index, path):
    """samples[index] of a LLaVA JSON file, and the id that names it in messages ("ID (PATH[INDEX])")."""
    sample = samples[index]
    sample_id = f"{sample.get('id', index)!s} ({path}[{index}])" if isinstance(sample, dict) else index
    if not isinstance(sample, dict) or "conversations" not in sample:
        raise SampleError(f"sample {sample_id}: no 'conversations'")
    return sample, sample_id


def check_image_name(name, sample_id):
    """A LLaVA JSON sample's "image": one file name, inside --image-folder."""
    if not isinstance(name, str):  # e.g. several images: the model takes one
        raise SampleError(f"sample {sample_id}: 'image' must be one file name, not {name!r}")
    if outside(name):
        raise SampleError(f"sample {sample_id}: image {name!r} lies outside --image-folder "
                          f"(an absolute path, or '..'); name it relative to the folder")


def scienceqa_problems(root, split):
    """{pid: problem} of one split of ScienceQA's release, in pid_splits.json's order."""
    problems = disk.load_json_object(os.path.join(root, "problems.json"))
    splits = disk.load_json_object(os.path.join(root, "pid_splits.json"))
    if split not in splits:
        raise SystemExit(f"{os.path.join(root, 'pid_splits.json')}: no split {split!r}; choose one of {sorted(splits)}")
    return {pid: problems.get(pid) for pid in splits[split]}


def check_images(samples, image_folder, json_path, first=20):
    """Stop early if none of the first samples' images is in image_folder: the wrong folder would
    otherwise skip every image sample and train on the text-only ones alone."""
    image_names = (s["image"] for s in samples if isinstance(s, dict) and isinstance(s.get("image"), str))
    names = list(itertools.islice(image_names, first))
    if names and not any(os.path.isfile(os.path.join(image_folder, n)) for n in names):
        raise SystemExit(f"--image-folder {image_folder}: none of the first {len(names)} images of {json_path} is "
                         f"there (e.g. {os.path.join(image_folder, names[0])}); pass the folder they are relative to")


SQA_TEXTS = ["question", "hint", "lecture", "solution"]  # the fields that must be strings ("" allowed)


def check_scienceqa_problem(pid, problem, root, split, most_choices, subjects):
    """Raise SampleError for a problem of ScienceQA's problems.json that cannot become a sample: fields
    missing or of the wrong type, an answer that is no choice, an image missing or outside ROOT/images."""
    where = f"problem {pid} ({os.path.join(root, 'problems.json')})"
    if not isinstance(problem, dict):
        raise SampleError(f"{where}: not an object (is the pid in problems.json?)")
    missing = [f for f in SQA_TEXTS + ["choices", "answer", "image", "subject", "grade"] if f not in problem]
    if missing:
        raise SampleError(f"{where}: missing {', '.join(missing)}")
    choices, answer = problem["choices"], problem["answer"]
    if not isinstance(choices, list) or not 2 <= len(choices) <= most_choices:
        raise SampleError(f"{where}: needs a list of 2 to {most_choices} choices")
    not_text = [f for f in SQA_TEXTS if not isinstance(problem[f], str)]
    if not_text or not all(isinstance(c, str) for c in choices):
        raise SampleError(f"{where}: {', '.join(not_text or ['choices'])} must be text")
    if type(answer) is not int or not 0 <= answer < len(choices):
        raise SampleError(f"{where}: answer {answer!r} is not the index of one of its {len(choices)} choices")
    if problem["subject"] not in subjects or problem["grade"] not in [f"grade{g}" for g in range(1, 13)]:
        raise SampleError(f"{where}: unknown subject {problem['subject']!r} or grade {problem['grade']!r}")
    if problem["image"]:
        if not isinstance(problem["image"], str):
            raise SampleError(f"{where}: image must be a file name, not {problem['image']!r}")
        image = f"{split}/{pid}/{problem['image']}"  # relative to ROOT/images
        if outside(image):
            raise SampleError(f"{where}: its image {image!r} lies outside {os.path.join(root, 'images')}")
        if not os.path.isfile(os.path.join(root, "images", image)):
            raise SampleError(f"{where}: its image {os.path.join(root, 'images', image)} is missing")
