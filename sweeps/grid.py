"""Seed document, grid search: learning rate x expansion factor."""


def make_cfgs():
    cfgs = []
    for lr in [1e-4, 3e-4, 1e-3]:
        for exp_factor in [8, 16, 32]:
            cfg = {
                "lr": lr,
                "sae": {"exp_factor": exp_factor},
            }
            cfgs.append(cfg)
    return cfgs
