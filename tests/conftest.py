"""Shared fixtures: the tiny random-init LLaMA model (no download) and its byte tokenizer."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny model's matmuls are too small to gain from threads; one thread per process also keeps
# the multi-process tests from oversubscribing a 2-core machine. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def tiny_config(*overrides):
    """The `tiny` model group's config (conf/model/tiny.yaml), with overrides."""
    from finetune.config.compose import compose

    return compose(["model=tiny", "method=lora", "task=memorize", *overrides])


@pytest.fixture(scope="session")
def tiny_model_cfg():
    return tiny_config().model


@pytest.fixture
def tiny_model(tiny_model_cfg):
    """A fresh tiny LLaMA (2 layers, hidden 128, GQA k/v 128->64, MLP 384), seeded, fp32, eval mode."""
    import torch

    from finetune.models.load import load_model

    torch.manual_seed(0)
    return load_model(tiny_model_cfg).eval()


@pytest.fixture(scope="session")
def byte_tokenizer():
    from finetune.models.tokenizer import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """FINETUNE_CACHE in a temporary directory for the module's tests (tokenized-data cache and
    the `datasets` cache of local files), so tests never read or fill the user's cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("FINETUNE_CACHE", str(tmp_path_factory.mktemp("finetune-cache")))
    yield
    patch.undo()


def ids(batch=2, length=12, seed=1):
    """Seeded random token ids for the tiny model's byte vocabulary."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=g)


def logits_of(model, x):
    import torch

    with torch.no_grad():
        return model(input_ids=x).logits


class OneProcess:
    """The parts of a ``finetune.training.parallel.Parallel`` that ``accumulate_gradients`` uses,
    for a single process."""

    def __init__(self):
        import torch

        self.device = torch.device("cpu")

    num_processes = 1

    def reduce(self, t, reduction):
        return t

    def backward(self, loss):
        loss.backward()

    def forward_context(self):
        import contextlib

        return contextlib.nullcontext()


@pytest.fixture
def sweep(tmp_path):
    """Six finished runs: LoRA and MoRA at ranks 2 and 8, VB-LoRA at two bank sizes, and full."""
    from rundirs import make_run

    root = tmp_path / "sweep"
    make_run(root / "0_lora_r2", "lora", 2, value=0.2, stored=2000)
    make_run(root / "1_lora_r8", "lora", 8, value=0.4, stored=8000)
    make_run(root / "2_mora_r2", "mora", 2, value=0.3, stored=2000)
    make_run(root / "10_mora_r8", "mora", 8, value=0.6, stored=8000)
    make_run(root / "3_vblora_h64", "vblora", 4, num_vectors=64, value=0.25, stored=900)
    make_run(root / "4_vblora_h256", "vblora", 4, num_vectors=256, value=0.35, stored=1500)
    make_run(root / "5_full", "full", value=0.9, stored=100000)
    return root
