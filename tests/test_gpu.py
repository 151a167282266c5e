"""GPU checks of the patched models (skipped without CUDA): Triton backend against unpatched SDPA in bf16."""

import pytest
import torch

import accel
from conftest import FAMILIES, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _ids(length, batch=1):
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 128, (batch, length), generator=g).cuda()


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_dense_matches_unpatched_bf16(family):
    model = tiny_model(family).cuda().to(torch.bfloat16)
    x = _ids(500)
    with torch.no_grad():
        ref = model(x).logits.float()
        accel.patch(model, "dense", backend="triton")
        out = model(x).logits.float()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 2e-2, rel
    assert set(accel.stats(model)["backends_used"]) == {"triton"}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_triton_streaming_matches_reference(family):
    model = tiny_model(family).cuda()
    x = _ids(300)
    with torch.no_grad():
        accel.patch(model, "streaming", sink=16, window=64, backend="reference")
        ref = model.generate(x, max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_logits=True)
        accel.patch(model, "streaming", sink=16, window=64, backend="triton")
        out = model.generate(x, max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_logits=True)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=2e-3, rtol=2e-3)


def test_auto_picks_a_gpu_backend():
    model = tiny_model("llama").cuda()
    accel.patch(model, "streaming", sink=4, window=32)
    with torch.no_grad():
        model(_ids(100))
    used = accel.stats(model)["backends_used"]
    assert "reference" not in used and used


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("policy", ["quest", "quest-fused", "quest-max_norm", "tidal", "duo", "lserve", "lserve-mixed",
                                    "lserve-reuse"])
def test_static_cache_compiled_matches_dynamic(family, policy, tmp_path, monkeypatch):
    """On the GPU, generate with a static cache compiles the decode step by itself (reduce-overhead: CUDA graphs);
    the Triton static decode (Quest's op, TidalDecode's shared positions, DuoAttention's and LServe's KV-head maps,
    LServe's page selection) must give the dynamic-cache tokens (float32 so the selections agree exactly).
    ``quest-fused``: Quest's top-k inside the split launch (kernels/triton/select_attend.py); ``quest-max_norm``
    its max_norm group reduction."""
    from accel.kernels.triton import select_attend

    monkeypatch.setattr(select_attend, "ENABLED", policy == "quest-fused")
    torch._dynamo.reset()
    model = tiny_model(family).cuda()
    x = _ids(300, batch=2)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    if policy.startswith("quest"):
        opts = dict(budget=64, page_size=16, dense_layers=0)
        if policy.endswith("max_norm"):  # the page box (float atomics) inside the compiled step
            opts["group_reduce"] = "max_norm"
    elif policy.startswith("tidal"):
        if family == "gemma3":  # the tiny Gemma 3 has one full-attention layer, which tidal refuses: two here
            from test_policy_tidal import _deep

            model = _deep("gemma3").cuda()
        opts = dict(budget=64, select_layer=0, reselect_layer=None)
    else:
        from test_policy_duo import _head_map

        # seed 1: layers with both a streaming and a retrieval KV head (both KV-head maps); lserve's seed 0 gives
        # llama a dense layer (PagedStaticLayer, every head selects) and an all-streaming one
        seed = 0 if policy == "lserve" else 1
        opts = dict(duo_map=_head_map(model, tmp_path / "m.json", seed=seed), ratio=0.5, sink=4, recent=12)
        if policy.startswith("lserve"):  # selection every step, or (reuse) every 4 with the begun page added
            opts.update(page_size=16, physical_page_size=32, budget=64,
                        reuse_steps=4 if policy.endswith("reuse") else 1)
    with torch.no_grad():
        accel.patch(model, policy.split("-")[0], backend="triton", **opts)
        dynamic = model.generate(x, **kw)
        static = model.generate(x, cache_implementation="static", **kw)  # compiled by transformers on CUDA
    assert torch.equal(static, dynamic)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("policy", ["xattention", "quest", "tidal"])
def test_two_gpus_match_one(policy):
    """Layers split over two GPUs (what accelerate's device_map does): the patched model gives the tokens of the
    same model on one GPU (the Triton kernels launch on each layer's own device)."""
    from accelerate import dispatch_model

    model = tiny_model("llama")
    x = _ids(300)
    opts = dict(xattention=dict(block_size=64, threshold=0.5), quest=dict(budget=64, dense_layers=0),
                tidal=dict(budget=64, select_layer=0, reselect_layer=None))[policy]
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        one = model.cuda()
        accel.patch(one, policy, backend="triton", **opts)
        ref = one.generate(x, **kw)
        accel.unpatch(one)
        split = dispatch_model(one.cpu(), device_map={"model.embed_tokens": 0, "model.rotary_emb": 0,
                                                      "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1,
                                                      "lm_head": 1},
                              skip_keys=one._skip_keys_device_placement)
        accel.patch(split, policy, backend="triton", **opts)
        out = split.generate(x, **kw)
    assert torch.equal(out.cpu(), ref.cpu())


