"""The LM head a job trains through on the CPU: the labelled positions only, one cross-entropy kernel.

TRL's SFTTrainer replaces the model's forward with a fused LM head (`trl.trainer.utils.add_fused_lm_head`):
per-token log-probabilities in tiles, without the `[tokens, vocab]` logits. On a GPU with Triton it projects
only the positions whose label is trained and folds each tile in one kernel. Elsewhere it projects every
position (to keep tile shapes fixed for compilers), folds each tile with about eight passes of torch ops,
and in the backward projects every tile again. On the CPU that head took about a third of a training step
(torch profiler, `python -m bench train`'s model).

`score_labelled_positions_only` gives the model the same head, computed as a CPU does it fastest: the
labelled positions' logits (a prompt's tokens are never projected), `cross_entropy` (log-softmax forward, one
fused softmax-minus-target backward), and the metrics SFTTrainer logs (entropy, whether the label is the
top-1 token) without gradient. The output is TRL's `FusedCausalLMOutput`, field for field; the loss is the
same sum of log-probabilities over the same divisor, to rounding.
"""

from __future__ import annotations

import functools
import types

import torch
from torch.nn import functional
from transformers import PreTrainedModel
from trl.trainer.utils import FusedCausalLMOutput

# Config fields that change the logits between the LM head and the softmax; TRL's head handles them, this one
# does not, so a model with any of them keeps TRL's.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def applies_to(model: PreTrainedModel) -> bool:
    """Whether `model`'s logits are its LM head's output, unscaled, and it routes no experts."""
    config = model.config.get_text_config()
    return not any(getattr(config, name, None) is not None for name in _LOGIT_TRANSFORMS) and not getattr(
        config, "output_router_logits", False
    )


def score_labelled_positions_only(model: PreTrainedModel) -> None:
    """Give `model` (the one SFTTrainer gave its fused head: the PEFT base model, or the model) this head."""
    unfused = functools.partial(type(model).forward, model)

    @functools.wraps(type(model).forward)  # generate validates its keyword arguments against this signature
    def forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs
    ):
        if not fused_lm_head:
            given = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return unfused(
                *args, **kwargs, **{name: value for name, value in given.items() if value is not None}
            )
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        targets = labels[mask]
        logits = self.get_output_embeddings()(hidden[mask]).float()
        log_probs = -functional.cross_entropy(logits, targets, reduction="none")
        with torch.no_grad():
            log_z = torch.logsumexp(logits, dim=-1)
            entropy = log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)
            # argmax returns the first maximum: a tie with an earlier token is no top-1 prediction, as in TRL
            is_top1 = logits.argmax(dim=-1) == targets

        def spread(values: torch.Tensor) -> torch.Tensor:
            # masked_scatter keeps an all-unlabelled batch connected to the model: a zero loss, not an error
            return values.new_zeros(mask.shape).masked_scatter(mask, values)

        per_token_log_probs = spread(log_probs)
        divisor = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-per_token_log_probs.sum() / divisor,
            log_probs=per_token_log_probs,
            entropy=spread(entropy),
            log_sum_sq_probs=None,
            mean_logits=None,
            is_top1=spread(is_top1),
            label_mask=mask,
            aux_loss=None,
        )

    model.forward = types.MethodType(forward, model)
