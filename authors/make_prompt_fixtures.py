"""Made authors/prompts.json by running the authors' own prompt code, once; CI only reads it.

What made it: the authors' repository haotian-liu/LLaVA at c121f04 (checked out at /work/authors-LLaVA and
installed editable, `pip install -e .`, in a venv with transformers 4.37.2, tokenizers 0.15.1, sentencepiece
0.1.99, torch CPU). The command, from the project's root:

    /work/authors-venv/bin/python authors/make_prompt_fixtures.py

It writes:
  conv_llava_v0   llava/conversation.py's conv_llava_v0 (their `###` inference template), get_prompt() of
                  CONVERSATIONS: whole, and ending with the human turn and an empty assistant message (the
                  prompt they generate from)
  plain           llava/train/train.py's preprocess_plain under conv_llava_plain (LLaVA-1.5's stage 1, as
                  their train() sets it for --version plain) on CAPTIONS: input_ids and labels, tokenized by
                  stand_ins/vicuna's tokenizer loaded as their train() loads it (AutoTokenizer, use_fast=False,
                  padding_side="right"); their image index is -200
"""
import copy
import json
import os

import transformers
from llava import conversation as conversation_lib
from llava.train import train

HERE = os.path.dirname(os.path.abspath(__file__))
CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nWhat is in the photo?"}, {"from": "gpt", "value": "A red bus."},
     {"from": "human", "value": "What color is the sky?"}, {"from": "gpt", "value": "Blue, with a few clouds."}],
    [{"from": "human", "value": "Tell me a joke."}, {"from": "gpt", "value": "Why did the chicken cross?"}]]
CAPTIONS = [
    [{"from": "human", "value": "Describe the image concisely.\n<image>"},
     {"from": "gpt", "value": "a red bus on a street"}],
    [{"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
     {"from": "gpt", "value": "Two dogs play with a ball in the park, 2023."}]]


def v0_prompt(turns):
    conv = conversation_lib.conv_llava_v0.copy()
    roles = {"human": conv.roles[0], "gpt": conv.roles[1]}
    for turn in turns:
        conv.append_message(roles[turn["from"]], turn["value"])
    return conv.get_prompt()


def main():
    prompts = [{"conversation": c, "whole": v0_prompt(c),
                "generation": v0_prompt(c[:-1] + [{"from": "gpt", "value": None}])} for c in CONVERSATIONS]
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(HERE, "..", "stand_ins", "vicuna"),
                                                           padding_side="right", use_fast=False)
    conversation_lib.default_conversation = conversation_lib.conv_templates["plain"]  # as train() does
    plain = []
    for caption in CAPTIONS:
        out = train.preprocess([copy.deepcopy(caption)], tokenizer, has_image=True)
        plain.append({"conversation": caption, "input_ids": out["input_ids"][0].tolist(),
                      "labels": out["labels"][0].tolist()})
    with open(os.path.join(HERE, "prompts.json"), "w") as f:
        json.dump({"conv_llava_v0": prompts, "plain": plain}, f, indent=1)


if __name__ == "__main__":
    main()
