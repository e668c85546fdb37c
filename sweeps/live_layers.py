"""Train on the fly: TopK SAEs on three layers of the demo model, fed by one forward pass."""


def make_cfgs() -> list[dict]:
    live = {"source": "model", "collect": "configs/demo.toml", "shuffle_tokens": 1 << 16}
    return [
        {
            "n_train": 100_000,
            "n_val": 10_000,
            "batch_size": 1024,
            "downstream_sequences": 0,
            "sae": {"arch": "topk", "exp_factor": 4, "k": 16},
            "train_data": {**live, "layer": layer},
            "val_data": {**live, "layer": layer},
            "tag": f"layer{layer}",
        }
        for layer in (1, 3, 5)
    ]
