"""The ``spikeq`` command. Each subcommand is a thin wrapper over the library functions.

    spikeq train --game Pong --model dsqn --preset paper [--any-config-field VALUE ...]
    spikeq train --resume RUN_DIR
    spikeq evaluate CHECKPOINT [--episodes 30] [--epsilon 0.05] [--out result.json] [--video ep.mp4]
    spikeq export CHECKPOINT.zip OUT      (weights-only .safetensors + .json, safe to share)
    spikeq convert DQN_CHECKPOINT OUT     (ANN->SNN conversion baseline, Tan et al. 2021)
    spikeq export-nir CHECKPOINT OUT.nir [--verify]   (NIR graph for neuromorphic hardware)
    spikeq report RUN_DIR [RUN_DIR ...] --out curves.png
    spikeq table RUN_DIR|EVALUATION.json ... [--out results.md]   (a row per game, model, perturbation)
          [--compare dsqn:firing dqn [--compare-out comparison.md]]      (run by run, bootstrap intervals)
    spikeq sweep experiments/sweeps/FILE.yaml [--count N] [--set name=value]   (no W&B server needed)

Bad input ends with a one-line error and exit code 2. evaluate, export, convert and export-nir refuse to
replace an output file that exists (``--force`` replaces it). W&B sweep agents call
``python -m spikeq.cli train --key=value ...``: every config field is accepted with underscores or
dashes, booleans as ``True``/``False``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import typing
from pathlib import Path
from typing import Any, NoReturn

from spikeq.experiment.config import (
    MODELS,
    PRESETS,
    ConfigError,
    TrainConfig,
    override,
    preset_values,
    resolve,
    settings,
)

if typing.TYPE_CHECKING:
    from stable_baselines3.common.vec_env import VecEnv

    from spikeq.analysis.evaluate import Evaluation
    from spikeq.analysis.perturb import Perturbation
    from spikeq.snn.policy import SpikingPolicy

# What a resumed run may change: where and how it runs, how far it goes, how it checkpoints, and the two
# settings that get a run past a loss that became NaN (resumed from the last finite checkpoint).
RESUME_OVERRIDES = (
    "steps", "device", "wandb", "torch_threads", "checkpoint_freq", "save_replay",
    "learning_rate", "max_grad_norm",
)  # fmt: skip
# Fields with their own options below, or that only presets set.
_SPECIAL = {"game", "model", "preset", "tags"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; allowed: true, false")


def _add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace output files that exist (default: refuse)")


def _check_new(paths: list[Path | None], force: bool) -> None:
    """Before any work: refuse to replace a result file that exists (unless --force), and create the
    folders the results go to (a folder that cannot be made is said now, not after the work)."""
    from spikeq.files import check_new

    paths = [path for path in paths if path is not None]
    try:
        check_new(paths, force)
    except FileExistsError as error:
        raise ConfigError(str(error)) from None
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot write {path}: {error.strerror} ({error.filename})") from None


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "null", "") else float(text)


def _converter(annotation: str) -> Any:
    """The argparse type of a setting whose annotation is ``annotation`` (as ``settings()`` gives it)."""
    hints = {"int": int, "float": float, "str": str, "bool": _bool, "float | None": _optional_float}
    return hints.get(annotation, str)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a DSQN or a baseline on an Atari or MinAtar game")
    p.add_argument(
        "--game", help="ALE game (Pong, PongNoFrameskip-v4) or MinAtar game (MinAtar/Breakout); default Pong"
    )
    p.add_argument("--model", help=f"one of {', '.join(MODELS)} (default dsqn)")
    p.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default paper)")
    p.add_argument("--tags", help="comma-separated W&B tags")
    p.add_argument(
        "--run-dir",
        "--run_dir",
        type=Path,
        help="run directory (default <out-dir>/<game>-<model>-s<seed>-<time>)",
    )
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its checkpoint")
    p.add_argument(
        "--force", action="store_true", help="overwrite an existing run directory (a spikeq run only)"
    )
    for name, (annotation, doc) in settings().items():
        if name in _SPECIAL:
            continue
        options = [f"--{name.replace('_', '-')}"]
        if "_" in name:
            options.append(f"--{name}")
        text = doc.replace("%", "%%") + " (default: the preset's)"
        # A bare boolean flag means true, as W&B's ${args_no_boolean_flags} passes it.
        flag = dict(nargs="?", const=True) if annotation == "bool" else {}
        p.add_argument(*options, dest=name, type=_converter(annotation), help=text, **flag)
    p.set_defaults(handler=_train)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = {name: getattr(args, name, None) for name in settings() if name not in _SPECIAL}
    overrides = {k: v for k, v in values.items() if v is not None}
    if args.game is not None:
        overrides["game"] = args.game
    if args.tags is not None:
        overrides["tags"] = _tags(args.tags)
    return overrides


def _tags(text: str) -> list[str]:
    """``a,b``, or a list as a sweep passes one (``["a", "b"]``)."""
    if text.startswith("["):
        import yaml

        try:
            tags = yaml.safe_load(text)
        except yaml.YAMLError:
            tags = None
        if not isinstance(tags, list):
            raise ConfigError(f"--tags {text!r} is not a list; allowed: a,b or [a, b]")
        return [str(tag) for tag in tags]
    return [tag for tag in text.split(",") if tag]


def _print_config(config: TrainConfig) -> None:
    from spikeq.experiment.train import cpu_warning, resolve_device

    values = config.to_dict()
    device = resolve_device(config.device)
    if config.device == "auto":
        values["device"] = f"auto ({device})"
    width = max(len(k) for k in values)
    print("spikeq train: resolved config")
    for key, value in values.items():
        print(f"  {key:<{width}}  {value}")
    if config.exploration_steps > config.steps:
        final = config.exploration_initial_eps + (
            config.exploration_final_eps - config.exploration_initial_eps
        ) * (config.steps / config.exploration_steps)
        print(
            f"note: steps={config.steps:,} < exploration_steps={config.exploration_steps:,}: "
            f"epsilon decays at the configured rate and ends the run at {final:.3f}"
        )
    warning = cpu_warning(config, device)
    if warning:
        print(warning)
    sys.stdout.flush()


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The config of a new run, or of the run being resumed with the overrides given."""
    overrides = _overrides(args)
    if args.resume is None:
        preset = "paper" if args.preset is None else args.preset
        return resolve(preset, "dsqn" if args.model is None else args.model, **overrides)
    for flag, given in (("--run-dir", args.run_dir is not None), ("--force", args.force)):
        if given:
            raise ConfigError(f"{flag} cannot be used with --resume: a run continues in its own directory")
    config_file = args.resume / "config.yaml"
    if not config_file.exists():
        raise ConfigError(f"cannot resume: {config_file} not found (is {args.resume} a spikeq run?)")
    saved = TrainConfig.load(config_file)
    for key in ("game", "model", "preset"):
        given = overrides.get(key, getattr(args, key))
        if given is not None and given != getattr(saved, key):
            raise ConfigError(
                f"--{key} {given} does not match the run being resumed ({key}={getattr(saved, key)})"
            )
    saved_values = saved.to_dict()
    changes = {k: v for k, v in overrides.items() if k != "game" and v != saved_values[k]}
    fixed = sorted(set(changes) - set(RESUME_OVERRIDES))
    if fixed:
        raise ConfigError(
            f"cannot change {', '.join(fixed)} when resuming (the checkpoint was trained with the saved "
            f"values); allowed: {', '.join(RESUME_OVERRIDES)}"
        )
    # Saved by open_run once the checkpoint has loaded: a rejected resume leaves config.yaml as it was.
    return override(saved, **changes)


