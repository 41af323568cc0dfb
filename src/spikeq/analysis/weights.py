"""The weights-only format of a trained Q-network: safe to share, read without unpickling anything.

A model is a pair of files: ``<stem>.safetensors`` (the online Q-network's tensors) and ``<stem>.json``
(plain data: the format tag, the SB3 policy alias, its kwargs with a features extractor by name, the
observation and action spaces, the step count and the training config). ``load_model`` rebuilds the
policy from the JSON and loads the tensors; SB3 zips, which hold pickles that run code when loaded, are
accepted too, for files you trust. Training writes this pair as ``checkpoints/best.*``; ``spikeq export``
and ``spikeq convert`` write it for sharing.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from stable_baselines3 import DQN
from stable_baselines3.common.vec_env import VecEnv

from spikeq.files import atomic_path
from spikeq.snn.network import MAX_NUM_STEPS, MinAtarCNN
from spikeq.snn.policy import SpikingPolicy

WEIGHTS_FORMAT = "spikeq-weights-v1"
# The suffixes that name a weights-only model by one of its files or by the SB3 zip it came from
WEIGHTS_SUFFIXES = (".safetensors", ".json", ".zip")
# Features extractors of the ANN DQNs a weights-only file may name
FEATURE_EXTRACTORS = {"MinAtarCNN": MinAtarCNN}


def _bounds_to_json(bounds: np.ndarray) -> Any:
    # An Atari Box is 0..255 everywhere: one number instead of 28,224 of them.
    flat = bounds.reshape(-1)
    if flat.size and (flat == flat[0]).all():
        return flat[0].item()
    return bounds.tolist()


def space_to_json(space: spaces.Space) -> dict[str, Any]:
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n)}
    if isinstance(space, spaces.Box):
        return {
            "type": "Box",
            "shape": list(space.shape),
            "dtype": str(space.dtype),
            "low": _bounds_to_json(space.low),
            "high": _bounds_to_json(space.high),
        }
    raise ValueError(f"cannot export a {type(space).__name__} space; allowed: Box, Discrete")


def space_from_json(data: dict[str, Any]) -> spaces.Space:
    if data["type"] == "Discrete":
        return spaces.Discrete(int(data["n"]))
    if data["type"] != "Box":
        raise ValueError(f"unknown space type {data['type']!r}; allowed: Box, Discrete")
    dtype, shape = np.dtype(data["dtype"]), tuple(int(n) for n in data["shape"])
    low, high = (np.broadcast_to(np.asarray(data[k], dtype), shape) for k in ("low", "high"))
    return spaces.Box(low, high, shape=shape, dtype=dtype)


def export_weights(
    model: DQN, path: Path, config: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write the online Q-network as ``<path>.safetensors`` + ``<path>.json`` (no pickles).

    Both files are written to temporary files first and then renamed: a failed write leaves the
    previous pair as it was.

    :param model: a DQN with a SpikingPolicy or an SB3 DQN policy
    :param path: file stem (its folder is created where missing); a ``.safetensors``/``.json``/``.zip``
        suffix is replaced
    :param config: the run's config, stored in the JSON for reference
    :param extra: further keys stored in the JSON (e.g. ``conversion``)
    :return: the two files written
    :raises ValueError: for weights that are not finite, or a policy whose kwargs are not plain data
    """
    tensors, meta = weights_and_meta(model, config, extra)
    weights, meta_file = weights_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(weights) as weights_tmp, atomic_path(meta_file) as meta_tmp:
        save_file(tensors, str(weights_tmp))
        meta_tmp.write_text(json.dumps(meta, indent=1))
    return weights, meta_file


def weights_paths(path: Path) -> tuple[Path, Path]:
    """The ``.safetensors`` and ``.json`` files of a weights-only model named by ``path`` (a stem, or
    either file, or its ``.zip``).

    Only those three suffixes are replaced: any other dot belongs to the stem (``pong-p99.9`` names
    ``pong-p99.9.safetensors``, not ``pong-p99.safetensors``, which another stem would share).
    """
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in WEIGHTS_SUFFIXES else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def weights_and_meta(
    model: DQN, config: dict[str, Any] | None, extra: dict[str, Any] | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    bad = [name for name, value in model.q_net.state_dict().items() if not torch.isfinite(value).all()]
    if bad:
        raise ValueError(f"not exporting non-finite weights ({', '.join(bad[:3])})")
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
        "observation_space": space_to_json(model.observation_space),
        "action_space": space_to_json(model.action_space),
        "num_timesteps": model.num_timesteps,
        "config": config or {},
        **(extra or {}),
    }
    return tensors, meta


def read_weights_meta(path: Path) -> dict[str, Any]:
    """The JSON half of a weights-only export (``path`` may name either file).

    :raises ValueError: for a missing, unreadable or foreign file
    """
    meta_file = Path(path).with_suffix(".json")
    if not meta_file.exists():
        raise ValueError(f"{meta_file} not found: a weights-only model is a .safetensors + .json pair")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{meta_file} is not readable JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != WEIGHTS_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_file} is not a spikeq weights file (format {found!r})")
    # Files written before the alias was stored name the policy's class: SB3's "MlpPolicy" is DQNPolicy.
    class_names = {cls.__name__: alias for alias, cls in DQN.policy_aliases.items()}
    if isinstance(meta.get("policy"), str) and meta["policy"] not in DQN.policy_aliases:
        meta["policy"] = class_names.get(meta["policy"], meta["policy"])
    return meta


