"""Token NLL plus alpha times the span loss (paper 4.1: ``L_total = L_task + alpha * sum_i e_i / T``).

T is the number of stream positions, whether every token is scored (language modelling) or only answers
(synthetic tasks with label streams): alpha means the same penalty per memory on both.

Also reports what people read in Expire-Span runs: spans, memory kept per layer, the attended memory |C_t|, and,
on synthetic tasks with label streams, answer accuracy.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from fairseq_expire.errors import UsageError


@dataclass
class ExpireSpanCrossEntropyConfig(FairseqDataclass):
    expire_span_alpha: float = field(
        default=0.0,
        metadata={
            "help": "span loss coefficient alpha (0: no penalty). Paper: 1e-6 for enwik8 and PG-19, "
            "2e-6 for colliding objects and instructions, 5e-6 for the corridor"
        },
    )
    adaptive_span_loss: float = field(
        default=0.0,
        metadata={
            "help": "adaptive_span_lm: coefficient of the L1 loss on the heads' spans z (mean over heads, sum "
            "over layers, added per batch as in Adaptive-Span; its enwik8 scripts use 5e-7); 0: no penalty"
        },
    )


@register_criterion("expire_span_cross_entropy", dataclass=ExpireSpanCrossEntropyConfig)
class ExpireSpanCrossEntropyCriterion(FairseqCriterion):
    def __init__(self, task, expire_span_alpha: float = 0.0, adaptive_span_loss: float = 0.0):
        super().__init__(task)
        for option, value in (
            ("--expire-span-alpha", expire_span_alpha),
            ("--adaptive-span-loss", adaptive_span_loss),
        ):
            if not value >= 0:
                raise UsageError(f"{option} {value}: must be >= 0 (a negative span loss rewards long spans)")
        self.alpha = expire_span_alpha
        self.adaptive_span_coefficient = adaptive_span_loss

    def forward(self, model, sample, reduce=True):
        """Loss summed over the sample's scored tokens (``sample_size = ntokens``), fairseq units."""
        net_output = model(**sample["net_input"])
        extra = net_output[1]
        target = sample["target"]
        nll_loss = self._nll(model, net_output, target)
        ntokens = sample["ntokens"]
        # the loss is divided by ntokens (scored targets) later; the span loss is per stream position
        positions = sample["net_input"]["src_tokens"].ne(self.padding_idx).sum()
        expire_loss = self.alpha * extra["span_loss"] * ntokens / positions.clamp(min=1)
        loss = nll_loss + expire_loss
        if "adaptive_span_loss" in extra:  # per batch: times ntokens, as the loss is divided by ntokens later
            adaptive_span_loss = self.adaptive_span_coefficient * extra["adaptive_span_loss"] * ntokens
            loss = loss + adaptive_span_loss

        def weighted(value):  # summable across batches and ranks: divided by ntokens in reduce_metrics
            return value.detach().float() * ntokens

        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "expire_loss": expire_loss.data,
            "ntokens": ntokens,
            "nsentences": sample["nsentences"],
            "sample_size": ntokens,
            "span_avg": weighted(extra["span_avg"]),
            "span_max": weighted(extra["span_max"]),
            "attn_mem_avg": weighted(extra["attn_mem_avg"]),
        }
        for i, kept in enumerate(extra["mem_per_layer"]):
            logging_output[f"mem_l{i}"] = weighted(kept)
        if "adaptive_span_loss" in extra:
            logging_output["adaptive_span_loss"] = adaptive_span_loss.data
            for i, layer_spans in enumerate(extra["head_spans"]):  # layers x K
                for k, z in enumerate(layer_spans):
                    logging_output[f"span_l{i}_h{k}"] = weighted(z)
        if sample.get("labelled", False):
            with torch.no_grad():
                scored = target.ne(self.padding_idx)
                prediction = model.get_normalized_probs(net_output, log_probs=True, sample=sample).argmax(-1)
                logging_output["n_correct"] = (prediction.eq(target) & scored).sum()
        return loss, ntokens, logging_output

    def _nll(self, model, net_output, target):
        adaptive_softmax = getattr(model.decoder, "adaptive_softmax", None)
        if adaptive_softmax is None:
            lprobs = model.get_normalized_probs(net_output, log_probs=True)
            return F.nll_loss(
                lprobs.view(-1, lprobs.size(-1)),
                target.view(-1),
                ignore_index=self.padding_idx,
                reduction="sum",
            )
        logits, targets = adaptive_softmax(net_output[0], target.view(-1))
        return sum(
            F.cross_entropy(
                cluster_logits.float(), cluster_target, ignore_index=self.padding_idx, reduction="sum"
            )
            for cluster_logits, cluster_target in zip(logits, targets)
            if cluster_target is not None
        )

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        ntokens = total("ntokens")
        if ntokens == 0:
            return
        keys = logging_outputs[0].keys() if logging_outputs else ()
        losses = ("loss", "nll_loss", "expire_loss") + (
            ("adaptive_span_loss",) if "adaptive_span_loss" in keys else ()
        )
        for key in losses:  # bits per token
            metrics.log_scalar(key, total(key) / ntokens / math.log(2), ntokens, round=4)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        for key in keys:
            if key in ("span_avg", "span_max", "attn_mem_avg") or key.startswith(("mem_l", "span_l")):
                metrics.log_scalar(key, total(key) / ntokens, ntokens, round=1)
        mem_keys = [key for key in keys if key.startswith("mem_l")]
        if mem_keys:
            metrics.log_scalar(
                "mem_avg", sum(total(key) for key in mem_keys) / len(mem_keys) / ntokens, ntokens, 1
            )
        if "n_correct" in keys:
            accuracy = 100.0 * total("n_correct") / ntokens
            metrics.log_scalar("acc", accuracy, ntokens, round=2)
            metrics.log_scalar("err", 100.0 - accuracy, ntokens, round=2)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
