"""rsnl studies on a workstation or a Ray cluster.

    python launch.py                                  # the DTD ablation (needs DTD and a GPU)
    python launch.py --preset quickstart              # offline, 2 CPU cores, ~2 minutes
    python launch.py --preset dtd-search --gpus-per-trial 0.25 --set data_root=/data
    python launch.py --resume --name quickstart       # continue after Ctrl-C or a crash
    python launch.py presets                          # list the presets
    python launch.py report results/quickstart        # tables and plots of a study
"""

from __future__ import annotations

import argparse
import sys


def user_errors() -> tuple:
    """The one-line input errors; imported on use so that `report` starts without torch."""
    from rsnl.errors import USER_ERRORS
    return USER_ERRORS


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python launch.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run an rsnl study (Ray Tune) from a preset or a study YAML.",
        epilog="other commands:\n  python launch.py presets                 list the presets\n"
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
    p.add_argument("--resume", action="store_true", help="continue the study at STORAGE/NAME")
    p.add_argument("--smoke-test", action="store_true", help="the same study on digits, 2 epochs, few trials")
    return p


def load_from_args(args):
    from tune.study import load_study, smoke, with_runtime_options
    if args.resume and not (args.config or args.preset):
        # The stored copy of the study is read later; only its location is needed here.
        from tune.study import StudyConfig
        name = args.name or ("dtd-ablation" if not args.smoke_test else "dtd-ablation-smoke")
        return StudyConfig(name=name, trial={}, storage=args.storage or "./results")
    study = load_study(args.config, args.preset, args.set)
    if args.smoke_test:
        study = smoke(study)
    return with_runtime_options(study, gpu=args.gpus_per_trial, cpu=args.cpus_per_trial,
                                max_concurrent=args.max_concurrent, num_samples=args.num_samples,
                                storage=args.storage, name=args.name)


def describe(study, exp: str) -> str:
    from tune.optuna_store import storage_url
    members = study.group_members
    group = f" x group of {len(members)}" if len(members) > 1 else ""
    lines = [f"[rsnl] study {study.name}: {study.kind} search, {study.num_trials()} trial(s){group}, "
             f"objective {study.metric} ({study.mode}), {study.cpu:g} CPU + {study.gpu:g} GPU per trial",
             f"[rsnl] results:     {exp}",
             f"[rsnl] tensorboard: tensorboard --logdir {exp}"]
    if study.kind in ("optuna", "random") and "://" not in exp:
        lines.append(f"[rsnl] optuna:      optuna-dashboard {storage_url(exp)}")
    return "\n".join(lines)


def summarize(results, study, exp: str) -> str:
    ok = [r for r in results if r.error is None and r.metrics]
    unfinished = len(results) - results.num_terminated - results.num_errors
    lines = [f"[rsnl] {results.num_terminated} trial(s) finished, {results.num_errors} failed"
             + (f", {unfinished} unfinished" if unfinished else "")]
    if any(study.metric in (r.metrics or {}) for r in ok):
        best = results.get_best_result(metric=study.metric, mode=study.mode, scope="last")
        params = {k: best.config.get(k) for k in study.params}
        if isinstance(best.config.get("variant"), dict):
            params["variant"] = best.config["variant"]["name"]
        m = best.metrics
        lines.append(f"[rsnl] best trial {best.path}")
        lines.append(f"[rsnl]   params {params}; {study.metric} {m.get(study.metric):.2f}, "
                     f"test_acc {m.get('test_acc', float('nan')):.2f} (last epoch)")
    lines.append(f"[rsnl] results in {exp}; report: python launch.py report {exp}")
    return "\n".join(lines)


def cmd_run(argv) -> int:
    args = run_parser().parse_args(argv)
    errors = user_errors()
    study = None
    try:
        study = load_from_args(args)
        from tune.run import run_study

        def on_start(resolved):  # on resume: the stored study, not the command line's
            nonlocal study
            study = resolved
            print(describe(study, study.experiment_path()), flush=True)

        results, exp, _ = run_study(study, address=args.address, resume=args.resume, on_start=on_start)
    except errors as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(resume_hint(study), file=sys.stderr)
        return 130
    print(summarize(results, study, exp), flush=True)
    # Tune stops gracefully on Ctrl-C: trials left unfinished, or never suggested
    if results.num_terminated + results.num_errors < max(len(results), study.num_trials()):
        print(resume_hint(study), file=sys.stderr)
        return 130
    return 0 if results.num_errors == 0 else 1


def resume_hint(study) -> str:
    if study is None:
        return "\n[rsnl] interrupted before the study started"
    return (f"\n[rsnl] interrupted; continue with: python launch.py --resume --name {study.name} "
            f"--storage {study.storage}")


def cmd_presets(argv) -> int:
    from tune.study import list_presets
    for name, text in list_presets().items():
        print(f"{name:14s} {' '.join(text.split())}")
    return 0


def cmd_report(argv) -> int:
    p = argparse.ArgumentParser(prog="python launch.py report",
                                description="Write report.md with tables and PNG plots of a study.")
    p.add_argument("experiment", help="the experiment folder (STORAGE/NAME)")
    p.add_argument("--out", help="output folder (default: EXPERIMENT/report)")
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
