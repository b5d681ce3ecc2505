"""``ftransformer inspect influence``: which training sequences made the model say ``--query``?

The training sequences are the lines of ``--data`` (default: the corpus the checkpoint was trained on), each cut
into pieces of at most ``max_seq_len + 1`` tokens. The measurement is the query's summed next-token loss; a
sequence's score is how much training on it lowered that loss, to first order:

* ``--method projected`` (default): TRAK / LoGra projected gradients (``attribution.projected``): every
  sequence's gradient projected by a random matrix from ``--seed`` (``--projection dense`` with ``--k`` numbers,
  the default up to ``DENSE_UP_TO`` parameters, or ``kronecker``: ``--k x --k`` per projection matrix), preconditioned by ``(Phi^T Phi + lambda I)^-1`` with
  relative ``--damping`` (0: the plain inner product); ``--index DIR`` keeps the index on disk and reuses it;
* ``--method ekfac``: EK-FAC influence functions (``attribution.ekfac``).

Printed: the ``--top`` sequences with their scores; written (``--out``): a bar plot of them.
"""

import sys
import tempfile
from pathlib import Path

import torch

VIEWS = ("influence",)
METHODS = ("projected", "ekfac")  # inspect_circuits offers them on its --method flag (one flag, two views)
# The flags only this view reads (default None, so a flag given to another view can be named).
FLAGS = ("query", "data", "projection", "k", "damping", "index")
# The dense projection draws parameters x k random numbers for every batch of sequences: above this, LoGra's.
DENSE_UP_TO = 2_000_000


def add_arguments(group) -> None:
    group.add_argument("--query", metavar="TEXT", default=None, help="influence: the text whose loss is explained")
    group.add_argument("--data", metavar="FILE", default=None,
                       help="influence: the training text, one sequence a line (default: the checkpoint's training corpus)")
    group.add_argument("--projection", choices=("dense", "kronecker"), default=None,
                       help="influence --method projected: TRAK's dense projection or LoGra's per-matrix Kronecker one "
                            f"(default: dense up to {DENSE_UP_TO:,} parameters, kronecker above)")
    group.add_argument("--k", type=int, metavar="K", default=None,
                       help="influence: projected dimension (dense, default 512) or side of each k x k block (kronecker, default 16)")
    group.add_argument("--damping", type=float, metavar="L", default=None,
                       help="influence: relative damping of the preconditioner (default: 0.01 projected; EK-FAC's own default)")
    group.add_argument("--index", metavar="DIR", default=None,
                       help="influence --method projected: keep the training index in DIR and reuse it when it matches")


