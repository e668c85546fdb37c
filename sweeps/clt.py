"""Cross-layer transcoders beside the matching per-layer transcoder set on the demo collection
of every layer's MLP input and output (configs/demo_clt.toml, collected on first use): two
TopK CLTs over all six layers (mlp_in -> mlp, 2x per layer, k 8 and 16 per layer), and per
layer two TopK transcoders from that layer's mlp_in to its mlp of the same width and k. The
CLTs share one group and one read of the twelve hooks; the transcoders are one group per
layer (from a store the target hook is a group field)."""

DATA = {"uri": "data/demo-clt", "collect": "configs/demo_clt.toml"}
LAYERS = range(6)
KS = (8, 16)


def make_cfgs() -> list[dict]:
    common = {"n_train": 65_536, "batch_size": 1024}
    clt = {"layers": list(LAYERS), "input_site": "mlp_in", "target_site": "mlp"}
    clts = [
        {**common, "train_data": DATA, "tag": f"clt-k{k}",
         "sae": {"arch": "clt", "exp_factor": 2, "k": k, "clt": clt}}
        for k in KS
    ]  # fmt: skip
    transcoders = [
        {**common, "train_data": {**DATA, "hook": f"mlp_in.{layer}", "target_hook": f"mlp.{layer}"},
         "tag": f"tc{layer}-k{k}", "sae": {"arch": "topk", "exp_factor": 2, "k": k}}
        for layer in LAYERS
        for k in KS
    ]  # fmt: skip
    return clts + transcoders
