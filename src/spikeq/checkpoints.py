"""Checkpoints for resuming, and a weights-only format that is safe to share.

A training checkpoint is a folder ``checkpoints/step-<N>/`` holding SB3's ``model.zip`` (network,
optimizer, step counter), ``trainer.json`` (the evaluation schedule and best score), ``rng.pt`` (Python,
NumPy, torch and action-space RNG states) and, optionally, ``replay.pkl``. ``checkpoints/latest`` names
the newest complete one; it is replaced atomically, so an interruption while saving never leaves a
half-written checkpoint behind.

SB3 zips contain pickles, which run code when loaded: share the weights-only format instead, a
``.safetensors`` file of tensors and a ``.json`` file of plain data (policy class name, its kwargs, the
spaces, the training config), which ``load_model`` rebuilds without unpickling anything.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from safetensors.torch import load_file, save_file
from stable_baselines3 import DQN
from stable_baselines3.common.vec_env import VecEnv

from spikeq.network import MinAtarCNN

WEIGHTS_FORMAT = "spikeq-weights-v1"
# Features extractors of the ANN DQNs a weights-only file may name
FEATURE_EXTRACTORS = {"MinAtarCNN": MinAtarCNN}
KEEP_CHECKPOINTS = 2


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(model: DQN, checkpoints: Path, state: dict[str, Any], save_replay: bool) -> Path:
    """Save everything needed to resume at ``model.num_timesteps``.

    :param model: the model being trained
    :param checkpoints: the run's ``checkpoints/`` folder
    :param state: the trainer's own state (JSON-serialisable)
    :param save_replay: also save the replay buffer
    :return: the checkpoint folder
    """
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"step-{model.num_timesteps}"
    tmp = checkpoints / f".tmp-step-{model.num_timesteps}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save(tmp / "model.zip")
    (tmp / "trainer.json").write_text(json.dumps({**state, "num_timesteps": model.num_timesteps}, indent=1))
    torch.save(
        {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "action_space": model.action_space.np_random.bit_generator.state,
        },
        tmp / "rng.pt",
    )
    if save_replay:
        model.save_replay_buffer(tmp / "replay.pkl")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_atomic(checkpoints / "latest", final.name)
    for old in sorted(checkpoints.glob("step-*"), key=lambda p: int(p.name[5:]))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    pointer = checkpoints / "latest"
    if not pointer.exists():
        return None
    path = checkpoints / pointer.read_text().strip()
    return path if (path / "model.zip").exists() else None


def load_checkpoint(path: Path, env: VecEnv, device: str) -> tuple[DQN, dict[str, Any]]:
    """Restore a model, its RNG states and (when saved) its replay buffer.

    :param path: a checkpoint folder written by ``save_checkpoint``
    :param env: the training env (its spaces must match the checkpoint's)
    :param device: torch device
    :return: the model and the trainer state
    """
    model = DQN.load(path / "model.zip", env=env, device=device)
    rng = torch.load(path / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    model.action_space.np_random.bit_generator.state = rng["action_space"]
    if (path / "replay.pkl").exists():
        model.load_replay_buffer(path / "replay.pkl")
    state = json.loads((path / "trainer.json").read_text())
    return model, state


def _space_to_json(space: spaces.Space) -> dict[str, Any]:
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n)}
    if isinstance(space, spaces.Box):
        return {
            "type": "Box",
            "shape": list(space.shape),
            "dtype": str(space.dtype),
            "low": space.low.tolist(),
            "high": space.high.tolist(),
        }
    raise ValueError(f"cannot export a {type(space).__name__} space; allowed: Box, Discrete")


def _space_from_json(data: dict[str, Any]) -> spaces.Space:
    if data["type"] == "Discrete":
        return spaces.Discrete(data["n"])
    dtype = np.dtype(data["dtype"])
    return spaces.Box(np.array(data["low"], dtype), np.array(data["high"], dtype), dtype=dtype)


def export_weights(
    model: DQN, path: Path, config: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write the online Q-network as ``<path>.safetensors`` + ``<path>.json`` (no pickles).

    :param model: a DQN with a SpikingPolicy or an SB3 DQN policy
    :param path: file stem; a ``.safetensors``/``.json``/``.zip`` suffix is replaced
    :param config: the run's config, stored in the JSON for reference
    :param extra: further keys stored in the JSON (e.g. ``conversion``)
    :return: the two files written
    """
    stem = Path(path).with_suffix("")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.q_net.state_dict().items()}
    # The optimiser is not needed to act; a features extractor is stored by name.
    policy_kwargs = {
        k: v for k, v in model.policy_kwargs.items() if k not in ("optimizer_class", "optimizer_kwargs")
    }
    extractor = policy_kwargs.get("features_extractor_class")
    if extractor is not None:
        if extractor not in FEATURE_EXTRACTORS.values():
            raise ValueError(
                f"cannot export a policy with features extractor {extractor.__name__}; allowed: "
                f"{', '.join(FEATURE_EXTRACTORS)}"
            )
        policy_kwargs["features_extractor_class"] = extractor.__name__
    if "activation_fn" in policy_kwargs:
        raise ValueError("only policies with plain-data kwargs can be exported")
    meta = {
        "format": WEIGHTS_FORMAT,
        # The name DQN(...) takes: SB3's alias ("MlpPolicy" is the class DQNPolicy)
        "policy": next(
            (alias for alias, cls in DQN.policy_aliases.items() if cls is type(model.policy)),
            type(model.policy).__name__,
        ),
        "policy_kwargs": policy_kwargs,
        "observation_space": _space_to_json(model.observation_space),
        "action_space": _space_to_json(model.action_space),
        "num_timesteps": model.num_timesteps,
        "config": config or {},
        **(extra or {}),
    }
    weights, meta_file = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    save_file(tensors, str(weights))
    meta_file.write_text(json.dumps(meta, indent=1))
    return weights, meta_file


