"""The W&B mirror across a resume (one run id per job directory) and the Slurm launcher preset."""

from __future__ import annotations

import re
import time

import pytest

from ember.tracking import RUN_ID_FILE, WandbLogger, wandb_run_id
from tests import jobs
from tests.conftest import compose

VALID_ID = re.compile(r"[a-z0-9]{1,64}")


def test_wandb_run_id_stable_per_job_dir_distinct_between_dirs(tmp_path):
    a, b = tmp_path / "main" / "method=ga" / "seed=42", tmp_path / "main" / "method=rmu" / "seed=42"
    first = wandb_run_id(a)
    assert VALID_ID.fullmatch(first)  # W&B: at most 64 characters of [a-z0-9]
    assert wandb_run_id(a) == first  # a relaunch in the same directory
    assert (a / "wandb" / RUN_ID_FILE).read_text().strip() == first
    assert wandb_run_id(b) != first
    # the directory deleted and run again from scratch: a new run, not the old one continued
    (a / "wandb" / RUN_ID_FILE).unlink()
    assert wandb_run_id(a) != first
    # an unreadable id file is replaced rather than passed to W&B
    (b / "wandb" / RUN_ID_FILE).write_text("Not/A valid id\n")
    assert VALID_ID.fullmatch(wandb_run_id(b))


@pytest.mark.timeout(120)
def test_wandb_offline_relaunch_continues_the_same_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose(["logger=wandb", "logger.mode=offline"])
    job = tmp_path / "job"
    job.mkdir()
    ids = []
    for launch, value in enumerate((0.25, 0.5)):  # a first launch, then the resumed one
        logger = WandbLogger(cfg, job, "main/job", ["Harry Potter"])
        assert logger.run is not None
        ids.append(logger.run.id)
        logger.summary(f"Harry_Potter/stage{launch}", {"score": value})
        logger.finish()
    assert ids[0] == ids[1] == wandb_run_id(job)
    # one offline-run-<time>-<id> directory per launch (W&B adds "-1" when two start in the same second)
    runs = sorted((job / "wandb").glob(f"offline-run-*-{ids[0]}*"))
    assert len(runs) == 2 and not set((job / "wandb").glob("offline-run-*")) - set(runs), runs
    for r in runs:
        logs = list(r.glob(f"run-{ids[0]}.wandb"))
        assert len(logs) == 1, list(r.iterdir())
        # W&B's service process writes the log behind finish(): under load (a CI run) the file can still
        # hold only its header when finish returns, so read until the run record is there (30 s at most)
        deadline, rec = time.monotonic() + 30, []
        while not rec and time.monotonic() < deadline:
            rec = [x.run for x in jobs.wandb_records(logs[0]) if x.WhichOneof("record_type") == "run"]
            if not rec:
                time.sleep(0.5)
        assert rec and rec[0].run_id == ids[0] and rec[0].display_name == "main/job", logs[0].stat().st_size


def test_slurm_gpu_launcher_preset_composes():
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import ROOT

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = hcompose(config_name="config", overrides=["hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu"],
                       return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")  # the plugin's submitit_slurm, extended
    assert launcher.timeout_min == 720 and launcher.max_num_timeout == 3  # past the plugin's 60 min, requeued
    assert launcher.gpus_per_node == 1 and launcher.cpus_per_task == 8 and launcher.mem_gb == 64
    assert launcher.partition == "gpu" and launcher.setup is None
    assert launcher.signal_delay_s > 0  # submitit's requeue signal arrives before the time limit
