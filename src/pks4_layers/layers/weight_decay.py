"""Which parameters weight decay leaves alone: timm's ``no_weight_decay()`` convention.

Decay pulls a parameter towards zero. That is right for the weight matrices, and wrong for:
- biases and normalisation scales (1-D);
- the scan's ``A_log``, whose decay would push every state's decay rate ``exp(A_log)`` towards
  1 (mamba-ssm keeps ``A_log`` and ``D`` out of weight decay as well);
- the scan's ``D`` skip and step-size bias (1-D);
- learnt time embeddings, whose zero is a meaningful start and not a prior.
"""

from __future__ import annotations

from torch import nn

__all__ = ["NO_DECAY_SUFFIXES", "no_weight_decay_names"]

# Parameters of two or more dimensions that are kept out of weight decay all the same.
NO_DECAY_SUFFIXES = ("A_log", "time_embed")


def no_weight_decay_names(module: nn.Module, prefix: str = "") -> set[str]:
    """The names (as ``module.named_parameters()`` gives them, with ``prefix``) of the
    parameters that weight decay should leave alone: those with fewer than two dimensions, and
    ``A_log`` and ``time_embed`` parameters."""
    return {
        prefix + name
        for name, p in module.named_parameters()
        if p.dim() < 2 or name.endswith(NO_DECAY_SUFFIXES)
    }
