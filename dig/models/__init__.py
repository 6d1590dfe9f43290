"""DiG, U-DiG and the DiT baseline. `create_model(name, **overrides)`, `list_models()`."""
from .dig import DiG
from .dit import DiT
from .registry import allowed_overrides, create_model, list_models, without_retired

__all__ = ["DiG", "DiT", "create_model", "list_models", "allowed_overrides", "without_retired"]
