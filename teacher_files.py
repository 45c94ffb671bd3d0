"""The §3 teacher's files: COCO's annotations read and checked, and the JSONL it appends to, continued
only by the same teacher model and kind, under a lock."""
import os
import sys

import disk


def coco_annotations(captions_file, instances_file):
    """COCO's captions_*.json and instances_*.json -> {image id: (file name, captions, boxes)} with
    boxes as `category: [x1, y1, x2, y2]` normalized by the image size."""
    captions, instances = disk.load_json_object(captions_file), disk.load_json_object(instances_file)
    for path, obj, keys in [(captions_file, captions, ["annotations"]),
                            (instances_file, instances, ["images", "categories", "annotations"])]:
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), list) for k in keys):
            raise SystemExit(f"{path}: not a COCO file (needs lists {', '.join(keys)})")
    reading = instances_file, "images"
    try:
        images = {image["id"]: image for image in instances["images"]}
        reading = instances_file, "categories"
        names = {c["id"]: c["name"] for c in instances["categories"]}
        found = {}
        for image_id, image in images.items():
            if not all(isinstance(image.get(k), (int, float)) and image[k] > 0 for k in ("width", "height")):
                print(f"skipped image {image_id} ({instances_file}): width {image.get('width')!r}, height "
                      f"{image.get('height')!r}; its boxes cannot be normalized", file=sys.stderr)
                continue
            found[image_id] = (image["file_name"], [], [])
        reading = captions_file, "annotations"
        for entry in captions["annotations"]:
            if entry["image_id"] in found:
                found[entry["image_id"]][1].append(entry["caption"].strip())
        reading = instances_file, "annotations"
        for entry in instances["annotations"]:
            if entry["image_id"] not in found:  # instances of an image that is not listed (or was skipped above)
                continue
            W, H = images[entry["image_id"]]["width"], images[entry["image_id"]]["height"]
            x, y, w, h = (float(v) for v in entry["bbox"])
            box = [x / W, y / H, (x + w) / W, (y + h) / H]
            found[entry["image_id"]][2].append(f"{names[entry['category_id']]}: [{', '.join(f'{v:.3f}' for v in box)}]")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SystemExit(f"{reading[0]}: not a COCO file: an entry of its {reading[1]} is malformed "
                         f"({type(e).__name__}: {e})") from None
    uncaptioned = [i for i, (_, captions, _) in found.items() if not captions]
    if uncaptioned:  # the teacher would describe them from boxes alone: a subset of the captions was given
        print(f"skipped {len(uncaptioned)} images of {instances_file} that {captions_file} has no caption for "
              f"(e.g. image {uncaptioned[0]})", file=sys.stderr)
    return {i: image for i, image in found.items() if image[1]}  # (file name, captions, boxes)


TEACHER_FIELDS = ["id", "image", "conversations", "teacher"]  # a row of the teacher's JSONL


def rows_to_continue(out_jsonl, kind, model):
    """The rows the teacher wrote in out_jsonl before, made with the same `kind` and `model`; stop with
    one line if the file is anything else (LLaVA JSON, another program's JSONL, another teacher's)."""
    made_by = {"model": model, "kind": kind}
    if out_jsonl.endswith(".json"):
        raise SystemExit(f"--out {out_jsonl}: the teacher writes JSONL (one sample a line), not a LLaVA JSON "
                         f"list; name it .jsonl")
    if not os.path.exists(out_jsonl):
        return []
    if not os.path.isfile(out_jsonl):  # a folder, or a FIFO that reading would wait on forever
        raise SystemExit(f"--out {out_jsonl}: not a regular file; pass a .jsonl file")
    with open(out_jsonl, "rb") as f:
        start = f.read(64).lstrip()
    if start.startswith(b"["):
        raise SystemExit(f"--out {out_jsonl}: a JSON list (LLaVA JSON?), not the teacher's JSONL; pass another --out")
    rows = disk.read_jsonl(out_jsonl)  # a line cut short by a crash is ignored: asked again
    if start and not rows:
        raise SystemExit(f"--out {out_jsonl}: holds no JSONL rows of the teacher; pass another --out")
    for line, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not all(k in row for k in TEACHER_FIELDS):
            raise SystemExit(f"--out {out_jsonl}: row {line} is not the teacher's (it needs "
                             f"{', '.join(TEACHER_FIELDS)}); pass another --out")
        if row["teacher"] != made_by:
            other = row["teacher"] if isinstance(row["teacher"], dict) else {}
            raise SystemExit(f"--out {out_jsonl}: made with --model {other.get('model')!r} --kind "
                             f"{other.get('kind')!r}, not --model {model!r} --kind {kind!r}; pass another --out, "
                             f"or the same settings to continue it")
    return rows


def open_out(out_jsonl, kind, model):
    """rows_to_continue(), and out_jsonl opened for appending once (a missing folder or a read-only file
    is said before the first request)."""
    rows = rows_to_continue(out_jsonl, kind, model)
    try:
        open(out_jsonl, "a").close()
    except OSError as e:
        raise OSError(e.errno, e.strerror, out_jsonl) from None
    return rows


def claim_out(out_jsonl, kind, model):
    """Refuse an out_jsonl that is not this teacher's (before a lock file is made beside it), then lock
    it: two teachers on one file would mix their rows."""
    rows_to_continue(out_jsonl, kind, model)
    if os.path.isdir(os.path.dirname(os.path.abspath(out_jsonl))):  # else open_out names the missing folder
        disk.hold_lock_file(out_jsonl + ".lock", "data.py teacher", out_jsonl, "file")
