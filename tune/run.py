"""Run or resume a study on Ray Tune: the driver side of launch.py.

Order matters: one driver per experiment (a lock that dies with its holder); everything that can be
checked without a cluster is checked before the first console line and before Ray starts, and a resume
decides there how it goes on (tune.resume: Tune's saved state, or a rebuild from rsnl's record); the
image features of each (dataset, backbone) are computed by one Ray task and shared through the object
store; the study file is written; then Tune runs the trials, and nothing finished is ever run twice on
resume. SIGTERM and Ctrl-C stop it cleanly in every phase (tune.stopping). Ray's and Tune's logs go to
rsnl_driver.log in the experiment, whatever the outcome; the console gets rsnl's lines and one progress
line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path

from ray import tune

from rsnl import storage
from rsnl.errors import ConfigError
from rsnl.files import locked, probe_writable
from rsnl.inputs import preflight, prepare_weights
from rsnl.study import STUDY_FILE, StudyConfig, missing_study, trial_folder_name, write_stored
from tune.resources import RayLog, check_cluster_gpus, check_local_gpus, init_ray
from tune.stopping import STOP
from tune.trainable import bank_key, compute_bank, log_side_by_side, train_trial

LOG_FILE = "rsnl_driver.log"


class StopCallback(tune.Callback):
    """Hands a stop request to Tune's loop once the loop has its handler (a signal may come while Tune
    sets up, before it has one)."""

    def on_step_begin(self, iteration, trials, **info):
        STOP.deliver()


def check_storage(study: StudyConfig, resume: bool) -> None:
    """Local storage must be writable, remote storage reachable; a new study must not overwrite an old
    one, and a resume needs one."""
    exp = study.experiment_path()
    if not storage.is_uri(exp):
        root = Path(study.storage_path())
        probe = root
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise ConfigError(f"storage: {root} cannot be created ({probe} is a file); choose another --storage")
        try:
            probe_writable(probe)  # the nearest existing folder: a refused study creates nothing
        except OSError as e:
            raise ConfigError(f"storage: {root} is not writable ({probe}: {e.strerror}); choose another --storage") from None
    try:
        stored = storage.exists(storage.join(exp, STUDY_FILE))
    except OSError as e:
        raise ConfigError(f"storage: cannot reach {study.storage_path()} ({' '.join(str(e).split())[:200]})") from None
    if resume and not stored:
        raise ConfigError(f"--resume: {missing_study(exp)}")
    if not resume and stored:
        raise ConfigError(f"--name: a study already exists at {exp}; use --resume to continue it or another --name")


@contextlib.contextmanager
def driver_lock(experiment: str):
    """One driver per experiment on this machine: a second one (new or --resume) is refused at once.
    rsnl.files.locked, not waiting; the lock lives in the temp folder (the storage may be a bucket) and
    dies with its holder."""
    path = storage.mirror_dir(experiment, "locks")
    with contextlib.ExitStack() as stack:
        try:
            f = stack.enter_context(locked(path, wait=False))
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = Path(f"{path}.lock").read_text().strip()
            raise ConfigError(f"{experiment}: another launch.py is running this study ({holder or 'another process'}"
                              f"); wait for it to end or stop it, then --resume") from None
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield


def bank_plan(study: StudyConfig) -> dict[tuple, dict]:
    """One config per distinct feature bank, asking for the most augmented views any trial uses."""
    plan: dict[tuple, dict] = {}
    for cfg in study.validate_trials():
        key = bank_key(cfg)
        if key not in plan or cfg.aug_views > plan[key]["aug_views"]:
            plan[key] = cfg.to_dict()
    return plan


def preflight_study(study: StudyConfig) -> None:
    """Data layout, backbone and weights, shots: once per distinct bank, no model built; then every
    trial's noise manifest against its dataset."""
    from rsnl.config import TrialConfig
    from rsnl.inputs import check_noise_file
    datasets = {key: preflight(TrialConfig.from_dict(cfg)) for key, cfg in bank_plan(study).items()}
    for cfg in study.validate_trials():
        check_noise_file(cfg, datasets[bank_key(cfg)])


def prepare_study_weights(study: StudyConfig) -> None:
    """Build rsnl's stand-in VLM here, before Ray, if a trial needs it and it is not cached yet."""
    from rsnl.config import TrialConfig
    for cfg in bank_plan(study).values():
        prepare_weights(TrialConfig.from_dict(cfg))


