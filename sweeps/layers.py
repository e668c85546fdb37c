"""Seed document, layer sweep with paired train/val."""


# sweeps/layers.py
def make_cfgs():
    cfgs = []
    for layer in range(6, 24, 2):  # Layers 6, 8, 10, ..., 22
        for lr in [3e-4, 1e-3]:
            cfg = {
                "lr": lr,
                "train_data": {"layer": layer},
                "val_data": {"layer": layer},
            }
            cfgs.append(cfg)
    return cfgs
