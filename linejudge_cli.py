"""`linejudge`: the one entry point. Subcommands import their heavy modules lazily, so the
appliance commands never load torch or transformers."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from models.errors import ConfigError, LinejudgeError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "models" / "bundles" / "el-solar-default"


def cmd_run(args) -> int:
    from appliance.config import load_config
    from appliance.server import serve
    return serve(load_config(args.config))


def cmd_demo(args) -> int:
    from appliance.config import config_from_dict
    from appliance.server import serve
    cfg = config_from_dict({"state_dir": args.state_dir, "port": args.port, "host": args.host,
                            "source": args.source, "max_fps": args.max_fps,
                            "views": "upright2", "operator_pins": {"operator": "1234"}}, "demo")
    print(f"linejudge demo: open http://{cfg.host}:{cfg.port}  (Review tab: operator / PIN 1234)\n"
          f"state: {cfg.db_path}", flush=True)
    return serve(cfg)


def cmd_sync(args) -> int:
    from appliance.config import load_config
    from appliance.store import Store
    from appliance.sync import sync_once
    cfg = load_config(args.config)
    if cfg.hq_url and cfg.sync_interval_s > 0:
        raise ConfigError(
            f"{args.config}: the appliance service syncs with HQ itself (sync_interval_s: "
            f"{cfg.sync_interval_s:g}) and hot-swaps new models; a second sync here would install "
            "bundles behind its back. Use one of the two: `systemctl disable --now appliance-sync.timer`, "
            "or set sync_interval_s: 0 to sync with this command (a new model then starts with the service)")
    store = Store(cfg.db_path, cfg.frames_dir)
    try:
        result = sync_once(cfg, store)
    finally:
        store.close()
    print(json.dumps(result, indent=2, default=str))
    return 0 if result.get("ok", True) else 1


def cmd_hq(args) -> int:
    from training.hq import publish, server, state as hq_state
    _require_hq_flags(args)
    database_url = args.database_url or os.environ.get("LINEJUDGE_HQ_DATABASE_URL") or None
    state = hq_state.open_state(Path(args.state_dir), database_url)
    try:
        if args.action == "serve":
            import uvicorn
            token = args.admin_token or os.environ.get("LINEJUDGE_HQ_ADMIN_TOKEN")
            app = server.create_hq_app(state, admin_token=token)
            uvicorn.run(app, host=args.host, port=args.port, log_level="info")
        elif args.action == "add-appliance":
            token = hq_state.add_appliance(state, args.appliance)
            print(f"token for {args.appliance} (store it in the appliance's hq_token_file): {token}")
        elif args.action == "publish":
            print(f"published {publish.publish_bundle(state, Path(args.bundle))}")
        else:
            return _hq_retrain(args, state)
        return 0
    finally:
        state.close()


HQ_NEEDS = {"add-appliance": ("appliance",), "publish": ("bundle",), "retrain": ("config", "base", "out")}


def _require_hq_flags(args) -> None:
    """Each hq action's own flags, checked before any state is opened."""
    missing = [f"--{name}" for name in HQ_NEEDS.get(args.action, ()) if not getattr(args, name)]
    if missing:
        raise LinejudgeError(f"hq {args.action} needs {', '.join(missing)}: see `linejudge hq --help`")


def _hq_retrain(args, state) -> int:
    from training.config import load_config
    from training.hq.retrain import RetrainOptions, retrain
    opts = RetrainOptions(hq_state=state, base_run=Path(args.base), out=Path(args.out),
                          line=args.line, key=Path(args.key) if args.key else None, key_id=args.key_id,
                          gate_points=args.gate_points, fleet_repeat=args.fleet_repeat)
    from export.build_bundle import export_with_settings
    report = retrain(load_config(args.config), opts, export_with_settings)
    print(json.dumps({k: report[k] for k in ("fleet_pairs", "heldout_pairs", "before", "after", "published")},
                     indent=2))
    return 0


def cmd_train(args) -> int:
    from training.config import load_config
    config = load_config(args.config)
    from training.train import train
    summary = train(config, args.out)
    print(f"trained {summary['config']} in {summary['minutes']} min -> {args.out}")
    return 0


