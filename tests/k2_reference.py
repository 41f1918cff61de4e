"""The paper's two-turn rollout, recorded: ``rollout.max_turns = 2`` must reproduce these
token for token. The reference was written by the code before the K-turn loop
existed; regenerate it only when the two-turn rollout is meant to change:

    PYTHONPATH=src python tests/k2_reference.py tests/fixtures/k2_reference.json
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import ScriptedModel  # noqa: E402

from mgpo.config import RolloutConfig  # noqa: E402
from mgpo.core.rollout import rollout  # noqa: E402

MIN_PX, MAX_PX = 64 * 28 * 28, 256 * 28 * 28
# x2 = 400 fits the 588-px-wide input of samples[0] and not the 364-px one of samples[1].
BOX = '```json\n[{"bbox_2d": [30, 30, 400, 200]}]\n``` trailing words'

RUNS = {  # name: (seed, greedy, scripted, rollout overrides)
    "sampled-optimized": (0, False, False, dict(group_size=2, max_new_tokens_turn1=24, max_new_tokens_turn2=16)),
    "sampled-naive": (1, False, False, dict(group_size=2, max_new_tokens_turn1=24, max_new_tokens_turn2=16,
                                            shared_prefill=False, continue_turn2=False)),
    "scripted-boxes": (2, False, True, dict(group_size=3, max_new_tokens_turn1=64, max_new_tokens_turn2=12)),
    "greedy-chunked": (3, True, True, dict(group_size=2, max_new_tokens_turn1=64, max_new_tokens_turn2=10,
                                           generation_batch_size=1)),
}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest()


def summarize(r) -> dict:
    """Everything a rollout hands to training, in JSON: ids, masks, texts, images, log-probs."""
    n = r.attention_mask.sum(dim=1).tolist()
    return {
        "input_ids": [r.input_ids[i, :k].tolist() for i, k in enumerate(n)],
        "loss_mask": [r.loss_mask[i, :k].int().tolist() for i, k in enumerate(n)],
        "mm_token_type_ids": [r.mm_token_type_ids[i, :k].tolist() for i, k in enumerate(n)],
        "image_index": r.image_index,
        "pixel_values": _digest(r.pixel_values),
        "grids": r.image_grid_thw.tolist(),
        "texts": [[t.turn1_text, t.turn2_text, t.final_text] for t in r.trajectories],
        "boxes": [[t.box_input, t.box_original, t.valid, t.box_problem, list(t.crop_size or ())]
                  for t in r.trajectories],
        "lengths": [[t.turn1_tokens, t.turn2_tokens, t.turn1_truncated, t.turn2_truncated] for t in r.trajectories],
        "sample_logp": None if r.sample_logp is None else [
            [None if v != v else round(v, 5) for v in r.sample_logp[i, :k].tolist()] for i, k in enumerate(n)],
    }


def run_all(model, processor, samples, **extra) -> dict:
    out = {}
    for name, (seed, greedy, scripted, kw) in RUNS.items():
        m = ScriptedModel(model, processor.tokenizer, [BOX, None]) if scripted else model
        torch.manual_seed(seed)
        r = rollout(m, processor, samples[:3], RolloutConfig(**kw, **extra), min_pixels=MIN_PX, max_pixels=MAX_PX,
                    greedy=greedy, record_logprobs=True)
        out[name] = summarize(r)
    return out


if __name__ == "__main__":
    import tempfile

    from mgpo.config import ModelConfig
    from mgpo.data.samples import load_samples
    from mgpo.runtime.model import load_model, load_processor
    from mgpo.tools.synth import build_synth
    from mgpo.tools.tiny import build_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp())
    tiny = build_tiny_checkpoint(tmp / "tiny-qwen2.5-vl", seed=0)
    build_synth(tmp / "synth", n=12, seed=0, split="train")
    mcfg = ModelConfig(path=str(tiny), min_pixels=MIN_PX, max_pixels=MAX_PX, dtype="float32")
    ref = run_all(load_model(mcfg), load_processor(mcfg), list(load_samples(tmp / "synth" / "train.jsonl")))
    Path(sys.argv[1]).write_text(json.dumps(ref, separators=(",", ":")) + "\n")
