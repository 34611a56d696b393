"""Text generation: greedy, top-k, top-p and temperature sampling with a KV cache, under tp, ep and dp.

A batch holds the prompts right-padded to a common length. Row i's prompt fills positions [0, n_i); generating,
row i writes its t-th new token at position n_i + t (over the padding) and attends to positions <= its own, so the
padding never influences a real token. Prefill runs the padded prompt block once; each later step runs one
position per row through the model with the cached keys and values (or, without the cache, the whole prefix
again: the same result, tested).

Layouts. Every rank of a tp group computes the same token (full-vocabulary logits gathered over tp, sampling
draws seeded by (seed, prompt index) only). With sequence parallelism a step's positions are padded to a multiple
of tp; the extra positions sit after the real one, are masked from it and overwritten later. Prompts are dealt
round-robin to data-parallel replicas; since expert-parallel groups can span replicas, every rank runs the same
number of steps with the same batch shape (a replica out of prompts runs empty rows), and the run stops when every
row of every rank is done: no rank leaves a collective early.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.parallel import comm, regions
from megamoe.tensor_parallel.params import name_seed


@dataclass(frozen=True)
class SamplingConfig:
    """greedy, or sampling with temperature, top_k (0: off) and top_p (1.0: off); max_new_tokens; seed;
    kv_cache (False: recompute the whole prefix every step)."""

    max_new_tokens: int = 32
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234
    kv_cache: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            problems.append(f"--temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            problems.append("--top-k must be >= 0 and --top-p in (0, 1]")
        if problems:
            raise ValueError("invalid sampling flags:\n  - " + "\n  - ".join(problems))


class KVCache:
    """Keys and values per layer, [b, groups/tp, length, d], written at `positions` [b, s] by each forward."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.positions: torch.Tensor | None = None
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [b, groups/tp, s, d] of this forward's positions -> every cached position's."""
        if layer not in self.keys:
            shape = (k.shape[0], k.shape[1], self.length, k.shape[3])
            self.keys[layer], self.values[layer] = k.new_zeros(shape), v.new_zeros(shape)
        rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)                 # [b, 1]
        self.keys[layer][rows, :, self.positions] = k.transpose(1, 2)                 # [b, s, groups/tp, d]
        self.values[layer][rows, :, self.positions] = v.transpose(1, 2)
        return self.keys[layer], self.values[layer]


def _masked(query_positions: torch.Tensor, length: int) -> torch.Tensor:
    """[b, 1, s, length] True where a query may not look: keys after its own position."""
    keys = torch.arange(length, device=query_positions.device)
    return keys.view(1, 1, 1, -1) > query_positions.unsqueeze(1).unsqueeze(-1)


def _generator(seed: int, prompt_index: int) -> torch.Generator:
    return torch.Generator().manual_seed(name_seed(seed, str(prompt_index)))


def _choose(logits: torch.Tensor, config: SamplingConfig, generators: list) -> torch.Tensor:
    """Next token per row from full-vocabulary logits [b, V]."""
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / config.temperature
    if config.top_k:
        kth = logits.topk(min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= config.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators)])


class _Model:
    """One rank's whole model (no pipeline) as a function of (tokens, positions) -> full-vocabulary logits."""

    def __init__(self, loaded) -> None:
        if loaded.mesh.config.pp > 1:
            raise ValueError("generation runs without pipeline parallelism: use --pipeline-model-parallel-size 1")
        self.chunk, self.mesh, self.vocab = loaded.chunks[0], loaded.mesh, loaded.model.vocab_size
        tp = loaded.mesh.config
        self.multiple = tp.tp if tp.sequence_parallel else 1

    @torch.no_grad()
    def __call__(self, tokens, positions, kv_cache=None) -> torch.Tensor:
        """tokens, positions [b, s] (s a multiple of tp under SP) -> logits [b, s, V]."""
        mask = _masked(positions, kv_cache.length) if kv_cache is not None else None
        if kv_cache is not None:
            kv_cache.positions = positions
        logits = self.chunk(tokens, position_ids=positions, attention_mask=mask, kv_cache=kv_cache)
        logits = regions.gather_along(logits.contiguous(), self.mesh["tp"], -1)       # [b, s, V padded]
        return logits[..., :self.vocab]


