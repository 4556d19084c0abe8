"""Errors for bad input; each message says what was wrong and what to do."""


class ConfigError(ValueError):
  """A config key with a value jaxvae cannot run; the message names the key and a fix."""


def check_positive(value, key: str, number: type = int) -> None:
  """Refuses `config.<key>=value` unless it is a positive `number` (bools are not numbers)."""
  if not isinstance(value, number) or isinstance(value, bool) or value <= 0:
    raise ConfigError(f"config.{key}={value!r} must be a positive {number.__name__}")
