"""One typed, frozen config tree for a run (`schema`), read from a mixture YAML and `key.sub=value` overrides
(`load`). Any unknown key, wrong type or bad value raises `ConfigError` naming the file (or the override), the key
and a fix."""

from sparknet.config.load import (
    config_from_cli,
    config_from_dict,
    config_help,
    field_docs,
    load_config,
    mixture_cli,
    parse_tokens,
    read_yaml,
    to_dict,
)
from sparknet.config.schema import (
    DEFAULT_PROMPTS,
    MODEL_PRESETS,
    ConfigError,
    EvalConfig,
    MixtureConfig,
    ModelConfig,
    PrepareConfig,
    RunConfig,
    SourceConfig,
    StageConfig,
    TokenizerConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "DEFAULT_PROMPTS", "MODEL_PRESETS", "ConfigError", "EvalConfig", "MixtureConfig", "ModelConfig", "PrepareConfig",
    "RunConfig", "SourceConfig", "StageConfig", "TokenizerConfig", "TrackingConfig", "TrainConfig",
    "config_from_cli", "config_from_dict", "config_help", "field_docs", "load_config", "mixture_cli",
    "parse_tokens", "read_yaml", "to_dict",
]
