"""Attributes of every loss network, computed from the models (not typed in).

One row per loss network (``arch``, ``layer``; ``layer`` "1".."4" or "lpips") in
``results/lossnets.parquet``. The models are built with
``workflow.lossnets.load_backbone(arch, "random")`` on PyTorch's ``meta`` device:
structure, shapes, parameter counts and FLOPs do not depend on the weight
values, and a meta model costs no memory or compute (efficientnet_b7 and the
VGGs would otherwise dominate the run time).

How each attribute is computed (``docs/analysis.md`` says the same for readers):

- ``layer_index``: the study's extraction layer 1..4 (<NA> for an LPIPS set);
  ``child_index``: the tap, the child of ``model.features`` or of the model
  (for an LPIPS set: its last tap; ``taps`` lists all).
- ``depth_pct`` / ``conv_depth_pct``: leaf modules (resp. ``Conv2d`` modules) in
  the children up to and including the tap, as % of those of the whole model.
  The auxiliary classifier heads of GoogLeNet / Inception-v3 are not part of the
  forward pass and are excluded everywhere.
- ``params_to_tap`` / ``params_total`` / ``params_pct``: parameters of the
  children up to the tap, of the whole model (without auxiliary heads), share %.
- ``channels``: channels at the tap (summed over the taps of an LPIPS set);
  ``features_<S>``: C*H*W at the tap(s) for an S x S input.
- ``flops_<S>`` / ``flops_total_<S>`` / ``flops_pct_<S>``: FLOPs of the forward
  pass up to the tap and of the whole model's forward pass for one S x S image,
  counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per
  multiply-accumulate of convolutions and matrix products; element-wise ops,
  pooling and normalisation are not counted). Where the full pass cannot run at
  that size (Inception-v3 needs at least 75 px) the total is NaN and the share is the
  share at the smallest size the full pass runs (``smallest_full_pass``).
- ``macs_<S>`` / ``macs_total_<S>``: the same work in multiply-accumulates (half the
  FLOPs): the unit the thesis's "MFLOPS" figures count, so its log10 cost axis is this
  one (log10 FLOPs sits log10 2 = 0.30 higher).
- ``receptive_field``: analytic, by propagating (size, jump) through the module
  graph traced with ``torch.fx``: a convolution or pooling with kernel k,
  stride s, dilation d maps ``rf -> rf + (k-1)*d*jump``, ``jump -> jump*s``, per
  spatial axis; where branches merge (add, concatenate) the maximum over the
  branches is taken. Global gates (squeeze-and-excitation: a globally pooled
  branch that multiplies the features) are left out, as they would make every
  EfficientNet tap "global"; ``global_context`` flags them instead. The value is
  the larger of the two axes, in input pixels, ignoring padding/borders.
- ``matmul_depth``: convolutions + linear layers on the longest path from the
  input to the tap (the same graph walk; the SE branch counts, it is a path).
- ``skip_connections``: an addition of two tensors (residual blocks), or a
  concatenation where one operand is an ancestor of another (DenseNet), up to
  the tap. ``branching``: a concatenation of parallel paths, none an ancestor
  of another (Inception modules, SqueezeNet Fire modules). ``conv1x1``: a 1x1
  ``Conv2d`` up to the tap; ``batch_norm``: a ``BatchNorm2d`` up to the tap.
  All four come from inspecting the traced graph and modules; no flag is declared.
- ``imagenet_acc1``: top-1 accuracy of the IMAGENET1K_V1 weights from torchvision's
  weights metadata (``workflow.lossnets.imagenet_acc1``); for the node-name kind, of the
  weights enum member its row names (NaN where a custom entry names none, and for the
  self-supervised presets, which are not classifiers).
- ``self_supervised``: the loss network was pretrained without labels (the table's flag;
  False for every torchvision classifier, True for the timm presets of ``SSL_PRESETS``).

The node-name kind (presets, ``lossnets.custom``; :func:`node_attributes`): ``child_index``
is <NA>, ``taps`` the module path, ``container`` ``nodes``. "Up to the tap" means the
modules in ``named_modules`` order up to the end of the tap's subtree (the order torchvision
defines and runs them): their leaves, convolutions and parameters (a ViT's class token and
position embedding included). FLOPs and shapes come from one pass of the extractor's input
(resized to the spec's ``input_size`` where it has one, so ``flops_<S>`` of vit_b_16 is the
224 px pass for every S) with a hook on the tap. The graph walk (receptive field, matmul
depth, skips, branching, global context) runs through the nested children that lead to the
tap, for the ``nchw`` CNNs (a ``Linear`` there is a per-pixel channel mix, as in ConvNeXt);
for the transformers (``nhwc``/``tokens`` layouts, MaxViT's grid attention) attention mixes
positions and the receptive field is NaN (not defined), the walk's flags <NA>.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from workflow.archs import NodeSpec, is_node_arch, known_archs
from workflow.files import write_parquet
from workflow.lossnets import (
    LossNet,
    all_lossnets,
    arch_spec,
    imagenet_acc1,
    load_backbone,
    weights_enum,
)

# Training-only heads: never run in eval mode, so not part of any forward pass.
AUX_HEADS = ("aux1", "aux2", "AuxLogits")

_ADD_OPS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_MUL_OPS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_CAT_OPS = {torch.cat, torch.concat}
_POOL_FNS = {F.max_pool2d, F.avg_pool2d, torch.max_pool2d, torch._C._nn.avg_pool2d}
_GLOBAL_FNS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.linear}


def build_meta_model(arch: str) -> nn.Module:
    """The torchvision model with random (torchvision) initialisation, on the meta device."""
    with torch.device("meta"):
        return load_backbone(arch, "random")


def container_children(model: nn.Module, arch: str) -> list[nn.Module]:
    spec = arch_spec(arch)
    return list((model.features if spec.container == "features" else model).children())


def _without_aux(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if not any(n == a or n.startswith(a + ".") for a in AUX_HEADS)]


def _leaves(modules: Iterable[nn.Module]) -> list[nn.Module]:
    return [m for m in modules if next(m.children(), None) is None]


def count_params(modules: Iterable[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


# ----------------------------------------------------------------------------- graph walk


@dataclass
class _Flow:
    """What reaches one tensor of the traced graph."""

    rf: tuple[int, int] = (1, 1)  # receptive field (rows, cols), input pixels
    jump: tuple[int, int] = (1, 1)  # distance in input pixels between adjacent units
    glob: bool = False  # depends on a global pooling / linear layer
    matmuls: int = 0  # longest path, in conv + linear layers
    ancestors: int = 0  # bitset of graph nodes upstream (within one child)


@dataclass
class GraphFacts:
    """The result of walking one child (or a chain of children)."""

    flow: _Flow = field(default_factory=_Flow)
    skip: bool = False
    branching: bool = False
    global_context: bool = False


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _window(f: _Flow, kernel, stride, dilation=1) -> _Flow:
    k, s, d = _pair(kernel), _pair(stride if stride is not None else kernel), _pair(dilation)
    rf = tuple(f.rf[i] + (k[i] - 1) * d[i] * f.jump[i] for i in range(2))
    jump = tuple(f.jump[i] * s[i] for i in range(2))
    return _Flow(rf, jump, f.glob, f.matmuls, f.ancestors)  # type: ignore[arg-type]


def _fn_arg(node: fx.Node, pos: int, name: str, default=None):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def walk_child(child: nn.Module, facts: GraphFacts, pointwise_linear: bool = False
               ) -> GraphFacts:
    """Propagate ``facts`` through one child module, traced with torch.fx (``pointwise_linear``:
    a ``Linear`` mixes channels at each position, not the whole map)."""
    gm = fx.symbolic_trace(nn.Sequential(child))  # the wrapper keeps the child a call_module
    flows: dict[fx.Node, _Flow] = {}
    bit: dict[fx.Node, int] = {}
    skip, branching, global_context = facts.skip, facts.branching, facts.global_context
    out = facts.flow
    for i, node in enumerate(gm.graph.nodes):
        bit[node] = 1 << i
        if node.op == "placeholder":
            f = facts.flow
            flows[node] = _Flow(f.rf, f.jump, f.glob, f.matmuls, 0)
            continue
        if node.op == "output":
            out = flows[node.all_input_nodes[0]]
            break
        ins = [n for n in node.all_input_nodes if n in flows]
        if not ins:  # constants, parameters
            continue
        target = node.target
        if node.op == "call_module":
            target = type(gm.get_submodule(node.target))
        ancestors = 0
        for n in ins:
            ancestors |= flows[n].ancestors | bit[n]
        matmuls = max(flows[n].matmuls for n in ins)
        kept = ins
        if target in _MUL_OPS and len(ins) > 1:
            # a global gate (squeeze-and-excitation) scales the features but has no
            # spatial extent of its own: keep the local operand(s) for the receptive field
            local = [n for n in ins if not flows[n].glob]
            if local and len(local) < len(ins):
                global_context = True
                kept = local
        base = _Flow(
            tuple(max(flows[n].rf[a] for n in kept) for a in range(2)),  # type: ignore[arg-type]
            tuple(max(flows[n].jump[a] for n in kept) for a in range(2)),  # type: ignore[arg-type]
            all(flows[n].glob for n in kept), matmuls, ancestors,
        )
        if len(ins) > 1 and target in _ADD_OPS:
            skip = True
        if len(ins) > 1 and target in _CAT_OPS:
            nested = any(flows[b].ancestors & bit[a] for a in ins for b in ins if a is not b)
            skip, branching = skip or nested, branching or not nested
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.Conv2d):
                base = _window(base, mod.kernel_size, mod.stride, mod.dilation)
                base.matmuls += 1
            elif isinstance(mod, nn.Linear):
                base.glob, base.matmuls = base.glob or not pointwise_linear, base.matmuls + 1
            elif isinstance(mod, nn.MaxPool2d):
                base = _window(base, mod.kernel_size, mod.stride, mod.dilation)
            elif isinstance(mod, nn.AvgPool2d):
                base = _window(base, mod.kernel_size, mod.stride)
            elif isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                base.glob = True
            elif isinstance(mod, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)):
                raise NotImplementedError(f"receptive field of {type(mod).__name__}")
        elif node.op == "call_function" and target in _POOL_FNS:
            kernel = _fn_arg(node, 1, "kernel_size")
            stride = _fn_arg(node, 2, "stride") or kernel
            pooled = target in (F.max_pool2d, torch.max_pool2d)
            dilation = _fn_arg(node, 4, "dilation", 1) if pooled else 1
            base = _window(base, kernel, stride, dilation)
        elif node.op == "call_function" and target in _GLOBAL_FNS:
            base.glob = True
        flows[node] = base
    return GraphFacts(out, skip, branching, global_context)


# ----------------------------------------------------------------------------- FLOPs


def flops_at(model: nn.Module, x: torch.Tensor, taps: Mapping[Any, nn.Module],
             shape: Callable[[Any], tuple] = lambda out: tuple(out.shape)
             ) -> tuple[dict[Any, float], dict[Any, tuple], float]:
    """One no-grad pass of ``model`` on ``x`` under FlopCounterMode: for each of ``taps``
    (key -> module) the FLOPs counted when it returns and ``shape`` of its output, and the
    whole pass's FLOPs (NaN, and only the taps reached, where the pass fails at this size)."""
    at: dict[Any, float] = {}
    shapes: dict[Any, tuple] = {}
    with FlopCounterMode(display=False) as counter:
        def hook(key):
            def record(_m, _inp, out):
                at[key] = float(counter.get_total_flops())
                shapes[key] = shape(out)
            return record

        handles = [m.register_forward_hook(hook(k)) for k, m in taps.items()]
        try:
            with torch.no_grad():
                model(x)
            total = float(counter.get_total_flops())
        except RuntimeError:
            total = math.nan
        finally:
            for h in handles:
                h.remove()
    return at, shapes, total


