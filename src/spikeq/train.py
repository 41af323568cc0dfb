"""Run an Atari experiment: the paper's protocol for DSQN and its baselines, with resume.

config -> envs (train: life loss ends episodes, clipped rewards; eval: full game, raw score)
       -> SB3 DQN (SpikingPolicy | CnnPolicy, frame-deduplicated replay)
       -> every eval_freq steps: evaluate (eval_episodes at eval_epsilon), keep the best weights
       -> every checkpoint_freq steps, and on SIGINT/SIGTERM: checkpoint
       -> at the end: the best weights re-evaluated, with energy per action: the run's result
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.utils import LinearSchedule
from tqdm.auto import tqdm

from spikeq import checkpoints, games
from spikeq.config import OPTIMIZERS, ConfigError, TrainConfig
from spikeq.evaluate import evaluate_model
from spikeq.network import DEFAULT_GRID_ARCH, MinAtarCNN
from spikeq.replay import FrameReplayBuffer
from spikeq.report import plot_runs
from spikeq.tracking import FiringMonitor, Tracker

EVAL_COLUMNS = ("step", "score_mean", "score_std", "score_min", "score_max", "episodes", "human_normalized")


class EvaluationInterrupted(Exception):
    """A signal arrived while an evaluation was running; the evaluation is dropped and redone later."""


@dataclass
class RunResult:
    """How a run ended.

    :param run_dir: the run directory
    :param status: ``finished``, ``interrupted`` or ``failed``
    :param num_timesteps: agent steps done
    :param message: what happened, for the console
    :param result: the final evaluation (``finished`` only)
    """

    run_dir: Path
    status: str
    num_timesteps: int
    message: str
    result: dict[str, Any] | None = None
    signal_number: int | None = None

    @property
    def exit_code(self) -> int:
        """0 finished, 128 + signal when interrupted, 1 failed."""
        if self.status == "finished":
            return 0
        return 128 + self.signal_number if self.signal_number else 1


def run_name(config: TrainConfig) -> str:
    """``<game>-<model>-s<seed>-<YYYYmmdd-HHMMSS>`` (``MinAtar/Breakout`` -> ``MinAtar-Breakout``)."""
    game = games.file_safe_name(config.game)
    return f"{game}-{config.model}-s{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(config: TrainConfig, run_dir: Path | None, force: bool) -> Path:
    """Create the run directory, refusing to overwrite an existing one unless ``force``."""
    run_dir = Path(run_dir) if run_dir else Path(config.out_dir) / run_name(config)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise ConfigError(
                f"run directory {run_dir} already exists; resume it with --resume {run_dir}, "
                "or pass --force to overwrite it"
            )
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"cannot write to output directory {run_dir}: {error.strerror}") from None
    return run_dir


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``; other names are checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
    return device


def sb3_update_schedule(train_freq: int, gradient_steps: int, n_envs: int) -> tuple[int, int]:
    """SB3's (train_freq, gradient_steps) for ``gradient_steps`` updates every ``train_freq`` agent steps.

    SB3 counts train_freq in vector steps, each ``n_envs`` agent steps: with 8 envs, train_freq=4
    would update once per 32 agent steps. Here the ratio of updates to agent steps stays the
    config's whatever the number of envs: e.g. 8 envs, 1 update every 4 agent steps -> 2 updates after
    every vector step.
    """
    common = math.gcd(train_freq, n_envs)
    return train_freq // common, gradient_steps * (n_envs // common)


def build_model(config: TrainConfig, env, device: str) -> DQN:
    """The SB3 DQN of ``config`` on ``env``: SpikingPolicy for the DSQN models; for ``dqn`` SB3's
    CnnPolicy on Atari frames (the Nature torso) and MlpPolicy over :class:`MinAtarCNN` on MinAtar
    grids (the MinAtar torso), so that every model of a game has the same torso."""
    train_freq, gradient_steps = sb3_update_schedule(config.train_freq, config.gradient_steps, env.num_envs)
    minatar = games.is_minatar(config.game)
    policy_kwargs: dict[str, Any] = dict(optimizer_class=OPTIMIZERS[config.optimizer][0])
    policy_kwargs["optimizer_kwargs"] = dict(OPTIMIZERS[config.optimizer][1])
    if config.spiking:
        policy = "SpikingPolicy"
        policy_kwargs.update({k: v for k, v in config.network_spec().to_kwargs().items() if k != "net_arch"})
    elif minatar:
        policy = "MlpPolicy"
        policy_kwargs.update(features_extractor_class=MinAtarCNN, net_arch=list(DEFAULT_GRID_ARCH))
    else:
        policy = "CnnPolicy"
    return DQN(
        policy,
        env,
        learning_rate=config.learning_rate,
        buffer_size=config.buffer_size,
        learning_starts=config.learning_starts,
        batch_size=config.batch_size,
        tau=1.0,
        gamma=config.gamma,
        train_freq=train_freq,
        gradient_steps=gradient_steps,
        # Frame de-duplication is for Atari's stacks of 84x84 frames; MinAtar grids are small.
        replay_buffer_class=FrameReplayBuffer if config.frame_replay and not minatar else None,
        replay_buffer_kwargs=dict(handle_timeout_termination=config.bootstrap_time_limit),
        target_update_interval=config.target_update_interval,
        exploration_fraction=min(1.0, config.exploration_steps / config.steps),
        exploration_initial_eps=config.exploration_initial_eps,
        exploration_final_eps=config.exploration_final_eps,
        max_grad_norm=config.max_grad_norm,
        policy_kwargs=policy_kwargs,
        seed=config.seed,
        device=device,
        verbose=0,
    )


def is_new_best(score: float, best: float | None) -> bool:
    """Whether an evaluation's mean score replaces the best weights: it is at least as good (of two
    equal scores the later weights are kept, as the reference code's ``<=`` does)."""
    return best is None or score >= best