def _train(args: argparse.Namespace) -> int:
    from spikeq.experiment.train import open_run

    try:
        config = _train_config(args)
        _print_config(config)
        trainer = open_run(
            config, run_dir=args.resume or args.run_dir, force=args.force, resume=bool(args.resume)
        )
    except ValueError as error:  # ConfigError, or a bad game / space found while opening the run
        raise ConfigError(str(error).splitlines()[0]) from None
    except KeyboardInterrupt:
        print("spikeq train: interrupted before training started", file=sys.stderr)
        return 130
    handlers = {stop: signal.getsignal(stop) for stop in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"run directory: {trainer.run_dir}  (W&B: {trainer.tracker.mode})", flush=True)
        result = trainer.run()
    finally:
        # What could be saved is saved: a further Ctrl-C while the envs close changes nothing.
        for stop in handlers:
            signal.signal(stop, signal.SIG_IGN)
        trainer.close()
    print(result.message, file=sys.stderr if result.exit_code else sys.stdout, flush=True)
    if result.status != "interrupted":
        for stop, handler in handlers.items():
            signal.signal(stop, handler)
    # Interrupted: the process is ending with 128 + signal; one more Ctrl-C must not turn that into a
    # KeyboardInterrupt on the way out, so signals stay ignored.
    return result.exit_code


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write an SB3 zip as weights-only .safetensors + .json")
    p.add_argument("checkpoint", type=Path, help="SB3 model zip (e.g. runs/.../checkpoints/best.zip)")
    p.add_argument("out", type=Path, help="output stem: OUT.safetensors and OUT.json are written")
    _add_force(p)
    p.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from stable_baselines3 import DQN

    from spikeq.analysis import weights

    if not args.checkpoint.exists():
        raise ConfigError(f"checkpoint {args.checkpoint} does not exist")
    _check_new(list(weights.weights_paths(args.out)), args.force)
    try:
        model = DQN.load(args.checkpoint, device="cpu", custom_objects={"buffer_size": 1})
    except (ValueError, RuntimeError, KeyError, OSError, EOFError, TypeError) as error:
        raise ConfigError(f"{args.checkpoint} does not load: {str(error).splitlines()[0]}") from None
    try:
        paths = weights.export_weights(model, args.out, _checkpoint_config(args.checkpoint))
    except (ValueError, OSError) as error:
        raise ConfigError(f"cannot export {args.checkpoint}: {error}") from None
    for path in paths:
        print(path)
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="score a checkpoint and measure its energy per action (or a random policy)"
    )
    p.add_argument("checkpoint", type=Path, nargs="?", help="SB3 zip, or weights-only .safetensors/.json")
    p.add_argument(
        "--random",
        action="store_true",
        help="score the uniformly random policy instead of a checkpoint (needs --game): chance level",
    )
    p.add_argument("--game", help="ALE or MinAtar game (default: the game stored with the checkpoint)")
    p.add_argument("--episodes", type=int, default=30, help="episodes to play (paper: 30)")
    p.add_argument("--epsilon", type=float, default=0.05, help="random-action probability (paper: 0.05)")
    p.add_argument(
        "--max-episode-steps",
        type=int,
        help="agent-step cap (default: the checkpoint's config, else 18,000 for Atari as the paper, "
        "10,000 for MinAtar)",
    )
    p.add_argument("--noop-max", type=int, default=30, help="Atari: random no-ops at reset (paper: 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the env and the exploration")
    p.add_argument("--energy-model", default="45nm", help="45nm, loihi, or a YAML profile")
    p.add_argument(
        "--num-steps",
        type=int,
        help="run a spiking checkpoint for this many time steps T per decision instead of the T it was "
        "trained with (default: its own)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1, fastest for these networks on a loaded machine; 0: torch's)",
    )
    p.add_argument("--out", type=Path, help="JSON file for the results (default: print only)")
    p.add_argument("--video", type=Path, help="record the first episode to this MP4 file")
    _add_force(p)
    p.add_argument(
        "--perturb",
        default="none",
        help="perturb the observations of greedy decisions: none, gaussian:SIGMA or fgsm:EPS "
        "in units of the observations' range (the [0, 1] pixel range on Atari, a cell's 0 to 1 on "
        "MinAtar), e.g. fgsm:0.01",
    )
    p.add_argument(
        "--attacker",
        type=Path,
        help="craft the FGSM step on this checkpoint's network instead (a transferred attack, needs "
        "--perturb fgsm:EPS; recorded as fgsm:EPS@MODEL, MODEL the attacker's, or fgsm:EPS@NAME as given)",
    )
    p.set_defaults(handler=_evaluate)


