"""The ``cnnkit`` command line: one sub-command per verb.

    cnnkit recipes                              list the training recipes
    cnnkit models                               list the model zoo
    cnnkit train RECIPE [--epochs N] ...        train a recipe into a run directory
    cnnkit train --resume --output RUN_DIR      continue an interrupted run
    cnnkit evaluate RUN_DIR                     test metrics and report pictures
    cnnkit feature-maps RUN_DIR IMAGE           feature-map grid PNGs of one image
    cnnkit explain SOURCE IMAGE [--class C]     Grad-CAM heatmap overlay of one image
    cnnkit filter-patterns SOURCE [--layer L]   what each filter of a conv layer responds to
    cnnkit export RUN_DIR [--name NAME]         SavedModel + ONNX into the model repository
    cnnkit serve [--repository DIR]             the service: HTTP on 3000, gRPC on 8500
    cnnkit results [RUNS_ROOT]                  a Markdown table of finished and running runs
    cnnkit score DIR --model NAME [--url|--grpc|--local]   score an image folder into CSV/JSONL
    cnnkit loadtest [--url URL | --start] [--grpc T]        locust at several concurrencies, with a report

Errors a user can fix print one clear message and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cnnkit.errors import UserError


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        help="data root with the standard layouts (default: $CNNKIT_DATA_DIR, else the Keras downloads)",
    )


def cmd_recipes(args: argparse.Namespace) -> int:
    from cnnkit.training.config import list_recipes, load_recipe

    for name in list_recipes():
        recipe = load_recipe(name)
        course = f"course {recipe.course_accuracy * 100:.0f}%" if recipe.course_accuracy else ""
        print(f"{name:28s} {recipe.model:16s} {recipe.epochs:4d} epochs  {course:12s} {recipe.description}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cnnkit.training.zoo import describe_zoo

    zoo = describe_zoo()
    width = max(len(name) for name, _ in zoo)
    for name, description in zoo:
        print(f"{name:{width}s}  {description}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cnnkit.training.config import apply_overrides, load_recipe

    # Arguments are checked before TensorFlow is imported, so mistakes are reported at once.
    if args.resume:
        if not args.output:
            raise UserError("--resume needs --output RUN_DIR (the run to continue).")
        from cnnkit.training.rundir import CONFIG_FILE, RunDir

        if not RunDir(args.output).is_run():
            raise UserError(f"Cannot resume: {args.output} is not a run directory (no {CONFIG_FILE}).")
        from cnnkit.training.train import train

        train(run_dir=args.output, data_dir=args.data_dir, resume=True, epochs=args.epochs,
              evaluate=not args.no_evaluate, distributed=args.distributed)
        return 0
    if not args.recipe:
        raise UserError("Name a recipe (see `cnnkit recipes`) or pass --resume --output RUN_DIR.")
    config = load_recipe(args.recipe)
    overrides = list(args.set or [])
    for option, key in (("epochs", "epochs"), ("batch_size", "batch_size"),
                        ("learning_rate", "learning_rate"), ("train_limit", "train_limit"),
                        ("test_limit", "test_limit")):
        value = getattr(args, option)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.weights is not None:
        overrides.append(f"model_args.weights={args.weights}")
    if args.init_from is not None:
        config.init_from = str(Path(args.init_from).resolve())
    if overrides or args.init_from is not None:
        config = apply_overrides(config, overrides)
    from cnnkit.training.train import train

    if args.distributed and not args.output:
        raise UserError("--distributed needs --output RUN_DIR: the one run directory every worker names.")
    train(config, run_dir=args.output, data_dir=args.data_dir, evaluate=not args.no_evaluate,
          distributed=args.distributed)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cnnkit.training.rundir import CONFIG_FILE, RunDir

    if not RunDir(args.run_dir).is_run():
        raise UserError(f"{args.run_dir} is not a run directory (no {CONFIG_FILE}).")
    from cnnkit.training.evaluate import evaluate_run

    evaluate_run(args.run_dir, data_dir=args.data_dir, test_time_flip=args.test_time_flip)
    return 0


def cmd_feature_maps(args: argparse.Namespace) -> int:
    from cnnkit.training.feature_maps import write_feature_map_grids

    written = write_feature_map_grids(args.run_dir, args.image, layers=args.layer, output=args.out)
    for path in written:
        print(path)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from cnnkit.training.explain import write_gradcam

    path, result = write_gradcam(args.source, args.image, args.target_class, output=args.out, layer=args.layer)
    predicted = result.probabilities.argmax()
    print(f"[cnnkit] Grad-CAM of class {result.class_name!r} (probability {result.probability:.3f}; predicted "
          f"{predicted} with {result.probabilities[predicted]:.3f}) at layer {result.layer}", file=sys.stderr)
    print(path)
    return 0


def cmd_filter_patterns(args: argparse.Namespace) -> int:
    from cnnkit.explain import parse_filters
    from cnnkit.training.explain import write_filter_patterns

    path, indices, gains = write_filter_patterns(args.source, args.layer, parse_filters(args.filters),
                                                 output=args.out, steps=args.steps, seed=args.seed)
    from cnnkit.explain import dead_filters

    dead = dead_filters(indices, gains)
    print(f"[cnnkit] {len(indices)} filters; mean response raised from {float(gains[:, 0].mean()):.3g} "
          f"to {float(gains[:, 1].mean()):.3g}; {len(dead)} dead" + (f" ({', '.join(map(str, dead))})" if dead else ""),
          file=sys.stderr)
    print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cnnkit.training.rundir import CONFIG_FILE, RunDir

    if not RunDir(args.run_dir).is_run():
        raise UserError(f"{args.run_dir} is not a run directory (no {CONFIG_FILE}).")
    from cnnkit.training.export import export_run

    exported = export_run(args.run_dir, name=args.name, repository=args.repository,
                          data_dir=args.data_dir, base_path=args.base_path)
    if args.bentoml:
        from cnnkit.bento import import_to_bentoml

        tag = import_to_bentoml(exported)
        print(f"[cnnkit] imported into the BentoML model store as {tag}", file=sys.stderr)
    print(exported.path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the service (HTTP + gRPC) in this process, through BentoML's server."""
    import shutil
    import tempfile
    from pathlib import Path

    from cnnkit.repository import resolve_repository, scan_repository
    from cnnkit.settings import SERVER_PID_ENV, SETTINGS_FILE_ENV, load_settings, write_settings_file

    settings = load_settings(args.config, model_repository=args.repository, host=args.host,
                             http_port=args.http_port, grpc_port=args.grpc_port, log_level=args.log_level,
                             log_format=args.log_format, workers=args.workers)
    repository = resolve_repository(settings.model_repository).resolve()
    if not settings.bento_models and not scan_repository(repository):
        raise UserError(f"No exported models in {repository}: run `cnnkit export RUN_DIR` first.")
    _require_free_port(settings.host, settings.http_port, "HTTP", "--http-port")
    if settings.grpc_port > 0:
        _require_free_port(settings.host, settings.grpc_port, "gRPC", "--grpc-port")
    settings = settings.model_copy(update={"model_repository": repository})
    # The service's processes read the resolved settings from this file, once.
    os.environ[SETTINGS_FILE_ENV] = str(write_settings_file(settings, tempfile.mkdtemp(prefix="cnnkit-serve-")))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    os.environ[SERVER_PID_ENV] = str(os.getpid())  # BentoML runs in this process (exec below)
    bentoml = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or shutil.which("bentoml")
    if bentoml is None:
        raise UserError("BentoML is not installed: pip install 'cnnkit[serving]'.")
    project = Path(__file__).resolve().parents[1]
    command = [bentoml, "serve", "cnnkit.serving.http.service:Classifier", "--host", settings.host,
               "--port", str(settings.http_port), "--working-dir", str(project),
               "--timeout-graceful-shutdown", str(settings.drain_timeout)]
    grpc = f"gRPC {settings.host}:{settings.grpc_port}" if settings.grpc_port >= 0 else "gRPC off"
    workers = f"  {settings.workers} workers" if settings.workers > 1 else ""
    print(f"[cnnkit] serving {repository}: HTTP http://{settings.host}:{settings.http_port}  {grpc}{workers}",
          file=sys.stderr, flush=True)
    os.execv(bentoml, command)
    return 0  # not reached


