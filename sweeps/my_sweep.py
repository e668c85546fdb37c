"""Seed document, Quick Start: 3 learning rates x 3 sparsity coefficients."""


def make_cfgs() -> list[dict]:
    cfgs = []
    # Grid search over learning rate and sparsity
    for lr in [3e-4, 1e-3, 3e-3]:
        for sparsity in [4e-4, 8e-4, 1.6e-3]:
            cfg = {
                "lr": lr,
                "objective": {"sparsity_coeff": sparsity},
            }
            cfgs.append(cfg)
    return cfgs
