"""Perplexity evaluation (fairseq's eval_lm, Megatron's evaluate) under any layout.

Samples are dealt to data-parallel ranks as the pretraining sampler deals them (micro-batch k of every mbs x dp
samples goes to rank k); a last incomplete round is filled with empty samples (loss mask 0) so every rank runs the
same steps and nothing waits. Loss sums and token counts are added in float64 over the replicas, so the result is
the token-weighted mean over exactly the evaluated tokens, whatever dp is.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from megamoe.moe.layer import moe_layers
from megamoe.moe.metrics import reduce_metrics
from megamoe.parallel import comm
from megamoe.pipeline.schedules import forward_backward


class TextWindows(torch.utils.data.Dataset):
    """Documents tokenized on the fly (one JSON object per line with a "text" field, or plain text lines), each
    followed by eod, concatenated and cut into consecutive windows of seq_length + 1 tokens that overlap by one
    (every token but the first is predicted once). The last window is padded, its padding masked out."""

    def __init__(self, path: str, tokenizer, seq_length: int, key: str = "text") -> None:
        stream = []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                text = line
                if path.endswith(".jsonl") or path.endswith(".json"):
                    try:
                        text = json.loads(line)[key]
                    except (json.JSONDecodeError, KeyError, TypeError) as err:
                        raise ValueError(f"{path}:{number}: not a JSON object with a {key!r} field ({err})") from None
                stream += tokenizer.tokenize(text) + [tokenizer.eod]
        if len(stream) < 2:
            raise ValueError(f"{path} has no text to evaluate")
        self.tokens, self.seq, self.pad = np.asarray(stream, dtype=np.int64), seq_length, tokenizer.eod

    def __len__(self) -> int:
        return math.ceil((len(self.tokens) - 1) / self.seq)

    def __getitem__(self, i: int) -> dict:
        window = self.tokens[i * self.seq:i * self.seq + self.seq + 1]
        real = len(window) - 1
        window = np.concatenate([window, np.full(self.seq + 1 - len(window), self.pad, np.int64)])
        mask = torch.zeros(self.seq)
        mask[:real] = 1.0
        text = torch.from_numpy(window)
        return dict(tokens=text[:-1], labels=text[1:], loss_mask=mask)


def _empty(seq: int) -> dict:
    zeros = torch.zeros(seq, dtype=torch.int64)
    return dict(tokens=zeros, labels=zeros, loss_mask=torch.zeros(seq))


@dataclass
class EvalResult:
    loss: float            # token-weighted mean loss (nats)
    tokens: int
    seconds: float
    moe: dict               # per MoE layer: tokens per expert, dropped fraction (at the evaluation capacity), ...

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


@torch.no_grad()
def evaluate(loaded, dataset, micro_batch_size: int, max_samples: int | None = None,
             word_probs: str | None = None) -> EvalResult:
    """Forward-only passes over dataset[:max_samples] (all of it by default) through the pipeline schedule.

    word_probs: write one JSON line per evaluated sample (its index, target tokens and their natural-log
    probabilities, real tokens only) from the last rank."""
    mesh, chunks, seq = loaded.mesh, loaded.chunks, loaded.model.seq_length
    dp, dp_rank = mesh.config.dp, mesh.coordinates["dp"]
    total = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    per_round = micro_batch_size * dp
    loss_sum = torch.zeros(2, dtype=torch.float64)
    routing = RoutingTotals()
    writer = open(word_probs, "w") if word_probs and mesh.rank == mesh.config.world_size - 1 else None
    start = time.perf_counter()
    for first in range(0, total, per_round):
        ids = [first + dp_rank * micro_batch_size + j for j in range(micro_batch_size)]
        samples = [dataset[i] if i < total else _empty(seq) for i in ids]
        batch = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask")}
        batch["sample_ids"] = torch.tensor(ids)
        out = forward_backward(chunks, [batch], mesh, forward_only=True)
        routing.add(chunks)
        if mesh.is_last_stage:
            token_loss = out.token_losses[0].double() * batch["loss_mask"]
            loss_sum += torch.stack([token_loss.sum(), batch["loss_mask"].double().sum()])
            if word_probs:
                _write_word_probs(mesh, writer, first, token_loss, batch, micro_batch_size)
    if mesh.is_last_stage:
        comm.all_reduce(loss_sum, mesh["dp_cp"])
    seconds = time.perf_counter() - start
    comm.broadcast(loss_sum, mesh["pp"], src_index=mesh.config.pp - 1)  # every rank returns the result
    moe = reduce_metrics(routing.metrics(), mesh["dp_cp"], mesh["pp"], loaded.model.num_layers,
                         loaded.model.moe.num_experts if loaded.model.moe else 0)
    if writer is not None:
        writer.close()
    tokens = int(loss_sum[1].item())
    return EvalResult(loss_sum[0].item() / max(tokens, 1), tokens, seconds, moe)


class RoutingTotals:
    """Routing of every evaluated micro-batch, summed per MoE layer (a layer's metrics describe its last forward
    only): assignments per expert, assignments kept at the evaluation capacity, mean entropy."""

    def __init__(self) -> None:
        self.layers: dict[int, dict] = {}

    def add(self, chunks) -> None:
        for chunk in chunks:
            for layer in moe_layers(chunk):
                m = layer.metrics
                routed = m["tokens_per_expert"].double()
                total = self.layers.setdefault(layer.layer_number, dict(routed=torch.zeros_like(routed),
                                                                        kept=0.0, entropy=0.0, forwards=0))
                total["routed"] += routed
                total["kept"] += routed.sum() * (1 - m["dropped_fraction"].double())
                total["entropy"] += m["entropy"].double()
                total["forwards"] += 1

    def metrics(self) -> dict[int, dict[str, torch.Tensor]]:
        """In MoELayer.metrics' form, for reduce_metrics."""
        return {n: {"tokens_per_expert": t["routed"].round().long(),
                    "dropped_fraction": 1 - t["kept"] / t["routed"].sum().clamp_min(1),
                    "entropy": t["entropy"] / t["forwards"]} for n, t in self.layers.items()}


def _write_word_probs(mesh, writer, first, token_loss, batch, micro_batch_size) -> None:
    # Every replica's [mbs, s] log-probabilities and masks reach the last rank, in sample order.
    group = mesh["dp_cp"]
    local = torch.stack([-token_loss, batch["loss_mask"].double(), batch["labels"].double()])
    gathered = torch.empty((group.size * local.shape[0],) + tuple(local.shape[1:]), dtype=local.dtype)
    comm.all_gather_into_tensor(gathered, local, group)  # concatenated along dim 0
    gathered = gathered.view((group.size,) + tuple(local.shape))
    if writer is None:
        return
    for r in range(group.size):
        logprobs, mask, labels = gathered[r]
        for j in range(micro_batch_size):
            keep = mask[j] > 0
            if keep.any():
                writer.write(json.dumps({"sample": first + r * micro_batch_size + j,
                                         "targets": labels[j][keep].long().tolist(),
                                         "logprobs": [round(v, 6) for v in logprobs[j][keep].tolist()]}) + "\n")
