"""The ``pacs-triage train``, ``evaluate`` and ``demo-weights`` commands; ``workers.cli`` adds them.

torch, the models and the recipes are imported inside the handlers, so building the console's parser
(which every ``pacs-triage`` command does) stays cheap; which models can be trained is known only then,
from the recipes the plugins bring (:mod:`training.registry`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.settings import Settings

__all__ = ["DATASETS", "load_records", "parse_assignments", "parse_input_size", "register"]

#: ``--dataset`` choices, each an adapter of :mod:`training.datasets`.
DATASETS: tuple[str, ...] = ("cbis-ddsm", "inbreast", "mias", "busi", "csv")


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser | None = None,
) -> None:
    """Add ``train``, ``evaluate`` and ``demo-weights``; each handler is ``func(args, settings) -> int``.

    :param subparsers: the console command's subparsers.
    :param common: the options every command takes (``--config``), as a parent parser.
    """
    parents = [common] if common is not None else []
    _register_train(subparsers, parents)
    _register_evaluate(subparsers, parents)
    _register_demo(subparsers, parents)


def _add_data_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        choices=DATASETS,
        default="csv",
        help="the data set's layout: cbis-ddsm (case-description CSVs + DICOM), inbreast "
        "(XLS/XLSX/CSV + DICOM), mias (Info.txt + PGM), busi (class folders + masks) or csv "
        "(path,label[,birads,patient_id,mask]); default csv",
    )
    group.add_argument(
        "--data",
        type=Path,
        required=required,
        metavar="PATH",
        help="the data set's folder (or, for csv, the CSV file)",
    )
    group.add_argument(
        "--cbis-abnormality",
        default="mass",
        metavar="KINDS",
        help="CBIS-DDSM tables to read: mass, calc or mass,calc (default mass)",
    )
    group.add_argument(
        "--inbreast-malignant-from",
        type=int,
        default=4,
        metavar="K",
        help="INbreast: BI-RADS >= K is malignant (default 4)",
    )


def _prevalence(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not a prevalence strictly between 0 and 1")
    return value


def _add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration and operating points (docs/training.md)")
    group.add_argument(
        "--prevalence",
        type=_prevalence,
        metavar="P",
        help="the share of positive (malignant) images where the model will be used, e.g. 0.01 for "
        "screening: the risk is calibrated at it on the validation split, which corrects the class-prior "
        "shift of balanced sampling and class weights; without it the risk stays an uncalibrated "
        "suspicion score",
    )
    group.add_argument(
        "--calibration",
        choices=("platt", "isotonic"),
        default="platt",
        help="Platt scaling with an intercept, or isotonic regression (default platt)",
    )
    group.add_argument(
        "--target-sensitivity",
        type=_prevalence,
        default=0.95,
        metavar="S",
        help="the sensitivity of the high_sensitivity operating point (default 0.95)",
    )
    group.add_argument(
        "--target-specificity",
        type=_prevalence,
        default=0.90,
        metavar="S",
        help="the specificity of the high_specificity operating point (default 0.90)",
    )


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; 0 loads in the main process")
    return value


def _register_train(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "train",
        parents=parents,
        help="train a model the way its paper did, on your data; calibrate, export and evaluate it",
        description=(
            "Split by patient; train with the architecture's recipe (the paper's preprocessing, "
            "augmentation, sampler, loss, optimiser, schedule, staged unfreezing and early stopping); "
            "fit the temperature on the validation split; with --prevalence, calibrate the risk at that "
            "prevalence (Platt or isotonic on the validation split reweighted to it); choose the operating "
            "points there; export a checkpoint the plugin loads; evaluate "
            "the test split through the plugin. --show-recipe lists every hyperparameter and where its "
            "default comes from."
        ),
    )
    parser.add_argument(
        "--arch",
        "--model",
        dest="arch",
        required=True,
        metavar="NAME",
        help="the model plugin to train (built-in: asg_mammonet, clgb_net, lem, hybrid_birads, us_fusion; "
        "an installed plugin may bring its own recipe)",
    )
    _add_data_arguments(parser, required=False)
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (checkpoint, state, metrics)")
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--epochs", type=int, help="epochs (the main stage's); the recipe's by default")
    recipe.add_argument("--batch-size", type=int, help="images per batch")
    recipe.add_argument("--lr", type=float, help="learning rate (the main stage's)")
    recipe.add_argument("--input-size", metavar="SIZE", help="model input, e.g. 224 or 1024x832 (HxW)")
    recipe.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="hyper",
        help="override a recipe hyperparameter (repeatable); see --show-recipe",
    )
    recipe.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="options",
        help="override a plugin option, e.g. backbone=resnet50 (recorded in the checkpoint)",
    )
    recipe.add_argument(
        "--imagenet",
        action="append",
        default=[],
        metavar="[KEY=]PATH",
        help="start from ImageNet weights in a local timm weights file (nothing is downloaded); "
        "KEY names the backbone for two-backbone models (clgb_net: "
        "cnn, swin; us_fusion: mobilenet, densenet). Default: random initialisation",
    )
    recipe.add_argument("--show-recipe", action="store_true", help="print the recipe and exit")
    split = parser.add_argument_group("split")
    split.add_argument(
        "--split",
        default="paper",
        metavar="HOW",
        help="paper (the recipe's train/val/test shares), official (CBIS-DDSM's own split), "
        "or shares such as 0.7,0.15,0.15; always by patient",
    )
    split.add_argument(
        "--folds",
        type=int,
        metavar="K",
        help="k-fold cross-validation (default: where the paper used it, e.g. 5 on BUSI for "
        "us_fusion; 0 = one split)",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--seed", type=int, default=42, help="seed of the split, the sampler and the augmentation"
    )
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    run.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision: float16 with loss scaling on CUDA, bfloat16 on the CPU (fast only where the "
        "CPU has bfloat16 instructions); default on for CUDA, off for the CPU",
    )
    run.add_argument(
        "--workers",
        type=_non_negative_int,
        metavar="N",
        help="data-loading processes, each with one thread; 0 = decode and augment in the main process "
        "(default: up to 8 on CUDA, 0 on the CPU, where workers compete with training for the cores); "
        "the weights do not depend on N",
    )
    run.add_argument(
        "--cache",
        choices=("auto", "memory", "none"),
        default="auto",
        help="keep decoded images in memory (auto: when they fit in 2 GiB)",
    )
    run.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="N",
        help="train N times with seeds SEED..SEED+N-1 (a new split each) and report the test metrics as "
        "mean ± std, as ASG-MammoNet's paper does over 10 runs; the best run is exported (default 1)",
    )
    run.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from --out/train_state.pt"
    )
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: when stderr is a terminal)",
    )
    run.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples of the AUC CI"
    )
    _add_calibration_arguments(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--compare-paper", action="store_true", help="print the paper's table beside ours")
    output.add_argument(
        "--deploy",
        type=Path,
        metavar="CONFIG",
        help="set plugins.models.<arch>.weights in this YAML config to the new checkpoint",
    )
    output.add_argument("--demo", action="store_true", help="label the checkpoint as demo weights")
    output.add_argument("--weights-version", default="1.0", help="the version the checkpoint records")
    parser.set_defaults(func=run_train)


def _register_evaluate(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        parents=parents,
        help="evaluate a checkpoint through the plugin's own inference path: metrics, ROC, confusion matrix",
        description=(
            "Run the images through the plugin with the checkpoint configured (the same path as a worker), "
            "and report accuracy, precision, recall/sensitivity, specificity, F1, AUC with a bootstrap CI, "
            "MCC, DIP, per-class metrics, ECE and, for LEM with masks, Dice."
        ),
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, metavar="PATH", help="the .safetensors file"
    )
    _add_data_arguments(parser, required=True)
    parser.add_argument(
        "--split",
        default="all",
        choices=("all", "train", "val", "test"),
        help="all images, or one part of the split the checkpoint was trained with "
        "(re-made from the seed and shares recorded in it); default all",
    )
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="write metrics.json, PNGs and predictions.csv here"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--compare-paper", action="store_true", help="print the paper's table beside ours")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples of the AUC CI"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    parser.set_defaults(func=run_evaluate)


def _register_demo(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo-weights",
        parents=parents,
        help="train every model briefly on generated phantoms and write demo checkpoints",
        description=(
            "Generate synthetic lesion phantoms, train each architecture on them for a few epochs on this "
            "machine, and write <arch>.safetensors into --out. The checkpoints say they are demo weights, so "
            "every prediction, SR and heatmap made with them is labelled DEMO. Point "
            "plugins.demo_weights_dir at --out to use them."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the checkpoints")
    parser.add_argument(
        "--arch",
        action="append",
        default=[],
        metavar="NAME",
        help="only this model (repeatable; default every model whose recipe has a demo profile)",
    )
    parser.add_argument("--epochs", type=int, help="epochs per model (default: each profile's)")
    parser.add_argument("--images", type=int, help="synthetic images per model (default: each profile's)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the phantoms and the training")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: when stderr is a terminal)",
    )
    parser.add_argument(
        "--prevalence",
        type=_prevalence,
        metavar="P",
        help="calibrate each risk at this prevalence of positive phantoms (default: not calibrated)",
    )
    parser.set_defaults(func=run_demo_weights)


# ---------------------------------------------------------------------------------------------------------
# Parsing helpers


def parse_assignments(items: Sequence[str], what: str) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``.

    :raises ValueError: naming *what* for an item without ``=``.
    """
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} {item!r} is not KEY=VALUE")
        parsed[key.strip()] = value.strip()
    return parsed


