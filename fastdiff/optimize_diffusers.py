"""``optimize(pipe)``: fastdiff as a faster backend for an existing diffusers pipeline, with ``revert``.

One line for people who keep their diffusers code::

    import fastdiff
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(...).to("cuda", torch.float16)
    fastdiff.optimize(pipe)            # in place, this instance only; returns pipe
    image = pipe(prompt).images[0]
    fastdiff.revert(pipe)              # the original modules, processors and scheduler again

It takes a diffusers ``StableDiffusionPipeline``, ``StableDiffusionImg2ImgPipeline`` or
``StableDiffusionXLPipeline`` (any other diffusers pipeline gets the module swaps and a report of
what was left), or a bare diffusers ``UNet2DConditionModel``, ``UNet2DModel`` or ``AutoencoderKL``.
Everything happens on that instance: no diffusers or torch class is patched, other instances stay
as they were. What it swaps, where the result is the same to floating-point tolerance:

* **GroupNorm + SiLU.** In a module whose ``forward`` (read with :mod:`ast`) assigns
  ``x = self.<norm>(...)`` and then, as the very next statement, ``x = self.<act>(x)`` with
  ``<norm>`` a ``torch.nn.GroupNorm`` and ``<act>`` a ``torch.nn.SiLU`` (diffusers'
  ``ResnetBlock2D.norm1``/``norm2`` + ``nonlinearity``, the UNets' and VAE's ``conv_norm_out`` +
  ``conv_act``), the norm becomes a :class:`fastdiff.nn.GroupNorm` with ``activation="silu"``
  sharing the same ``weight``/``bias`` Parameters (state_dict keys unchanged), and the activation
  a parameter-free :class:`SiLUAfterFusedNorm` that passes the fused norm's own output through
  untouched and applies SiLU to anything else (``ResnetBlock2D`` also applies ``nonlinearity``
  to the time embedding). A branch whose test reads ``self.<attr> == <constant>`` and is false
  for this instance is not followed (``time_embedding_norm == "scale_shift"``, where ``norm2``
  is followed by the scale and shift: such a block keeps its norm plain).
* **Plain GroupNorm** (every other ``torch.nn.GroupNorm``) becomes :class:`fastdiff.nn.GroupNorm`.
* **Attention.** Each diffusers ``Attention`` whose processor is diffusers' ``AttnProcessor2_0``
  or ``AttnProcessor`` gets :class:`FastdiffDiffusersAttnProcessor` (set through the model's
  ``set_attn_processor``), which runs the same steps with :func:`fastdiff.ops.attention`. It calls
  ``attn.to_q``/``to_k``/``to_v``/``to_out`` as they are, so peft's LoRA layers on them work, and
  it never fuses q/k/v (a fused copy of the weights would go stale under a captured graph or an
  active adapter). Other processors (IP-Adapter, xformers, fused, custom) are left and reported.
* **Scheduler.** A diffusers scheduler with a fastdiff namesake becomes that fastdiff scheduler,
  built from the same config (same numbers; on CUDA its ``step`` runs the fused
  ``scheduler_step`` kernel). Classifier-free guidance is not folded into the step: diffusers'
  loop splits and combines the CFG output itself before ``scheduler.step``.
* **CUDA graphs.** The UNet call is captured by :class:`fastdiff.graphs.GraphRunner` (one runner
  per UNet instance). Its key holds the input shapes and every Python value of the call, plus the
  processors' classes and every peft LoRA layer's active adapters, scales, merged adapters and
  disabled flag; the runner's weight fingerprint recaptures when a parameter is replaced or
  added (``load_lora_weights``, ``unload_lora_weights``, ``.to(...)``) and serves in-place
  updates from the same memory (``fuse_lora``), so no graph serves stale weights. The first call
  at new shapes runs eagerly (warm-up), the next one captures. Only where the UNet sits on CUDA
  at ``optimize`` time (or a capture backend is passed as ``cuda_graph=``, as the tests do with
  :class:`fastdiff.graphs.StandInBackend`).

:func:`optimization_report` returns what was swapped and what was left, each with its reason;
``optimize(..., report=True)`` also prints it. :func:`revert` puts back the original modules
(with whatever Parameters the swapped ones hold now), processors and scheduler, and drops the
graphs: the next image is bitwise the un-optimised one.

Limits: a component shared by two pipelines (``Img2ImgPipeline(**pipe.components)``) is one
instance, so optimizing either pipeline changes it for both. Deep-copying or pickling an optimized
model copies a forward bound to the original instance: revert first. With
``enable_model_cpu_offload`` the weights move on every call, so each call recaptures: pass
``cuda_graph=False`` there. LoRA state is read from peft's layers (found through ``peft_config``,
which diffusers' and peft's LoRA APIs set).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import weakref
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fastdiff import backends
from fastdiff.nn.group_norm import GroupNorm

__all__ = [
    "FastdiffDiffusersAttnProcessor",
    "OptimizeReport",
    "OptimizedGroupNorm",
    "SiLUAfterFusedNorm",
    "optimization_report",
    "optimize",
    "revert",
]

_STATE_ATTR = "_fastdiff_optimize_state"
_PROCESSOR_TRACE_NAME = "attention_processor"
_SCHEDULER_NAMES = (
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
)
_CHECKED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionXLPipeline")
_MODEL_NAMES = ("UNet2DConditionModel", "UNet2DModel", "AutoencoderKL")
_GRAPHED_MODELS = ("UNet2DConditionModel", "UNet2DModel")


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OptimizeReport:
    """What :func:`optimize` did to one pipeline or model.

    Attributes:
        swapped: ``(where, what)`` for every swap, ``where`` a dotted path such as
            ``"unet.down_blocks.0.resnets.0.norm1"`` or ``"scheduler"``.
        left: ``(where, why)`` for everything left as it was.
        graph_runners: component name -> the :class:`fastdiff.graphs.GraphRunner` capturing its
            calls (``runner.stats`` counts warm-ups, captures, replays and recaptures).
    """

    swapped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    left: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    graph_runners: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fastdiff.optimize: {len(self.swapped)} swapped, {len(self.left)} left as they were"]
        lines += ["swapped:"] + [f"  {where}: {what}" for where, what in self.swapped]
        lines += ["left:"] + [f"  {where}: {why}" for where, why in self.left]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class OptimizedGroupNorm(GroupNorm):
    """:class:`fastdiff.nn.GroupNorm` as installed by :func:`optimize`: same Parameters and keys as
    the ``torch.nn.GroupNorm`` it replaces, an optional backend for :func:`fastdiff.ops.group_norm`,
    and (when fused) a weak reference to its last output, which :class:`SiLUAfterFusedNorm` uses to
    recognise the tensor that already went through SiLU."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend
        self._last_output = None

    @classmethod
    def replacing(cls, norm: nn.GroupNorm, activation: Optional[str], backend: Optional[str]) -> "OptimizedGroupNorm":
        new = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, activation=activation, backend=backend, device="meta")
        new.weight = norm.weight
        new.bias = norm.bias
        new.train(norm.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from fastdiff.ops.group_norm import group_norm

        out = group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.activation, backend=self.backend)
        if self.activation is not None:
            self._last_output = weakref.ref(out)
        return out


