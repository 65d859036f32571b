"""Errors a user can fix. The CLI prints their message without a traceback and exits 2."""


class UserError(Exception):
    """Bad input: a recipe, a source, a file or a tensor that is not what was expected."""


class UnsupportedModel(UserError):
    """A model quantfab refuses by what it is (an encoder, remote code, a layout it cannot map): plan says so and fails."""


class QualityGateFailed(Exception):
    """A validate gate failed: the build is refused and nothing is published (CLI exit 1)."""

    def __init__(self, table: str, failures: list[str]):
        super().__init__("quality gate failed: " + "; ".join(failures))
        self.table = table
        self.failures = failures


class VerificationFailed(Exception):
    """Packed bytes do not decode to what the method produced: the build is refused, nothing published (CLI exit 1)."""

    def __init__(self, failures: list[str]):
        super().__init__("packed tensors do not decode to their codes: " + "; ".join(failures))
        self.failures = failures


class StoreDamaged(UserError):
    """The store keeps losing or altering a blob a stage reads, even after rebuilding it: its disk needs a look."""
