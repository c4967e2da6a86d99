"""The training config: DeepSpeed's JSON keys, validated strictly, resolved into a frozen dataclass tree.

``load_config(dict_or_json_path, world_size)`` checks every key at every level (an unknown one is a
ValueError naming its full path and the nearest known key), every type and range, resolves the batch
triple as DeepSpeed does (``train_batch_size = micro * accumulation * world_size``, or from the
``elasticity`` section: tidal.train.elasticity) and fills in DeepSpeed's documented defaults.
"""

import dataclasses
import difflib
import json
import math
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

from tidal.train import elasticity as _elasticity
from tidal.train.elasticity import ElasticityConfig
from tidal.train.lr_schedules import SCHEDULER_PARAMS, validate_scheduler_params


@dataclass(frozen=True)
class OptimizerConfig:
    """``optimizer``: Adam or AdamW over fp32 master weights.

    ``adam_w_mode`` is DeepSpeed's: True (its default, also for type "Adam") applies ``weight_decay``
    decoupled as AdamW does; False (only with type "Adam") adds it to the gradient (L2), as torch.optim.Adam.
    """
    type: str = "AdamW"  # "Adam" | "AdamW"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    adam_w_mode: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    """``scheduler``: the schedule's name and its parameters with defaults filled in (read-only)."""
    type: str
    params: Mapping = field(default_factory=lambda: types.MappingProxyType({}))


@dataclass(frozen=True)
class FP16Config:
    """``fp16``: ``loss_scale`` 0 means dynamic, starting at ``2 ** initial_scale_power``."""
    enabled: bool = False
    loss_scale: float = 0.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0

    @property
    def dynamic_loss_scale(self) -> bool:
        return self.loss_scale == 0

    @property
    def initial_scale(self) -> float:
        return 2.0**self.initial_scale_power if self.dynamic_loss_scale else self.loss_scale


@dataclass(frozen=True)
class BF16Config:
    enabled: bool = False


@dataclass(frozen=True)
class OffloadConfig:
    """``zero_optimization.offload_optimizer`` / ``offload_param``: ``device`` "cpu" moves the state
    to host memory (pinned when ``pin_memory`` and the model is on a GPU); "none" (the default) keeps
    it on the model's device. DeepSpeed's ``buffer_count``, ``buffer_size``, ``max_in_cpu`` and
    ``fast_init`` are accepted and change nothing; ``ratio`` (partial offload) must be 1."""
    device: str = "none"
    pin_memory: bool = False

    @property
    def enabled(self) -> bool:
        return self.device == "cpu"


@dataclass(frozen=True)
class ZeroConfig:
    """``zero_optimization``. Bucket sizes count elements, as DeepSpeed's do. ``overlap_comm`` left
    unset defaults to True at stage 3 and False below, as in DeepSpeed."""
    stage: int = 0
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_max_live_parameters: int = 1_000_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    offload_optimizer: OffloadConfig = field(default_factory=OffloadConfig)
    offload_param: OffloadConfig = field(default_factory=OffloadConfig)


@dataclass(frozen=True)
class MoEConfig:
    """``moe``: the mixture-of-experts knobs (DeepSpeed's MoE layer arguments, as config keys).
    ``aux_loss_coef`` None takes the model config's ``router_aux_loss_coef``; ``capacity_factor``
    None means no capacity limit (no token is dropped, as in transformers); with a factor, an expert
    takes at most ``max(min_capacity, ceil(tokens * top_k / num_experts * factor))`` routed slots per
    forward, first choices before second ones, and the rest are dropped when ``drop_tokens``.
    ``ep_size``: ranks per expert-parallel group (each holds ``num_experts / ep_size`` experts of
    every MoE layer; ZeRO stages 0-2), 1 for none."""
    aux_loss_coef: float | None = None
    z_loss_coef: float = 0.0
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    min_capacity: int = 4
    drop_tokens: bool = True
    ep_size: int = 1


