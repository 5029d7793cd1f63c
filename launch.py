"""rsnl studies on a workstation or a Ray cluster.

    python launch.py                                  # the DTD ablation (needs DTD and a GPU)
    python launch.py --preset quickstart              # offline, 2 CPU cores, ~2 minutes
    python launch.py --preset dtd-search --gpus-per-trial 0.25 --set data_root=/data
    python launch.py --resume --name quickstart       # continue after Ctrl-C, SIGTERM, a crash or a kill
    python launch.py presets                          # list the presets
    python launch.py report results/quickstart        # tables and plots of a study
"""

from __future__ import annotations

import argparse
import os
import sys


def user_errors() -> tuple:
    """The one-line input errors; imported on use so that `report` starts without torch."""
    from rsnl.errors import USER_ERRORS
    return USER_ERRORS


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python launch.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run an rsnl study (Ray Tune) from a preset or a study YAML.",
        epilog="Ctrl-C or SIGTERM stops a study in any phase (exit 130) and prints the --resume command; a second\n"
               "one ends the driver at once. --resume continues from Tune's saved state, or rebuilds what is\n"
               "missing from the study's record (docs/studies.md).\n\n"
               "other commands:\n  python launch.py presets                 list the presets\n"
               "  python launch.py report EXPERIMENT_DIR   write report.md with tables and plots")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a study in tune/configs (default: dtd-ablation)")
    src.add_argument("--config", metavar="FILE", help="a study YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a trial key (epochs=5) or a study key (search.num_samples=4)")
    p.add_argument("--address", help="join a Ray cluster (auto, or host:port); default: start Ray here")
    p.add_argument("--gpus-per-trial", type=float, metavar="F", help="0.25 runs four trials per GPU; 0 for CPU")
    p.add_argument("--cpus-per-trial", type=float, metavar="N")
    p.add_argument("--max-concurrent", type=int, metavar="N", help="at most N trials at once (0: no limit)")
    p.add_argument("--num-samples", type=int, metavar="N", help="trials of an optuna or random search")
    p.add_argument("--storage", metavar="DIR|URI", help="where experiments go (default ./results)")
    p.add_argument("--name", help="experiment name (default: the study's name)")
    p.add_argument("--resume", action="store_true", help="continue the study stored at STORAGE/NAME, as it started")
    p.add_argument("--smoke-test", action="store_true", help="the same study on digits, 2 epochs, few trials")
    return p


def load_from_args(args):
    """The study to run: from the preset or file and the options, or, on --resume, the stored one."""
    from tune.study import load_study, smoke, with_runtime_options
    if args.resume:
        return stored_from_args(args)
    study = load_study(args.config, args.preset, args.set)
    if args.smoke_test:
        study = smoke(study)
    return with_runtime_options(study, gpu=args.gpus_per_trial, cpu=args.cpus_per_trial,
                                max_concurrent=args.max_concurrent, num_samples=args.num_samples,
                                storage=args.storage, name=args.name)


def stored_from_args(args):
    """--resume runs the study stored in STORAGE/NAME, as it was started; found from any directory."""
    from rsnl import storage
    from rsnl.errors import ConfigError
    from rsnl.study import check_name, read_stored
    from tune.study import load_study, smoke
    changes = [flag for flag, v in (("--set", args.set), ("--gpus-per-trial", args.gpus_per_trial),
                                    ("--cpus-per-trial", args.cpus_per_trial),
                                    ("--max-concurrent", args.max_concurrent),
                                    ("--num-samples", args.num_samples)) if v not in (None, [])]
    if changes:
        raise ConfigError(f"--resume: continues the stored study as it started; {', '.join(changes)} cannot "
                          f"change it (run a new study with another --name instead)")
    name, where = args.name, args.storage
    if args.config or args.preset:  # the name (and storage) of the study that file or preset starts
        started = load_study(args.config, args.preset)
        started = smoke(started) if args.smoke_test else started
        name, where = name or started.name, where or started.storage
    if name is None:
        raise ConfigError("--resume: needs --name (the study's folder inside --storage), or the --preset or "
                          "--config it was started with")
    experiment = storage.join(storage.absolute(where or "./results"), check_name(name, "--name"))
    try:
        return read_stored(experiment)
    except ConfigError as e:
        raise ConfigError(f"--resume: {e}") from None
    except OSError as e:
        raise ConfigError(f"--resume: cannot read {experiment} ({' '.join(str(e).split())[:200]})") from None


