import torch
from parallel.mesh import MeshDims, init_parallel
from parallel.tensor_parallel import apply_tensor_parallel
from models.dit import DiT, DiTConfig

CFG = DiTConfig(width=32, depth=2, heads=4, ffn_dim=48, in_channels=4, max_patches_t=4, max_patches_h=4, max_patches_w=4)

def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 6, 4, generator=g)  # 3*3*2=18 tokens
    t = torch.rand(2, generator=g)
    ctx = torch.randn(2, 5, 32, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool); mask[1, 3:] = False
    return x, t, ctx, mask

def reference():
    torch.manual_seed(0)
    m = DiT(CFG); m.init_weights()
    # make zero-inits non-zero so gradients flow everywhere
    with torch.no_grad():
        for p in m.parameters(): p.add_(0.01 * torch.randn_like(p))
    return m

def probe():
    ctx = init_parallel(MeshDims(dp_shard=1, tp=2))
    ref = reference()
    with torch.device("meta"):
        m = DiT(CFG)
    apply_tensor_parallel(m, ctx.submesh("tp"))
    m.to_empty(device="cpu")
    from torch.distributed.tensor import distribute_tensor, DTensor
    with torch.no_grad():
        sd = ref.state_dict()
        for n, p in m.named_parameters():
            p.copy_(distribute_tensor(sd[n], p.device_mesh, p.placements))
    x, t, c, mask = inputs()
    out = m(x, t, c, mask)
    out_ref = ref(x, t, c, mask)
    out.square().mean().backward(); out_ref.square().mean().backward()
    errs = {"out": ((out - out_ref).norm() / out_ref.norm()).item()}
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        errs[n] = ((g - q.grad).norm() / (q.grad.norm() + 1e-30)).item()
    return errs