def read_eval_rows(path: Path) -> list[dict[str, str]]:
    """The rows of ``eval.csv`` (empty when there is none)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_eval_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``eval.csv`` with ``rows``."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=EVAL_COLUMNS)
        writer.writeheader()
        writer.writerows({k: row.get(k) for k in EVAL_COLUMNS} for row in rows)


class Trainer:
    """One run: owns the run directory, the model, the envs, tracking and the schedule.

    :param config: the validated config
    :param run_dir: the run directory (created by ``prepare_run_dir``)
    :param resume: continue from ``run_dir``'s latest checkpoint
    """

    def __init__(self, config: TrainConfig, run_dir: Path, resume: bool = False) -> None:
        self.config = config
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.eval_csv = run_dir / "eval.csv"
        self.env_id = games.resolve_game(config.game)
        self.game = games.game_short_name(self.env_id)
        self.device = resolve_device(config.device)
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.stop_signal: int | None = None
        self.in_evaluation = False
        self.failure: str | None = None
        self.state: dict[str, Any] = {"best_score": None, "best_step": None, "wandb_id": None}

        checkpoint = checkpoints.latest_checkpoint(self.ckpt_dir) if resume else None
        if resume and checkpoint is None:
            raise ConfigError(f"no checkpoint to resume in {self.ckpt_dir}")
        # A resumed run starts new episodes: ALE emulator states are not checkpointed.
        step0 = 0 if checkpoint is None else int(checkpoint.name.removeprefix("step-"))
        self.train_env = games.make_env(
            self.env_id,
            n_envs=config.n_envs,
            seed=config.seed + step0,
            train=True,
            max_episode_steps=config.max_episode_steps,
            vec_env=config.vec_env,
        )
        self.eval_env = games.make_env(
            self.env_id, n_envs=1, seed=config.seed + 10_000 + step0, train=False,
            max_episode_steps=config.max_episode_steps,
        )  # fmt: skip
        if checkpoint is None:
            self.model = build_model(config, self.train_env, self.device)
        else:
            self.model = self._load_for_resume(checkpoint)
        self.tracker = Tracker(
            run_dir,
            config.to_dict(),
            mode=config.wandb,
            project=config.wandb_project,
            name=run_dir.name,
            tags=[self.game, config.model, *config.tags],
            run_id=self.state.get("wandb_id"),
        )
        self.state["wandb_id"] = self.tracker.run_id
        self.model.set_logger(self.tracker.logger)

    def _load_for_resume(self, checkpoint: Path) -> DQN:
        try:
            model, state = checkpoints.load_checkpoint(checkpoint, self.train_env, self.device)
        except (ValueError, KeyError) as error:
            raise ConfigError(
                f"checkpoint {checkpoint} does not fit {self.env_id}: {str(error).splitlines()[0]}"
            ) from None
        self.state.update(state)
        # The step budget may have been extended: epsilon still decays over exploration_steps.
        model.exploration_fraction = min(1.0, self.config.exploration_steps / self.config.steps)
        model.exploration_schedule = LinearSchedule(
            model.exploration_initial_eps, model.exploration_final_eps, model.exploration_fraction
        )
        # Rows written after this checkpoint were never covered by it: they are redone.
        rows = [r for r in read_eval_rows(self.eval_csv) if int(r["step"]) <= model.num_timesteps]
        write_eval_rows(self.eval_csv, rows)
        if (
            model.replay_buffer.size() < self.config.batch_size
            and model.num_timesteps > model.learning_starts
        ):
            # No saved replay: refill it before training resumes.
            model.learning_starts = model.num_timesteps + self.config.learning_starts
        return model

    # --- schedule ---------------------------------------------------------------------------------
    def _due(self, every: int, last_key: str) -> bool:
        return self.model.num_timesteps // every > self.state.get(last_key, 0) // every

    def on_step(self) -> bool:
        """Called by SB3 after every vectorised env step; False stops ``learn``."""
        loss = self.model.logger.name_to_value.get("train/loss")
        if loss is not None and not math.isfinite(loss):
            self.failure = (
                f"training loss became {loss} at step {self.model.num_timesteps}; stopped without "
                "saving, the last good checkpoint is kept (try a lower learning_rate or max_grad_norm)"
            )
            return False
        if self.stop_signal is not None:
            return False
        if self._due(self.config.eval_freq, "last_eval_step"):
            try:
                self.evaluate_now()
            except EvaluationInterrupted:
                return False
        if self._due(self.config.checkpoint_freq, "last_checkpoint_step"):
            self.checkpoint()
        # SB3 collects train_freq steps at a time; a resumed run must still end exactly at `steps`.
        return self.model.num_timesteps < self.config.steps

    def evaluate_now(self) -> dict[str, Any]:
        """Evaluate the current weights, append a row to ``eval.csv``, keep them if they are the best."""
        self.in_evaluation = True
        try:
            result = evaluate_model(
                self.model,
                self.eval_env,
                n_episodes=self.config.eval_episodes,
                epsilon=self.config.eval_epsilon,
                seed=self.config.seed + self.model.num_timesteps,
                game=self.game,
                energy=False,
                progress=False,
            )
        finally:
            self.in_evaluation = False
        step = self.model.num_timesteps
        row = {"step": step, **{k: result[k] for k in EVAL_COLUMNS if k != "step"}}
        write_eval_rows(self.eval_csv, [*read_eval_rows(self.eval_csv), row])
        plot_runs([self.run_dir], self.run_dir / "eval.png")
        self.state["last_eval_step"] = step
        best = self.state.get("best_score")
        if is_new_best(result["score_mean"], best):
            self.state.update(best_score=result["score_mean"], best_step=step)
            self.model.save(self.ckpt_dir / "best.zip")
            checkpoints.export_weights(self.model, self.ckpt_dir / "best", self.config.to_dict())
        for key in ("score_mean", "score_std", "score_max", "human_normalized"):
            if result[key] is not None:
                self.model.logger.record(f"eval/{key}", result[key])
        self.model.logger.record("eval/best_score", self.state["best_score"])
        self.model.logger.dump(step)
        tqdm.write(
            f"[eval] step {step:,}: score {result['score_mean']:.2f} ± {result['score_std']:.2f} "
            f"(best {self.state['best_score']:.2f} at {self.state['best_step']:,})"
        )
        return result

    def checkpoint(self) -> Path:
        """Save a resumable checkpoint now."""
        self.state["last_checkpoint_step"] = self.model.num_timesteps
        return checkpoints.save_checkpoint(self.model, self.ckpt_dir, self.state, self.config.save_replay)

    # --- the run ----------------------------------------------------------------------------------
    @contextmanager
    def _signals(self) -> Iterator[None]:
        def handler(signum: int, frame: Any) -> None:
            if self.stop_signal is not None:
                raise KeyboardInterrupt  # a second signal: stop now
            self.stop_signal = signum
            if self.in_evaluation:
                raise EvaluationInterrupted

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def run(self) -> RunResult:
        """Train to ``config.steps``, then evaluate the best weights. Safe to call again on resume."""
        config = self.config
        remaining = config.steps - self.model.num_timesteps
        callback = _Callback(self, total=config.steps)
        # Spiking models: per-layer firing rates in train.csv / W&B, and a warning for silent layers.
        callbacks = CallbackList([callback, FiringMonitor()]) if config.spiking else callback
        try:
            with self._signals():
                if remaining > 0:
                    self.model.learn(
                        remaining,
                        callback=callbacks,
                        reset_num_timesteps=self.model.num_timesteps == 0,
                        log_interval=4,
                    )
                if self.failure is None and self.stop_signal is None:
                    return self._finish()
        finally:
            callback.close()
        if self.failure is not None:
            self.tracker.finish(exit_code=1)
            return RunResult(self.run_dir, "failed", self.model.num_timesteps, self.failure)
        self.checkpoint()
        self.tracker.finish(exit_code=128 + self.stop_signal)
        return RunResult(
            self.run_dir,
            "interrupted",
            self.model.num_timesteps,
            f"interrupted by {signal.Signals(self.stop_signal).name} at step {self.model.num_timesteps:,}; "
            f"checkpoint saved. Continue with: spikeq train --resume {self.run_dir}",
            signal_number=self.stop_signal,
        )

    def _finish(self) -> RunResult:
        if self.state.get("last_eval_step") != self.model.num_timesteps:
            self.evaluate_now()  # the final weights compete for "best" too
        self.checkpoint()
        best = checkpoints.load_model(self.ckpt_dir / "best.zip", self.eval_env, self.device)
        tqdm.write(f"[final] re-evaluating the best weights (step {self.state['best_step']:,})")
        result = evaluate_model(
            best,
            self.eval_env,
            n_episodes=self.config.final_eval_episodes,
            epsilon=self.config.eval_epsilon,
            seed=self.config.seed + 1,
            game=self.game,
            progress=True,
        )
        result = {
            "game": self.game,
            "model": self.config.model,
            "best_step": self.state["best_step"],
            **result,
        }
        (self.run_dir / "evaluation.json").write_text(json.dumps(result, indent=1))
        self.tracker.summary({f"final/{k}": v for k, v in result.items() if isinstance(v, int | float)})
        self.tracker.finish()
        return RunResult(
            self.run_dir,
            "finished",
            self.model.num_timesteps,
            f"finished {self.model.num_timesteps:,} steps; best weights (step {self.state['best_step']:,}) "
            f"score {result['score_mean']:.2f} ± {result['score_std']:.2f} "
            f"over {result['episodes']} episodes",
            result=result,
        )

    def close(self) -> None:
        """Close the environments."""
        self.train_env.close()
        self.eval_env.close()


class _Callback(BaseCallback):
    """Forwards SB3's step hook to the trainer and draws the progress bar (steps/s, ETA, epsilon)."""

    def __init__(self, trainer: Trainer, total: int) -> None:
        super().__init__()
        self.trainer = trainer
        self.bar = tqdm(total=total, initial=trainer.model.num_timesteps, unit="step", dynamic_ncols=True)

    def _on_step(self) -> bool:
        self.bar.update(self.model.num_timesteps - self.bar.n)
        if self.n_calls % 50 == 0:
            postfix = {"eps": f"{self.model.exploration_rate:.3f}"}
            if self.trainer.state.get("best_score") is not None:
                postfix["best"] = f"{self.trainer.state['best_score']:.1f}"
            self.bar.set_postfix(postfix, refresh=False)
        return self.trainer.on_step()

    def close(self) -> None:
        self.bar.close()


