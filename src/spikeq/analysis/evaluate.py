"""Evaluation of a trained DQN, spiking or not: game scores under epsilon-greedy play and the energy
of its greedy decisions.

The paper's protocol (README, "The paper's protocol") is 30 episodes at epsilon = 0.05 on the
evaluation env (full game, raw rewards). The score of an episode is the raw game score that SB3's
``Monitor`` reports in ``info["episode"]["r"]``, so neither reward clipping nor life-loss resets
change it. Only a greedy decision runs the Q-network (a random action costs nothing), so the energy
statistics average over greedy decisions only, as the reference code does:

    a[t] = random action            with probability epsilon (per env and step)
         = argmax_a Q(o[t], a)      otherwise, counted by ``spikeq.analysis.energy.EnergyMeter``

Video: ALE renders RGB frames only when its env was made with ``render_mode="rgb_array"`` (headless,
no display needed); the frames of env 0 are read with ``env.env_method("render")`` and written to MP4
with imageio's ffmpeg plugin (libx264), one frame per agent step.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any

import imageio.v2 as imageio
import numpy as np
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.vec_env import VecEnv
from tqdm.auto import tqdm

from spikeq.analysis.energy import (
    ENERGY_ASSUMPTIONS_START,
    EnergyMeter,
    EnergyModel,
    EnergyReport,
    load_energy_model,
)
from spikeq.analysis.perturb import Perturbation

# One frame per agent step: 60 Hz emulator frames / frame skip 4 plays the video in real time.
VIDEO_FPS = 15


@dataclass(frozen=True)
class Evaluation:
    """The scores of an evaluation and the energy of its greedy decisions.

    ``to_dict`` gives the flat JSON form (``evaluation.json``, ``spikeq evaluate --out``): these
    fields with the energy report's keys merged in, and one ``assumptions`` list, the evaluation's
    sentences first; without an energy report it holds ``decisions: None``. ``from_dict`` reads it back.

    :param episodes: number of episodes scored
    :param scores: the raw game score of each episode
    :param episode_lengths: agent steps of each episode
    :param score_mean: mean score
    :param score_std: population standard deviation of the scores (ddof=0)
    :param score_min: lowest score
    :param score_max: highest score
    :param game: the game, for the human-normalised score (``None``: not given)
    :param human_normalized: the human-normalised mean score (``None`` without a human reference)
    :param epsilon: probability of a random action per env and step
    :param seed: the seed of the exploration draws and the envs (``None``: not seeded)
    :param perturbation: what the observations went through before each greedy decision (``"none"``)
    :param video_path: the video of the first episode (``None``: none recorded)
    :param energy: the energy of the greedy decisions (``None``: not counted, or a random policy)
    :param assumptions: what the scores assume, one sentence each (the energy report has its own)
    """

    episodes: int
    scores: list[float]
    episode_lengths: list[int]
    score_mean: float
    score_std: float
    score_min: float
    score_max: float
    game: str | None
    human_normalized: float | None
    epsilon: float
    seed: int | None
    perturbation: str
    video_path: str | None
    energy: EnergyReport | None
    assumptions: list[str]

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON form: every field, the energy report's keys in place of ``energy``."""
        values = asdict(self)
        energy = values.pop("energy")
        assumptions = values.pop("assumptions")
        if energy is None:
            return {**values, "assumptions": assumptions, "decisions": None}
        return {**values, **energy, "assumptions": assumptions + energy["assumptions"]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        """Read back the flat form of ``to_dict``, also as earlier versions wrote it.

        An energy report is read when ``energy_model`` is present; it gets the assumptions from its
        first sentence (``Energy model ...``) on. Other keys (``model``, ``best_step`` ...) are ignored.

        :param data: a flat evaluation result, e.g. the contents of ``evaluation.json``
        :raises ValueError: naming a missing key, or for an energy report that is not valid
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"an evaluation result must be a mapping, got {type(data).__name__}")
        # Results written before observations could be perturbed have no "perturbation".
        data = {"perturbation": "none", **data}
        names = [f.name for f in fields(cls) if f.name != "energy"]
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"evaluation result: missing key(s) {', '.join(missing)}")
        # Copies: the evaluation shares no list with ``data``.
        values = {name: copy.deepcopy(data[name]) for name in names}
        energy = None
        if "energy_model" in data:
            lines = values["assumptions"]
            start = next(
                (i for i, line in enumerate(lines) if line.startswith(ENERGY_ASSUMPTIONS_START)), len(lines)
            )
            energy = EnergyReport.from_dict({**data, "assumptions": lines[start:]})
            values["assumptions"] = lines[:start]
        return cls(**values, energy=energy)


def evaluation_record(
    result: Evaluation,
    checkpoint: str | Path | None,
    trained: Mapping[str, Any],
    attacker: str | Path | None = None,
) -> dict[str, Any]:
    """The JSON form of an evaluation of a checkpoint (``spikeq evaluate --out``): what was evaluated,
    then ``result.to_dict()``.

    :param result: the evaluation
    :param checkpoint: the file evaluated (``None`` for the random policy)
    :param trained: the checkpoint's training config (``model``, ``seed``, ``steps``, ``init``; for the
        random policy ``{"model": "random"}``)
    :param attacker: the checkpoint a transferred attack was crafted on, kept as ``attacker_checkpoint``
    """
    model = trained.get("model")
    return {
        "checkpoint": None if checkpoint is None else str(checkpoint),
        **({} if attacker is None else {"attacker_checkpoint": str(attacker)}),
        "model": model,
        "train_seed": trained.get("seed"),
        "train_steps": trained.get("steps"),
        "init": trained.get("init") if (model or "dqn") not in ("dqn", "random") else None,
        **result.to_dict(),
    }


class _EpisodeVideo:
    """Writes the frames of env 0 to an MP4 file until its first episode ends.

    :param env: a VecEnv whose environments render ``rgb_array`` frames
    :param path: the ``.mp4`` file to write (parent folders are created)
    """

    def __init__(self, env: VecEnv, path: str | Path) -> None:
        if env.render_mode != "rgb_array":
            raise ValueError(
                f"video_path needs an env that renders RGB frames, but its render_mode is "
                f"{env.render_mode!r}; allowed: 'rgb_array'. Make the env with "
                "render_mode='rgb_array', e.g. make_atari_env(..., env_kwargs={'render_mode': 'rgb_array'})"
            )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.env = env
        # macro_block_size=2 keeps ALE's 210x160 frames unscaled (libx264's yuv420p needs even sizes).
        self.writer = imageio.get_writer(
            path, format="FFMPEG", fps=VIDEO_FPS, codec="libx264", macro_block_size=2
        )

    def capture(self) -> None:
        """Append env 0's current frame, unless its first episode is over."""
        if self.writer is not None:
            self.writer.append_data(self.env.env_method("render", indices=0)[0])

    def close(self) -> None:
        """Finish the file; later captures are ignored."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> _EpisodeVideo:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _epsilon_greedy_actions(
    policy: BasePolicy | None,
    n_actions: int,
    meter: EnergyMeter | None,
    obs: np.ndarray,
    epsilon: float,
    rng: np.random.Generator,
    perturbation: Perturbation,
    noise_rng: np.random.Generator,
    attacker: BasePolicy | None,
    scored: np.ndarray,
) -> np.ndarray:
    """One action per env: random with probability epsilon, else greedy (batched over those envs) on
    the perturbed observations (an FGSM step through ``attacker``'s network where given, else through
    the policy's); always random without a policy, and in an env not ``scored`` (one that has played
    its share of the episodes), so that only the scored episodes' decisions are perturbed and metered."""
    n_envs = len(obs)
    explore = rng.random(n_envs) < epsilon
    actions = rng.integers(n_actions, size=n_envs)
    greedy = ~explore & scored & (policy is not None)
    if greedy.any():
        obs_tensor, _ = policy.obs_to_tensor(obs[greedy])
        through = (policy if attacker is None else attacker).q_net
        obs_tensor = perturbation.apply(through, obs_tensor, policy.observation_space, noise_rng)
        if meter is None:
            with torch.inference_mode():
                q_values = policy.q_net(obs_tensor)
        else:
            q_values = meter.q_values(obs_tensor)
        actions[greedy] = q_values.argmax(dim=1).cpu().numpy()
    return actions


