"""Seed document, architecture sweep: three widths with their own learning rates."""


# sweeps/architecture.py
def make_cfgs():
    cfgs = []
    architectures = [
        ("small", 8, 1e-3),
        ("medium", 16, 5e-4),
        ("large", 32, 3e-4),
    ]
    for name, exp_factor, lr in architectures:
        cfg = {
            "lr": lr,
            "sae": {"exp_factor": exp_factor},
            "tag": name,
        }
        cfgs.append(cfg)
    return cfgs