def dashboard_line(exp: str) -> str:
    import importlib.util
    from tune.record import local_path, storage_url
    if importlib.util.find_spec("optuna_dashboard") is None:
        return '[rsnl] optuna:      pip install -e ".[dashboard]" for optuna-dashboard (optuna.db is written)'
    return f"[rsnl] optuna:      optuna-dashboard {storage_url(local_path(exp))}"


def describe(study) -> str:
    from rsnl import storage
    from tune.run import log_location
    exp = study.experiment_path()
    members = study.group_members
    group = f" x group of {len(members)}" if len(members) > 1 else ""
    log = log_location(exp) + (" (copied into the experiment when the driver ends)" if storage.is_uri(exp) else "")
    return "\n".join([
        f"[rsnl] study {study.name}: {study.kind} search, {study.num_trials()} trial(s){group}, "
        f"objective {study.metric} ({study.mode}), {study.cpu:g} CPU + {study.gpu:g} GPU per trial",
        f"[rsnl] results:     {exp}",
        f"[rsnl] tensorboard: tensorboard --logdir {exp}",
        dashboard_line(exp),
        f"[rsnl] Ray's log:   {log}"])


def summarize(tally, study) -> str:
    exp = study.experiment_path()
    parts = [f"{tally.finished} of {tally.planned} trial(s) finished", f"{tally.failed} failed"]
    if tally.unfinished:
        parts.append(f"{tally.unfinished} unfinished")
    lines = [f"[rsnl] {', '.join(parts)}"]
    if tally.best:
        b = tally.best
        test = f", test_acc {b['test_acc']:.2f}" if "test_acc" in b else ""
        lines.append(f"[rsnl] best trial {b.get('trial_folder', b.get('tune_trial_id'))}: {b['params']}; "
                     f"{study.metric} {b['value']:.2f}{test} (last epoch)")
    lines.append(f"[rsnl] results in {exp}; report: python launch.py report {exp}")
    return "\n".join(lines)


def resume_hint(study) -> str:
    """How to continue, only where a continuation exists (the study file is stored)."""
    from rsnl import storage
    from rsnl.study import STUDY_FILE
    exp = study.experiment_path() if study is not None else None
    try:
        stored = exp is not None and storage.exists(storage.join(exp, STUDY_FILE))
    except OSError:
        stored = False
    if not stored:
        return "[rsnl] interrupted before the study started; nothing to resume (run the same command again)"
    return (f"[rsnl] interrupted; continue with: python launch.py --resume --name {study.name} "
            f"--storage {study.storage_path()}")


def cmd_run(argv) -> int:
    from tune.stopping import STOP
    try:
        return run(argv, STOP)
    finally:
        STOP.uninstall()  # the work is done: a later SIGTERM just ends the process


def run(argv, stop) -> int:
    args = run_parser().parse_args(argv)
    if args.address is None:
        # Token authentication on, as Ray's default for a new local cluster, but stated: Ray then does not
        # warn about it on every start. Before Ray is imported (it reads this once); a user's value wins.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    errors = user_errors()
    study = None
    stop.install(last_words=lambda: print("\n" + resume_hint(study), file=sys.stderr))
    try:
        study = load_from_args(args)
        from tune.progress import Progress
        from tune.record import tally
        from tune.run import run_study
        run_study(study, address=args.address, resume=args.resume, progress=Progress(study),
                  announce=lambda: print(describe(study), flush=True))
        outcome = tally(study.experiment_path(), study)
        print(summarize(outcome, study), flush=True)
        stop.waiting = True  # from here on a request is only counted: the summary is out, the end is near
        if outcome.unfinished or stop.requests:  # a stop during Tune's loop paused the trials
            print(resume_hint(study), file=sys.stderr)
            return 130
        return 1 if outcome.failed else 0
    except errors as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stop.waiting = True
        print("\n" + resume_hint(study), file=sys.stderr)
        return 130


def cmd_presets(argv) -> int:
    from tune.study import list_presets
    for name, text in list_presets().items():
        print(f"{name:14s} {' '.join(text.split())}")
    return 0


def cmd_report(argv) -> int:
    p = argparse.ArgumentParser(prog="python launch.py report",
                                description="Write report.md with tables and PNG plots of a study.")
    p.add_argument("experiment", help="the experiment folder (STORAGE/NAME), or its URI (s3://bucket/studies/NAME)")
    p.add_argument("--out", help="output folder (default: EXPERIMENT/report; ./NAME-report for a URI)")
    args = p.parse_args(argv)
    try:
        from analysis.report import write_report
        path = write_report(args.experiment, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"launch.py report: error: {e}", file=sys.stderr)
        return 2
    print(f"[rsnl] report written to {path}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"presets": cmd_presets, "report": cmd_report}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return cmd_run(argv)


if __name__ == "__main__":
    sys.exit(main())
