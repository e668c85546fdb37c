"""saesweep: collect language-model activations once, train sweeps of SAEs on them."""

__version__ = "0.1.0"
