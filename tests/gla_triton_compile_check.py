"""Under Triton's CPU interpreter (TRITON_INTERPRET=1): a compiled DiG GLA layer with backend "triton" keeps the
kernel inside one graph (no graph break) and computes what the eager layer computes, without and with a token
order. Prints a JSON report."""
import json
import os

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
from dig.models.dig import GatedLinearAttention  # noqa: E402

torch.manual_seed(0)
layer = GatedLinearAttention(64, 2, backend="triton")
x = torch.randn(2, 40, 64)
report = {}
for name, order in (("", None), ("ordered_", torch.randperm(40).to(torch.int32))):  # and with a token order
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(x, order)
    eager_x = x.clone().requires_grad_()
    eager = layer(eager_x, order)
    eager.square().sum().backward()
    compiled_layer = torch.compile(layer, fullgraph=True)
    compiled_x = x.clone().requires_grad_()
    compiled = compiled_layer(compiled_x, order)
    compiled.square().sum().backward()
    report.update({
        f"{name}graph_breaks": explained.graph_break_count, f"{name}graphs": explained.graph_count,
        f"{name}out_rel": ((compiled - eager).norm() / eager.norm()).item(),
        f"{name}grad_rel": ((compiled_x.grad - eager_x.grad).norm() / eager_x.grad.norm()).item(),
    })
print(json.dumps(report))
