"""The published Qwen2.5-VL architectures, written once.

Every width below is copied from the ``config.json`` that Qwen published beside the
weights of ``Qwen2.5-VL-3B-Instruct`` and ``Qwen2.5-VL-7B-Instruct`` (text fields at the
top level, vision fields under ``vision_config``, ``mrope_section`` under
``rope_scaling``). Checked against verbatim copies of both files found in public
repositories (a model-card dump of the 3B config, and the 7B config as printed by a verl
run and as embedded in a diffusion pipeline's loader), which agree with each other. The
models built from this table have exactly the parameter counts reported for the loaded
published checkpoints (3,754,622,976 and 8,292,166,656; ``tests/runtime/test_memory.py``).

Nothing here downloads anything: ``mgpo.tools.tiny --arch`` builds these widths at reduced
depth with random weights (``arch_config``), and ``mgpo.runtime.memory`` sizes a launch of them on paper.

    >>> ARCHS["qwen2.5-vl-7b"].head_dim, ARCHS["qwen2.5-vl-3b"].head_dim
    (128, 128)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """One published Qwen2.5-VL configuration (field names follow its config.json)."""

    name: str
    source: str
    """Where the numbers come from."""
    # ---- language model
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    mrope_section: tuple[int, int, int]
    """Rotary frequencies given to (temporal, height, width); sums to head_dim / 2."""
    max_position_embeddings: int
    rms_norm_eps: float
    # ---- vision tower (vision_config)
    vision_depth: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_num_heads: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    window_size: int
    """Window attention span in input pixels (112 = 8 patches of 14)."""
    fullatt_block_indexes: tuple[int, ...]
    """Vision blocks with full attention; every other block attends within its window."""
    out_hidden_size: int
    """The merger's output width, equal to the language model's hidden size."""
    tokens_per_second: int
    """Temporal mRoPE positions per second of video (unused for images)."""
    # ---- special token ids of the published tokenizer
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    image_token_id: int = 151655
    video_token_id: int = 151656

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        assert self.hidden_size % self.num_attention_heads == 0, "heads must divide the hidden size"
        assert sum(self.mrope_section) * 2 == self.head_dim, "mrope_section must sum to head_dim / 2"
        assert self.out_hidden_size == self.hidden_size, "the merger projects into the text width"


_VISION = dict(  # identical in both published configs
    vision_depth=32, vision_hidden_size=1280, vision_intermediate_size=3420, vision_num_heads=16,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
    fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2,
)

ARCHS: dict[str, Arch] = {
    "qwen2.5-vl-3b": Arch(
        name="qwen2.5-vl-3b",
        source="config.json of Qwen2.5-VL-3B-Instruct (as published by Qwen)",
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
        mrope_section=(16, 24, 24), max_position_embeddings=128000, rms_norm_eps=1e-6,
        out_hidden_size=2048, **_VISION),
    "qwen2.5-vl-7b": Arch(
        name="qwen2.5-vl-7b",
        source="config.json of Qwen2.5-VL-7B-Instruct (as published by Qwen)",
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rope_theta=1e6,
        mrope_section=(16, 24, 24), max_position_embeddings=128000, rms_norm_eps=1e-6,
        out_hidden_size=3584, **_VISION),
}


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHS)}")
    return ARCHS[name]


def reduced_fullatt(published: tuple[int, ...], depth: int) -> list[int]:
    """Full-attention vision blocks at a reduced depth.

    The published pattern ends every span of 8 blocks with a full-attention block, the
    last block included. At a smaller depth we keep the published indexes that still fit
    and make the last block full, so a 2-block tower has one windowed and one full block
    (both code paths run).

    >>> reduced_fullatt((7, 15, 23, 31), 32), reduced_fullatt((7, 15, 23, 31), 2)
    ([7, 15, 23, 31], [1])
    >>> reduced_fullatt((7, 15, 23, 31), 12)
    [7, 11]
    """
    assert depth >= 1, "the vision tower needs at least one block"
    return [i for i in published if i < depth - 1] + [depth - 1]


def arch_config(arch: str, *, layers: int, vision_depth: int, tokenizer=None):
    """A Qwen2_5_VLConfig with every width of a published model (``ARCHS``) and
    only the depths reduced; special-token ids are ``tokenizer``'s (else Qwen's own)."""
    from transformers import Qwen2_5_VLConfig

    a = get_arch(arch)
    ids = {"bos": a.bos_token_id, "eos": a.eos_token_id, "image": a.image_token_id, "video": a.video_token_id,
           "vision_start": a.vision_start_token_id, "vision_end": a.vision_end_token_id}
    if tokenizer is not None:
        assert len(tokenizer) <= a.vocab_size, "the embedding must cover every tokenizer id"
        names = {"bos": "<|endoftext|>", "eos": "<|im_end|>", "image": "<|image_pad|>", "video": "<|video_pad|>",
                 "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"}
        ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in names.items()}
    text = dict(
        vocab_size=a.vocab_size,  # the real embedding size; our tokenizer uses its first ~1k rows
        hidden_size=a.hidden_size, intermediate_size=a.intermediate_size, num_hidden_layers=layers,
        num_attention_heads=a.num_attention_heads, num_key_value_heads=a.num_key_value_heads,
        max_position_embeddings=a.max_position_embeddings, rms_norm_eps=a.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta, "mrope_section": list(a.mrope_section)},
        tie_word_embeddings=a.tie_word_embeddings,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["bos"],
    )
    vision = dict(
        depth=vision_depth, hidden_size=a.vision_hidden_size, intermediate_size=a.vision_intermediate_size,
        num_heads=a.vision_num_heads, out_hidden_size=a.out_hidden_size, patch_size=a.patch_size,
        spatial_merge_size=a.spatial_merge_size, temporal_patch_size=a.temporal_patch_size,
        window_size=a.window_size, tokens_per_second=a.tokens_per_second, fullatt_block_indexes=reduced_fullatt(a.fullatt_block_indexes, vision_depth),
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["image"], video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=a.tie_word_embeddings,
    )