class SiLUAfterFusedNorm(nn.Module):
    """Stands in for the ``nn.SiLU`` after fused norms: returns the output of one of ``norms``
    unchanged (SiLU already ran inside the norm) and applies SiLU to any other tensor.

    The norms are held in a plain tuple, not as submodules, so the state_dict is unchanged."""

    def __init__(self, norms: Sequence[OptimizedGroupNorm], inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self._norms = tuple(norms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm in self._norms:
            last = norm._last_output
            if last is not None and last() is x:
                norm._last_output = None
                return x
        return nn.functional.silu(x, inplace=self.inplace)

    def extra_repr(self) -> str:
        return f"after {len(self._norms)} fused GroupNorm+SiLU"


def _fastdiff_attention(*args, **kwargs):
    from fastdiff.ops.attention import attention

    return attention(*args, **kwargs)


class FastdiffDiffusersAttnProcessor:
    """A processor for diffusers' ``Attention`` module: diffusers' ``AttnProcessor2_0`` steps
    (spatial norm, mask preparation, group norm, q/k/v projections, cross norm, q/k norms,
    attention, output projection, residual, rescale) with the attention computed by
    :func:`fastdiff.ops.attention` (``backend``: ``None`` follows ``fastdiff.use_backend`` /
    ``FASTDIFF_BACKEND``, else auto). The projections are called as modules, so peft's LoRA layers
    on ``to_q``/``to_k``/``to_v``/``to_out`` apply; q/k/v are never fused.

    The scale is ``head_dim ** -0.5``, what ``AttnProcessor2_0`` uses (:func:`optimize` installs
    this processor only where ``attn.scale`` equals it, so ``AttnProcessor`` agrees too)."""

    def __init__(self, backend: Optional[str] = None):
        self.backend = backend

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if not backends._is_compiling():
            backends._record(_PROCESSOR_TRACE_NAME, type(self).__name__)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = _fastdiff_attention(query, key, value, attn_mask=attention_mask, scale=None, backend=self.backend)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# ---------------------------------------------------------------------------------------------
# Reading a forward: is `x = self.norm(x)` directly followed by `x = self.act(x)`?
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _forward_ast(forward) -> Optional[ast.FunctionDef]:
    try:
        source = textwrap.dedent(inspect.getsource(forward))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0] if tree.body else None
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _is_self_attr(node, attr: str) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name) and node.value.id == "self"


