"""GPU diagnostic: shared memory of the block-sparse kernel at head_dim 256 per tile config, and each block-sparse
prefill policy's plan + Triton run at Gemma-3-270M's attention shape (4 query heads, 1 KV head, head_dim 256)."""
import sys
import traceback

import torch

sys.path.insert(0, ".")
from accel.kernels.reference_sparse import build_block_layout, causal_block_mask  # noqa: E402
from accel.kernels.triton import block_sparse as bsm  # noqa: E402

S, D = 8192, 256
q = torch.randn(1, 4, S, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 1, S, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
causal, _ = causal_block_mask(S, S, 128, 128, device="cuda")
lay = build_block_layout(causal.expand(1, 4, *causal.shape), S, S, 128, 128)
print("ascending", lay.ascending, "default", bsm._default_config(q, 128, 128))
for cfg in (None, dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1, edge_stages=1),
            dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1, edge_stages=1),
            dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2, edge_stages=1),
            dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2, edge_stages=1)):
    try:
        out = bsm.block_sparse_attention(q, k, v, lay, config=cfg)
        torch.cuda.synchronize()
        try:
            kern = list(bsm._block_sparse_fwd.device_caches[0][0].values())[-1]
            shared = kern.metadata.shared
        except Exception:  # noqa: BLE001 - triton internals differ between versions
            shared = "?"
        print("cfg", cfg, "ok, shared", shared)
    except Exception as e:  # noqa: BLE001
        print("cfg", cfg, "FAILED", type(e).__name__, str(e)[:160])
import accel  # noqa: E402
from accel.policies import AttentionContext  # noqa: E402
from accel.kernels.triton import TritonBackend  # noqa: E402

for name in ("xattention", "flexprefill", "proxy", "vertical_slash"):
    pol = accel.parse_policy(name).prefill
    try:
        ctx = AttentionContext(layer_idx=5, phase="prefill", sliding_window=None, cache_layer=None, cache=None,
                               kv_start=None, scale=D**-0.5, softcap=None)
        layout = pol.plan(q, k, ctx)
        TritonBackend().run(layout, q, k, v, scale=D**-0.5, softcap=None, kv_start=None)
        torch.cuda.synchronize()
        print(name, "ok", type(layout).__name__)
    except Exception:  # noqa: BLE001
        print(name, "FAILED")
        traceback.print_exc(limit=-4)
