"""Typed errors. Every failure a user can meet carries one message and a hint."""

from __future__ import annotations


class MinidriverError(Exception):
    """Base of every error minidriver raises on purpose.

    ``hint`` says what the user can do about it; the CLI prints it under the message.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ProcessExecutionError(MinidriverError):
    """An external program failed or could not be run."""

    def __init__(
        self,
        message: str,
        *,
        cmd: list[str],
        exit_code: int | None = None,
        stdout: str = "",
        stderr: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint)
        self.cmd = cmd
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr


class ConfigError(MinidriverError):
    """The configuration file or an option in it is wrong."""


class HostError(MinidriverError):
    """The host cannot run guests as configured (libvirt unreachable, no access...)."""


class UnsupportedHardware(MinidriverError):
    """An image property or flavor asks for hardware this host cannot give."""


class NotFound(MinidriverError):
    """A named thing (image, instance, flavor) does not exist."""


class ImageNotFound(NotFound):
    pass


class InstanceNotFound(NotFound):
    pass


class FlavorNotFound(NotFound):
    pass


class AmbiguousReference(MinidriverError):
    """A name or uuid prefix matches more than one thing; the message lists them."""


class ImageUnacceptable(MinidriverError):
    """An image failed a safety or format check and will not be used."""


class TemplateNotFound(NotFound):
    pass


class TemplateError(MinidriverError):
    """A template cannot be made, used or deleted as asked."""
