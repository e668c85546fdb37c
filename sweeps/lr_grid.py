"""Learning-rate grid for TopK SAEs: one group, one read of the data for all of them."""


def make_cfgs() -> list[dict]:
    return [
        {"lr": lr, "sae": {"arch": "topk"}, "tag": f"lr{lr:g}"}
        for lr in [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3]
    ]