def flops_per_child(model: nn.Module, arch: str, size: int
                    ) -> tuple[list[float], list[tuple], float]:
    """Cumulative FLOPs after each container child, their output shapes, and the full pass.

    One forward pass of the whole model (eval mode, batch 1) under FlopCounterMode;
    forward hooks on the container's children read the running total. Where the
    whole model cannot run at ``size`` the children are run alone up to the last
    one that can, and the total is NaN.
    """
    children = container_children(model, arch)
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, size, size, device=device)
    at, at_shapes, total = flops_at(model, x, dict(enumerate(children)))
    cumulative = [at.get(i, math.nan) for i in range(len(children))]
    shapes = [at_shapes.get(i, ()) for i in range(len(children))]
    if math.isnan(total):
        # the full pass failed at this size: recount the children alone, in order
        cumulative = [math.nan] * len(children)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            h = x
            for i, c in enumerate(children):
                try:
                    h = c(h)
                except RuntimeError:
                    break
                cumulative[i] = float(counter.get_total_flops())
                shapes[i] = tuple(h.shape)
    return cumulative, shapes, total


def smallest_full_pass(model: nn.Module, arch: str, size: int, limit: int = 512) -> int | None:
    """The smallest side above ``size`` (up to ``limit``) at which the whole model's forward
    pass runs (Inception-v3: 75), or None."""
    for side in range(size + 1, limit + 1):
        if not math.isnan(flops_per_child(model, arch, side)[2]):
            return side
    return None