def build_tuner(study: StudyConfig, banks: dict, exp: str, plan=None, progress=None):
    """A Tuner for a new study, or as `plan` says for a resume (tune.resume.Plan: restore or rebuild)."""
    from tune.checkpoints import CheckpointPruner, KeepResultsOnRetry, RestoreGuard, follow
    from tune.record import OptunaRecorder

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no status tables, no banners
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # OptunaSearch's "A new study created" line
    trainable = tune.with_resources(tune.with_parameters(train_trial, study=study, banks=banks),
                                    {"cpu": study.cpu, "gpu": study.gpu})
    restore = plan is not None and plan.kind == "restore"
    # Tune matches saved callback states to callbacks by position: the stateful ones come first, always
    # in this order. On resume they are made afresh for where the experiment is now (it may have moved)
    # and replace the copies pickled with the experiment; Tune then gives them their saved state.
    callbacks = [RestoreGuard(restore), CheckpointPruner(exp), OptunaRecorder(exp, study)]
    callbacks += [KeepResultsOnRetry()] + ([progress] if progress is not None else [])
    callbacks.append(StopCallback())
    if not restore:
        return new_tuner(study, trainable, callbacks, plan)
    new_tuner(study, trainable, callbacks)  # writes tuner.pkl afresh from the study: a kill may have cut Tune's
    tuner = tune.Tuner.restore(exp, trainable=trainable, resume_unfinished=True, resume_errored=True)
    internal = tuner._local_tuner  # no public way to replace them
    internal.get_run_config().callbacks = callbacks
    follow(internal._tune_config.scheduler, study.storage_path())
    return tuner


def new_tuner(study: StudyConfig, trainable, callbacks: list, plan=None):
    """A Tuner for every trial of the study, or for what a rebuilt resume has left to run."""
    from tune.checkpoints import following_scheduler
    from tune.resume import rebuilt_search
    from tune.study import param_space

    space = param_space(study)
    num_samples = study.num_samples if study.kind != "grid" else 1
    search_alg = None
    if plan is not None and plan.kind == "rebuild":
        search_alg, num_samples = rebuilt_search(plan, study)
        if plan.points is not None:
            space = {}  # the searcher hands out whole grid points
    elif study.kind == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        search_alg = OptunaSearch(seed=study.search_seed)
    if study.kind == "optuna" and study.max_concurrent:
        from ray.tune.search import ConcurrencyLimiter
        search_alg = ConcurrencyLimiter(search_alg, max_concurrent=study.max_concurrent)
    epochs = study.trial_configs(study.corner_overrides()[0])[0][1].epochs
    scheduler = following_scheduler(study.asha, epochs, study.storage_path())

    def name(trial) -> str:
        return trial_folder_name(trial.trial_id, trial.config, study)

    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=study.metric, mode=study.mode, search_alg=search_alg, scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=(study.max_concurrent or None) if study.kind != "optuna" else None,
            reuse_actors=study.reuse_actors, trial_name_creator=name, trial_dirname_creator=name),
        run_config=tune.RunConfig(
            name=study.name, storage_path=study.storage_path(), callbacks=callbacks,
            # Tune keeps every checkpoint; CheckpointPruner deletes only what no resume can need
            checkpoint_config=tune.CheckpointConfig(),
            failure_config=tune.FailureConfig(max_failures=study.max_failures),
            # the trials' records and noise manifests, written to their working folders, reach the storage
            sync_config=tune.SyncConfig(sync_artifacts=True),
            verbose=0),  # progress is rsnl's (tune/progress.py)
    )


def compute_banks(study: StudyConfig, log=print) -> tuple[dict, dict]:
    """Start one feature task per distinct bank; returns ({key: ObjectRef}, {key: stats})."""
    import ray
    task = ray.remote(compute_bank).options(num_returns=2, num_cpus=study.cpu, num_gpus=1 if study.gpu > 0 else 0)
    refs, stats_refs = {}, {}
    for key, cfg in bank_plan(study).items():
        refs[key], stats_refs[key] = task.remote(cfg)
    t0 = time.perf_counter()
    stats, failures = {}, []
    with STOP.waiting_phase():  # a stop request is answered between waits, not inside ray.get
        pending = list(stats_refs.values())
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2)
            STOP.check()
        for key, ref in stats_refs.items():
            try:
                stats[key] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                # The task's other output failed too: fetch it, or Ray logs it as an unhandled error whenever
                # the reference is collected (later, into whatever stream is open then).
                with contextlib.suppress(ray.exceptions.RayTaskError):
                    ray.get(refs[key])
                failures.append(e)
    if failures:
        # A bad image or missing weights found while computing features: the user's one line, not a traceback.
        from rsnl.errors import USER_ERRORS
        e = failures[0]
        if isinstance(getattr(e, "cause", None), USER_ERRORS):
            raise e.cause from None
        raise e
    computed = sum(s.get("computed", 0) for s in stats.values())
    hits = sum(s.get("hits", 0) for s in stats.values())
    log(f"[rsnl] image features: {len(refs)} bank(s), {computed} view(s) computed, {hits} from cache "
        f"({time.perf_counter() - t0:.1f}s)")
    return refs, stats


