"""Tests: CPU, offline, tiny models built from configs. Run: python -m pytest -q test_llava.py"""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

import data
import llava
import train

HERE = os.path.dirname(os.path.abspath(__file__))
CONVERSATION = [  # multi-turn, image as a prefix of the first human turn
    {"from": "human", "value": "<image>\nWhat color is the square?"},
    {"from": "gpt", "value": "The square is red."},
    {"from": "human", "value": "How many circles are there?"},
    {"from": "gpt", "value": "There are two circles."},
]
TEXTS = ["A chat between a curious human and an artificial intelligence assistant. The assistant gives "
         "helpful, detailed, and polite answers to the human's questions.###Human: What color is the "
         "square?###Assistant: The square is red.###USER: How many circles? ASSISTANT: two circles."] * 10


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """A tiny CLIP and a tiny LLaMA saved as model directories, like hub models."""
    root = tmp_path_factory.mktemp("parts")
    tokenizer = train.make_toy_tokenizer(TEXTS, vocab_size=300)
    train.make_toy_clip(str(root / "clip"), image_size=32, patch_size=8)
    train.make_toy_lm(str(root / "lm"), tokenizer)
    return str(root / "clip"), str(root / "lm")


def make_model(parts, projector="mlp2x_gelu", template="paper", seed=0, **kwargs):
    torch.manual_seed(seed)
    return llava.build(*parts, projector=projector, template=template, **kwargs).eval()


@pytest.fixture(scope="session")
def saved(parts, tmp_path_factory):
    """Our model with mlp2x_gelu, saved in the llava-hf layout, and transformers' copy of it."""
    model = make_model(parts)
    path = str(tmp_path_factory.mktemp("saved") / "llava")
    llava.save(model, path)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
    return model, path, hf


def image(color=(200, 30, 30), size=(40, 30)):
    return Image.new("RGB", size, color)


# ----------------------------------------------------------------------------------------------
# §4.1 against transformers' LlavaForConditionalGeneration
# ----------------------------------------------------------------------------------------------