@dataclass(frozen=True)
class ActivationCheckpointingConfig:
    """``activation_checkpointing``: DeepSpeed's keys (see tidal.checkpointing for what each does)
    plus tidal's ``policy`` for models that checkpoint per layer ("full", "attention", "mlp", or
    null for none; "full" when the section is present). ``enabled`` is False when the section is
    absent."""
    enabled: bool = False
    policy: str | None = None
    partition_activations: bool = False
    cpu_checkpointing: bool = False
    contiguous_memory_optimization: bool = False
    number_checkpoints: int | None = None
    synchronize_checkpoint_boundary: bool = False
    profile: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """A resolved config. ``train_batch_size == train_micro_batch_size_per_gpu *
    gradient_accumulation_steps * world_size`` always holds."""
    train_batch_size: int = 1
    train_micro_batch_size_per_gpu: int = 1
    gradient_accumulation_steps: int = 1
    world_size: int = 1
    gradient_clipping: float = 0.0  # max global grad norm; 0 = off
    optimizer: OptimizerConfig | None = None  # None: the config names none (DeepSpeed: client optimizer)
    scheduler: SchedulerConfig | None = None
    fp16: FP16Config = field(default_factory=FP16Config)
    bf16: BF16Config = field(default_factory=BF16Config)
    zero_optimization: ZeroConfig = field(default_factory=ZeroConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    activation_checkpointing: ActivationCheckpointingConfig = field(default_factory=ActivationCheckpointingConfig)
    elasticity: ElasticityConfig = field(default_factory=ElasticityConfig)
    steps_per_print: int = 10
    wall_clock_breakdown: bool = False

    @property
    def precision(self) -> str:
        """The compute precision: "fp16", "bf16" or "fp32"."""
        return "fp16" if self.fp16.enabled else "bf16" if self.bf16.enabled else "fp32"


_TOP_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
             "gradient_clipping", "optimizer", "scheduler", "fp16", "bf16", "zero_optimization",
             "steps_per_print", "wall_clock_breakdown", "moe", "activation_checkpointing", "elasticity")
_OPTIMIZER_TYPES = {"adam": "Adam", "adamw": "AdamW"}
_OPTIMIZER_PARAMS = ("lr", "betas", "eps", "weight_decay", "adam_w_mode")
_FP16_KEYS = tuple(f.name for f in dataclasses.fields(FP16Config))
_ZERO_KEYS = tuple(f.name for f in dataclasses.fields(ZeroConfig))
_MOE_KEYS = tuple(f.name for f in dataclasses.fields(MoEConfig))
_AC_KEYS = tuple(f.name for f in dataclasses.fields(ActivationCheckpointingConfig) if f.name != "enabled")
_AC_POLICIES = (None, "full", "attention", "mlp")


def _check_keys(section: Mapping, known, prefix: str) -> None:
    for key in section:
        if key not in known:
            path = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(known)}"
            raise ValueError(f"{path} is not a known key{hint}")


def _section(config: Mapping, key: str) -> Mapping:
    value = config.get(key, {})
    if not isinstance(value, Mapping):
        raise ValueError(f"{key}={value!r} must be an object")
    return value


