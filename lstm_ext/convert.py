"""Swap ``torch.nn.LSTM``/``GRU``/``RNN`` and their cells for the fused modules inside a
model, and back."""
from __future__ import annotations

import warnings
from typing import TypeVar

from torch import nn

from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

M = TypeVar("M", bound=nn.Module)

# Constructor arguments read from the module being replaced (device/dtype come
# with the shared Parameters).
_STACK = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
          "bidirectional")
_CONFIG = {
    "LSTM": _STACK + ("proj_size",),
    "GRU": _STACK,
    "RNN": _STACK + ("nonlinearity",),
    "LSTMCell": ("input_size", "hidden_size", "bias"),
    "GRUCell": ("input_size", "hidden_size", "bias"),
    "RNNCell": ("input_size", "hidden_size", "bias", "nonlinearity"),
}
_TO_EXT: dict[type[nn.Module], type[nn.Module]] = {
    nn.LSTM: LSTM,
    nn.GRU: GRU,
    nn.RNN: RNN,
    nn.LSTMCell: LSTMCell,
    nn.GRUCell: GRUCell,
    nn.RNNCell: RNNCell,
}
_TO_TORCH: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in _TO_EXT.items()}


def convert(model: M) -> M:
    """Replace every ``nn.LSTM``, ``nn.GRU``, ``nn.RNN``, ``nn.LSTMCell``, ``nn.GRUCell`` and
    ``nn.RNNCell`` in ``model`` by its :mod:`lstm_ext` twin (:class:`lstm_ext.LSTM`, ...),
    in place. Other modules are left alone.

    The new modules share the old ones' Parameter objects (so device, dtype, values and
    any optimizer referring to them are kept) and their training mode. A module reached
    through several paths is replaced by one shared new module.

    Args:
        model: any module; if it is itself one of the modules above it cannot be
            replaced in place, so use the returned module.

    Returns:
        ``model``, or its replacement when ``model`` itself was converted.

    Raises:
        TypeError: a module is a *subclass* of one of them (it may override
            ``forward``, so swapping it would silently change behaviour).
        ValueError: a module to convert carries hooks, extra parameters, buffers or
            submodules, which the replacement would silently drop.
    """
    return _swap(model, _TO_EXT)


def to_torch(model: M) -> M:
    """The inverse of :func:`convert`: replace :class:`lstm_ext.LSTM`, ``GRU``, ``RNN``,
    ``LSTMCell``, ``GRUCell`` and ``RNNCell`` by their ``torch.nn`` originals, in place,
    sharing Parameters. Same rules and errors."""
    return _swap(model, _TO_TORCH)


def _swap(model: M, mapping: dict[type[nn.Module], type[nn.Module]]) -> M:
    replaced: dict[int, nn.Module] = {}

    def replacement(module: nn.Module, path: str) -> nn.Module:
        if id(module) not in replaced:
            replaced[id(module)] = _rebuild(module, mapping[type(module)], path)
        return replaced[id(module)]

    _check_no_subclass(model, mapping)
    if type(model) in mapping:
        return replacement(model, "model")  # type: ignore[return-value]
    # Snapshot first: the module tree is mutated while replacing. Every slot of every
    # parent, read from _modules: named_children() would skip a module's second slot
    # in the same parent (nn.ModuleList([lstm] * 2)).
    slots = [
        (parent, parent_path, name, child)
        for parent_path, parent in model.named_modules()
        for name, child in parent._modules.items()
        if child is not None
    ]
    for parent, parent_path, name, child in slots:
        if type(child) in mapping:
            path = f"{parent_path}.{name}" if parent_path else name
            setattr(parent, name, replacement(child, path))
    return model


def _check_no_subclass(model: nn.Module, mapping: dict[type[nn.Module], type[nn.Module]]) -> None:
    for path, module in model.named_modules():
        for base in mapping:
            if isinstance(module, base) and type(module) is not base:
                raise TypeError(
                    f"module '{path or 'model'}' is a {type(module).__qualname__}, a subclass of "
                    f"{base.__module__}.{base.__qualname__}; only exact instances are converted, "
                    "since a subclass may change its behaviour. Convert its parts yourself."
                )


def _rebuild(old: nn.Module, new_type: type[nn.Module], path: str) -> nn.Module:
    hooks = sorted(name for name, value in vars(old).items() if "hooks" in name and value)
    if hooks:
        raise ValueError(f"module '{path}' has hooks registered ({', '.join(hooks)}); "
                         "remove them before converting and register them on the result")
    if old._buffers or old._modules:
        raise ValueError(f"module '{path}' has buffers or submodules that "
                         f"{new_type.__name__} would not keep")
    config = {name: getattr(old, name) for name in _CONFIG[new_type.__name__]}
    if "nonlinearity" in config and hasattr(old, "mode"):
        # nn.RNN runs the mode fixed at construction, whatever nonlinearity says now.
        config["nonlinearity"] = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}[old.mode]
    # On "meta" nothing is allocated or drawn from the RNG: every Parameter is replaced.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.LSTM already warned about dropout at creation
        new = new_type(**config, device="meta")
    names = dict(old.named_parameters(recurse=False))
    expected = dict(new.named_parameters(recurse=False))
    if names.keys() != expected.keys():
        raise ValueError(
            f"module '{path}' has parameters {sorted(names)}, but {new_type.__name__} "
            f"with its settings has {sorted(expected)}"
        )
    for name, param in names.items():
        setattr(new, name, param)
    new.train(old.training)
    return new
