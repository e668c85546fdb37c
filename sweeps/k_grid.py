"""k grid: TopK SAEs of one width at several sparsities (each k is its own stack)."""


def make_cfgs() -> list[dict]:
    return [{"sae": {"arch": "topk", "k": k}, "tag": f"k{k}"} for k in [8, 16, 32, 64]]
