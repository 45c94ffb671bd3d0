"""§4.2 Training of "Visual Instruction Tuning" and its Appendix C.

Toy stand-ins for CLIP and Vicuna: offline there are no pretrained weights, so the demo and the
tests make small models of the same kinds and save them as ordinary model directories, which
stages 1 and 2 then load exactly as they load hub models.
"""
import os

from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)


# ----------------------------------------------------------------------------------------------
# Toy stand-ins for CLIP ViT-L/14 and Vicuna
# ----------------------------------------------------------------------------------------------

def make_toy_tokenizer(texts, vocab_size=512):
    """A byte-level BPE tokenizer trained on `texts`, with LLaMA's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def make_toy_clip(path, image_size=32, patch_size=8, width=64, layers=3, heads=4, seed=0):
    """A small CLIP (vision and text towers) saved to `path` with its image processor."""
    import torch
    torch.manual_seed(seed)
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                 num_attention_heads=heads)
    config = CLIPConfig(vision_config=dict(image_size=image_size, patch_size=patch_size, **tower),
                        text_config=dict(vocab_size=512, max_position_embeddings=64, bos_token_id=1,
                                         eos_token_id=2, pad_token_id=3, **tower),
                        projection_dim=width)
    model = CLIPModel(config)
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return model


def make_toy_lm(path, tokenizer, width=64, layers=2, heads=4, seed=0):
    """A small LLaMA-architecture causal LM (the stand-in for Vicuna) saved with its tokenizer."""
    import torch
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model
