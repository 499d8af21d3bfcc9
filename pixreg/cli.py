"""The ``pixreg`` command line: ``train``, ``eval``, ``compare``, ``diagnose``.

Examples::

    pixreg train --config scenes --method car --seed 0 --out runs/car
    pixreg train --out runs/car --resume                   # continue a killed run
    pixreg eval runs/car --splits test,test_openset        # re-evaluate a run's checkpoint
    pixreg compare --config scenes --methods ce,cplus1,car,lall,rch --seeds 2 --out runs/cmp
    pixreg diagnose runs/ce runs/car --out runs/diag           # HTML report of what the regularizer did
    pixreg train --config camvid --data-root /data/camvid --set train.steps=2000 --set model.opts.width=32

Every option of the YAML configuration can be overridden with ``--set key.sub=value``
(the value is parsed as YAML). ``python -m pixreg`` is the same program. Under
``torchrun --nproc_per_node N -m pixreg train ...`` training is distributed (see
:mod:`pixreg.train.process_group`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``pixreg train: error: argument --threads: ...``), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", "-c", default=None,
                       help="YAML configuration (default: the built-in defaults, identical to the built-in 'scenes'); a path or a built-in name: scenes, camvid, camvid_frozen")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration key, e.g. --set train.steps=100 (repeatable; value parsed as YAML)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default=None, help="device (default: config, auto)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads (default: config)")
    p.add_argument("--data-root", default=None, help="dataset folder (sets data.root), e.g. /path/to/CamVid")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error (also: PIXREG_DEBUG=1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pixreg", description="Train, evaluate and compare segmentation models with pixel-representation regularizers.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (also: PIXREG_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one method with one seed into a run folder")
    _common(t)
    t.add_argument("--method", "-m", default=None, help="ce, cplus1, car, lall, rch or a combination like car+lall (default: config)")
    t.add_argument("--seed", type=int, default=None, help="run seed (default: config)")
    t.add_argument("--out", "-o", default=None, help="run folder (default: runs/<dataset>/<method>/seed<seed>)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint (a finished run is left as is)")
    g.add_argument("--overwrite", action="store_true", help="delete the run in --out and start again")

    e = sub.add_parser("eval", help="evaluate a run's checkpoint")
    e.add_argument("run", help="run folder (holding config.yaml and checkpoints/)")
    e.add_argument("--checkpoint", default="last", help="last, best, or a path to a .pt file (default: last)")
    e.add_argument("--splits", default=None, help="comma-separated splits (default: the run's val and test splits)")
    e.add_argument("--json", default=None, help="write the metrics to this JSON file (default: RUN/eval_<checkpoint>.json)")
    _common(e, config=False)

    c = sub.add_parser("compare", help="train several methods over several seeds and tabulate the paired differences")
    _common(c)
    c.add_argument("--methods", default="ce,cplus1,car,lall,rch", help="comma-separated methods (default: ce,cplus1,car,lall,rch)")
    c.add_argument("--seeds", type=_positive_int, default=2, help="number of seeds: 0..N-1 (default 2)")
    c.add_argument("--seed-list", default=None, help="explicit comma-separated seeds (overrides --seeds)")
    c.add_argument("--out", "-o", default=None, help="output folder (default: runs/compare_<dataset>)")
    c.add_argument("--jobs", "-j", type=int, default=1,
                   help="runs trained at once in separate processes, sharing the --threads budget "
                        "(default 1; e.g. --jobs 2 --threads 2: two 1-thread runs)")
    c.add_argument("--report-only", action="store_true",
                   help="train nothing: summarise the seeds whose runs of every method have finished")

    d = sub.add_parser("diagnose", help="report what the regularizers did to the pixel features of trained runs (HTML + PNG + CSV/JSON)")
    d.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (holding config.yaml and checkpoints/)")
    d.add_argument("--out", "-o", default=None, help="output folder (default: <first run>/diagnostics)")
    d.add_argument("--data", default=None, help="dataset name (default: the one each run was trained on, from its config.yaml)")
    d.add_argument("--split", default=None, help="split to analyse (default: the run's first test split), e.g. test_openset")
    d.add_argument("--checkpoint", default="last", help="last, best, or a path to a .pt file (default: last)")
    d.add_argument("--examples", type=int, default=4, help="images shown with error and RCH calibration maps (default 4)")
    d.add_argument("--samples-per-class", type=_positive_int, default=300, help="pixels sampled per class for t-SNE and distances (default 300)")
    d.add_argument("--max-images", type=_positive_int, default=None, help="use only the first N images of the split")
    d.add_argument("--openset-split", default="auto", help="split with unseen background kinds (scenes: test_openset; 'none' to skip)")
    d.add_argument("--seed", type=int, default=0, help="seed of the pixel sample and t-SNE (default 0)")
    _common(d, config=False)
    return parser


def _overrides(args: argparse.Namespace) -> List[str]:
    out = list(args.overrides)
    if args.data_root is not None:
        out.append(f"data.root={json.dumps(args.data_root)}")
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.config import resolve_config
    from .train.methods import method_slug
    from .train.trainer import train

    cfg_path = args.config
    if args.resume:
        if not args.out:
            raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
        if not os.path.isdir(os.path.join(args.out, "checkpoints")):
            raise ValueError(f"--resume: {args.out} holds no run to continue (no checkpoints/ folder); "
                             "drop --resume to start a new run there")
        if cfg_path is None and os.path.exists(os.path.join(args.out, "config.yaml")):
            cfg_path = os.path.join(args.out, "config.yaml")  # resume with the run's own configuration
    cfg = resolve_config(cfg_path, _overrides(args), method=args.method, seed=args.seed, device=args.device, threads=args.threads)
    out = args.out or os.path.join("runs", str(cfg["data"]["name"]), method_slug(cfg["method"]).replace("+", "_"), f"seed{cfg['seed']}")
    metrics = train(cfg, out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # one report under torchrun
        _print_metrics(metrics["splits"], header=f"{metrics['method']} seed {metrics['seed']} -> {out}")
    return 0


def _print_metrics(splits, header: str = "") -> None:
    from .train.metrics import METRIC_NAMES

    if header:
        print(header)
    for split, m in splits.items():
        vals = ", ".join(f"{k} {m[k]:.2f}" for k in METRIC_NAMES if k in m and m[k] == m[k])
        print(f"  {split:>14}: {vals}")


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .train import process_group
    from .train.evaluation import evaluate
    from .train.run import load_run, make_dataset, resolve_checkpoint, run_config, write_json

    cfg = run_config(args.run, _overrides(args), device=args.device, threads=args.threads)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    resolve_checkpoint(args.run, args.checkpoint)  # a missing file fails before any work
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits is not None else \
        list(cfg["data"]["test_splits"]) + [cfg["data"]["val_split"]]
    if not splits:
        raise ValueError(f"--splits: no split given ({args.splits!r})")
    datasets = {}
    for split in splits:
        try:
            datasets[split] = make_dataset(cfg, split)
        except (ValueError, OSError) as err:
            raise ValueError(f"--splits: split {split!r} of dataset {cfg['data']['name']!r}: {err}") from err
    ctx = process_group.setup(cfg["device"])
    try:
        run = load_run(args.run, checkpoint=args.checkpoint, device=str(ctx.device), dataset=datasets[splits[0]], cfg=cfg,
                       load_criterion=False)
        results = {split: evaluate(run.model, ds, batch_size=int(cfg["eval"]["batch_size"]), device=ctx.device,
                                   num_workers=int(cfg["data"]["num_workers"]), amp=bool(cfg["train"]["amp"]),
                                   progress=not args.no_progress, desc=f"eval {split}", ctx=ctx)
                   for split, ds in datasets.items()}
        out = {"checkpoint": run.checkpoint, "step": run.step, "splits": results}
        if ctx.is_main:
            name = os.path.splitext(os.path.basename(run.checkpoint))[0]
            json_path = args.json or os.path.join(args.run, f"eval_{name}.json")
            write_json(out, json_path)
            _print_metrics(results, header=f"{args.run} ({name}, step {out['step']}) -> {json_path}")
    finally:
        process_group.teardown(ctx)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .train.compare import compare
    from .train.config import resolve_config

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError(f"--methods: no method given ({args.methods!r}); e.g. --methods ce,car")
    if args.seed_list is not None:
        try:
            seeds = [int(s) for s in args.seed_list.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seed-list must be comma-separated ints, got {args.seed_list!r}") from None
        if not seeds:
            raise ValueError(f"--seed-list: no seed given ({args.seed_list!r})")
    else:
        seeds = list(range(args.seeds))
    out = args.out
    if out is None:
        name = resolve_config(args.config, _overrides(args))["data"]["name"]
        out = os.path.join("runs", f"compare_{name}")
    compare(args.config, methods, seeds, out, overrides=_overrides(args), device=args.device,
            progress=not args.no_progress, threads=args.threads, jobs=args.jobs,
            report_only=args.report_only)
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    import torch

    from .train.checks import check_output_folder
    from .viz.diagnose import diagnose

    if args.threads:
        torch.set_num_threads(int(args.threads))
    device = args.device if args.device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or os.path.join(args.runs[0], "diagnostics")
    check_output_folder(out)
    summary = diagnose(args.runs, out, split=args.split, data=args.data, overrides=_overrides(args), checkpoint=args.checkpoint,
                       device=device, examples=args.examples, feature_capacity=args.samples_per_class,
                       max_images=args.max_images, openset_split=None if args.openset_split == "none" else args.openset_split,
                       progress=not args.no_progress, seed=args.seed)
    print(f"diagnostics of {len(summary['runs'])} run(s) on {summary['split']} -> {os.path.join(out, 'report.html')}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pixreg`` console script; returns the exit status.

    Every failure is reported as one line naming the argument, file or key
    (``pixreg train: error: train.lr must be a finite number > 0, got 'abc'``) with exit
    status 2; ``--debug`` (or ``PIXREG_DEBUG=1``) shows the traceback instead.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error already printed in one line
        return stop.code if isinstance(stop.code, int) else 2
    handlers = {"train": _cmd_train, "eval": _cmd_eval, "compare": _cmd_compare, "diagnose": _cmd_diagnose}
    try:
        return handlers[args.command](args)
    except Exception as err:  # noqa: BLE001 - the command line reports every failure in one line
        if getattr(args, "debug", False) or os.environ.get("PIXREG_DEBUG"):
            raise
        print(f"pixreg {args.command}: error: {_describe(err)}", file=sys.stderr)
        return 2


#: Exceptions whose message is meant for the user as it is; others get their type name and a --debug hint.
_USER_ERRORS = (ValueError, KeyError, TypeError, OSError, ImportError)


def _describe(err: BaseException) -> str:
    """One line for ``err``."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        msg = f"{err.filename}: {err.strerror}"
    msg = _one_line(msg) or type(err).__name__
    if not isinstance(err, _USER_ERRORS):
        msg = f"{type(err).__name__}: {msg} (run with --debug for the traceback)"
    return msg


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