def _require_free_port(host: str, port: int, protocol: str, flag: str) -> None:
    """Refuse to start when a port is taken, with one line, before any server process starts (a
    server that cannot bind would otherwise be restarted over and over, each time with a traceback)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"The {protocol} port {host}:{port} is not free ({error.strerror}): stop what listens "
                            f"there or choose another port with {flag}.") from None


def _local_predictor(repository: str):
    """``cnnkit score --local``: the service's own code in-process (the SDK cannot import it)."""
    from cnnkit.serving.local import LocalClient

    return LocalClient(repository)


def cmd_score(args: argparse.Namespace) -> int:
    from cnnkit_client import scoring

    if args.engine == "ray":
        if not args.local:
            raise UserError("--engine ray scores with ONNX Runtime in Ray actors: name the model repository "
                            "with --local REPOSITORY.")
        from cnnkit.serving.ray_scoring import score_folder_ray
        from cnnkit_client.errors import CnnkitError

        try:
            summary = score_folder_ray(args.local, args.folder, args.out, model=args.model, version=args.version,
                                       top_k=args.top_k, batch_size=args.batch_size, actors=args.actors,
                                       address=args.ray_address, progress=not args.no_progress)
        except CnnkitError as error:
            raise UserError(str(error)) from error
        print(summary.report())
        print(f"results: {args.out}")
        return 1 if summary.stopped else 0
    return scoring.run(args, local_predictor=_local_predictor)


