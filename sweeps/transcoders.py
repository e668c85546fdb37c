"""SAEs and transcoders side by side on the two-hook demo collection
(configs/demo_transcoders.toml, collected on first use): SAEs on layer 2's residual stream and
on layer 3's MLP output, and transcoders from the first to the second (TopK, skip TopK,
skip JumpReLU). From a store the target hook is a group field: three groups, the
transcoders' reading both hooks in lockstep."""

DATA = {"uri": "data/demo-transcoders", "collect": "configs/demo_transcoders.toml"}


def make_cfgs() -> list[dict]:
    common = {"n_train": 300_000, "batch_size": 1024, "sae": {"exp_factor": 4, "k": 16}}
    runs = [
        ("sae-resid2", {"hook": "resid.2"}, {"arch": "topk"}, {}),
        ("sae-mlp3", {"hook": "mlp.3"}, {"arch": "topk"}, {}),
        ("tc-topk", {"hook": "resid.2", "target_hook": "mlp.3"}, {"arch": "topk"}, {}),
        (
            "skip-tc-topk",
            {"hook": "resid.2", "target_hook": "mlp.3"},
            {"arch": "topk", "skip": True},
            {},
        ),
        (
            "skip-tc-jumprelu",
            {"hook": "resid.2", "target_hook": "mlp.3"},
            {"arch": "jumprelu", "skip": True, "init_encoder_scale": 1.0,  # threshold tuned at 1
             "jumprelu": {"init_threshold": 1.5, "bandwidth": 0.05}},
            {"sparsity_coeff": 5e-3},
        ),
    ]  # fmt: skip
    return [
        {
            **common,
            "train_data": {**DATA, **hooks},
            "sae": {**common["sae"], **sae},
            "objective": objective,
            "tag": tag,
        }
        for tag, hooks, sae, objective in runs
    ]
