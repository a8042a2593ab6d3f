"""Typed errors: every failure a user can cause has a class and a message saying what to do."""


class FlmError(Exception):
    """Base of every error flm raises on purpose."""


class FlmFormatError(FlmError):
    """A .flm (or other model) file is truncated, corrupt or not what it claims to be."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class CheckpointError(FlmError):
    """A Hugging Face checkpoint directory is missing files or disagrees with its config."""


class ConfigError(FlmError):
    """A config value is missing, contradictory or unsupported."""


class UnknownFamilyError(ConfigError):
    """No family adapter knows this model_type / architecture."""


class UnsupportedDtypeError(FlmError):
    """A dtype name or code that flm does not know."""


class TemplateError(FlmError):
    """A prompt template or chat_template cannot be used."""


class ContextOverflowError(FlmError):
    """A prompt (plus the tokens asked for) does not fit in the model's context window."""