def count_flops(module: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of ``module(x)`` as torch.utils.flop_counter counts them."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- table


def arch_attributes(arch: str, nets: Sequence[LossNet], sizes: Sequence[int]) -> list[dict]:
    """Attribute rows for the loss networks ``nets`` of one architecture."""
    model = build_meta_model(arch)
    spec = arch_spec(arch)
    children = container_children(model, arch)
    whole = [m for _, m in _without_aux(model)]
    leaves_total = len(_leaves(whole))
    convs_total = sum(isinstance(m, nn.Conv2d) for m in whole)
    params_total = count_params(whole)
    acc1 = imagenet_acc1(arch)
    last = max(max(n.taps) for n in nets)

    # per child: the graph walk and the module counts, cumulated
    facts, per_child = GraphFacts(), []
    leaves = convs = params = 0
    conv1x1 = bn = False
    for c in children[: last + 1]:
        facts = walk_child(c, facts)
        mods = list(c.modules())
        leaves += len(_leaves(mods))
        convs += sum(isinstance(m, nn.Conv2d) for m in mods)
        params += count_params(mods)
        conv1x1 = conv1x1 or any(isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)
                                 for m in mods)
        bn = bn or any(isinstance(m, nn.BatchNorm2d) for m in mods)
        per_child.append((facts, leaves, convs, params, conv1x1, bn))
    flops = {s: flops_per_child(model, arch, s) for s in sizes}
    # where the full pass cannot run at S, the share is taken at the smallest side it runs
    share_at = {s: s if not math.isnan(flops[s][2]) else smallest_full_pass(model, arch, s)
                for s in sizes}
    shares = {s: flops[s] if share_at[s] in (s, None) else flops_per_child(model, arch, share_at[s])
              for s in sizes}

    rows = []
    for net in nets:
        tap = max(net.taps)
        f, leaves, convs, params, c1, b = per_child[tap]
        rf = max(f.flow.rf) if not f.flow.glob else math.inf
        row = {
            "lossnet": net.id, "arch": arch, "layer": net.layer,
            "layer_index": int(net.layer) if net.layer != "lpips" else pd.NA,
            "layer_name": spec.layer_names[int(net.layer) - 1] if net.layer != "lpips" else "lpips",
            "child_index": tap, "taps": ",".join(map(str, net.taps)), "container": spec.container,
            "depth_pct": 100.0 * leaves / leaves_total,
            "conv_depth_pct": 100.0 * convs / convs_total,
            "params_to_tap": params, "params_total": params_total,
            "params_pct": 100.0 * params / params_total,
            "receptive_field": float(rf), "matmul_depth": f.flow.matmuls,
            "skip_connections": f.skip, "branching": f.branching,
            "conv1x1": c1, "batch_norm": b, "global_context": f.global_context,
            "imagenet_acc1": acc1,
        }
        # channels do not depend on the size; the largest input is the likeliest to reach every tap
        row["channels"] = sum(flops[sizes[-1]][1][t][1] for t in net.taps) if sizes else pd.NA
        for s in sizes:
            cum, shapes, total = flops[s]
            feats = [math.prod(shapes[t][1:]) if shapes[t] else math.nan for t in net.taps]
            row[f"features_{s}"] = float(sum(feats))
            row[f"flops_{s}"] = cum[tap]
            row[f"flops_total_{s}"] = total
            row[f"flops_pct_{s}"] = 100.0 * shares[s][0][tap] / shares[s][2]
            row[f"macs_{s}"] = cum[tap] / 2  # FlopCounterMode: 2 FLOPs per multiply-add
            row[f"macs_total_{s}"] = total / 2
        rows.append(row)
    return rows