def cmd_results(args: argparse.Namespace) -> int:
    from cnnkit.training.results import results_table

    print(results_table(args.runs_root))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cnnkit import __version__

    parser = argparse.ArgumentParser(prog="cnnkit", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's own log lines (hidden by default)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("recipes", help="list the training recipes").set_defaults(func=cmd_recipes)
    commands.add_parser("models", help="list the model zoo").set_defaults(func=cmd_models)

    train = commands.add_parser("train", help="train a recipe (or resume a run)")
    train.add_argument("recipe", nargs="?", help="recipe name or YAML file")
    train.add_argument("--epochs", type=int, help="epochs to train (default: the recipe's)")
    train.add_argument("--batch-size", type=int, help="images per training step (default: the recipe's)")
    train.add_argument("--learning-rate", type=float, help="initial learning rate (default: the recipe's)")
    train.add_argument("--train-limit", type=int, help="train on a fixed-seed subset of N images")
    train.add_argument("--test-limit", type=int, help="evaluate on a fixed-seed subset of N images")
    train.add_argument("--weights", help="VGG16 base weights: imagenet, none, or a local .h5 file")
    train.add_argument("--init-from", metavar="RUN", help="start from the weights of another run (its "
                       "directory or a .keras file); with --epochs 0 a fine_tune recipe only fine-tunes")
    train.add_argument("--output", help="run directory (default runs/RECIPE-TIMESTAMP)")
    train.add_argument("--resume", action="store_true", help="continue the run in --output")
    train.add_argument("--distributed", action="store_true",
                       help="one worker of the cluster in TF_CONFIG (MultiWorkerMirroredStrategy); "
                            "start every worker with the same command")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override any recipe field, e.g. --set augmentation.rotation=0.1")
    train.add_argument("--no-evaluate", action="store_true", help="skip the final evaluation")
    _add_data_dir(train)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a finished run on its test set")
    evaluate.add_argument("run_dir", help="a finished run directory")
    evaluate.add_argument("--test-time-flip", action=argparse.BooleanOptionalAction, default=None,
                          help="average each image's probabilities with its mirror image's "
                               "(default: the recipe's test_time_flip)")
    _add_data_dir(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    maps = commands.add_parser("feature-maps", help="feature-map grid PNGs for one image")
    maps.add_argument("run_dir", help="run directory (or a .keras model file)")
    maps.add_argument("image", help="an image file")
    maps.add_argument("--layer", action="append", help="layer name (repeatable; default: every conv layer)")
    maps.add_argument("--out", default=None, help="output folder (default RUN_DIR/feature_maps)")
    maps.set_defaults(func=cmd_feature_maps)

    sources = "a run directory, a .keras file, or a model (version) folder of a model repository"
    explain = commands.add_parser("explain", help="Grad-CAM: where in an image the evidence for a class lies")
    explain.add_argument("source", help=sources)
    explain.add_argument("image", help="an image file")
    explain.add_argument("--class", dest="target_class", default=None,
                         help="class name or index to explain (default: the predicted class)")
    explain.add_argument("--layer", default=None, help="convolution layer (default: the last one)")
    explain.add_argument("--out", default=None,
                         help="overlay PNG to write (default ./IMAGE_gradcam_CLASS.png); the heatmap goes "
                         "beside it as .npy")
    explain.set_defaults(func=cmd_explain)

    patterns = commands.add_parser("filter-patterns", help="the input patterns that excite a conv layer's filters")
    patterns.add_argument("source", help=sources)
    patterns.add_argument("--layer", default=None, help="convolution layer (default: the last one)")
    patterns.add_argument("--filters", default=None, help="the first N filters (default 64), or a list: 0,3,7 or 0-7")
    patterns.add_argument("--steps", type=int, default=40, help="gradient-ascent steps (default 40)")
    patterns.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default 0)")
    patterns.add_argument("--out", default=None, help="grid PNG to write (default ./MODEL_LAYER_patterns.png)")
    patterns.set_defaults(func=cmd_filter_patterns)

    export = commands.add_parser("export", help="export a run as SavedModel + ONNX, verified")
    export.add_argument("run_dir", help="a finished and evaluated run directory")
    export.add_argument("--name", help="model name in the repository (default: the recipe name)")
    export.add_argument("--repository", help="model repository (default: $CNNKIT_MODEL_REPOSITORY, "
                        "else ./model_repository)")
    export.add_argument("--base-path", metavar="PATH",
                        help="where TF Serving sees the repository, e.g. /models (default: models.config's "
                        "paths are relative to the repository's root)")
    export.add_argument("--bentoml", action="store_true",
                        help="also import the new version into the BentoML model store")
    _add_data_dir(export)
    export.set_defaults(func=cmd_export)

    serve = commands.add_parser(
        "serve", help="start the service: HTTP (BentoML) and TF-Serving gRPC",
        description="Start the service. Every setting (README, Settings) also comes from its CNNKIT_* "
                    "environment variable or a YAML file; flags win over both.")
    serve.add_argument("--config", metavar="YAML", help="settings file (default: $CNNKIT_CONFIG, if set)")
    serve.add_argument("--repository", help="model repository (default: $CNNKIT_MODEL_REPOSITORY, "
                       "else ./model_repository)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int, help="HTTP port (default 3000)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 8500; -1: no gRPC)")
    serve.add_argument("--workers", type=int, help="server processes sharing the ports and the cores (default 1)")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper,
                       help="level of cnnkit's log lines (default INFO)")
    serve.add_argument("--log-format", choices=["text", "json"], help="log lines as text or JSON (default text)")
    serve.set_defaults(func=cmd_serve)

    score = commands.add_parser("score", help="score every image in a folder (service or in-process)")
    from cnnkit_client import scoring

    scoring.add_arguments(score, local=True)
    score.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="local: this process (default); ray: Ray Data with an actor pool (needs --local)")
    score.add_argument("--actors", type=int, default=os.cpu_count() or 1,
                       help="with --engine ray: actors, each with its own ONNX Runtime session (default: cores)")
    score.add_argument("--ray-address", help="with --engine ray: a Ray cluster to join (default $RAY_ADDRESS, "
                       "else a local Ray started for the run)")
    score.set_defaults(func=cmd_score)

    loadtest = commands.add_parser("loadtest", help="load-test the service with locust (HTTP and gRPC), with a report")
    from cnnkit.loadtests import runner as loadtest_runner

    loadtest_runner.add_arguments(loadtest)
    loadtest.set_defaults(func=loadtest_runner.run)

    results = commands.add_parser("results", help="a Markdown table of the runs in a folder")
    results.add_argument("runs_root", nargs="?", default="runs", help="folder of run directories (default runs)")
    results.set_defaults(func=cmd_results)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        from cnnkit.tensorflow_logs import quiet_tensorflow

        quiet_tensorflow()
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"cnnkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cnnkit: interrupted; a training run can be continued with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

