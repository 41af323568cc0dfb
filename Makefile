# spikeq: every target installs what it needs into a local .venv on first use.
#   make train GAME=Pong [MODEL=dsqn] [PRESET=paper] [STEPS=...] [SEED=0] [DEVICE=auto] [ARGS="--n-envs 4"]
#   make test | lint | format | bench | evaluate CKPT=runs/<run>/checkpoints/best.zip
#   make sweep SWEEP=experiments/sweeps/readouts.yaml [ARGS="--set wandb=offline"]
#   make minatar-study [ARGS="--games Breakout --seeds 0 --lanes 2"] | minatar-report
#   make minatar-robustness [ARGS="runs/minatar/MinAtar-Breakout-*-300k [--attacker RUN]"]
#   make minatar-timesteps [ARGS="experiments/results/minatar/MinAtar-Asterix-dsqn-s* [--num-steps 1 8 32]"]
# TORCH is the pip requirement installed before everything else. From PyPI on Linux x86-64 the pin is
# the CUDA build (several GB); for the CPU-only build, or one for your CUDA driver, name its index:
#   make clean install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.spikeq-installed

GAME ?= Pong
MODEL ?= dsqn
PRESET ?= paper
SEED ?= 0
DEVICE ?= auto
STEPS ?=
ARGS ?=

SWEEP ?= experiments/sweeps/dsqn_num_steps.yaml

.PHONY: install train test lint format bench evaluate sweep minatar-study minatar-report minatar-robustness minatar-timesteps clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[dev,bench]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/spikeq train --game $(GAME) --model $(MODEL) --preset $(PRESET) --seed $(SEED) \
		--device $(DEVICE) $(if $(STEPS),--steps $(STEPS)) $(ARGS)

test: $(STAMP) lint
	WANDB_MODE=offline $(BIN)/pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/ruff format --check src tests benchmarks experiments

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks experiments

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py $(ARGS)

evaluate: $(STAMP)
	$(BIN)/spikeq evaluate $(CKPT) $(ARGS)

sweep: $(STAMP)
	$(BIN)/spikeq sweep $(SWEEP) $(ARGS)

minatar-study: $(STAMP)
	WANDB_MODE=offline $(BIN)/python experiments/minatar_study.py $(ARGS)

minatar-report: $(STAMP)
	$(BIN)/python experiments/minatar_report.py $(ARGS)

minatar-robustness: $(STAMP)
	$(BIN)/python experiments/minatar_robustness.py $(ARGS)

minatar-timesteps: $(STAMP)
	$(BIN)/python experiments/minatar_timesteps.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
