"""Checkpoints for resuming a run, and its best weights (in the weights-only format of
:mod:`spikeq.analysis.weights`).

A training checkpoint is a folder ``checkpoints/step-<N>/`` holding SB3's ``model.zip`` (network,
optimizer, step counter), ``trainer.json`` (the evaluation schedule and best score), ``rng.json``
(Python, NumPy, torch and action-space RNG states), ``episodes.json`` (the last 100 training
episodes' returns and lengths, which SB3 logs the means of and does not save), hard links to the best
weights as they were at step N (``best.*``) and, optionally, the replay buffer (``replay.npz`` +
``replay.json``).

What survives a crash: a checkpoint is written into a temporary folder, flushed to disk and renamed
into place; ``checkpoints/latest`` (replaced atomically) then names it. Resume takes the checkpoint
``latest`` names, or, when that one is missing or does not load, the newest other one that does. No
checkpoint is written from weights that are not finite.

Nothing a resume reads runs code: ``model.zip``'s pickled entries (schedules, spaces, classes) are
replaced by objects rebuilt from the config and the env, its tensors are read with
``torch.load(weights_only=True)``, and the RNG states and replay buffer are JSON and ``.npz`` arrays
(read with ``allow_pickle=False``). SB3 zips from elsewhere contain pickles, which run code when
loaded: share the weights-only format instead (:mod:`spikeq.analysis.weights`).
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from stable_baselines3 import DQN
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.vec_env import VecEnv

from spikeq.analysis.weights import weights_and_meta
from spikeq.files import atomic_path, deferred_signals, fsync_dir, write_atomic

KEEP_CHECKPOINTS = 2
BEST_FILES = ("best.zip", "best.safetensors", "best.json")


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
            expected = f"{current.dtype} {current.ndim}-D" if isinstance(current, np.ndarray) else "none"
            raise ValueError(
                f"the saved replay buffer's {name} ({array.dtype} {array.ndim}-D) does not fit this run's "
                f"buffer ({expected})"
            )
    state = meta["state"]
    for name, value in state.items():
        if not isinstance(value, type(getattr(buffer, name, value))):
            expected = type(getattr(buffer, name)).__name__
            raise ValueError(
                f"the saved replay buffer's {name}={value!r} does not fit this run's buffer (a {expected})"
            )
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
        (tmp / "episodes.json").write_text(json.dumps(list(model.ep_info_buffer or ()), default=float))
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
    # Never the one just written: a run resumed from an older checkpoint (the newer ones did not load)
    # writes below the highest steps.
    for old_step in (step for step in steps[:-KEEP_CHECKPOINTS] if step != model.num_timesteps):
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
    """Restore a model, its RNG states, its last training episodes and (when saved) its replay buffer,
    unpickling nothing.

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
        if (path / "episodes.json").exists():  # the logged training return goes on over the same window
            model.ep_info_buffer.extend(json.loads((path / "episodes.json").read_text()))
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


def save_best(model: DQN, checkpoints: Path, config: dict[str, Any]) -> None:
    """Write ``best.zip``, ``best.safetensors`` and ``best.json`` from ``model``: all three are written
    to temporary files first and renamed only when every one is complete, so a failed write leaves the
    previous three, all from one step; a Ctrl-C or SIGTERM meanwhile is handled once all three are
    renamed.

    :raises ValueError: for non-finite weights (nothing is written)
    """
    tensors, meta = weights_and_meta(model, config, None)
    checkpoints.mkdir(parents=True, exist_ok=True)
    # A Ctrl-C between the three renames would leave files of two steps: it waits for them.
    with (
        deferred_signals(),
        atomic_path(checkpoints / "best.zip") as zip_tmp,
        atomic_path(checkpoints / "best.safetensors") as weights_tmp,
        atomic_path(checkpoints / "best.json") as meta_tmp,
    ):
        with zip_tmp.open("wb") as f:
            model.save(f)
        save_file(tensors, str(weights_tmp))
        meta_tmp.write_text(json.dumps(meta, indent=1))