def check_weights_meta(meta: dict[str, Any], meta_file: Path) -> None:
    """What a shared JSON must hold before any network is built from it."""
    for key, kind in (("policy", str), ("policy_kwargs", dict), ("observation_space", dict)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{meta_file}: {key} is missing or not a {kind.__name__}")
    if not isinstance(meta.get("action_space"), dict):
        raise ValueError(f"{meta_file}: action_space is missing or not a dict")
    if meta["policy"] not in DQN.policy_aliases:
        raise ValueError(
            f"{meta_file}: unknown policy {meta['policy']!r}; allowed: {', '.join(DQN.policy_aliases)}"
        )
    num_steps = meta["policy_kwargs"].get("num_steps", 1)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_NUM_STEPS:
        raise ValueError(f"{meta_file}: num_steps={num_steps!r}; allowed: 1 to {MAX_NUM_STEPS}")


# The replay buffer is not needed to act, so a loaded model gets one of capacity 1.
NO_REPLAY = {"buffer_size": 1, "replay_buffer_class": None, "replay_buffer_kwargs": {}}


def load_model(path: Path, env: VecEnv, device: str = "auto", num_steps: int | None = None) -> DQN:
    """Load a model for evaluation from an SB3 zip or from the weights-only format.

    :param path: ``*.zip`` (SB3, pickled: only load files you trust), or ``*.safetensors``/``*.json``
    :param env: the environment to act in (its spaces must match)
    :param device: torch device
    :param num_steps: run a spiking network for this many steps per decision instead of the T it was
        trained with (``with_num_steps``); ``None``: its own T
    :raises ValueError: naming what is wrong with a file that does not load (one line), or for
        ``num_steps`` with a network that does not spike
    """
    model = _load_model(Path(path), env, device)
    return model if num_steps is None else with_num_steps(model, num_steps, env)


def with_num_steps(model: DQN, num_steps: int, env: VecEnv) -> DQN:
    """The same trained spiking Q-network run for ``num_steps`` steps per decision (T), for evaluation.

    Nothing in the weights depends on T: the network is rebuilt with ``num_steps`` in its policy kwargs
    and given the same state dict (its firing calibration included, so it is not calibrated again).
    How far a network trained at one T keeps its play at another is what this is for.

    :param model: a model whose policy is a ``SpikingPolicy``
    :param num_steps: T, from 1 to ``MAX_NUM_STEPS``
    :param env: the environment to act in
    :raises ValueError: for a model that does not spike, or a T out of range
    """
    if not isinstance(model.policy, SpikingPolicy):
        raise ValueError(
            f"num_steps={num_steps!r} sets T of a spiking network; this model's policy is "
            f"{type(model.policy).__name__}, which does not spike"
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_NUM_STEPS:
        raise ValueError(f"num_steps={num_steps!r} is out of range; allowed: 1 to {MAX_NUM_STEPS}")
    policy_kwargs = {**model.policy_kwargs, "num_steps": num_steps}
    rebuilt = DQN(type(model.policy), env, policy_kwargs=policy_kwargs, device=model.device, **NO_REPLAY)
    rebuilt.q_net.load_state_dict(model.q_net.state_dict())
    rebuilt.q_net_target.load_state_dict(model.q_net_target.state_dict())
    return rebuilt


def _load_model(path: Path, env: VecEnv, device: str) -> DQN:
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.suffix == ".zip":
        try:
            return DQN.load(path, env=env, device=device, custom_objects=NO_REPLAY)
        except (
            ValueError,
            RuntimeError,
            KeyError,
            OSError,
            EOFError,
            zipfile.BadZipFile,
            TypeError,
        ) as error:
            raise ValueError(f"{path} does not load: {str(error).splitlines()[0]}") from None
    if path.suffix not in (".safetensors", ".json"):
        raise ValueError(f"unknown checkpoint type {path.name!r}; allowed: .zip, .safetensors, .json")
    weights, meta_file = weights_paths(path)
    meta = read_weights_meta(path)
    check_weights_meta(meta, meta_file)
    try:
        expected = (space_from_json(meta["observation_space"]), space_from_json(meta["action_space"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{meta_file}: its spaces are malformed ({error})") from None
    if expected[1] != env.action_space:
        raise ValueError(
            f"{path.name} was trained with {expected[1]} but the environment has {env.action_space}"
        )
    # Element counts, not shapes: SB3 may have moved an image's channels first (VecTransposeImage).
    if math.prod(expected[0].shape) != math.prod(env.observation_space.shape):
        raise ValueError(
            f"{path.name} was trained on observations of shape {expected[0].shape} but the "
            f"environment's are {env.observation_space.shape}"
        )
    if not weights.exists():
        raise ValueError(f"{weights} not found: a weights-only model is a .safetensors + .json pair")
    policy_kwargs = dict(meta["policy_kwargs"])
    if "features_extractor_class" in policy_kwargs:
        name = policy_kwargs["features_extractor_class"]
        if name not in FEATURE_EXTRACTORS:
            raise ValueError(
                f"{path.name}: unknown features extractor {name!r}; allowed: {', '.join(FEATURE_EXTRACTORS)}"
            )
        policy_kwargs["features_extractor_class"] = FEATURE_EXTRACTORS[name]
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = set(f.keys())
        model = DQN(meta["policy"], env, policy_kwargs=policy_kwargs, device=device, **NO_REPLAY)
        expected_names = set(model.q_net.state_dict())
        if names != expected_names:
            missing, unexpected = sorted(expected_names - names), sorted(names - expected_names)
            raise ValueError(f"{weights} does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.q_net.load_state_dict(load_file(str(weights)))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights} is not a readable safetensors file: {error}") from None
    except (RuntimeError, TypeError) as error:
        reason = " ".join(str(error).split())[:300]
        raise ValueError(f"{path.name} does not fit its policy: {reason}") from None
    model.q_net_target.load_state_dict(model.q_net.state_dict())
    return model
