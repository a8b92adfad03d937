"""Export a PyTorch model to an on-device training bundle (training/eval/optimizer graphs,
checkpoint, forward-only model.onnx and manifest.json). See docs/bundle.md."""

from __future__ import annotations

import argparse
import dataclasses

from fleetlearn.export.models import BUILTIN_MODELS

_BUILTINS = ", ".join(f"{m.name} ({m.description})" for m in BUILTIN_MODELS.values())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `fleetlearn export`. Imports nothing heavy: `--help` must be instant."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  fleetlearn export --model boston-mlp --out bundles/boston --standardize-from data/boston_housing_split.npz\n"
        "  fleetlearn export --model digits-cnn --out bundles/digits --optimizer sgd --lr 0.05 --momentum 0.9\n"
        "  fleetlearn export --model mypkg.nets:build --input-shape 1,28,28 --loss cross_entropy --out bundles/mine\n"
        "\nexit status: 0 on success, 2 on bad input (one-line reason on stderr; no partial bundle is left)."
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="NAME_OR_IMPORT_PATH",
        help=f"a built-in model: {_BUILTINS}; or 'package.module:factory', a callable "
        "returning a torch.nn.Module (the current directory is importable)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="bundle directory to create; must not exist unless --force")
    parser.add_argument(
        "--input-shape",
        metavar="SHAPE",
        help="per-sample input shape without the batch dimension, e.g. 13 or 1,8,8 "
        "(built-in models know theirs; required for import paths)",
    )
    parser.add_argument(
        "--loss",
        choices=("mse", "cross_entropy", "bce_with_logits"),
        help="training loss: mse (regression, float target shaped like the output), "
        "cross_entropy (classification, logits (batch, C), int64 class index), "
        "bce_with_logits (binary, float target in [0, 1] shaped like the output). "
        "Default: the built-in model's; required for import paths",
    )
    parser.add_argument(
        "--optimizer",
        choices=("adamw", "sgd"),
        default="adamw",
        help="adamw = torch.optim.AdamW exactly; sgd = torch.optim.SGD exactly, optionally with "
        "--momentum, but without weight decay (no ORT kernel does torch's L2 step). Default: adamw",
    )
    parser.add_argument(
        "--lr",
        type=float,
        metavar="LR",
        help="learning rate, recorded in the manifest; devices set it at run time (default 1e-3)",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        metavar="WD",
        help="adamw: decoupled weight decay (default 0.01); sgd: must be 0 (refused otherwise, see docs/bundle.md)",
    )
    parser.add_argument("--betas", metavar="B1,B2", help="adamw only: moment decay rates, default 0.9,0.999")
    parser.add_argument("--eps", type=float, metavar="EPS", help="adamw only: denominator epsilon, default 1e-8")
    parser.add_argument("--momentum", type=float, metavar="M", help="sgd only: momentum (dampening 0, not Nesterov), default 0")
    parser.add_argument(
        "--standardize-from",
        metavar="FILE",
        help="compute per-feature mean/std from the x of a TRAINING data file and record them "
        "as the bundle's preprocessing: .npz with arrays x,y or x_train,y_train, or .csv "
        "with a header line whose last column is the target",
    )
    parser.add_argument(
        "--name", metavar="NAME", help="model_name in the manifest (default: the built-in name or the factory's name)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="torch seed for the initial weights; the same seed gives the same model_hash (default 0)",
    )
    parser.add_argument(
        "--no-portable",
        action="store_true",
        help="skip the portable engine's step graph (the bundle then trains with onnxruntime-training "
        "only, x86_64); for models whose step graph cannot be built",
    )
    parser.add_argument(
        "--no-proximal",
        action="store_true",
        help="leave FedProx's proximal term out of the training graphs (devices with this bundle "
        "then sit out rounds that ask for --proximal-mu > 0)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing bundle at --out (only once the new one is complete)"
    )


def run(args: argparse.Namespace) -> int:
    """Resolve the model, export it, print a one-line summary. Errors raise UsageError (exit 2)."""
    from fleetlearn.export.build import build_from_request, make_request
    from fleetlearn.export.errors import UsageError
    from fleetlearn.export.preprocessing import standardization_from_file, validate_preprocessing
    from fleetlearn.export.resolve import check_model_spec, default_name

    betas = None
    if args.betas is not None:
        try:
            betas = tuple(float(b) for b in args.betas.split(","))
        except ValueError:
            raise UsageError(f"--betas must be two numbers B1,B2, got {args.betas!r}") from None

    # Check what needs no torch first, so typos fail fast.
    builtin = check_model_spec(args.model)
    shape = args.input_shape if args.input_shape is not None else (builtin.input_shape if builtin else None)
    if shape is None:
        raise UsageError(f"--input-shape is required for model {args.model!r} (e.g. --input-shape 13 or 1,8,8)")
    loss = args.loss or (builtin.loss if builtin else None)
    if loss is None:
        raise UsageError(f"--loss is required for model {args.model!r} (mse, cross_entropy or bce_with_logits)")
    name = args.name or (builtin.name if builtin else default_name(args.model))
    request = make_request(
        args.out, model_name=name, input_shape=shape, loss=loss, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, betas=betas, eps=args.eps, momentum=args.momentum,
        force=args.force, seed=args.seed, portable=not args.no_portable, proximal=not args.no_proximal,
    )  # fmt: skip
    if args.standardize_from:
        pre = standardization_from_file(args.standardize_from, request.input_shape)
        request = dataclasses.replace(request, preprocessing=validate_preprocessing(pre, request.input_shape))

    from fleetlearn.export.resolve import resolve_model

    model, _ = resolve_model(args.model, seed=args.seed)
    manifest = build_from_request(model, request)
    print(
        f"wrote {args.out}: {manifest.model_name} {manifest.num_params} trainable params, "
        f"loss {manifest.loss}, optimizer {manifest.optimizer['name']}, model_hash {manifest.model_hash[:16]}"
    )
    return 0
