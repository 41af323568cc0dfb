"""Run an Atari experiment: the paper's protocol for DSQN and its baselines, with resume.

config -> envs (train: life loss ends episodes, clipped rewards; eval: full game, raw score)
       -> SB3 DQN (SpikingPolicy | CnnPolicy, frame-deduplicated replay)
       -> every eval_freq steps: evaluate (eval_episodes at eval_epsilon), keep the best weights
       -> every checkpoint_freq steps, and on SIGINT/SIGTERM: checkpoint
       -> at the end: the best weights re-evaluated, with energy per action: the run's result

What survives a crash (see checkpoints.py for the files): a signal at any moment, the final
evaluations included, ends with a checkpoint, the resume command and exit code 128 + signal; a
second signal stops at once, still saving a checkpoint unless one was being written (the previous
one is then kept); non-finite weights stop the run before anything is saved from them; a failed
write (a full disk) or an unexpected error ends with one line and the run resumable from its last
checkpoint. The run directory is locked while a process trains in it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from stable_baselines3 import DQN
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.preprocessing import is_image_space, is_image_space_channels_first
from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit
from stable_baselines3.common.utils import FloatSchedule, LinearSchedule
from stable_baselines3.common.vec_env import VecTransposeImage
from tqdm.auto import tqdm

from spikeq.analysis import weights
from spikeq.analysis.evaluate import Evaluation, evaluate_model
from spikeq.analysis.report import plot_runs
from spikeq.envs import games
from spikeq.envs.replay import FrameReplayBuffer
from spikeq.experiment import checkpoints
from spikeq.experiment.config import OPTIMIZERS, ConfigError, TrainConfig
from spikeq.experiment.tracking import FiringMonitor, Tracker
from spikeq.files import FileLock, LockedError, atomic_path, is_locked
from spikeq.snn.network import DEFAULT_GRID_ARCH, MinAtarCNN

EVAL_COLUMNS = ("step", "score_mean", "score_std", "score_min", "score_max", "episodes", "human_normalized")


RUN_LOCK = ".lock"
SEED_MODULUS = 2**32  # env and evaluation seeds derived from config.seed wrap around to stay 32-bit


class EvaluationInterrupted(Exception):
    """A signal arrived while an evaluation was running; the evaluation is dropped and redone later."""


class StopNow(BaseException):
    """A second signal: stop whatever is running (a BaseException, so that no ``except Exception``
    in SB3 or elsewhere swallows it)."""


def resume_command(run_dir: Path) -> str:
    """The command that continues ``run_dir``, runnable as printed: ``spikeq`` when that is this
    installation's command on PATH, else the full path of this Python with ``-m spikeq.cli``."""
    script = Path(sys.executable).parent / "spikeq"
    on_path = shutil.which("spikeq")
    if on_path and script.exists() and Path(on_path).resolve() == script.resolve():
        command = ["spikeq"]
    else:
        command = [sys.executable, "-m", "spikeq.cli"]
    return shlex.join([*command, "train", "--resume", str(run_dir)])


@dataclass
class RunResult:
    """How a run ended.

    :param run_dir: the run directory
    :param status: ``finished``, ``interrupted`` or ``failed``
    :param num_timesteps: agent steps done
    :param message: what happened, for the console
    :param result: the final evaluation (``finished`` only)
    :param signal_number: the signal that interrupted the run (``interrupted`` only)
    """

    run_dir: Path
    status: str
    num_timesteps: int
    message: str
    result: Evaluation | None = None
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


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a spikeq run directory: it holds a valid ``config.yaml``."""
    try:
        TrainConfig.load(Path(path) / "config.yaml")
    except ConfigError:
        return False
    return True


def _contents(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.name != RUN_LOCK] if path.is_dir() else []


def _truncate_log(path: Path, step: int) -> None:
    """Drop the rows of ``train.csv`` logged after ``step`` (and a row a kill cut short), atomically."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    at = header.index("step") if "step" in header else 0
    kept = [r for r in body if len(r) == len(header) and r[at].isdigit() and int(r[at]) <= step]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        csv.writer(f).writerows([header, *kept])


