"""The config schemas: one dataclass per config group option, registered in Hydra's ConfigStore.

Every dataclass mirrors the arguments of the code it configures: a method's fields (less ``name``)
are the keyword arguments of ``finetune.adapters.<name>.attach``; a task's fields configure
``finetune.tasks.<name>``; the launcher's fields are those of Accelerate's launcher. Only the
standard library is imported here (Hydra when registering).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Optional

# The seven projections of a LLaMA-style decoder layer: every method's default targets
# ("all linear" in the papers, methods.md §0.5; never lm_head).
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

GROUPS = ("model", "method", "task", "launcher")
LAUNCHERS = ("none", "ddp", "fsdp", "deepspeed")
LOGGERS = ("tensorboard", "wandb", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")

def _targets():
    return list(ALL_LINEAR)


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------


class Init(str, Enum):
    pretrained = "pretrained"
    random = "random"


@dataclass
class ModelConfig:
    """The base model. ``path``: local HF directory, hub id, or ``pkg:NAME`` (a folder inside an
    installed Python package); ``init=random`` builds the architecture from ``arch`` instead."""

    name: str = "custom"
    path: Optional[str] = None
    gguf_file: Optional[str] = None
    tokenizer: Optional[str] = None  # defaults to path; "bytes" = the built-in byte tokenizer
    init: Init = Init.pretrained
    arch: Dict[str, Any] = field(default_factory=dict)  # config values (random init)
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16
    quantize: Optional[str] = None  # None | 4bit | 8bit (bitsandbytes)
    double_quant: bool = True  # 4-bit: QLoRA double quantization
    trust_remote_code: bool = False
    revision: Optional[str] = None
    attn_implementation: Optional[str] = "sdpa"


@dataclass
class FullConfig:
    name: str = "full"
    lr: Optional[float] = None  # null: FULL_LR_RATIO × trainer.lr


@dataclass
class LoraConfig:
    name: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0
    init: str = "kaiming"  # kaiming | gaussian
    targets: Any = field(default_factory=_targets)  # list of names, a regex string, or "all-linear"
    relora_every: int = 0  # ReLoRA: merge B·A into the base, re-init A, B = 0 every N optimizer steps (0: off)
    relora_warmup: int = 50  # LR re-warmup steps after each ReLoRA merge
    relora_reset_optimizer: bool = True  # drop the optimizer state of A and B at each merge


@dataclass
class MoraConfig:
    """MoRA: one square r̂×r̂ matrix per layer, r̂ = int(sqrt((k+d)·rank) + 0.5)."""

    name: str = "mora"
    rank: int = 8  # the LoRA rank whose parameter budget MoRA matches
    type: str = "auto"  # 1 (sharing) | 6 (RoPE) | auto | 2, 3, 4 (ReMoRA internals)
    dropout: float = 0.0
    targets: Any = field(default_factory=_targets)
    remora_every: int = 0  # ReMoRA: merge + reset + next type every N optimizer steps (0: off)
    remora_cycle: int = 4  # 4: types 1→2→3→4→1…, 2: types 1↔2
    remora_warmup: int = 50  # LR re-warmup steps after each ReMoRA merge
    remora_reset_optimizer: bool = True
    # Per-layer types {module name: type}: written into saved adapters / checkpoints (ReMoRA changes
    # them), so an adapter re-attaches with each layer's type. None: every layer uses `type`.
    layer_types: Optional[Dict[str, int]] = None


@dataclass
class VBLoraConfig:
    """VB-LoRA: every A and B composed from one model-wide vector bank by top-k admixture."""

    name: str = "vblora"
    rank: int = 8  # the paper's is 4 (docs/benchmarks.md, "VB-LoRA's defaults, over seeds")
    num_vectors: int = 256  # h: vectors in the bank
    vector_length: int = 64  # b: must divide every adapted layer's in and out features
    topk: int = 2
    dropout: float = 0.0
    init_logits_std: float = 0.01  # the paper's value (peft's default is 0.1)
    init_bank_bound: float = 0.02
    lr_bank: Optional[float] = None  # null: BANK_LR_RATIO × trainer.lr (the paper: 1e-3)
    lr_logits: Optional[float] = None  # null: LOGITS_LR_RATIO × trainer.lr (the paper: 1e-2)
    save_only_topk: bool = False  # store top-k indices and weights instead of full logits
    targets: Any = field(default_factory=_targets)


@dataclass
class MemorizeConfig:
    """UUID key → value memorization (the MoRA paper's task)."""

    name: str = "memorize"
    num_pairs: int = 64
    max_length: int = 128
    seed: int = 0  # data seed: the pairs depend on it only
    eval_limit: Optional[int] = None  # evaluate on the first N pairs (None: all)
    eval_batch_size: int = 32
    max_new_tokens: int = 48


class Overflow(str, Enum):
    """What happens to an example longer than ``task.max_length``."""

    truncate = "truncate"  # keep its first max_length tokens (the count is logged)
    drop = "drop"  # leave it out (the count is logged)
    error = "error"  # stop with a message naming the example


@dataclass
class DataSource:
    """Where a task's records come from (finetune.data.sources): a local file or folder (json, jsonl,
    parquet, csv, txt, md) or a Hugging Face Hub dataset id (network needed once; cached)."""

    path: Optional[str] = None  # null: the task's default source
    name: Optional[str] = None  # hub dataset configuration (e.g. main)
    split: str = "train"  # hub split
    revision: Optional[str] = None  # hub revision (a commit pins the data)
    limit: Optional[int] = None  # the first N records only


@dataclass
class SequenceTaskConfig:
    """Settings shared by the tasks that train on token sequences read from a data source."""

    name: str = ""
    data: DataSource = field(default_factory=DataSource)
    max_length: int = 512  # tokens per example (per packed row with packing; per block for cpt)
    on_overflow: Overflow = Overflow.truncate
    packing: bool = False  # several examples per row; they never attend to each other
    num_proc: Optional[int] = None  # processes for loading and tokenizing (big corpora)
    eval_path: Optional[str] = None  # held-out data: a local file or hub id (null: eval_holdout)
    eval_split: str = "test"  # hub split of eval_path
    eval_holdout: int = 200  # without eval_path: the last N records (cpt: blocks) are held out
    eval_limit: Optional[int] = None  # evaluate on the first N held-out examples (null: all)
    eval_batch_size: int = 8


class MathSource(str, Enum):
    gsm8k = "gsm8k"  # records {question, answer}; answers end with "#### <number>"
    metamath = "metamath"  # records {query, response}; responses end with "The answer is: <answer>"


@dataclass
class Gsm8kConfig(SequenceTaskConfig):
    """GSM8K math word problems (experiments.md §6): Alpaca layout, loss on the answer + EOS;
    metric: exact-match accuracy of the final number under greedy decoding."""

    name: str = "gsm8k"
    source: MathSource = MathSource.gsm8k  # the training data; null data.path: its hub dataset
    eval_holdout: int = 500
    eval_batch_size: int = 16
    max_new_tokens: int = 512


class ChatFormat(str, Enum):
    auto = "auto"  # the tokenizer's chat template if it has one, else plain
    tokenizer = "tokenizer"  # the tokenizer's chat template (an error if it has none)
    plain = "plain"  # Alpaca layout for Alpaca records, <|role|> tags for chat records


@dataclass
class InstructConfig(SequenceTaskConfig):
    """Instruction tuning on Alpaca records (instruction/input/output) or chat records
    (messages); loss on assistant tokens only; metric: held-out loss and perplexity."""

    name: str = "instruct"
    template: ChatFormat = ChatFormat.auto


@dataclass
class CptConfig(SequenceTaskConfig):
    """Continual pretraining on raw text: documents + EOS, concatenated, cut into max_length
    blocks; metric: held-out perplexity. Null data.path: the Python docs (pydoc_data.topics)."""

    name: str = "cpt"
    text_field: str = "text"  # the text column of json/jsonl/parquet/csv records and hub datasets
    eval_holdout: int = 32
    # Base modules trained in full next to the adapter (names or a regex, as method.targets);
    # they are saved with the run in RUN_DIR/base.
    train_modules: Any = field(default_factory=list)


def _pretrain_modules():
    return ["embed_tokens", "norm", "input_layernorm", "post_attention_layernorm", "lm_head"]


@dataclass
class PretrainConfig(CptConfig):
    """Pretraining a random-init model on a cpt-style corpus with an adapter method (ReMoRA with
    method=mora method.remora_every=N, ReLoRA with method=lora method.relora_every=N); embeddings,
    norms and lm_head train in full (MoRA paper, experiments.md §2.5)."""

    name: str = "pretrain"
    train_modules: Any = field(default_factory=_pretrain_modules)


class Schedule(str, Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


@dataclass
class TrainerConfig:
    max_steps: int = 100
    lr: float = 3e-4
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: Schedule = Schedule.linear
    max_grad_norm: float = 1.0  # 0 disables clipping
    save_every: int = 0  # 0: no intermediate checkpoints
    eval_every: int = 0  # 0: evaluate at the end only
    log_every: int = 1
    seed: int = 42
    merge: bool = True  # write RUN_DIR/merged at the end
    gradient_checkpointing: bool = False
    # With gradient_checkpointing: recompute every n-th decoder layer only (1: all; 3: a third;
    # n >= the layer count: the first only), the others keep their activations. Less memory per
    # step than none, less time than all.
    checkpoint_every_n_layers: int = 1
    # Cross-entropy over chunks of this many target tokens, so the full (tokens x vocabulary)
    # logits never exist at once (forward and backward; same loss). 0: the plain loss.
    loss_chunk: int = 128
    precision: str = "auto"  # auto (fp32 on CPU, bf16 autocast on GPU) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    overwrite: bool = False  # replace an existing finished run in output_dir
    keep_checkpoints: int = 2  # the newest N checkpoints in RUN_DIR/checkpoints stay; 0 keeps all
    resume: Optional[str] = None  # null | auto (continue output_dir if it can be) | a checkpoint or run dir


@dataclass
class LauncherConfig:
    """Multi-process runs through Accelerate's launcher (finetune.training.launch). ``num_processes`` is the
    total over all machines (Accelerate's meaning); null: every GPU of every machine."""

    name: str = "none"  # none | ddp | fsdp | deepspeed
    num_processes: Optional[int] = None
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: Optional[str] = None  # needed with num_machines > 1
    main_process_port: Optional[int] = None  # null: a free port (one machine) or 29500
    config_file: Optional[str] = None  # an Accelerate config file for the launch; null: conf/accelerate/launch.yaml


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None
    task: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    output_dir: Optional[str] = None
    logger: str = "tensorboard"  # tensorboard | wandb (TensorBoard + W&B) | none (metrics.jsonl only)


# group -> option name -> schema; YAML files in conf/<group>/ extend these.
SCHEMAS: Dict[str, Dict[str, type]] = {
    "model": {"model": ModelConfig},
    "method": {"full": FullConfig, "lora": LoraConfig, "mora": MoraConfig, "vblora": VBLoraConfig},
    "task": {"memorize": MemorizeConfig, "gsm8k": Gsm8kConfig, "instruct": InstructConfig, "cpt": CptConfig,
             "pretrain": PretrainConfig},
    "launcher": {"launcher": LauncherConfig},
}

SCHEMA_BY_NAME = {cls.__name__: cls for options in SCHEMAS.values() for cls in options.values()}
SCHEMA_BY_NAME.update(Config=Config, TrainerConfig=TrainerConfig, DataSource=DataSource)

_registered = False


def register_schemas() -> None:
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
    _registered = True