def _self_call_assign(stmt, attr: str, same_variable: bool) -> Optional[str]:
    """``T = self.<attr>(<one argument>)``: returns T (with ``same_variable``, only when the
    argument is T itself); anything else: None."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
        return None
    call = stmt.value
    if not (isinstance(call, ast.Call) and _is_self_attr(call.func, attr) and not call.keywords and len(call.args) == 1):
        return None
    if isinstance(call.args[0], ast.Starred):
        return None
    target = stmt.targets[0].id
    if same_variable and not (isinstance(call.args[0], ast.Name) and call.args[0].id == target):
        return None
    return target


_UNDECIDED = object()


def _static_test(test, module) -> Any:
    """The value of an ``if`` test of the form ``self.attr == const`` / ``!=`` / ``in (consts)``
    for this module instance, or _UNDECIDED."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and _is_self_attr_any(test.left)):
        return _UNDECIDED
    try:
        right = ast.literal_eval(test.comparators[0])
    except ValueError:
        return _UNDECIDED
    if not hasattr(module, test.left.attr):
        return _UNDECIDED
    value = getattr(module, test.left.attr)
    op = test.ops[0]
    if not isinstance(value, (str, int, float, bool, type(None))):
        return _UNDECIDED
    if isinstance(op, ast.Eq):
        return value == right
    if isinstance(op, ast.NotEq):
        return value != right
    if isinstance(op, ast.In) and isinstance(right, (tuple, list, set)):
        return value in right
    if isinstance(op, ast.NotIn) and isinstance(right, (tuple, list, set)):
        return value not in right
    return _UNDECIDED


def _is_self_attr_any(node) -> bool:
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"


def _norm_act_fusable(func: ast.FunctionDef, module: nn.Module, norm_attr: str, act_attr: str) -> Optional[str]:
    """None when every live call of ``self.<norm_attr>`` in ``func`` is ``V = self.<norm>(x)``
    directly followed (in the same block, or after the ``if``/``with`` it ends) by
    ``V = self.<act>(V)``, which overwrites the only name of the norm's output; otherwise the
    reason it is not."""
    found = []
    problems = []

    def next_statement(path):
        # path: list of (statement list, index, owner statement or None), innermost last
        for stmts, index, owner in reversed(path):
            if index + 1 < len(stmts):
                return stmts[index + 1]
            if owner is None or not isinstance(owner, (ast.If, ast.With)):
                return None
        return None

    def uses_in(nodes) -> int:
        return sum(1 for node in nodes for n in ast.walk(node) if _is_self_attr(n, norm_attr))

    def visit(stmts, path, owner):
        for i, stmt in enumerate(stmts):
            here = path + [(stmts, i, owner)]
            if isinstance(stmt, ast.If):
                if uses_in([stmt.test]) and not _is_self_attr(stmt.test, norm_attr):
                    problems.append(f"forward reads self.{norm_attr} in an if-test other than its truth value")
                decided = _static_test(stmt.test, module)
                if decided is not False:
                    visit(stmt.body, here, stmt)
                if decided is not True:
                    visit(stmt.orelse, here, stmt)
                continue
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                if uses_in([stmt]):
                    problems.append(f"forward uses self.{norm_attr} inside a nested definition")
                continue
            bodies = [getattr(stmt, f) for f in ("body", "orelse", "finalbody") if isinstance(getattr(stmt, f, None), list)]
            bodies += [h.body for h in getattr(stmt, "handlers", [])]
            if bodies:  # for / while / with / try
                if uses_in([stmt]) != sum(uses_in(body) for body in bodies):
                    problems.append(f"forward uses self.{norm_attr} in a {type(stmt).__name__} header")
                for body in bodies:
                    visit(body, here, stmt)
                continue
            uses = uses_in([stmt])
            if not uses:
                continue
            variable = _self_call_assign(stmt, norm_attr, same_variable=False)
            if variable is not None:
                following = next_statement(here)
                if following is None or _self_call_assign(following, act_attr, same_variable=True) != variable:
                    problems.append(f"self.{norm_attr}(...) in forward is not followed directly by self.{act_attr} on its output")
                else:
                    found.append(stmt)
                continue
            calls = [n for n in ast.walk(stmt) if isinstance(n, ast.Call) and _is_self_attr(n.func, norm_attr)]
            if len(calls) == uses and all(len(c.args) + len(c.keywords) != 1 for c in calls):
                continue  # e.g. Decoder's conv_norm_out(sample, latent_embeds): a GroupNorm cannot take that call
            problems.append(f"forward uses self.{norm_attr} other than as `x = self.{norm_attr}(x)`")

    visit(func.body, [], None)
    if problems:
        return problems[0]
    if not found:
        return f"forward never calls self.{norm_attr} as `x = self.{norm_attr}(x)`"
    return None


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"optimize: {name} must be True or False, got {value!r}")


