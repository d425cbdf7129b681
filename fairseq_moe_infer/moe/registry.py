"""The one helper behind the layer parts' registries (``--moe-gating``, ``--moe-buffer-policy``,
``--moe-prefetch``): a name -> class table filled by a class decorator, as fairseq's
``register_*`` decorators fill theirs (without fairseq's dataclass options: these parts take
their few arguments from the layer)."""

from typing import Callable, Dict, Type


def class_registrar(table: Dict[str, Type], flag: str) -> Callable[[str], Callable[[Type], Type]]:
    """A decorator factory: ``@register("name")`` sets ``cls.name`` and adds ``cls`` to ``table``.

    Raises (from the decorator):
        ValueError: ``name`` is already registered to another class.
    """

    def register(name: str):
        def wrap(cls):
            if table.get(name, cls) is not cls:
                raise ValueError(f"{flag} {name} is already registered ({table[name].__name__})")
            cls.name = name
            table[name] = cls
            return cls

        return wrap

    register.__doc__ = f"Class decorator adding a class under ``{flag} NAME``."
    return register
