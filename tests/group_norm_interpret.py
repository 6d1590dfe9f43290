"""Runs dig.ops.group_norm_triton under Triton's CPU interpreter: `TRITON_INTERPRET=1 python group_norm_interpret.py
IN OUT`.

IN holds a list of cases (x, num_groups, weight, bias, eps, silu, module settings). OUT receives a dict: "cases",
each case's output and whether the kernels took it; "compile", a report on torch.compile(fullgraph=True) of a small
function around the op; "opcheck", the failures torch.library.opcheck finds in the operator's registration;
"encoder", the tiny VAE's posterior through the fused norms against diffusers' own encode. A separate process:
Triton decides between interpreted and compiled kernels when the module is imported.
"""
import contextlib
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
import dig.ops.group_norm_triton as module  # noqa: E402

DEFAULTS = {"TILE": module.TILE, "STATS_PROGRAMS": module.STATS_PROGRAMS}


def run_case(case):
    for name, value in {**DEFAULTS, **case["settings"]}.items():
        setattr(module, name, value)
    x, weight, bias = case["x"], case["weight"], case["bias"]
    took_kernels = module.kernels_apply(x, case["groups"], weight, bias)
    y = module.group_norm_silu(x, case["groups"], weight, bias, case["eps"], case["silu"])
    layout = module._layout(x.shape[0], x[0, 0].numel(), x.shape[1])
    for name, value in DEFAULTS.items():
        setattr(module, name, value)
    return {"y": y, "kernels": took_kernels, "splits": layout[2], "tiles": layout[1]}


@contextlib.contextmanager
def counting_launches():
    """Counts the op's kernel launches (calls of module._launch) while held: yields a one-element list."""
    launches = [0]
    inner = module._launch

    def counted(*args):
        launches[0] += 1
        return inner(*args)

    module._launch = counted
    try:
        yield launches
    finally:
        module._launch = inner


def compile_report():
    """torch.compile(fullgraph=True) of elementwise ops around the op: one graph, no break, the kernels launched
    once, and the same values as eager."""
    def block(x, weight, bias):
        return module.group_norm_silu(x * 2, 8, weight, bias, 1e-6, True) + 1

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 6, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    weight, bias = 1 + 0.1 * torch.randn(32, generator=gen), torch.randn(32, generator=gen)
    explained = torch._dynamo.explain(block)(x, weight, bias)
    ops_in_graph = [str(n.target) for g in explained.graphs for n in g.graph.nodes if "dig" in str(n.target)]
    results = {}
    for name, fn in (("eager", block), ("compiled", torch.compile(block, fullgraph=True))):
        with counting_launches() as launches:
            results[name] = fn(x, weight, bias)
        results[f"{name}_launches"] = launches[0]
    diff = ((results["compiled"] - results["eager"]).norm() / results["eager"].norm()).item()
    return {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
            "ops_in_graph": ops_in_graph, "eager_launches": results["eager_launches"],
            "compiled_launches": results["compiled_launches"], "compiled_vs_eager": diff,
            "compiled_channels_last": results["compiled"].is_contiguous(memory_format=torch.channels_last)}


def opcheck_failures():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 4, generator=gen).contiguous(memory_format=torch.channels_last).bfloat16()
    weight, bias = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    failures = {}
    # channels-last rows (the kernels' layout) and NCHW (a layout the dispatcher never sends: the op computes a
    # channels-last copy and must still return the layout its fake implementation promises)
    for name, arg in (("channels-last", x), ("nchw", x.contiguous())):
        result = torch.library.opcheck(torch.ops.dig.group_norm_silu, (arg, weight, bias, 4, 1e-5, True))
        failures.update({f"{name}: {k}": str(v) for k, v in result.items() if v != "SUCCESS"})
    return failures


def encoder_report():
    """The tiny VAE's PosteriorEncoder with its norms fused (channels-last, float32) against diffusers' encode."""
    import warnings

    from dig.vae import PosteriorEncoder, encode, fuse_group_norms, load_vae

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = load_vae("config:tiny")
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    ref_mean, ref_std = encode(vae, images.double().float())
    posterior = PosteriorEncoder(load_vae("config:tiny")).to(memory_format=torch.channels_last)
    fused_with_silu = fuse_group_norms(posterior)
    kinds = sorted({type(m).__name__ for m in posterior.modules() if isinstance(m, torch.nn.GroupNorm)})
    with torch.no_grad(), counting_launches() as launched:
        mean, std = posterior(images.contiguous(memory_format=torch.channels_last))
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in posterior.modules())
    return {"mean": mean, "std": std, "ref_mean": ref_mean, "ref_std": ref_std, "fused_with_silu": fused_with_silu,
            "norm_kinds": kinds, "norms": norms, "kernel_calls": launched[0]}


def main(path_in, path_out):
    cases = torch.load(path_in)
    torch.save({"cases": [run_case(c) for c in cases], "compile": compile_report(), "opcheck": opcheck_failures(),
                "encoder": encoder_report()}, path_out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