def _checkpoint_config(path: Path) -> dict[str, Any]:
    """What a checkpoint was trained with (game, model, seed, ...): from a weights-only JSON or the
    run's config.yaml; empty where neither says."""
    if path.suffix in (".safetensors", ".json"):
        from spikeq.analysis.weights import read_weights_meta

        return read_weights_meta(path).get("config", {})
    for folder in (path.parent, path.parent.parent, path.parent.parent.parent):
        if (folder / "config.yaml").exists():
            return TrainConfig.load(folder / "config.yaml").to_dict()
    return {}


def _game_of(args: argparse.Namespace) -> str:
    """``--game``, else the game stored with ``args.checkpoint``, which must exist."""
    if args.checkpoint is None:
        raise ConfigError("no checkpoint given; pass a checkpoint file (or --random --game GAME)")
    if not args.checkpoint.exists():
        raise ConfigError(f"checkpoint {args.checkpoint} does not exist")
    game = args.game or _checkpoint_config(args.checkpoint).get("game")
    if game is None:
        raise ConfigError(f"cannot tell which game {args.checkpoint} plays; pass --game")
    return game


def _check_run_options(args: argparse.Namespace) -> None:
    """The options ``evaluate`` shares with a training config, checked by the config's rules; sets the
    torch thread count."""
    import torch

    from spikeq.experiment.config import MAX_SEED, MAX_TORCH_THREADS

    if not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(f"--seed {args.seed} is out of range; allowed: 0 to 2**32 - 1 ({MAX_SEED})")
    if args.max_episode_steps < 1:
        raise ConfigError(f"--max-episode-steps {args.max_episode_steps} must be >= 1")
    if args.noop_max < 0:
        raise ConfigError(f"--noop-max {args.noop_max} must be >= 0")
    if not 0 <= args.torch_threads <= MAX_TORCH_THREADS:
        raise ConfigError(
            f"--torch-threads {args.torch_threads} is out of range; allowed: 0 to {MAX_TORCH_THREADS}"
        )
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from spikeq.analysis.energy import load_energy_model
    from spikeq.analysis.evaluate import evaluate_model, evaluation_record
    from spikeq.analysis.perturb import Perturbation
    from spikeq.analysis.weights import load_model
    from spikeq.envs import games
    from spikeq.experiment.train import resolve_device
    from spikeq.files import write_atomic

    _check_new([args.out, args.video], args.force)
    try:
        if args.random:
            if args.checkpoint is not None:
                raise ConfigError(f"--random plays no checkpoint; drop {args.checkpoint} or --random")
            if args.game is None:
                raise ConfigError("--random needs --game (e.g. --game MinAtar/Breakout)")
            if args.num_steps is not None:
                raise ConfigError(f"--random runs no network; drop --num-steps {args.num_steps}")
            game, trained = args.game, {"model": "random"}
        else:
            game = _game_of(args)
            trained = _checkpoint_config(args.checkpoint)
        if args.episodes < 1:
            raise ConfigError(f"--episodes {args.episodes} must be >= 1")
        if not 0 <= args.epsilon <= 1:
            raise ConfigError(f"--epsilon {args.epsilon} must lie in [0, 1]")
        if args.max_episode_steps is None:
            family_cap = 10_000 if games.is_minatar(game) else 18_000
            args.max_episode_steps = trained.get("max_episode_steps") or family_cap
        _check_run_options(args)
        max_episode_steps = args.max_episode_steps
        energy_model = load_energy_model(args.energy_model)
        perturbation = _attack(Perturbation.parse(args.perturb), args.attacker)
        env = games.make_env(
            game,
            n_envs=1,
            seed=args.seed,
            train=False,
            max_episode_steps=max_episode_steps,
            noop_max=args.noop_max,
            render_mode="rgb_array" if args.video else None,
        )
        device = resolve_device(args.device)
        model = None if args.random else load_model(args.checkpoint, env, device, args.num_steps)
        attacker = None if args.attacker is None else load_model(args.attacker, env, device)
    except ValueError as error:
        raise ConfigError(str(error).splitlines()[0]) from None
    result = evaluate_model(
        model,
        env,
        n_episodes=args.episodes,
        epsilon=args.epsilon,
        seed=args.seed,
        energy_model=energy_model,
        video_path=args.video,
        game=games.game_short_name(game),
        perturbation=perturbation,
        attacker=attacker,
    )
    env.close()
    record = evaluation_record(result, args.checkpoint, trained, args.attacker)
    print(format_evaluation(result))
    if args.out:
        write_atomic(args.out, json.dumps(record, indent=1))
        print(f"written: {args.out}")
    return 0


