"""Build the embedded default models: tiny but real Qwen2.5-VL and Qwen3-VL checkpoints.

Nothing can be downloaded here, yet the trainer must exercise the exact loading path
that a real Qwen2.5-VL-7B (or Qwen3-VL-8B) directory takes. So we build one ourselves:

- the family's model class from a tiny config (random weights from a seed, a few M parameters);
- a byte-level BPE tokenizer trained locally with ``tokenizers`` that carries every
  special token the Qwen-VL models and their processors use;
- the family's chat template (Qwen2.5-VL's inserts a default system prompt, Qwen3-VL's does
  not) and image processor (patch 14, CLIP normalisation; patch 16, mean/std 0.5);

all written with ``save_pretrained`` and then laid out like the published
``*-Instruct`` folder (``publish_layout``): the same file names, the published
``preprocessor_config.json`` (Qwen2.5-VL's legacy ``min_pixels`` / ``max_pixels`` keys) and the
sampling values of the shipped ``generation_config.json``. Those files silently changed a
real run's pixel budget and sampling distribution, so the tests must
read a folder that carries them.

    python -m mgpo.tools.tiny build/tiny-qwen2.5-vl
    python -m mgpo.tools.tiny build/tiny-qwen3-vl --arch qwen3-vl
    python -m mgpo.tools.tiny build/qwen2.5-vl-3b-2l --arch qwen2.5-vl-3b --layers 2 --vision-depth 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..config import ConfigError
from ..runtime.archs import ARCHS, arch_config
from ..runtime.family import FAMILIES

MARKER = "MGPO_TINY.json"  # in every checkpoint this tool builds: only such a folder is ever replaced

# Qwen2.5-VL's special tokens, in the order (and so with the relative ids) the real
# tokenizer gives them. The ones the model or processor reads are checked in tests.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen2-VL chat template (the one Qwen2.5-VL ships): a default system prompt when
# none is given, <|vision_start|><|image_pad|><|vision_end|> per image, and
# "<|im_start|>assistant\n" as the generation prompt.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's chat template, reduced to what a conversation of system, user and assistant
# messages renders (the published one also renders tools and reasoning): no default system
# prompt, the system message only when given first, images as in Qwen2.5-VL, and
# "<|im_start|>assistant\n" as the generation prompt.
CHAT_TEMPLATE_QWEN3_VL = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% macro content_of(content) %}{% if content is string %}{{ content }}{% else %}"
    "{% for part in content %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endmacro %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ content_of(message['content']) }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the tokenizer is trained on: the method's own strings, JSON boxes, digits and
# some plain English, so the tiny model tokenizes our prompts into sensible pieces.
_CORPUS = [
    "You are a helpful assistant. Given an image and one question.",
    "First, identify the coordinates of the key image area relevant to solving the problem.",
    "Append the coordinates in JSON format at the end of your response and stop.",
    "This will trigger cropping of the corresponding area in the original image and enlarge it.",
    "Question: What is the color of the small triangle? The choices are listed below:",
    "(A) red\n(B) green\n(C) blue\n(D) yellow\n(E) white\n",
    "Is the circle on the left or right side of the square?",
    "Based on the provided coordinates, return the sub-image:",
    "Not providing correct coordinates or invalid coordinate values, return the original image:",
    "Carefully analyze both the original image and the enlarged sub-image to solve the question",
    "step by step. Present your reasoning clearly, and provide the final answer within \\boxed{}.",
    '```json\n[{"bbox_2d": [120, 48, 311, 209], "label": "the small red triangle"}]\n```',
    "The answer is \\boxed{A}. The answer is \\boxed{B}. \\boxed{C} \\boxed{D} \\boxed{E}",
    "0 1 2 3 4 5 6 7 8 9 10 28 56 100 256 512 1024 1280 2048 4032",
    "the a an of in on at to is are was left right top bottom object shape colour color",
]


def _train_tokenizer(vocab_size: int):
    """A byte-level BPE with Qwen2's pre-tokenizer, wrapped as a ``Qwen2Tokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(_CORPUS * 4, trainer=trainer)
    state = json.loads(raw.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.model_max_length = 32768
    return tokenizer


def tiny_config(tokenizer, *, hidden_size: int = 64, layers: int = 2, vision_depth: int = 2,
                family: str = "qwen2.5-vl"):
    """The family's config, small enough for a CPU test, wired to ``tokenizer``'s ids."""
    import transformers

    heads = 4
    head_dim = hidden_size // heads
    # mRoPE splits head_dim/2 frequencies across (temporal, height, width).
    half = head_dim // 2
    mrope_section = [half - 2 * (half // 4), half // 4, half // 4]
    assert sum(mrope_section) == half, "mrope_section must sum to head_dim / 2"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=vision_depth,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=hidden_size,  # the merger projects into the text width
    )
    if family == "qwen3-vl":  # patch 16, DeepStack from the last vision block, interleaved mRoPE
        text.update(head_dim=head_dim)
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(patch_size=16, deepstack_visual_indexes=[vision_depth - 1], hidden_act="gelu_pytorch_tanh")
    else:
        vision.update(fullatt_block_indexes=[vision_depth - 1], window_size=112)
    return getattr(transformers, FAMILIES[family].config_class)(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


# What the published Qwen2.5-VL-*-Instruct folders ship (read from the released files):
# a legacy image-processor file whose pixel keys override a `size=` argument in
# transformers 5.x, and a generation config tuned for chat, not for RL sampling.
PUBLISHED_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}
PUBLISHED_SAMPLING = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 1e-06, "top_p": 0.001,
                      "top_k": 1}
# Qwen3-VL-*-Instruct: the current image-processor file (``size`` keys, patch 16, mean/std 0.5) and
# chat sampling (top_k 20, top_p 0.8, temperature 0.7).
PUBLISHED_PREPROCESSOR_QWEN3_VL = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
PUBLISHED_SAMPLING_QWEN3_VL = {"do_sample": True, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.0,
                               "temperature": 0.7}
PUBLISHED = {"qwen2.5-vl": (PUBLISHED_PREPROCESSOR, PUBLISHED_SAMPLING, CHAT_TEMPLATE),
             "qwen3-vl": (PUBLISHED_PREPROCESSOR_QWEN3_VL, PUBLISHED_SAMPLING_QWEN3_VL, CHAT_TEMPLATE_QWEN3_VL)}


def publish_layout(folder: Path, tokenizer, family: str = "qwen2.5-vl") -> None:
    """Rewrite a ``save_pretrained`` folder into the published checkpoint's layout.

    Published: ``preprocessor_config.json`` (legacy pixel keys, no ``size``),
    ``chat_template.json``, ``vocab.json`` + ``merges.txt`` beside ``tokenizer.json``,
    and ``generation_config.json`` with the shipped sampling values. transformers 5.x
    writes one ``processor_config.json`` and a ``chat_template.jinja`` instead.
    """
    preprocessor, sampling, chat_template = PUBLISHED[family]
    processor_cfg = folder / "processor_config.json"
    if processor_cfg.exists():
        processor_cfg.unlink()
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    template = folder / "chat_template.jinja"
    if template.exists():
        template.unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}, indent=2) + "\n")
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    generation = {"bos_token_id": eos[1], "pad_token_id": eos[1], "eos_token_id": eos, **sampling}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def build_tiny_checkpoint(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    vocab_size: int = 1024,
    arch: str | None = None,
    vision_depth: int = 2,
) -> Path:
    """Write a tiny model + processor to ``out_dir`` and return the path. ``arch``: a family
    (``qwen2.5-vl``, the default, or ``qwen3-vl``) at tiny widths, or a published architecture
    (``mgpo.runtime.archs``) at its real widths and the given depths.

    The folder carries the published checkpoint's pixel keys (Qwen2.5-VL: 3,136 to 12,845,056 px):
    the pixel budget of a run is the config's ``model.min_pixels`` / ``max_pixels``,
    which ``mgpo.runtime.model.load_processor`` makes win over the folder's.
    """
    import transformers
    from transformers import Qwen2VLImageProcessor

    published = arch in ARCHS
    family = ARCHS[arch].family if published else (arch or "qwen2.5-vl")

    out = Path(out_dir)
    for folder in (out, out.with_name(out.name + ".tmp")):  # never delete a folder this tool did not build
        if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).is_file():
            raise ConfigError(f"{folder.resolve()} is not empty and is not a tiny checkpoint this tool built (no "
                              f"{MARKER}); building replaces the folder, so it refuses: choose a new or empty folder")
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{folder} is a file, not a folder: choose another output folder")
    tokenizer = _train_tokenizer(vocab_size)
    config = (arch_config(arch, layers=layers, vision_depth=vision_depth, tokenizer=tokenizer) if published
              else tiny_config(tokenizer, hidden_size=hidden_size, layers=layers, family=family))
    torch.manual_seed(seed)
    f = FAMILIES[family]
    model = getattr(transformers, f.model_class)(config).eval()
    preprocessor = PUBLISHED[family][0]
    image_processor = Qwen2VLImageProcessor(patch_size=f.patch, merge_size=f.merge,
                                            image_mean=preprocessor["image_mean"], image_std=preprocessor["image_std"])
    video_class = "Qwen3VLVideoProcessor" if family == "qwen3-vl" else "Qwen2VLVideoProcessor"
    processor = getattr(transformers, f.processor_class)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=getattr(transformers, video_class)(),
        chat_template=PUBLISHED[family][2],
    )
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    # Sharded like the published weights (model-0000k-of-0000n + an index file).
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="4GB" if published else "600KB")
    processor.save_pretrained(tmp)
    publish_layout(tmp, tokenizer, family)
    (tmp / MARKER).write_text(json.dumps({"seed": seed, "hidden_size": hidden_size, "layers": layers,
                                          "vocab_size": vocab_size, "family": family}) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)  # the folder appears whole or not at all
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mgpo.tools.tiny", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", choices=sorted(FAMILIES) + sorted(ARCHS), default=None,
                        help="a family at tiny widths (default qwen2.5-vl), or every width of a published model "
                             "(mgpo.runtime.archs) with only the depths reduced")
    parser.add_argument("--layers", type=int, default=2, help="language-model layers")
    parser.add_argument("--vision-depth", type=int, default=2, help="vision blocks (with --arch)")
    args = parser.parse_args(argv)
    if args.out_dir in (".", "..") or Path(args.out_dir).resolve() in (Path.cwd(), *Path.cwd().parents):
        parser.error(f"{args.out_dir}: the output folder must be a new folder, not the working folder or one above it")
    start = time.time()
    out = build_tiny_checkpoint(args.out_dir, seed=args.seed, layers=args.layers, arch=args.arch,
                                vision_depth=args.vision_depth)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    what = (f"{args.arch} widths, {args.layers} layers, {args.vision_depth} vision blocks" if args.arch in ARCHS
            else f"tiny {args.arch or 'qwen2.5-vl'}")
    print(f"checkpoint ({what}): {out} ({size / 1e6:.1f} MB, {time.time() - start:.1f} s)")


if __name__ == "__main__":
    from ..cli import run_main

    run_main(main)