def test_logits_and_loss_equal_transformers(saved):
    model, _, hf = saved
    input_ids, labels = data.render(CONVERSATION, model.tokenizer, model.template, model.image_token_id,
                                    model.num_image_tokens)
    input_ids, labels = torch.tensor([input_ids]), torch.tensor([labels])
    pixel_values = model.image_processor(images=image(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits, loss, _ = model(input_ids, pixel_values, labels=labels)
        ref = hf(input_ids=input_ids, pixel_values=pixel_values, labels=labels)
    diff = (logits - ref.logits).abs().max().item()
    print(f"max abs logit difference against transformers: {diff:.2e}")
    assert diff <= 1e-5
    assert torch.allclose(loss, ref.loss, atol=1e-6)


def test_greedy_generation_equals_transformers(saved):
    model, _, hf = saved
    input_ids, pixel_values = model.prepare(CONVERSATION[:1], image())
    ours = list(model.generate(input_ids, pixel_values, max_new_tokens=24, stop=""))
    ref = hf.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=24, do_sample=False,
                      eos_token_id=model.tokenizer.eos_token_id, pad_token_id=model.tokenizer.pad_token_id)
    assert ours == ref[0, input_ids.shape[1]:].tolist()
    assert len(ours) >= 2


def test_transformers_checkpoint_loads_in_ours(parts, tmp_path):
    model = make_model(parts, seed=1)
    config = transformers.LlavaConfig(vision_config=model.vision_tower.config,
                                      text_config=model.language_model.config,
                                      image_token_index=model.image_token_id, image_seq_length=16)
    torch.manual_seed(2)
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    model.image_processor.save_pretrained(tmp_path)
    ours = llava.load(str(tmp_path)).eval()
    assert ours.template.name == "llava15"  # a llava-hf checkpoint speaks LLaVA-1.5
    input_ids, pixel_values = ours.prepare(CONVERSATION[:1], image())
    with torch.no_grad():
        diff = (ours(input_ids, pixel_values)[0] - hf(input_ids=input_ids, pixel_values=pixel_values).logits)
    assert diff.abs().max().item() <= 1e-5


def test_hub_layout_with_nested_vision_model_loads(saved, tmp_path):
    """llava-hf checkpoints on the hub (transformers 4) name the tower vision_tower.vision_model.*"""
    model, path, _ = saved
    weights = load_file(os.path.join(path, "model.safetensors"))
    weights = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in weights.items()}
    for f in os.listdir(path):
        if not f.startswith("model"):
            os.symlink(os.path.join(path, f), tmp_path / f)
    save_file(weights, tmp_path / "model.safetensors")
    reloaded = llava.load(str(tmp_path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k


def test_linear_projector_loads_in_transformers(parts, tmp_path):
    """The paper's single linear W, written as Linear, identity, Linear, gives the same logits."""
    model = make_model(parts, projector="linear")
    llava.save(model, str(tmp_path / "m"))
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    reloaded = llava.load(str(tmp_path / "m")).eval()
    assert reloaded.projector_kind == "linear" and len(reloaded.projector) == 1
    input_ids, pixel_values = model.prepare(CONVERSATION[:1], image())
    with torch.no_grad():
        ours = model(input_ids, pixel_values)[0]
        assert (ours - hf(input_ids=input_ids, pixel_values=pixel_values).logits).abs().max() <= 1e-5
        assert torch.equal(ours, reloaded(input_ids, pixel_values)[0])


def test_authors_layout_loads(parts, tmp_path):
    """haotian-liu/LLaVA's layout: LLaMA keys, model.mm_projector.*, vision tower by name."""
    model = make_model(parts, seed=3, template="llava15")  # what the authors used with mlp2x_gelu
    weights = {}
    for k, v in model.state_dict().items():
        if k.startswith("language_model."):
            weights[k[len("language_model."):]] = v
        elif k.startswith("projector."):
            weights["model.mm_" + k] = v
    save_file(weights, tmp_path / "model.safetensors")
    config = model.language_model.config.to_dict()
    config.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"],
                  mm_vision_tower=parts[0], mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", mm_hidden_size=64)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model.tokenizer.save_pretrained(tmp_path)
    authors = llava.load(str(tmp_path)).eval()
    assert authors.image_token_id == llava.AUTHORS_IMAGE_TOKEN_ID
    ids_ours, pixel_values = model.prepare(CONVERSATION[:1], image())
    ids_authors, _ = authors.prepare(CONVERSATION[:1], image())
    assert (ids_authors == -200).sum() == 16
    with torch.no_grad():
        assert torch.equal(model(ids_ours, pixel_values)[0], authors(ids_authors, pixel_values)[0])


@pytest.mark.parametrize("damage,message", [
    (lambda w: w.pop("multi_modal_projector.linear_2.bias"), "missing weight projector.2.bias"),
    (lambda w: w.update(extra=torch.zeros(1)), "unexpected weight extra"),
    (lambda w: w.update({"multi_modal_projector.linear_1.bias": torch.zeros(3)}),
     "weight projector.0.bias has shape (3,)"),
])
def test_loading_is_strict(saved, tmp_path, damage, message):
    _, path, _ = saved
    weights = load_file(os.path.join(path, "model.safetensors"))
    damage(weights)
    for f in os.listdir(path):
        if not f.startswith("model"):
            os.symlink(os.path.join(path, f), tmp_path / f)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        llava.load(str(tmp_path))


def test_save_is_atomic_and_replaces(saved, tmp_path):
    model, _, _ = saved
    target = str(tmp_path / "m")
    llava.save(model, target)
    llava.save(model, target)  # over an existing one
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no .tmp or .old left behind
    assert os.path.exists(os.path.join(target, "model.safetensors"))


def test_kv_cache_generation_equals_no_cache(saved):
    model, _, _ = saved
    input_ids, pixel_values = model.prepare(CONVERSATION[:3], image((20, 20, 220)))
    cached = list(model.generate(input_ids, pixel_values, max_new_tokens=16, stop=""))
    uncached = list(model.generate(input_ids, pixel_values, max_new_tokens=16, stop="", use_cache=False))
    assert cached == uncached
    torch.manual_seed(0)
    sampled = list(model.generate(input_ids, pixel_values, max_new_tokens=16, stop="", temperature=1.0, top_p=0.9))
    torch.manual_seed(0)
    assert sampled == list(model.generate(input_ids, pixel_values, max_new_tokens=16, stop="", temperature=1.0,
                                          top_p=0.9, use_cache=False))


def test_generation_stops_at_the_stop_string(saved):
    model, _, _ = saved
    input_ids, pixel_values = model.prepare(CONVERSATION[:1], image())
    ids = list(model.generate(input_ids, pixel_values, max_new_tokens=12, stop=""))
    text = model.tokenizer.decode(ids)
    # A stop string that greedy decoding is known to produce, late in the answer.
    k = next(k for k in range(len(text) // 2, len(text) - 3)
             if text.index(text[k:k + 3]) == k and "\ufffd" not in text[k:k + 3])
    stop = text[k:k + 3]
    ids_stopped = list(model.generate(input_ids, pixel_values, max_new_tokens=12, stop=stop))
    assert len(ids_stopped) < len(ids) and stop in model.tokenizer.decode(ids_stopped)
    pieces = list(model.generate_text(CONVERSATION[:1], image(), max_new_tokens=12, stop=stop))
    assert "".join(pieces) == text[:text.index(stop)]  # streamed: the text before the stop string
    assert len(pieces) >= 2


# ----------------------------------------------------------------------------------------------
# Table 2: ids and labels
# ----------------------------------------------------------------------------------------------

def trained_spans(input_ids, labels, tokenizer):
    """The decoded runs of trained tokens, in order."""
    spans, run = [], []
    for token, label in zip(input_ids, labels):
        if label != data.IGNORE:
            assert label == token  # a trained position predicts its own token
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans + ([tokenizer.decode(run)] if run else [])


@pytest.mark.parametrize("template", ["paper", "llava15"])
def test_labels_token_by_token(saved, template):
    model, _, _ = saved
    tok, t, n = model.tokenizer, data.TEMPLATES[template], model.num_image_tokens
    input_ids, labels = data.render(CONVERSATION, tok, template, model.image_token_id, n)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    # Expected, piece by piece: everything but the answers and their <STOP> is -100. Neighbouring
    # text with the same flag is tokenized as one piece.
    expected = [(tok.bos_token_id, False)]
    expected += [(i, False) for i in enc(f"{t.system}{t.sep}{t.human}: ")]
    expected += [(model.image_token_id, False)] * n
    expected += [(i, False) for i in enc(f"\nWhat color is the square?{t.sep}{t.assistant}:")]
    expected += [(i, True) for i in enc(" The square is red." + t.stop)]
    expected += [(i, False) for i in enc(f"{t.human}: How many circles are there?{t.sep}{t.assistant}:")]
    expected += [(i, True) for i in enc(" There are two circles." + t.stop)]
    assert input_ids == [i for i, _ in expected]
    assert labels == [i if trained else data.IGNORE for i, trained in expected]
    assert trained_spans(input_ids, labels, tok) == [f" The square is red.{t.stop}",
                                                     f" There are two circles.{t.stop}"]
    if template == "llava15":
        assert enc(t.stop) == [tok.eos_token_id]  # </s> is the EOS token, trained


@pytest.mark.parametrize("template", ["paper", "llava15"])
def test_chat_prompt_is_a_prefix_of_the_training_ids(saved, template):
    model, _, _ = saved
    args = (model.tokenizer, template, model.image_token_id, model.num_image_tokens)
    train_ids, _ = data.render(CONVERSATION, *args)
    for turns in (1, 3):
        prompt_ids, _ = data.render(CONVERSATION[:turns], *args, for_generation=True)
        assert train_ids[:len(prompt_ids)] == prompt_ids
        assert model.tokenizer.decode(prompt_ids).endswith(data.TEMPLATES[template].assistant + ":")


def test_image_as_suffix(saved):
    model, _, _ = saved
    conv = [{"from": "human", "value": "What color is the square?\n<image>"}, CONVERSATION[1]]
    input_ids, labels = data.render(conv, model.tokenizer, "paper", model.image_token_id, model.num_image_tokens)
    first = input_ids.index(model.image_token_id)
    assert input_ids[first:first + model.num_image_tokens] == [model.image_token_id] * model.num_image_tokens
    assert input_ids.count(model.image_token_id) == model.num_image_tokens
    assert model.tokenizer.decode(input_ids[:first]).endswith("Human: What color is the square?\n")


def test_truncation_never_cuts_the_image_and_never_leaves_nothing_to_train(saved):
    model, _, _ = saved
    args = (model.tokenizer, "paper", model.image_token_id, model.num_image_tokens)
    full, _ = data.render(CONVERSATION, *args)
    ids, labels = data.render(CONVERSATION, *args, max_length=len(full) - 3)
    assert len(ids) == len(full) - 3 and any(label != data.IGNORE for label in labels)
    with pytest.raises(data.SampleError, match="sample s1: .*cut through the image"):
        data.render(CONVERSATION, *args, max_length=full.index(model.image_token_id) + 5, sample_id="s1")
    first_answer = next(i for i, label in enumerate(data.render(CONVERSATION, *args)[1]) if label != data.IGNORE)
    with pytest.raises(data.SampleError, match="sample s2: no answer token left"):
        data.render(CONVERSATION, *args, max_length=first_answer, sample_id="s2")


def test_loss_with_no_trained_token_is_zero_not_nan(saved):
    model, _, _ = saved
    input_ids = torch.tensor([model.tokenizer.encode("Human: hi")])
    logits, loss, _ = model(input_ids, labels=torch.full_like(input_ids, data.IGNORE))
    assert loss.item() == 0.0


@pytest.mark.parametrize("conversation,image_given,message", [
    ([{"from": "human", "value": "<image>\nhi"}, {"from": "bot", "value": "x"}], True, "unknown role 'bot'"),
    ([{"from": "human", "value": "<image>\nhi"}, {"from": "human", "value": "x"}], True, "alternation"),
    ([{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": " "}], True, "turn 1 is empty"),
    ([{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}], False, "but no image"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}], True, "exactly one <image>"),
])
def test_bad_conversations_are_named(saved, conversation, image_given, message):
    model, _, _ = saved
    with pytest.raises(data.SampleError, match=f"sample 42: .*{message}"):
        data.render(conversation, model.tokenizer, "paper", model.image_token_id if image_given else None,
                    model.num_image_tokens, sample_id=42)


def test_sentencepiece_style_tokenizer_gets_no_double_space():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    sp.decoder = decoders.Metaspace(prepend_scheme="first")
    sp.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                      show_progress=False))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>")
    assert data.encode_text(tok, " The square") == tok.encode("The square", add_special_tokens=False)
    ids, labels = data.render([{"from": "human", "value": "hi"}, CONVERSATION[1]], tok, "paper")
    assert trained_spans(ids, labels, tok) == ["The square is red.###"]  # one space, from "▁The"


def test_show_cli_marks_trained_tokens(saved, tmp_path):
    _, path, _ = saved
    sample_file = tmp_path / "samples.json"
    sample_file.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                                                     {"from": "gpt", "value": "x"}]},
                                       {"id": "b", "image": "b.png", "conversations": CONVERSATION}]))
    out = subprocess.run([sys.executable, "data.py", "show", str(sample_file), "--index", "1", "--model", path,
                          "--template", "paper"], cwd=HERE, capture_output=True, text=True, check=True).stdout
    assert "<image x16>" in out
    assert "[[ The square is red.###]]" in out and "[[ There are two circles.###]]" in out
    assert "Human: How many circles are there?###Assistant:" in out
