"""Where users already are: torch's ``scaled_dot_product_attention`` routed to flash_module
(:mod:`.sdpa`).  A transformers attention backend is planned here too (issue #14)."""

from .sdpa import disable_sdpa_override, enable_sdpa_override, sdpa_override, sdpa_override_enabled

__all__ = ["disable_sdpa_override", "enable_sdpa_override", "sdpa_override", "sdpa_override_enabled"]