def _attack(perturbation: Perturbation, attacker: Path | None) -> Perturbation:
    """``--perturb`` with ``--attacker``: a transferred FGSM attack named after the attacker's model
    (unless ``--perturb`` names it); refused for any other perturbation, or a name without an attacker."""
    import dataclasses

    if attacker is None:
        if perturbation.attacker is not None:
            raise ConfigError(
                f"--perturb {perturbation} names an attacker; give its checkpoint: --attacker FILE"
            )
        return perturbation
    if perturbation.kind != "fgsm":
        raise ConfigError(f"--attacker crafts an FGSM step; --perturb {perturbation} is not fgsm:EPS")
    if not attacker.exists():
        raise ConfigError(f"attacker checkpoint {attacker} does not exist")
    name = perturbation.attacker or _checkpoint_config(attacker).get("model") or attacker.stem
    return dataclasses.replace(perturbation, attacker=name)


def _fmt(value: Any, spec: str = ",.1f") -> str:
    return "n/a" if value is None else format(value, spec)


def format_evaluation(result: Evaluation) -> str:
    """A short human-readable summary of ``evaluate_model``'s result."""
    lines = [
        f"{result.game}: score {result.score_mean:.2f} ± {result.score_std:.2f} "
        f"(min {result.score_min:.1f}, max {result.score_max:.1f}, {result.episodes} episodes, "
        f"human-normalised {_fmt(result.human_normalized, '.3f')})",
    ]
    energy = result.energy
    if energy is None:  # the random policy runs no network
        return "\n".join(lines)
    if energy.firing_rate:
        rates = ", ".join(f"{k} {v:.4f}" for k, v in energy.firing_rate.items())
        lines.append(f"firing rate (T = {energy.num_steps}): {rates}")
        spikes, sops = _fmt(energy.spikes_per_action), _fmt(energy.sops_per_action)
        lines.append(f"per action: {spikes} spikes, {sops} SOPs, {_fmt(energy.macs_per_action)} MACs")
    lines.append(
        f"energy per action ({energy.energy_model.name}): {_fmt(energy.energy_pj_per_action)} pJ; "
        f"ANN with the same layers {_fmt(energy.ann_energy_pj_per_action)} pJ; "
        f"ratio {_fmt(energy.energy_ratio, '.4f')}"
    )
    return "\n".join(lines)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from spikeq.analysis.convert import PAPER_FRAMES, PAPER_NUM_STEPS, PAPER_PERCENTILE

    p = sub.add_parser("convert", help="convert a trained ANN DQN into a spiking one (Tan et al. 2021)")
    p.add_argument("checkpoint", type=Path, help="the ANN DQN: SB3 zip, or weights-only .safetensors/.json")
    p.add_argument(
        "out", type=Path, help="output stem: OUT.safetensors and OUT.json (spikeq evaluate reads them)"
    )
    p.add_argument("--game", help="ALE or MinAtar game (default: the game stored with the checkpoint)")
    p.add_argument(
        "--frames",
        type=int,
        default=PAPER_FRAMES,
        help=f"frames played to record activations (paper: {PAPER_FRAMES:,})",
    )
    p.add_argument(
        "--num-steps", type=int, default=PAPER_NUM_STEPS, help=f"T of the SNN (paper: {PAPER_NUM_STEPS})"
    )
    p.add_argument(
        "--percentile",
        type=float,
        default=PAPER_PERCENTILE,
        help=f"activation percentile per layer (paper: {PAPER_PERCENTILE})",
    )
    p.add_argument(
        "--epsilon", type=float, default=0.05, help="random-action probability while recording (paper: 0.05)"
    )
    p.add_argument(
        "--agreement-frames",
        type=int,
        default=500,
        help="further frames on which SNN and ANN actions are compared (0: skip)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the env and the exploration")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    _add_force(p)
    p.set_defaults(handler=_convert)


