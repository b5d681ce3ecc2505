"""Many adapters on ONE frozen base: a stack trained by one vmapped step, and a forward with an adapter per row.

``stack_adapters`` makes N adapters (a ``peft.lora`` per member, from its seed, at its rank) over one frozen base
and stacks their trainable tensors on a leading ``member`` axis, each ``a`` / ``b`` zero-padded to the largest
rank: member ``i`` of rank ``r_i`` uses the first ``r_i`` columns of ``a`` and rows of ``b`` (``rank_mask`` zeroes
the rest inside the differentiated function, so it stays exactly zero and gets exactly zero gradient) and the
scale ``alpha / r_i``, so it is the genuine rank-``r_i`` adapter, padded. ``make_stack_step`` is
``ensemble.make_ensemble_step`` over the stacked trainable tree whose members are ``make_adapter_step``s on the
shared frozen tree: ``vmap`` closes over it, so the base is never batched (one copy in memory, checked).
``AdapterMembers`` is ``loop.fit``'s data for a stack (``ensemble.Members``: per-member data streams, learning
rates, metrics, checkpoints, resume); ``forward_rows`` runs every batch row with its own member in one forward.
"""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ftransformer import optim, random, tree, validate
from ftransformer.checkpoint import checkpoint_exists, load_tree, read_checkpoint_info
from ftransformer.config import Config
from ftransformer.ensemble import Members, evaluate_ensemble, make_ensemble_step
from ftransformer.loop import FitRun, check_resume
from ftransformer.model import forward
from ftransformer.peft.adapters import DEFAULT_TARGETS, lora, map_nodes
from ftransformer.peft.partition import FrozenAdapter, combine, split
from ftransformer.peft.step import make_adapter_step
from ftransformer.train import TrainStep


class AdapterStack(NamedTuple):
    """N adapters over one frozen base: ``trainable`` stacked (``member`` axis first, padded to the largest
    rank), ``frozen`` once (its scales are set per member from ``ranks`` and ``alpha``)."""

    trainable: dict
    frozen: dict
    ranks: Int[Tensor, " member"]
    alpha: float


def _padded(trainable: dict, top: int) -> dict:
    """``trainable`` with every ``a`` padded by zero columns and every ``b`` by zero rows to rank ``top``."""
    def pad(path: str, x: Tensor) -> Tensor:
        if path.endswith(".a"):
            return F.pad(x, (0, top - x.shape[-1]))
        return F.pad(x, (0, 0, 0, top - x.shape[-2])) if path.endswith(".b") else x

    return tree.unflatten_paths({p: pad(p, x) for p, x in tree.flatten_with_paths(trainable).items()})


def stack_adapters(
    params: dict, cfg: Config, *, seeds: Sequence[int], ranks: Sequence[int], alpha: float | int,
    targets: Sequence[str] = DEFAULT_TARGETS, dora: bool = False,
) -> AdapterStack:
    """One ``peft.lora(params, cfg, rank=ranks[i], key=random.key(seeds[i]))`` per member, stacked over one base."""
    seeds, ranks = list(seeds), list(ranks)
    if not seeds or len(seeds) != len(ranks):
        raise ValueError(f"stack_adapters needs one rank per seed (at least one member), got seeds={seeds}, "
                         f"ranks={ranks}")
    for r in ranks:
        validate.positive_int("rank", r)
    parts = [split(lora(params, cfg, rank=r, alpha=alpha, targets=targets, key=random.key(s), dora=dora))
             for s, r in zip(seeds, ranks)]
    trainable = tree.stack([_padded(t, max(ranks)) for t, _ in parts])
    device = tree.leaves(trainable)[0].device
    return AdapterStack(trainable, parts[0][1], torch.tensor(ranks, device=device), float(alpha))


def rank_mask(trainable: dict, rank: Tensor) -> dict:
    """``trainable`` with the columns of ``a`` and rows of ``b`` past ``rank`` multiplied by zero."""
    def mask(path: str, x: Tensor) -> Tensor:
        if not path.endswith((".a", ".b")):
            return x
        axis = -1 if path.endswith(".a") else -2
        keep = (torch.arange(x.shape[axis], device=x.device) < rank).to(x.dtype)
        return x * (keep if axis == -1 else keep.unsqueeze(-1))

    return tree.unflatten_paths({p: mask(p, x) for p, x in tree.flatten_with_paths(trainable).items()})