def _node_acc1(arch: str) -> float:
    try:
        return float(weights_enum(arch).meta["_metrics"]["ImageNet-1K"]["acc@1"])
    except Exception:  # a custom entry without (a known) weights enum member
        return math.nan


def _tap_path(model: nn.Module, tap: str) -> list[nn.Module]:
    """The chain of children from the model to the tap, each step's earlier siblings first:
    the modules the walk passes through when every parent on the way is sequential."""
    chain, parent, prefix = [], model, ""
    for part in tap.split("."):
        names = [n for n, _ in parent.named_children()]
        if part not in names:
            raise NotImplementedError(tap)
        chain += [getattr(parent, n) for n in names[: names.index(part)]]
        parent, prefix = getattr(parent, part), f"{prefix}{part}."
    return [*chain, parent]


def _up_to(model: nn.Module, tap: str) -> list[nn.Module]:
    """The modules up to the end of ``tap``'s subtree, in named_modules order."""
    named = list(model.named_modules())
    end = max(i for i, (n, _) in enumerate(named) if n == tap or n.startswith(tap + "."))
    return [m for _, m in named[: end + 1]]


def node_attributes(arch: str, nets: Sequence[LossNet], sizes: Sequence[int]) -> list[dict]:
    """Attribute rows for loss networks of the node-name kind (see the module docstring)."""
    from workflow.lossnets import fold_tap

    spec: NodeSpec = arch_spec(arch)  # type: ignore[assignment]
    dev = "cpu" if spec.builder.startswith("regnet") else "meta"  # regnet computes its widths
    with torch.device(dev):
        model = load_backbone(arch, "random").eval()
    whole = list(model.modules())
    leaves_total, params_total = len(_leaves(whole)), count_params(whole)
    convs_total = sum(isinstance(m, nn.Conv2d) for m in whole)
    acc1 = _node_acc1(arch)
    modules = dict(model.named_modules())
    attention = spec.layout != "nchw" or spec.builder.startswith("maxvit")

    def flops(size: int) -> tuple[dict[str, float], dict[str, tuple], float]:
        side = spec.input_size or size
        x = torch.zeros(1, 3, side, side, device=dev)
        return flops_at(model, x, {n.taps[0]: modules[n.taps[0]] for n in nets},
                        lambda out: tuple(fold_tap(out, spec.layout, spec.prefix_tokens).shape))

    counted = {s: flops(s) for s in sizes}
    rows = []
    for net in nets:
        tap = net.taps[0]
        upto = _up_to(model, tap)
        facts: GraphFacts | None = None
        if not attention:
            try:
                facts = GraphFacts()
                for c in _tap_path(model, tap):
                    facts = walk_child(c, facts, pointwise_linear=True)
            except Exception:  # not traceable, or a parent that is not sequential
                facts = None
        params = count_params(upto)
        rf = (math.nan if facts is None
              else float(max(facts.flow.rf)) if not facts.flow.glob else math.inf)
        na = pd.NA
        row = {
            "lossnet": net.id, "arch": arch, "layer": net.layer,
            "layer_index": int(net.layer), "layer_name": tap,
            "child_index": na, "taps": tap, "container": "nodes",
            "depth_pct": 100.0 * len(_leaves(upto)) / leaves_total,
            "conv_depth_pct": (100.0 * sum(isinstance(m, nn.Conv2d) for m in upto) / convs_total
                               if convs_total else math.nan),
            "params_to_tap": params, "params_total": params_total,
            "params_pct": 100.0 * params / params_total,
            "receptive_field": rf,
            "matmul_depth": facts.flow.matmuls if facts else na,
            "skip_connections": facts.skip if facts else na,
            "branching": facts.branching if facts else na,
            "conv1x1": any(isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)
                           for m in upto),
            "batch_norm": any(isinstance(m, nn.BatchNorm2d) for m in upto),
            "global_context": facts.global_context if facts else na,
            "imagenet_acc1": acc1, "self_supervised": spec.self_supervised,
        }
        shape = counted[sizes[-1]][1].get(tap) if sizes else None
        row["channels"] = shape[1] if shape else na
        for s in sizes:
            at, shapes, total = counted[s]
            cum = at.get(tap, math.nan)
            row[f"features_{s}"] = float(math.prod(shapes[tap][1:])) if tap in shapes \
                else math.nan
            row[f"flops_{s}"] = cum
            row[f"flops_total_{s}"] = total
            row[f"flops_pct_{s}"] = 100.0 * cum / total
            row[f"macs_{s}"] = cum / 2
            row[f"macs_total_{s}"] = total / 2
        rows.append(row)
    return rows