def parse_input_size(text: str | None) -> tuple[int, int] | None:
    """``"224"`` -> (224, 224); ``"1024x832"`` -> (1024, 832) (height x width)."""
    if text is None:
        return None
    parts = text.lower().replace("*", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"input size {text!r} is not N or HxW") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 16:
        raise ValueError(f"input size {text!r} must be N or HxW with sides of at least 16")
    return values[0], values[1]


def _parse_split(text: str) -> str | dict[str, float]:
    if text in ("paper", "official"):
        return text
    try:
        shares = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--split {text!r} is not paper, official or shares like 0.7,0.15,0.15") from None
    if len(shares) not in (2, 3) or any(v < 0 for v in shares) or sum(shares) <= 0:
        raise ValueError(f"--split {text!r} needs two or three non-negative shares (train,val[,test])")
    return dict(zip(("train", "val", "test"), shares, strict=False))


def _imagenet_sources(items: Sequence[str], recipe: Any) -> dict[str, str]:
    sources: dict[str, str] = {}
    backbones = list(recipe.imagenet_backbones)
    for item in items:
        key, sep, value = item.partition("=")
        if item == "hub":
            raise ValueError(
                "--imagenet takes a local weights file: pacs-triage never downloads weights from a hub"
            )
        if not sep:
            if len(backbones) != 1:
                raise ValueError(
                    f"{recipe.name} has backbones {', '.join(backbones)}; write --imagenet KEY=PATH for each"
                )
            key, value = backbones[0], item
        sources[key.strip()] = value.strip()
    return sources