def scaled(frozen: dict, alpha: float, rank: Tensor) -> dict:
    """``frozen`` with every adapter's scale ``alpha / rank`` (PEFT's scale of a rank-``rank`` adapter)."""
    def scale_of(x: FrozenAdapter) -> FrozenAdapter:
        s = torch.as_tensor(alpha, dtype=torch.float64, device=x.scale.device) / rank.to(torch.float64)
        return FrozenAdapter(x.base, s.to(x.scale.dtype))

    return map_nodes(frozen, lambda p, x: scale_of(x) if isinstance(x, FrozenAdapter) else x,
                     is_node=lambda x: isinstance(x, FrozenAdapter))


def check_shared(frozen: dict) -> None:
    """``ValueError`` if a frozen tensor is batched (``vmap``-ed): the base must be one copy for every member."""
    if any(torch._C._functorch.is_batchedtensor(x) for x in tree.leaves(frozen)):
        raise ValueError("the frozen base is batched under vmap; it must be shared (in_dims None), not one per member")


def member_params(stack: AdapterStack, trainable: dict, rank: Tensor) -> dict:
    """The model params one member's trainable tree stands for: masked to ``rank``, on the shared base."""
    check_shared(stack.frozen)
    return combine(rank_mask(trainable, rank), scaled(stack.frozen, stack.alpha, rank))


def member_adapters(stack: AdapterStack, i: int) -> dict:
    """Member ``i``'s adapted params at its own rank (a plain rank-``r_i`` adapter tree: forward, merge, save)."""
    validate.int_in("i", i, 0, len(stack.ranks), high_name="members")
    r = int(stack.ranks[i])
    flat = tree.flatten_with_paths(tree.map(lambda x: x[i], stack.trainable))
    cut = {p: x[..., :r] if p.endswith(".a") else x[:r] if p.endswith(".b") else x for p, x in flat.items()}
    return combine(tree.unflatten_paths(cut), scaled(stack.frozen, stack.alpha, torch.tensor(r)))


def load_member(path: str | Path, params: dict, cfg: Config) -> dict:
    """The adapted params a stack member's checkpoint (``out_dir/member-<i>/latest`` or ``best``) holds, on the
    base ``params`` (the model ``cfg`` describes, as in training): a plain rank-``r_i`` adapter tree."""
    saved = read_checkpoint_info(path)["config"]
    spec = saved.get("adapter") if isinstance(saved, dict) else None
    if not isinstance(spec, dict):
        raise ValueError(f"{str(path)!r} is not a checkpoint of a stack member (its config names no adapter)")
    if Config.from_dict(saved["model"]) != cfg:
        raise ValueError(f"{str(path)!r} was trained on another model: its config is {saved['model']}")
    like = stack_adapters(params, cfg, seeds=[0], ranks=[spec["max_rank"]], alpha=spec["alpha"],
                          targets=spec["targets"], dora=spec["kind"] == "dora")
    template = tree.map(lambda x: x[0], like.trainable)
    ck = load_tree(path, like=template, device=tree.leaves(template)[0].device)
    return member_adapters(like._replace(trainable=tree.stack([ck.params]), ranks=torch.tensor([spec["rank"]])), 0)


def make_stack_step(
    cfg: Config, stack: AdapterStack,
    optimizer: optim.GradientTransformation | Callable[..., optim.GradientTransformation], *,
    hparams: dict | None = None, dropout: float = 0.0, ignore_index: int = -100,
) -> TrainStep:
    """ONE vmapped step over ``stack.trainable`` (``make_ensemble_step``): member ``i`` is ``make_adapter_step``
    at its rank on the shared base, with its own optimizer state (and ``hparams``' values, as a sweep)."""
    check_shared(stack.frozen)

    def build(opt: optim.GradientTransformation, index: Tensor) -> TrainStep:
        rank = stack.ranks.to(index.device)[index]
        frozen = scaled(stack.frozen, stack.alpha, rank)
        return make_adapter_step(cfg, opt, frozen, dropout=dropout, ignore_index=ignore_index,
                                 view=lambda t: rank_mask(t, rank))

    return make_ensemble_step(cfg, optimizer, hparams=hparams, ignore_index=ignore_index, member_step=build)


def _check_rows(members, tokens: Tensor, n: int) -> None:
    if not isinstance(members, Tensor) or members.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"members must be an integer tensor of one member index per row, got {members!r}")
    if members.shape != tokens.shape[:1]:
        raise ValueError(f"members must have shape (batch={tokens.shape[0]},), got {tuple(members.shape)}")
    if members.numel() and (int(members.min()) < 0 or int(members.max()) >= n):
        raise ValueError(f"members must be indices in [0, {n}) (the stack has {n} members), got {members.tolist()}")


