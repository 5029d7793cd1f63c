"""Resume that survives a kill at any moment: checkpoint pruning, a guard against a failed restore, and
schedulers that follow a moved experiment. (Which of Tune's saves a resume uses is tune.resume's call.)

Tune's own `CheckpointConfig(num_to_keep=k)` deletes a trial's older checkpoint as soon as a newer one
is registered, while the experiment state that `--resume` reads reaches the storage later, copied in
the background. A driver killed in between leaves that state pointing at a deleted checkpoint, and
the trial cannot be resumed ("Could not recover from checkpoint as it does not exist on storage").

So Tune keeps every checkpoint, and this callback deletes only what the experiment state *in the
storage* can no longer ask for: for each trial, the checkpoints older than the one before the latest
checkpoint that state records. That state only moves forward, so whatever it names (and everything
newer) is still there when a resume reads it. Any doubt (no state yet, a file mid-copy, an unknown
layout) deletes nothing. Pruning runs at most every PRUNE_EVERY_S seconds and once at the end.
"""

from __future__ import annotations

import json
import re
import time

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from rsnl import storage

PRUNE_EVERY_S = 30.0
_CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")


def durable_checkpoints(fs, exp_path: str) -> dict[str, int]:
    """{trial folder: index of its latest checkpoint} as recorded by the newest experiment state in the
    storage ({} if there is none or it cannot be read)."""
    import pyarrow.fs
    infos = fs.get_file_info(pyarrow.fs.FileSelector(exp_path, allow_not_found=True))
    states = sorted(i.path for i in infos if i.base_name.startswith("experiment_state-") and i.base_name.endswith(".json"))
    if not states:
        return {}
    try:
        with fs.open_input_stream(states[-1]) as f:
            data = json.loads(f.read())
        out = {}
        for trial_json, meta_json in (entry[:2] for entry in data["trial_data"]):
            folder = json.loads(trial_json)["relative_logdir"]
            name = (json.loads(meta_json).get("last_result") or {}).get("checkpoint_dir_name") or ""
            m = _CHECKPOINT.match(name)
            if m:
                out[folder] = int(m.group(1))
        return out
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}


def prune(exp_uri: str) -> int:
    """Delete the checkpoints no resume can need; returns how many were deleted."""
    import pyarrow.fs
    try:
        fs, exp_path = storage.filesystem(exp_uri)
        latest = durable_checkpoints(fs, exp_path)
        deleted = 0
        for folder, k in latest.items():
            infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{exp_path}/{folder}", allow_not_found=True))
            for info in infos:
                m = _CHECKPOINT.match(info.base_name)
                # keep the recorded one and the one before it (margin), and everything newer
                if info.type == pyarrow.fs.FileType.Directory and m and int(m.group(1)) < k - 1:
                    fs.delete_dir(info.path)
                    deleted += 1
        return deleted
    except OSError:
        return 0  # storage unreachable now: the next round, or the end of the study, tries again


class CheckpointPruner(tune.Callback):
    """Keeps a study's checkpoints bounded without ever deleting the one a resume would read."""

    def __init__(self, exp_uri: str):
        self.exp_uri = exp_uri
        self._last = time.monotonic()

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if time.monotonic() - self._last >= PRUNE_EVERY_S:
            self._last = time.monotonic()
            prune(self.exp_uri)


class RestoreFailed(RuntimeError):
    """Tune could not read the stored run state on --resume (it would start every trial again)."""


class RestoreGuard(tune.Callback):
    """Stops a resume whose run state Tune could not restore (the driver then rebuilds it, tune.run).

    Tune answers a failed restore by logging it and starting the experiment again from zero in the same
    folder, which would rerun finished trials. Tune restores callback states only when it read the run
    state; this callback has one, so on a resume its `setup` knows whether the restore happened. Its
    state also names the loop step of the save it belongs to, so that a resume can tell the callbacks'
    file from another save than the experiment state's (tune.resume.whole_save)."""

    def __init__(self, resume: bool = False):
        self.resume, self.restored, self.step = resume, False, None

    def get_state(self) -> dict:
        return {"saved": True, "step": self.step}

    def set_state(self, state: dict) -> None:
        self.restored = bool(state.get("saved"))

    def setup(self, **info):
        if self.resume and not self.restored:
            raise RestoreFailed("Tune could not restore the stored run state")

    # Tune saves during a step (after its start) and once after the loop (after the last step's end).
    def on_step_begin(self, iteration, trials, **info):
        self.step = iteration

    def on_step_end(self, iteration, trials, **info):
        self.step = iteration


class KeepResultsOnRetry(tune.Callback):
    """A retried trial keeps every epoch in its result.json.

    Tune writes result.json on the driver and copies it to the storage with the experiment state, in the
    background. When a trial fails and is retried, Tune first replaces the driver's copy with the one in
    the storage (Ray 2.60), which may lag a few epochs: those lines would be lost for good, while the
    trial resumes after them from its checkpoint. So the driver's copy goes to the storage first."""

    def on_trial_recover(self, iteration, trials, trial, **info):
        import pyarrow.fs
        from pathlib import Path
        local = Path(trial.local_path or "", "result.json")
        if not local.is_file():
            return
        try:
            pyarrow.fs.copy_files(str(local), f"{trial.storage.trial_fs_path}/result.json",
                                  destination_filesystem=trial.storage.storage_filesystem)
        except OSError:
            pass  # storage unreachable: Tune's own copy is all there is


class FollowStorage:
    """A mixin for Tune schedulers, which see every trial as it is added: the trial's storage is set to
    where the experiment is now. Tune restores its searcher with the experiment spec as saved, so after
    the folder moved, trials the searcher creates on resume would write to the old place and fail (Ray
    2.60). `storage` is (pyarrow filesystem, path of the storage root); None leaves trials alone."""

    storage = None

    def on_trial_add(self, tune_controller, trial):
        if self.storage is not None and trial.storage.storage_fs_path != self.storage[1]:
            import copy
            moved = copy.copy(trial.storage)
            moved.storage_filesystem, moved.storage_fs_path = self.storage
            trial.set_storage(moved)
        super().on_trial_add(tune_controller, trial)


class FollowingFIFO(FollowStorage, FIFOScheduler):
    pass


class FollowingASHA(FollowStorage, ASHAScheduler):
    pass


def following_scheduler(asha: dict | None, epochs: int, storage_root: str):
    """FIFO, or ASHA over epochs, keeping new trials in the experiment's storage at `storage_root`."""
    if asha is None:
        scheduler = FollowingFIFO()
    else:
        scheduler = FollowingASHA(time_attr="training_iteration", max_t=epochs,
                                  grace_period=asha.get("grace_period", 1),
                                  reduction_factor=asha.get("reduction_factor", 2))
    follow(scheduler, storage_root)
    return scheduler


def follow(scheduler, storage_root: str) -> None:
    """Point a (restored) FollowStorage scheduler at the storage as it is now."""
    scheduler.storage = storage.filesystem(storage_root)
