"""The few names that differ across the transformers 5.x releases this package supports.

transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`;
5.17 still uses `past_key_values`. Everything else here is read off the installed version once.
"""

from __future__ import annotations

from transformers.modeling_outputs import CausalLMOutputWithPast

# The keyword `generate()` uses for the cache, and the field holding it in model outputs.
CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def pop_cache_kwarg(kwargs: dict, *explicit):
    """Return the cache given under either name (explicit arguments first) and drop both names from `kwargs`."""
    found = [c for c in explicit if c is not None]
    for name in ("cache", "past_key_values"):
        value = kwargs.pop(name, None)
        if value is not None:
            found.append(value)
    return found[0] if found else None
