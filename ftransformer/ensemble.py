"""``vmap`` over models: ensembles and hyperparameter sweeps trained in one step, and ranked.

``stack_params`` puts N parameter trees on a leading ``member`` axis; ``make_ensemble_step`` is
``vmap`` of the very step ``train.make_train_step`` builds (a ``train.TrainStep`` too), so all N members
train in one call, each on its own batch with its own dropout key -- and, with an optimizer *factory*,
each with its own learning rate or weight decay (a sweep). ``Members`` is ``loop.fit``'s data for
them: the same loop as one model (resume, Ctrl-C, accumulation), with one checkpoint directory per
member (``member-<i>/latest``, ``best``), records with a ``member`` field, and one plot of every
member's curves (a ``loop.TokenData``: the same batches, evaluation sets and checks). ``format_ranking`` prints the members by best val loss.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ftransformer import optim, tree
from ftransformer.checkpoint import BEST, LATEST, restore_opt_state, save_checkpoint
from ftransformer.config import Config
from ftransformer.data import unpack_batch
from ftransformer.io import save_figure
from ftransformer.loop import FitResult, FitRun, FitState, TokenData, improved, refuse_overwrite
from ftransformer.model import check_ids, check_tokens, loss_fn
from ftransformer.params import init_params
from ftransformer.tree import stack as stack_params, unstack as unstack_params
from ftransformer.train import TrainStep, make_train_step

PyTree = Any


# ---------------------------------------------------------------- stacking


def init_ensemble(cfg: Config, seeds: Sequence[int], *, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None) -> dict:
    """``init_params`` for every seed, stacked: leaves of shape ``(len(seeds), *param)``."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("init_ensemble needs at least one seed, got none")
    kwargs = {} if dtype is None else {"dtype": dtype}
    return stack_params([init_params(cfg, seed=s, device=device, **kwargs) for s in seeds])


def _members(stacked: PyTree) -> int:
    leaves = tree.leaves(stacked)
    if not leaves or leaves[0].ndim == 0:
        raise ValueError("stacked params must have a leading member axis (ft.ensemble.stack_params / ft.ensemble.init_ensemble)")
    return leaves[0].shape[0]


def _member_optimizer(optimizer) -> tuple[Callable[[dict | None], optim.GradientTransformation], bool]:
    """``(hparams -> that member's optimizer, whether optimizer is a factory)``: the shared one, or the factory
    called with the member's values."""
    factory = not isinstance(optimizer, optim.GradientTransformation)
    if factory and not callable(optimizer):
        raise TypeError(f"optimizer must be a GradientTransformation or a factory of one, got {type(optimizer).__name__}")

    def member_opt(hp: dict | None) -> optim.GradientTransformation:
        opt = optimizer(**hp) if factory else optimizer
        if not isinstance(opt, optim.GradientTransformation):
            raise TypeError(f"the optimizer factory must return a GradientTransformation, got {type(opt).__name__}")
        return opt

    return member_opt, factory


def _check_hparams(hparams, members: int | None, factory: bool) -> dict:
    """``hparams`` as float tensors of one value per member (``members``: None, any common length)."""
    if hparams is None or not hparams:
        if factory:
            raise ValueError("an optimizer factory needs hparams: {name: tensor of one value per member}")
        return {}
    if not factory:
        raise ValueError("hparams need an optimizer factory (a function of them returning a GradientTransformation)")
    out = {}
    for name, value in hparams.items():
        value = torch.as_tensor(value, dtype=torch.float32)
        if members is None and value.ndim == 1:
            members = value.shape[0]  # the first one says how many members there are
        if value.shape != (members,):
            raise ValueError(f"hparams[{name!r}] must hold one value per member ({members}), got shape {tuple(value.shape)}")
        out[name] = value
    return out


def _check_member_batch(tokens: Tensor, targets: Tensor, members: int, cfg: Config, ignore_index: int) -> None:
    if tokens.ndim != 3 or tokens.shape[0] != members:
        raise ValueError(f"ensemble tokens must have shape (members={members}, batch, seq), got {tuple(tokens.shape)}")
    if targets.shape != tokens.shape:
        raise ValueError(f"targets has shape {tuple(targets.shape)} but tokens has shape {tuple(tokens.shape)}")
    check_tokens(tokens, cfg)
    check_ids("targets", targets, cfg.vocab_size, allowed=ignore_index)