def forward_rows(
    stack: AdapterStack, tokens: Int[Tensor, "batch seq"], members: Tensor, cfg: Config
) -> Float[Tensor, "batch seq vocab"]:
    """Logits of every row with its own member ``members[row]``: the members gathered per row, one vmapped
    forward with the base shared (each row equals ``forward(member_adapters(stack, i), row)``)."""
    _check_rows(members, tokens, len(stack.ranks))
    rows = tree.map(lambda x: x[members.to(x.device)], stack.trainable)
    ranks = stack.ranks[members.to(stack.ranks.device)]

    def one(trainable: dict, rank: Tensor, x: Tensor) -> Tensor:
        return forward(member_params(stack, trainable, rank), x, cfg)

    return torch.func.vmap(one)(rows, ranks, tokens)


class AdapterMembers(Members):
    """``loop.fit``'s data for a stack of adapters on one base (``ensemble.Members`` with adapters as members):
    ``fit(task.init_params(), task.train_step(), task, settings, out_dir=...)``.

    Each member is a dict: ``seed`` (its adapter's init and its batches), ``rank`` (default ``rank``) and
    hyperparameters for ``make_optimizer(**hparams)`` (e.g. ``lr``). Checkpoints ``member-<i>/latest``/``best``
    hold that member's adapter tensors (padded to the largest rank) and its optimizer state only; their config
    records the adapter (``kind``, ``rank``, ``alpha``, ``targets``) and the model's config.
    """

    def __init__(self, params: dict, cfg: Config, train_ids, val_ids,
                 make_optimizer: Callable[..., optim.GradientTransformation], members: Sequence[dict], *,
                 alpha: float | int, rank: int = 8, targets: Sequence[str] = DEFAULT_TARGETS, dora: bool = False,
                 dropout: float = 0.0, seed: int = 0, tokenizer=None):
        specs = [dict(m) for m in members]
        ranks = [m.pop("rank", rank) for m in specs]
        super().__init__(cfg, train_ids, val_ids, make_optimizer, specs, seed=seed, tokenizer=tokenizer)
        self.stack = stack_adapters(params, cfg, seeds=self.seeds, ranks=ranks, alpha=alpha, targets=targets,
                                    dora=dora)
        self.ranks, self.dropout = ranks, dropout
        self.names = [f"rank={r}," + n if n else f"rank={r}" for r, n in zip(ranks, self.names)]
        self.adapter = {"kind": "dora" if dora else "lora", "alpha": float(alpha), "targets": list(targets),
                        "max_rank": max(ranks), "dropout": dropout}

    def init_params(self, device: str | torch.device | None = None) -> dict:
        """The members' initial adapter tensors, stacked (the frozen base stays where ``params`` are)."""
        return tree.to(self.stack.trainable, device=device)

    def train_step(self, *, accum_steps: int = 1) -> TrainStep:
        """The stack's one vmapped ``TrainStep`` (``make_stack_step`` with the members' hyperparameters)."""
        if accum_steps != 1:
            raise ValueError(f"a stack of adapters trains without gradient accumulation (accum_steps=1), "
                             f"got {accum_steps}")
        opt = self.make_optimizer if self.hp_names else self.make_optimizer()
        return make_stack_step(self.cfg, self.stack, opt, hparams=self.hparams(), dropout=self.dropout)

    def dropout_key(self, run: FitRun, step: int, seed: int) -> Tensor | None:
        """The key of ``step``'s dropout: the model's and the adapters' input dropout (None: neither drops)."""
        if self.dropout == 0 and self.cfg.dropout == 0:
            return None
        return random.fold_in(random.key(seed), step).to(run.device)

    def load_latest(self, run: FitRun, latest: Path):
        if not checkpoint_exists(latest):
            raise ValueError(f"nothing to resume in {str(run.out)!r}: no checkpoint at {str(latest)!r}")
        ck = load_tree(latest, like=tree.map(lambda x: x[0], self.stack.trainable), device=run.device)
        check_resume(run, latest, ck.extra.get("fit", {}), self.fit_state(run))
        return ck

    def checkpoint_config(self, i: int) -> dict:
        return {"adapter": {**self.adapter, "rank": self.ranks[i]}, "model": self.cfg.to_dict()}

    def member_losses(self, params: dict, batches: list) -> Tensor:
        stack = self.stack

        def params_of(trainable: dict, index: Tensor) -> dict:
            return member_params(stack, trainable, stack.ranks.to(index.device)[index])

        return evaluate_ensemble(params, batches, self.cfg, member_params=params_of)


__all__ = [
    "AdapterMembers", "AdapterStack", "check_shared", "forward_rows", "load_member", "make_stack_step",
    "member_adapters", "member_params", "rank_mask", "scaled", "stack_adapters",
]