def cmd_cv(args) -> int:
    from training.config import load_config
    from training.cv import cross_validate
    result = cross_validate(load_config(args.config), args.out, folds=args.folds, only=args.fold)
    figures = "  ".join(f"{k} {v:.4f} +- {result['sd'][k]:.4f}" for k, v in result.get("mean", {}).items())
    print(f"{len(result['per_fold'])} of {args.folds} folds done -> {Path(args.out) / 'cv.json'}  {figures}")
    return 0


def cmd_ablation(args) -> int:
    from training.cv import ablation
    table, plot = ablation([Path(d) for d in args.runs], Path(args.out))
    print(table.read_text(), end="")
    print(f"table -> {table}\nplot -> {plot}")
    return 0


def cmd_eval(args) -> int:
    from models.bundle import is_bundle
    if is_bundle(args.model):       # the exported graphs: JSON only, INT8 beside fp32
        from export.evaluate_bundle import evaluate_bundle_cli
        return evaluate_bundle_cli(args)
    from training.evaluate import evaluate_cli
    return evaluate_cli(args)


def cmd_export(args) -> int:
    from export.build_bundle import ExportOptions, checkpoint_to_bundle
    opts = ExportOptions(line=args.line, version=args.version, calibration=args.calibration,
                         keep_fp32=tuple(args.keep_fp32 or ()), key=args.key, key_id=args.key_id,
                         val_limit=args.val_limit, calibration_frames=args.calibration_frames)
    manifest = checkpoint_to_bundle(args.checkpoint, args.out, opts)
    gate = manifest["metrics"]["int8_gate"]
    print(f"bundle {args.out}: {manifest['line']} v{manifest['version']}, "
          f"parity {manifest['metrics']['parity_fp32']['max_abs_reward_delta']:.1e}, "
          f"INT8 pairwise {gate['pairwise_fp32']:.4f} -> {gate['pairwise_int8']:.4f}, "
          f"top-1 agreement {gate['top1_agreement']:.4f}{'' if args.key else ' (unsigned: pass --key)'}")
    if args.tensorrt:
        from appliance.scoring.tensorrt_engine import bundle_to_engines
        for path in bundle_to_engines(args.out, precision=args.trt_precision):
            print(f"TensorRT engine {path}")
    return 0


def cmd_bundle(args) -> int:
    from models import bundle as lib
    if args.action != "keygen" and not args.bundle:
        raise ConfigError(f"name the bundle directory: linejudge bundle {args.action} <bundle>")
    if args.action in ("sign", "recalibrate", "requantize") and not args.key:
        raise ConfigError(f"{args.action} signs the manifest: pass --key with the HQ private key (written by "
                          "`linejudge bundle keygen`) and --key-id if it is not 'hq'")
    if args.action == "keygen":
        private, public = lib.generate_keypair(args.out, args.key_id)
        print(f"private key {private} (keep it at HQ)\npublic key  {public} (give it to appliances)")
    elif args.action == "sign":
        print(f"signed {lib.sign_bundle(args.bundle, args.key, args.key_id)}")
    elif args.action == "recalibrate":
        from export.build_bundle import recalibrate_bundle
        keys = lib.load_public_keys(args.trust or _default_trust(args.bundle))
        thresholds = recalibrate_bundle(Path(args.bundle), args.key, args.key_id, keys)["thresholds"]
        print(json.dumps(thresholds, indent=2))
    elif args.action == "requantize":
        _requantize(args, lib)
    else:
        keys = lib.load_public_keys(args.trust or _default_trust(args.bundle))
        manifest = lib.verify_bundle(args.bundle, keys, installed_version=args.installed_version,
                                     line=args.line)
        print(f"OK: {manifest['line']} v{manifest['version']}, {len(manifest['files'])} files, "
              f"expires {manifest.get('expires')}")
    return 0


def _requantize(args, lib) -> None:
    from export.build_bundle import ExportOptions, requantize_bundle
    keys = lib.load_public_keys(args.trust or _default_trust(args.bundle))
    opts = ExportOptions(keep_fp32=tuple(args.keep_fp32 or ()), calibration_frames=args.calibration_frames,
                         val_limit=args.val_limit)
    manifest = requantize_bundle(Path(args.bundle), Path(args.to or args.bundle), args.key, args.key_id,
                                 keys, opts)
    checks = manifest["quantization"]["int16_pair_check"]
    print(f"bundle {args.to or args.bundle}: {manifest['line']} v{manifest['version']} "
          f"(from v{manifest['lineage']['parent_version']}); INT8 gate top-1 "
          f"{manifest['metrics']['int8_gate']['top1_agreement']:.4f}; worst u8 x s8 pair sum "
          f"{max(c['worst_pair_sum'] for c in checks.values())} (int16 limit 32767)")


