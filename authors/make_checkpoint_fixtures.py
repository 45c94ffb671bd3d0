"""Makes authors/checkpoint_fixtures.json and authors/checkpoint_pixels.safetensors: what the authors'
code feeds a checkpoint of their layout (issue 25, items 2, 3, 4 and 14), for test_llava.py to compare
against offline.

Made with the authors' repository haotian-liu/LLaVA at commit c121f04 (installed editable as the
llava-torch package), transformers 4.37.2, tokenizers 0.15.1, sentencepiece 0.1.99, Pillow 13.0.0, by

    . /work/authors-venv/bin/activate && python authors/make_checkpoint_fixtures.py

run from the repository root. What it records:
- prompts: the prompt text their conversation templates write (conv_templates[...].get_prompt()) and the
  ids their tokenizer_image_token (llava/mm_utils.py) makes of it, with the tokenizer their loader uses
  (builder.py: AutoTokenizer.from_pretrained(path, use_fast=False), then <im_patch> added, and <im_start>
  <im_end> where mm_use_im_start_end is true), on stand_ins/vicuna (SentencePiece, legacy false);
- pixels: process_images(..., image_aspect_ratio="pad") of two non-square images (expand2square over the
  image processor's mean colour, then stand_ins/clip's CLIPImageProcessor), and of one unpadded;
- images: Image.open(png).convert("RGB") (their scripts and train.py) of small PNGs of every mode with
  transparency, of 16-bit grey and of 32-bit float grey (a TIFF); the source pixels are recorded so that the test writes the same files.
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPImageProcessor

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (their conv mode, this project's template, the turns: human, gpt, human, ...). vicuna_v1 is LLaVA-1.5's
# (their training's --version v1, their v1_5 eval scripts' --conv-mode); llava_v0 their ### inference prompt.
CASES = [
    ("llava_v0", "paper", ["<image>\nWhat is in the image?"]),
    ("llava_v0", "paper", ["What color is the square?\n<image>"]),
    ("llava_v0", "paper", ["Describe the image in detail.\n<image>"]),
    ("llava_v0", "paper", ["<image>\nHow many circles are there?", "There are 2 circles.", "And squares?"]),
    ("llava_v0", "paper", ["Is it red? <image> Answer yes or no."]),
    ("vicuna_v1", "llava15", ["<image>\nWhat is in the image?"]),
    ("vicuna_v1", "llava15", ["<image>\nWhat color is the square? Answer with one word."]),
    ("vicuna_v1", "llava15", ["<image>\nHow many circles are there?", "There are 2 circles.", "And squares?"]),
    ("vicuna_v1", "llava15", ["<image>\n12 apples, 3 pears: how many fruits?"]),
]


def prompt_text(mode, turns):
    conv = conv_templates[mode].copy()
    for i, value in enumerate(turns + [None]):
        conv.append_message(conv.roles[i % 2], value)
    return conv.get_prompt()


def tokenizer_as_loaded(start_end):
    """builder.load_pretrained_model's tokenizer of a checkpoint holding stand_ins/vicuna's files."""
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "stand_ins", "vicuna"), use_fast=False)
    tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)  # mm_use_im_patch_token: default True
    if start_end:
        tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    return tokenizer


def prompts():
    rows = []
    for start_end in (False, True):
        tokenizer = tokenizer_as_loaded(start_end)
        for mode, template, turns in CASES if not start_end else CASES[:1] + CASES[5:6]:
            authors_turns = list(turns)
            if start_end:  # model_vqa.py, run_llava.py, serve/cli.py
                authors_turns[0] = authors_turns[0].replace(
                    "<image>", DEFAULT_IM_START_TOKEN + "<image>" + DEFAULT_IM_END_TOKEN)
            text = prompt_text(mode, authors_turns)
            ids = tokenizer_image_token(text, tokenizer, IMAGE_TOKEN_INDEX)
            rows.append(dict(conv_mode=mode, template=template, turns=turns, mm_use_im_start_end=start_end,
                             prompt=text, input_ids=ids, whole_text_ids=tokenizer(text).input_ids
                             if not start_end else None))
    return rows


def picture(width, height):
    """A non-square RGB image whose every pixel differs: the padding and the resize both show."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, (x * 7 + y * 13) % 256], -1)
                           .astype(np.uint8), "RGB")


def pixels():
    processor = CLIPImageProcessor.from_pretrained(os.path.join(ROOT, "stand_ins", "clip"))
    config = type("Config", (), {"image_aspect_ratio": "pad"})
    out = {}
    for name, (w, h) in {"wide": (40, 25), "tall": (21, 36)}.items():
        out[f"{name}_pad"] = process_images([picture(w, h)], processor, config)[0].contiguous()
    out["wide_plain"] = processor(picture(40, 25), return_tensors="pt")["pixel_values"][0].contiguous()
    return out


def images():
    """Small PNGs of the modes that carry transparency, 16-bit grey, and a float TIFF: the source pixels, and what
    Image.open(path).convert("RGB") gives (their model_vqa*.py, run_llava.py, train.py)."""
    a = np.arange(12).reshape(3, 4)
    cases = {
        "RGBA": dict(pixels=np.stack([a * 20, 255 - a * 20, a * 7, [[0, 64, 128, 255]] * 3], -1)),
        "LA": dict(pixels=np.stack([a * 20, np.array([[0, 0, 255, 128]] * 3)], -1)),
        "P": dict(pixels=a % 3, palette=[250, 0, 0, 0, 250, 0, 0, 0, 250], transparency=1),
        "I;16": dict(pixels=a * 5000),
        "RGB": dict(pixels=np.stack([a * 20, a * 10, a * 5], -1)),
        "F": dict(pixels=a / 11.0 * [[1], [100], [300]]),  # 32-bit float grey: 0 to 1, to 100, to 300
    }
    out = {}
    for mode, case in cases.items():
        path = os.path.join("/tmp", f"authors_fixture_{mode.replace(';', '')}.{'tiff' if mode == 'F' else 'png'}")
        write_png(path, mode, **case)
        with Image.open(path) as image:
            assert image.mode == mode, (mode, image.mode)
            rgb = np.asarray(image.convert("RGB"))
        out[mode] = dict({k: np.asarray(v).tolist() for k, v in case.items()}, rgb=rgb.tolist())
    return out


def write_png(path, mode, pixels, palette=None, transparency=None):
    """The same function is in test_llava.py: the test writes the same files."""
    pixels = np.asarray(pixels)
    dtype = {"I;16": np.uint16, "F": np.float32}.get(mode, np.uint8)
    image = Image.fromarray(pixels.astype(dtype), "L" if mode == "P" else None if mode in ("I;16", "F") else mode)
    if mode == "P":
        image = image.convert("P")
        image.putpalette(palette)
        image.save(path, transparency=transparency)
    else:
        image.save(path)


if __name__ == "__main__":
    import transformers
    assert transformers.__version__ == "4.37.2", transformers.__version__
    with open(os.path.join(HERE, "checkpoint_fixtures.json"), "w") as f:
        json.dump({"prompts": prompts(), "images": images()}, f, indent=1)
        f.write("\n")
    save_file(pixels(), os.path.join(HERE, "checkpoint_pixels.safetensors"))
    print("wrote authors/checkpoint_fixtures.json, authors/checkpoint_pixels.safetensors", file=sys.stderr)