def lossnet_attributes(
    archs: Sequence[str], layers: Sequence[str | int], lpips_sets: Sequence[str],
    sizes: Sequence[int], extra: Sequence[str] = (),
) -> pd.DataFrame:
    """The attribute table of every loss network of the grid (+ LPIPS sets, + the ``extra``
    loss network ids that benchmarks use outside the grid)."""
    sizes = sorted({int(s) for s in sizes})
    nets = all_lossnets(archs, [str(x) for x in layers], lpips_sets)
    nets = list(dict.fromkeys([*nets, *(LossNet.parse(str(i)) for i in extra)]))
    nets = [n for n in nets if not n.is_pixel]
    rows: list[dict] = []
    for arch in dict.fromkeys([n.arch for n in nets]):
        mine = [n for n in nets if n.arch == arch]
        if is_node_arch(arch):
            rows += node_attributes(arch, mine, sizes)
        else:
            rows += [{**r, "self_supervised": False} for r in arch_attributes(arch, mine, sizes)]
    df = pd.DataFrame(rows)
    df["layer_index"] = df["layer_index"].astype("Int64")
    for c in ("child_index", "matmul_depth", "channels"):  # nullable only where NA occurs
        df[c] = df[c].astype("Int64") if df[c].isna().any() else df[c].astype("int64")
    for c in ("skip_connections", "branching", "global_context", "conv1x1", "batch_norm",
              "self_supervised"):
        df[c] = df[c].astype("boolean") if df[c].isna().any() else df[c].astype(bool)
    for c in ("arch", "layer", "lossnet", "layer_name", "taps", "container"):
        df[c] = df[c].astype("string")
    return df


def write_attributes(config: Mapping[str, Any], out: str | Path) -> pd.DataFrame:
    """``lossnets.parquet`` of the grid ``config["lossnets"]`` (archs, layers, lpips_sets) at
    the input sizes ``config["sizes"]`` (config ``analysis.input_sizes``)."""
    from workflow.archs import register_custom

    ln, sizes = config["lossnets"], [int(s) for s in config["sizes"]]
    register_custom(ln.get("custom"))
    unknown = [a for a in ln["archs"] if a not in known_archs()]
    if unknown:
        raise AttributeConfigError(f"config key lossnets.archs: unknown architectures {unknown}; "
                                   f"known: {known_archs()}")
    bad = [s for s in sizes if s < 16]
    if bad:
        raise AttributeConfigError(f"config key analysis.input_sizes: sizes {bad} are too small "
                                   f"(use >= 16 px)")
    df = lossnet_attributes(ln["archs"], ln["layers"], ln.get("lpips_sets", []), sizes,
                            ln.get("extra", []))
    write_parquet(df, out)
    print(f"{out}: {len(df)} loss networks, {len(df.columns)} attributes")
    return df


class AttributeConfigError(ValueError):
    """A loss-network grid or input size the attributes cannot be computed for."""
