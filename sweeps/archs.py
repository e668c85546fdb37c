"""TopK, BatchTopK, Switch, ReLU-L1, JumpReLU and Matryoshka side by side at one width."""


def make_cfgs() -> list[dict]:
    return [
        {"sae": {"arch": "topk", "k": 32}, "tag": "topk"},
        {"sae": {"arch": "batchtopk", "k": 32}, "tag": "batchtopk"},
        {"sae": {"arch": "switch", "k": 32, "switch": {"n_experts": 8}}, "tag": "switch"},
        {
            "sae": {"arch": "relu"},
            "objective": {"sparsity_coeff": 2e-3, "sparsity_warmup_steps": 100},
            "tag": "relu",
        },
        {"sae": {"arch": "jumprelu"}, "objective": {"sparsity_coeff": 2e-3}, "tag": "jumprelu"},
        {"sae": {"arch": "matryoshka", "k": 32}, "tag": "matryoshka"},
    ]
