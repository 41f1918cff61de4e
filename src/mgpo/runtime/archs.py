"""The published Qwen2.5-VL and Qwen3-VL architectures, written once.

Every Qwen2.5-VL width below is copied from the ``config.json`` that Qwen published beside the
weights of ``Qwen2.5-VL-3B-Instruct`` and ``Qwen2.5-VL-7B-Instruct`` (text fields at the
top level, vision fields under ``vision_config``, ``mrope_section`` under
``rope_scaling``). Checked against verbatim copies of both files found in public
repositories (a model-card dump of the 3B config, and the 7B config as printed by a verl
run and as embedded in a diffusion pipeline's loader), which agree with each other. The
models built from this table have exactly the parameter counts reported for the loaded
published checkpoints (3,754,622,976 and 8,292,166,656; ``tests/runtime/test_memory.py``).
The Qwen3-VL-8B widths are those of ``Qwen3-VL-8B-Instruct``'s config.json, read from verbatim
copies in public model repositories (two independent uploads agree).

Nothing here downloads anything: ``mgpo.tools.tiny --arch`` builds these widths at reduced
depth with random weights (``arch_config``), and ``mgpo.runtime.memory`` sizes a launch of them on paper.

    >>> ARCHS["qwen2.5-vl-7b"].head_dim, ARCHS["qwen2.5-vl-3b"].head_dim
    (128, 128)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """One published configuration (field names follow its config.json)."""

    name: str
    source: str
    """Where the numbers come from."""
    family: str
    """``runtime.family`` name: which model class and config class build it."""
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
    out_hidden_size: int
    """The merger's output width, equal to the language model's hidden size."""
    window_size: int = 0
    """Qwen2.5-VL: window attention span in input pixels (112 = 8 patches of 14)."""
    fullatt_block_indexes: tuple[int, ...] = ()
    """Qwen2.5-VL: vision blocks with full attention; every other block attends within its window."""
    tokens_per_second: int = 0
    """Qwen2.5-VL: temporal mRoPE positions per second of video (unused for images)."""
    deepstack_visual_indexes: tuple[int, ...] = ()
    """Qwen3-VL: vision blocks whose features are added to the first decoder layers (DeepStack)."""
    num_position_embeddings: int = 0
    """Qwen3-VL: learned vision position embeddings (a 48 x 48 grid, interpolated)."""
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

    @property
    def factor(self) -> int:
        """Side of one image token in input pixels (patch x merge): 28, or 32 for Qwen3-VL."""
        return self.patch_size * self.spatial_merge_size

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
        name="qwen2.5-vl-3b", family="qwen2.5-vl",
        source="config.json of Qwen2.5-VL-3B-Instruct (as published by Qwen)",
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
        mrope_section=(16, 24, 24), max_position_embeddings=128000, rms_norm_eps=1e-6,
        out_hidden_size=2048, **_VISION),
    "qwen2.5-vl-7b": Arch(
        name="qwen2.5-vl-7b", family="qwen2.5-vl",
        source="config.json of Qwen2.5-VL-7B-Instruct (as published by Qwen)",
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rope_theta=1e6,
        mrope_section=(16, 24, 24), max_position_embeddings=128000, rms_norm_eps=1e-6,
        out_hidden_size=3584, **_VISION),
    "qwen3-vl-8b": Arch(
        name="qwen3-vl-8b", family="qwen3-vl",
        source="config.json of Qwen3-VL-8B-Instruct (public copies of the published file)",
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=151936, tie_word_embeddings=False, rope_theta=5e6,
        mrope_section=(24, 20, 20), max_position_embeddings=262144, rms_norm_eps=1e-6,
        vision_depth=27, vision_hidden_size=1152, vision_intermediate_size=4304, vision_num_heads=16,
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
        deepstack_visual_indexes=(8, 16, 24), num_position_embeddings=2304),
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


def reduced_deepstack(published: tuple[int, ...], depth: int) -> list[int]:
    """DeepStack's vision blocks at a reduced depth: the published ones that fit, else the last
    block (so the injection path runs in a 2-block tower).

    >>> reduced_deepstack((8, 16, 24), 27), reduced_deepstack((8, 16, 24), 2)
    ([8, 16, 24], [1])
    """
    return [i for i in published if i < depth] or [depth - 1]


def arch_config(arch: str, *, layers: int, vision_depth: int, tokenizer=None):
    """The family's config class with every width of a published model (``ARCHS``) and
    only the depths reduced; special-token ids are ``tokenizer``'s (else Qwen's own)."""
    import transformers

    from .family import FAMILIES

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
    )
    if a.family == "qwen3-vl":
        text.update(head_dim=a.head_dim)
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(deepstack_visual_indexes=reduced_deepstack(a.deepstack_visual_indexes, vision_depth),
                      num_position_embeddings=a.num_position_embeddings, hidden_act="gelu_pytorch_tanh")
    else:
        vision.update(window_size=a.window_size, tokens_per_second=a.tokens_per_second,
                      fullatt_block_indexes=reduced_fullatt(a.fullatt_block_indexes, vision_depth))
    return getattr(transformers, FAMILIES[a.family].config_class)(
        text_config=text, vision_config=vision, image_token_id=ids["image"], video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=a.tie_word_embeddings,
    )