def _convert(args: argparse.Namespace) -> int:
    from spikeq.analysis.convert import (
        action_agreement,
        ann_layers,
        check_conversion,
        convert_dqn,
        record_frames,
    )
    from spikeq.analysis.weights import export_weights, load_model, weights_paths
    from spikeq.envs import games
    from spikeq.experiment.train import resolve_device

    _check_new(list(weights_paths(args.out)), args.force)
    try:
        game = _game_of(args)
        if args.frames < 1:
            raise ConfigError(f"--frames {args.frames} must be >= 1")
        if args.agreement_frames < 0:
            raise ConfigError(f"--agreement-frames {args.agreement_frames} must be >= 0")
        check_conversion(args.num_steps, args.percentile)  # before minutes of play
        env = games.make_env(game, n_envs=1, seed=args.seed, train=False)
        ann = load_model(args.checkpoint, env, resolve_device(args.device))
        ann_layers(ann)  # an ANN DQN with ReLUs, before minutes of play
        frames = record_frames(ann, env, args.frames + args.agreement_frames, args.epsilon, args.seed)
        snn, conversion = convert_dqn(ann, frames[: args.frames], args.num_steps, args.percentile)
    except ValueError as error:
        raise ConfigError(str(error).splitlines()[0]) from None
    scales = ", ".join(f"{name} {scale:.4g}" for name, scale in conversion.scales.items())
    print(f"layer scales (percentile {conversion.percentile} of the positive activations): {scales}")
    summary = conversion.to_dict()
    if args.agreement_frames:
        agreement = action_agreement(ann, snn, frames[args.frames :])
        summary["agreement_frames"] = args.agreement_frames
        summary.update(agreement)
        print(
            f"on {args.agreement_frames} further frames the SNN (T={args.num_steps}) chose the DQN's "
            f"action on {agreement['agreement']:.1%}; Q rmse {agreement['q_rmse']:.4g} "
            f"(DQN Q rms {agreement['q_scale']:.4g})"
        )
    trained = _checkpoint_config(args.checkpoint)
    config = {
        "game": games.game_short_name(game),
        "model": f"{trained.get('model', 'dqn')}-converted",
        "seed": trained.get("seed"),
    }
    for path in export_weights(snn, args.out, config, extra={"conversion": summary}):
        print(path)
    env.close()
    return 0