def make_ensemble_step(
    cfg: Config,
    optimizer: optim.GradientTransformation | Callable[..., optim.GradientTransformation],
    *,
    hparams: dict | None = None,
    accum_steps: int = 1,
    ignore_index: int = -100,
    member_step: Callable[[optim.GradientTransformation, Tensor], TrainStep] | None = None,
) -> TrainStep:
    """ONE vmapped step that trains every member of an ensemble at once: ``vmap`` of ``make_train_step``'s step.

    A ``train.TrainStep``: ``init(stacked_params)``, ``step(stacked_params, opt_state, (tokens, targets),
    keys=None)``. ``tokens``/``targets`` are ``(members, batch, seq)`` (each member its own batch), ``keys``
    are ``(members,)`` dropout keys (or None), and every metric (``loss``, ``grad_norm``, ``lr``, ``tokens``)
    has one value per member. Each member's update equals what ``make_train_step(cfg, optimizer,
    accum_steps=accum_steps)`` would do to it alone. ``optimizer`` is a ``GradientTransformation`` shared
    by all members, or, for a sweep, a factory called inside the vmapped step with ``hparams``' values for
    that member as 0-d tensors::

        hp = {"lr": tensor([3e-4, 1e-3]), "weight_decay": tensor([0.0, 0.1])}
        step = make_ensemble_step(cfg, lambda lr, weight_decay: optim.adamw(lr, weight_decay=weight_decay), hparams=hp)
        state = step.init(stacked)
    ``member_step(optimizer, index)``: member ``index``'s step in place of ``make_train_step``'s (``peft.stack``).
    """
    member_opt, factory = _member_optimizer(optimizer)
    _check_hparams(hparams, None, factory)

    def init(stacked_params):
        hp = _check_hparams(hparams, _members(stacked_params), factory)
        each = [{k: v[i] for k, v in hp.items()} for i in range(_members(stacked_params))]
        return stack_params([member_opt(h).init(p) for h, p in zip(each, unstack_params(stacked_params))])

    def one_step(params, opt_state, tokens, targets, key, hp, index):
        one = (make_train_step(cfg, member_opt(hp), accum_steps=accum_steps, ignore_index=ignore_index)
               if member_step is None else member_step(member_opt(hp), index))
        return one.step(params, opt_state, (tokens, targets), key)

    def step(stacked_params, opt_state, batch, keys=None):
        tokens, targets = unpack_batch(batch)
        members = _members(stacked_params)
        _check_member_batch(tokens, targets, members, cfg, ignore_index)
        if keys is not None and (not isinstance(keys, Tensor) or keys.shape != (members,)):
            raise ValueError(f"keys must be a tensor of one key per member ({members},), got {keys!r}")
        hp = {k: v.to(tokens.device) for k, v in _check_hparams(hparams, members, factory).items()}
        in_dims = (0, 0, 0, 0, None if keys is None else 0, 0 if hp else None, 0)
        vmapped = torch.func.vmap(one_step, in_dims=in_dims, randomness="error")
        return vmapped(stacked_params, opt_state, tokens, targets, keys, hp if hp else None,
                       torch.arange(members, device=tokens.device))

    return TrainStep(init, step, accum_steps)


# ---------------------------------------------------------------- evaluation and plots


