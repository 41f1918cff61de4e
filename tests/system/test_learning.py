"""The trainer learns: a short MGPO run from the embedded base model raises the training
reward well above where the base starts; the same run with a broken trainer (advantages
negated) does not.

The base model is built once (``python -m mgpo.tools.base``, as ``make base`` does: the colours
task, greedy test accuracy 48.4%, about 0.34-0.56 mean reward in the first sampled steps) and each
run goes through tests/train_worker.py with configs/tiny_colours.yaml at ``train.lr=5e-4``, 30
optimizer steps of 4 prompts x 8 samples.

Statistic: the mean training reward over the last 10 of the 30 steps (320 trajectories), which
averages out the step-to-step noise of one rollout batch (32 trajectories: +-0.1). The earlier
statistic, last three steps minus the first three at the config's lr 1e-3, was not robust: with
torch's kernels forced to another CPU level (``ATEN_CPU_CAPABILITY=default`` or ``avx2``, which
stand in for another machine) seed 0's run collapses after step 22 (turn 1 runs to its token
limit, the box and then the reward vanish: rise -0.38 and -0.21, against +0.26 on this machine's
AVX-512 kernels). At lr 5e-4 the same seed learns at every kernel level (0.603 / 0.609 / 0.609).

Measured (``python tests/train_worker.py OUT --config configs/tiny_colours.yaml model.path=BASE/model
data.train=BASE/data/train.jsonl train.max_steps=30 train.log_every=1 train.lr=5e-4
train.seed=S [--negate-advantages | --shuffle-advantages]``, OMP_NUM_THREADS=1 unless noted),
mean reward of the last 10 steps:

- working, 11 runs: 0.547, 0.553, 0.594, 0.603, 0.603, 0.609, 0.609, 0.622, 0.622, 0.700, 0.759
  (seeds 0-4; seed 0 also with OMP_NUM_THREADS=2 and at kernel levels default and avx2, seed 1
  at level default, seed 2 at level avx2, seed 3 beside a busy loop on the other core; the
  same seed gives the same figure within 0.06 whatever the threads, kernels or load)
- advantages negated, 5 runs (seeds 0-4): 0.000 in every run (the reward is 0 from step 2-4 on)
- advantages shuffled across the batch (credit given to the wrong trajectories), 5 runs
  (seeds 0-4): 0.000, 0.000, 0.013, 0.006, 0.006

MARGIN = 0.45 sits between the highest broken run (0.013) and the lowest working one (0.547),
and above where the base starts, so a pass means the reward was raised, not kept.
"""

import json
import subprocess
import sys

import pytest
from launch import ROOT, WORKER, _env

pytestmark = [pytest.mark.slow, pytest.mark.heavy]
STEPS = 30
WINDOW = 10  # the last optimizer steps averaged
LR = "5e-4"  # the config's 1e-3 collapses some seeds within 30 steps (see the module docstring)
MARGIN = 0.45  # chosen from the measured distributions (see the module docstring)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "base"
    proc = subprocess.run([sys.executable, "-m", "mgpo.tools.base", str(out)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def late_reward(tmp_path, base, name, *flags, seed=0) -> float:
    """Mean training reward over the last WINDOW steps of a STEPS-step run."""
    out = tmp_path / name
    cmd = [sys.executable, str(WORKER), str(tmp_path / f"rec-{name}.json"), "--config", "configs/tiny_colours.yaml",
           *flags, f"model.path={base / 'model'}", f"data.train={base / 'data' / 'train.jsonl'}",
           f"train.output_dir={out}", f"train.max_steps={STEPS}", f"train.seed={seed}", f"train.lr={LR}",
           "train.save_every=1000", "train.log_every=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rewards = [json.loads(line)["reward/mean"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rewards) == STEPS
    return sum(rewards[-WINDOW:]) / WINDOW


def test_mgpo_raises_the_reward_and_a_broken_trainer_does_not(tmp_path, base):
    working = late_reward(tmp_path, base, "mgpo")
    broken = late_reward(tmp_path, base, "negated", "--negate-advantages")
    assert working >= MARGIN, f"mean reward of the last {WINDOW} of {STEPS} steps {working:.3f} < {MARGIN}"
    assert broken < MARGIN, f"a trainer with negated advantages reached {broken:.3f} over its last {WINDOW} steps"