def _resolve_backends(backend) -> Dict[str, Optional[str]]:
    """``backend`` -> per-op backend for group_norm and attention (None: follow use_backend/auto)."""
    from fastdiff.backends import get_dispatcher

    ops = ("group_norm", "attention")
    available = {op: set(get_dispatcher(op).backends) for op in ops}
    if isinstance(backend, str):
        if backend == backends.AUTO:
            return {op: None for op in ops}
        chosen = {op: (backend if backend in available[op] else None) for op in ops}
        if all(v is None for v in chosen.values()):
            raise ValueError(
                f"optimize: backend={backend!r} is no backend of group_norm {sorted(available['group_norm'])} "
                f"or attention {sorted(available['attention'])}; expected 'auto', one of those, or a dict op -> backend"
            )
        return chosen
    if isinstance(backend, Mapping):
        result = {op: None for op in ops}
        for op, name in backend.items():
            if op not in ops:
                raise ValueError(f"optimize: backend has an unknown op {op!r}; expected keys among {list(ops)}")
            if name != backends.AUTO and name not in available[op]:
                raise ValueError(f"optimize: backend[{op!r}]={name!r}; expected 'auto' or one of {sorted(available[op])}")
            result[op] = None if name == backends.AUTO else name
        return result
    raise TypeError(f"optimize: backend must be 'auto', a backend name or a dict op -> backend name, got {backend!r}")


def _diffusers():
    try:
        import diffusers
    except ImportError as error:  # pragma: no cover - optimize only makes sense with diffusers
        raise ImportError("fastdiff.optimize works on diffusers pipelines and models; install diffusers") from error
    return diffusers


