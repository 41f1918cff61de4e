# MGPO. Only `make install`, `make demo` and `make test` install (so a fresh clone needs
# nothing but `make demo` or `make test`), and `make bench` adds TRL, the peer it measures
# against, to an installed .venv; every other target checks the virtual
# environment and, when it is missing or older than requirements.txt / pyproject.toml,
# says "run make install" instead of running pip behind your back.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TINY := build/tiny-qwen2.5-vl
SYNTH := build/synth
BASE := build/base
BEACON := build/beacon
NESTED := build/nested
BUDGETS := build/budgets
CONFIG ?= configs/tiny_cpu.yaml
# The demo's model family: qwen2.5-vl (the paper's), or qwen3-vl (`make demo FAMILY=qwen3-vl`)
FAMILY ?= qwen2.5-vl
ifeq ($(FAMILY),qwen2.5-vl)
DEMO := build/demo
DEMO_CONFIG ?= configs/demo.yaml
DEMO_RUN := runs/demo
else
DEMO := build/demo-$(FAMILY)
DEMO_CONFIG ?= configs/demo_$(subst -,_,$(subst .,_,$(FAMILY))).yaml
DEMO_RUN := runs/demo-$(FAMILY)
endif
export PYTHONWARNINGS ?= ignore::FutureWarning,ignore::DeprecationWarning
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/build/torch_extensions

.PHONY: install test test-heavy test-fast demo train eval bench gpu-check lint clean tiny synth base beacon nested demo-base budgets repro repro-nested repro-budgets repro-objectives

install: $(STAMP)

# The goals allowed to (re)install; `make` with no goal means `make install`.
INSTALL_GOALS := install demo test
INSTALLING := $(if $(MAKECMDGOALS),$(filter $(INSTALL_GOALS),$(MAKECMDGOALS)),install)

# Re-runs only when the requirements or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
ifeq ($(INSTALLING),)
	@echo "$(VENV) is missing or older than requirements.txt / pyproject.toml: run \`make install\` first" >&2
	@exit 1
else
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)
endif

tiny: $(TINY)/config.json
$(TINY)/config.json: | $(STAMP)
	$(PY) -m mgpo.tools.tiny $(TINY)

synth: $(SYNTH)/train.jsonl $(SYNTH)/test.jsonl
$(SYNTH)/train.jsonl: | $(STAMP)
	$(PY) -m mgpo.tools.synth $(SYNTH) --n 64 --seed 0 --split train
$(SYNTH)/test.jsonl: | $(STAMP)
	$(PY) -m mgpo.tools.synth $(SYNTH) --n 32 --seed 1 --split test

# The embedded base model: a warm-started tiny Qwen2.5-VL (SFT on the colours task), see
# src/mgpo/tools/base.py. Deterministic; rebuilt only when missing.
base: $(BASE)/base.json
$(BASE)/base.json: | $(STAMP)
	$(PY) -m mgpo.tools.base $(BASE)

# The base model of the grounding experiment (src/mgpo/tools/beacon.py; the MGPO and the one-turn
# GRPO conversations), ~6.5 minutes on 2 cores.
beacon: $(BEACON)/base.json
$(BEACON)/base.json: | $(STAMP)
	$(PY) -m mgpo.tools.base $(BEACON) --task beacon

# The base model of the K-turn experiment (the nested beacon: two zooms needed), ~15 minutes.
nested: $(NESTED)/base.json
$(NESTED)/base.json: | $(STAMP)
	$(PY) -m mgpo.tools.base $(NESTED) --task nested

# The miniature reproduction (src/mgpo/tools/repro.py): MGPO from the colours base over 3 seeds;
# then from the beacon base MGPO, the one-turn GRPO baseline and SFT on the answers only, 3
# seeds each, evaluated every 30 steps, with the paper's Table 3 and the counterfactual crops;
# writes docs/reproduction.md and its figures. The bases included (built when missing).
repro: $(STAMP) base beacon
	$(PY) -m mgpo.tools.repro --seeds 0 1 2 --steps 60
	$(PY) -m mgpo.tools.repro --task beacon --seeds 0 1 2 --steps 60 --eval-every 30 --counterfactuals

# The objectives beside MGPO's on the beacon task (GSPO's sequence ratio, GMPO's geometric one,
# Dr. GRPO's unscaled advantages), 3 seeds each; each rollout batch feeds two optimizer steps, so the
# ratios depart from 1 (with one step per batch the ratio objectives all train as PPO's).
repro-objectives: $(STAMP) beacon
	$(PY) -m mgpo.tools.repro --task beacon --methods mgpo mgpo_seq mgpo_geo mgpo_noscale --block objectives \
		--seeds 0 1 2 --steps 60 --eval-every 30 --set train.prompts_per_rollout=16

