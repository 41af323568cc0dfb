"""Checkpoints for resuming, and a weights-only format that is safe to share.

A training checkpoint is a folder ``checkpoints/step-<N>/`` holding SB3's ``model.zip`` (network,
optimizer, step counter), ``trainer.json`` (the evaluation schedule and best score), ``rng.json``
(Python, NumPy, torch and action-space RNG states), hard links to the best weights as they were at
step N (``best.*``) and, optionally, the replay buffer (``replay.npz`` + ``replay.json``).

What survives a crash: a checkpoint is written into a temporary folder, flushed to disk and renamed
into place; ``checkpoints/latest`` (replaced atomically) then names it. Resume takes the checkpoint
``latest`` names, or, when that one is missing or does not load, the newest other one that does. No
checkpoint is written from weights that are not finite.

Nothing a resume reads runs code: ``model.zip``'s pickled entries (schedules, spaces, classes) are
replaced by objects rebuilt from the config and the env, its tensors are read with
``torch.load(weights_only=True)``, and the RNG states and replay buffer are JSON and ``.npz`` arrays
(read with ``allow_pickle=False``). SB3 zips from elsewhere contain pickles, which run code when
loaded: share the weights-only format instead, a ``.safetensors`` file of tensors and a ``.json``
file of plain data (policy class name, its kwargs, the spaces, the training config), which
``load_model`` rebuilds without unpickling anything.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from stable_baselines3 import DQN
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.vec_env import VecEnv

from spikeq.files import atomic_path, fsync_dir, write_atomic
from spikeq.network import MinAtarCNN

WEIGHTS_FORMAT = "spikeq-weights-v1"
# Features extractors of the ANN DQNs a weights-only file may name
FEATURE_EXTRACTORS = {"MinAtarCNN": MinAtarCNN}
KEEP_CHECKPOINTS = 2
BEST_FILES = ("best.zip", "best.safetensors", "best.json")
# T of a shared model: the bound of spikeq.config (a file may claim anything; memory grows with T).
MAX_NUM_STEPS = 4096


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the previous one is untouched."""


def nonfinite_parameters(model: DQN) -> list[str]:
    """The names of the policy's tensors (online and target network) holding a NaN or an infinity."""
    return [name for name, value in model.policy.state_dict().items() if not torch.isfinite(value).all()]


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def _rng_state(model: DQN) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "action_space": model.action_space.np_random.bit_generator.state,
    }


