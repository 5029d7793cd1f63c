"""Run or resume a study on Ray Tune: the driver side of launch.py.

Order matters: everything that can be checked without a cluster is checked before Ray starts; the
image features of each (dataset, backbone) are computed by one Ray task and shared through the
object store; then Tune runs the trials, and nothing finished is ever run twice on resume.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import yaml

from rsnl.config import load_yaml
from rsnl.errors import ConfigError
from rsnl.files import atomic_write
from rsnl.inputs import preflight, prepare_weights
from tune.resources import check_cluster_gpus, check_local_gpus, init_ray
from tune.study import StudyConfig, parse_study
from tune.trainable import bank_key, compute_bank, train_trial

STUDY_FILE = "rsnl_study.yaml"


def check_storage(study: StudyConfig, resume: bool) -> Path | None:
    """Local storage must be writable; a new study must not overwrite an old one."""
    if "://" in study.storage:
        return None
    exp = Path(study.experiment_path())
    root = Path(study.storage_path())
    probe = root
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"storage: {root} cannot be created ({probe} is a file); choose another --storage")
    try:  # a real write: permission bits do not tell for root, read-only mounts or quotas
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise ConfigError(f"storage: {root} is not writable ({probe}: {e.strerror}); choose another --storage") from None
    if resume and not (exp / STUDY_FILE).is_file():
        raise ConfigError(f"--resume: no study to resume at {exp} ({STUDY_FILE} missing); check --storage and --name")
    if not resume and (exp / STUDY_FILE).is_file():
        raise ConfigError(f"--name: a study already exists at {exp}; use --resume to continue it or another --name")
    return exp


def stored_study(exp: Path) -> StudyConfig:
    return parse_study(load_yaml(exp / STUDY_FILE))


def study_to_yaml(study: StudyConfig) -> dict:
    search = {"kind": study.kind, "num_samples": study.num_samples, "seed": study.search_seed,
              "params": study.params}
    return {"name": study.name, "description": study.description, "storage": study.storage,
            "trial": study.trial, "search": search, "variants": study.variants, "group": study.group,
            "objective": {"metric": study.metric, "mode": study.mode}, "asha": study.asha,
            "resources": {"cpu": study.cpu, "gpu": study.gpu}, "max_concurrent": study.max_concurrent,
            "reuse_actors": study.reuse_actors, "max_failures": study.max_failures}


def bank_plan(study: StudyConfig) -> dict[tuple, dict]:
    """One config per distinct feature bank, asking for the most augmented views any trial uses."""
    plan: dict[tuple, dict] = {}
    for cfg in study.validate_trials():
        key = bank_key(cfg)
        if key not in plan or cfg.aug_views > plan[key]["aug_views"]:
            plan[key] = cfg.to_dict()
    return plan


def preflight_study(study: StudyConfig) -> None:
    """Data layout, backbone and weights names, shots: once per distinct bank, no model built."""
    from rsnl.config import TrialConfig
    for cfg in bank_plan(study).values():
        preflight(TrialConfig.from_dict(cfg))


def prepare_study_weights(study: StudyConfig) -> None:
    """Build rsnl's stand-in VLM here, before Ray, if a trial needs it and it is not cached yet."""
    from rsnl.config import TrialConfig
    for cfg in bank_plan(study).values():
        prepare_weights(TrialConfig.from_dict(cfg))


def _trial_dirname(study: StudyConfig):
    keys = list(study.params)

    def name(trial) -> str:
        cfg = trial.config
        parts = [trial.trial_id]
        if isinstance(cfg.get("variant"), dict):
            parts.append(str(cfg["variant"].get("name")))
        for k in keys:
            v = cfg.get(k)
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
        return "_".join(parts)[:120]
    return name


def build_tuner(study: StudyConfig, banks: dict, exp: str, resume: bool):
    from ray import tune
    from tune.checkpoints import CheckpointPruner
    from tune.optuna_store import OptunaRecorder, storage_url

    trainable = tune.with_resources(tune.with_parameters(train_trial, study=study, banks=banks),
                                    {"cpu": study.cpu, "gpu": study.gpu})
    if resume:
        return tune.Tuner.restore(exp, trainable=trainable, resume_unfinished=True, resume_errored=True)

    search_alg, scheduler = None, None
    if study.kind == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        search_alg = OptunaSearch(seed=study.search_seed)
        if study.max_concurrent:
            from ray.tune.search import ConcurrencyLimiter
            search_alg = ConcurrencyLimiter(search_alg, max_concurrent=study.max_concurrent)
    if study.asha:
        from ray.tune.schedulers import ASHAScheduler
        epochs = study.trial_configs({})[0][1].epochs
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs,
                                  grace_period=study.asha.get("grace_period", 1),
                                  reduction_factor=study.asha.get("reduction_factor", 2))
    callbacks = [CheckpointPruner(exp)]
    if study.kind in ("optuna", "random") and "://" not in study.storage:
        callbacks.append(OptunaRecorder(storage_url(exp), study))
    name = _trial_dirname(study)
    # A compact status table (the default prints every member metric of every result).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    columns = {"epoch": "epoch", "val_acc": "val_acc", "test_acc": "test_acc", "kept_frac": "kept",
               "select_precision": "precision", "select_recall": "recall"}
    params = (["variant/name"] if study.variants else []) + list(study.params)
    reporter = tune.CLIReporter(metric_columns=columns, parameter_columns=params, max_report_frequency=30,
                                sort_by_metric=True)
    return tune.Tuner(
        trainable,
        param_space=study.param_space(),
        tune_config=tune.TuneConfig(
            metric=study.metric, mode=study.mode, search_alg=search_alg, scheduler=scheduler,
            num_samples=study.num_samples if study.kind != "grid" else 1,
            max_concurrent_trials=(study.max_concurrent or None) if study.kind != "optuna" else None,
            reuse_actors=study.reuse_actors, trial_name_creator=name, trial_dirname_creator=name),
        run_config=tune.RunConfig(
            name=study.name, storage_path=study.storage_path(), callbacks=callbacks,
            # Tune keeps every checkpoint; CheckpointPruner deletes only what no resume can need
            checkpoint_config=tune.CheckpointConfig(),
            failure_config=tune.FailureConfig(max_failures=study.max_failures), progress_reporter=reporter,
            # the trials' noise manifests, written to their working folders, reach the experiment folder
            sync_config=tune.SyncConfig(sync_artifacts=True),
            verbose=1),
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


def run_study(study: StudyConfig, address: str | None = None, resume: bool = False, log=print, on_start=None):
    """Run (or resume) a study to the end; returns (ResultGrid, experiment path, feature stats).

    On resume the study stored in the experiment is the one that runs; `on_start(study)` sees it first.
    """
    exp = check_storage(study, resume)
    if resume and exp is not None:
        study = stored_study(exp)
    if on_start is not None:
        on_start(study)
    preflight_study(study)
    if address is None:
        check_local_gpus(study.gpu)
    prepare_study_weights(study)
    init_ray(address)
    if address is not None:
        check_cluster_gpus(study.gpu)
    banks, stats = compute_banks(study, log)
    exp_path = study.experiment_path()
    if exp is not None and not resume:
        exp.mkdir(parents=True, exist_ok=True)
        atomic_write(exp / STUDY_FILE, yaml.safe_dump(study_to_yaml(study), sort_keys=False))
    tuner = build_tuner(study, banks, exp_path, resume)
    results = tuner.fit()
    from tune.checkpoints import prune as prune_checkpoints
    prune_checkpoints(exp_path)  # the final state is in the storage now: two checkpoints per trial stay
    return results, exp_path, stats