@pytest.mark.parametrize("policy", ["xattention", "proxy", "flexprefill"])
def test_plans_run_without_host_sync(policy):
    # up to block_select.SYNC_FREE_BLOCKS key blocks the plan never waits for the GPU: a sync there stalls the CPU
    # until the estimate has run, and the plans are launch-bound at these lengths
    from accel.policies import AttentionContext, policy_class

    torch.manual_seed(0)
    S = 8192
    q = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, S, 128, device="cuda", dtype=torch.bfloat16)
    pol = policy_class(policy)()
    ctx = AttentionContext(layer_idx=0, phase="prefill", sliding_window=None, scale=128**-0.5)
    pol.plan(q, k, ctx)  # first call: kernel compiles and the per-GPU tile race (those do sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layout = pol.plan(q, k, ctx)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert layout.indices.shape[-1] == S // 128  # full width: nothing was read back to size it


@pytest.mark.parametrize("policy", ["dense", "quest", "tidal", "duo", "lserve", "lserve-reuse", "xattention+quest"])
def test_eager_decode_steps_run_without_host_sync(policy, tmp_path):
    """A decode step over the default (dynamic) cache never waits for the GPU: at batch 1 the CPU's launches are the
    step's time, and one sync per layer makes it CPU time + GPU time instead of the larger of the two. ``auto``
    backend, as users run it; the dense patch is the control (transformers' own step must be sync-free too)."""
    from test_policy_duo import _head_map

    model = tiny_model("llama", seed=1).cuda()
    model.config.max_position_embeddings = 4096
    name = policy.split("-")[0]
    opts = {}
    if "quest" in name:
        opts = dict(budget=64, page_size=16, dense_layers=0)
    elif name == "tidal":
        opts = dict(budget=64, select_layer=0, reselect_layer=None)
    elif name in ("duo", "lserve"):
        opts = dict(duo_map=_head_map(model, tmp_path / "m.json", seed=1), ratio=0.5, sink=4, recent=12)
        if name == "lserve":
            opts.update(page_size=16, physical_page_size=32, budget=64,
                        reuse_steps=4 if policy.endswith("reuse") else 1)
    accel.patch(model, name, **opts)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(_ids(700), past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(2):  # kernels compile, auto's choices are made
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        compiled = _decode_kernel_variants()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5):  # crosses lserve's reuse window and a new page
                tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        # 707 -> 768 keys: the length and the page count (45 -> 48 pages of 16) pass multiples of 16, inside one of
        # the top-k's row blocks (decode_topk.blocks: 32 pages + a 16-page tail for 33..48 pages)
        for _ in range(61):
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        # no Triton compile mid-decode: a growing length or page count specialised as divisible-by-16 compiled a new
        # variant (~0.3 s each) inside generate's steps
        assert _decode_kernel_variants() == compiled
        tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)  # 769 keys, 49 pages
    used = accel.stats(model)["backends_used"]
    if name in ("quest", "lserve", "xattention+quest"):
        assert "triton" in used, used  # the page selections ran on the GPU kernels
    # the row's tail block grows by powers of two (49 pages: a 32-page tail), a variant per block shape by design:
    # at most one more top-k variant (none when an earlier test of this process compiled it), nothing else
    now = _decode_kernel_variants()
    assert now["select"] - compiled["select"] in (0, 1) and {**now, "select": 0} == {**compiled, "select": 0}, now


def _decode_kernel_variants() -> dict:
    from accel.kernels.triton import decode_attention, decode_score, decode_topk

    fns = {"split": decode_attention._split_kernel, "combine": decode_attention._combine_kernel,
           "score": decode_score._quest_score_kernel, "select": decode_topk._select_kernel}
    return {name: sum(len(c[0]) for c in fn.device_caches.values()) for name, fn in fns.items()}