# The paper's Table 2 in miniature: MGPO and GRPO at three pixel budgets (the beacon scene at
# 1x, 2x and 4x the model's view), from one base, 3 seeds each.
budgets: $(BUDGETS)/base.json
$(BUDGETS)/base.json: | $(STAMP)
	$(PY) -m mgpo.tools.base $(BUDGETS) --task budgets

repro-budgets: $(STAMP) budgets
	$(PY) -m mgpo.tools.repro --task budgets --seeds 0 1 2 --steps 40

# Beyond the paper: K = 3 against K = 2 turns of mgpo_k on the nested beacon, 3 seeds.
repro-nested: $(STAMP) nested
	$(PY) -m mgpo.tools.repro --task nested --seeds 0 1 2 --steps 200 --eval-every 50

# Two pytest workers (pytest-xdist): most cases wait on one process's start-up or decoding,
# so two share 2 cores well; TEST_WORKERS=0 runs them in this process, one after another.
# `make test` leaves out the two heaviest cases (marker `heavy`: the learning test and the real
# widths, about 7 minutes of one core together); `make test-heavy` runs them; CI runs both.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not heavy"

test-heavy: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m heavy

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

# The main job on the embedded default: build (or reuse) the demo's base model (the beacon task,
# ~2.3 minutes), train it with MGPO for 30 steps (the answer reward only; watch the turn-1 box
# find the target), evaluate the result (a rerun reuses the predictions of the same checkpoint),
# show one two-turn rollout and the before/after table. 3.5 minutes on 2 cores.
demo-base: $(DEMO)/base.json
$(DEMO)/base.json: | $(STAMP)
	$(PY) -m mgpo.tools.base $(DEMO) --task demo --family $(FAMILY)

demo: $(STAMP) demo-base
	@echo "demo: base model $(DEMO) is built (rm -rf $(DEMO) rebuilds it); a finished run in $(DEMO_RUN) is not retrained"
	$(PY) train.py --config $(DEMO_CONFIG) $(ARGS)
	$(PY) eval.py --config $(DEMO_CONFIG) eval.overwrite=true
	$(PY) -m mgpo.tools.demo --config $(DEMO_CONFIG) --from-run --before $(DEMO)/base.json
	@echo "demo done: TensorBoard logs and checkpoints in $(DEMO_RUN), report in $(DEMO_RUN)/eval/report.html"

train: $(STAMP) tiny synth
	$(PY) train.py --config $(CONFIG) $(ARGS)

# `make eval` evaluates what `make demo` trained (runs/demo's newest checkpoint, under the demo's
# config) once it exists, else the tiny model on the synthetic test set (configs/tiny_cpu.yaml).
# `make eval MODEL=/models/ckpt DATA=/data/vstar_bench`: the protocol comes from the model (eval.py):
# a checkpoint written by train.py is evaluated under its run's settings, any other folder under the
# paper's protocol (configs/eval_qwen2_5_vl_7b.yaml); CONFIG= names a preset instead. A MODEL under
# build/ or runs/tiny_* is one of the project's own tiny models and keeps CONFIG's default.
EVAL_DEFAULT := $(if $(wildcard runs/demo/checkpoint-*/COMPLETE),$(DEMO_CONFIG),$(CONFIG))
EVAL_CONFIG := $(if $(filter file,$(origin CONFIG)),$(if $(MODEL),$(if $(filter build/% ./build/% runs/tiny_% ./runs/tiny_%,$(MODEL)),$(CONFIG)),$(EVAL_DEFAULT)),$(CONFIG))
eval: $(STAMP) $(if $(filter $(CONFIG),$(EVAL_CONFIG)),tiny synth)
	$(PY) eval.py $(if $(EVAL_CONFIG),--config $(EVAL_CONFIG)) $(if $(MODEL),model.path=$(MODEL)) $(if $(DATA),eval.datasets=[$(DATA)]) $(ARGS)

# TRL is installed here only, as the peer to measure against; the trainer never imports it.
# The figures of this machine replace those in $(BENCH_OUT) (BENCH_OUT=... writes elsewhere).
BENCH_OUT ?= docs/benchmarks.md
bench: $(STAMP)
	$(PY) -m pip install --quiet --no-deps "trl==1.16.0"
	$(PY) -m mgpo.tools.bench --out $(BENCH_OUT)
	$(PY) -m mgpo.tools.bench_checkpoint --out $(BENCH_OUT)

# On a machine with one CUDA GPU: one MGPO step plain, with LoRA and under ZeRO-3 (tiny model and
# the 7B widths at 2 layers), generation speed and memory per phase beside the plan; writes
# docs/gpu-check.md. Refuses in one line without a GPU.
gpu-check: $(STAMP)
	$(PY) -m mgpo.tools.gpu_check

lint: $(STAMP)
	$(PY) -m ruff check src tests train.py eval.py

clean:
	rm -rf build runs .pytest_cache .ruff_cache
