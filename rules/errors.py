"""One error tree for the whole project; the HTTP layer maps it to problems in one place.

UpsellError
├── InputError                 the caller's input is wrong (HTTP 422 / CLI exit 2)
│   ├── ContractError          a data file breaks the data contract: file, row, column
│   ├── PolicyError            a policy file is invalid: file and field
│   └── UnknownNodeError       a store id / node id that the snapshot does not know
├── NotReadyError              nothing to serve yet: no snapshot published, no model trained
└── StoreError                 the snapshot store failed (Redis unreachable, corrupt payload)
    └── SnapshotNotFoundError  a version asked for does not exist (e.g. nothing to roll back to)
"""

from __future__ import annotations


class UpsellError(Exception):
    """Base of every error this project raises on purpose."""


class InputError(UpsellError):
    """The caller's input is wrong; the message names what and where."""


class ContractError(InputError):
    """A data file breaks the data contract.

    ``row`` is the 1-based data row (the header is not counted), ``None`` when the problem is
    the file as a whole (a missing column, an unreadable file).
    """

    def __init__(
        self,
        *,
        file: str,
        problem: str,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        self.file = file
        self.problem = problem
        self.row = row
        self.column = column
        where = file
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column '{column}'"
        super().__init__(f"{where}: {problem}")


class PolicyError(InputError):
    """A policy file is invalid; the message names the file and the field."""


class UnknownNodeError(InputError):
    """A store or node id that the current snapshot does not know."""


class NotReadyError(UpsellError):
    """Nothing to serve yet: no snapshot published or no model trained."""


class StoreError(UpsellError):
    """The snapshot store failed: unreachable, or a payload that does not decode."""


class SnapshotNotFoundError(StoreError):
    """A snapshot version that does not exist (for example nothing to roll back to)."""
