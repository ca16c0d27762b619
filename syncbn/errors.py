"""The error every part of the application raises for a command that cannot work. It sits below
them all (beside ``distributed``, above only the layer) so that a part can refuse its own keys
without importing the configuration's schema."""


class ConfigError(ValueError):
    """A configuration value that has the right type but cannot work."""