def _is_diffusers_object(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "diffusers"


def _kind(obj) -> str:
    """'pipeline' or 'model'; raises TypeError for anything else."""
    diffusers = _diffusers()
    if isinstance(obj, diffusers.DiffusionPipeline):
        return "pipeline"
    if isinstance(obj, tuple(getattr(diffusers, n) for n in _MODEL_NAMES)):
        return "model"
    hint = ""
    if type(obj).__module__.split(".")[0] == "fastdiff":
        hint = " (fastdiff's own pipelines and models already run fastdiff's kernels)"
    raise TypeError(
        f"optimize: pipe must be a diffusers pipeline (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, "
        f"StableDiffusionXLPipeline, or another DiffusionPipeline) or a diffusers {', '.join(_MODEL_NAMES)}, "
        f"got {type(obj).__module__}.{type(obj).__name__}{hint}"
    )


# ---------------------------------------------------------------------------------------------
# State kept on the optimised instance (for revert)
# ---------------------------------------------------------------------------------------------


class _ModelState:
    def __init__(self, model: nn.Module, name: str):
        self.model_ref = weakref.ref(model)
        self.name = name
        self.modules: List[Tuple[nn.Module, str, nn.Module, nn.Module]] = []  # (parent, attr, original, new)
        self.processors: List[Tuple[nn.Module, Any, Any]] = []  # (attention module, original, new)
        self.forward = None  # the instance forward installed for graphs
        self.runner = None
        self.pipeline_state: Optional["_PipelineState"] = None  # set for a bare model (its report)
        self.in_pipeline = False


class _PipelineState:
    def __init__(self):
        self.models: List[_ModelState] = []
        self.scheduler = None  # (original scheduler, new scheduler, original config entry)
        self.report = OptimizeReport()


# ---------------------------------------------------------------------------------------------
# The swaps
# ---------------------------------------------------------------------------------------------


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook") or "forward" in module.__dict__)


def _swap_group_norms(model: nn.Module, prefix: str, state: _ModelState, report: OptimizeReport, fuse: bool, backend) -> None:
    occurrences: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        occurrences[id(m)] = occurrences.get(id(m), 0) + 1
    replaced: Dict[int, OptimizedGroupNorm] = {}
    for parent_name, parent in list(model.named_modules()):
        children = list(parent.named_children())
        fused_here: Dict[str, List[OptimizedGroupNorm]] = {}
        for name, child in children:
            where = f"{prefix}{parent_name + '.' if parent_name else ''}{name}"
            if not isinstance(child, nn.GroupNorm) or isinstance(child, GroupNorm):
                continue
            if type(child) is not nn.GroupNorm:
                report.left.append((where, f"{type(child).__name__} is a GroupNorm subclass fastdiff does not know"))
                continue
            if _has_hooks(child):
                report.left.append((where, "the GroupNorm has hooks (accelerate offload or a user hook); replacing it would drop them"))
                continue
            if id(child) in replaced or occurrences.get(id(child), 1) > 1:
                report.left.append((where, "the same GroupNorm instance sits at more than one place in the model"))
                continue
            activation, act_attr, why_not = None, None, None
            if fuse:
                act_attr, why_not = _fusion_partner(parent, name)
                activation = "silu" if act_attr is not None else None
            new = OptimizedGroupNorm.replacing(child, activation, backend)
            setattr(parent, name, new)
            replaced[id(child)] = new
            state.modules.append((parent, name, child, new))
            if activation:
                fused_here.setdefault(act_attr, []).append(new)
                report.swapped.append((where, f"torch GroupNorm + {act_attr} SiLU -> fastdiff GroupNorm(activation='silu') (fused)"))
            else:
                report.swapped.append((where, "torch GroupNorm -> fastdiff GroupNorm"))
                if why_not is not None:
                    report.left.append((where, f"not fused with an activation: {why_not}"))
        for act_attr, norms in fused_here.items():
            act = getattr(parent, act_attr)
            shim = SiLUAfterFusedNorm(norms, inplace=act.inplace)
            shim.train(act.training)
            setattr(parent, act_attr, shim)
            state.modules.append((parent, act_attr, act, shim))


def _fusion_partner(parent: nn.Module, norm_attr: str) -> Tuple[Optional[str], Optional[str]]:
    """(activation attribute, None) when ``parent.<norm_attr>`` can be fused with a SiLU, else (None, why)."""
    if "forward" in parent.__dict__:
        return None, f"{type(parent).__name__} has a forward set on the instance"
    candidates = [n for n, c in parent.named_children() if type(c) is nn.SiLU]
    if not candidates:
        return None, None  # nothing to fuse with: a plain GroupNorm
    func = _forward_ast(type(parent).forward)
    if func is None:
        return None, f"the source of {type(parent).__name__}.forward cannot be read"
    reasons = []
    for act_attr in candidates:
        if _has_hooks(getattr(parent, act_attr)):
            reasons.append(f"its SiLU {act_attr} has hooks")
            continue
        why = _norm_act_fusable(func, parent, norm_attr, act_attr)
        if why is None:
            return act_attr, None
        reasons.append(why)
    return None, "; ".join(dict.fromkeys(reasons))


def _swap_processors(model: nn.Module, prefix: str, state: _ModelState, report: OptimizeReport, backend) -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    modules = {f"{n}.processor": m for n, m in model.named_modules() if hasattr(m, "get_processor") and hasattr(m, "set_processor")}
    # the model's own API where it has one (UNet2DConditionModel, AutoencoderKL); UNet2DModel has none
    by_model = hasattr(model, "set_attn_processor") and hasattr(model, "attn_processors")
    current = model.attn_processors if by_model else {k: m.get_processor() for k, m in modules.items()}
    if not current:
        return
    new_processors = dict(current)
    processor = FastdiffDiffusersAttnProcessor(backend=backend)
    changed = []
    for key, old in current.items():
        module = modules.get(key)
        where = f"{prefix}{key[: -len('.processor')]}"
        if module is None:
            report.left.append((where, "no attention module found for this processor"))
            continue
        if type(module) is not Attention:
            report.left.append((where, f"{type(module).__name__} is not diffusers' Attention"))
            continue
        if type(old) not in (AttnProcessor2_0, AttnProcessor):
            report.left.append((where, f"processor {type(old).__name__} is not one fastdiff replaces (AttnProcessor2_0, AttnProcessor)"))
            continue
        head_dim = module.inner_dim // module.heads
        if abs(module.scale - head_dim**-0.5) > 1e-12 * head_dim**-0.5:
            why = f"attn.scale={module.scale} is not head_dim ** -0.5 (scale_qk=False): diffusers' two processors disagree there"
            report.left.append((where, why))
            continue
        if getattr(module, "added_kv_proj_dim", None) is not None:
            report.left.append((where, "added key/value projections (added_kv_proj_dim)"))
            continue
        new_processors[key] = processor
        changed.append((module, old, where))
    if not changed:
        return
    if by_model:
        model.set_attn_processor(new_processors)
    else:
        for module, _, _ in changed:
            module.set_processor(processor)
    for module, old, where in changed:
        state.processors.append((module, old, processor))
        report.swapped.append((where, f"{type(old).__name__} -> FastdiffDiffusersAttnProcessor (fastdiff.ops.attention)"))


def _is_lora_layer(module: nn.Module) -> bool:
    return isinstance(getattr(module, "scaling", None), dict) and hasattr(module, "merged_adapters")


def _lora_state(model: nn.Module, cache: Optional[dict] = None) -> tuple:
    """Every peft LoRA layer's Python state a captured graph bakes in: active adapters, scales,
    merged adapters, disabled flag.

    A model without ``peft_config`` (set by diffusers' ``load_lora_weights``/``add_adapter`` and by
    peft's ``inject_adapter_in_model``) has no LoRA layers, and the walk over the module tree that
    finds them is done again only when ``peft_config`` or one of its adapter configs is a new object
    (``cache``; a load, delete or unload):
    it is paid once per load, not once per UNet call."""
    config = getattr(model, "peft_config", None)
    if not config:
        return ()
    token = (id(config), tuple((name, id(c)) for name, c in config.items()))
    if cache is None or cache.get("token") != token:
        layers = tuple((name, m) for name, m in model.named_modules() if _is_lora_layer(m))
        if cache is None:
            cache = {}
        # holding the config objects keeps their ids from being reused by a later load
        cache.update(token=token, layers=layers, held=(config, tuple(config.values())))
    state = []
    for name, m in cache["layers"]:
        active = getattr(m, "active_adapters", ())
        state.append(
            (
                name,
                tuple(sorted((k, float(v)) for k, v in m.scaling.items())),
                tuple(m.merged_adapters),
                tuple(active) if isinstance(active, (list, tuple)) else (active,),
                bool(getattr(m, "disable_adapters", False)),
            )
        )
    return tuple(state)


def _install_graphs(model: nn.Module, name: str, state: _ModelState, report: OptimizeReport, capture_backend) -> None:
    from fastdiff.graphs import CUDAGraphBackend, GraphRunner

    if type(model).__name__ not in _GRAPHED_MODELS:
        report.left.append((name, "cuda_graph: only the UNet call is captured (the VAE runs once per image)"))
        return
    if "forward" in model.__dict__:
        report.left.append((name, "cuda_graph: forward is already replaced on this instance (accelerate offload hook or another tool)"))
        return
    if capture_backend is None:
        capture_backend = CUDAGraphBackend()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        why = capture_backend.device_reasons(device)
        if why:
            report.left.append((name, f"cuda_graph: the model is on {device} at optimize time: {why[0]}; move it to CUDA before optimize"))
            return
    runner = GraphRunner(owner=model, backend=capture_backend)
    original_forward = type(model).forward.__get__(model)
    signature = inspect.signature(original_forward)
    output_class = _output_class(model)
    attention_modules = [m for m in model.modules() if hasattr(m, "get_processor") and hasattr(m, "set_processor")]
    lora_cache: dict = {}

    def graphed_forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        return_dict = arguments.pop("return_dict", True)
        sample = arguments["sample"]
        timestep = arguments["timestep"]
        if not torch.is_tensor(timestep):
            dtype = torch.float32 if isinstance(timestep, float) else torch.int64
            arguments["timestep"] = torch.tensor([timestep], dtype=dtype, device=sample.device)
        leaves, spec = pytree.tree_flatten(arguments)
        tensor_positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        inputs = {f"t{i}": leaves[i] for i in tensor_positions}
        constants = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

        def fn(**tensors):
            values = list(constants)
            for i in tensor_positions:
                values[i] = tensors[f"t{i}"]
            return original_forward(**pytree.tree_unflatten(values, spec), return_dict=False)[0]

        reasons = []
        if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
            reasons.append("gradients are enabled (training): the UNet runs eagerly")
        extra = (
            str(spec),
            tuple(repr(c) if c is not None and not isinstance(c, (bool, int, float, str)) else c for c in constants),
            model.training,
            tuple(type(m.get_processor()).__qualname__ for m in attention_modules),
            _lora_state(model, lora_cache),
        )
        region = runner.region(f"{name}.forward", fn, inputs, modules=[model], extra=extra, reasons=reasons)
        out = region(**inputs)
        if region.captured:
            out = out.clone()  # the static output is overwritten by the next replay
        return output_class(sample=out) if return_dict else (out,)

    graphed_forward._fastdiff_graphed = True
    model.forward = graphed_forward
    state.forward = graphed_forward
    state.runner = runner
    report.graph_runners[name] = runner
    report.swapped.append((name, f"forward captured as graphs by fastdiff.graphs.GraphRunner ({type(capture_backend).__name__})"))


def _output_class(model):
    if type(model).__name__ == "UNet2DConditionModel":
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput
    from diffusers.models.unets.unet_2d import UNet2DOutput

    return UNet2DOutput


def _optimize_model(model, name: str, report: OptimizeReport, *, group_norm, attention, cuda_graph, per_op) -> _ModelState:
    state = _ModelState(model, name)
    prefix = f"{name}." if name else ""
    if group_norm:
        _swap_group_norms(model, prefix, state, report, fuse=True, backend=per_op["group_norm"])
    if attention:
        _swap_processors(model, prefix, state, report, backend=per_op["attention"])
    if cuda_graph is not False:
        _install_graphs(model, name or type(model).__name__, state, report, None if cuda_graph is True else cuda_graph)
    setattr(model, _STATE_ATTR, state)
    return state


def _swap_scheduler(pipe, report: OptimizeReport, pipe_state: _PipelineState) -> None:
    import fastdiff.schedulers as fastdiff_schedulers

    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        return
    name = type(scheduler).__name__
    diffusers = _diffusers()
    if type(pipe).__name__ not in _CHECKED_PIPELINES or not _is_diffusers_object(pipe):
        checked = ", ".join(_CHECKED_PIPELINES)
        report.left.append(("scheduler", f"{type(pipe).__name__}'s loop is not one fastdiff has checked ({checked})"))
        return
    if name not in _SCHEDULER_NAMES or type(scheduler) is not getattr(diffusers, name, None):
        report.left.append(("scheduler", f"{type(scheduler).__module__}.{name} has no fastdiff counterpart"))
        return
    try:
        new = getattr(fastdiff_schedulers, name).from_config(dict(scheduler.config))
    except (ValueError, NotImplementedError, TypeError) as error:
        report.left.append(("scheduler", f"fastdiff's {name} refuses this config: {error}"))
        return
    entry = pipe.config.get("scheduler")
    pipe.scheduler = new
    pipe_state.scheduler = (scheduler, new, entry)
    report.swapped.append(("scheduler", f"diffusers {name} -> fastdiff {name} (same config; the fused step on CUDA)"))
    report.left.append(
        (
            "scheduler.guidance",
            "classifier-free guidance is not folded into the step: diffusers' loop splits and combines the CFG output "
            "itself before scheduler.step, so folding it would mean changing the loop",
        )
    )


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def optimize(
    pipe,
    *,
    group_norm: bool = True,
    attention: bool = True,
    scheduler: bool = True,
    cuda_graph: Union[bool, Any] = True,
    backend: Union[str, Mapping[str, str]] = "auto",
    report: bool = False,
):
    """Swap fastdiff's kernels into a diffusers pipeline or model, in place on that instance only.

    Args:
        pipe: a diffusers ``DiffusionPipeline`` (``StableDiffusionPipeline``,
            ``StableDiffusionImg2ImgPipeline`` and ``StableDiffusionXLPipeline`` get every swap; other
            pipelines the module swaps), or a diffusers ``UNet2DConditionModel``, ``UNet2DModel`` or
            ``AutoencoderKL``.
        group_norm (`bool`): GroupNorm (+ SiLU) -> fastdiff's (fused) GroupNorm.
        attention (`bool`): diffusers' SDPA/plain attention processors -> :class:`FastdiffDiffusersAttnProcessor`.
        scheduler (`bool`): the scheduler -> fastdiff's scheduler of the same class and config.
        cuda_graph (`bool` or a capture backend): capture the UNet call with
            :class:`fastdiff.graphs.GraphRunner` where the UNet is on CUDA; a backend object (such as
            :class:`fastdiff.graphs.StandInBackend`) is used instead of CUDA graphs, on any device.
        backend (`str` or `dict`): ``"auto"``; a backend name for the ops that have it
            (``"triton"``, ``"reference"``, ...); or ``{"group_norm": ..., "attention": ...}``.
        report (`bool`): print :func:`optimization_report` as well.

    Returns:
        ``pipe`` itself. :func:`optimization_report` (``pipe``) says what was swapped and left.
    """
    kind = _kind(pipe)
    for flag, value in (("group_norm", group_norm), ("attention", attention), ("scheduler", scheduler), ("report", report)):
        _check_flag(flag, value)
    if not isinstance(cuda_graph, bool) and not all(hasattr(cuda_graph, m) for m in ("capture", "replay", "new_pool", "device_reasons")):
        raise TypeError(f"optimize: cuda_graph must be True, False or a fastdiff.graphs capture backend, got {cuda_graph!r}")
    per_op = _resolve_backends(backend)
    if getattr(pipe, _STATE_ATTR, None) is not None:
        raise ValueError(f"optimize: this {type(pipe).__name__} is already optimized; call fastdiff.revert(pipe) first")

    pipe_state = _PipelineState()
    rep = pipe_state.report
    if kind == "model":
        models = [("", pipe)]
    else:
        models = []
        for name, component in pipe.components.items():
            if component is None or not isinstance(component, nn.Module):
                continue
            if getattr(component, _STATE_ATTR, None) is not None:
                raise ValueError(f"optimize: pipe.{name} is already optimized; call fastdiff.revert on it first")
            if isinstance(component, _diffusers().ModelMixin):
                models.append((name, component))
            else:
                rep.left.append((name, f"{type(component).__module__}.{type(component).__name__} is not a diffusers model; left as is"))
    for name, model in models:
        model_state = _optimize_model(model, name, rep, group_norm=group_norm, attention=attention, cuda_graph=cuda_graph, per_op=per_op)
        model_state.in_pipeline = kind == "pipeline"
        pipe_state.models.append(model_state)
    if kind == "pipeline":
        if scheduler:
            _swap_scheduler(pipe, rep, pipe_state)
        setattr(pipe, _STATE_ATTR, pipe_state)
    else:
        pipe_state.models[0].pipeline_state = pipe_state
    if report:
        print(rep)
    return pipe


def _state_of(obj):
    state = getattr(obj, _STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{type(obj).__name__} was not optimized by fastdiff.optimize (or was reverted)")
    return state


def optimization_report(pipe) -> OptimizeReport:
    """The :class:`OptimizeReport` of an optimized pipeline or model."""
    state = _state_of(pipe)
    return state.report if isinstance(state, _PipelineState) else state.pipeline_state.report


def _revert_model(state: _ModelState, problems: List[str]) -> None:
    model = state.model_ref()
    if model is None:
        return
    if state.forward is not None:
        if model.__dict__.get("forward") is state.forward:
            del model.forward
        else:
            problems.append(f"{state.name}.forward was replaced again after optimize; left as it is")
        state.runner.release()
    for attn, original, new in reversed(state.processors):
        if attn.get_processor() is new:
            attn.set_processor(original)
        else:
            problems.append(f"{state.name}: an attention processor was changed after optimize; left as it is")
    for parent, attr, original, new in reversed(state.modules):
        if parent._modules.get(attr) is not new:
            problems.append(f"{state.name}.{attr}: replaced again after optimize; left as it is")
            continue
        if isinstance(new, OptimizedGroupNorm):
            # keep whatever Parameters the swapped module holds now (load_state_dict(assign=True), ...)
            original.weight = new.weight
            original.bias = new.bias
            original.train(new.training)
        setattr(parent, attr, original)
    delattr(model, _STATE_ATTR)


def revert(pipe):
    """Undo :func:`optimize` on ``pipe``: the original GroupNorm and SiLU modules (holding the current
    Parameters), attention processors and scheduler, and no graphs. Returns ``pipe``.

    Raises ValueError if ``pipe`` is not optimized, and RuntimeError listing what could not be
    restored because it was replaced again after ``optimize`` (everything else is restored)."""
    state = _state_of(pipe)
    problems: List[str] = []
    if isinstance(state, _ModelState):
        if state.in_pipeline:
            raise ValueError(
                f"revert: this {type(pipe).__name__} was optimized as part of a pipeline; call fastdiff.revert(pipe) on the pipeline"
            )
        _revert_model(state, problems)
    else:
        for model_state in state.models:
            _revert_model(model_state, problems)
        if state.scheduler is not None:
            original, new, entry = state.scheduler
            if pipe.scheduler is new:
                pipe.scheduler = original
                if entry is not None:
                    pipe.register_to_config(scheduler=entry)
            else:
                problems.append("scheduler: replaced after optimize; left as it is")
        delattr(pipe, _STATE_ATTR)
    if problems:
        raise RuntimeError("fastdiff.revert restored everything except:\n  " + "\n  ".join(problems))
    return pipe
