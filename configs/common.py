"""Helpers shared by config files: parsing the `:key=value,...` argument of `--config=file.py:arg`."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """`defaults` overridden by "key=value,key=value" in `arg`; each value takes its default's type.

    Example: `parse_arg("cache=2048,num_tokens=8192", cache=1024, num_tokens=4096)`.
    """
    result = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, equals, value = item.partition("=")
        if not equals or key not in defaults:
            raise ValueError(f"config argument {item!r} is not key=value with key in {sorted(defaults)}")
        default = defaults[key]
        result[key] = value.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(value)
    return result