def cmd_bench(args) -> int:
    if args.pipeline:
        from appliance.bench_pipeline import run_pipeline_bench
        summary = run_pipeline_bench(args.bundle, args.json, seconds=args.seconds, repeats=args.repeats)
        print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (list, dict))}, indent=2))
        return 0
    from export.bench import run_bench
    summary = run_bench(args.run, args.bundle, args.json, frames=args.frames, repeats=args.repeats)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))
    return 0


def _default_trust(bundle) -> list:
    from pathlib import Path
    keys = sorted((Path(__file__).resolve().parent / "models" / "keys").glob("*.pub"))
    if not keys:
        raise LinejudgeError("no trusted public keys: pass --trust <key.pub>")
    return keys


def _positive(kind: type, what: str, example: str):
    """An argparse type: a finite `kind` above 0 (argparse prints the message with the option's name)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, e.g. {example}; got {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    parse.__name__ = kind.__name__          # argparse names the type in its messages
    return parse


positive_int = _positive(int, "a whole number of at least 1", "16")
positive_float = _positive(float, "a number above 0", "20")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linejudge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the appliance from a config file")
    p.add_argument("--config", required=True, help="appliance YAML (see systemd/appliance.example.yaml)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="the appliance on defaults: default bundle, ELPV replay camera")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--state-dir", default="state/demo")
    p.add_argument("--source", default="elpv:test", help="camera source (default: ELPV test-split replay)")
    p.add_argument("--max-fps", type=float, default=5.0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train the reward models stage by stage (HQ)")
    p.add_argument("--config", required=True, help="training/configs/<name>.yaml")
    p.add_argument("--out", required=True, help="run directory (resumes if it exists)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cv", help="k-fold cross-validation of a training config over train + val (HQ)")
    p.add_argument("--config", required=True, help="training/configs/<name>.yaml")
    p.add_argument("--out", required=True, help="directory of the fold runs (resumes if it exists)")
    p.add_argument("--folds", type=positive_int, default=5)
    p.add_argument("--fold", type=int, default=None, help="train this fold only (0 to folds-1)")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("ablation", help="compare cross-validated recipes: markdown table + plot")
    p.add_argument("runs", nargs="+", help="directories written by `linejudge cv`")
    p.add_argument("--out", required=True, help="where ablation.md and ablation.png go")
    p.set_defaults(func=cmd_ablation)

    p = sub.add_parser("eval", help="evaluate a trained model: JSON + HTML report with plots")
    p.add_argument("--model", required=True, help="a run directory, a stage model directory or a bundle")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--json", required=True, help="where to write the metrics JSON")
    p.add_argument("--report", help="HTML report path (default: beside the JSON)")
    p.add_argument("--limit", type=positive_int, help="evaluate on at most this many frames per set")
    p.add_argument("--precision", choices=("both", "int8", "fp32"),
                   help="bundles only: which graphs to evaluate (default both: INT8 as the flat keys, "
                        "fp32 as fp32_* twins, with the INT8 drop and int8_vs_fp32 agreement)")
    p.add_argument("--views", help="bundles only: judge each ELPV frame as an appliance with this `views` "
                                   "setting: one (default), upright, upright2 (the station's example config) "
                                   "or rot4")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="trained run -> signed bundle (ONNX fp32 + INT8, optional TensorRT)")
    p.add_argument("--checkpoint", required=True, help="run directory (uses distill/model)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--line", default="el-solar")
    p.add_argument("--version", type=positive_int, default=1, help="bundle version, 1 or more")
    p.add_argument("--calibration", choices=("minmax", "entropy", "percentile"), default="minmax")
    p.add_argument("--calibration-frames", type=positive_int, default=320,
                   help="train frames the INT8 calibration sees")
    p.add_argument("--keep-fp32", nargs="*", help="ONNX node names, or prefixes ending in '/' (e.g. /blocks.0/), to leave unquantized; a prefix "
                        "matches in the image encoder and the scorer alike (/blocks.0/: EfficientNet block 0 and the "
                        "scorer's fusion block)")
    p.add_argument("--key", help="ed25519 private key to sign with")
    p.add_argument("--key-id", help="key id recorded in the signature (default: key file name)")
    p.add_argument("--val-limit", type=positive_int, help="use at most this many val frames (quick checks)")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines on this GPU")
    p.add_argument("--trt-precision", choices=("fp16", "int8"), default="fp16")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bundle", help="bundle keys, signing and verification")
    p.add_argument("action", choices=("keygen", "sign", "verify", "recalibrate", "requantize"),
                   help="recalibrate: derive the decide thresholds again on val and sign the manifest; "
                        "requantize: make the INT8 graphs again from the bundle's fp32 graphs (7-bit "
                        "weights, saturation check), as a new version, signed")
    p.add_argument("bundle", nargs="?", help="bundle directory (sign, verify, recalibrate, requantize)")
    p.add_argument("--to", help="requantize: where to write the new bundle (default: in place)")
    p.add_argument("--keep-fp32", nargs="*", help="requantize: ONNX node names or prefixes ending in '/' "
                                                  "to leave unquantized (as export)")
    p.add_argument("--calibration-frames", type=positive_int, default=320,
                   help="requantize: train frames the INT8 calibration sees")
    p.add_argument("--val-limit", type=positive_int, help="requantize: at most this many val frames")
    p.add_argument("--out", default="keys", help="keygen: where to write the key pair")
    p.add_argument("--key", help="sign, recalibrate, requantize: private key file")
    p.add_argument("--key-id", default="hq", help="key id")
    p.add_argument("--trust", nargs="*", help="verify, recalibrate, requantize: trusted public key files "
                                              "(default: models/keys/*.pub)")
    p.add_argument("--installed-version", type=int, help="verify: reject versions not above this")
    p.add_argument("--line", help="verify: reject bundles for another line")
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser("sync", help="one sync pass with HQ: send the outbox, fetch a newer bundle")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("hq", help="HQ: feedback server, appliance tokens, publishing bundles")
    p.add_argument("action", choices=("serve", "add-appliance", "publish", "retrain"))
    p.add_argument("--state-dir", default="hq-state", help="frames, published bundles (and hq.db for SQLite)")
    p.add_argument("--database-url", help="PostgreSQL for HQ's records, e.g. postgresql://hq@dbhost/linejudge "
                   "(default: $LINEJUDGE_HQ_DATABASE_URL, else SQLite in the state dir)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--admin-token", help="serve: token for GET /v1/fleet (default: $LINEJUDGE_HQ_ADMIN_TOKEN)")
    p.add_argument("--appliance", help="add-appliance: appliance id")
    p.add_argument("--bundle", help="publish: signed bundle directory")
    p.add_argument("--config", help="retrain: fleet config (training/configs/fleet.yaml)")
    p.add_argument("--base", help="retrain: the run the current model came from (runs/full)")
    p.add_argument("--out", help="retrain: new run directory")
    p.add_argument("--key", help="retrain: signing key; without it the model is trained and gated, not published")
    p.add_argument("--key-id", default=None)
    p.add_argument("--line", default="el-solar")
    p.add_argument("--gate-points", type=float, default=0.5,
                   help="retrain: allowed drop on ELPV val and golden frames, in points")
    p.add_argument("--fleet-repeat", type=positive_int, default=8, help="retrain: oversampling of fleet pairs")
    p.set_defaults(func=cmd_hq)

    p = sub.add_parser("bench", help="latency/throughput of torch, ONNX fp32 and INT8 (JSON + PNG)")
    p.add_argument("--json", required=True)
    p.add_argument("--run", help="training run for the torch variants (default: build them from the bundle's "
                                 "training config, random weights, timing only)")
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle (ONNX variants)")
    p.add_argument("--frames", type=positive_int, default=30, help="timed frames per setting")
    p.add_argument("--pipeline", action="store_true", help="whole appliance pipeline from a replay source")
    p.add_argument("--seconds", type=positive_float, default=20.0, help="--pipeline: how long each run lasts")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="runs of the ONNX variants (--pipeline: whole runs); the median is reported")
    p.set_defaults(func=cmd_bench)
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


if __name__ == "__main__":
    sys.exit(main())
