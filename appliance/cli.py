"""`linejudge`: the one entry point. Subcommands import their heavy modules lazily, so the
appliance commands never load torch or transformers."""
from __future__ import annotations

import argparse
import os
import sys

from appliance.errors import LinejudgeError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def cmd_train(args) -> int:
    from training.config import load_config
    config = load_config(args.config)
    from training.train import train
    summary = train(config, args.out)
    print(f"trained {summary['config']} in {summary['minutes']} min -> {args.out}")
    return 0


def cmd_eval(args) -> int:
    from training.evaluate import evaluate_cli
    return evaluate_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linejudge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the reward models stage by stage (HQ)")
    p.add_argument("--config", required=True, help="training/configs/<name>.yaml")
    p.add_argument("--out", required=True, help="run directory (resumes if it exists)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained model: JSON + HTML report with plots")
    p.add_argument("--model", required=True, help="a run directory, a stage model directory or a bundle")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--json", required=True, help="where to write the metrics JSON")
    p.add_argument("--report", help="HTML report path (default: beside the JSON)")
    p.add_argument("--limit", type=int, help="evaluate on at most this many frames per set")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LinejudgeError as exc:
        print(f"linejudge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("linejudge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # domain errors from modules that cannot import ours
        message = _known_error(exc)
        if message is None:
            raise
        print(f"linejudge: error: {message}", file=sys.stderr)
        return 2


def _known_error(exc: Exception) -> str | None:
    """Errors of the model and bundle modules (which stay free of appliance imports)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"ModelLoadError", "BundleError", "TestLeakError"}:
        return str(exc)
    return None


if __name__ == "__main__":
    sys.exit(main())