def generate(loaded, prompts: list[list[int]], config: SamplingConfig) -> list[list[int]]:
    """Every prompt's new tokens (up to max_new_tokens, ending at eod), on every rank, in input order.

    All ranks must call it with the same prompts (each generates its data-parallel share)."""
    mesh, eod = loaded.mesh, loaded.tokenizer.eod
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt: every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest + config.max_new_tokens > loaded.model.max_position_embeddings:
        raise ValueError(f"a prompt of {longest} tokens plus --max-new-tokens {config.max_new_tokens} exceeds the "
                         f"model's --max-position-embeddings {loaded.model.max_position_embeddings}")
    model = _Model(loaded)
    dp, dp_rank = mesh.config.dp, mesh.coordinates["dp"]
    mine = list(range(dp_rank, len(prompts), dp))                     # this replica's prompts, by input index
    rows = -(-len(prompts) // dp)                                     # the same batch shape on every rank
    multiple = model.multiple
    width = -(-longest // multiple) * multiple
    total = width + config.max_new_tokens + multiple
    tokens = torch.full((rows, total), eod, dtype=torch.long)
    lengths = torch.ones(rows, dtype=torch.long)                      # empty rows: one eod token
    for r, i in enumerate(mine):
        tokens[r, :len(prompts[i])] = torch.tensor(prompts[i])
        lengths[r] = len(prompts[i])
    generators = [_generator(config.seed, mine[r] if r < len(mine) else -1) for r in range(rows)]
    done = torch.tensor([r >= len(mine) for r in range(rows)])
    new = [[] for _ in range(rows)]
    cache = KVCache(total) if config.kv_cache else None

    def step_logits(step: int, positions_now: torch.Tensor) -> torch.Tensor:
        """Logits at each row's position positions_now [b]."""
        every_row = torch.arange(rows)
        if cache is None:  # the whole prefix again, causal
            end = -(-(int(positions_now.max()) + 1) // multiple) * multiple
            return model(tokens[:, :end], torch.arange(end).expand(rows, end))[every_row, positions_now]
        if step == 0:      # prefill: the padded prompt block fills the cache
            return model(tokens[:, :width], torch.arange(width).expand(rows, width), cache)[every_row, positions_now]
        offsets = positions_now.unsqueeze(1) + torch.arange(multiple)  # the real position, then SP padding
        return model(tokens.gather(1, offsets), offsets, cache)[:, 0]

    positions = lengths - 1                                            # where each row's next token is read
    for step in range(config.max_new_tokens):
        chosen = _choose(step_logits(step, positions), config, generators)
        for r in range(rows):
            if not done[r]:
                new[r].append(int(chosen[r]))
                done[r] = chosen[r] == eod or len(new[r]) == config.max_new_tokens
        positions = positions + 1
        tokens[torch.arange(rows), positions] = torch.where(done, eod, chosen)
        flag = torch.tensor([float(done.all())])
        comm.all_reduce(flag, mesh.world, op=comm.ReduceOp.MIN)       # stop only when every rank is done
        if flag.item() == 1.0:
            break
    return _gather_outputs(mesh, new, mine, len(prompts), config.max_new_tokens)


def _gather_outputs(mesh, new, mine, count, max_new) -> list[list[int]]:
    """Every replica's new tokens to every rank, in input order (one all-gather over the data-parallel group)."""
    rows = len(new)
    local = torch.full((rows, max_new + 2), -1, dtype=torch.long)      # [prompt index, length, tokens...]
    for r in range(rows):
        local[r, 0] = mine[r] if r < len(mine) else -1
        local[r, 1] = len(new[r])
        local[r, 2:2 + len(new[r])] = torch.tensor(new[r], dtype=torch.long)
    group = mesh["dp_cp"]
    gathered = torch.empty((group.size * rows, max_new + 2), dtype=torch.long)
    comm.all_gather_into_tensor(gathered, local, group)
    out = [None] * count
    for row in gathered:
        if row[0] >= 0:
            out[int(row[0])] = row[2:2 + int(row[1])].tolist()
    return out