def _set_rng_state(model: DQN, rng: dict[str, Any]) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch_state = np.frombuffer(base64.b64decode(rng["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(torch_state))
    model.action_space.np_random.bit_generator.state = rng["action_space"]


def save_replay_buffer(buffer: ReplayBuffer, folder: Path) -> None:
    """Write a replay buffer as ``replay.npz`` (its arrays) + ``replay.json`` (its counters): no pickle.

    :param buffer: SB3's ``ReplayBuffer`` or ``FrameReplayBuffer``
    :param folder: where to write the two files
    """
    arrays = {k: v for k, v in vars(buffer).items() if isinstance(v, np.ndarray)}
    plain = {
        k: v
        for k, v in vars(buffer).items()
        if isinstance(v, bool | int | float | str) or (isinstance(v, list) and all(type(x) is int for x in v))
    }
    with (folder / "replay.npz").open("wb") as f:
        np.savez(f, **arrays)
    (folder / "replay.json").write_text(json.dumps({"class": type(buffer).__name__, "state": plain}))


def load_replay_buffer(buffer: ReplayBuffer, folder: Path) -> None:
    """Fill ``buffer`` from ``save_replay_buffer``'s files (arrays must match its own in dtype and rank).

    :raises ValueError: for files of another buffer class or layout
    """
    meta = json.loads((folder / "replay.json").read_text())
    if meta.get("class") != type(buffer).__name__:
        raise ValueError(f"the saved replay buffer is a {meta.get('class')}, not a {type(buffer).__name__}")
    with np.load(folder / "replay.npz", allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    for name, array in arrays.items():
        current = getattr(buffer, name, None)
        if not isinstance(current, np.ndarray) or (current.dtype, current.ndim) != (array.dtype, array.ndim):
            raise ValueError(f"the saved replay buffer's {name} does not fit this run's buffer")
    state = meta["state"]
    for name, value in state.items():
        if not isinstance(value, type(getattr(buffer, name, value))):
            raise ValueError(f"the saved replay buffer's {name}={value!r} does not fit this run's buffer")
    for name, value in {**arrays, **state}.items():
        setattr(buffer, name, value)


def save_checkpoint(model: DQN, checkpoints: Path, state: dict[str, Any], save_replay: bool) -> Path:
    """Save everything needed to resume at ``model.num_timesteps``; ``latest`` names it last.

    :param model: the model being trained
    :param checkpoints: the run's ``checkpoints/`` folder
    :param state: the trainer's own state (JSON-serialisable)
    :param save_replay: also save the replay buffer
    :return: the checkpoint folder
    :raises ValueError: when the weights are not finite (nothing is written)
    :raises CheckpointError: when writing fails (the temporary folder is removed, ``latest`` is unchanged)
    """
    bad = nonfinite_parameters(model)
    if bad:
        raise ValueError(f"not saving a checkpoint with non-finite weights ({', '.join(bad[:3])})")
    final = checkpoints / f"step-{model.num_timesteps}"
    tmp = checkpoints / f".tmp-step-{model.num_timesteps}"
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        model.save(tmp / "model.zip")
        trainer = {**state, "num_timesteps": model.num_timesteps}
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
        (tmp / "rng.json").write_text(json.dumps(_rng_state(model)))
        if save_replay:
            save_replay_buffer(model.replay_buffer, tmp)
        for name in BEST_FILES:
            # The best weights as of this step: a resume rolls them back with everything else.
            if (checkpoints / name).exists():
                try:
                    os.link(checkpoints / name, tmp / name)
                except OSError:  # a file system without hard links
                    shutil.copyfile(checkpoints / name, tmp / name)
        _fsync_tree(tmp)
        if final.exists():  # saved again at the same step (the end of a resumed, finished run)
            old = checkpoints / f".old-step-{model.num_timesteps}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(checkpoints)
        write_atomic(checkpoints / "latest", final.name)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {error.strerror or error}") from None
    steps = sorted(int(p.name[5:]) for p in checkpoints.glob("step-*") if p.name[5:].isdigit())
    for old_step in steps[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(checkpoints / f"step-{old_step}", ignore_errors=True)
    return final


def _complete(path: Path) -> bool:
    return (path / "model.zip").is_file() and (path / "trainer.json").is_file()


def checkpoint_candidates(checkpoints: Path) -> list[Path]:
    """Complete checkpoint folders, best first: the one ``latest`` names, then the others, newest first."""
    found = [p for p in checkpoints.glob("step-*") if p.name[5:].isdigit() and _complete(p)]
    found.sort(key=lambda p: int(p.name[5:]), reverse=True)
    pointer = checkpoints / "latest"
    try:
        named = checkpoints / pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return found
    return [named, *(p for p in found if p != named)] if named in found else found


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint folder (``latest``'s, else the newest other one), or None."""
    candidates = checkpoint_candidates(checkpoints)
    return candidates[0] if candidates else None


def load_checkpoint(
    path: Path, env: VecEnv, device: str, rebuilt: dict[str, Any]
) -> tuple[DQN, dict[str, Any]]:
    """Restore a model, its RNG states and (when saved) its replay buffer, unpickling nothing.

    :param path: a checkpoint folder written by ``save_checkpoint``
    :param env: the training env (its spaces must match the checkpoint's)
    :param device: torch device
    :param rebuilt: replacements for every pickled entry of ``model.zip`` (SB3's ``custom_objects``)
    :return: the model and the trainer state
    :raises ValueError: for a checkpoint that is damaged, does not fit ``env``, or holds a pickled
        entry ``rebuilt`` does not replace
    """
    try:
        with zipfile.ZipFile(path / "model.zip") as archive:
            data = json.loads(archive.read("data"))
        state = json.loads((path / "trainer.json").read_text())
    except (OSError, zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is damaged: {error}") from None
    pickled = sorted(k for k, v in data.items() if isinstance(v, dict) and ":serialized:" in v)
    unknown = [k for k in pickled if k not in rebuilt]
    if unknown:
        raise ValueError(f"{path / 'model.zip'} holds pickled entries spikeq does not rebuild: {unknown}")
    try:
        model = DQN.load(path / "model.zip", env=env, device=device, custom_objects=rebuilt)
    except (RuntimeError, KeyError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path / 'model.zip'} does not load: {str(error).splitlines()[0]}") from None
    try:
        if (path / "rng.json").exists():
            _set_rng_state(model, json.loads((path / "rng.json").read_text()))
        if (path / "replay.npz").exists():
            load_replay_buffer(model.replay_buffer, path)
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is damaged: {str(error).splitlines()[0]}") from None
    if not (path / "rng.json").exists() and (path / "rng.pt").exists():
        warnings.warn(
            f"{path / 'rng.pt'} is a pickle (an older spikeq), not loaded: the RNG states start afresh",
            stacklevel=2,
        )
    if not (path / "replay.npz").exists() and (path / "replay.pkl").exists():
        warnings.warn(
            f"{path / 'replay.pkl'} is a pickle (an older spikeq), not loaded: the replay buffer refills",
            stacklevel=2,
        )
    return model, state


def restore_best(checkpoint: Path, checkpoints: Path) -> None:
    """Put back the best weights as they were when ``checkpoint`` was written (its ``best.*`` links);
    best weights saved after it belong to evaluations a resume redoes."""
    for name in BEST_FILES:
        kept, current = checkpoint / name, checkpoints / name
        if kept.exists():
            if not current.exists() or not os.path.samefile(kept, current):
                with atomic_path(current) as tmp:
                    shutil.copyfile(kept, tmp)
        elif current.exists():
            current.unlink()


def _bounds_to_json(bounds: np.ndarray) -> Any:
    # An Atari Box is 0..255 everywhere: one number instead of 28,224 of them.
    flat = bounds.reshape(-1)
    if flat.size and (flat == flat[0]).all():
        return flat[0].item()
    return bounds.tolist()


def _space_to_json(space: spaces.Space) -> dict[str, Any]:
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


def _space_from_json(data: dict[str, Any]) -> spaces.Space:
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
    :param path: file stem; a ``.safetensors``/``.json``/``.zip`` suffix is replaced
    :param config: the run's config, stored in the JSON for reference
    :param extra: further keys stored in the JSON (e.g. ``conversion``)
    :return: the two files written
    :raises ValueError: for weights that are not finite, or a policy whose kwargs are not plain data
    """
    stem = Path(path).with_suffix("")
    tensors, meta = _weights_and_meta(model, config, extra)
    weights, meta_file = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    with atomic_path(weights) as weights_tmp, atomic_path(meta_file) as meta_tmp:
        save_file(tensors, str(weights_tmp))
        meta_tmp.write_text(json.dumps(meta, indent=1))
    return weights, meta_file


def _weights_and_meta(
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
        "observation_space": _space_to_json(model.observation_space),
        "action_space": _space_to_json(model.action_space),
        "num_timesteps": model.num_timesteps,
        "config": config or {},
        **(extra or {}),
    }
    return tensors, meta


def save_best(model: DQN, checkpoints: Path, config: dict[str, Any]) -> None:
    """Write ``best.zip``, ``best.safetensors`` and ``best.json`` from ``model``: all three are written
    to temporary files first and renamed only when every one is complete, so a failed write leaves the
    previous three, all from one step.

    :raises ValueError: for non-finite weights (nothing is written)
    """
    tensors, meta = _weights_and_meta(model, config, None)
    checkpoints.mkdir(parents=True, exist_ok=True)
    with (
        atomic_path(checkpoints / "best.zip") as zip_tmp,
        atomic_path(checkpoints / "best.safetensors") as weights_tmp,
        atomic_path(checkpoints / "best.json") as meta_tmp,
    ):
        with zip_tmp.open("wb") as f:
            model.save(f)
        save_file(tensors, str(weights_tmp))
        meta_tmp.write_text(json.dumps(meta, indent=1))


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
    return meta


def _check_weights_meta(meta: dict[str, Any], meta_file: Path) -> None:
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


def load_model(path: Path, env: VecEnv, device: str = "auto") -> DQN:
    """Load a model for evaluation from an SB3 zip or from the weights-only format.

    The replay buffer is not needed to act, so it is created with capacity 1.

    :param path: ``*.zip`` (SB3, pickled: only load files you trust), or ``*.safetensors``/``*.json``
    :param env: the environment to act in (its spaces must match)
    :param device: torch device
    :raises ValueError: naming what is wrong with a file that does not load (one line)
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    no_replay = {"buffer_size": 1, "replay_buffer_class": None, "replay_buffer_kwargs": {}}
    if path.suffix == ".zip":
        try:
            return DQN.load(path, env=env, device=device, custom_objects=no_replay)
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
    meta_file, weights = path.with_suffix(".json"), path.with_suffix(".safetensors")
    meta = read_weights_meta(path)
    _check_weights_meta(meta, meta_file)
    try:
        expected = (_space_from_json(meta["observation_space"]), _space_from_json(meta["action_space"]))
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
        model = DQN(meta["policy"], env, policy_kwargs=policy_kwargs, device=device, **no_replay)
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
