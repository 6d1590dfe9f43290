"""Under Triton's CPU interpreter (TRITON_INTERPRET=1): a compiled DiG GLA layer with backend "triton" keeps the
kernel inside one graph (no graph break) and computes what the eager layer computes, without and with a token
order, and with q, k, v and the output gate packed in one tensor (packed_projections: what the separate
projections compute); and a small DiG compiled as training compiles it (`compile_blocks`) saves its heads-split
tensors for backward in the layout the kernels take (strides of every saved [N, T, H, head_dim] tensor). Prints a
JSON report."""
import json
import os

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
from dig.models.dig import DiG, GatedLinearAttention  # noqa: E402

torch.manual_seed(0)
layer = GatedLinearAttention(64, 2, backend="triton", packed_projections=False)  # four GEMMs
packed = GatedLinearAttention(64, 2, backend="triton", packed_projections=True)  # q | k | v | gate: one GEMM
packed.load_state_dict(layer.state_dict())
x = torch.randn(2, 40, 64)
order = torch.randperm(40).to(torch.int32)
report = {}
outputs = {}
for name, layer, order in (("", layer, None), ("ordered_", layer, order),  # and with a token order
                           ("packed_ordered_", packed, order)):
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
        f"{name}ops": sorted({str(n.target) for g in explained.graphs for n in g.graph.nodes
                              if "dig" in str(n.target)}),
    })
    outputs[name] = (eager.detach(), eager_x.grad)
report["packed_vs_separate_rel"] = [((a - b).norm() / b.norm()).item()
                                    for a, b in zip(outputs["packed_ordered_"], outputs["ordered_"])]

torch._dynamo.reset()
model = DiG(depth=2, hidden_size=64, num_heads=2, patch_size=2, input_size=8, num_classes=10, gla_backend="triton")
model.compile_blocks()
saved = []


def pack(tensor):
    heads_split = tensor.dim() == 4 and tensor.shape[0] == 2 and tensor.shape[2] == model.num_heads  # [N, T, H, hd]
    packed = tensor.dim() == 3 and tensor.shape[0] == 2 and tensor.shape[2] == 3 * 64  # [N, T, 2HK + 2HV] q|k|v|gate
    if heads_split or packed:
        saved.append({"shape": list(tensor.shape), "stride": list(tensor.stride())})
    return tensor


with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([3, 7]))
out.square().sum().backward()
report["block_saved_heads"] = saved
print(json.dumps(report))
