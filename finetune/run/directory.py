"""The run directory: one folder per run with fixed file names, so later commands (merge, eval,
export, report) find everything from the directory alone.

    RUN_DIR/
      config.yaml          the resolved config
      run.json             status (running | finished | failed | interrupted), overrides, summary
      metrics.jsonl        one JSON record per logged step / evaluation
      adapter.safetensors  the trained weights (adapter tensors; all weights for method=full)
      adapter.json         method, settings, base model
      tokenizer/           the tokenizer (with its chat template)
      base/                the base weights, only for random-init bases
      checkpoints/         periodic checkpoints
      merged/              the merged model (plain transformers directory)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from finetune.errors import UserError, first_line

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
OUTPUT_FILES = ("adapter.safetensors", "adapter.json")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def default_output_dir(task: str, method: str) -> Path:
    return Path("outputs") / task / method / time.strftime("%Y%m%d-%H%M%S")


def is_run(path: Path) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def read_run(path: Path) -> dict:
    path = Path(path)
    if not is_run(path):
        raise UserError(f"{path}: not a finetune run directory (no {RUN_FILE})")
    try:
        info = json.loads((path / RUN_FILE).read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"{path / RUN_FILE}: not readable JSON ({e}); the run directory is damaged") from None
    if not isinstance(info, dict):
        raise UserError(f"{path / RUN_FILE}: not a run record (a JSON object); the run directory is damaged")
    return info


def read_config(path: Path):
    """The run's resolved ``config.yaml`` as an OmegaConf DictConfig (the one reader of that file)."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"{path}: not a finetune run directory (no {CONFIG_FILE})")
    try:
        return OmegaConf.load(path / CONFIG_FILE)
    except Exception as e:  # YAML errors of several kinds
        raise UserError(f"{path / CONFIG_FILE}: not readable YAML ({first_line(e)}); the run directory is damaged") from None


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        self.observers = []  # callables that also receive every logged record (e.g. TensorBoard)

    # fixed locations
    @property
    def merged(self) -> Path:
        return self.path / "merged"

    @property
    def base(self) -> Path:
        return self.path / "base"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def info(self) -> dict:
        return read_run(self.path)

    def config(self):
        return read_config(self.path)

    def write_config(self, config_yaml: str) -> None:
        write_atomic(self.path / CONFIG_FILE, config_yaml)

    # the trained weights' checksums, recorded in run.json when the run finishes
    def output_files(self) -> list[Path]:
        """What later commands read the trained model from: the adapter and a base the run saved."""
        files = [self.path / name for name in OUTPUT_FILES]
        return [f for f in files if f.is_file()] + sorted(self.base.glob("*.safetensors"))

    def digests(self) -> dict[str, str]:
        from finetune.run.checkpoints import file_digest

        return {str(f.relative_to(self.path)): file_digest(f) for f in self.output_files()}

    def check_files(self) -> None:
        """The trained weights are as the run wrote them: every file whose checksum run.json
        records matches it (runs written before checksums are not checked)."""
        from finetune.run.checkpoints import file_digest

        for name, sha in (self.info().get("files") or {}).items():
            path = self.path / name
            if not path.is_file():
                raise UserError(f"{path}: missing; the run directory is damaged")
            if file_digest(path) != sha:
                raise UserError(f"{path}: does not match the checksum run.json records (changed or damaged since "
                                "the run finished)")

    def update(self, **fields) -> dict:
        info = self.info() if is_run(self.path) else {}
        info.update(fields)
        write_atomic(self.path / RUN_FILE, json.dumps(info, indent=2, default=str) + "\n")
        return info

    def log(self, record: dict) -> None:
        with open(self.path / METRICS_FILE, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        for observer in self.observers:
            observer(record)

    def claim_mode(self, overwrite: bool) -> str:
        """How a new run may take this directory: ``new`` (nothing there, or an empty folder) or
        ``overwrite`` (a run, with ``overwrite``). Refuses a file, a finished or unfinished run
        without ``overwrite``, and a folder with other content. Reads only."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise UserError(f"output_dir={p}: exists and is not a directory")
        if is_run(p):
            if overwrite:
                return "overwrite"
            status = self.info().get("status")
            if status == "finished":
                raise UserError(f"output_dir={p} already holds a finished run; pass trainer.overwrite=true to "
                                "replace it, or choose another output_dir")
            raise UserError(f"output_dir={p} already holds an unfinished run ({status}); continue it with "
                            "trainer.resume=auto, start over with trainer.overwrite=true, or choose another "
                            "output_dir")
        if p.is_dir() and any(p.iterdir()):
            raise UserError(f"output_dir={p} is not empty and not a finetune run; choose another output_dir")
        return "new"

    def create(self, config_yaml: str, overrides: list[str], overwrite: bool, **info) -> None:
        """Claim the directory for a new run (the rules of :meth:`claim_mode`)."""
        if self.claim_mode(overwrite) == "overwrite":
            self._clear()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.write_config(config_yaml)
        except OSError as e:  # a read-only or full disk, a file in the way
            raise UserError(f"output_dir={self.path}: cannot write there ({e.strerror or e}); choose another "
                            "output_dir") from None
        self.update(status="running", overrides=list(overrides), created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                    **info)

    def _clear(self) -> None:
        import shutil

        for child in self.path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
