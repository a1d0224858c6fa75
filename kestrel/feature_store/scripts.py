"""Redis Lua scripts live as ``.lua`` files in a ``lua/`` folder beside the module that runs them."""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def load_lua(module_file: str, name: str) -> str:
    """The text of ``lua/{name}.lua`` next to ``module_file`` (pass ``__file__``).

    >>> "redis.call" in load_lua(__file__, "apply_batch")
    True
    """
    return (Path(module_file).resolve().parent / "lua" / f"{name}.lua").read_text()
