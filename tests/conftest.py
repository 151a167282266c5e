import os

# Triton kernels run on CPU tensors through the interpreter; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16


def _common(**kw):
    base = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, vocab_size=128, max_position_embeddings=512)
    base.update(kw)
    return base


def tiny_config(family: str):
    """Tiny random configs of each supported model class, with their family's quirks switched on."""
    if family == "llama":
        return transformers.LlamaConfig(**_common())
    if family == "mistral":
        return transformers.MistralConfig(**_common(sliding_window=24, head_dim=HEAD_DIM))
    if family == "qwen2":
        return transformers.Qwen2Config(**_common(num_hidden_layers=3, use_sliding_window=True, sliding_window=24,
                                                  max_window_layers=1,
                                                  layer_types=["full_attention", "sliding_attention",
                                                               "sliding_attention"]))
    if family == "qwen3":
        return transformers.Qwen3Config(**_common(head_dim=HEAD_DIM))
    if family == "gemma2":
        return transformers.Gemma2Config(**_common(head_dim=HEAD_DIM, sliding_window=24, attn_logit_softcapping=5.0,
                                                   final_logit_softcapping=30.0, query_pre_attn_scalar=16))
    if family == "gemma3":
        return transformers.Gemma3TextConfig(**_common(num_hidden_layers=3, head_dim=HEAD_DIM, sliding_window=24,
                                                       layer_types=["sliding_attention", "sliding_attention",
                                                                    "full_attention"],
                                                       query_pre_attn_scalar=16))
    raise KeyError(family)


MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
FAMILIES = list(MODEL_CLASSES)


def tiny_model(family: str, seed: int = 0, attn: str | None = None):
    """Random tiny model; its own default attention (eager for Gemma 2, which has soft-capping) is the baseline."""
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cfg._attn_implementation = attn or ("eager" if family == "gemma2" else "sdpa")
    model = getattr(transformers, MODEL_CLASSES[family])(cfg).eval()
    return model


def save_tiny_llama(folder, tok, num_hidden_layers: int = 2):
    """Save a tiny random Llama sized for ``tok`` and the tokenizer into ``folder``, like a hub checkpoint."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_hidden_layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                   max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
