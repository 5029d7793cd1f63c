"""Run or resume a study on Ray Tune: the driver side of launch.py.

Order matters: one driver per experiment (a lock that dies with its holder); everything that can be
checked without a cluster is checked before Ray starts; the image features of each (dataset, backbone)
are computed by one Ray task and shared through the object store; the study file is written; then Tune
runs the trials, and nothing finished is ever run twice on resume. Ray's and Tune's logs go to
rsnl_driver.log in the experiment; the console gets rsnl's lines and one progress line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path

from rsnl import storage
from rsnl.errors import ConfigError
from rsnl.files import locked, probe_writable
from rsnl.inputs import preflight, prepare_weights
from rsnl.study import STUDY_FILE, StudyConfig, missing_study, trial_folder_name, write_stored
from tune.resources import RayLog, check_cluster_gpus, check_local_gpus, init_ray, sigterm_as_sigint
from tune.trainable import bank_key, compute_bank, train_trial

LOG_FILE = "rsnl_driver.log"


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


def build_tuner(study: StudyConfig, banks: dict, exp: str, resume: bool, progress=None):
    from ray import tune
    from tune.checkpoints import CheckpointPruner, RestoreGuard, follow, following_scheduler
    from tune.record import OptunaRecorder
    from tune.study import param_space

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no status tables, no banners
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # OptunaSearch's "A new study created" line
    trainable = tune.with_resources(tune.with_parameters(train_trial, study=study, banks=banks),
                                    {"cpu": study.cpu, "gpu": study.gpu})
    # Tune matches saved callback states to callbacks by position: the stateful ones come first, always
    # in this order. On resume they are made afresh for where the experiment is now (it may have moved)
    # and replace the copies pickled with the experiment; Tune then gives them their saved state.
    callbacks = [RestoreGuard(resume), CheckpointPruner(exp), OptunaRecorder(exp, study)]
    callbacks += [progress] if progress is not None else []
    if resume:
        tuner = tune.Tuner.restore(exp, trainable=trainable, resume_unfinished=True, resume_errored=True)
        internal = tuner._local_tuner  # no public way to replace them
        internal.get_run_config().callbacks = callbacks
        follow(internal._tune_config.scheduler, study.storage_path())
        return tuner

    search_alg = None
    if study.kind == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        search_alg = OptunaSearch(seed=study.search_seed)
        if study.max_concurrent:
            from ray.tune.search import ConcurrencyLimiter
            search_alg = ConcurrencyLimiter(search_alg, max_concurrent=study.max_concurrent)
    epochs = study.trial_configs(study.corner_overrides()[0])[0][1].epochs
    scheduler = following_scheduler(study.asha, epochs, study.storage_path())

    def name(trial) -> str:
        return trial_folder_name(trial.trial_id, trial.config, study)

    return tune.Tuner(
        trainable,
        param_space=param_space(study),
        tune_config=tune.TuneConfig(
            metric=study.metric, mode=study.mode, search_alg=search_alg, scheduler=scheduler,
            num_samples=study.num_samples if study.kind != "grid" else 1,
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
    """Run (or resume) a study to the end; returns (ResultGrid, experiment path, feature stats).

    On resume, `study` is the stored one (rsnl.study.read_stored). `progress` is a Tune callback that
    shows the study's progress (tune.progress.Progress), or None; `announce()` is called once every
    check that needs no Ray has passed.
    """
    exp = study.experiment_path()
    with driver_lock(exp):
        check_storage(study, resume)
        preflight_study(study)
        if address is None:
            check_local_gpus(study.gpu)
        if announce is not None:
            announce()
        prepare_study_weights(study)
        ray_log = RayLog(storage.mirror_dir(exp, "logs") / LOG_FILE)
        try:
            init_ray(address, configure_logging=False)
            ray_log.attach()
            sigterm_as_sigint()
            if address is not None:
                check_cluster_gpus(study.gpu)
            banks, stats = compute_banks(study, log)
            write_stored(study)  # on resume too: its storage is where the study is now (it may have moved)
            if not storage.is_uri(exp):
                ray_log.move_to(Path(exp) / LOG_FILE)
            if resume and not tune_state_saved(exp, study):
                log("[rsnl] the interrupted run had saved no Tune state yet; its trials start from the beginning")
                resume = False
            tuner = build_tuner(study, banks, exp, resume, progress)
            results = fit(tuner, exp)
        finally:
            ray_log.close()
            if storage.is_uri(exp) and ray_log.path.is_file():
                with contextlib.suppress(OSError):
                    storage.write_bytes(storage.join(exp, LOG_FILE), ray_log.path.read_bytes())
        from tune.checkpoints import prune as prune_checkpoints
        prune_checkpoints(exp)  # the final state is in the storage now: two checkpoints per trial stay
    return results, exp, stats


def tune_state_saved(exp: str, study: StudyConfig) -> bool:
    """Whether Tune saved any run state to resume from. A driver killed within its first second may
    not have: then no trial can have finished (the record says so), and the folders the killed run
    began are removed so that the new start does not sit beside them."""
    import pyarrow.fs
    from ray import tune

    from tune.record import tally
    if tune.Tuner.can_restore(exp):
        return True
    recorded = tally(exp, study)
    if recorded.finished or recorded.failed:
        raise ConfigError(f"--resume: {exp} has finished trials but no Tune run state to continue from; "
                          f"start the study again under another --name")
    fs, path = storage.filesystem(exp)
    for info in fs.get_file_info(pyarrow.fs.FileSelector(path)):
        if info.type == pyarrow.fs.FileType.Directory:
            fs.delete_dir(info.path)
    return False


def fit(tuner, exp: str):
    """tuner.fit(), with a failed restore as one line (Tune would otherwise start every trial again)."""
    from tune.checkpoints import RestoreFailed
    start = time.perf_counter()
    try:
        results = tuner.fit()
        logging.getLogger("rsnl.run").info(f"tuning loop: {time.perf_counter() - start:.1f} s (Tune's fit, "
                                           f"without Ray's start, the feature task and shutdown)")
        return results
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, RestoreFailed):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise ConfigError(f"--resume: Tune could not restore the run state stored at {exp} (details in {LOG_FILE}); "
                          f"nothing was run again; the finished trials and their files are kept") from None
