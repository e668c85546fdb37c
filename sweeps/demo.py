"""The demo sweep: all six architectures side by side on the demo collection."""


def make_cfgs() -> list[dict]:
    common = {"n_train": 300_000, "batch_size": 1024, "sae": {"exp_factor": 4, "k": 16}}
    archs = [
        {"sae": {"arch": "topk"}},
        {"sae": {"arch": "batchtopk"}},
        {"sae": {"arch": "matryoshka"}},
        {"sae": {"arch": "switch", "switch": {"n_experts": 4}}},
        # ReLU's and JumpReLU's L0 is learned: these coefficients (and JumpReLU's initial
        # threshold, tuned with the encoder at the decoder's transpose, scale 1) put it at
        # 25-32 on the demo, inside the health verdict's L0 band
        {"sae": {"arch": "relu"}, "objective": {"sparsity_coeff": 5e-3}},
        {
            "sae": {
                "arch": "jumprelu",
                "jumprelu": {"init_threshold": 1.0, "bandwidth": 0.05},
                "init_encoder_scale": 1.0,
            },
            "objective": {"sparsity_coeff": 2.5e-3},
        },
    ]
    return [
        {**common, **a, "sae": {**common["sae"], **a["sae"]}, "tag": a["sae"]["arch"]}
        for a in archs
    ]
