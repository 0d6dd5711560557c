"""Exceptions raised by vmkit.

Config errors carry Cloud Hypervisor v37's texts, so messages users already
know (and scripts already match) stay the same.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration could not be parsed, read from JSON, or validated.

    ``kind`` names the problem: a Cloud Hypervisor v37 error variant (for
    example ``ParseDisk`` or ``CpuTopologyCount``), or ``InvalidJson`` and
    ``Unrepresentable`` for vmkit's own JSON and rendering errors.
    ``option`` is the command-line flag concerned (``--disk``), ``key`` and
    ``value`` the option key and raw value where one is to blame, and ``path``
    the location inside a JSON document (``disks[0].queue_size``).
    """

    def __init__(
        self,
        message: str,
        kind: str,
        *,
        option: str | None = None,
        key: str | None = None,
        value: str | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.option = option
        self.key = key
        self.value = value
        self.path = path

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild,
            (type(self), self.message, self.kind, self.option, self.key, self.value, self.path),
        )


def _rebuild(
    cls: type[ConfigError],
    message: str,
    kind: str,
    option: str | None,
    key: str | None,
    value: str | None,
    path: str | None,
) -> ConfigError:
    return cls(message, kind, option=option, key=key, value=value, path=path)


class ParseError(ConfigError):
    """An option string was refused (``kind`` is v37's ``Error`` variant name).

    ``str(error)`` is v37's text, e.g. ``Error parsing --disk: unknown option: foo``.
    """


class ValidationError(ConfigError):
    """A parsed configuration broke a rule (``kind`` is v37's ``ValidationError`` name).

    ``str(error)`` is v37's text without the ``Error validating configuration:`` prefix.
    """


class UsageError(ValueError):
    """A command line was malformed: an unknown flag, a repeated flag, a missing value."""
