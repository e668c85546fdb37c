"""Seed document, module loading: helpers and imports are fine (verbatim; d_vit is d_model)."""


def make_cfgs():
    cfgs = []
    # You can use helper functions
    base_layers = list(range(6, 24, 2))
    for layer in base_layers:
        for lr in [1e-4, 3e-4]:
            cfg = {
                "lr": lr,
                "train_data": {"layer": layer, "n_threads": 8},
                "val_data": {"layer": layer, "n_threads": 8},
                "sae": {"exp_factor": 16, "d_vit": 1024},
            }
            cfgs.append(cfg)
    return cfgs