def _bool(path: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{path}={value!r} must be true or false")
    return value


def _int(path: str, value, minimum: int) -> int:
    # JSON configs write bucket sizes as 5e8: an integral float is accepted as the integer.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{path}={value!r} must be an integer")
    if value < minimum:
        raise ValueError(f"{path}={value!r} must be >= {minimum}")
    return value


def _float(path: str, value, minimum: float, exclusive: bool = False, below: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{path}={value!r} must be a finite number")
    if value < minimum or (exclusive and value == minimum):
        raise ValueError(f"{path}={value!r} must be {'>' if exclusive else '>='} {minimum}")
    if below is not None and value >= below:
        raise ValueError(f"{path}={value!r} must be < {below}")
    return float(value)


def _resolve_batch(config: Mapping, world_size: int) -> tuple[int, int, int]:
    """DeepSpeed's rule: any two of the three determine the third; one alone takes accumulation 1."""
    tbs, micro, gas = (config.get(k) for k in _TOP_KEYS[:3])
    tbs = None if tbs is None else _int("train_batch_size", tbs, 1)
    micro = None if micro is None else _int("train_micro_batch_size_per_gpu", micro, 1)
    gas = None if gas is None else _int("gradient_accumulation_steps", gas, 1)
    if tbs is None and micro is None:
        raise ValueError("train_batch_size or train_micro_batch_size_per_gpu must be given")
    if tbs is not None and micro is None:
        gas = 1 if gas is None else gas
        if tbs % (gas * world_size):
            raise ValueError(f"train_batch_size={tbs} is not divisible by gradient_accumulation_steps={gas} "
                             f"* world_size={world_size}")
        micro = tbs // (gas * world_size)
    elif tbs is None:
        gas = 1 if gas is None else gas
        tbs = micro * gas * world_size
    elif gas is None:
        if tbs % (micro * world_size):
            raise ValueError(f"train_batch_size={tbs} is not divisible by train_micro_batch_size_per_gpu={micro} "
                             f"* world_size={world_size}")
        gas = tbs // (micro * world_size)
    if tbs != micro * gas * world_size:
        raise ValueError(f"train_batch_size={tbs} must equal train_micro_batch_size_per_gpu={micro} * "
                         f"gradient_accumulation_steps={gas} * world_size={world_size} (= {micro * gas * world_size})")
    return tbs, micro, gas


def _elastic(config: Mapping) -> ElasticityConfig:
    """The ``elasticity`` section: DeepSpeed's keys, checked; tidal trains without model parallelism."""
    section = _section(config, "elasticity")
    default = ElasticityConfig()

    def integer(key: str, minimum: int) -> int:
        return _int(f"elasticity.{key}", section.get(key, getattr(default, key)), minimum)

    def flag(key: str) -> bool:
        return _bool(f"elasticity.{key}", section.get(key, getattr(default, key)))

    enabled = flag("enabled")
    if enabled:
        for key in ("max_train_batch_size", "micro_batch_sizes"):
            if key not in section:
                raise ValueError(f"elasticity.{key} must be given when elasticity.enabled is true")
    micro = section.get("micro_batch_sizes", list(default.micro_batch_sizes))
    if (not isinstance(micro, (list, tuple)) or not micro
            or not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in micro)):
        raise ValueError(f"elasticity.micro_batch_sizes={micro!r} must be a non-empty list of positive integers")
    elastic = ElasticityConfig(
        enabled=enabled, max_train_batch_size=integer("max_train_batch_size", 1), micro_batch_sizes=tuple(micro),
        min_gpus=integer("min_gpus", 1), max_gpus=integer("max_gpus", 1),
        num_gpus_per_node=integer("num_gpus_per_node", 1), model_parallel_size=integer("model_parallel_size", 1),
        min_time=integer("min_time", 0), prefer_larger_batch=flag("prefer_larger_batch"),
        ignore_non_elastic_batch_info=flag("ignore_non_elastic_batch_info"),
        version=section.get("version", _elasticity.LATEST_VERSION))
    if elastic.max_gpus < elastic.min_gpus:
        raise ValueError(f"elasticity.min_gpus={elastic.min_gpus} must be <= elasticity.max_gpus={elastic.max_gpus}")
    if isinstance(elastic.version, bool) or elastic.version not in (0.1, 0.2):
        raise ValueError(f"elasticity.version={elastic.version!r} must be 0.1 or 0.2")
    if elastic.model_parallel_size > 1:
        raise ValueError(f"elasticity.model_parallel_size={elastic.model_parallel_size}: tidal trains with data "
                         "parallelism (ZeRO) only; use 1")
    if elastic.enabled and max(elastic.micro_batch_sizes) > elastic.max_train_batch_size:
        raise ValueError(f"elasticity.micro_batch_sizes={list(elastic.micro_batch_sizes)} must all be <= "
                         f"elasticity.max_train_batch_size={elastic.max_train_batch_size}")
    return elastic


def _elastic_batch(config: Mapping, elastic: ElasticityConfig, world_size: int) -> tuple[int, int, int]:
    """The batch triple elasticity computes for ``world_size`` (tidal.train.elasticity); as in
    DeepSpeed, batch keys next to it are an error unless ``ignore_non_elastic_batch_info``."""
    given = [k for k in _TOP_KEYS[:3] if k in config]
    if given and not elastic.ignore_non_elastic_batch_info:
        raise ValueError(f"{', '.join(given)} cannot be set with elasticity.enabled: elasticity computes the batch "
                         "for each world size (set elasticity.ignore_non_elastic_batch_info to true to ignore them)")
    batch, _, micro = _elasticity.compute(elastic, world_size)
    return batch, micro, batch // (micro * world_size)


def _optimizer(config: Mapping) -> OptimizerConfig | None:
    if "optimizer" not in config:
        return None
    section = _section(config, "optimizer")
    _check_keys(section, ("type", "params"), "optimizer.")
    name = section.get("type")
    if not isinstance(name, str) or name.lower() not in _OPTIMIZER_TYPES:
        raise ValueError(f"optimizer.type={name!r} is not supported; it must be Adam or AdamW")
    name = _OPTIMIZER_TYPES[name.lower()]
    params = section.get("params", {})
    if not isinstance(params, Mapping):
        raise ValueError(f"optimizer.params={params!r} must be an object")
    _check_keys(params, _OPTIMIZER_PARAMS, "optimizer.params.")
    d = OptimizerConfig()
    betas = params.get("betas", d.betas)
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ValueError(f"optimizer.params.betas={betas!r} must be a pair of numbers")
    betas = tuple(_float("optimizer.params.betas", b, 0.0, below=1.0) for b in betas)
    adam_w_mode = _bool("optimizer.params.adam_w_mode", params.get("adam_w_mode", True))
    return OptimizerConfig(
        type=name,
        lr=_float("optimizer.params.lr", params.get("lr", d.lr), 0.0),
        betas=betas,
        eps=_float("optimizer.params.eps", params.get("eps", d.eps), 0.0, exclusive=True),
        weight_decay=_float("optimizer.params.weight_decay", params.get("weight_decay", d.weight_decay), 0.0),
        adam_w_mode=adam_w_mode or name == "AdamW",  # DeepSpeed: type AdamW forces decoupled decay
    )


def _scheduler(config: Mapping) -> SchedulerConfig | None:
    if "scheduler" not in config:
        return None
    section = _section(config, "scheduler")
    _check_keys(section, ("type", "params"), "scheduler.")
    name = section.get("type")
    if name not in SCHEDULER_PARAMS:
        close = difflib.get_close_matches(str(name), list(SCHEDULER_PARAMS), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ValueError(f"scheduler.type={name!r} must be one of {', '.join(SCHEDULER_PARAMS)}{hint}")
    params = section.get("params", {})
    if not isinstance(params, Mapping):
        raise ValueError(f"scheduler.params={params!r} must be an object")
    _check_keys(params, tuple(SCHEDULER_PARAMS[name]), "scheduler.params.")
    for key, default in SCHEDULER_PARAMS[name].items():
        if default is None and key not in params:
            raise ValueError(f"scheduler.params.{key} is required for {name}")
    try:
        resolved = validate_scheduler_params(name, params)
    except ValueError as e:  # the message starts with the parameter's name
        raise ValueError(f"scheduler.params.{e}") from None
    return SchedulerConfig(type=name, params=types.MappingProxyType(resolved))


def _fp16(config: Mapping) -> FP16Config:
    section = _section(config, "fp16")
    _check_keys(section, _FP16_KEYS, "fp16.")
    d = FP16Config()
    return FP16Config(
        enabled=_bool("fp16.enabled", section.get("enabled", d.enabled)),
        loss_scale=_float("fp16.loss_scale", section.get("loss_scale", d.loss_scale), 0.0),
        initial_scale_power=_int("fp16.initial_scale_power", section.get("initial_scale_power",
                                                                         d.initial_scale_power), 0),
        loss_scale_window=_int("fp16.loss_scale_window", section.get("loss_scale_window", d.loss_scale_window), 1),
        hysteresis=_int("fp16.hysteresis", section.get("hysteresis", d.hysteresis), 1),
        consecutive_hysteresis=_bool("fp16.consecutive_hysteresis",
                                     section.get("consecutive_hysteresis", d.consecutive_hysteresis)),
        min_loss_scale=_float("fp16.min_loss_scale", section.get("min_loss_scale", d.min_loss_scale), 0.0,
                              exclusive=True),
    )


def _zero(config: Mapping) -> ZeroConfig:
    section = _section(config, "zero_optimization")
    _check_keys(section, _ZERO_KEYS, "zero_optimization.")
    d = ZeroConfig()
    stage = section.get("stage", d.stage)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    # a prefetch bucket of 0 turns stage 3's prefetch off, as in DeepSpeed
    sizes = {k: _int(f"zero_optimization.{k}", section.get(k, getattr(d, k)), 0 if k.startswith("stage3_p") else 1)
             for k in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                       "stage3_max_live_parameters")}
    offload_param = _offload(section, "offload_param")
    if offload_param.enabled and stage != 3:
        raise ValueError(f"zero_optimization.offload_param.device='cpu' needs zero_optimization.stage=3, "
                         f"got stage {stage}")
    return ZeroConfig(
        stage=int(stage),
        overlap_comm=_bool("zero_optimization.overlap_comm", section.get("overlap_comm", stage == 3)),
        contiguous_gradients=_bool("zero_optimization.contiguous_gradients",
                                   section.get("contiguous_gradients", d.contiguous_gradients)),
        offload_optimizer=_offload(section, "offload_optimizer"),
        offload_param=offload_param,
        **sizes,
    )


_OFFLOAD_KEYS = ("device", "nvme_path", "pin_memory", "buffer_count", "buffer_size", "max_in_cpu", "fast_init",
                 "ratio")


def _offload(zero: Mapping, key: str) -> OffloadConfig:
    prefix = f"zero_optimization.{key}"
    section = zero.get(key, {})
    if section is None:
        return OffloadConfig()
    if not isinstance(section, Mapping):
        raise ValueError(f"{prefix}={section!r} must be an object")
    _check_keys(section, _OFFLOAD_KEYS, f"{prefix}.")
    device = section.get("device", "none")
    device = "none" if device is None else device
    if device == "nvme":
        raise ValueError(f"{prefix}.device='nvme' is not supported; use 'cpu' or 'none'")
    if device not in ("cpu", "none"):
        raise ValueError(f"{prefix}.device={device!r} must be 'cpu' or 'none'")
    for name in ("buffer_count", "buffer_size", "max_in_cpu"):
        if name in section:
            _int(f"{prefix}.{name}", section[name], 0)
    if "fast_init" in section:
        _bool(f"{prefix}.fast_init", section["fast_init"])
    if "ratio" in section and _float(f"{prefix}.ratio", section["ratio"], 0.0) != 1.0:
        raise ValueError(f"{prefix}.ratio={section['ratio']!r}: partial offload is not supported; use 1")
    return OffloadConfig(device=device, pin_memory=_bool(f"{prefix}.pin_memory", section.get("pin_memory", False)))


def _moe(config: Mapping) -> MoEConfig:
    section = _section(config, "moe")
    _check_keys(section, _MOE_KEYS, "moe.")

    def optional(key):
        value = section.get(key)
        return None if value is None else _float(f"moe.{key}", value, 0.0, exclusive=True)

    aux = section.get("aux_loss_coef")
    ep_size = _int("moe.ep_size", section.get("ep_size", 1), 1)
    return MoEConfig(aux_loss_coef=None if aux is None else _float("moe.aux_loss_coef", aux, 0.0),
                     z_loss_coef=_float("moe.z_loss_coef", section.get("z_loss_coef", 0.0), 0.0),
                     capacity_factor=optional("capacity_factor"), eval_capacity_factor=optional("eval_capacity_factor"),
                     min_capacity=_int("moe.min_capacity", section.get("min_capacity", 4), 0),
                     drop_tokens=_bool("moe.drop_tokens", section.get("drop_tokens", True)), ep_size=ep_size)


def _activation_checkpointing(config: Mapping) -> ActivationCheckpointingConfig:
    if "activation_checkpointing" not in config:
        return ActivationCheckpointingConfig()
    section = _section(config, "activation_checkpointing")
    policy = section.get("policy", "full")
    if policy not in _AC_POLICIES:
        raise ValueError(f"activation_checkpointing.policy={policy!r} must be one of "
                         f"{', '.join(repr(p) for p in _AC_POLICIES)}")
    number = section.get("number_checkpoints")
    flags = {k: _bool(f"activation_checkpointing.{k}", section.get(k, False))
             for k in ("partition_activations", "cpu_checkpointing", "contiguous_memory_optimization",
                       "synchronize_checkpoint_boundary", "profile")}
    return ActivationCheckpointingConfig(
        enabled=True, policy=policy,
        number_checkpoints=None if number is None else _int("activation_checkpointing.number_checkpoints", number, 1),
        **flags)


def load_config(config: Mapping | str | os.PathLike, world_size: int) -> TrainConfig:
    """Validate a DeepSpeed-style config and resolve it for ``world_size`` data-parallel ranks.

    Parameters
    ----------
    config
        The config as a dict, or the path of a JSON file holding it.
    world_size
        The number of data-parallel ranks.

    Raises
    ------
    ValueError
        On an unknown key (named by its full path, with the nearest known key), a wrong type or range
        (named with its value), an inconsistent batch triple, or fp16 and bf16 both enabled.
    """
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        with open(path, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, Mapping):
        raise ValueError(f"the config must be an object (a dict), got {type(config).__name__}")
    world_size = _int("world_size", world_size, 1)
    _check_keys(config, _TOP_KEYS, "")
    # Unknown keys first: a misspelt key is a more useful error than what its absence causes.
    for key, known in (("fp16", _FP16_KEYS), ("bf16", ("enabled",)), ("zero_optimization", _ZERO_KEYS),
                       ("moe", _MOE_KEYS), ("activation_checkpointing", _AC_KEYS),
                       ("elasticity", _elasticity.KEYS)):
        _check_keys(_section(config, key), known, f"{key}.")
    elastic = _elastic(config)
    tbs, micro, gas = _elastic_batch(config, elastic, world_size) if elastic.enabled else \
        _resolve_batch(config, world_size)
    bf16 = _section(config, "bf16")
    _check_keys(bf16, ("enabled",), "bf16.")
    fp16 = _fp16(config)
    bf16 = BF16Config(enabled=_bool("bf16.enabled", bf16.get("enabled", False)))
    if fp16.enabled and bf16.enabled:
        raise ValueError("fp16.enabled and bf16.enabled are both true; enable at most one")
    return TrainConfig(
        train_batch_size=tbs,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=gas,
        world_size=world_size,
        gradient_clipping=_float("gradient_clipping", config.get("gradient_clipping", 0.0), 0.0),
        optimizer=_optimizer(config),
        scheduler=_scheduler(config),
        fp16=fp16,
        bf16=bf16,
        zero_optimization=_zero(config),
        moe=_moe(config),
        activation_checkpointing=_activation_checkpointing(config),
        steps_per_print=_int("steps_per_print", config.get("steps_per_print", 10), 1),
        wall_clock_breakdown=_bool("wall_clock_breakdown", config.get("wall_clock_breakdown", False)),
        elasticity=elastic,
    )
