"""Seed document, paired parameters: train and val use the same layer (54 configs)."""


def make_cfgs():
    cfgs = []
    # Grid over lr x sparsity
    for lr in [3e-4, 1e-3, 3e-3]:
        for sparsity in [4e-4, 8e-4, 1.6e-3]:
            # Paired layers (train and val use same layer)
            for layer in [6, 7, 8, 9, 10, 11]:
                cfg = {
                    "lr": lr,
                    "objective": {"sparsity_coeff": sparsity},
                    "train_data": {"layer": layer},
                    "val_data": {"layer": layer},
                }
                cfgs.append(cfg)
    return cfgs
