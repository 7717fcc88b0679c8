"""Tiny random-init models for tests that need an architecture, not a trained model (built in milliseconds).

A random model's logits are only a useful test signal if they are not flat, so the builders scale the
weights like a trained model's (unit-variance activations) instead of HF's 0.02-std init, give every
bias and norm weight non-trivial values (HF initialises biases to zero, which would hide a bias the fast
path forgets), and put the matmul weights on a 4-bit grid per 32 inputs, as a Q4_1 GGUF's are: the int4
mode then holds them exactly, like the default model's, and tests can compare it with fp32 tightly.
"""

from __future__ import annotations

import torch
from torch import nn

INT4_GROUP = 32


class TinyTokenizer:
    """The slice of the tokenizer API :class:`~timebill.engine.Engine` uses: characters to ids 1..60, EOS 63."""

    unk_token_id = 0
    eos_token_id = 63
    chat_template = None

    def convert_tokens_to_ids(self, token: str) -> int:
        return 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1 + (ord(c) % 60) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(65 + i % 26) for i in ids)


def on_int4_grid(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` rounded to 16 levels between each 32-input group's min and max (what Q4_1 stores)."""
    out_f, in_f = weight.shape
    groups = weight.view(out_f, in_f // INT4_GROUP, INT4_GROUP)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (hi - lo) / 15
    return (lo + torch.round((groups - lo) / scale) * scale).view(out_f, in_f)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise ``model`` in place as the module docstring says, without touching the global RNG."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, nn.Linear):
                weight = torch.randn_like(module.weight) / module.in_features**0.5
                module.weight.copy_(on_int4_grid(weight) if module.in_features % INT4_GROUP == 0 else weight)
                if module.bias is not None:
                    module.bias.copy_(0.5 * torch.randn_like(module.bias))
            elif isinstance(module, nn.Embedding):
                module.weight.normal_()
            elif hasattr(module, "variance_epsilon"):  # an RMSNorm
                module.weight.uniform_(0.5, 1.5)
    return model.eval()
