"""Seed document, parallel groups: two layers make two jobs of two SAEs each."""


def make_cfgs():
    cfgs = []
    # These will run in 2 separate jobs
    for layer in [6, 12]:  # Different data loading
        for lr in [1e-4, 3e-4]:  # Can parallelize
            cfg = {
                "lr": lr,
                "train_data": {"layer": layer},
            }
            cfgs.append(cfg)
    return cfgs