def check_args(args) -> None:
    """The influence view's flags, as one-line errors."""
    if args.view not in VIEWS:
        given = [f for f in FLAGS if getattr(args, f, None) is not None]
        if given:
            raise ValueError(f"{', '.join('--' + f for f in given)} go with the influence view, not {args.view!r}")
        return
    if args.query is None:
        raise ValueError("inspect influence needs --query TEXT")
    method = args.method or "projected"
    if method not in METHODS:
        raise ValueError(f"inspect influence --method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "ekfac" and (args.projection is not None or args.k is not None or args.index is not None):
        raise ValueError("--projection, --k and --index go with --method projected, not ekfac")
    if args.k is not None and args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.damping is not None and args.damping < 0:
        raise ValueError(f"--damping must be >= 0, got {args.damping}")
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")


def data_path(args) -> str:
    """``--data``, else the corpus recorded in the checkpoint (``ftransformer train``'s ``extra["train"]["data"]``)."""
    if args.data is not None:
        return args.data
    if args.checkpoint is not None:
        from ftransformer.checkpoint import read_checkpoint_info

        recorded = read_checkpoint_info(args.checkpoint).get("extra", {}).get("train", {}).get("data")
        if recorded is not None:
            return recorded
    raise ValueError("inspect influence needs --data FILE: the model's source records no training corpus file")


def training_sequences(text: str, tokenizer, width: int) -> tuple[list[list[int]], list[str]]:
    """Every non-empty line's ids, cut into pieces of ``width`` ids (pieces of >= 2 ids), and each piece's text."""
    sequences, texts = [], []
    for line in text.splitlines():
        ids = tokenizer.encode(line) if line.strip() else []
        for start in range(0, len(ids), width):
            piece = ids[start: start + width]
            if len(piece) >= 2:
                sequences.append(piece)
                texts.append(tokenizer.decode(piece))
    if not sequences:
        raise ValueError("the training text holds no sequence of >= 2 tokens")
    return sequences, texts


def query_ids(query: str, tokenizer, width: int) -> list[int]:
    """The query's ids (its last ``width`` when longer); at least 2 (a next-token loss)."""
    ids = tokenizer.encode(query)
    if len(ids) < 2:
        raise ValueError(f"--query must encode to at least 2 tokens (a next-token loss), got {len(ids)}")
    if len(ids) > width:
        print(f"note: --query is {len(ids)} tokens; using its last {width}", file=sys.stderr)
    return ids[-width:]


def _fingerprint(params, data: str) -> dict:
    """What an index on disk must have been built from to be reused: the data file and (a digest of) the weights."""
    import ftransformer as ft

    return {"data": str(Path(data).resolve()),
            "weights": float(sum(x.double().square().sum() for x in ft.tree.leaves(params)))}


def _index_matches(index, projection, n: int, fingerprint: dict) -> bool:
    from ftransformer.attribution import projected

    same = projected.index_projection(index)
    return (index.meta["rows"] == n and int(same.key) == int(projection.key) and same[1:] == projection[1:]
            and index.meta["extra"] == fingerprint)


def projected_scores(args, cfg, params, sequences, texts, query, data: str) -> torch.Tensor:
    """TRAK / LoGra scores of every training sequence for the query (building or reusing the index)."""
    import ftransformer as ft
    from ftransformer.attribution import projected

    kind = args.projection or ("dense" if ft.count_params(params) <= DENSE_UP_TO else "kronecker")
    k = args.k or (512 if kind == "dense" else 16)
    projection = projected.Projection(ft.random.key(args.seed), k, kind=kind)
    damping = 0.01 if args.damping is None else args.damping
    with tempfile.TemporaryDirectory(prefix="ftransformer-index-") as scratch:
        where = Path(args.index) if args.index is not None else Path(scratch)
        index = None
        if (where / projected.META_FILE).is_file():
            index = projected.load_index(where)
            if not _index_matches(index, projection, len(sequences), _fingerprint(params, data)):
                raise ValueError(f"--index {where} was built with another projection, data or model; give a new directory")
            print(f"reusing the index in {where}")
        if index is None:
            index = projected.build_index(params, cfg, sequences, projection, where, texts=texts,
                                          extra=_fingerprint(params, data))
        q = projected.features(params, *projected.pad_sequences([query], device=index.features.device), cfg, projection)
        return projected.scores(index, q, damping=damping or None)[0]


def ekfac_scores(args, cfg, params, sequences, query) -> torch.Tensor:
    """EK-FAC influence of every training sequence on the query (factors fitted on the same sequences)."""
    import ftransformer as ft
    from ftransformer.attribution import ekfac, projected

    device = next(iter(ft.tree.leaves(params))).device
    batches = [projected.pad_sequences(sequences[i: i + 32], device=device) for i in range(0, len(sequences), 32)]
    factors = ekfac.fit_factors(params, cfg, batches, key=ft.random.key(args.seed))
    return ekfac.pairwise_scores(params, cfg, factors, projected.pad_sequences([query], device=device), batches,
                                 damping=args.damping)[0]


def run(args, cfg, params, tokenizer, source, device) -> int:
    """Print the top training sequences for the query and draw their scores."""
    from ftransformer.attribution import plots
    from ftransformer.data.corpus import read_text_file

    path = data_path(args)
    sequences, texts = training_sequences(read_text_file(path), tokenizer, cfg.max_seq_len + 1)
    query = query_ids(args.query, tokenizer, cfg.max_seq_len + 1)
    method = args.method or "projected"
    print(f"influence of {len(sequences)} training sequences of {path} on the loss of {args.query!r} "
          f"({source}, {method})")
    if method == "ekfac":
        scores = ekfac_scores(args, cfg, params, sequences, query)
    else:
        scores = projected_scores(args, cfg, params, sequences, texts, query, path)
    top = scores.double().cpu().argsort(descending=True)[: args.top].tolist()
    print(f"  {'rank':>4}  {'score':>11}  {'sequence':>8}  text")
    for rank, i in enumerate(top, 1):
        print(f"  {rank:>4}  {float(scores[i]):>11.4g}  {i:>8}  {texts[i]!r}")
    if args.out is not None:
        written = plots.plot_influence(scores[top], [texts[i] for i in top], args.out,
                                       title=f"{source}: training sequences behind {args.query!r}"[:90])
        print(f"wrote {written}")
    return 0