def open_run(
    config: TrainConfig, run_dir: Path | None = None, force: bool = False, resume: bool = False
) -> Trainer:
    """Check everything, create (or reopen) the run directory and build the trainer.

    Raises ``ConfigError`` / ``ValueError`` for bad input before anything existing is touched.

    :param config: a validated config
    :param run_dir: the run directory (default: ``<out_dir>/<game>-<model>-s<seed>-<time>``)
    :param force: overwrite an existing run directory
    :param resume: continue ``run_dir`` from its latest checkpoint
    """
    games.resolve_game(config.game)
    resolve_device(config.device)
    if resume:
        if run_dir is None or not Path(run_dir).is_dir():
            raise ConfigError(f"cannot resume: run directory {run_dir} does not exist")
        run_dir = Path(run_dir)
    else:
        run_dir = prepare_run_dir(config, run_dir, force)
        config.save(run_dir / "config.yaml")
    return Trainer(config, run_dir, resume=resume)


def train(
    config: TrainConfig, run_dir: Path | None = None, force: bool = False, resume: bool = False
) -> RunResult:
    """Run (or resume) an experiment to the end: ``open_run`` then ``Trainer.run``.

    :param config: a validated config
    :param run_dir: the run directory (default: ``<out_dir>/<game>-<model>-s<seed>-<time>``)
    :param force: overwrite an existing run directory
    :param resume: continue ``run_dir`` from its latest checkpoint
    """
    trainer = open_run(config, run_dir, force=force, resume=resume)
    try:
        return trainer.run()
    finally:
        trainer.close()
