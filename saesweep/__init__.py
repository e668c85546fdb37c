"""saesweep: collect language-model activations once, train sweeps of SAEs on them."""

__version__ = "0.1.0"


def load(run_dir):
    """The SAE a run directory holds (runs/run-NNN of a sweep), checked to be one unit, as an
    ExportedSAE: `sae = saesweep.load(run_dir); codes = sae.encode(x); x_hat = sae.decode(codes)`
    on raw activations of its hook (cfg['hook_name']). A cross-layer transcoder's is an
    ExportedCLT, an acausal crosscoder's an ExportedCrosscoder: their encode and decode take
    every layer's activations ([B, L, d])."""
    from pathlib import Path

    from saesweep.format.rundir import load_sae
    from saesweep.sae.clt_export import ExportedCLT
    from saesweep.sae.crosscoder_export import ExportedCrosscoder
    from saesweep.sae.export import ExportedSAE

    cfg, weights = load_sae(Path(run_dir))
    layered = {c.architecture: c for c in (ExportedCLT, ExportedCrosscoder)}
    return layered.get(cfg["architecture"], ExportedSAE)(cfg, weights)


def __getattr__(name: str):
    if name == "Reader":
        from saesweep.data.reader import Reader

        return Reader
    raise AttributeError(name)
