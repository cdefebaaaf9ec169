"""What both engine adapters share: one settings vocabulary for the transport agent (typed
coercion, deprecated aliases, keys from an environment variable or a file, never a command
line), agent construction, and the compatibility dict. Nothing here imports an engine."""
from .agent_factory import make_agent
from .coerce import ConfigError, coerce_mapping
from .compat import KvCompat
from .settings import AgentSettings

__all__ = ["AgentSettings", "ConfigError", "KvCompat", "coerce_mapping", "make_agent"]