def _add_export_nir(sub: argparse._SubParsersAction) -> None:
    from spikeq.analysis.nir_export import DEFAULT_DT, MIN_AGREEMENT

    p = sub.add_parser(
        "export-nir", help="write a spiking checkpoint as a NIR graph for neuromorphic hardware"
    )
    p.add_argument(
        "checkpoint", type=Path, help="DSQN checkpoint: SB3 zip, or weights-only .safetensors/.json"
    )
    p.add_argument("out", type=Path, help="the .nir file to write")
    p.add_argument("--verify", action="store_true", help="read the file back and compare it with the policy")
    p.add_argument(
        "--game", help="ALE or MinAtar game, or a gymnasium id (default: the game stored with the checkpoint)"
    )
    p.add_argument("--frames", type=int, default=300, help="--verify: observations recorded from the game")
    p.add_argument(
        "--epsilon", type=float, default=0.05, help="--verify: random-action probability while playing"
    )
    p.add_argument("--seed", type=int, default=0, help="--verify: seed of the env and the exploration")
    p.add_argument(
        "--dt", type=float, default=DEFAULT_DT, help=f"time step of the NIR neurons (default {DEFAULT_DT})"
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        default=MIN_AGREEMENT,
        help=f"--verify: exit 1 below this share of equal greedy actions (default {MIN_AGREEMENT})",
    )
    _add_force(p)
    p.set_defaults(handler=_export_nir)