def evaluate_model(
    model: DQN | None,
    env: VecEnv,
    n_episodes: int = 30,
    epsilon: float = 0.05,
    seed: int | None = None,
    energy_model: str | Path | EnergyModel = "45nm",
    video_path: str | Path | None = None,
    progress: bool = True,
    game: str | None = None,
    energy: bool = True,
    perturbation: str | Perturbation = "none",
    attacker: DQN | None = None,
) -> Evaluation:
    """Play ``n_episodes`` epsilon-greedy episodes and measure scores and energy per action.

    With several envs each plays a fixed share of the episodes (as SB3's ``evaluate_policy``), so
    that short episodes are not over-represented; an env that has played its share acts at random
    until the others have played theirs, its decisions not counted.

    :param model: a DQN with a ``SpikingPolicy`` or an SB3 ``CnnPolicy`` / ``MlpPolicy``; ``None``
        scores the uniformly random policy (chance level: every action random, no energy counted)
    :param env: the evaluation VecEnv (typically one env: full game, raw rewards, a ``Monitor``)
    :param n_episodes: number of episodes to score (paper: 30)
    :param epsilon: probability of a random action per env and step (paper: 0.05)
    :param seed: seeds the exploration draws and, if given, the envs (``env.seed(seed)``)
    :param energy_model: energy model preset name (``"45nm"``, ``"loihi"``), YAML profile path or
        ``EnergyModel``
    :param video_path: write the first episode of env 0 to this ``.mp4`` (needs
        ``render_mode="rgb_array"`` envs)
    :param progress: show a progress bar over episodes
    :param game: game name for the human-normalised score (``None``: not computed)
    :param energy: count spikes, SOPs and MACs of the greedy decisions (False: scores only, faster,
        and no energy report)
    :param perturbation: what the agent's observations go through before each greedy decision
        (``spikeq.analysis.perturb``: ``"none"``, ``"gaussian:SIGMA"``, ``"fgsm:EPS"``); the noise is drawn
        from its own generator (seeded with ``seed``, unseeded without one), so the exploration draws
        do not change
    :param attacker: the network a transferred attack (``"fgsm:EPS@NAME"``) is crafted on, a DQN on the
        same observations; needed by such a perturbation and by no other
    :return: the scores, and the energy report of the greedy decisions (``None`` without ``energy``
        or a model)
    :raises ValueError: for an invalid argument, an unknown energy model, or a video request on an env
        that does not render RGB frames
    """
    if isinstance(n_episodes, bool) or not isinstance(n_episodes, int) or n_episodes < 1:
        raise ValueError(f"n_episodes={n_episodes!r} must be an integer >= 1")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon={epsilon!r} must lie in [0, 1]")
    energy_model = load_energy_model(energy_model)
    if isinstance(perturbation, str):
        perturbation = Perturbation.parse(perturbation)
    if (attacker is None) != (perturbation.attacker is None):
        given = "without an attacker network" if attacker is None else "with an attacker network"
        raise ValueError(
            f"perturbation {perturbation} {given}: an attacker network is needed by a transferred attack "
            "(fgsm:EPS@NAME) and by no other perturbation"
        )
    if attacker is not None:
        if model is None:
            raise ValueError("a transferred attack needs a model to attack; the random policy sees nothing")
        if attacker.observation_space != model.observation_space:
            raise ValueError(
                f"the attacker sees {attacker.observation_space}, the model attacked "
                f"{model.observation_space}; a transferred attack needs the same observations"
            )
        attacker.policy.set_training_mode(False)
    # Its own stream, apart from the exploration's; unseeded without a seed (not seed 0's every time).
    noise_rng = np.random.default_rng(None if seed is None else [1, seed])
    policy = None if model is None else model.policy
    if policy is None:
        epsilon, energy = 1.0, False
    else:
        policy.set_training_mode(False)
    meter = EnergyMeter(policy.q_net) if energy else None
    rng = np.random.default_rng(seed)
    n_envs = env.num_envs
    targets = np.array([(n_episodes + i) // n_envs for i in range(n_envs)])
    finished = np.zeros(n_envs, dtype=int)
    monitored = env.env_is_wrapped(Monitor)
    returns = np.zeros(n_envs)
    lengths = np.zeros(n_envs, dtype=int)
    scores: list[float] = []
    episode_lengths: list[int] = []

    with ExitStack() as stack:
        video = None if video_path is None else stack.enter_context(_EpisodeVideo(env, video_path))
        bar = stack.enter_context(
            tqdm(total=n_episodes, unit="episode", desc="evaluate", disable=not progress)
        )
        if seed is not None:
            env.seed(seed)
        obs = env.reset()
        if video is not None:
            video.capture()
        while (finished < targets).any():
            actions = _epsilon_greedy_actions(
                policy,
                env.action_space.n,
                meter,
                obs,
                epsilon,
                rng,
                perturbation,
                noise_rng,
                None if attacker is None else attacker.policy,
                scored=finished < targets,
            )
            obs, rewards, dones, infos = env.step(actions)
            returns += rewards
            lengths += 1
            for i in np.flatnonzero(dones):
                # A monitored env that is done without an episode summary lost a life: the game goes on.
                if monitored[i] and "episode" not in infos[i]:
                    continue
                if finished[i] < targets[i]:
                    score = float(infos[i]["episode"]["r"] if "episode" in infos[i] else returns[i])
                    scores.append(score)
                    episode_lengths.append(int(lengths[i]))
                    finished[i] += 1
                    bar.update()
                    bar.set_postfix(score=score)
                returns[i] = 0.0
                lengths[i] = 0
                if i == 0 and video is not None:
                    video.close()
            if video is not None:
                video.capture()

    report = meter.report(energy_model) if meter is not None else None
    decisions = None if report is None else report.decisions
    score_mean = float(np.mean(scores))
    human = None
    if game is not None:
        # Imported here: spikeq.envs.ale_games loads ale_py, which only this score needs.
        from spikeq.envs.ale_games import human_normalized

        human = human_normalized(game, score_mean)
    evaluation_assumptions = [
        f"Score: the raw game score of each of the {len(scores)} episodes (SB3 Monitor's "
        "info['episode']['r'], else the sum of the env's rewards); score_std is the population "
        "standard deviation (ddof=0); episode_lengths are agent steps.",
        f"Actions: epsilon-greedy with epsilon={epsilon} per env and step; the energy statistics "
        f"average over the {decisions} greedy decisions only (a random action runs no network).",
    ]
    if perturbation.kind != "none":
        evaluation_assumptions.append(
            f"Observations perturbed ({perturbation}) before every greedy decision "
            "(spikeq.analysis.perturb); the game itself is not; an FGSM attacker's gradient pass is not "
            "counted as energy."
            + (
                ""
                if attacker is None
                else f" Transferred attack: the FGSM step is crafted on another network, "
                f"{perturbation.attacker!r}, not on the one attacked."
            )
        )
    return Evaluation(
        episodes=len(scores),
        scores=scores,
        episode_lengths=episode_lengths,
        score_mean=score_mean,
        score_std=float(np.std(scores)),
        score_min=float(np.min(scores)),
        score_max=float(np.max(scores)),
        game=game,
        human_normalized=human,
        epsilon=epsilon,
        seed=seed,
        perturbation=str(perturbation),
        video_path=None if video_path is None else str(video_path),
        energy=report,
        assumptions=evaluation_assumptions,
    )