def _remove_leftovers(run_dir: Path) -> None:
    """Temporary files and folders of writes a crash cut short (the lock is held: none is in progress)."""
    for old in run_dir.glob("checkpoints/.old-step-*"):
        # Killed while replacing a checkpoint saved twice at one step: the old copy is the complete one.
        final = old.with_name(old.name.removeprefix(".old-"))
        if not final.exists():
            os.replace(old, final)
    for leftover in [*run_dir.glob(".*.tmp"), *run_dir.glob("checkpoints/.*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


# A CPU run expected to take longer than this is worth a warning.
CPU_WARNING_DAYS = 1.0
# Training agent steps/s measured on a 2-core CPU (README): Atari at the paper's T = 64, MinAtar at T = 8.
CPU_STEPS_PER_SECOND = {
    ("atari", "dqn"): 60.0,
    ("atari", "spiking"): 2.0,
    ("minatar", "dqn"): 250.0,
    ("minatar", "spiking"): 100.0,
}


def cpu_warning(config: TrainConfig, device: str) -> str | None:
    """A warning when ``config`` asks a CPU for more steps than it can train within a day."""
    if device != "cpu":
        return None
    family = "minatar" if games.is_minatar(config.game) else "atari"
    speed = CPU_STEPS_PER_SECOND[family, "spiking" if config.spiking else "dqn"]
    days = config.steps / speed / 86_400
    if days <= CPU_WARNING_DAYS:
        return None
    return (
        f"warning: {config.steps:,} steps on a CPU take about {days:,.1f} days at the {speed:g} agent "
        f"steps/s measured for {config.model} on {family} on a CPU (README); use a GPU (--device cuda) "
        "or fewer --steps"
    )


def lock_run_dir(run_dir: Path) -> FileLock:
    """Take the run directory's lock: one process at a time trains in it.

    :raises ConfigError: when another process holds it, or it cannot be written
    """
    try:
        return FileLock(run_dir / RUN_LOCK)
    except LockedError:
        raise ConfigError(f"run directory {run_dir} is in use by another spikeq process") from None
    except OSError as error:
        raise ConfigError(f"cannot write to run directory {run_dir}: {error.strerror}") from None


def prepare_run_dir(
    config: TrainConfig, run_dir: Path | None, force: bool
) -> tuple[Path, FileLock, Path | None]:
    """Create and lock the run directory, refusing to overwrite an existing one unless ``force``.

    The default name is created with an exclusive ``mkdir`` (two runs started in the same second get
    ``<name>`` and ``<name>-2``). ``force`` replaces only a spikeq run directory no process is using:
    it is moved aside, to be removed once the new run has started (``open_run``) or put back if it
    cannot start.

    :return: the run directory, its lock, and where the run it replaces was moved (or None)
    """
    if run_dir is None:
        base = Path(config.out_dir) / run_name(config)
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot write to output directory {base.parent}: {error.strerror}") from None
        for attempt in range(1, 1000):
            candidate = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            except OSError as error:
                raise ConfigError(f"cannot write to {base.parent}: {error.strerror}") from None
            return candidate, lock_run_dir(candidate), None
        raise ConfigError(f"cannot find a free run directory name next to {base}")
    run_dir = Path(run_dir)
    replaced = None
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is a file; choose another --run-dir")
    if _contents(run_dir):
        if not force:
            raise ConfigError(
                f"run directory {run_dir} already exists; resume it with --resume {run_dir}, "
                "or pass --force to overwrite it"
            )
        if not is_run_dir(run_dir):
            raise ConfigError(
                f"--force refused: {run_dir} is not a spikeq run directory (no valid config.yaml); "
                "remove it yourself or choose another --run-dir"
            )
        if is_locked(run_dir / RUN_LOCK):
            raise ConfigError(f"--force refused: run directory {run_dir} is in use by another spikeq process")
        # Kept aside until the new run has started: input refused only once the envs or the network
        # are built (an option a game does not take) must not cost the old run.
        replaced = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
        os.replace(run_dir, replaced)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _put_back(replaced, run_dir)
        raise ConfigError(f"cannot write to output directory {run_dir}: {error.strerror}") from None
    try:
        lock = lock_run_dir(run_dir)
    except ConfigError:
        _put_back(replaced, run_dir)
        raise
    if _contents(run_dir):  # another process created it between the checks and the lock
        lock.release()
        raise ConfigError(f"run directory {run_dir} was just created by another process")
    return run_dir, lock, replaced


def _put_back(replaced: Path | None, run_dir: Path) -> None:
    """Return the run ``--force`` moved aside to its directory (an empty one left there is removed).

    :param replaced: where ``prepare_run_dir`` moved it (None: nothing to put back)
    :param run_dir: its directory
    """
    if replaced is None:
        return
    if run_dir.is_dir() and not _contents(run_dir):
        shutil.rmtree(run_dir)
    os.replace(replaced, run_dir)


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


def policy_setup(config: TrainConfig) -> tuple[str, dict[str, Any], type[ReplayBuffer]]:
    """The SB3 policy (its alias), its kwargs and the replay buffer class of ``config``'s model.

    SpikingPolicy for the DSQN models; for ``dqn`` SB3's CnnPolicy on Atari frames (the Nature torso)
    and MlpPolicy over :class:`MinAtarCNN` on MinAtar grids (the MinAtar torso), so that every model of
    a game has the same torso. Training builds the model from these and resume rebuilds them (a
    checkpoint's pickled entries are never loaded).
    """
    minatar = games.is_minatar(config.game)
    optimizer_class, optimizer_kwargs = OPTIMIZERS[config.optimizer]
    policy_kwargs: dict[str, Any] = dict(
        optimizer_class=optimizer_class, optimizer_kwargs=dict(optimizer_kwargs)
    )
    if config.spiking:
        policy = "SpikingPolicy"
        policy_kwargs.update({k: v for k, v in config.network.to_kwargs().items() if k != "net_arch"})
    elif minatar:
        policy = "MlpPolicy"
        policy_kwargs.update(features_extractor_class=MinAtarCNN, net_arch=list(DEFAULT_GRID_ARCH))
    else:
        policy = "CnnPolicy"
    # Frame de-duplication is for Atari's stacks of 84x84 frames; MinAtar grids are small.
    replay = FrameReplayBuffer if config.frame_replay and not minatar else ReplayBuffer
    return policy, policy_kwargs, replay


def build_model(config: TrainConfig, env, device: str) -> DQN:
    """The SB3 DQN of ``config`` on ``env`` (the policy of :func:`policy_setup`)."""
    train_freq, gradient_steps = sb3_update_schedule(config.train_freq, config.gradient_steps, env.num_envs)
    policy, policy_kwargs, replay = policy_setup(config)
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
        replay_buffer_class=replay,
        replay_buffer_kwargs=dict(handle_timeout_termination=config.bootstrap_time_limit),
        target_update_interval=config.target_update_interval,
        # A fraction above 1 (steps < exploration_steps) keeps epsilon's slope: the run ends mid-decay.
        exploration_fraction=config.exploration_steps / config.steps,
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


def rebuilt_objects(config: TrainConfig, env) -> dict[str, Any]:
    """What a checkpoint's ``model.zip`` stores as pickles, rebuilt from the config and the env
    (``checkpoints.load_checkpoint`` unpickles nothing). A resumed run starts new episodes, so the
    last observations are dropped; ``learning_rate`` and the epsilon schedule are the config's."""
    train_freq, _ = sb3_update_schedule(config.train_freq, config.gradient_steps, env.num_envs)
    observation_space = env.observation_space
    if is_image_space(observation_space) and not is_image_space_channels_first(observation_space):
        # As SB3 wraps such an env for its CNN (VecTransposeImage): the model's space is channels-first.
        observation_space = VecTransposeImage.transpose_space(observation_space)
    policy, policy_kwargs, replay = policy_setup(config)
    return {
        "policy_class": DQN.policy_aliases[policy],
        "policy_kwargs": policy_kwargs,
        "observation_space": observation_space,
        "action_space": env.action_space,
        "replay_buffer_class": replay,
        "train_freq": TrainFreq(train_freq, TrainFrequencyUnit.STEP),
        "lr_schedule": FloatSchedule(config.learning_rate),
        "exploration_schedule": LinearSchedule(
            config.exploration_initial_eps,
            config.exploration_final_eps,
            config.exploration_steps / config.steps,
        ),
        "_last_obs": None,
        "_last_episode_starts": None,
        "_last_original_obs": None,
        "ep_info_buffer": deque(maxlen=100),
        "ep_success_buffer": deque(maxlen=100),
    }


def read_eval_rows(path: Path) -> list[dict[str, str]]:
    """The rows of ``eval.csv`` (empty when there is none)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_eval_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``eval.csv`` with ``rows``, atomically: a kill leaves the old rows or the new ones."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=EVAL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row.get(k) for k in EVAL_COLUMNS} for row in rows)
    with atomic_path(path) as tmp:
        tmp.write_text(text.getvalue())


class Trainer:
    """One run: owns the run directory, the model, the envs, tracking and the schedule.

    :param config: the validated config
    :param run_dir: the run directory (created and locked by ``prepare_run_dir``)
    :param resume: continue from ``run_dir``'s latest checkpoint that loads; a run stopped before its
        first checkpoint starts again from step 0, its evaluations and best weights (if any) discarded
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
        self._saved: tuple[int, str] | None = None  # (step, state) of the last checkpoint written
        self._checked_updates = -1
        self.lock: FileLock | None = None  # the run directory's, set by open_run
        self._ending = False  # set once nothing is left to save: later signals are ignored

        candidates = self._checkpoints_to_resume() if resume else []
        # A resumed run starts new episodes: ALE emulator states are not checkpointed.
        step0 = int(candidates[0].name.removeprefix("step-")) if candidates else 0
        self.train_env = games.make_env(
            self.env_id,
            n_envs=config.n_envs,
            seed=(config.seed + step0) % (config.max_seed + 1),
            train=True,
            max_episode_steps=config.max_episode_steps,
            vec_env=config.vec_env,
        )
        self.eval_env = games.make_env(
            self.env_id, n_envs=1, seed=(config.seed + 10_000 + step0) % SEED_MODULUS, train=False,
            max_episode_steps=config.max_episode_steps,
        )  # fmt: skip
        if not candidates:
            self.model = build_model(config, self.train_env, self.device)
        else:
            self.model = self._load_for_resume(candidates)
            # SB3's load seeds the envs with config.seed again: a resumed run plays new episodes.
            self.train_env.seed((config.seed + self.model.num_timesteps) % (config.max_seed + 1))
        self.tracker = Tracker(
            run_dir,
            config.to_dict(),
            mode=config.wandb,
            project=config.wandb_project,
            name=run_dir.name,
            tags=[self.game, config.model, *config.tags],
            run_id=self.state.get("wandb_id"),
        )
        # A stretch resumed with W&B disabled keeps the id: a later resume continues the same W&B run.
        self.state["wandb_id"] = self.tracker.run_id or self.state.get("wandb_id")
        self.model.set_logger(self.tracker.logger)

    def _checkpoints_to_resume(self) -> list[Path]:
        """The complete checkpoints of the run, best first (``checkpoints.checkpoint_candidates``), once
        the files of writes a crash cut short are removed. A run stopped before its first checkpoint has
        none: its evaluations, best weights and training log are discarded, and it starts from step 0.

        :raises ConfigError: when the run has checkpoints but none of them is complete
        """
        _remove_leftovers(self.run_dir)
        candidates = checkpoints.checkpoint_candidates(self.ckpt_dir)
        if candidates:
            return candidates
        if any(self.ckpt_dir.glob("step-*")):
            raise ConfigError(f"no checkpoint to resume in {self.ckpt_dir}: none of them is complete")
        discarded = len(read_eval_rows(self.eval_csv))
        if self.eval_csv.exists():
            write_eval_rows(self.eval_csv, [])
        _truncate_log(self.run_dir / "train.csv", 0)
        for name in checkpoints.BEST_FILES:
            (self.ckpt_dir / name).unlink(missing_ok=True)
        redone = f" (its {discarded} evaluation(s) and best weights are redone)" if discarded else ""
        tqdm.write(f"[resume] {self.run_dir} has no checkpoint yet: starting from step 0{redone}")
        return []

    def _load_for_resume(self, candidates: list[Path]) -> DQN:
        """The first of ``candidates`` that loads (``latest``'s, then the newest others)."""
        errors = []
        for checkpoint in candidates:
            try:
                model, state = checkpoints.load_checkpoint(
                    checkpoint, self.train_env, self.device, rebuilt_objects(self.config, self.train_env)
                )
            except ValueError as error:
                errors.append(f"{checkpoint.name}: {str(error).splitlines()[0]}")
                continue
            if errors:
                tqdm.write(f"[resume] skipped {'; '.join(errors)}; resuming from {checkpoint.name}")
            break
        else:
            raise ConfigError(f"no checkpoint of {self.run_dir} loads for {self.env_id}: {'; '.join(errors)}")
        if self.config.steps < model.num_timesteps:
            # config.yaml would then file the run under a budget it has already passed.
            raise ConfigError(
                f"--steps {self.config.steps:,} is below the {model.num_timesteps:,} steps {self.run_dir} "
                f"has trained; allowed: --steps {model.num_timesteps:,} or more"
            )
        self.state.update(state)
        self._saved = (model.num_timesteps, json.dumps(self.state, sort_keys=True))
        # The best weights as of this checkpoint: any saved later belong to evaluations redone now.
        checkpoints.restore_best(checkpoint, self.ckpt_dir)
        # The step budget may have been extended, the learning rate or clipping changed to get past a NaN.
        # SB3's load built both schedules from the saved values (its _setup_model): they are rebuilt,
        # else the run would go on at the old learning rate, and epsilon would follow the old budget's
        # decay over the new budget's progress.
        model.exploration_fraction = self.config.exploration_steps / self.config.steps
        model.exploration_schedule = LinearSchedule(
            model.exploration_initial_eps, model.exploration_final_eps, model.exploration_fraction
        )
        model.learning_rate = self.config.learning_rate
        model.lr_schedule = FloatSchedule(model.learning_rate)
        model.max_grad_norm = self.config.max_grad_norm
        # Rows written after this checkpoint were never covered by it: they are redone.
        rows = [r for r in read_eval_rows(self.eval_csv) if int(r["step"]) <= model.num_timesteps]
        write_eval_rows(self.eval_csv, rows)
        _truncate_log(self.run_dir / "train.csv", model.num_timesteps)
        if model.replay_buffer.size() < self.config.batch_size:
            # No saved replay: refill it with learning_starts transitions before training resumes, also
            # where the checkpoint was written part-way through a refill or the first warm-up (its
            # learning_starts would leave fewer).
            model.learning_starts = model.num_timesteps + self.config.learning_starts
        return model

    # --- schedule ---------------------------------------------------------------------------------
    def _due(self, every: int, last_key: str) -> bool:
        return self.model.num_timesteps // every > self.state.get(last_key, 0) // every

    def _weights_failure(self) -> str | None:
        """Why the weights may not be used (non-finite tensors), or None."""
        bad = checkpoints.nonfinite_parameters(self.model)
        if not bad:
            return None
        return (
            f"the weights became non-finite ({', '.join(bad[:2])}) by step {self.model.num_timesteps}; "
            "stopped without saving them"
        )

    def on_step(self) -> bool:
        """Called by SB3 after every vectorised env step; False stops ``learn``."""
        loss = self.model.logger.name_to_value.get("train/loss")
        if loss is not None and not math.isfinite(loss):
            step = self.model.num_timesteps
            bad = checkpoints.nonfinite_parameters(self.model)
            weights = f" and the weights became non-finite ({', '.join(bad[:2])})" if bad else ""
            self.failure = f"training loss became {loss}{weights} at step {step}; stopped without saving"
            return False
        if self.stop_signal is not None:
            return False
        eval_due = self._due(self.config.eval_freq, "last_eval_step")
        checkpoint_due = self._due(self.config.checkpoint_freq, "last_checkpoint_step")
        # The finite loss above vouches for the weights between saves (a NaN weight makes the next
        # loss NaN); the full scan of every tensor, 14% of a MinAtar DQN step when run at every update,
        # runs only before the weights are evaluated or saved.
        if (eval_due or checkpoint_due) and self.model._n_updates != self._checked_updates:
            self._checked_updates = self.model._n_updates
            self.failure = self._weights_failure()
            if self.failure is not None:
                return False
        if eval_due:
            try:
                self.evaluate_now()
            except EvaluationInterrupted:
                return False
        if checkpoint_due:
            self.checkpoint()
        # SB3 collects train_freq steps at a time; a resumed run must still end exactly at `steps`.
        return self.model.num_timesteps < self.config.steps

    def _evaluate(self, model: DQN, **kwargs: Any) -> Evaluation:
        """``evaluate_model`` on the evaluation env; a signal meanwhile raises EvaluationInterrupted."""
        self.in_evaluation = True
        try:
            if self.stop_signal is not None:
                raise EvaluationInterrupted
            epsilon = self.config.eval_epsilon
            return evaluate_model(model, self.eval_env, epsilon=epsilon, game=self.game, **kwargs)
        finally:
            self.in_evaluation = False

    def evaluate_now(self) -> Evaluation:
        """Evaluate the current weights, append a row to ``eval.csv``, keep them if they are the best."""
        result = self._evaluate(
            self.model,
            n_episodes=self.config.eval_episodes,
            seed=(self.config.seed + self.model.num_timesteps) % SEED_MODULUS,
            energy=False,
            progress=False,
        )
        step = self.model.num_timesteps
        values = result.to_dict()
        row = {"step": step, **{k: values[k] for k in EVAL_COLUMNS if k != "step"}}
        write_eval_rows(self.eval_csv, [*read_eval_rows(self.eval_csv), row])
        plot_runs([self.run_dir], self.run_dir / "eval.png")
        self.state["last_eval_step"] = step
        best = self.state.get("best_score")
        if is_new_best(result.score_mean, best):
            self._save_best()
            self.state.update(best_score=result.score_mean, best_step=step)
        scalars = {
            "score_mean": result.score_mean,
            "score_std": result.score_std,
            "score_max": result.score_max,
            "human_normalized": result.human_normalized,
        }
        for key, value in scalars.items():
            if value is not None:
                self.model.logger.record(f"eval/{key}", value)
        self.model.logger.record("eval/best_score", self.state["best_score"])
        self.model.logger.dump(step)
        tqdm.write(
            f"[eval] step {step:,}: score {result.score_mean:.2f} ± {result.score_std:.2f} "
            f"(best {self.state['best_score']:.2f} at {self.state['best_step']:,})"
        )
        return result

    def _save_best(self) -> None:
        checkpoints.save_best(self.model, self.ckpt_dir, self.config.to_dict())

    def checkpoint(self) -> Path | None:
        """Save a resumable checkpoint now (nothing when this step's state is saved already)."""
        self.state["last_checkpoint_step"] = self.model.num_timesteps
        saved = (self.model.num_timesteps, json.dumps(self.state, sort_keys=True))
        if saved == self._saved:
            return None
        path = checkpoints.save_checkpoint(self.model, self.ckpt_dir, self.state, self.config.save_replay)
        self._saved = saved
        return path

    # --- the run ----------------------------------------------------------------------------------
    @contextmanager
    def _signals(self) -> Iterator[None]:
        def handler(signum: int, frame: Any) -> None:
            if self._ending:
                return  # the result is being reported: nothing is left to stop
            if self.stop_signal is not None:
                raise StopNow  # a second signal: stop now
            self.stop_signal = signum
            if self.in_evaluation:
                raise EvaluationInterrupted

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _last_checkpoint(self) -> str:
        latest = checkpoints.latest_checkpoint(self.ckpt_dir)
        return f"checkpoint {latest.name} is kept" if latest else "no checkpoint yet: it restarts from step 0"

    def run(self) -> RunResult:
        """Train to ``config.steps``, then evaluate the best weights. Safe to call again on resume.

        Never raises for a signal, a failed write or an unexpected error: each ends in a ``RunResult``
        (the traceback of an unexpected error goes to ``RUN_DIR/error.log``).
        """
        callback = _Callback(self, total=self.config.steps)
        try:
            with self._signals():
                try:
                    return self._run(callback)
                except StopNow:
                    return self._stopped(saved=False)
        finally:
            callback.close()

    def _run(self, callback: _Callback) -> RunResult:
        config = self.config
        remaining = config.steps - self.model.num_timesteps
        # Spiking models: per-layer firing rates in train.csv / W&B, and a warning for silent layers.
        callbacks = CallbackList([callback, FiringMonitor()]) if config.spiking else callback
        finished = self.run_dir / "evaluation.json"
        if finished.exists():
            if remaining <= 0:
                return self._already_finished()
            # A finished run trained further: its result stays, named by the step count it belongs to,
            # and evaluation.json appears again only when the new budget is reached.
            finished.replace(self.run_dir / f"evaluation-{self.model.num_timesteps}.json")
        try:
            if remaining > 0 and self._due(config.eval_freq, "last_eval_step"):
                # A signal cut this step's evaluation short: it is redone with this step's weights
                # before training goes on (SB3 would call back first one step later, off the schedule),
                # and checkpointed, so that a further resume from here does not repeat its row.
                self.evaluate_now()
                self.checkpoint()
            if remaining > 0:
                self.model.learn(
                    remaining,
                    callback=callbacks,
                    reset_num_timesteps=self.model.num_timesteps == 0,
                    log_interval=4,
                )
            if self.failure is None and self.stop_signal is None:
                self.failure = self._weights_failure()
            if self.failure is None and self.stop_signal is None:
                return self._finish()
        except EvaluationInterrupted:
            pass  # stop_signal is set: checkpoint below
        except StopNow:
            return self._stopped(saved=self._save_on_exit())
        except (checkpoints.CheckpointError, OSError) as error:
            self.failure = f"cannot write: {error}" if isinstance(error, OSError) else str(error)
        except ValueError as error:  # non-finite weights caught by a write
            self.failure = str(error).splitlines()[0]
        except Exception as error:  # a bug must still leave the run resumable
            self.failure = self._unexpected(error)
        if self.failure is not None:
            self._finish_tracker(exit_code=1)
            return RunResult(
                self.run_dir,
                "failed",
                self.model.num_timesteps,
                f"{self.failure}; {self._last_checkpoint()}. Continue with: {resume_command(self.run_dir)}",
            )
        return self._stopped(saved=self._save_on_exit())

    def _save_on_exit(self) -> bool:
        """Checkpoint after a signal; a further signal during the write abandons it (the previous
        checkpoint stays). False when nothing could be saved."""
        try:
            failure = self._weights_failure()
            if failure is not None:
                self.failure = failure
                return False
            self.checkpoint()
        except StopNow:
            return False
        except (checkpoints.CheckpointError, OSError, ValueError) as error:
            self.failure = str(error)
            return False
        return True

    def _stopped(self, saved: bool) -> RunResult:
        self._ending = True
        signum = self.stop_signal or signal.SIGINT
        self._finish_tracker(exit_code=128 + signum)
        why = self.failure or "stopped again while saving"
        what = "checkpoint saved" if saved else f"not saved ({why}); {self._last_checkpoint()}"
        return RunResult(
            self.run_dir,
            "interrupted",
            self.model.num_timesteps,
            f"interrupted by {signal.Signals(signum).name} at step {self.model.num_timesteps:,}; "
            f"{what}. Continue with: {resume_command(self.run_dir)}",
            signal_number=signum,
        )

    def _unexpected(self, error: Exception) -> str:
        log = self.run_dir / "error.log"
        try:
            with log.open("a") as f:
                f.write(f"step {self.model.num_timesteps}: {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                f.write("".join(traceback.format_exception(error)))
        except OSError:
            return f"unexpected {type(error).__name__}: {error}"
        first_line = str(error).splitlines()[0] if str(error) else ""
        return f"unexpected {type(error).__name__}: {first_line} (traceback in {log})"

    def _finish_tracker(self, exit_code: int = 0) -> None:
        try:
            self.tracker.finish(exit_code=exit_code)
        except StopNow:
            pass

    def _already_finished(self) -> RunResult:
        result = Evaluation.from_dict(json.loads((self.run_dir / "evaluation.json").read_text()))
        self._finish_tracker()
        return RunResult(
            self.run_dir,
            "finished",
            self.model.num_timesteps,
            f"already finished at {self.model.num_timesteps:,} steps: score {result.score_mean:.2f} ± "
            f"{result.score_std:.2f} (evaluation.json); pass --steps N to train further",
            result=result,
        )

    def _finish(self) -> RunResult:
        if self.state.get("last_eval_step") != self.model.num_timesteps:
            tqdm.write(f"[final] evaluating the last weights (step {self.model.num_timesteps:,})")
            self.evaluate_now()  # the final weights compete for "best" too
        self.checkpoint()
        # The weights-only copy: the final evaluation unpickles nothing either.
        best = weights.load_model(self.ckpt_dir / "best.safetensors", self.eval_env, self.device)
        tqdm.write(f"[final] re-evaluating the best weights (step {self.state['best_step']:,})")
        result = self._evaluate(
            best, n_episodes=self.config.final_eval_episodes, seed=(self.config.seed + 1) % SEED_MODULUS
        )
        record = {
            "game": self.game,
            "model": self.config.model,
            "best_step": self.state["best_step"],
            **result.to_dict(),
        }
        with atomic_path(self.run_dir / "evaluation.json") as tmp:
            tmp.write_text(json.dumps(record, indent=1))
        self._ending = True
        self.tracker.summary({f"final/{k}": v for k, v in record.items() if isinstance(v, int | float)})
        self._finish_tracker()
        return RunResult(
            self.run_dir,
            "finished",
            self.model.num_timesteps,
            f"finished {self.model.num_timesteps:,} steps; best weights (step {self.state['best_step']:,}) "
            f"score {result.score_mean:.2f} ± {result.score_std:.2f} over {result.episodes} episodes",
            result=result,
        )

    def close(self) -> None:
        """Close the environments and let go of the run directory."""
        self.train_env.close()
        self.eval_env.close()
        if self.lock is not None:
            self.lock.release()


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
    """Check everything, create (or reopen) and lock the run directory and build the trainer.

    Raises ``ConfigError`` / ``ValueError`` for bad input before anything existing is touched; a
    resumed run's ``config.yaml`` is rewritten (with the allowed changes) only once its checkpoint
    has loaded.

    :param config: a validated config
    :param run_dir: the run directory (default: ``<out_dir>/<game>-<model>-s<seed>-<time>``)
    :param force: overwrite an existing run directory (only a spikeq run no process is using)
    :param resume: continue ``run_dir`` from its latest checkpoint
    """
    games.resolve_game(config.game)
    resolve_device(config.device)
    existed = run_dir is not None and Path(run_dir).is_dir()
    if resume:
        if run_dir is None or not Path(run_dir).is_dir():
            raise ConfigError(f"cannot resume: run directory {run_dir} does not exist")
        run_dir, lock, replaced = Path(run_dir), lock_run_dir(Path(run_dir)), None
    else:
        run_dir, lock, replaced = prepare_run_dir(config, run_dir, force)
    try:
        if not resume:
            config.save(run_dir / "config.yaml")
        trainer = Trainer(config, run_dir, resume=resume)
        if resume:
            config.save(run_dir / "config.yaml")
    except BaseException:
        if not resume:
            # Nothing has trained: no half-made run is left to answer the next try with "already exists".
            shutil.rmtree(run_dir, ignore_errors=True)
            if replaced is not None:
                _put_back(replaced, run_dir)
            elif existed:
                run_dir.mkdir()  # the empty folder given with --run-dir stays
        lock.release()
        raise
    if replaced is not None:  # the new run has started: the one it replaces goes
        shutil.rmtree(replaced, ignore_errors=True)
    trainer.lock = lock
    return trainer


def train(
    config: TrainConfig, run_dir: Path | None = None, force: bool = False, resume: bool = False
) -> RunResult:
    """Run (or resume) an experiment to the end: ``open_run`` then ``Trainer.run``.

    :param config: a validated config
    :param run_dir: the run directory (default: ``<out_dir>/<game>-<model>-s<seed>-<time>``)
    :param force: overwrite an existing run directory (only a spikeq run no process is using)
    :param resume: continue ``run_dir`` from its latest checkpoint
    """
    trainer = open_run(config, run_dir, force=force, resume=resume)
    try:
        return trainer.run()
    finally:
        trainer.close()
