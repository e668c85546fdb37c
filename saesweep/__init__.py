"""saesweep: collect language-model activations once, train sweeps of SAEs on them."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Reader":
        from saesweep.data.reader import Reader

        return Reader
    raise AttributeError(name)