def _export_nir(args: argparse.Namespace) -> int:
    from spikeq.analysis.nir_export import action_names, export_nir, load_spiking_policy, make_observation_env

    _check_new([args.out], args.force)
    try:
        policy = load_spiking_policy(args.checkpoint)
        game = args.game or _checkpoint_config(args.checkpoint).get("game")
        if args.verify and game is None:
            raise ConfigError(f"cannot tell which game {args.checkpoint} plays; pass --game to --verify")
        if args.frames < 1:
            raise ConfigError(f"--frames {args.frames} must be >= 1")
        for flag, value in (("--epsilon", args.epsilon), ("--min-agreement", args.min_agreement)):
            if not 0 <= value <= 1:
                raise ConfigError(f"{flag} {value} must lie in [0, 1]")
        env = make_observation_env(game, args.seed) if game else None
        names = action_names(env) if env else None
        result = export_nir(policy, args.out, dt=args.dt, action_names=names)
    except ValueError as error:
        raise ConfigError(str(error).splitlines()[0]) from None
    meta = result.graph.metadata
    print(f"wrote {result.path}: {' -> '.join(result.graph.nodes)}")
    print(
        f"  T={meta['num_steps']}, dt={meta['dt']:g} s, input scale {meta['input_scale']:.6g}, "
        f"actions {meta['action_names']}"
    )
    print("what NIR leaves to the host or simulator:")
    for note in result.notes:
        print(f"  - {note}")
    if args.verify:
        return _verify_export(args, policy, env, game)
    if env is not None:
        env.close()
    return 0


def _verify_export(args: argparse.Namespace, policy: SpikingPolicy, env: VecEnv, game: str) -> int:
    """``export-nir --verify``: run the written graph on observations played in ``env`` (then closed)
    and print how far it agrees with ``policy``; exit code 1 below ``--min-agreement``."""
    from spikeq.analysis.convert import record_frames
    from spikeq.analysis.nir_export import verify_nir

    frames = record_frames(policy, env, args.frames, args.epsilon, args.seed, progress=False)
    env.close()
    check = verify_nir(args.out, policy, frames, seed=args.seed)
    print(
        f"verify: {check['observations']} observations of {game} (epsilon {args.epsilon}, seed {args.seed})"
    )
    print(f"verify: simulated with {check['simulator']}")
    print(
        f"verify: same greedy action on {check['agreement']:.1%}; largest |Q difference| "
        f"{check['max_q_diff']:.3g} (largest |Q| {check['q_scale']:.3g})"
    )
    torso = check["snntorch_torso"]
    if isinstance(torso, dict):
        print(
            f"verify: snnTorch's import_from_nir of the hidden layers: {torso['differing']} of "
            f"{torso['spikes']} spikes of the last hidden layer differ"
        )
    else:
        print(f"verify: not cross-checked with snnTorch: {torso}")
    if check["agreement"] < args.min_agreement:
        print(f"verify failed: agreement below {args.min_agreement:.1%}", file=sys.stderr)
        return 1
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="plot the evaluation curves of run directories")
    p.add_argument("runs", type=Path, nargs="+", help="run directories")
    p.add_argument(
        "--out", type=Path, default=Path("curves.png"), help="image file, regenerated (default curves.png)"
    )
    p.add_argument("--title", help="figure title (default: the games)")
    p.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from spikeq.analysis.report import plot_runs

    try:
        print(plot_runs(args.runs, args.out, args.title))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return 0


