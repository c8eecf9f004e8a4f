"""Where users already are: torch's ``scaled_dot_product_attention`` routed to flash_module
(:mod:`.sdpa`: the router, and the provider hook of torch's own flash backend) and a
transformers attention backend (:mod:`.transformers`, imported on demand: transformers is an
optional dependency)."""

from .sdpa import (
    disable_sdpa_override,
    enable_sdpa_override,
    register_torch_flash_impl,
    sdpa_override,
    sdpa_override_enabled,
)

__all__ = ["disable_sdpa_override", "enable_sdpa_override", "register_torch_flash_impl", "sdpa_override",
           "sdpa_override_enabled"]