def evaluate_ensemble(
    stacked: dict, batches: Iterable, cfg: Config, *, ignore_index: int = -100,
    member_params: Callable[[dict, Tensor], dict] | None = None,
) -> Tensor:
    """Every member's token-weighted mean loss over ``batches``, in one vmapped forward per batch.

    A batch's ``tokens``/``targets`` are ``(batch, seq)`` (all members see them) or
    ``(members, batch, seq)`` (each member its own). Returns one loss per member. (SDPA's CPU kernel
    has no ``vmap`` batching rule even forward: attention runs on the einsum path, ``layers.kernel_here``.)
    ``member_params(tree, index)``: the model params member ``index``'s tree stands for (default: the tree).
    """
    members = _members(stacked)
    total, count = None, None

    def member_sum(params, tokens, targets, index):
        params = params if member_params is None else member_params(params, index)
        s = loss_fn(params, tokens, targets, cfg, ignore_index=ignore_index, reduction="sum")
        return s, (targets != ignore_index).sum()

    with torch.no_grad():
        for batch in batches:
            tokens, targets = unpack_batch(batch)
            check_tokens(tokens, cfg)
            check_ids("targets", targets, cfg.vocab_size, allowed=ignore_index)
            index = torch.arange(members, device=tokens.device)
            if tokens.ndim == 3:
                if tokens.shape[0] != members:
                    raise ValueError(f"per-member tokens must have members={members} first, got {tuple(tokens.shape)}")
                s, n = torch.func.vmap(member_sum, in_dims=(0, 0, 0, 0))(stacked, tokens, targets, index)
            else:
                s, n = torch.func.vmap(member_sum, in_dims=(0, None, None, 0))(stacked, tokens, targets, index)
            total = s if total is None else total + s
            count = n if count is None else count + n
    if count is None:
        raise ValueError("evaluate_ensemble needs at least one batch, got none")
    if bool((count == 0).any()):
        raise ValueError(f"evaluate_ensemble needs target tokens to count, got only ignore_index={ignore_index}")
    return total / count


def plot_members(path: Path, history: list[dict], names: list[str]) -> None:
    """Every member's val loss (solid) and train loss (dashed) against step, one colour per member, one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        rows = [r for r in history if r["member"] == i]
        color = f"C{i % 10}"
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["val_loss"] for r in rows], color=color, marker="o", ms=3, label=f"{name} val")
        ax.plot(steps, [r["train_loss"] for r in rows], color=color, ls="--", alpha=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (solid: val, dashed: train)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------- training an ensemble or a sweep with loop.fit


def member_name(spec: dict) -> str:
    """``lr=0.001,seed=2``: a member's settings, for tables, legends and records."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in spec.items())


