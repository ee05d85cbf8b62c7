"""The command-line flags that pick KV-cache policies and kernels, the same in every command.

    add_policy_flags(parser, default)  --kv and its tuning flags: every command that runs a policy
    add_kernels_flag(parser)           --kernels: only the commands that decode through a cache
                                       (generate, bench, eval.longctx); scoring goes through the
                                       exact teacher-forced path, which runs no kernel
    policies_from_flags(args), policy_from_flags(args)   the policies of --kv (nothing compiled)
    kernels_from_flags(args)           --kernels resolved for this machine (kvjax.kernels.resolve)
    add_weights_flag(parser), weights_from_flags(args)   --weights: every command that loads a model
                                       (kvjax.weights.resolve: how its matrices are held and multiplied)
    add_devices_flag(parser), mesh_from_flags(args)      --devices: every command that runs a batch
                                       (kvjax.sharding: the mesh its rows are split over)

A command checks its flags in this order, so that bad input is refused before anything slow
happens: the policies, its own numbers and files, then `kernels_from_flags` and `weights_from_flags`
(on a CPU, `auto` builds the C++ kernels the first time, about 30 s), then it loads the model.
"""

from __future__ import annotations

from kvjax import cli, kernels, sharding, weights
from kvjax.errors import KvjaxError
from kvjax.layout import DEFAULT_GROUP, DEFAULT_SINKS, DEFAULT_WINDOW
from kvjax.policies import ALIASES, REGISTRY, Policy, family_of, get_policy
from kvjax.rotation import SUFFIXES

SUGGESTED = "learned-alloc@2.5"  # the policy to try for memory: near-FP16 perplexity (README's results table)


def policy_help() -> str:
    """--kv's help: every registered policy, its budget if it takes one, and the aliases."""
    lines = [f"{f.name}{'@BITS' if f.budget == 'required' else ''}: {f.help}" for f in REGISTRY.values()]
    aliases = ", ".join(f"{a} = {t}" for a, t in ALIASES.items()) + ", mixed@BITS = mixed-static@BITS"
    return (f"KV-cache policy (comma-separated where several are run); to save memory, try {SUGGESTED}. "
            + "; ".join(lines) + f". Aliases: {aliases}. A quantized policy + {' / '.join(SUFFIXES)} stores its "
            "keys and values / keys / values Hadamard-rotated (kivi2+rot)")


def add_policy_flags(parser, default: str = "fp16"):
    """The flags that pick and tune KV-cache policies (see `policies_from_flags`)."""
    parser.add_argument("--kv", default=default, help=policy_help())
    parser.add_argument("--window", "--residual", dest="window", type=int, default=None,
                        help=f"16-bit window W (KIVI's residual R) of the quantized policies (default {DEFAULT_WINDOW})")
    parser.add_argument("--group-size", type=int, default=None,
                        help=f"quantization group size G of the quantized policies (default {DEFAULT_GROUP})")
    parser.add_argument("--sinks", type=int, default=None,
                        help=f"attention-sink tokens kept in 16 bits (default {DEFAULT_SINKS}; 0 for kivi)")
    parser.add_argument("--controller", default=None,
                        help="mixed-learned/-random: a controller file (default: the one shipped for the budget)")
    parser.add_argument("--allocation", default=None,
                        help="learned-alloc: an allocation file (default: the one shipped for the budget)")


def add_kernels_flag(parser):
    """--kernels, for the commands that decode through a cache (see `kernels_from_flags`)."""
    parser.add_argument("--kernels", default="auto", choices=[k.value for k in kernels.Kernels],
                        help="how packed tiers are attended: Pallas kernels, the C++ CPU kernel (native) or "
                             "the jnp/XLA reference (auto: Pallas on GPU, native on a CPU)")


def add_weights_flag(parser):
    """--weights, for every command that loads a model (see `weights_from_flags`)."""
    parser.add_argument("--weights", default="auto", choices=[w.value for w in weights.Weights],
                        help="how the model's matrices are held: float32 (dequantized at load), native (a GGUF's "
                             "Q4_0/Q4_1/Q8_0 blocks kept and multiplied in place: the same values), q8_0 (native, "
                             "the other matrices quantized to Q8_0) (auto: native on a CPU, float32 elsewhere)")


def policies_from_flags(args) -> list[Policy]:
    """The policies of --kv (comma-separated); the tuning flags apply to the quantized ones."""
    names = [n.strip() for n in args.kv.split(",") if n.strip()]
    if not names:
        raise KvjaxError("--kv needs at least one policy")
    tuned = {"window": args.window, "sinks": args.sinks, "group_size": args.group_size}
    if names == ["fp16"] and (any(v is not None for v in tuned.values()) or args.controller or args.allocation):
        raise KvjaxError("--window/--group-size/--sinks/--controller/--allocation need a quantized --kv")
    out = []
    for name in names:
        family = family_of(name)
        if family.name == "fp16":
            out.append(get_policy(name))
        else:
            out.append(get_policy(name, **tuned, controller=args.controller if family.takes_controller else None,
                                  allocation=args.allocation if family.takes_allocation else None))
    if args.controller and not any(family_of(n).takes_controller for n in names):
        raise KvjaxError("--controller applies to mixed-learned and mixed-random policies")
    if args.allocation and not any(family_of(n).takes_allocation for n in names):
        raise KvjaxError("--allocation applies to learned-alloc policies")
    return out


def policy_from_flags(args) -> Policy:
    """The one policy of --kv."""
    policies = policies_from_flags(args)
    if len(policies) > 1:
        raise KvjaxError(f"--kv takes one policy here, got {args.kv!r}")
    return policies[0]


def kernels_from_flags(args) -> kernels.Backend:
    """--kernels resolved for this machine, whatever the policy (fp16 too): a choice it cannot run
    (pallas on a CPU, native elsewhere or without a C++ compiler) is one KvjaxError here. Pass the
    result to `make_cache` / `generate`. On a CPU, `auto` builds the C++ kernel on its first use."""
    return kernels.resolve(args.kernels)


def weights_from_flags(args, differentiable: bool = False) -> weights.Weights:
    """--weights resolved for this machine (auto decided; `differentiable`: for gradients through the
    model, kvjax.weights.resolve); pass it to `load_model`."""
    return weights.resolve(args.weights, differentiable=differentiable)


def add_devices_flag(parser):
    """--devices, for every command that runs a batch (see `mesh_from_flags`)."""
    parser.add_argument("--devices", default="all", type=cli.devices, metavar="N|all",
                        help="devices to split the batch over, the first N or all of them (default: all; on "
                             "several hosts, every host's)")


def mesh_from_flags(args):
    """--devices as the mesh a command splits its rows over (kvjax.sharding.make_mesh)."""
    return sharding.make_mesh(args.devices)