@pytest.mark.parametrize("page", [None, 1, 16, 64])
@pytest.mark.parametrize("batch", [1, 4])
def test_split_kv_decode_at_model_shape(page, batch):
    """The split-KV decode kernel at Llama-3.1-8B's head shape (32/8/128, bf16, 32K, budget 4096) with its own
    launch choice, which takes 128-key tiles here (``_tile``; the CPU tests run the interpreter's 32), against the
    torch twin."""
    from accel.kernels import reference_decode as R
    from accel.kernels.triton.decode_attention import _sm_count, _tile, paged_decode_attention

    S, hkv, G, D = 32768, 8, 4, 128
    g = torch.Generator(device="cuda").manual_seed(batch)
    q = torch.randn(batch, hkv * G, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    end = torch.tensor(S - 5, device="cuda")
    pages = counts = None
    if page is not None:
        n = 4096 // page
        pages = torch.stack([torch.randperm(S // page, device="cuda", generator=g)[:n] for _ in range(batch * hkv)])
        pages = pages.view(batch, hkv, n).to(torch.int32).contiguous()
        counts = torch.full((batch, hkv), n, dtype=torch.int32, device="cuda")
    width = S if page is None else 4096
    assert _tile(batch, hkv, width, None, D, D, 2, _sm_count(q.device)) == 128
    got = paged_decode_attention(q, k, v, pages, counts, page or 16, scale=D**-0.5, kv_end=end)
    ref = R.paged_decode_attention(q.float(), k.float(), v.float(), pages, counts, page or 16, scale=D**-0.5,
                                   kv_end=end.reshape(1).expand(batch))
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("n_pages", [2052, 8196, 16384])
def test_select_pages_at_model_rows(n_pages):
    """The top-k kernel compiled for the GPU (its warps, the packed counting reductions) on rows of a 32K / 128K static
    cache and a whole 16K-page row: Gaussian scores with a run of ties, NaN past the length read on the device."""
    from accel.kernels import reference_decode as R
    from accel.kernels.triton.decode_topk import select_pages

    g = torch.Generator(device="cuda").manual_seed(n_pages)
    s = torch.randn(4, 8, n_pages, device="cuda", generator=g)
    s[1, 3, 100:700] = 0.75  # ties around the cut
    length = (n_pages - 3) * 16 + 1
    s[..., n_pages - 2:] = float("nan")  # the pages past the newest (n_pages - 3)
    for k in (64, 256):
        ref = R.select_pages(s[..., : n_pages - 2], k, kv_len=length, page_size=16)
        got = select_pages(s, k, kv_len=torch.tensor(length, device="cuda"), page_size=16)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_select_attend_stamps():
    """The timer probe (kernels/triton/timer.py; ``scripts/bench_decode.py --stamps``): select_attend with stamps
    gives the same output, and every program's stamps are set and in order (start <= selected <= stored <=
    attended <= end)."""
    from accel.kernels import reference_decode as R
    from accel.kernels.triton.select_attend import SLOTS, select_attend

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 8, 32768, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    kmin, kmax = R.page_bounds(k, 16)
    s = R.quest_scores(q.float(), kmin.float(), kmax.float(), page_size=16).float()
    n_splits = torch.cuda.get_device_properties(0).multi_processor_count // 8
    st = torch.zeros(8 * n_splits * SLOTS.value, dtype=torch.int64, device="cuda")
    want = select_attend(q, k, v, s, 256, kv_len=32768, page_size=16)
    got = select_attend(q, k, v, s, 256, kv_len=32768, page_size=16, stamps=st)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    t = st.view(-1, SLOTS.value)[:, :5]
    assert (t > 0).all() and (t.diff(dim=1) >= 0).all()


@pytest.mark.parametrize("warps", [8, 16])
@pytest.mark.parametrize("n_pages", [2052, 8196])
@pytest.mark.parametrize("batch", [1, 4])
def test_select_attend_at_model_shape(batch, n_pages, warps):
    """Quest's top-k inside the split launch (kernels/triton/select_attend.py) compiled for the GPU, its own launch
    choice (one program per SM, 128-key tiles), at Llama-3.1-8B's heads over a 32K / 128K static cache with the
    length on the device, ties around the cut: the output of select_pages + paged_decode_attention's torch twins,
    also when replayed in a CUDA graph with new queries."""
    from accel.kernels import reference_decode as R
    from accel.kernels.triton.select_attend import select_attend

    hkv, G, D, page, n_keep = 8, 4, 128, 16, 256
    S = n_pages * page
    length = S - 2 * page - 5
    g = torch.Generator(device="cuda").manual_seed(n_pages + batch)
    q = torch.randn(batch, hkv * G, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    s = torch.randn(batch, hkv, n_pages, device="cuda", generator=g)
    s[0, 3, 100:700] = 0.75  # ties around the cut
    filled = -(-length // page)
    s[..., filled:] = float("nan")  # unfilled pages of a static buffer
    end = torch.tensor(length, device="cuda")

    def ref():
        pages, counts = R.select_pages(s[..., :filled], n_keep, kv_len=length, page_size=page)
        return R.paged_decode_attention(q.float(), k[:, :, :length].float(), v[:, :, :length].float(), pages, counts,
                                        page)

    got = select_attend(q, k, v, s, n_keep, kv_len=end, page_size=page, num_warps=warps)
    torch.testing.assert_close(got.float(), ref(), atol=2e-2, rtol=2e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = select_attend(q, k, v, s, n_keep, kv_len=end, page_size=page, num_warps=warps)
    for _ in range(2):
        q.copy_(torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=g))
        s.copy_(torch.where(s.isnan(), s, torch.randn(s.shape, device="cuda", generator=g)))
        graph.replay()
        torch.testing.assert_close(out.float(), ref(), atol=2e-2, rtol=2e-2)
