"""Dataclass-like classes that cost nothing to define.

``dataclasses`` imports ``inspect`` (with ``ast``, ``dis`` and ``tokenize``)
and compiles ``__init__``, ``__repr__`` and ``__eq__`` for every class; for
vmkit's config classes that was most of ``import vmkit``. ``record`` gives a
class the same behaviour from shared methods that read the class's field
table, and the dataclass protocol (``dataclasses.fields``, ``replace``,
``asdict``, ``is_dataclass``) and ``inspect.signature`` on first use.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    from typing_extensions import dataclass_transform

    _T = TypeVar("_T")
else:

    def dataclass_transform(**_options: object) -> object:
        return lambda function: function


__all__ = ["FrozenInstanceError", "field", "record"]

_MISSING: Any = object()


class FrozenInstanceError(AttributeError):
    """An assignment to a field of a frozen record."""


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], object]) -> None:
        self.make = make


if TYPE_CHECKING:

    def field(*, default_factory: Callable[[], _T]) -> _T: ...

else:

    def field(*, default_factory):
        """A field whose default is ``default_factory()``, made per instance."""
        return _Factory(default_factory)


def _own_annotations(cls: type) -> dict[str, Any]:
    # Not inspect.get_annotations: importing inspect is the cost this module avoids.
    # (With ``from __future__ import annotations`` the values are strings.)
    annotations: dict[str, Any] = cls.__dict__.get("__annotations__", {})  # noqa: RUF063
    return annotations


def _is_classvar(annotation: object) -> bool:
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return text.startswith(("ClassVar", "typing.ClassVar"))


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    fields: tuple[tuple[str, Any], ...] = cls.__record_fields__
    if args:
        if cls.__record_kw_only__ or len(args) > len(fields):
            limit = 1 if cls.__record_kw_only__ else len(fields) + 1
            raise TypeError(
                f"{cls.__name__}.__init__() takes {limit} positional argument"
                f"{'s' if limit > 1 else ''} but {len(args) + 1} were given"
            )
        for (name, _default), value in zip(fields, args, strict=False):
            if name in kwargs:
                raise TypeError(
                    f"{cls.__name__}.__init__() got multiple values for argument {name!r}"
                )
            kwargs[name] = value
    values = {}
    missing = []
    for name, default in fields:
        value = kwargs.pop(name, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                missing.append(name)
                continue
            value = default.make() if type(default) is _Factory else default
        values[name] = value
    if kwargs:
        raise TypeError(
            f"{cls.__name__}.__init__() got an unexpected keyword argument {next(iter(kwargs))!r}"
        )
    if missing:
        kind = "keyword-only " if cls.__record_kw_only__ else ""
        names = " and ".join(", ".join(repr(n) for n in missing).rsplit(", ", 1))
        raise TypeError(
            f"{cls.__name__}.__init__() missing {len(missing)} required {kind}argument"
            f"{'s' if len(missing) > 1 else ''}: {names}"
        )
    self.__dict__.update(values)


def _values(self: Any) -> tuple[Any, ...]:
    return tuple([getattr(self, name) for name, _default in type(self).__record_fields__])


def _repr(self: Any) -> str:
    parts = [f"{name}={getattr(self, name)!r}" for name, _default in type(self).__record_fields__]
    return f"{type(self).__qualname__}({', '.join(parts)})"


def _eq(self: Any, other: object) -> Any:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return bool(_values(self) == _values(other))


def _hash(self: Any) -> int:
    return hash(_values(self))


def _frozen_setattr(self: Any, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


class _DataclassFields:
    """``__dataclass_fields__``, built (with ``dataclasses``) when first read."""

    def __get__(self, instance: object, owner: type) -> dict[str, Any]:
        import dataclasses

        annotations = _own_annotations(owner)
        table: dict[str, Any] = {}
        for name, default in owner.__record_fields__:  # type: ignore[attr-defined]
            if default is _MISSING:
                made = dataclasses.field()
            elif type(default) is _Factory:
                made = dataclasses.field(default_factory=default.make)
            else:
                made = dataclasses.field(default=default)
            made.name = name
            made.type = annotations.get(name, "Any")
            made.kw_only = owner.__record_kw_only__  # type: ignore[attr-defined]
            made._field_type = dataclasses._FIELD  # type: ignore[attr-defined]
            table[name] = made
        type.__setattr__(owner, "__dataclass_fields__", table)
        return table


class _Signature:
    """``__signature__`` (for ``help`` and ``inspect.signature``), built when first read."""

    def __get__(self, instance: object, owner: type) -> Any:
        import inspect

        kind = (
            inspect.Parameter.KEYWORD_ONLY
            if owner.__record_kw_only__  # type: ignore[attr-defined]
            else inspect.Parameter.POSITIONAL_OR_KEYWORD
        )
        annotations = _own_annotations(owner)
        parameters = []
        for name, default in owner.__record_fields__:  # type: ignore[attr-defined]
            shown: object
            if default is _MISSING:
                shown = inspect.Parameter.empty
            elif type(default) is _Factory:
                shown = default.make()
            else:
                shown = default
            annotation = annotations.get(name, inspect.Parameter.empty)
            parameters.append(inspect.Parameter(name, kind, default=shown, annotation=annotation))
        return inspect.Signature(parameters, return_annotation="None")


@dataclass_transform(field_specifiers=(field,))
def record(cls: type[Any] | None = None, /, *, frozen: bool = False, kw_only: bool = False) -> Any:
    """Makes ``cls`` behave as ``@dataclass(frozen=..., kw_only=...)`` would.

    Fields are the class's annotations (``ClassVar`` ones excepted) after
    those of a record base class; defaults are class attributes or
    ``field(default_factory=...)``.
    """

    def build(cls: type[Any]) -> type[Any]:
        inherited: tuple[tuple[str, Any], ...] = getattr(cls, "__record_fields__", ())
        fields = dict(inherited)
        for name, annotation in _own_annotations(cls).items():
            if _is_classvar(annotation):
                continue
            default = cls.__dict__.get(name, _MISSING)
            if isinstance(default, (list, dict, set)):
                raise ValueError(
                    f"mutable default {type(default)} for field {name} is not allowed: "
                    "use default_factory"
                )
            if type(default) is _Factory:
                delattr(cls, name)
            elif default is not _MISSING:
                pass  # stays as the class attribute, as with dataclasses
            fields[name] = default
        if not kw_only:
            seen_default = False
            for name, default in fields.items():
                if default is not _MISSING:
                    seen_default = True
                elif seen_default:
                    raise TypeError(f"non-default argument {name!r} follows default argument")
        attributes: dict[str, object] = {
            "__record_fields__": tuple(fields.items()),
            "__record_kw_only__": kw_only,
            "__init__": _init,
            "__repr__": _repr,
            "__eq__": _eq,
            "__hash__": _hash if frozen else None,
            "__dataclass_fields__": _DataclassFields(),
            "__signature__": _Signature(),
        }
        if frozen:
            attributes["__setattr__"] = _frozen_setattr
            attributes["__delattr__"] = _frozen_delattr
        if not kw_only:
            attributes["__match_args__"] = tuple(fields)
        for name, value in attributes.items():
            setattr(cls, name, value)
        return cls

    return build if cls is None else build(cls)