def _add_table(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("table", help="one results row per game, model and perturbation from finished runs")
    p.add_argument(
        "paths", type=Path, nargs="+", help="run directories or 'spikeq evaluate --out' JSON files"
    )
    p.add_argument("--out", type=Path, help="also write the table, regenerated: .md (Markdown) or .csv")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("MODEL", "BASELINE"),
        help="also compare two models run by run, e.g. --compare dsqn:firing dqn (MODEL[:INIT]): per game "
        "and over games, with bootstrap intervals, each game left out in turn, and again for each setting "
        "both were run with; needs each game's random policy among the paths "
        "(spikeq evaluate --random --out)",
    )
    p.add_argument("--compare-out", type=Path, help="also write the comparison, regenerated (Markdown)")
    p.set_defaults(handler=_table)


def _table(args: argparse.Namespace) -> int:
    from spikeq.analysis.compare import comparison_report
    from spikeq.analysis.report import format_table, results_table, write_table
    from spikeq.files import write_atomic

    if args.compare_out and not args.compare:
        raise ConfigError("--compare-out needs --compare MODEL BASELINE")

    # Run directories that hold no result yet (unfinished runs, runs/sweeps/ under a glob) are skipped.
    paths = [p for p in args.paths if not p.is_dir() or (p / "evaluation.json").exists()]
    for path in sorted(set(args.paths) - set(paths)):
        print(f"skipped {path}: no evaluation.json (not a finished run)", file=sys.stderr)
    try:
        if not paths:
            raise ValueError("none of the directories holds a finished run's evaluation.json")
        rows = results_table(paths, reference=preset_values)
        print(format_table(rows))
        if args.out:
            print(f"written: {write_table(rows, args.out)}")
        if args.compare:
            comparison = comparison_report(paths, *args.compare, reference=preset_values).markdown
            print(f"\n{comparison}")
            if args.compare_out:
                args.compare_out.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(args.compare_out, comparison + "\n")
                print(f"written: {args.compare_out}")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a W&B sweep file here, without a W&B server (grid, random)")
    p.add_argument("file", type=Path, help="W&B sweep YAML (e.g. experiments/sweeps/readouts.yaml)")
    p.add_argument(
        "--count", type=int, help="runs: random draws (required for random), or the first N of a grid"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="fix a parameter for every run (repeatable), e.g. --set wandb=offline --set steps=100000",
    )
    p.add_argument("--state", type=Path, help="record of finished runs (default runs/sweeps/<sweep>.jsonl)")
    p.add_argument("--dry-run", action="store_true", help="print the runs' commands only")
    p.set_defaults(handler=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    import yaml

    from spikeq.experiment.sweep import expand, load_sweep, run_sweep

    overrides = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--set {item!r} is not NAME=VALUE")
        overrides[name] = yaml.safe_load(value)
    try:
        sweep = load_sweep(args.file, overrides)
        runs = expand(sweep, args.count, args.seed)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    state = args.state or Path("runs") / "sweeps" / f"{sweep.name}.jsonl"
    print(f"sweep {sweep.name}: {len(runs)} run(s), {sweep.method}; finished runs recorded in {state}")
    try:
        results = run_sweep(sweep, runs, state, dry_run=args.dry_run)
    except KeyboardInterrupt:
        print(
            f"sweep stopped; the same command continues it (a spikeq train run from its last checkpoint; "
            f"finished runs are in {state})",
            file=sys.stderr,
        )
        return 130
    failed = [r for r in results if r["returncode"] not in (0, None)]
    elsewhere = sum(r["returncode"] is None for r in results)
    if not args.dry_run:
        succeeded = len(results) - len(failed) - elsewhere
        others = f" ({elsewhere} running in another sweep process)" if elsewhere else ""
        print(f"sweep {sweep.name}: {succeeded} of {len(runs)} run(s) succeeded{others}")
        for record in failed:
            print(f"  failed (exit {record['returncode']}): {' '.join(record['command'])}")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The ``spikeq`` argument parser."""
    description = "Deep spiking Q-networks on Atari and MinAtar (snnTorch + SB3)."
    parser = _Parser(prog="spikeq", description=description)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _add_convert(sub)
    _add_export_nir(sub)
    _add_report(sub)
    _add_table(sub)
    _add_sweep(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spikeq`` console script."""
    import spikeq  # noqa: F401  (registers SpikingPolicy)

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"spikeq {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
