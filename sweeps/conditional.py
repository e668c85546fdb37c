"""Seed document, conditional sweep: the learning rates depend on the expansion factor."""


def make_cfgs():
    cfgs = []
    for exp_factor in [8, 16, 32]:
        # Use different LR for different expansion factors
        lrs = [1e-3, 3e-3] if exp_factor <= 16 else [3e-4, 1e-3]
        for lr in lrs:
            cfg = {
                "lr": lr,
                "sae": {"exp_factor": exp_factor},
            }
            cfgs.append(cfg)
    return cfgs
