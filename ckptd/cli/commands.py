"""``ckptd run | once | status | slim | check | demo``.

Heavy modules (pydantic, watchdog) are imported inside the commands that need them, so
``ckptd --help`` and ``ckptd slim`` start fast; torch is never imported (only ``ckptd demo``'s
trainer, a child process, uses it). Exit codes: 0 ok, 1 a work_dir had errors (the
others were still processed), 2 usage or config error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckptd.slim.artifact import WrittenArtifact

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2
DEFAULT_CONFIGS = (Path("ckptd.yaml"), Path("/etc/ckptd/ckptd.yaml"))


def _default_config() -> Path:
    env = os.environ.get("CKPTD_CONFIG")
    if env:
        return Path(env)
    return next((p for p in DEFAULT_CONFIGS if p.exists()), DEFAULT_CONFIGS[0])


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="config file (default: $CKPTD_CONFIG, ./ckptd.yaml, /etc/ckptd/ckptd.yaml)",
    )


def _add_keep_priority(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep-priority",
        action="store_true",
        help="do not lower ckptd's CPU (nice) and I/O (idle class) priority (config: priority)",
    )


def _lower_priority(args: argparse.Namespace, loaded) -> None:  # loaded: LoadedConfig
    """priority: nice and the idle I/O class, before any thread starts (threads inherit)."""
    if args.keep_priority:
        return
    import logging

    from ckptd.service.priority import lower_priority

    wanted = loaded.config.priority
    outcome = lower_priority(wanted.nice, wanted.io_idle)
    log = logging.getLogger("ckptd.priority")
    for note in outcome.notes:
        log.warning(note, extra={"fields": {"action": "priority"}})
    log.debug(f"nice {outcome.nice}, I/O class {outcome.io_class}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptd",
        description="Checkpoint-management daemon: retention and slim best artifacts for "
        "training work_dirs, from outside the trainer.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # Logging options go before or after the command: `ckptd run --log-format json` too.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=argparse.SUPPRESS,
        help="text for people (default), json lines for log shippers",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    for action in common._actions:
        parser._add_action(action)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", parents=[common], help="watch the work_dirs and keep them reconciled (the service)"
    )
    _add_config(run)
    _add_keep_priority(run)
    run.add_argument(
        "--workers", type=int, default=2, help="work_dirs reconciled in parallel (default 2)"
    )
    run.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics and /healthz here, e.g. 127.0.0.1:9464 (default: off)",
    )

    check = sub.add_parser(
        "check", parents=[common], help="validate the config and print it with defaults"
    )
    _add_config(check)

    once = sub.add_parser(
        "once", parents=[common], help="one reconcile pass over every work_dir, then exit"
    )
    _add_config(once)
    _add_keep_priority(once)
    once.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    once.add_argument("--json", action="store_true", help="print JSON instead of a listing")

    status = sub.add_parser(
        "status", parents=[common], help="best, artifact, checkpoints and why they are kept"
    )
    _add_config(status)
    status.add_argument("--json", action="store_true")

    demo = sub.add_parser(
        "demo", parents=[common], help="watch ckptd manage a simulated training (< 1 min)"
    )
    demo.add_argument("--keep", action="store_true", help="keep the temp folder to inspect")
    demo.add_argument("--epochs", type=int, default=12)
    demo.add_argument("--delay", type=float, default=1.2, help="seconds per simulated epoch")

    slim = sub.add_parser(
        "slim", parents=[common], help="write a slim copy of one checkpoint (meta + state_dict)"
    )
    slim.add_argument("checkpoint", type=Path)
    slim.add_argument("-o", "--output", type=Path, help="output file or folder")
    slim.add_argument(
        "--keep-keys",
        default=None,
        help="comma-separated top-level keys to keep ('?' after a key: if present); default "
        "meta,state_dict for a file, model,meta? for a torch distributed checkpoint folder "
        "(state_dict,hyper_parameters?,pytorch-lightning_version? for a Lightning one); "
        "'all' keeps every key of a folder, as dcp_to_torch_save does",
    )
    slim.add_argument(
        "--hash-in-name", action="store_true", help="append -<sha256[:8]> like publish_model.py"
    )
    slim.add_argument(
        "--format",
        choices=("torch", "safetensors"),
        default="torch",
        help="torch: a torch zip that torch.load(weights_only=True) reads (default); "
        "safetensors: a .safetensors file (state_dict tensors, the other keys as metadata)",
    )
    return parser


def _version() -> str:
    from ckptd import __version__

    return __version__


def _load(args: argparse.Namespace, warn: bool = True):  # -> LoadedConfig
    import logging

    from ckptd.core.config import deprecations, load_config

    loaded = load_config(args.config or _default_config())
    if warn:  # once per start: a daemon's passes never repeat it
        for note in deprecations(loaded.config):
            logging.getLogger("ckptd.config").warning(f"{loaded.path}: {note}")
    return loaded


def cmd_check(args: argparse.Namespace) -> int:
    from ckptd.core.config import deprecations, effective_config_yaml

    loaded = _load(args, warn=False)
    print(f"# {loaded.path}: valid. Effective configuration (defaults filled in):")
    for note in deprecations(loaded.config):
        print(f"# note: {note}")  # a comment, so the output stays a valid config
    print(effective_config_yaml(loaded), end="")
    return EXIT_OK


def _pass(args: argparse.Namespace, dry_run: bool) -> tuple[list, list[str]]:
    from ckptd.engine.reconcile import PassOptions, reconcile
    from ckptd.engine.targets import discover

    loaded = _load(args)
    if args.command == "once":  # not status: a person waits for it
        _lower_priority(args, loaded)
    found = discover(loaded)
    options = PassOptions(settle=loaded.config.watch.settle, dry_run=dry_run, one_shot=True)
    reports = [reconcile(target, options) for target in found.targets]
    notes = list(found.notes)
    if loaded.config.disk is not None:
        from ckptd.engine.watermark import enforce

        # Across the work_dirs of each filesystem, after each one's own plan.
        notes += enforce(reports, loaded.config.disk, options, reconcile)
    if any(t.project.artifact.publish for t in found.targets):
        from ckptd.publish.sync import publish_reports

        # After every pass: retention never waits for an upload (dry runs only show state).
        publish_reports(reports)
    if any(t.project.hooks.on_new_best for t in found.targets):
        _run_hooks(reports)
    return reports, notes


def _run_hooks(reports: list) -> None:
    """hooks.on_new_best after the passes and publishing, each within hooks.timeout."""
    import logging

    from ckptd.engine.hooks import log_result, new_best_hooks, run_hook

    log = logging.getLogger("ckptd.hooks")
    for report in reports:
        for run in new_best_hooks(report):
            result = run_hook(run)
            log_result(result, log)
            if not result.ok:
                report.notes.append(f"hook failed: {result.detail}")


def _print_pass(args: argparse.Namespace, dry_run: bool, summary: bool, charts: bool) -> int:
    from ckptd.core.units import format_size
    from ckptd.present.report import INDENT, format_report, report_json
    from ckptd.present.sparkline import ChartStyle

    reports, notes = _pass(args, dry_run=dry_run)
    if args.json:
        print(json.dumps({"notes": notes, "work_dirs": [report_json(r) for r in reports]}))
    else:
        for note in notes:
            print(f"note: {note}")
        style = ChartStyle.for_stream(sys.stdout, INDENT) if charts else None
        for report in reports:
            print(format_report(report, style))
        if summary:
            reclaimed = sum(r.reclaimed_bytes for r in reports)
            failed = sum(r.failed for r in reports)
            print(
                f"{len(reports)} work_dir(s), {failed} with errors, "
                f"reclaimed {format_size(reclaimed)}"
                + (" (dry run: nothing changed)" if dry_run else "")
            )
    return EXIT_ERRORS if any(r.failed for r in reports) else EXIT_OK


def cmd_once(args: argparse.Namespace) -> int:
    return _print_pass(args, dry_run=args.dry_run, summary=True, charts=False)


def cmd_status(args: argparse.Namespace) -> int:
    # status is a dry run: the plan as it stands, read without taking locks or writing
    # with each metric's history drawn: status is read by people at a terminal
    return _print_pass(args, dry_run=True, summary=False, charts=True)


def _slim_destination(args: argparse.Namespace, suffix: str) -> tuple[Path, str]:
    source: Path = args.checkpoint
    default_name = f"{source.stem}_slim{suffix}"
    out: Path | None = args.output
    if out is None:
        return source.parent, default_name
    if out.is_dir() or str(out).endswith(os.sep):
        return out, default_name
    return out.parent, out.name


def cmd_slim(args: argparse.Namespace) -> int:
    from ckptd.present.progress import byte_progress
    from ckptd.slim.errors import SlimError
    from ckptd.slim.safetensors_writer import write_safetensors
    from ckptd.slim.slimmer import slim_checkpoint

    write, suffix = (
        (write_safetensors, ".safetensors")
        if args.format == "safetensors"
        else (slim_checkpoint, ".pth")
    )
    if args.checkpoint.is_dir() and not args.checkpoint.is_symlink():
        return _slim_folder(args)
    keep = tuple(k.strip() for k in (args.keep_keys or "meta,state_dict").split(",") if k.strip())
    if not keep:
        print("ckptd slim: --keep-keys needs at least one key", file=sys.stderr)
        return EXIT_USAGE
    folder, name = _slim_destination(args, suffix)
    stem = name.removesuffix(suffix)
    final = (lambda sha: f"{stem}-{sha[:8]}{suffix}") if args.hash_in_name else name
    try:
        size = args.checkpoint.stat().st_size
    except OSError as exc:
        print(f"ckptd slim: {args.checkpoint}: {exc.strerror}", file=sys.stderr)
        return EXIT_ERRORS
    try:
        with byte_progress(size, f"slim {args.checkpoint.name}") as progress:
            result = write(args.checkpoint, folder, final, keep_keys=keep, progress=progress)
    except SlimError as exc:
        print(f"ckptd slim: {exc}", file=sys.stderr)
        return EXIT_ERRORS
    except OSError as exc:
        print(f"ckptd slim: {exc.filename or folder}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERRORS
    return _report_slim(result, size)


def _report_slim(result: WrittenArtifact, size: int) -> int:
    """The one line both ``ckptd slim`` forms print for what they wrote."""
    from ckptd.core.units import format_size

    print(
        f"{result.path}  {format_size(result.size)} (from {format_size(size)})  "
        f"sha256 {result.sha256}  kept {', '.join(result.kept_keys)}; dropped "
        f"{', '.join(result.dropped_keys) or 'nothing'}  {result.seconds:.2f} s"
    )
    return EXIT_OK


def _slim_folder(args: argparse.Namespace) -> int:
    """``ckptd slim FOLDER``: a sharded checkpoint consolidated into one file (the streaming,
    no-code-run replacement for ``dcp_to_torch_save``)."""
    from ckptd.fs.delete import NotPlainTree, tree_stat
    from ckptd.layouts.lightning import LightningLayout
    from ckptd.layouts.lightning_sharded import META_FILE, folder_complete
    from ckptd.present.progress import byte_progress
    from ckptd.slim.artifact import ArtifactRequest
    from ckptd.slim.dcp_writer import DcpConsolidation
    from ckptd.slim.errors import SlimError
    from ckptd.slim.sharded import sharded_format

    folder: Path = args.checkpoint
    fmt = sharded_format(folder)
    if fmt is None:
        print(
            f"ckptd slim: {folder}: a folder, but no sharded checkpoint ckptd knows (a torch "
            "distributed checkpoint has .metadata and __<rank>_<i>.distcp files; a DeepSpeed "
            "one *_model_states.pt and *_optim_states.pt)",
            file=sys.stderr,
        )
        return EXIT_ERRORS
    lightning = (folder / META_FILE).exists()
    complete, why = folder_complete(folder) if lightning else fmt.complete(folder)
    if not complete:
        print(f"ckptd slim: {folder}: not complete: {why}", file=sys.stderr)
        return EXIT_ERRORS
    if fmt.kind == "dcp":
        rename = {"model": "state_dict"} if lightning else None
        writer = DcpConsolidation(args.format, rename, META_FILE if lightning else None)
    else:
        writer = fmt.writer(args.format)
    default = LightningLayout.default_keep_keys if lightning else ("model", "meta?")
    text = args.keep_keys
    keep = default if text is None else tuple(k.strip() for k in text.split(",") if k.strip())
    if keep == ("all",):
        keep = ("*",)
    if not keep:
        print("ckptd slim: --keep-keys needs at least one key", file=sys.stderr)
        return EXIT_USAGE
    suffix = fmt.suffix(args.format)
    dest, name = _slim_destination(args, suffix)
    stem = name.removesuffix(suffix)
    final = (lambda sha: f"{stem}-{sha[:8]}{suffix}") if args.hash_in_name else name
    try:
        size = tree_stat(folder).size
        with byte_progress(size, f"slim {folder.name}") as progress:
            result = writer.write(ArtifactRequest(folder, dest, final, keep, progress))
    except (SlimError, NotPlainTree) as exc:
        print(f"ckptd slim: {exc}", file=sys.stderr)
        return EXIT_ERRORS
    except OSError as exc:
        print(f"ckptd slim: {exc.filename or dest}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERRORS
    return _report_slim(result, size)


def cmd_run(args: argparse.Namespace) -> int:
    from ckptd.service.daemon import Daemon

    loaded = _load(args)
    if args.workers < 1:
        print("ckptd run: --workers must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    _lower_priority(args, loaded)
    metrics = server = None
    if args.metrics_addr:
        from ckptd.service.metrics import DaemonMetrics

        metrics = DaemonMetrics()
    daemon = Daemon(loaded, workers=args.workers, metrics=metrics)
    if metrics is not None:
        try:
            server = metrics.start_server(args.metrics_addr, daemon.healthy)
        except (OSError, ValueError) as exc:
            print(f"ckptd run: --metrics-addr {args.metrics_addr}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    daemon.install_signal_handlers()
    try:
        return daemon.run()
    finally:
        if server is not None:
            server.stop()


def cmd_demo(args: argparse.Namespace) -> int:
    from ckptd.demo.run import missing_requirements, run_demo

    advice = missing_requirements()
    if advice is not None:
        print(advice, file=sys.stderr)
        return EXIT_USAGE
    return run_demo(keep=args.keep, epochs=args.epochs, delay=args.delay)


COMMANDS = {
    "run": cmd_run,
    "demo": cmd_demo,
    "check": cmd_check,
    "once": cmd_once,
    "status": cmd_status,
    "slim": cmd_slim,
}


def _collect_garbage_less_often() -> None:
    """A pass makes many small objects and almost no reference cycles, and a pass over 2,000
    work_dirs keeps ~200 MB of reports alive: with the default thresholds the cyclic collector
    rescanned them ~1.5 s of a 7.7 s `ckptd once`. The modules and configuration loaded so far
    are frozen out of its scans, and it runs every 20,000 allocations instead of 700."""
    import gc

    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ckptd.present.logs import setup_logging

    umask = os.environ.get("CKPTD_UMASK")
    if umask:
        # Containers start with umask 022; 002 lets the trainers' group remove what ckptd made.
        os.umask(int(umask, 8))
    setup_logging(getattr(args, "log_format", "text"), getattr(args, "verbose", False))
    _collect_garbage_less_often()
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `ckptd status | head`: the reader left; that is not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        from ckptd.core.config import ConfigError

        if isinstance(exc, ConfigError):
            print(f"ckptd: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise
