"""Run configuration: the frozen dataclass schema (``schema``) and its loading (``loading``).

The names of both are handed on here, so ``from pipo_jax.config import Config, load_config``
works; neither module imports JAX.
"""

from pipo_jax.config.loading import (
    apply_overrides,
    config_from_json,
    from_dict,
    load_config,
    save_config,
    saved_from_dict,
    to_dict,
)
from pipo_jax.config.schema import (
    DEFAULT_MIXED_OPS,
    DRAFTER_STAGES,
    LAYER_TYPES,
    LORA_TARGETS,
    MIXED_OPS,
    PIPO_STAGES,
    STAGES,
    ArConfig,
    Config,
    DataConfig,
    DecodeConfig,
    LoraConfig,
    MeshConfig,
    ModelConfig,
    MtpConfig,
    OpdConfig,
    SftConfig,
    TrainConfig,
    validate_threshold,
)
from pipo_jax.errors import ConfigError

__all__ = [
    "DEFAULT_MIXED_OPS", "DRAFTER_STAGES", "LAYER_TYPES", "LORA_TARGETS", "MIXED_OPS",
    "PIPO_STAGES", "STAGES", "ArConfig", "Config", "ConfigError", "DataConfig", "DecodeConfig",
    "LoraConfig", "MeshConfig", "ModelConfig", "MtpConfig", "OpdConfig", "SftConfig",
    "TrainConfig", "apply_overrides", "config_from_json", "from_dict", "load_config",
    "save_config", "saved_from_dict", "to_dict", "validate_threshold",
]
