"""Trackers: which ones a config asks for, and that `logger=none` starts Accelerate silently."""

import warnings

import pytest
from omegaconf import OmegaConf

from finetune.errors import UserError
from finetune.training.tracking import TENSORBOARD_DIR, flat_hparams, log_with


def test_logger_none_gives_accelerate_no_trackers_and_no_warning(tmp_path):
    from accelerate import Accelerator

    trackers = log_with(OmegaConf.create({"logger": "none"}), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accelerator = Accelerator(cpu=True, log_with=trackers)
    assert accelerator.log_with == []


def test_default_logger_is_tensorboard_in_the_run_directory(tmp_path):
    (tracker,) = log_with(OmegaConf.create({}), tmp_path)
    assert tracker.name == "tensorboard"
    tracker.start()
    assert tracker.logging_dir == str(tmp_path / TENSORBOARD_DIR)
    tracker.finish()


def test_unknown_logger_is_one_line_error():
    from finetune.config.compose import compose

    with pytest.raises(UserError, match="logger=mlflow: allowed: tensorboard, wandb, none"):
        compose(["model=tiny", "logger=mlflow"])


def test_hparams_are_flat_scalars():
    cfg = OmegaConf.create({"method": {"rank": 8, "targets": ["q", "v"], "type": None}, "seed": 1})
    assert flat_hparams(cfg) == {"method.rank": 8, "method.targets": "['q', 'v']", "method.type": "None",
                                 "seed": 1}