class Members(TokenData):
    """``loop.fit``'s data for an ensemble or a sweep on a token corpus:
    ``fit(members.init_params(), members.train_step(), members, settings, out_dir=...)``.

    Each member is a dict: ``seed`` (its initial parameters, batches and dropout keys; default ``seed``)
    and hyperparameters passed to ``make_optimizer(**hparams)`` as 0-d tensors, one value per member
    (e.g. ``{"lr": 1e-3, "weight_decay": 0.1}``); with none, ``make_optimizer()`` is shared. All members
    are evaluated on the same fixed batches (seeded by the settings' ``seed``), so their losses compare.
    ``out_dir`` gets ``metrics.jsonl`` (records with a ``member`` field), one ``loss.png`` with every
    member's curves, and ``member-<i>/latest`` and ``member-<i>/best`` checkpoints (each loadable on its
    own, e.g. by ``ftransformer generate --checkpoint out_dir/member-0``). A member whose loss turns
    non-finite keeps training in the stack (the others are independent of it); fit stops only when every
    member has. ``extra(i)`` gives member ``i``'s JSON extra for its checkpoints.
    """

    def __init__(self, cfg: Config, train_ids, val_ids, make_optimizer: Callable[..., optim.GradientTransformation],
                 members: Sequence[dict], *, seed: int = 0, tokenizer=None,
                 extra: Callable[[int], dict] | None = None):
        super().__init__(cfg, train_ids, val_ids, tokenizer=tokenizer)
        self.members = [dict(m) for m in members]
        if not self.members:
            raise ValueError("an ensemble needs at least one member, got none")
        self.hp_names = sorted({k for m in self.members for k in m if k != "seed"})
        for i, m in enumerate(self.members):
            missing = [k for k in self.hp_names if k not in m]
            if missing:
                raise ValueError(f"member {i} ({m}) lacks {missing}: every member needs the same hyperparameters")
        self.make_optimizer, self.member_extra = make_optimizer, extra
        self.seeds = [int(m.get("seed", seed)) for m in self.members]
        self.names = [member_name(m) for m in self.members]

    def init_params(self, device: str | torch.device | None = None) -> dict:
        """The members' initial parameters, stacked (``init_ensemble`` of their seeds)."""
        return init_ensemble(self.cfg, self.seeds, device=device)

    def hparams(self, device: torch.device | None = None) -> dict | None:
        """The swept hyperparameters, one value per member (None: a plain ensemble)."""
        if not self.hp_names:
            return None
        return {k: torch.tensor([float(m[k]) for m in self.members], device=device) for k in self.hp_names}

    def optimizer(self, i: int) -> optim.GradientTransformation:
        """Member ``i``'s own optimizer (what its checkpoint's state belongs to)."""
        if not self.hp_names:
            return self.make_optimizer()
        return self.make_optimizer(**{k: torch.tensor(float(self.members[i][k])) for k in self.hp_names})

    def train_step(self, *, accum_steps: int = 1) -> TrainStep:
        """The members' one vmapped ``TrainStep`` (``make_ensemble_step`` with their hyperparameters bound)."""
        opt = self.make_optimizer if self.hp_names else self.make_optimizer()
        return make_ensemble_step(self.cfg, opt, hparams=self.hparams(), accum_steps=accum_steps)

    def dirs(self, out: Path) -> list[Path]:
        """``out/member-<i>``: each member's checkpoint directory."""
        return [out / f"member-{i}" for i in range(len(self.members))]

    def start(self, run: FitRun, params: dict, init: Callable, resume: bool) -> FitState:
        if run.world > 1:
            raise ValueError("an ensemble trains in one process; launch without torchrun")
        self.prepare(run)
        if resume:
            return self._resume(run, init)
        for d in self.dirs(run.out):
            refuse_overwrite(run, d / LATEST)
        params = tree.to(params, device=run.device)
        return FitState(params, init(params), 0, [], [None] * len(self.members), 0.0)

    def _resume(self, run: FitRun, init: Callable) -> FitState:
        cks = []
        for i, d in enumerate(self.dirs(run.out)):
            ck = self.load_latest(run, d / LATEST)
            if ck.extra.get("member", {}).get("name") != self.names[i]:
                raise ValueError(f"cannot resume {str(d)!r} as member {i} ({self.names[i]}): it was saved as "
                                 f"{ck.extra.get('member', {}).get('name')!r}")
            cks.append(ck)
        if len({ck.step for ck in cks}) != 1:
            raise ValueError(f"cannot resume {str(run.out)!r}: its members were saved at steps {[c.step for c in cks]}")
        run.say(f"resuming {str(run.out)!r} at step {cks[0].step} ({len(cks)} members)")
        params = stack_params([c.params for c in cks])
        flat = {k: torch.stack([c.opt_state[k] for c in cks]) if isinstance(v, Tensor) else v
                for k, v in cks[0].opt_state.items()}
        history = sorted((r for ck in cks for r in ck.metrics), key=lambda r: (r["step"], r["member"]))
        fit_saved = cks[0].extra.get("fit", {})
        return FitState(params, restore_opt_state(flat, init(params), where=repr(str(run.out))), cks[0].step,
                        history, [c.extra["member"].get("best_val_loss") for c in cks],
                        float(fit_saved.get("elapsed_s", 0.0)))

    # -- what a stack of another kind (peft.stack's adapters) changes
    def load_latest(self, run: FitRun, latest: Path):
        """A member's ``latest`` checkpoint, loaded and checked to draw this run's batches."""
        return self.latest_checkpoint(run, latest)

    def checkpoint_config(self, i: int) -> Config | dict:
        """What member ``i``'s checkpoints record as their config (a model's ``Config`` here)."""
        return self.cfg

    def member_losses(self, params: dict, batches: list) -> Tensor:
        """Every member's mean loss over ``batches`` (``evaluate_ensemble``)."""
        return evaluate_ensemble(params, batches, self.cfg)

    def batch(self, run: FitRun, step: int) -> tuple[tuple[Tensor, Tensor], Tensor | None]:
        """Every member's own batch of ``step`` (drawn with its seed), stacked: ``(members, batch, seq)``."""
        batches = [self.draw(run, step, s) for s in self.seeds]
        keys = [self.dropout_key(run, step, s) for s in self.seeds]
        tokens, targets = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
        return (tokens, targets), None if keys[0] is None else torch.stack(keys)

    def evaluate(self, run: FitRun, state: FitState, common: dict) -> FitState:
        """The state with one record per member; each member's checkpoints saved (``best`` when it improved)."""
        train_eval, val = self._sets
        train_loss = self.member_losses(state.params, train_eval).tolist()
        val_loss = self.member_losses(state.params, val).tolist()
        lrs = optim.find_lr(state.opt_state)
        records = [
            {"step": state.step, "member": i, "name": self.names[i], "seed": self.seeds[i],
             "hparams": {k: self.members[i][k] for k in self.hp_names}, "train_loss": train_loss[i],
             "val_loss": val_loss[i], "lr": None if lrs is None else float(lrs[i]), **common}
            for i in range(len(self.members))
        ]
        better = [improved(b, v) for b, v in zip(state.best_val, val_loss)]
        best = [v if up else b for b, v, up in zip(state.best_val, val_loss, better)]
        new = replace(state, history=state.history + records, best_val=best)
        self._save_members(run, new, better)
        if run.is_main:
            plot_members(run.files["plot"], new.history, self.names)
        run.say(f"step {state.step}: val loss " + ", ".join(f"{n} {v:.4f}" for n, v in zip(self.names, val_loss)))
        return new

    def save(self, run: FitRun, state: FitState) -> None:
        self._save_members(run, state, [False] * len(self.members))

    def _save_members(self, run: FitRun, state: FitState, better: list[bool]) -> None:
        """Every member's ``latest`` checkpoint, and ``best`` where ``better`` says it improved."""
        params, opt_states = unstack_params(state.params), unstack_params(state.opt_state)
        for i, d in enumerate(self.dirs(run.out)):
            meta = dict(
                params=params[i], config=self.checkpoint_config(i), step=state.step, opt_state=opt_states[i], tokenizer=self.tokenizer,
                metrics=[r for r in state.history if r["member"] == i],
                extra={**(self.member_extra(i) if self.member_extra else {}),
                       "member": {"member": i, "name": self.names[i], **self.members[i], "seed": self.seeds[i],
                                  "best_val_loss": state.best_val[i]},
                       "fit": self.fit_state(run, state.step, state.elapsed, state.best_val[i])},
            )
            if better[i]:
                save_checkpoint(d / BEST, **meta)
            save_checkpoint(d / LATEST, **meta)

    def files(self, run: FitRun) -> dict[str, Path]:
        """The metrics file and the plot, and member 0's ``latest`` and ``best`` (each member has its own)."""
        first = self.dirs(run.out)[0]
        return {"latest": first / LATEST, "best": first / BEST, "metrics": run.files["metrics"],
                "plot": run.files["plot"]}

    def summary(self, result: FitResult) -> list[dict]:
        """Per member: member, name, seed, hparams, best_val_loss, best_step, final_val_loss, dir."""
        out = []
        for i, d in enumerate(self.dirs(result.out_dir)):
            rows = [r for r in result.history if r["member"] == i]
            best = result.best_val_loss[i]
            out.append({"member": i, "name": self.names[i], "seed": self.seeds[i],
                        "hparams": {k: self.members[i][k] for k in self.hp_names}, "best_val_loss": best,
                        "best_step": next((r["step"] for r in rows if r["val_loss"] == best), None),
                        "final_val_loss": rows[-1]["val_loss"] if rows else None, "dir": d})
        return out


def format_ranking(members: list[dict]) -> str:
    """``Members.summary`` ranked by best val loss (diverged members last), as a text table."""
    order = sorted(members, key=lambda m: (m["best_val_loss"] is None, m["best_val_loss"] or 0.0))
    width = max(8, *(len(m["name"]) for m in order)) + 2
    lines = [f"{'rank':<6}{'member':<8}{'settings':<{width}}{'best val':>10}{'at step':>9}{'final val':>11}  checkpoint"]
    lines.append("-" * (len(lines[0]) + 10))
    for rank, m in enumerate(order, 1):
        b = "diverged" if m["best_val_loss"] is None else f"{m['best_val_loss']:.4f}"
        lines.append(
            f"{rank:<6}{m['member']:<8}{m['name']:<{width}}{b:>10}{str(m['best_step']):>9}"
            f"{m['final_val_loss']:>11.4f}  {m['dir']}"
        )
    return "\n".join(lines)


__all__ = [
    "Members", "evaluate_ensemble", "format_ranking", "init_ensemble", "make_ensemble_step",
    "member_name", "plot_members", "stack_params", "unstack_params",
]
