"""Seed document, simple grid."""


# sweeps/simple.py
def make_cfgs():
    return [
        {"lr": lr, "objective": {"sparsity_coeff": sp}}
        for lr in [1e-4, 3e-4, 1e-3]
        for sp in [4e-4, 8e-4, 1.6e-3]
    ]