def load_records(dataset: str, data: Path, args: argparse.Namespace | None = None) -> list[Any]:
    """Read a data set with its adapter.

    :param dataset: one of :data:`DATASETS`.
    :param data: the folder (or CSV file).
    :param args: the command's arguments (adapter options).
    """
    from training import datasets as adapters

    if dataset == "csv":
        return adapters.load_generic_csv(data)
    if dataset == "cbis-ddsm":
        kinds = tuple(k.strip() for k in getattr(args, "cbis_abnormality", "mass").split(",") if k.strip())
        return adapters.load_cbis_ddsm(data, abnormality=kinds)
    if dataset == "inbreast":
        return adapters.load_inbreast(
            data, malignant_min_birads=int(getattr(args, "inbreast_malignant_from", 4))
        )
    if dataset == "mias":
        return adapters.load_mias(data)
    if dataset == "busi":
        return adapters.load_busi(data)
    raise ValueError(f"--dataset {dataset!r} is not one of {', '.join(DATASETS)}")


def _fail(message: str) -> int:
    print(f"pacs-triage: error: {message}", file=sys.stderr)
    return 2


def _say(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def _env_line(name: str, checkpoint: Path) -> str:
    return f"PACS_TRIAGE_PLUGINS__MODELS__{name.upper()}__WEIGHTS={checkpoint.resolve()}"


# ---------------------------------------------------------------------------------------------------------
# Handlers


def run_train(args: argparse.Namespace, settings: Settings) -> int:
    """``pacs-triage train``."""
    from plugins.host import ModelHost
    from training.registry import get_recipe
    from training.trainer import TrainConfig, TrainingInterrupted, deploy_checkpoint, train

    try:
        hyper: dict[str, Any] = parse_assignments(args.hyper, "--set")
        for flag, key in (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr")):
            if getattr(args, flag) is not None:
                hyper[key] = getattr(args, flag)
        options = parse_assignments(args.options, "--option")
        input_size = parse_input_size(args.input_size)
        host = ModelHost(settings, "cpu")
        recipe = get_recipe(
            host.plugin(args.arch),
            plugin_manager=host.plugin_manager,
            hyperparameters=hyper,
            options=options,
            input_size=input_size,
        )
        if args.show_recipe:
            print(recipe.describe())
            return 0
        if args.data is None or args.out is None:
            return _fail("train needs --data and --out (or --show-recipe)")
        imagenet = _imagenet_sources(args.imagenet, recipe)
        split = _parse_split(args.split)
        records = load_records(args.dataset, args.data, args)
        config = TrainConfig(
            out_dir=args.out,
            seed=args.seed,
            device=args.device,
            amp=args.amp,
            workers=args.workers,
            progress=args.progress,
            resume=args.resume,
            cache=args.cache,
            imagenet=imagenet,
            prevalence=args.prevalence,
            calibration_method=args.calibration,
            target_sensitivity=args.target_sensitivity,
            target_specificity=args.target_specificity,
        )
        result = train(
            args.arch,
            records,
            config,
            settings=settings,
            hyperparameters=hyper,
            options=options,
            input_size=input_size,
            dataset=args.dataset,
            data=str(args.data),
            split=split,
            folds=args.folds,
            version=args.weights_version,
            demo=args.demo,
            compare_paper=args.compare_paper,
            n_bootstrap=args.bootstrap,
            repeats=args.repeats,
            log_line=_say,
        )
    except TrainingInterrupted as stopped:
        return _fail(str(stopped))
    except (ValueError, FileNotFoundError) as error:
        return _fail(str(error))
    print(f"checkpoint: {result.checkpoint} (sha256 {result.metadata.sha256})")
    if args.deploy is not None:
        written = deploy_checkpoint(result.checkpoint, args.arch, args.deploy)
        print(f"deployed: plugins.models.{args.arch}.weights in {written} now points at {result.checkpoint}")
    else:
        print(
            f"to deploy: set plugins.models.{args.arch}.weights: {result.checkpoint.resolve()} in the config,"
        )
        print(f"  or: export {_env_line(args.arch, result.checkpoint)}")
    return 0


def run_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    """``pacs-triage evaluate``."""
    from tqdm.auto import tqdm

    from training.evaluate import (
        comparison_text,
        evaluate_checkpoint,
        read_metadata,
        summary_lines,
        write_evaluation,
    )
    from training.trainer import held_out_records, risk_reliability

    try:
        metadata = read_metadata(args.checkpoint)
        records = load_records(args.dataset, args.data, args)
        if args.split != "all":
            records = held_out_records(records, metadata, args.split)
        with tqdm(total=len(records), desc="evaluating", unit="img", disable=_disable(args.progress)) as bar:
            evaluation = evaluate_checkpoint(
                args.checkpoint,
                records,
                settings=settings,
                device=args.device,
                batch_size=args.batch_size,
                n_bootstrap=args.bootstrap,
                progress=bar.update,
            )
    except (ValueError, FileNotFoundError) as error:
        return _fail(str(error))
    architecture = _plugin_name(settings, metadata.architecture)
    title = f"{architecture}, {args.dataset} {args.split}"
    print(summary_lines(evaluation, title))
    prevalence = metadata.calibrator.prevalence if metadata.calibrator is not None else None
    reliability = risk_reliability(evaluation, prevalence, metadata)
    if reliability is not None:
        if prevalence is not None:
            raw, calibrated = (
                reliability["ece_raw_at_prevalence"],
                reliability["ece_calibrated_at_prevalence"],
            )
            print(
                f"ECE at the calibrator's prevalence {prevalence:g}: "
                f"raw {raw:.4f}, calibrated {calibrated:.4f}"
            )
        for name, measured in reliability["operating_points"].items():
            print(
                f"operating point {name}: sensitivity {measured['sensitivity']:.3f}, "
                f"specificity {measured['specificity']:.3f} here"
            )
    if args.compare_paper:
        print(
            comparison_text(evaluation, architecture, args.dataset)
            or f"no reported results for {architecture}"
        )
    if args.out is not None:
        files = write_evaluation(
            evaluation,
            args.out,
            title=title,
            extra={
                "checkpoint": str(args.checkpoint),
                "checkpoint_sha256": metadata.sha256,
                "dataset": args.dataset,
                "data": str(args.data),
                "split": args.split,
                "risk_reliability": reliability,
            },
            architecture=architecture,
            dataset=args.dataset,
        )
        print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def run_demo_weights(args: argparse.Namespace, settings: Settings) -> int:
    """``pacs-triage demo-weights``."""
    from plugins.host import ModelHost
    from training.registry import demo_profiles
    from training.trainer import train_demo

    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        names = args.arch or list(demo_profiles(ModelHost(settings, "cpu").plugin_manager))
        for name in names:
            result = train_demo(
                name,
                args.out,
                settings=settings,
                seed=args.seed,
                epochs=args.epochs,
                images=args.images,
                device=args.device,
                progress=args.progress,
                log_line=_say,
                prevalence=args.prevalence,
            )
            written.append(result)
            auc = result.test.report.auc if result.test is not None else None
            held_out = "n/a" if auc is None else f"{auc:.3f}"
            print(f"{name}: {result.checkpoint} (DEMO; held-out AUC on phantoms {held_out})")
    except (ValueError, FileNotFoundError) as error:
        return _fail(str(error))
    print(
        json.dumps({"plugins": {"allow_demo_weights": True, "demo_weights_dir": str(args.out.resolve())}})
        + "  <- the config that uses them"
    )
    return 0


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _plugin_name(settings: Settings, architecture: str) -> str:
    from plugins.host import ModelHost
    from training.evaluate import plugin_for_architecture

    return plugin_for_architecture(ModelHost(settings, "cpu"), architecture)
