"""The project's error hierarchy, drawn once so every layer raises and maps the same types.

    PainplanError                 base; never raised directly
    ├── ContractError             input does not match CONTRACT.md (columns, values, plans)
    │   └── PlanError             a plan string names an unknown/duplicate component or breaks a rule
    ├── ModelError                a saved model is missing, corrupt or incompatible
    │   └── ModelNotFound
    └── ConfigError               a config file or environment setting is wrong

Every message says what was wrong *and* how to fix it, in one paragraph: the CLI prints it
as-is and the service puts it in the 4xx/5xx body.
"""

from __future__ import annotations


class PainplanError(Exception):
    """Base of all errors painplan raises on purpose."""


class ContractError(PainplanError, ValueError):
    """Data does not conform to the interface contract.

    ``violations`` holds one structured entry per problem (column, rows, values, message) so
    callers such as the HTTP service can name every offending field without parsing text.
    """

    def __init__(self, message: str, violations: list[dict] | None = None):
        super().__init__(message)
        self.violations = violations or []


class PlanError(ContractError):
    """A plan string could not be parsed into a valid plan."""


class ModelError(PainplanError):
    """A model artefact cannot be used."""


class ModelNotFound(ModelError):
    """No model where one was expected."""


class ConfigError(PainplanError, ValueError):
    """A configuration value is invalid."""


class IncompatibleModel(ModelError):
    """A saved model was built for another feature schema or safety ruleset than this code's."""