def read_weights_meta(path: Path) -> dict[str, Any]:
    """The JSON half of a weights-only export (``path`` may name either file)."""
    meta_file = Path(path).with_suffix(".json")
    if not meta_file.exists():
        raise ValueError(f"{meta_file} not found: a weights-only model is a .safetensors + .json pair")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{meta_file} is not a spikeq weights file (format {meta.get('format')!r})")
    return meta


def load_model(path: Path, env: VecEnv, device: str = "auto") -> DQN:
    """Load a model for evaluation from an SB3 zip or from the weights-only format.

    The replay buffer is not needed to act, so it is created with capacity 1.

    :param path: ``*.zip`` (SB3, pickled: only load files you trust), or ``*.safetensors``/``*.json``
    :param env: the environment to act in (its spaces must match)
    :param device: torch device
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    no_replay = {"buffer_size": 1, "replay_buffer_class": None, "replay_buffer_kwargs": {}}
    if path.suffix == ".zip":
        return DQN.load(path, env=env, device=device, custom_objects=no_replay)
    if path.suffix not in (".safetensors", ".json"):
        raise ValueError(f"unknown checkpoint type {path.name!r}; allowed: .zip, .safetensors, .json")
    meta = read_weights_meta(path)
    expected = (_space_from_json(meta["observation_space"]), _space_from_json(meta["action_space"]))
    if expected[1] != env.action_space:
        raise ValueError(
            f"{path.name} was trained with {expected[1]} but the environment has {env.action_space}"
        )
    policy_kwargs = dict(meta["policy_kwargs"])
    if "features_extractor_class" in policy_kwargs:
        name = policy_kwargs["features_extractor_class"]
        if name not in FEATURE_EXTRACTORS:
            raise ValueError(
                f"{path.name}: unknown features extractor {name!r}; allowed: {', '.join(FEATURE_EXTRACTORS)}"
            )
        policy_kwargs["features_extractor_class"] = FEATURE_EXTRACTORS[name]
    model = DQN(meta["policy"], env, policy_kwargs=policy_kwargs, device=device, **no_replay)
    model.q_net.load_state_dict(load_file(str(path.with_suffix(".safetensors"))))
    model.q_net_target.load_state_dict(model.q_net.state_dict())
    return model