def run_study(study: StudyConfig, address: str | None = None, resume: bool = False, log=print, progress=None,
              announce=None):
    """Run (or resume) a study to the end; returns (ResultGrid or None, experiment path, feature stats).

    On resume, `study` is the stored one (rsnl.study.read_stored), and tune.resume decides how it
    continues. `progress` is a Tune callback that shows the study's progress (tune.progress.Progress),
    or None; `announce()` is called once every check that needs no Ray has passed.
    """
    from tune.checkpoints import RestoreFailed, prune
    from tune.resume import plan_resume, prepare, rebuild_plan

    exp = study.experiment_path()
    with driver_lock(exp):
        check_storage(study, resume)
        plan = plan_resume(exp, study) if resume else None
        if plan is None or plan.kind != "done":
            preflight_study(study)
            if address is None:
                check_local_gpus(study.gpu)
        if announce is not None:
            announce()
        if plan is not None and plan.line():
            log(plan.line())
        ray_log = RayLog(storage.mirror_dir(exp, "logs") / LOG_FILE)
        started = False
        try:
            if plan is not None and plan.kind == "done":
                write_stored(study)  # its storage is where the study is now (it may have moved)
                prune(exp)
                return None, exp, {}
            prepare_study_weights(study)
            with STOP.ray_start():
                started = init_ray(address, configure_logging=False) is not None
                ray_log.attach()
            if address is not None:
                check_cluster_gpus(study.gpu)
            banks, stats = compute_banks(study, log)
            log_side_by_side(study)
            STOP.check()
            write_stored(study)  # on resume too: its storage is where the study is now (it may have moved)
            if not storage.is_uri(exp):
                ray_log.move_to(Path(exp) / LOG_FILE)
            if plan is not None:
                prepare(plan, exp, study)
            try:
                with STOP.tuning():
                    results = fit(build_tuner(study, banks, exp, plan, progress))
            except RestoreFailed:
                logging.getLogger("rsnl.run").exception("Tune could not restore its run state")
                plan = rebuild_plan(exp, study, f"unreadable to Tune (details in {log_location(exp)})")
                log(plan.line())
                prepare(plan, exp, study)
                with STOP.tuning():
                    results = fit(build_tuner(study, banks, exp, plan, progress))
            prune(exp)  # the final state is in the storage now: two checkpoints per trial stay
        finally:
            if started:  # here, not at exit: a stop request during the shutdown is still answered
                import ray
                with STOP.waiting_phase():
                    ray.shutdown()
            keep_log(ray_log, exp)
    return results, exp, stats


def keep_log(ray_log: RayLog, exp: str) -> None:
    """The driver's log into the experiment whatever the outcome (where log_location says it is), once
    the experiment exists: moved there on local storage, uploaded to a URI."""
    if not storage.is_uri(exp):
        if Path(exp).is_dir():
            ray_log.move_to(Path(exp) / LOG_FILE)
        ray_log.close()
        return
    ray_log.close()
    with contextlib.suppress(OSError):
        if ray_log.path.is_file() and storage.exists(storage.join(exp, STUDY_FILE)):
            storage.write_bytes(storage.join(exp, LOG_FILE), ray_log.path.read_bytes())


def log_location(exp: str) -> str:
    """Where the driver's log is to be read: in the experiment, or its local copy for a URI (uploaded
    when the driver ends)."""
    if storage.is_uri(exp):
        return str(storage.mirror_dir(exp, "logs") / LOG_FILE)
    return storage.join(exp, LOG_FILE)


def fit(tuner):
    """tuner.fit(); a failed restore comes out as tune.checkpoints.RestoreFailed, whatever Tune wrapped
    it in."""
    from tune.checkpoints import RestoreFailed
    start = time.perf_counter()
    try:
        results = tuner.fit()
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, RestoreFailed):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None
    logging.getLogger("rsnl.run").info(f"tuning loop: {time.perf_counter() - start:.1f} s (Tune's fit, "
                                       f"without Ray's start, the feature task and shutdown)")
    return results
